"""Measurement back-ends, one protocol: every result says who measured it.

- `sim`: the simulated board (explorer/sim.py), a model of the hardware, never called a measurement
  of it;
- `host`: real ONNX Runtime execution of the plan's unit blocks on this machine: warm-up, repeats
  until the 95 % interval of the median latency is within +/-3 % (or a time cap), median, interval and
  spread of latency, peak resident memory during inference, energy from RAPL when it is readable and
  otherwise modelled from the host profile (and labelled so), and whether other processes kept the
  machine busy meanwhile.

Every measurer also measures several plans *interleaved* (`measure_interleaved`: rounds A B C, B C A, ...
in one run, fresh, until tight or a cap), what explorer/confirm.py confirms a search's best plans with.
"""
from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import onnxruntime as ort

from explorer.blockrun import (
    BUSY_CORES,
    AdaptiveRepeats,
    BlockRunError,
    BlockSpec,
    BlockTimes,
    ci_within,
    int8_exact,
    median_ci,
    rounds_met,
    time_blocks,
    time_interleaved,
)
from explorer.boards import Board
from explorer.cache import digest
from explorer.compress import Compressor
from explorer.cost import BYTES_PER_ELEMENT
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.hostinfo import host_facts
from explorer.partition import unit_blocks
from explorer.plan import Plan
from explorer.registry import Registry
from explorer.sim import SimResult, simulate

# What a search's real measurements aim for (AdaptiveRepeats' defaults: +/-3 % at 95 %, 1 ms per repeat, a 1 s
# cap per plan); confirmation aims for the same interval with a longer cap (explorer/confirm.py).
SEARCH_REPEATS = AdaptiveRepeats()


@dataclass(frozen=True)
class Device:
    """What a measurer measures on, for caches of device costs (explorer.kernels): what the device is and the ONNX
    Runtime it runs; either changing means new costs."""

    fingerprint: str  # e.g. "AMD EPYC 7B13 x2 (x86_64)", or a simulated board
    onnxruntime: str
    simulated: bool = False

    def key(self, *more: str) -> str:
        return digest(self.fingerprint, self.onnxruntime, str(self.simulated), *more)


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

    latency_ms: float  # median over the repeats
    latency_spread_ms: float  # interquartile range over repeats
    energy_mj: float
    energy_source: str
    memory_mb_by_processor: dict[str, float]
    blocks: list[BlockReport]
    measured_by: str
    peak_memory_mb: float | None = None  # resident memory of the process during inference (host)
    # The fields below are None in measurements cached before they existed, and in the simulator's search
    # measurements (its noise is a model; its interleaved ones have an interval).
    latency_ci_ms: tuple[float, float] | None = None  # interval of the median latency (None: too few repeats)
    ci_confidence: float | None = None  # of that interval (0.95)
    ci_target: float | None = None  # half-width aimed for, relative to the median (None: fixed repeats)
    ci_target_met: bool | None = None  # the interval got within the target before the cap (None: no target)
    repeats: int | None = None  # timed repeats the median is of
    passes_per_repeat: int | None = None  # chain passes each repeat averages (so that it lasts >= min_repeat_ms)
    others_cores: float | None = None  # other processes' average CPU use while timing, in cores (None: unknown)

    @property
    def busy(self) -> bool:
        """Other processes kept the machine busy while this was measured (its figures are low and noisy)."""
        return self.others_cores is not None and self.others_cores > BUSY_CORES

    def caveats(self) -> list[str]:
        """Why this figure deserves less trust, in words (empty when none applies)."""
        notes = []
        if self.ci_target_met is False:
            ci = self.latency_ci_ms
            width = ("none (too few repeats)" if ci is None else
                     f"+/-{100 * max(self.latency_ms - ci[0], ci[1] - self.latency_ms) / self.latency_ms:.1f} %")
            notes.append(f"its {100 * (self.ci_confidence or 0.95):g} % interval, {width}, missed the "
                         f"+/-{100 * (self.ci_target or 0.0):g} % target before the cap")
        if self.busy:
            notes.append(f"measured while other processes used {self.others_cores:.1f} cores")
        return notes

    def recalled(self) -> Measurement:
        """This measurement as recalled from a cache: its caveats, if any, are added to `measured_by` so that a
        later search shows a loose or busy figure for what it is (confirmation re-measures in any case)."""
        notes = self.caveats()
        return replace(self, measured_by=f"{self.measured_by} [cached: {'; '.join(notes)}]") if notes else self

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Measurement:
        """From `to_json`'s dict; one cached before the interval fields existed loads with them None."""
        ci = data.get("latency_ci_ms")
        return cls(**{**data, "blocks": [BlockReport(**b) for b in data["blocks"]],
                      "latency_ci_ms": tuple(ci) if ci is not None else None})


