"""Timing a chain of ONNX unit blocks with ONNX Runtime: the measurement both the `host` measurer and
the `explorer serve` agent run.

Only NumPy and ONNX Runtime are imported here (and nothing from explorer that needs more), so the
measurement agent installs without the training and search stack.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
RAPL_SOURCE = "RAPL package counter (whole package)"


class BlockRunError(Exception):
    """The blocks or their inputs are malformed (the message says which and why)."""


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
    energy_uj: float | None  # from a real counter over all repeats, or None when none is readable
    energy_source: str | None
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
    """ONNX Runtime options under which an int8 node computes exactly what its QDQ model says.

    By default ORT fuses DequantizeLinear -> Conv/Gemm/MatMul -> QuantizeLinear into integer kernels
    whose u8 x s8 products saturate on x86 CPUs without VNNI (measured: 0.18 instead of 0.013 max
    relative error on a single Gemm). Turning that fusion off runs the same quantised values in
    float, independent of the host CPU; every other graph optimisation stays on. `threads` > 0 sets
    the intra-op threads (0: ONNX Runtime's default).
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def open_session(spec: BlockSpec, index: int) -> ort.InferenceSession:
    """A session for one block; BlockRunError when the bytes are not a model ONNX Runtime can load."""
    providers = [spec.provider] + (["CPUExecutionProvider"] if spec.provider != "CPUExecutionProvider" else [])
    providers = [p for p in providers if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(spec.model, session_options(spec.threads), providers=providers)
    except Exception as error:  # ORT raises InvalidProtobuf, Fail, InvalidGraph, ... for bad models
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BlockRunError(f"block {index} is not a valid ONNX model ONNX Runtime can load: {first_line[:300]}") from None


def time_blocks(blocks: list[BlockSpec], inputs: dict[str, np.ndarray], warmup: int, repeats: int,
                timeout_s: float | None = None) -> BlockTimes:
    """Run the blocks in order (each block's inputs come from `inputs` or an earlier block's outputs):
    once to produce every block's inputs, `warmup` times untimed, then `repeats` times timed.

    Energy comes from RAPL when it is readable (else None); peak memory is this process's resident
    high-water mark (Linux). Past `timeout_s` the running session is terminated (MeasurementTimeout).
    """
    if not blocks:
        raise BlockRunError("no blocks to measure")
    if repeats < 1 or warmup < 0:
        raise BlockRunError(f"repeats must be >= 1 and warmup >= 0 (got {repeats} and {warmup})")
    sessions = [open_session(spec, i) for i, spec in enumerate(blocks)]
    run_options = ort.RunOptions()
    timer = threading.Timer(timeout_s, _terminate, (run_options,)) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        feeds, outputs = _chain(sessions, inputs, run_options)
        _reset_peak_memory()
        for _ in range(warmup):
            for session, feed, names in zip(sessions, feeds, outputs):
                session.run(names, feed, run_options)
        seconds = np.zeros((repeats, len(sessions)))
        energy_before = _rapl_uj()
        for r in range(repeats):
            for b, (session, feed, names) in enumerate(zip(sessions, feeds, outputs)):
                started = time.perf_counter()
                session.run(names, feed, run_options)
                seconds[r, b] = time.perf_counter() - started
        energy_after = _rapl_uj()
    except Exception as error:
        if run_options.terminate:
            raise MeasurementTimeout(f"the measurement ran past its {timeout_s:g} s limit and was stopped") from None
        if isinstance(error, BlockRunError):
            raise
        raise BlockRunError(f"running the blocks failed: {str(error).strip().splitlines()[0][:300]}") from None
    finally:
        if timer:
            timer.cancel()
    energy = energy_after - energy_before if energy_before is not None and energy_after is not None and energy_after > energy_before else None
    return BlockTimes(seconds, None if energy is None else float(energy), RAPL_SOURCE if energy is not None else None,
                      _peak_memory_mb(), [s.get_providers() for s in sessions])


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
