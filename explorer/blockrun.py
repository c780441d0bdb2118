"""Timing a chain of ONNX unit blocks with ONNX Runtime: the measurement both the `host` measurer and
the `explorer serve` agent run.

Only NumPy and ONNX Runtime are imported here (nvidia-ml-py too, when a block runs on CUDA, for NVML's
energy counter; nothing from explorer that needs more), so the measurement server installs without the
training and search stack. Sessions are opened as everywhere in explorer (:mod:`explorer.sessions`: ONNX
Runtime's defaults, the block's threads, strictly on its provider). How many repeats (the median's
distribution-free interval, adaptive repeats) and the machine's load (other processes' CPU use) live here too,
for the same reason.
"""
from __future__ import annotations

import functools
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from explorer.errors import ExplorerError, error_line
from explorer.sessions import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    ChainStep,
    MissingInput,
    ProviderMissing,
    ProviderNotStarted,
    SessionError,
    run_chain,
)
from explorer.sessions import open_session as open_model_session

RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
RAPL_SOURCE = "RAPL package counter (whole package)"
# NVML's energy counter advances in steps (every 100 ms on an H200, measured: benchmarks/cuda_check.py), so it
# is read over at least this long, from one step to another: the timed repeats, then untimed passes of the
# whole chain until the window is full and the counter has stepped.
NVML_WINDOW_S = 1.0
# Other processes' average CPU use (cores) above which a measurement is "made while busy" (calibration's
# threshold for its warning: measurements are low and noisy above it).
BUSY_CORES = 0.25
Clock = Callable[[], float]
# A chain's inputs, or what draws them once its sessions are open (so that they are checked against the blocks'
# declared inputs before anything is allocated for them: the measurement server's way).
Inputs = dict[str, np.ndarray] | Callable[[list[ort.InferenceSession]], dict[str, np.ndarray]]


class BlockRunError(Exception):
    """The blocks or their inputs are malformed (the message says which and why)."""


class ProviderUnavailable(BlockRunError):
    """ONNX Runtime here has the provider a block needs but could not start it (a fault of this machine)."""


class MeasurementTimeout(Exception):
    """The measurement ran past its time limit and was stopped."""


@dataclass
class BlockSpec:
    """One unit block to run: its serialised ONNX model and the session settings."""

    model: bytes
    threads: int = 1
    provider: str = "CPUExecutionProvider"


@dataclass
class BlockTimes:
    """What timing a chain of blocks gives: per-repeat, per-block seconds and the counters."""

    seconds: np.ndarray  # shape (repeats, blocks); each repeat the mean of `number` passes
    energy_uj: float | None  # from real counters, scaled to `repeats` passes; None when they do not cover every block
    energy_source: str | None  # the counters read, or (energy_uj None) why none was used
    peak_memory_mb: float | None  # resident high-water mark of this process during the timed runs
    providers: list[list[str]]  # the providers each block's session actually uses
    number: int = 1  # passes of the chain each repeat averages
    others_cores: float | None = None  # other processes' average CPU use while timing, in cores (None: unknown)
    rounds: list[int] | None = None  # interleaved timing: the round of each repeat
    energy_uj_by_round: list[float] | None = None  # interleaved timing: each round's energy_uj (None: no counter)

    def to_json(self) -> dict:
        """Plain JSON (what the agent returns)."""
        return {"seconds": self.seconds.tolist(), "energy_uj": self.energy_uj, "energy_source": self.energy_source,
                "peak_memory_mb": self.peak_memory_mb, "providers": self.providers, "number": self.number,
                "others_cores": self.others_cores, "rounds": self.rounds, "energy_uj_by_round": self.energy_uj_by_round}

    @classmethod
    def from_json(cls, data: dict) -> BlockTimes:
        """From the agent's JSON (an older agent's answer, without the later fields, too)."""
        return cls(np.asarray(data["seconds"], dtype=float), data["energy_uj"], data["energy_source"],
                   data["peak_memory_mb"], data["providers"], data.get("number", 1), data.get("others_cores"),
                   data.get("rounds"), data.get("energy_uj_by_round"))

    def round(self, index: int) -> BlockTimes:
        """The repeats of one round of an interleaved timing, with that round's energy."""
        if self.rounds is None:
            raise ValueError("these times were not measured in rounds")
        rows = np.asarray(self.rounds) == index
        energy = self.energy_uj_by_round[index] if self.energy_uj_by_round is not None else None
        return BlockTimes(self.seconds[rows], energy, self.energy_source, self.peak_memory_mb, self.providers,
                          self.number, self.others_cores)

    @property
    def round_count(self) -> int:
        return 0 if self.rounds is None else max(self.rounds, default=-1) + 1


