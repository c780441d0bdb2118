"""The board profile `host` that `explorer calibrate` writes: what calibration measured (:class:`Measured`: its
processors, benchmark ops and settings) and its TOML text, every number with a comment saying how it was
measured, read or estimated (:func:`render_profile`), replaced atomically once it loads as a board
(:func:`write_profile`).

The TOML is written by hand (two small helpers, :func:`_f` and :func:`_line`): a source comment per value is
the point of the file, and TOML serialisers either write no comments at all (tomli-w) or would need a
dependency for it (tomlkit); the text is checked by loading it (:func:`explorer.boards.load_board`) before it
replaces the previous profile, and strings are cleaned (:func:`explorer.hostinfo.clean`) before they are written.
"""
from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from explorer.blockrun import BUSY_CORES
from explorer.boards import HOST, PRECISIONS, load_board
from explorer.cache import atomic_write
from explorer.errors import ExplorerError
from explorer.hostinfo import GpuFacts, HostFacts
from explorer.sessions import CPU_PROVIDER

#: Estimates used where nothing can be measured here (each is explained where it is written).
ESTIMATED_CORE_ACTIVE_W = 4.0  # a server core's share of package TDP: 225-280 W / 64 cores, 205 W / 40 cores
ESTIMATED_CORE_IDLE_W = 0.5  # a core in a C-state plus its share of the uncore
DRAM_NJ_PER_BYTE = 0.16  # Horowitz, ISSCC 2014: ~640 pJ per 32-bit DRAM access
ESTIMATED_GPU_CACHE_KB = 6144  # NVML does not report the L2; 6 MB is Volta's, the least of data-centre GPUs since
ESTIMATED_GPU_ACTIVE_W = 250.0  # a data-centre GPU's board power under load (A100 PCIe 250 W; H100 SXM up to 700 W)
ESTIMATED_GPU_IDLE_W = 50.0  # the same GPU between work (an H200 measured 122 W: benchmarks/results/host-h200.toml)


# ---- what calibration measured ---------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How much to measure: the full calibration or the quick one (tests, smoke runs)."""

    gemm_sizes: tuple[int, ...]  # square GEMMs n x n x n
    gemv: tuple[int, int]  # batch-1 fc layer: K inputs -> N outputs
    convs: tuple[tuple[int, int, int], ...]  # 3x3 convolutions (in channels, out channels, height = width)
    warmup: int
    min_repeats: int
    max_repeats: int
    target_s: float  # timed runs per measurement stop after about this long (at least min_repeats)
    copy_mb: int  # array size of the bandwidth copy
    chain: int  # tiny ops in the overhead chain
    power_window_s: float  # RAPL sampling window
    load_window_s: float  # window in which other processes' CPU use is sampled


@dataclass(frozen=True)
class BenchmarkOp:
    """One single-op benchmark model."""

    key: str  # e.g. gemm512, gemv, conv64x56
    kind: str  # fc | conv
    label: str  # for comments and progress
    flops: float  # 2 x multiply-accumulates
    model: onnx.ModelProto
    x: np.ndarray


@dataclass(frozen=True)
class Unit:
    """A processor of the profile as measured: its id, ONNX Runtime thread count, execution provider and kind."""

    id: str
    threads: int
    provider: str = CPU_PROVIDER
    kind: str = "cpu"  # cpu | gpu

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def runs_text(self) -> str:
        """How the unit runs ONNX Runtime, for messages and comments."""
        if self.is_gpu:
            return f"ONNX Runtime {self.provider}"
        return f"{self.threads} ONNX Runtime thread{'s' if self.threads > 1 else ''}"


@dataclass(frozen=True)
class Gpu:
    """What NVML says of the GPU (each value with where it came from), and the path between it and the CPUs."""

    facts: GpuFacts
    link_gbps: float  # host <-> device copy bandwidth, measured
    link_latency_us: float  # one small copy, measured
    link_detail: str  # how both were measured
    link_mb: int  # the tensor size the bandwidth was measured with


@dataclass
class Measured:
    """Everything the profile is written from."""

    units: tuple[Unit, ...]
    settings: Settings
    gflops: dict[str, dict[str, dict[str, float]]]  # unit -> precision -> op key -> GFLOP/s
    ops: dict[str, BenchmarkOp]  # op key -> op (model and label)
    fp16_in_fp32: bool | None  # ORT computes the fp16 nodes in fp32 behind casts (None: unknown)
    bandwidth_gbps: dict[str, float]  # unit -> sustained copy GB/s
    overhead_us: dict[str, float]  # unit -> per-op overhead
    run_call_us: float  # session.run of a one-op graph on a tiny tensor
    power: dict[str, tuple[float, float, str, str]]  # unit -> (active W, idle W, how, how) where a counter covers it
    no_power: dict[str, str]  # unit -> why no counter covers it (its power is then an estimate)
    background_cores: float  # other processes' CPU use before calibrating (cores)
    gpu: Gpu | None = None
    others_during: float | None = None  # other processes' average CPU use while measuring (cores)