@dataclass
class Interleaved:
    """One plan's share of an interleaved measurement: every round together, and each round alone (round j
    of every plan of the run was measured at the same time: paired)."""

    measurement: Measurement
    rounds: list[Measurement]


class MeasurementFailed(ExplorerError):
    """A plan could not be measured (e.g. no measurement server could): the trial fails, the search goes on."""


T = TypeVar("T")
R = TypeVar("R")


def failures_kept(measure: Callable[[T], R]) -> Callable[[T], R | MeasurementFailed]:
    """`measure`, answering the MeasurementFailed it meets instead of raising it (one item of many fails alone)."""
    def one(item: T) -> R | MeasurementFailed:
        try:
            return measure(item)
        except MeasurementFailed as error:
            return error

    return one


class ServersUnreachable(ExplorerError):
    """No measurement server can be reached any more (after --wait-for-servers): nothing more can be measured, so
    the search ends with what it measured (summary written, parent run FAILED). Not a MeasurementFailed: a
    failed trial would only repeat it for every plan left in the budget."""


AgentsUnreachable = ServersUnreachable  # the name before servers were called so: deprecated, goes in the next release


class Measurer(Protocol):
    """Measures a plan's latency, energy and memory on a board."""

    name: str
    simulated: bool  # a model of the board, not a measurement of hardware
    parallelism: int = 1  # plans measured at once (agents batch their proposals to match)

    def identity(self, board: Board) -> str:
        """What the cache key needs to know about this measurer (changes invalidate cached results)."""

    def label(self, board: Board) -> str:
        """Who measures, in words (shown with every result)."""

    def device(self, board: Board) -> Device:
        """The device it measures on (what kernel tables are kept for)."""

    def int8_exact(self) -> bool:
        """Whether full-range int8 weights are exact on the integer kernels of the device it measures
        (see explorer.blockrun.int8_exact); where not, plans are quantised with 7-bit weights."""

    def measure(self, graph: LayerGraph, compressor: Compressor, board: Board, plan: Plan,
                calibration_inputs: np.ndarray | dict[str, np.ndarray] | None) -> Measurement:
        """Measure one plan (MeasurementFailed when this plan cannot be measured now)."""

    def measure_interleaved(self, graph: LayerGraph, compressor: Compressor, board: Board, plans: list[Plan],
                            calibration_inputs: np.ndarray | dict[str, np.ndarray] | None, repeats: int,
                            adaptive: AdaptiveRepeats) -> list[Interleaved]:
        """Measure the plans afresh, interleaved in rounds of `repeats` each, until every plan's interval and
        its per-round ratio to the first plan are within `adaptive`'s target, or its cap (see
        explorer.blockrun.time_interleaved). One Interleaved per plan, in order."""

    def measure_many(self, graph: LayerGraph, compressor: Compressor, board: Board, plans: list[Plan],
                     calibration_inputs: np.ndarray | dict[str, np.ndarray] | None) -> list[Measurement | MeasurementFailed]:
        """Measure several plans, in order: each a Measurement, or the MeasurementFailed it met. One after the
        other unless the measurer measures in parallel (measurement servers)."""
        def one(plan: Plan) -> Measurement:
            return self.measure(graph, compressor, board, plan, calibration_inputs)

        return list(map(failures_kept(one), plans))

    def measure_interleaved_many(self, graph: LayerGraph, compressor: Compressor, board: Board,
                                 groups: list[list[Plan]], calibration_inputs: np.ndarray | dict[str, np.ndarray] | None,
                                 repeats: int, adaptive: AdaptiveRepeats) -> list[list[Interleaved] | MeasurementFailed]:
        """Several interleaved runs, in order (each group as measure_interleaved measures it): each the group's
        results, or the MeasurementFailed it met. One after the other unless the measurer measures in parallel."""
        def run(group: list[Plan]) -> list[Interleaved]:
            return self.measure_interleaved(graph, compressor, board, group, calibration_inputs, repeats, adaptive)

        return list(map(failures_kept(run), groups))

    def cancel(self) -> None:
        """End the measurer's waits at once (Ctrl-C while it measures in another thread); none by default."""


