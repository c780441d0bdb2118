"""The additive analytic cost model the solver needs: per layer x rung x precision x processor.

Roofline-style: a layer takes max(FLOPs / (peak x efficiency), bytes / bandwidth) plus a fixed
overhead per op it launches; its energy is that time at the processor's active power plus the idle
power of the local processors that wait, plus the DRAM energy of the bytes it moves. A cut between
two processors costs the transfer of the tensors that cross it over the board's link. Weight memory
is parameters x bytes per element.

It is deliberately simple and additive, so that it is exact inside a mixed-integer program. It can
be calibrated: per (processor, op kind, precision) latency factors fitted from measurements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from explorer.boards import Board, Processor
from explorer.compress import Compressor, Rung
from explorer.graph import Layer, LayerGraph
from explorer.plan import Decision, Plan

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}
ACTIVATION_BYTES = 4  # boundaries between layers stay fp32 (casts and QDQ live inside the layer)


def compute_nodes(rung: Rung) -> int:
    """Compute ops a layer launches at a rung (a factorised layer is two)."""
    return 1 if rung.method == "full" else 2


def extra_nodes(precision: str, compute: int) -> int:
    """Ops a precision adds around a layer: casts for fp16, quantize/dequantize pairs for int8."""
    return {"fp32": 0, "fp16": 2, "int8": 3 * compute}[precision]


@dataclass(frozen=True)
class LayerCost:
    """Predicted cost of one layer at one choice."""

    latency_s: float
    energy_j: float
    weight_bytes: int


@dataclass
class PlanCost:
    """Predicted totals of a plan (the cost model's view, additive over layers and cuts)."""

    latency_s: float
    energy_j: float
    weight_bytes_by_processor: dict[str, int]
    layer_latency_s: list[float] = field(default_factory=list)
    transfer_latency_s: float = 0.0


class CostModel:
    """Additive per-layer latency, energy and weight memory on a board, with calibration factors."""

    def __init__(self, board: Board, graph: LayerGraph, compressor: Compressor,
                 factors: dict[tuple[str, str, str], float] | None = None):
        self.board = board
        self.graph = graph
        self.compressor = compressor
        self.factors = dict(factors or {})  # (processor, op kind, precision) -> latency multiplier

    def supports(self, processor: Processor, layer: Layer, precision: str) -> bool:
        """Whether the processor can run this layer at this precision."""
        return precision in processor.precisions and layer.op_type in processor.ops

    def layer_cost(self, layer: Layer, rung: Rung, precision: str, processor_id: str) -> LayerCost:
        """Latency, energy and weight bytes of one layer at one (rung, precision, processor)."""
        latency = self.layer_latency_s(layer, rung, precision, processor_id)
        return LayerCost(latency, self.energy_j(layer, rung, precision, processor_id, latency),
                         rung.params * BYTES_PER_ELEMENT[precision])

    def layer_latency_s(self, layer: Layer, rung: Rung, precision: str, processor_id: str) -> float:
        """Roofline latency of one layer at one choice, with launch overheads and calibration factor."""
        processor = self.board.processor(processor_id)
        weight_bytes = rung.params * BYTES_PER_ELEMENT[precision]
        peak = processor.peak_gflops[precision] * 1e9 * processor.efficiency[layer.kind]
        compute_s = rung.flops / peak
        memory_s = (weight_bytes + self._activation_bytes(layer)) / (processor.bandwidth_gbps * 1e9)
        compute = compute_nodes(rung)
        ops = compute + extra_nodes(precision, compute) + len(layer.node_names) - 1
        latency = max(compute_s, memory_s) + ops * processor.launch_overhead_us * 1e-6
        return latency * self.factors.get((processor_id, layer.kind, precision), 1.0)

    def energy_j(self, layer: Layer, rung: Rung, precision: str, processor_id: str, latency_s: float) -> float:
        """Energy of one layer that takes `latency_s`: at the processor's active power, the other local processors
        idle meanwhile, plus the DRAM energy of the bytes it moves (none on a remote processor)."""
        processor = self.board.processor(processor_id)
        moved = rung.params * BYTES_PER_ELEMENT[precision] + self._activation_bytes(layer)
        dram_j = 0.0 if processor.is_remote else moved * self.board.memory.energy_nj_per_byte * 1e-9
        waiting_w = sum(p.idle_power_w for pid, p in self.board.processors.items() if pid != processor_id and not p.is_remote)
        return latency_s * (processor.active_power_w + waiting_w) + dram_j

    def _activation_bytes(self, layer: Layer) -> int:
        return ACTIVATION_BYTES * (self._elements(layer.input_shape) + self._elements(layer.output_shape))

    #: Whether costs between neighbouring layers depend on their precisions too (see `boundary`).
    by_precision = False

    def boundary(self, index: int, first: Decision, second: Decision) -> tuple[float, float]:
        """(seconds, joules) between layer `index` at `first` and layer index + 1 at `second`: here the transfer
        when they are on different processors."""
        return self.transfer(self.graph.layers[index], first.placed_processor, second.placed_processor)

    def transfer(self, layer: Layer, from_processor: str, to_processor: str) -> tuple[float, float]:
        """(seconds, joules) to move a layer's outgoing tensors to the next layer's processor."""
        if from_processor == to_processor:
            return 0.0, 0.0
        link = self.board.link(from_processor, to_processor)
        nbytes = sum(self.graph.tensor_bytes(t) for t in layer.outputs)
        return link.transfer_time_s(nbytes), link.transfer_energy_j(nbytes)

    @property
    def host(self) -> str:
        """The processor the input comes from and the output returns to: the board's first."""
        return self.board.processor_ids[0]

    def input_transfer(self, processor_id: str) -> tuple[float, float]:
        """(seconds, joules) to bring the model input from the host to the first layer's processor."""
        return self._host_transfer(processor_id, self.graph.input_names)

    def output_transfer(self, processor_id: str) -> tuple[float, float]:
        """(seconds, joules) to bring the model output from the last layer's processor to the host."""
        return self._host_transfer(processor_id, self.graph.output_names)

    def _host_transfer(self, processor_id: str, tensors: list[str]) -> tuple[float, float]:
        if processor_id == self.host:
            return 0.0, 0.0
        link = self.board.link(self.host, processor_id)
        nbytes = sum(self.graph.tensor_bytes(t) for t in tensors)
        return link.transfer_time_s(nbytes), link.transfer_energy_j(nbytes)

    def plan_cost(self, plan: Plan) -> PlanCost:
        """Additive totals of a plan: layers, transfers at every change of processor, and bringing the
        input from / the output back to the host (what the solver optimises)."""
        first, last = plan.decisions[0][1].placed_processor, plan.decisions[-1][1].placed_processor
        (in_s, in_j), (out_s, out_j) = self.input_transfer(first), self.output_transfer(last)
        latency, energy, transfer = in_s + out_s, in_j + out_j, in_s + out_s
        weights: dict[str, int] = {}
        layer_latency = []
        previous: Decision | None = None
        for index, ((name, decision), layer) in enumerate(zip(plan.decisions, self.graph.layers)):
            rung = self.compressor.rung(name, decision.method, decision.rank)
            processor = decision.placed_processor
            cost = self.layer_cost(layer, rung, decision.precision, processor)
            latency += cost.latency_s
            energy += cost.energy_j
            layer_latency.append(cost.latency_s)
            weights[processor] = weights.get(processor, 0) + cost.weight_bytes
            if previous is not None:
                seconds, joules = self.boundary(index - 1, previous, decision)
                latency, energy, transfer = latency + seconds, energy + joules, transfer + seconds
            previous = decision
        return PlanCost(latency, energy, weights, layer_latency, transfer)

    def calibrated(self, observations: list[tuple[str, str, str, float, float]]) -> CostModel:
        """A copy whose factors make predictions match measurements.

        `observations`: (processor, op kind, precision, predicted seconds by *this* model, measured
        seconds). Each group's factor is multiplied by the median measured/predicted ratio.
        """
        groups: dict[tuple[str, str, str], list[float]] = {}
        for processor, kind, precision, predicted, measured in observations:
            if predicted > 0 and measured > 0:
                groups.setdefault((processor, kind, precision), []).append(measured / predicted)
        factors = dict(self.factors)
        for key, ratios in groups.items():
            factors[key] = factors.get(key, 1.0) * float(np.median(ratios))
        return CostModel(self.board, self.graph, self.compressor, factors)

    @staticmethod
    def _elements(shape: tuple[int, ...]) -> int:
        return math.prod(shape) if shape else 0
