"""Measurement back-ends, one protocol: every result says who measured it.

- `sim`: the simulated board (explorer/sim.py), a model of the hardware, never called a measurement
  of it;
- `host`: real ONNX Runtime execution of the plan's unit blocks on this machine: warm-up, repeats,
  median and spread of latency, peak resident memory during inference, energy from RAPL when it is
  readable and otherwise modelled from the host profile (and labelled so).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import onnxruntime as ort

from explorer.blockrun import BlockRunError, BlockSpec, BlockTimes, time_blocks
from explorer.boards import Board
from explorer.compress import Compressor
from explorer.cost import BYTES_PER_ELEMENT
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.partition import unit_blocks
from explorer.plan import Plan
from explorer.sim import simulate


@dataclass
class BlockReport:
    """One unit block's figures."""

    index: int
    processor: str
    layers: list[str]
    latency_ms: float
    spread_ms: float
    transfer_ms: float  # bringing its inputs over links (0 on the host: one memory)
    energy_mj: float
    weight_mb: float


@dataclass
class Measurement:
    """What a measurer reports for one plan."""

    latency_ms: float
    latency_spread_ms: float  # interquartile range over repeats
    energy_mj: float
    energy_source: str
    memory_mb_by_processor: dict[str, float]
    blocks: list[BlockReport]
    measured_by: str
    peak_memory_mb: float | None = None  # resident memory of the process during inference (host)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Measurement":
        return cls(**{**data, "blocks": [BlockReport(**b) for b in data["blocks"]]})


class MeasurementFailed(ExplorerError):
    """A plan could not be measured (e.g. no remote agent could): the trial fails, the search goes on."""


class Measurer(Protocol):
    """Measures a plan's latency, energy and memory on a board."""

    name: str

    def identity(self, board: Board) -> str:
        """What the cache key needs to know about this measurer (changes invalidate cached results)."""

    def label(self, board: Board) -> str:
        """Who measures, in words (shown with every result)."""

    def measure(self, graph: LayerGraph, compressor: Compressor, board: Board, plan: Plan,
                calibration_inputs: np.ndarray | None) -> Measurement:
        """Measure one plan (MeasurementFailed when this plan cannot be measured now)."""


class SimMeasurer:
    """The simulated board (a model, not hardware)."""

    name = "sim"
    parallelism = 1  # plans measured at once

    def __init__(self, seed: int = 0):
        self.seed = seed

    def identity(self, board: Board) -> str:
        return f"sim-v1:seed={self.seed}"

    def label(self, board: Board) -> str:
        return f"sim (simulated {board.name}: a model of the board, not a hardware measurement)"

    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        result = simulate(board, graph, compressor, plan, seed=self.seed, plan_digest=plan.digest())
        blocks = [BlockReport(b.index, b.processor, list(b.layers), b.latency_s * 1e3, 0.0, b.transfer_in_s * 1e3,
                              b.energy_j * 1e3, b.weight_bytes / 2**20) for b in result.blocks]
        return Measurement(
            latency_ms=result.latency_s * 1e3, latency_spread_ms=result.latency_spread_s * 1e3,
            energy_mj=result.energy_j * 1e3, energy_source="simulated",
            memory_mb_by_processor={p: b / 2**20 for p, b in result.weight_bytes_by_processor.items()},
            blocks=blocks, measured_by=self.label(board),
        )


