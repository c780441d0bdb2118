"""Measurement back-ends, one protocol: every result says who measured it.

- `sim`: the simulated board (explorer/sim.py), a model of the hardware, never called a measurement
  of it;
- `host`: real ONNX Runtime execution of the plan's unit blocks on this machine: warm-up, repeats,
  median and spread of latency, peak resident memory during inference, energy from RAPL when it is
  readable and otherwise modelled from the host profile (and labelled so).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from explorer.boards import Board
from explorer.compress import Compressor
from explorer.cost import BYTES_PER_ELEMENT
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.partition import unit_blocks
from explorer.plan import Plan
from explorer.sim import simulate

RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


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


class Measurer(Protocol):
    """Measures a plan's latency, energy and memory on a board."""

    name: str

    def identity(self, board: Board) -> str:
        """What the cache key needs to know about this measurer (changes invalidate cached results)."""

    def label(self, board: Board) -> str:
        """Who measures, in words (shown with every result)."""

    def measure(self, graph: LayerGraph, compressor: Compressor, board: Board, plan: Plan,
                calibration_inputs: np.ndarray | None) -> Measurement:
        """Measure one plan."""


class SimMeasurer:
    """The simulated board (a model, not hardware)."""

    name = "sim"

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

    def __init__(self, warmup: int = 3, repeats: int = 15, batch: int = 1):
        self.warmup = warmup
        self.repeats = repeats
        self.batch = batch

    def identity(self, board: Board) -> str:
        return f"host-v1:{ort.__version__}:w{self.warmup}:r{self.repeats}:b{self.batch}"

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
        model = compressor.rewrite(plan, calibration_inputs)
        blocks = unit_blocks(graph, plan, model)
        sessions = [self._session(block.model, board.processor(block.processor).threads) for block in blocks]
        rng = np.random.default_rng(0)
        shape = [self.batch] + [d if isinstance(d, int) and d > 0 else 1 for d in graph.input_shape[1:]]
        values = {graph.input_names[0]: rng.standard_normal(shape).astype(np.float32)}
        for block, session in zip(blocks, sessions):  # first pass: the inputs every block needs
            values.update(zip(block.outputs, session.run(list(block.outputs), {n: values[n] for n in block.inputs})))
        feeds = [{n: values[n] for n in block.inputs} for block in blocks]
        _reset_peak_memory()
        times = np.zeros((self.repeats, len(blocks)))
        for _ in range(self.warmup):
            for block, session, feed in zip(blocks, sessions, feeds):
                session.run(list(block.outputs), feed)
        energy_before = _rapl_uj()
        for r in range(self.repeats):
            for b, (block, session, feed) in enumerate(zip(blocks, sessions, feeds)):
                started = time.perf_counter()
                session.run(list(block.outputs), feed)
                times[r, b] = time.perf_counter() - started
        energy_after = _rapl_uj()
        peak_mb = _peak_memory_mb()
        block_ms = np.median(times, axis=0) * 1e3
        totals_ms = times.sum(axis=1) * 1e3
        q75, q25 = np.percentile(totals_ms, [75, 25])
        memory: dict[str, float] = {}
        reports = []
        for b, block in enumerate(blocks):
            processor = board.processor(block.processor)
            weight_mb = sum(compressor.rung(n, plan[n].method, plan[n].rank).params * BYTES_PER_ELEMENT[plan[n].precision]
                            for n in block.boundary.layer_names) / 2**20
            memory[block.processor] = memory.get(block.processor, 0.0) + weight_mb
            b75, b25 = np.percentile(times[:, b] * 1e3, [75, 25])
            reports.append(BlockReport(b, block.processor, list(block.boundary.layer_names), float(block_ms[b]),
                                       float(b75 - b25), 0.0, float(block_ms[b] * processor.active_power_w), weight_mb))
        latency_ms = float(np.median(totals_ms))
        if energy_before is not None and energy_after is not None and energy_after > energy_before:
            energy_mj = (energy_after - energy_before) / 1e3 / self.repeats
            source = "RAPL package counter (whole package, this machine)"
        else:
            energy_mj = sum(r.energy_mj for r in reports)
            source = "modelled from the host profile's active power (no energy counter readable here)"
        return Measurement(latency_ms, float(q75 - q25), float(energy_mj), source, memory, reports,
                           measured_by=self.label(board),
                           peak_memory_mb=peak_mb)

    @staticmethod
    def _session(model, threads: int) -> ort.InferenceSession:
        from explorer.precision import session_options

        options = session_options()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _rapl_uj() -> int | None:
    try:
        return int(RAPL_ENERGY.read_text())
    except (OSError, ValueError):
        return None


def _reset_peak_memory() -> None:
    """Reset the kernel's resident-memory high-water mark of this process (Linux), if allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def make_measurer(spec: str, seed: int = 0) -> Measurer:
    """A measurer from its command-line name."""
    if spec == "sim":
        return SimMeasurer(seed)
    if spec == "host":
        return HostMeasurer()
    raise ExplorerError(f"unknown measurer {spec!r}: use --measure sim or --measure host")
