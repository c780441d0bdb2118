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
from explorer.plan import Plan

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
        processor = self.board.processor(processor_id)
        weight_bytes = rung.params * BYTES_PER_ELEMENT[precision]
        activation_bytes = ACTIVATION_BYTES * (self._elements(layer.input_shape) + self._elements(layer.output_shape))
        peak = processor.peak_gflops[precision] * 1e9 * processor.efficiency[layer.kind]
        compute_s = rung.flops / peak
        memory_s = (weight_bytes + activation_bytes) / (processor.bandwidth_gbps * 1e9)
        compute = compute_nodes(rung)
        ops = compute + extra_nodes(precision, compute) + len(layer.node_names) - 1
        latency = max(compute_s, memory_s) + ops * processor.launch_overhead_us * 1e-6
        latency *= self.factors.get((processor_id, layer.kind, precision), 1.0)
        dram_j = 0.0 if processor.is_remote else (weight_bytes + activation_bytes) * self.board.memory.energy_nj_per_byte * 1e-9
        waiting_w = sum(p.idle_power_w for pid, p in self.board.processors.items() if pid != processor_id and not p.is_remote)
        return LayerCost(latency, latency * (processor.active_power_w + waiting_w) + dram_j, weight_bytes)

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
        previous = None
        for (name, decision), layer in zip(plan.decisions, self.graph.layers):
            rung = self.compressor.rung(name, decision.method, decision.rank)
            processor = decision.placed_processor
            cost = self.layer_cost(layer, rung, decision.precision, processor)
            latency += cost.latency_s
            energy += cost.energy_j
            layer_latency.append(cost.latency_s)
            weights[processor] = weights.get(processor, 0) + cost.weight_bytes
            if previous is not None:
                seconds, joules = self.transfer(previous[0], previous[1], processor)
                latency, energy, transfer = latency + seconds, energy + joules, transfer + seconds
            previous = (layer, processor)
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