class HostMeasurer:
    """Real ONNX Runtime measurement of the plan's unit blocks on this machine."""

    name = "host"
    parallelism = 1

    def __init__(self, warmup: int = 3, repeats: int = 15, batch: int = 1):
        self.warmup = warmup
        self.repeats = repeats
        self.batch = batch

    def identity(self, board: Board) -> str:
        return f"host-v2:{ort.__version__}:w{self.warmup}:r{self.repeats}:b{self.batch}"

    def label(self, board: Board) -> str:
        return f"host (ONNX Runtime {ort.__version__} on this machine, median of {self.repeats})"

    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        available = set(ort.get_available_providers())
        for name, decision in plan.decisions:
            provider = board.processor(decision.processor).provider
            if provider not in available:
                raise ExplorerError(
                    f"host measurement runs on this machine, but layer {name} is placed on {decision.processor} of "
                    f"{board.name}, which needs {provider} (not available here): use --board host "
                    "(after `explorer calibrate`) or --measure sim")
        blocks, specs, inputs = block_specs(graph, compressor, board, plan, calibration_inputs, self.batch)
        try:
            times = time_blocks(specs, inputs, self.warmup, self.repeats, energy_providers=board_providers(board))
        except BlockRunError as error:
            raise ExplorerError(f"measuring the plan on this machine failed: {error}") from None
        return measurement_from_times(times, blocks, compressor, board, plan, self.label(board), "this machine")


def board_providers(board: Board) -> list[str]:
    """Every provider the board maps a processor to: what the energy counters must cover for every plan."""
    return sorted({processor.provider for processor in board.processors.values()})


def block_specs(graph: LayerGraph, compressor: Compressor, board: Board, plan: Plan, calibration_inputs: np.ndarray | None,
                batch: int) -> tuple[list, list[BlockSpec], dict[str, np.ndarray]]:
    """The plan's unit blocks, what to send to ONNX Runtime for each, and a random input (seed 0)."""
    model = compressor.rewrite_shared(plan, calibration_inputs)  # the model the accuracy was scored on
    blocks = unit_blocks(graph, plan, model)
    specs = [BlockSpec(block.model.SerializeToString(), board.processor(block.processor).threads,
                       board.processor(block.processor).provider) for block in blocks]
    shape = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in graph.input_shape[1:]]
    inputs = {graph.input_names[0]: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return blocks, specs, inputs


def measurement_from_times(times: BlockTimes, blocks: list, compressor: Compressor, board: Board, plan: Plan,
                           measured_by: str, where: str) -> Measurement:
    """A Measurement from timed unit blocks: medians, spreads, weight memory, energy (counter or modelled)."""
    seconds = times.seconds
    repeats = seconds.shape[0]
    block_ms = np.median(seconds, axis=0) * 1e3
    totals_ms = seconds.sum(axis=1) * 1e3
    q75, q25 = np.percentile(totals_ms, [75, 25])
    memory: dict[str, float] = {}
    reports = []
    for b, block in enumerate(blocks):
        processor = board.processor(block.processor)
        weight_mb = sum(compressor.rung(n, plan[n].method, plan[n].rank).params * BYTES_PER_ELEMENT[plan[n].precision]
                        for n in block.boundary.layer_names) / 2**20
        memory[block.processor] = memory.get(block.processor, 0.0) + weight_mb
        b75, b25 = np.percentile(seconds[:, b] * 1e3, [75, 25])
        reports.append(BlockReport(b, block.processor, list(block.boundary.layer_names), float(block_ms[b]),
                                   float(b75 - b25), 0.0, float(block_ms[b] * processor.active_power_w), weight_mb))
    if times.energy_uj is not None:
        energy_mj = times.energy_uj / 1e3 / repeats
        source = f"{times.energy_source}, {where}"
    else:
        energy_mj = sum(r.energy_mj for r in reports)
        source = f"modelled from {board.name}'s active power ({times.energy_source} on {where})"
    return Measurement(float(np.median(totals_ms)), float(q75 - q25), float(energy_mj), source, memory, reports,
                       measured_by=measured_by, peak_memory_mb=times.peak_memory_mb)


def make_measurer(spec: str, seed: int = 0) -> Measurer:
    """A measurer from its command-line name: sim, host or remote://HOST:PORT[,HOST:PORT...]."""
    if spec == "sim":
        return SimMeasurer(seed)
    if spec == "host":
        return HostMeasurer()
    if spec.startswith("remote://"):
        from explorer.remote import RemoteMeasurer

        return RemoteMeasurer(spec)
    raise ExplorerError(f"unknown measurer {spec!r}: use --measure sim, host or remote://HOST:PORT[,HOST:PORT...]")
