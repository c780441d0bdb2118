"""Timing a chain of ONNX unit blocks with ONNX Runtime: the measurement both the `host` measurer and
the `explorer serve` agent run.

Only NumPy and ONNX Runtime are imported here (nvidia-ml-py too, when a block runs on CUDA, for NVML's
energy counter; nothing from explorer that needs more), so the measurement agent installs without the
training and search stack.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
RAPL_SOURCE = "RAPL package counter (whole package)"
# NVML's energy counter advances in steps (every 100 ms on an H200, measured: benchmarks/cuda_check.py), so it
# is read over at least this long, from one step to another: the timed repeats, then untimed passes of the
# whole chain until the window is full and the counter has stepped.
NVML_WINDOW_S = 1.0


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

    seconds: np.ndarray  # shape (repeats, blocks)
    energy_uj: float | None  # from real counters, scaled to `repeats` passes; None when they do not cover every block
    energy_source: str | None  # the counters read, or (energy_uj None) why none was used
    peak_memory_mb: float | None  # resident high-water mark of this process during the timed runs
    providers: list[list[str]]  # the providers each block's session actually uses

    def to_json(self) -> dict:
        """Plain JSON (what the agent returns)."""
        return {"seconds": self.seconds.tolist(), "energy_uj": self.energy_uj, "energy_source": self.energy_source,
                "peak_memory_mb": self.peak_memory_mb, "providers": self.providers}

    @classmethod
    def from_json(cls, data: dict) -> "BlockTimes":
        return cls(np.asarray(data["seconds"], dtype=float), data["energy_uj"], data["energy_source"],
                   data["peak_memory_mb"], data["providers"])


def session_options(threads: int) -> ort.SessionOptions:
    """The ONNX Runtime options every block, scored model and bundle runs with: ORT's defaults, so that its
    QDQ fusion runs int8 nodes on integer kernels (QLinearConv, MatMulInteger, ...), as a plain ORT session
    of the bundle's model.onnx does. Quantisation that cannot saturate those kernels is chosen when the
    model is rewritten (:func:`explorer.precision.int8_reduce_range`). `threads` > 0 sets the intra-op
    threads (0: ONNX Runtime's default).
    """
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def session_providers(provider: str) -> list[str]:
    """The providers a block's session gets: its own, then the CPU provider for any node its own lacks (as
    ONNX Runtime places nodes; :func:`open_session` checks that the block's own provider did start)."""
    return [provider] + ([CPU_PROVIDER] if provider != CPU_PROVIDER else [])


def open_session(spec: BlockSpec, index: int) -> ort.InferenceSession:
    """A session for one block on its provider; BlockRunError when the bytes are not a model ONNX Runtime can
    load or ONNX Runtime cannot run it on that provider here (never a silent fall-back to the CPU)."""
    available = ort.get_available_providers()
    if spec.provider not in available:
        raise BlockRunError(f"block {index} needs {spec.provider}, which ONNX Runtime {ort.__version__} here lacks "
                            f"(it has {', '.join(available)})")
    try:
        session = ort.InferenceSession(spec.model, session_options(spec.threads),
                                       providers=session_providers(spec.provider))
    except Exception as error:  # ORT raises InvalidProtobuf, Fail, InvalidGraph, ... for bad models
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BlockRunError(f"ONNX Runtime could not load block {index} on {spec.provider}: {first_line[:300]}") from None
    if session.get_providers()[0] != spec.provider:  # ORT gave up on the provider (e.g. missing CUDA libraries)
        raise ProviderUnavailable(f"block {index} needs {spec.provider}, which ONNX Runtime here has but could not "
                                  f"start (it would run the block on {session.get_providers()[0]}); check the driver "
                                  "and the CUDA libraries ONNX Runtime's log names")
    return session


def time_blocks(blocks: list[BlockSpec], inputs: dict[str, np.ndarray], warmup: int, repeats: int,
                timeout_s: float | None = None, energy_providers: list[str] | None = None) -> BlockTimes:
    """Run the blocks in order (each block's inputs come from `inputs` or an earlier block's outputs):
    once to produce every block's inputs, `warmup` times untimed, then `repeats` times timed.

    Energy comes from real counters when they cover every provider in `energy_providers` (default: the
    blocks'; RAPL for the CPU, NVML for CUDA; see `energy_counters`), else None with the reason in
    `energy_source`. A measurer gives every provider its board maps, so that all plans of one search get
    the same kind of energy figure, whichever processors they use. Peak memory is this process's
    resident high-water mark (Linux). Past `timeout_s` the running session is terminated
    (MeasurementTimeout).
    """
    if not blocks:
        raise BlockRunError("no blocks to measure")
    if repeats < 1 or warmup < 0:
        raise BlockRunError(f"repeats must be >= 1 and warmup >= 0 (got {repeats} and {warmup})")
    sessions = [open_session(spec, i) for i, spec in enumerate(blocks)]
    counters, why_none = energy_counters(energy_providers or [spec.provider for spec in blocks])
    window_s = max((counter.window_s for counter in counters), default=0.0)
    run_options = ort.RunOptions()
    timer = threading.Timer(timeout_s, _terminate, (run_options,)) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        feeds, outputs = _chain(sessions, inputs, run_options)
        _reset_peak_memory()

        def run_pass() -> None:
            for session, feed, names in zip(sessions, feeds, outputs):
                session.run(names, feed, run_options)

        for _ in range(warmup):
            run_pass()
        coarse = [counter for counter in counters if counter.window_s > 0]
        if coarse:  # start on a step of the coarse counter ...
            run_until_step(coarse[0], run_pass)
        seconds = np.zeros((repeats, len(sessions)))
        energy_before = [counter.read() for counter in counters]
        window_started = time.perf_counter()
        for r in range(repeats):
            for b, (session, feed, names) in enumerate(zip(sessions, feeds, outputs)):
                started = time.perf_counter()
                session.run(names, feed, run_options)
                seconds[r, b] = time.perf_counter() - started
        passes = repeats
        while time.perf_counter() - window_started < window_s:  # fill its window with untimed passes ...
            run_pass()
            passes += 1
        if coarse:  # ... and end on one, so the energy read is that of the passes counted
            passes += run_until_step(coarse[0], run_pass)
        energy_after = [counter.read() for counter in counters]
    except Exception as error:
        if run_options.terminate:
            raise MeasurementTimeout(f"the measurement ran past its {timeout_s:g} s limit and was stopped") from None
        if isinstance(error, BlockRunError):
            raise
        raise BlockRunError(f"running the blocks failed: {str(error).strip().splitlines()[0][:300]}") from None
    finally:
        if timer:
            timer.cancel()
    used = [counter.used(before, after) for counter, before, after in zip(counters, energy_before, energy_after)]
    if counters and None not in used:
        energy_uj, source = float(sum(used)) * repeats / passes, " + ".join(c.source for c in counters)
    else:
        energy_uj, source = None, why_none or ("an energy counter gave no reading over the repeats (unreadable, "
                                              "unchanged, or wrapped around with no known range)")
    return BlockTimes(seconds, energy_uj, source, _peak_memory_mb(), [s.get_providers() for s in sessions])


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


def run_until_step(counter: EnergyCounter, run_pass: Callable[[], None]) -> int:
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
    values = dict(inputs)
    feeds, outputs = [], []
    for index, session in enumerate(sessions):
        feed = {}
        for declared in session.get_inputs():
            if declared.name not in values:
                raise BlockRunError(f"block {index} needs input {declared.name!r}, which neither the request's inputs "
                                    "nor an earlier block provides")
            feed[declared.name] = values[declared.name]
        names = [o.name for o in session.get_outputs()]
        try:
            values.update(zip(names, session.run(names, feed, run_options)))
        except Exception as error:
            if run_options.terminate:
                raise
            raise BlockRunError(f"block {index} rejected its inputs: {str(error).strip().splitlines()[0][:300]}") from None
        feeds.append(feed)
        outputs.append(names)
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
    """The energy counters readable here, by name (what an agent reports)."""
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


def _peak_memory_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