# ---- the profile's text ----------------------------------------------------------------------------
def _f(value: float, digits: int = 2) -> str:
    """A TOML float with a decimal point, never zero for a positive value."""
    rounded = round(value, digits)
    if value > 0 and rounded <= 0:
        rounded = 10.0**-digits
    return f"{rounded:.{digits}f}"


def _largest(values: dict[str, float]) -> str:
    """The key of the largest value."""
    return max(values, key=lambda key: values[key])


def _line(code: str, comment: str) -> str:
    return f"{code:<34} # {comment}" if len(code) < 34 else f"{code}   # {comment}"


def render_profile(system: HostFacts, m: Measured, elapsed_s: float, quick: bool) -> str:
    cores = system.cores
    size_mb, available_mb = system.size_mb, system.available_mb
    cpu_bandwidth = {u.id: m.bandwidth_gbps[u.id] for u in m.units if not u.is_gpu}
    memory_bw = max(cpu_bandwidth.values())
    best_unit = _largest(cpu_bandwidth)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    mode = "quick mode: fewer sizes and repeats" if quick else "full mode"
    providers = ", ".join(dict.fromkeys(u.provider for u in m.units))
    gpu_text = f" and {m.gpu.facts.name}" if m.gpu else ""
    lines = [
        f"# Board profile of this machine, written by `explorer calibrate` ({mode}) on {now}.",
        f"# Host {system.hostname}: {system.cpu_model}, {cores} cores available to this process{gpu_text},",
        f"# ONNX Runtime {ort.__version__} ({providers}), onnx {onnx.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}; calibration took {elapsed_s:.1f} s.",
        "# Numbers marked 'measured' are medians of timed repeats after warm-up on this machine, 'read' come",
        "# from sysfs, /proc or NVML, 'estimate' could not be measured here (the reason follows).",
        "# Re-run `explorer calibrate` after a hardware, driver or ONNX Runtime change.",
    ]
    others = max(m.background_cores, m.others_during or 0.0)
    if others > BUSY_CORES:
        lines.append(f"# WARNING: other processes used about {m.background_cores:.1f} cores when calibration "
                     f"started and {m.others_during or 0.0:.1f} on average while it measured: the")
        lines.append("# measurements are lower and noisier than on an idle machine; re-run when it is idle.")
    else:
        lines.append(f"# Other processes used {others:.2f} cores on average during calibration (an idle machine).")
    lines += [
        "",
        "[board]",
        f'name = "{HOST}"',
        f'description = "This machine ({system.cpu_model}, {cores} cores{gpu_text}) as measured with ONNX Runtime '
        f'{ort.__version__}"',
        "",
        "[memory]",
        _line(f"size_mb = {_f(size_mb, 1)}", system.size_source),
        _line(f"available_mb = {_f(available_mb, 1)}", system.available_source),
        _line(f"bandwidth_gbps = {_f(memory_bw, 2)}",
              f"measured: the best sustained copy bandwidth ({best_unit}); a DRAM datasheet peak is not "
              "readable here, so this is the sustained figure"),
        "shared = true                      # one memory for every processor of this machine" if not m.gpu else
        "shared = false                     # the gpu has its own memory; every transfer path is in [[links]] below",
        _line(f"energy_nj_per_byte = {_f(DRAM_NJ_PER_BYTE, 3)}",
              "estimate: ~640 pJ per 32-bit DRAM access (Horowitz, ISSCC 2014); no DRAM energy counter is "
              "read here"),
        _line(f"transfer_latency_us = {_f(m.run_call_us, 1)}",
              "measured: median ONNX Runtime session.run() of a one-Add graph on a 1x8 tensor, the fixed "
              "cost of handing a tensor to another session in the same memory"),
    ]
    for unit in m.units:
        lines += [""] + _render_unit(unit, system, m, memory_bw, available_mb)
    if m.gpu:
        dram_copy = "a DRAM read and a write per byte (2 x 0.16 nJ/B, Horowitz, ISSCC 2014)"
        lines += ["", "[[links]]", 'between = ["cpu", "cpu1"]',
                  _line(f"bandwidth_gbps = {_f(memory_bw / 2)}",
                        "measured: half of memory.bandwidth_gbps (a hand-over through DRAM reads and writes each byte)"),
                  _line(f"latency_us = {_f(m.run_call_us, 1)}", "measured: as memory.transfer_latency_us"),
                  _line(f"energy_nj_per_byte = {_f(2 * DRAM_NJ_PER_BYTE, 3)}", f"estimate: {dram_copy}")]
        for cpu in (u for u in m.units if not u.is_gpu):
            lines += ["", "[[links]]", f'between = ["{cpu.id}", "gpu"]',
                      _line(f"bandwidth_gbps = {_f(m.gpu.link_gbps)}",
                            f"measured: {m.gpu.link_detail}: {m.gpu.link_mb} MB each way, less the fixed cost"),
                      _line(f"latency_us = {_f(m.gpu.link_latency_us, 1)}",
                            f"measured: {m.gpu.link_detail}: half the time of 8 floats in and out"),
                      _line(f"energy_nj_per_byte = {_f(2 * DRAM_NJ_PER_BYTE, 3)}",
                            f"estimate: {dram_copy}; the bus transfer's own energy is not measured here")]
    return "\n".join(lines) + "\n"