# ---- how many repeats: the median and its confidence interval ----------------------------------------
@functools.lru_cache(maxsize=4096)
def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based ranks (low, high) in n sorted samples of the `confidence` interval of their median, or None
    when n samples are too few for any interval at that confidence (fewer than 6 at 95 %).

    Distribution-free (order statistics): the population median lies below the (k+1)-th smallest of n
    independent samples unless at least n - k of them exceed it, so P(x_(k+1) <= median <= x_(n-k)) =
    1 - 2 P(Binomial(n, 1/2) <= k), whatever the distribution. Timings are skewed, heavy-tailed and often
    multimodal (preemption, frequency steps, cache state), so a normal or t interval's assumptions fail, and
    one preempted repeat widens it, while here it moves a rank by one. k is the largest rank whose coverage
    still reaches `confidence` (the standard tables: n = 10 gives x_(2)..x_(9)). The binomial sums are
    computed here with NumPy in log space (the agent's install has no SciPy; tests check them against
    scipy.stats.binom): under a millisecond at 10,000 repeats, where exact integers take tens.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie between 0 and 1 (got {confidence:g})")
    j = np.arange(n // 2 + 1)
    log_pmf = np.concatenate(([0.0], np.cumsum(np.log((n - j[:-1]) / (j[:-1] + 1))))) - n * np.log(2.0)
    below = np.cumsum(np.exp(log_pmf))  # P(Binomial(n, 1/2) <= j), increasing
    k = int(np.count_nonzero(below <= (1 - confidence) / 2)) - 1  # at most that much outside each end
    return None if k < 0 else (k, n - 1 - k)


def median_ci(values, confidence: float = 0.95) -> tuple[float, float] | None:
    """The distribution-free `confidence` interval of the median of `values` (see :func:`median_ci_ranks`),
    or None when there are too few values."""
    ranks = median_ci_ranks(len(values), confidence)
    if ranks is None:
        return None
    ordered = np.sort(np.asarray(values, dtype=float))
    return float(ordered[ranks[0]]), float(ordered[ranks[1]])


def min_samples(confidence: float = 0.95) -> int:
    """The fewest samples that have a `confidence` interval of their median (6 at 95 %)."""
    n = 1
    while median_ci_ranks(n, confidence) is None:
        n += 1
    return n


def ci_within(values, target: float, confidence: float = 0.95) -> bool:
    """Whether the median's `confidence` interval lies within +/- `target` (relative) of the median."""
    interval = median_ci(values, confidence)
    if interval is None:
        return False
    median = float(np.median(values))
    return max(median - interval[0], interval[1] - median) <= target * abs(median)


@dataclass(frozen=True)
class AdaptiveRepeats:
    """Repeats that adapt, the way TVM's runners use `number`, `repeat` and `min_repeat_ms`: each repeat is
    the mean of `number` passes of the chain, `number` chosen so that a repeat lasts at least
    `min_repeat_ms` (a sub-millisecond chain is otherwise all timer and scheduler jitter); after the first
    repeats, rounds of more are added until the `confidence` interval of the median total lies within
    +/- `target` of the median, or the timed runs have taken `max_seconds` (the cap), or `max_repeats`."""

    target: float = 0.03
    confidence: float = 0.95
    min_repeat_ms: float = 1.0
    max_seconds: float = 1.0
    max_repeats: int = 10_000

    def __post_init__(self):
        problems = []
        if not (isinstance(self.target, (int, float)) and 0 < self.target < 1):
            problems.append(f"target {self.target!r} (a relative half-width, e.g. 0.03 for +/-3 %)")
        if not (isinstance(self.confidence, (int, float)) and 0.5 <= self.confidence < 1):
            problems.append(f"confidence {self.confidence!r} (0.5 to below 1, e.g. 0.95)")
        if not (isinstance(self.min_repeat_ms, (int, float)) and 0 <= self.min_repeat_ms <= 10_000):
            problems.append(f"min_repeat_ms {self.min_repeat_ms!r} (0 to 10000)")
        if not (isinstance(self.max_seconds, (int, float)) and 0 < self.max_seconds <= 86_400):
            problems.append(f"max_seconds {self.max_seconds!r} (above 0, at most a day)")
        if not (isinstance(self.max_repeats, int) and 1 <= self.max_repeats <= 10_000):
            problems.append(f"max_repeats {self.max_repeats!r} (an integer 1 to 10000)")
        if problems:
            raise ExplorerError("adaptive repeats need " + "; ".join(problems))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> AdaptiveRepeats:
        """From JSON; ExplorerError naming what is wrong (unknown keys, bad values)."""
        if not isinstance(data, dict):
            raise ExplorerError("'adaptive' must be an object like {\"target\": 0.03, \"max_seconds\": 1.0}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ExplorerError(f"adaptive repeats have no setting {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def describe(self) -> str:
        return (f"repeats until the {100 * self.confidence:g} % interval of the median is within "
                f"+/-{100 * self.target:g} % (cap {self.max_seconds:g} s)")

    def identity(self) -> str:
        return f"ci{self.target:g}@{self.confidence:g}:min{self.min_repeat_ms:g}ms:cap{self.max_seconds:g}s:max{self.max_repeats}"


def rounds_met(round_totals: list[list[np.ndarray]], adaptive: AdaptiveRepeats) -> bool:
    """Whether interleaved timings are tight: `round_totals[i][j]` holds chain i's totals in round j; every
    chain's median total (all its rounds) and, for each chain after the first, the median of its per-round
    ratios to the first chain (paired within a round, so drift between rounds cancels) must each lie within
    the target."""
    if not round_totals:
        return True
    reference = np.array([np.median(totals) for totals in round_totals[0]])
    for index, chain in enumerate(round_totals):
        if len(chain) != len(reference):
            raise ValueError(f"chain {index} has {len(chain)} rounds, the first {len(reference)}: rounds must pair")
        if not ci_within(np.concatenate(chain), adaptive.target, adaptive.confidence):
            return False
        if index:
            ratios = np.array([np.median(totals) for totals in chain]) / reference
            if not ci_within(ratios, adaptive.target, adaptive.confidence):
                return False
    return True


# ---- the machine's load -------------------------------------------------------------------------------
def cpu_times() -> list[int] | None:
    """The machine's cumulative CPU times (the `cpu` line of /proc/stat, in clock ticks), or None."""
    try:
        with open("/proc/stat") as stat:
            fields_ = stat.readline().split()
    except OSError:
        return None
    return [int(v) for v in fields_[1:9]] + [0] * max(0, 9 - len(fields_)) if fields_[:1] == ["cpu"] else None


def busy_cores(window_s: float = 0.3) -> float:
    """CPU use of the whole machine, in cores, over a window in which this process sleeps (/proc/stat).

    Calibration results are low and noisy when this is well above zero. 0.0 where /proc/stat is absent.
    """
    first = cpu_times()
    if first is None:
        return 0.0
    time.sleep(window_s)
    second = cpu_times()
    if second is None:
        return 0.0
    total = sum(second) - sum(first)
    idle = (second[3] + second[4]) - (first[3] + first[4])  # idle + iowait
    online = max(1, os.cpu_count() or 1)
    return max(0.0, (total - idle) / total * online) if total > 0 else 0.0


def others_cores(machine_before: list[int] | None, own_before: float, wall_before: float) -> float | None:
    """Average CPU use of other processes since the given snapshot (`cpu_times()`, `time.process_time()`,
    `time.perf_counter()`), in cores (None without /proc/stat)."""
    machine_after, own = cpu_times(), time.process_time() - own_before
    wall = time.perf_counter() - wall_before
    if machine_before is None or machine_after is None or wall <= 0:
        return None
    busy = (sum(machine_after) - machine_after[3] - machine_after[4]) - (
        sum(machine_before) - machine_before[3] - machine_before[4])
    return max(0.0, busy / os.sysconf("SC_CLK_TCK") - own) / wall


def load_snapshot() -> tuple[list[int] | None, float, float]:
    """What :func:`others_cores` measures from."""
    return cpu_times(), time.process_time(), time.perf_counter()


#: CPU flags (/proc/cpuinfo) of an x86 int8 dot product that accumulates u8 x s8 in int32 (no saturation).
X86_EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_exact(cpu_flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's u8 x s8 integer kernels are exact on this CPU with full-range (8-bit) weights.

    x86 without VNNI (AVX2/AVX-512 without it) sums pairs of u8 x s8 products in int16 (VPMADDUBSW): with
    8-bit weights 2 x 255 x 128 overflows it; 7-bit weights (2 x 255 x 64 = 32,640) cannot. VNNI and AMX
    accumulate in int32, and Arm's kernels widen each product to 16 bits and accumulate in 32 (or use
    SDOT/UDOT): exact. Unknown CPUs count as not exact. ``cpu_flags`` and ``machine`` (platform.machine())
    default to this machine's.
    """
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return True
    if machine not in ("x86_64", "amd64", "i686", "i386"):
        return False
    flags = cpu_flags if cpu_flags is not None else _cpu_flags()
    return any(flag in flags for flag in X86_EXACT_INT8_FLAGS)


def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux; empty where it is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def open_session(spec: BlockSpec, index: int) -> ort.InferenceSession:
    """A session for one block on its provider; BlockRunError when the bytes are not a model ONNX Runtime can
    load or ONNX Runtime cannot run it on that provider here (never a silent fall-back to the CPU)."""
    try:
        return open_model_session(spec.model, spec.provider, spec.threads)
    except ProviderMissing as error:
        raise BlockRunError(f"block {index} needs {spec.provider}, which ONNX Runtime {ort.__version__} here lacks "
                            f"(it has {', '.join(error.available)})") from None
    except ProviderNotStarted as error:  # ORT gave up on the provider (e.g. missing CUDA libraries)
        raise ProviderUnavailable(f"block {index} needs {spec.provider}, which ONNX Runtime here has but could not "
                                  f"start (it would run the block on {error.runs_on}); check the driver "
                                  "and the CUDA libraries ONNX Runtime's log names") from None
    except SessionError as error:
        raise BlockRunError(f"ONNX Runtime could not load block {index} on {spec.provider}: {error.line[:300]}") from None


def time_blocks(blocks: list[BlockSpec], inputs: Inputs, warmup: int, repeats: int,
                timeout_s: float | None = None, energy_providers: list[str] | None = None,
                adaptive: AdaptiveRepeats | None = None, clock: Clock = time.perf_counter) -> BlockTimes:
    """Run the blocks in order (each block's inputs come from `inputs` or an earlier block's outputs):
    once to produce every block's inputs, `warmup` times untimed, then `repeats` times timed, and with
    `adaptive` more repeats in rounds (each of `number` passes) until the interval of the median total is
    tight or the cap (see :class:`AdaptiveRepeats`).

    Energy comes from real counters when they cover every provider in `energy_providers` (default: the
    blocks'; RAPL for the CPU, NVML for CUDA; see `energy_counters`), read over all the timed repeats, else
    None with the reason in `energy_source`. A measurer gives every provider its board maps, so that all
    plans of one search get the same kind of energy figure, whichever processors they use. Peak memory is
    this process's resident high-water mark (Linux); `others_cores` the CPU use of other processes
    meanwhile. Past `timeout_s` the running session is terminated (MeasurementTimeout). `clock` times the
    runs and the cap (tests inject one). `inputs` may be a function of the open sessions that draws them.
    """
    _check_counts(warmup, repeats)
    if not blocks:
        raise BlockRunError("no blocks to measure")
    sessions = [open_session(spec, i) for i, spec in enumerate(blocks)]
    inputs = inputs(sessions) if callable(inputs) else inputs
    counters, why_none = energy_counters(energy_providers or [spec.provider for spec in blocks])
    with _limited(timeout_s) as run_options:
        chain = _Chain(sessions, inputs, run_options)
        _reset_peak_memory()
        warm = chain.warm_up(warmup, clock)
        number = chain.number_for(adaptive.min_repeat_ms, warm, clock) if adaptive else 1
        meter = _Meter(counters)
        meter.start(chain.run_pass)
        load = load_snapshot()
        started = clock()
        parts = [chain.timed(repeats, number, clock)]
        while adaptive is not None:
            totals = np.concatenate(parts).sum(axis=1)
            elapsed, done = clock() - started, len(totals)
            if (ci_within(totals, adaptive.target, adaptive.confidence) or elapsed >= adaptive.max_seconds
                    or done >= adaptive.max_repeats):
                break
            # half as many again as so far (the interval narrows as 1/sqrt(n)), within what the cap leaves
            fits = int((adaptive.max_seconds - elapsed) / max(elapsed / done, 1e-9))
            parts.append(chain.timed(max(1, min(done // 2, fits, adaptive.max_repeats - done)), number, clock))
        seconds = np.concatenate(parts)
        energy_uj = meter.stop(chain.run_pass, len(seconds), number)
    others = others_cores(*load)
    source = " + ".join(c.source for c in counters) if energy_uj is not None else (why_none or NO_READING)
    return BlockTimes(seconds, energy_uj, source, _peak_memory_mb(), [s.get_providers() for s in sessions], number,
                      others)


def time_interleaved(chains: list[tuple[list[BlockSpec], Inputs]], warmup: int, repeats: int,
                     adaptive: AdaptiveRepeats, timeout_s: float | None = None,
                     energy_providers: list[str] | None = None, clock: Clock = time.perf_counter) -> list[BlockTimes]:
    """Time several chains interleaved in one run: in each round every chain runs one untimed pass, then `repeats`
    timed repeats (each the mean of its own `number` passes), the order rotating from round to round (A B C, B C A,
    C A B, ...) so that no chain always follows the same one. Rounds go on until every chain's interval
    of the median and every chain's per-round ratio to the first chain (the reference) are within
    `adaptive`'s target (see :func:`rounds_met`), or its cap (`max_seconds` over all chains, or
    `max_repeats` per chain). Background load and drift then hit every chain alike.

    Energy is read around each chain's repeats of each round (a coarse counter's window filled as in
    :func:`time_blocks`). Peak memory is not reported (None): all chains' sessions share this process.
    """
    _check_counts(warmup, repeats)
    if not chains or not all(blocks for blocks, _ in chains):
        raise BlockRunError("interleaved timing needs at least one chain, each with blocks")
    sessions = [[open_session(spec, i) for i, spec in enumerate(blocks)] for blocks, _ in chains]
    feeds = [inputs(chain_sessions) if callable(inputs) else inputs for (_, inputs), chain_sessions in zip(chains, sessions)]
    counters, why_none = energy_counters(energy_providers or sorted({s.provider for b, _ in chains for s in b}))
    with _limited(timeout_s) as run_options:
        runs = [_Chain(chain_sessions, feed, run_options) for chain_sessions, feed in zip(sessions, feeds)]
        numbers = [run.number_for(adaptive.min_repeat_ms, run.warm_up(warmup, clock), clock) for run in runs]
        meter = _Meter(counters)
        seconds: list[list[np.ndarray]] = [[] for _ in runs]
        energy: list[list[float | None]] = [[] for _ in runs]
        load = load_snapshot()
        started = clock()
        while True:
            done = len(seconds[0])
            for i in [(done + k) % len(runs) for k in range(len(runs))]:
                # one pass untimed: the first after another chain ran is cold (its weights and its threads; a 1 MB
                # plan on the project's VM timed 25-40 % slower in rounds of two repeats than of eight), and a
                # plan deployed runs pass after pass
                runs[i].run_pass()
                meter.start(runs[i].run_pass)
                seconds[i].append(runs[i].timed(repeats, numbers[i], clock))
                energy[i].append(meter.stop(runs[i].run_pass, repeats, numbers[i]))
            if (rounds_met([[part.sum(axis=1) for part in chain] for chain in seconds], adaptive)
                    or clock() - started >= adaptive.max_seconds or (done + 1) * repeats >= adaptive.max_repeats):
                break
    others = others_cores(*load)
    results = []
    for chain_sessions, parts, used, number in zip(sessions, seconds, energy, numbers):
        readings = [float(u) for u in used if u is not None]
        by_round = readings if len(readings) == len(used) else None
        source = " + ".join(c.source for c in counters) if by_round is not None else (why_none or NO_READING)
        results.append(BlockTimes(np.concatenate(parts), None if by_round is None else sum(by_round), source, None,
                                  [s.get_providers() for s in chain_sessions], number, others,
                                  [j for j, part in enumerate(parts) for _ in range(len(part))], by_round))
    return results


NO_READING = ("an energy counter gave no reading over the repeats (unreadable, unchanged, or wrapped around with no "
              "known range)")


def _check_counts(warmup: int, repeats: int) -> None:
    if repeats < 1 or warmup < 0:
        raise BlockRunError(f"repeats must be >= 1 and warmup >= 0 (got {repeats} and {warmup})")


class _limited:
    """Run options whose runs are terminated past `timeout_s` (MeasurementTimeout), and the error mapping of
    a timed run: BlockRunError for anything ONNX Runtime raises."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.run_options = ort.RunOptions()
        self.timer = threading.Timer(timeout_s, _terminate, (self.run_options,)) if timeout_s else None

    def __enter__(self) -> ort.RunOptions:
        if self.timer:
            self.timer.daemon = True
            self.timer.start()
        return self.run_options

    def __exit__(self, kind, error, traceback) -> Literal[False]:
        if self.timer:
            self.timer.cancel()
        if not isinstance(error, Exception):  # none, or KeyboardInterrupt and the like: as it is
            return False
        if self.run_options.terminate:
            raise MeasurementTimeout(f"the measurement ran past its {self.timeout_s:g} s limit and was stopped") from None
        if isinstance(error, BlockRunError):
            return False
        raise BlockRunError(f"running the blocks failed: {error_line(error, 300)}") from None


class _Chain:
    """One chain of sessions with every block's feed, ready to run."""

    def __init__(self, sessions: list[ort.InferenceSession], inputs: dict[str, np.ndarray], run_options: ort.RunOptions):
        self.sessions, self.run_options = sessions, run_options
        self.feeds, self.outputs = _chain(sessions, inputs, run_options)

    def run_pass(self) -> None:
        for session, feed, names in zip(self.sessions, self.feeds, self.outputs):
            session.run(names, feed, self.run_options)

    def timed(self, repeats: int, number: int, clock: Clock) -> np.ndarray:
        """Seconds (repeats, blocks): each block's mean over `number` passes, per repeat."""
        seconds = np.zeros((repeats, len(self.sessions)))
        for r in range(repeats):
            for _ in range(number):
                for b, (session, feed, names) in enumerate(zip(self.sessions, self.feeds, self.outputs)):
                    started = clock()
                    session.run(names, feed, self.run_options)
                    seconds[r, b] += clock() - started
        return seconds / number

    def warm_up(self, passes: int, clock: Clock) -> list[float]:
        """Untimed passes (as far as the measurement goes); the seconds of each, to choose `number` from."""
        seconds = []
        for _ in range(passes):
            started = clock()
            self.run_pass()
            seconds.append(clock() - started)
        return seconds

    def number_for(self, min_repeat_ms: float, warm: list[float], clock: Clock) -> int:
        """Passes per repeat so that a repeat lasts at least `min_repeat_ms`, from the median warm-up pass (one
        pass preempted on a busy machine would otherwise set it; one more pass without a warm-up)."""
        if min_repeat_ms <= 0:
            return 1
        if not warm:
            warm = self.warm_up(1, clock)
        pass_ms = float(np.median(warm)) * 1e3
        return max(1, int(np.ceil(min_repeat_ms / max(pass_ms, 1e-6))))


class _Meter:
    """Reads energy counters around timed repeats: from one step of a coarse counter to another, its window
    filled with untimed passes, so that the reading is that of the passes counted."""

    def __init__(self, counters: list[EnergyCounter]):
        self.counters = counters
        self.coarse = [counter for counter in counters if counter.window_s > 0]
        self.window_s = max((counter.window_s for counter in counters), default=0.0)

    def start(self, run_pass: Callable[[], None]) -> None:
        if self.coarse:  # start on a step of the coarse counter ...
            run_until_step(self.coarse[0], run_pass)
        self.before = [counter.read() for counter in self.counters]
        self.started = time.perf_counter()

    def stop(self, run_pass: Callable[[], None], repeats: int, number: int) -> float | None:
        """Microjoules of `repeats` passes (None without a reading from every counter)."""
        passes = repeats * number
        while time.perf_counter() - self.started < self.window_s:  # fill its window with untimed passes ...
            run_pass()
            passes += 1
        if self.coarse:  # ... and end on one
            passes += run_until_step(self.coarse[0], run_pass)
        used = [counter.used(before, counter.read()) for counter, before in zip(self.counters, self.before)]
        readings = [u for u in used if u is not None]
        return float(sum(readings)) * repeats / passes if self.counters and len(readings) == len(used) else None


@dataclass(frozen=True)
class EnergyCounter:
    """A cumulative energy counter: what it counts, its reader (microjoules, None when unreadable), the
    shortest window it is read over and where it wraps around (None: it does not)."""

    source: str
    read: Callable[[], float | None]
    window_s: float = 0.0
    wraps_at_uj: float | None = None

    def used(self, before: float | None, after: float | None) -> float | None:
        """Microjoules between two readings (one wrap-around allowed), or None when they say nothing."""
        if before is None or after is None or after == before:
            return None
        if after < before:
            return after + self.wraps_at_uj - before if self.wraps_at_uj else None
        return after - before


def energy_counters(providers: list[str]) -> tuple[list[EnergyCounter], str | None]:
    """The counters that together cover these providers, or none and why not.

    RAPL (the CPU package) is read whenever it is readable and must be for the CPU provider; NVML (the
    GPU of CUDA device 0) must be readable for the CUDA provider. Other providers have no counter here.
    """
    others = sorted(set(providers) - {CPU_PROVIDER, CUDA_PROVIDER})
    if others:
        return [], f"no energy counter for {', '.join(others)} here"
    rapl = rapl_counter()
    counters = [rapl] if rapl is not None else []
    if CPU_PROVIDER in providers and not counters:
        return [], f"no readable RAPL counter ({RAPL_ENERGY}) for {CPU_PROVIDER}"
    if CUDA_PROVIDER in providers:
        nvml = nvml_counter()
        if nvml is None:
            return [], f"no readable NVML energy counter for {CUDA_PROVIDER}"
        counters.append(nvml)
    return counters, None


def run_until_step(counter: EnergyCounter, run_pass: Callable[[], object]) -> int:
    """Run passes until `counter` advances (for at most its window); how many passes ran. Reading a coarse
    counter (NVML's) from one step to another makes its reading that of the passes run in between."""
    first, started, passes = counter.read(), time.perf_counter(), 0
    while counter.read() == first and time.perf_counter() - started < counter.window_s:
        run_pass()
        passes += 1
    return passes


def _terminate(run_options: ort.RunOptions) -> None:
    run_options.terminate = True


def _chain(sessions: list[ort.InferenceSession], inputs: dict[str, np.ndarray],
           run_options: ort.RunOptions) -> tuple[list[dict[str, np.ndarray]], list[list[str]]]:
    """One pass through the chain: every block's feed (checked against its declared inputs) and output names."""
    feeds: list[dict[str, np.ndarray]] = []
    outputs: list[list[str]] = []

    def step(index: int, session: ort.InferenceSession) -> ChainStep:
        names = [o.name for o in session.get_outputs()]

        def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            try:
                results = session.run(names, feed, run_options)
            except Exception as error:
                if run_options.terminate:
                    raise
                raise BlockRunError(f"block {index} rejected its inputs: {error_line(error, 300)}") from None
            feeds.append(feed)
            outputs.append(names)
            return results

        return ChainStep([declared.name for declared in session.get_inputs()], names, run)

    try:
        run_chain([step(index, session) for index, session in enumerate(sessions)], inputs)
    except MissingInput as missing:
        raise BlockRunError(f"block {missing.block} needs input {missing.name!r}, which neither the request's inputs "
                            "nor an earlier block provides") from None
    return feeds, outputs


def rapl_uj() -> int | None:
    """RAPL's package energy counter in microjoules, or None when it is not readable here."""
    try:
        return int(RAPL_ENERGY.read_text())
    except (OSError, ValueError):
        return None


def rapl_range_uj() -> float | None:
    """Where RAPL's counter wraps around, in microjoules, or None when that is not readable."""
    try:
        return float(RAPL_ENERGY.with_name("max_energy_range_uj").read_text())
    except (OSError, ValueError):
        return None


def readable_counters() -> list[str]:
    """The energy counters readable here, by name (what a server reports)."""
    rapl, nvml = rapl_counter(), nvml_counter()
    return (["RAPL"] if rapl else []) + ([nvml.source] if nvml else [])


_NVML_COUNTER: list[EnergyCounter] = []  # the counter once found (a failed look is tried again next time)


def nvml_device() -> tuple[object, str] | None:
    """NVML's handle and name of the GPU NVML lists first among CUDA_VISIBLE_DEVICES (an index or a full
    UUID; set CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA's device 0 is the same GPU on a machine with several
    kinds), or None when NVML (nvidia-ml-py and the driver's library) or that GPU is not there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(first)) if first.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(first))
        name = pynvml.nvmlDeviceGetName(handle)
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NotFound, ...: no GPU for NVML
        return None
    return handle, name if isinstance(name, str) else name.decode()


def nvml_counter() -> EnergyCounter | None:
    """NVML's total-energy counter of :func:`nvml_device`'s GPU, or None when it is not readable there."""
    if _NVML_COUNTER:
        return _NVML_COUNTER[0]
    device = nvml_device()
    if device is None:
        return None
    import pynvml

    handle, name = device
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError:  # NotSupported on GPUs before Volta, ...
        return None

    def read_uj() -> float | None:
        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) * 1e3  # millijoules
        except pynvml.NVMLError:
            return None

    _NVML_COUNTER.append(EnergyCounter(f"NVML GPU counter (whole {name}, read over >= {NVML_WINDOW_S:g} s)",
                                       read_uj, NVML_WINDOW_S))
    return _NVML_COUNTER[0]


def rapl_counter() -> EnergyCounter | None:
    """RAPL's package energy counter, or None when it is not readable here."""
    return EnergyCounter(RAPL_SOURCE, rapl_uj, wraps_at_uj=rapl_range_uj()) if rapl_uj() is not None else None


def _reset_peak_memory() -> None:
    """Reset the kernel's resident-memory high-water mark of this process (Linux), if allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def proc_field_mb(path: str, key: str) -> float | None:
    """A "KEY: N kB" line of a /proc file (status, meminfo) in MB; None where it is absent or unreadable."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _peak_memory_mb() -> float | None:
    return proc_field_mb("/proc/self/status", "VmHWM")