class SimMeasurer(Measurer):
    """The simulated board (a model, not hardware)."""

    name = "sim"
    simulated = True
    parallelism = 1  # plans measured at once

    def __init__(self, seed: int = 0):
        self.seed = seed

    @classmethod
    def from_spec(cls, spec: str, seed: int = 0, wait_for_servers_s: float = 0.0) -> SimMeasurer:
        """As `--measure sim` makes it (see make_measurer)."""
        _no_address(spec, "sim")
        return cls(seed)

    def identity(self, board: Board) -> str:
        return f"sim-v1:seed={self.seed}"

    def device(self, board: Board) -> Device:
        return Device(f"simulated {board.name} ({board.digest[:12]}), seed {self.seed}", "simulated", simulated=True)

    def int8_exact(self) -> bool:
        return True  # a model of the board: the plans are scored (and quantised) for this machine alone

    def label(self, board: Board) -> str:
        return f"sim (simulated {board.name}: a model of the board, not a hardware measurement)"

    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        return self._measurement(simulate(board, graph, compressor, plan, seed=self.seed, plan_digest=plan.digest()),
                                 board)

    def measure_interleaved(self, graph, compressor, board, plans, calibration_inputs=None, repeats: int = 5,
                            adaptive: AdaptiveRepeats = SEARCH_REPEATS) -> list[Interleaved]:
        """Rounds of fresh simulated repeats (the simulator's noise, with seeds drawn from this measurer's seed
        and the round, never the search's), until tight or `max_repeats` (simulated time has no cap)."""
        digests = [plan.digest() for plan in plans]
        samples: list[list[list[SimResult]]] = [[] for _ in plans]  # plan, round, repeat
        while True:
            done = len(samples[0])
            for i, plan in enumerate(plans):
                seeds = np.random.SeedSequence([self.seed, 1 + done]).generate_state(repeats)
                samples[i].append([simulate(board, graph, compressor, plan, seed=int(seed), repeats=1,
                                            plan_digest=digests[i]) for seed in seeds])
            totals = [[np.array([r.latency_s for r in one_round]) for one_round in chain] for chain in samples]
            if rounds_met(totals, adaptive) or (done + 1) * repeats >= adaptive.max_repeats:
                break
        results = []
        for chain in samples:
            every = [result for one_round in chain for result in one_round]
            whole = self._measurement(_median_result(every), board, adaptive, [r.latency_s * 1e3 for r in every])
            results.append(Interleaved(whole, [self._measurement(_median_result(r), board) for r in chain]))
        return results

    def _measurement(self, result: SimResult, board: Board, adaptive: AdaptiveRepeats | None = None,
                     latencies_ms: list[float] | None = None) -> Measurement:
        """A Measurement from a simulation; with `latencies_ms` (the repeats it is the median of) its interval."""
        blocks = [BlockReport(b.index, b.processor, list(b.layers), b.latency_s * 1e3, 0.0, b.transfer_in_s * 1e3,
                              b.energy_j * 1e3, b.weight_bytes / 2**20) for b in result.blocks]
        interval: dict[str, Any] = {}
        if latencies_ms is not None and adaptive is not None:
            interval = dict(latency_ci_ms=median_ci(latencies_ms, adaptive.confidence), ci_confidence=adaptive.confidence,
                            ci_target=adaptive.target,
                            ci_target_met=ci_within(latencies_ms, adaptive.target, adaptive.confidence),
                            repeats=len(latencies_ms), passes_per_repeat=1)
        return Measurement(
            latency_ms=result.latency_s * 1e3, latency_spread_ms=result.latency_spread_s * 1e3,
            energy_mj=result.energy_j * 1e3, energy_source="simulated",
            memory_mb_by_processor={p: b / 2**20 for p, b in result.weight_bytes_by_processor.items()},
            blocks=blocks, measured_by=self.label(board), **interval,
        )