def _render_unit(unit: Unit, system: HostFacts, m: Measured, memory_bw: float, available_mb: float) -> list[str]:
    s = m.settings
    cores = system.cores
    threads = unit.threads
    thread_text = unit.runs_text()
    gflops = m.gflops[unit.id]
    peaks = {p: max(gflops[p].values()) for p in PRECISIONS}
    best = {p: m.ops[_largest(gflops[p])].label for p in PRECISIONS}
    typical = {"conv": next(o for o in m.ops.values() if o.kind == "conv"), "fc": m.ops["gemv"]}
    efficiency = {kind: min(1.0, gflops["fp32"][op.key] / peaks["fp32"]) for kind, op in typical.items()}
    reps = f"median of {s.min_repeats}-{s.max_repeats} runs after {s.warmup} warm-up"
    copies = ", inputs and outputs in its memory (the copies are the links' share)" if unit.is_gpu else ""
    lines = [f"# {unit.id}: measured throughput, GFLOP/s (int8: GOP/s), {thread_text}, {reps}{copies}:"]
    for key, op in m.ops.items():
        values = ", ".join(f"{p} {gflops[p][key]:.1f}" for p in PRECISIONS)
        lines.append(f"#   {op.label}: {values}")
    if unit.is_gpu:
        fp16_note = f"fp16 nodes run on {unit.provider}'s fp16 kernels where it has them"
    elif m.fp16_in_fp32:
        fp16_note = ("ORT's CPU provider has no fp16 kernel for these ops here: it inserts Casts and "
                     "computes in fp32 (seen in its optimised graph), so this is the fp32 rate (differences "
                     "from fp32 are cast cost and noise); fp16 halves weight bytes, not time")
    elif m.fp16_in_fp32 is False:
        fp16_note = "ORT computes these fp16 nodes with fp16 kernels here (seen in its optimised graph)"
    else:
        fp16_note = "whether ORT computes fp16 natively could not be determined"
    int8_note = ("int8 is the QDQ rewrite run with sessions.session_options() (ORT's defaults: its QDQ "
                 "fusion runs integer kernels on the CPU provider), as explorer runs int8 models"
                 + ("" if not unit.is_gpu else f"; {unit.provider} has no such fusion: DequantizeLinear, "
                    "float kernel, QuantizeLinear"))
    peak_comment = (f"measured: best of the sizes above per precision (fp32: {best['fp32']}; fp16: "
                    f"{best['fp16']}; int8: {best['int8']}), {thread_text}; fp16: {fp16_note}; {int8_note}")
    other = "; ".join(
        f"{kind} {p} would be {min(1.0, gflops[p][op.key] / peaks[p]):.2f}"
        for kind, op in typical.items() for p in ("fp16", "int8"))
    efficiency_comment = (f"measured: fp32 throughput of a typical op over the fp32 peak: conv = "
                          f"{typical['conv'].label}, fc = {typical['fc'].label}; per precision: {other}")
    if unit.id in m.power:
        active, idle, active_how, idle_how = m.power[unit.id]
        active_comment, idle_comment = f"measured: {active_how}", f"measured: {idle_how}"
    elif unit.is_gpu:
        active, idle = ESTIMATED_GPU_ACTIVE_W, ESTIMATED_GPU_IDLE_W
        active_comment = (f"estimate: {ESTIMATED_GPU_ACTIVE_W:g} W, a data-centre GPU's board power under load "
                          f"(A100 PCIe 250 W; H100 SXM up to 700 W): {m.no_power[unit.id]}")
        idle_comment = (f"estimate: {ESTIMATED_GPU_IDLE_W:g} W, such a GPU between work (an H200 measured 122 W "
                        f"by NVML straight after work: benchmarks/results/host-h200.toml): {m.no_power[unit.id]}")
    else:
        active = ESTIMATED_CORE_ACTIVE_W * threads
        idle = ESTIMATED_CORE_IDLE_W * threads
        active_comment = (f"estimate: {ESTIMATED_CORE_ACTIVE_W:g} W per busy core x {threads}, a server core's "
                          "share of package TDP (225-280 W / 64 cores for AMD EPYC 7003, 205 W / 40 cores for "
                          f"Xeon 8380): {m.no_power[unit.id]}")
        idle_comment = (f"estimate: {ESTIMATED_CORE_IDLE_W:g} W per core x {threads} (C-state plus uncore share): "
                        f"{m.no_power[unit.id]}")
    idle = min(idle, active)
    lines += [
        _line(f"[processors.{unit.id}]", {"cpu": "all the cores this process may use",
                                          "cpu1": "one core: ONNX Runtime with a single thread",
                                          "gpu": f"the GPU, through ONNX Runtime's {unit.provider}"}[unit.id]),
        f'kind = "{unit.kind}"',
    ]
    if unit.is_gpu:
        if m.gpu is None:
            raise ValueError(f"processor {unit.id} is a gpu, but its NVML facts and links were not measured")
        gpu = m.gpu.facts
        lines += [
            f'description = "{gpu.name}, ONNX Runtime {unit.provider}"',
            _line(f"cores = {gpu.cores[0]}", gpu.cores[1]),
            _line(f"clock_ghz = {_f(gpu.clock_ghz[0], 3)}", gpu.clock_ghz[1]),
            _line(f"cache_kb = {ESTIMATED_GPU_CACHE_KB}",
                  f"estimate: NVML does not report the L2 size; {ESTIMATED_GPU_CACHE_KB // 1024} MB, Volta's, the "
                  "least of data-centre GPUs since"),
        ]
        memory_mb, memory_comment = gpu.memory_mb
        bandwidth_comment = (f"measured: median y = x * 1 on {s.copy_mb} MB, x and y in the gpu's memory (ONNX Runtime "
                             "I/O binding), bytes read + written per second")
        bandwidth = m.bandwidth_gbps[unit.id]
        threads_comment = "ONNX Runtime intra-op threads for nodes that fall back to the CPU provider"
    else:
        description = (f"All {cores} cores of {system.cpu_model}" if unit.id == "cpu"
                       else f"One core of {system.cpu_model} (single-thread, the little-processor analogue)")
        cache_comment = system.cache_source + ("; a single core can use all of it" if threads < cores else "")
        lines += [
            f'description = "{description}, ONNX Runtime {threads} thread{"s" if threads > 1 else ""}"',
            _line(f"cores = {threads}",
                  "read: os.sched_getaffinity (cores this process may use)" if unit.id == "cpu"
                  else "one core: this processor runs ONNX Runtime with one thread"),
            _line(f"clock_ghz = {_f(system.clock_ghz, 3)}", system.clock_source),
            _line(f"cache_kb = {system.cache_kb}", cache_comment),
        ]
        memory_mb, memory_comment = available_mb, "measured: all of memory.available_mb (one shared memory)"
        bandwidth = min(m.bandwidth_gbps[unit.id], memory_bw)
        bandwidth_comment = (f"measured: median numpy copy of {s.copy_mb} MB split over {threads} thread(s), bytes "
                             "read + written per second")
        threads_comment = "ONNX Runtime intra-op threads used for every measurement above"
    return lines + [
        'precisions = ["fp32", "fp16", "int8"]',
        _line("peak_gflops = { " + ", ".join(f"{p} = {_f(peaks[p])}" for p in PRECISIONS) + " }", peak_comment),
        _line(f"efficiency = {{ conv = {_f(efficiency['conv'], 3)}, fc = {_f(efficiency['fc'], 3)} }}",
              efficiency_comment),
        _line(f"memory_mb = {_f(memory_mb, 1)}", memory_comment),
        _line(f"bandwidth_gbps = {_f(bandwidth)}", bandwidth_comment),
        _line(f"active_power_w = {_f(active)}", active_comment),
        _line(f"idle_power_w = {_f(idle)}", idle_comment),
        _line(f"launch_overhead_us = {_f(m.overhead_us[unit.id])}",
              f"measured: (time of {s.chain} chained Add ops - time of 1) / {s.chain - 1} on a 1x8 tensor, "
              f"{thread_text}"),
        'ops = ["Conv", "Gemm", "MatMul"]',
        f'provider = "{unit.provider}"',
        _line(f"threads = {threads}", threads_comment),
    ]


def write_profile(out: Path, text: str) -> None:
    """Replace `out` with `text` in one step, once the text has loaded as a board (durably; as readable as the
    profile it replaces: mkstemp's files are private)."""
    def loads(temporary: Path) -> None:
        try:
            load_board(temporary.resolve())
        except ExplorerError as exc:
            raise ExplorerError(f"calibration produced a profile that does not load ({exc}); "
                                f"{out} was left unchanged") from None

    atomic_write(out, lambda handle: handle.write(text.encode("utf-8")), durable=True, check=loads,
                 permissions=out.stat().st_mode & 0o777 if out.exists() else 0o644)