def _median_result(results: list[SimResult]) -> SimResult:
    """The simulation whose latency is the median of several (its blocks and energy go with it), with the
    spread (max - min) of them all."""
    ordered = sorted(results, key=lambda r: r.latency_s)
    median = ordered[len(ordered) // 2]
    return replace(median, latency_spread_s=ordered[-1].latency_s - ordered[0].latency_s)


class HostMeasurer(Measurer):
    """Real ONNX Runtime measurement of the plan's unit blocks on this machine."""

    name = "host"
    simulated = False
    parallelism = 1

    def __init__(self, warmup: int = 3, repeats: int = 15, batch: int = 1,
                 adaptive: AdaptiveRepeats | None = SEARCH_REPEATS):
        """At least `repeats` timed repeats after `warmup`; with `adaptive` (default) more until the interval
        of the median is tight or its cap, without it exactly `repeats` of one pass each (the old way)."""
        self.warmup = warmup
        self.repeats = repeats
        self.batch = batch
        self.adaptive = adaptive

    @classmethod
    def from_spec(cls, spec: str, seed: int = 0, wait_for_servers_s: float = 0.0) -> HostMeasurer:
        """As `--measure host` makes it (see make_measurer); no seed: real measurements."""
        _no_address(spec, "host")
        return cls()

    def int8_exact(self) -> bool:
        return int8_exact()

    def device(self, board: Board) -> Device:
        facts = host_facts()
        return Device(f"{facts.cpu_model} x{facts.cores} ({platform.machine()})", ort.__version__)

    def identity(self, board: Board) -> str:
        fixed = f"{ort.__version__}:w{self.warmup}:r{self.repeats}:b{self.batch}"
        return f"host-v4:{fixed}:{self.adaptive.identity()}" if self.adaptive else f"host-v2:{fixed}"

    def label(self, board: Board) -> str:
        how = self.adaptive.describe() if self.adaptive else f"median of {self.repeats}"
        return f"host (ONNX Runtime {ort.__version__} on this machine, {how})"

    def _check(self, board: Board, plans: list[Plan]) -> None:
        available = set(ort.get_available_providers())
        for plan in plans:
            for name, decision in plan.decisions:
                provider = board.processor(decision.placed_processor).provider
                if provider not in available:
                    raise ExplorerError(
                        f"host measurement runs on this machine, but layer {name} is placed on {decision.processor} of "
                        f"{board.name}, which needs {provider} (not available here): use --board host "
                        "(after `explorer calibrate`) or --measure sim")

    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        self._check(board, [plan])
        blocks, specs, inputs = block_specs(graph, compressor, board, plan, calibration_inputs, self.batch)
        try:
            times = time_blocks(specs, inputs, self.warmup, self.repeats, energy_providers=board_providers(board),
                                adaptive=self.adaptive)
        except BlockRunError as error:
            raise ExplorerError(f"measuring the plan on this machine failed: {error}") from None
        return measurement_from_times(times, blocks, compressor, board, plan, self.label(board), "this machine",
                                      self.adaptive)

    def measure_interleaved(self, graph, compressor, board, plans, calibration_inputs=None, repeats: int = 5,
                            adaptive: AdaptiveRepeats = SEARCH_REPEATS) -> list[Interleaved]:
        self._check(board, plans)
        built = [block_specs(graph, compressor, board, plan, calibration_inputs, self.batch) for plan in plans]
        try:
            times = time_interleaved([(specs, inputs) for _, specs, inputs in built], self.warmup, repeats, adaptive,
                                     energy_providers=board_providers(board))
        except BlockRunError as error:
            raise ExplorerError(f"measuring the plans on this machine failed: {error}") from None
        label = f"host (ONNX Runtime {ort.__version__} on this machine, interleaved: {adaptive.describe()})"
        return interleaved_from_times(times, [blocks for blocks, _, _ in built], compressor, board, plans, label,
                                      "this machine", adaptive)


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
    inputs = graph.synthetic_feeds(graph.feed_shape(batch)[0])  # the resolved inputs; a fixed batch overrides `batch`
    return blocks, specs, inputs


def measurement_from_times(times: BlockTimes, blocks: list, compressor: Compressor, board: Board, plan: Plan,
                           measured_by: str, where: str, adaptive: AdaptiveRepeats | None = None) -> Measurement:
    """A Measurement from timed unit blocks: medians, the interval of the median (with whether `adaptive`'s
    target was met), spreads, weight memory, energy (counter or modelled), the machine's load."""
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
    confidence = adaptive.confidence if adaptive else 0.95
    return Measurement(float(np.median(totals_ms)), float(q75 - q25), float(energy_mj), source, memory, reports,
                       measured_by=measured_by, peak_memory_mb=times.peak_memory_mb,
                       latency_ci_ms=median_ci(totals_ms, confidence), ci_confidence=confidence,
                       ci_target=adaptive.target if adaptive else None,
                       ci_target_met=ci_within(totals_ms, adaptive.target, confidence) if adaptive else None,
                       repeats=int(repeats), passes_per_repeat=int(times.number), others_cores=times.others_cores)


def interleaved_from_times(times: list[BlockTimes], blocks: list[list], compressor: Compressor, board: Board,
                           plans: list[Plan], measured_by: str, where: str,
                           adaptive: AdaptiveRepeats) -> list[Interleaved]:
    """Interleaved results from per-plan times measured in rounds: every round together, and each round alone."""
    results = []
    for plan_times, plan_blocks, plan in zip(times, blocks, plans):
        whole = measurement_from_times(plan_times, plan_blocks, compressor, board, plan, measured_by, where, adaptive)
        rounds = [measurement_from_times(plan_times.round(j), plan_blocks, compressor, board, plan, measured_by, where)
                  for j in range(plan_times.round_count)]
        results.append(Interleaved(whole, rounds))
    return results


class MeasurerClass(Protocol):
    """A registered measurer class: it makes itself from the whole `--measure` spec."""

    def from_spec(self, spec: str, seed: int = 0, wait_for_servers_s: float = 0.0) -> Measurer:
        """The measurer `spec` asks for (`seed`: the simulator's; `wait_for_servers_s`: a remote one's wait)."""
        ...


#: Measurer classes by the name `--measure` starts with (a spec NAME or NAME://ADDRESS).
MEASURER_REGISTRY: Registry[MeasurerClass] = Registry("measurer", {
    "sim": "explorer.measure:SimMeasurer",
    "host": "explorer.measure:HostMeasurer",
    "remote": "explorer.remote:RemoteMeasurer",
}, hint="use --measure sim, host or remote://HOST:PORT[,HOST:PORT...]")


def _no_address(spec: str, name: str) -> None:
    """`sim` and `host` measure here: `host://ADDRESS` is a typo of remote://, never a silent local measurement."""
    if spec != name:
        raise ExplorerError(f"--measure {spec}: {name} measures on this machine and takes no address; give --measure {name}, "
                            "or remote://HOST:PORT to measure on a measurement server")


def make_measurer(spec: str, seed: int = 0, wait_for_servers_s: float = 0.0) -> Measurer:
    """A measurer from its command-line name: sim, host or remote://HOST:PORT[,HOST:PORT...] (which waits up to
    `wait_for_servers_s` for a server when none is reachable)."""
    name = spec.partition("://")[0]
    if name not in MEASURER_REGISTRY:
        raise MEASURER_REGISTRY.unknown(spec)
    return MEASURER_REGISTRY[name].from_spec(spec, seed=seed, wait_for_servers_s=wait_for_servers_s)
