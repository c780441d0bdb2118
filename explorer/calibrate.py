"""`explorer calibrate`: measure this machine with ONNX Runtime and write the board profile `host`.

What is measured (medians of timed repeats after warm-up, each session built like explorer's own:
its processor's execution provider, :func:`explorer.sessions.session_options`):

- throughput (GFLOP/s; int8 in GOP/s) of single-op ONNX models, square GEMMs, a batch-1 fc layer
  (GEMV) and 3x3 convolutions, at fp32 and at the fp16 and int8 rewrites of
  :func:`explorer.precision.apply_precisions`. A processor's peak per precision is the best it
  reaches; its efficiency per op kind is a typical op's throughput over the fp32 peak
  (``conv``: the first convolution size, ``fc``: the batch-1 fc layer);
- sustained memory bandwidth: a large numpy copy split over the processor's threads (bytes read +
  bytes written per second, as STREAM counts a copy);
- per-op overhead: a chain of tiny Add ops, (time(N ops) - time(1 op)) / (N - 1);
- package power from RAPL (``/sys/class/powercap/intel-rapl:0/energy_uj``) when it is readable;
  otherwise documented estimates;
- on a machine whose ONNX Runtime can run the CUDA execution provider, a ``gpu`` processor: the same
  throughput and per-op overhead measurements on that provider with inputs and outputs in its memory
  (ONNX Runtime's I/O binding), its memory bandwidth (y = x * 1 there), the cost of handing tensors to
  it and back as explorer's blocks do (``[[links]]``: session.run with NumPy in and out, less the same
  run in its memory), its name, cores, clock and free memory from NVML, and its idle and busy power
  from NVML's energy counter (read from one of its steps to another);
- cache size, core count, clock and memory are read from sysfs and /proc, the GPU's from NVML
  (:mod:`explorer.hostinfo`).

The profile has two CPU processors, ``cpu`` (every core this process may use, as many ONNX Runtime
threads) and ``cpu1`` (one thread: the single-core analogue of a "little" processor), so that plans
on the host can have several unit blocks, and ``gpu`` where there is one. Every number in the file
carries a comment saying how it was measured or why it is an estimate. The file is written
atomically (:func:`explorer.cache.atomic_write`, validated by :func:`explorer.boards.load_board` first): an
interrupted or failed calibration never leaves a broken profile and keeps the previous one.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from explorer import blockrun, precision
from explorer.blockrun import BUSY_CORES, busy_cores  # the load check, shared with the measurers
from explorer.blockrun import cpu_times as _cpu_times
from explorer.blockrun import others_cores as _others_cores
from explorer.boards import HOST, PRECISIONS, load_board
from explorer.cache import atomic_write
from explorer.errors import ExplorerError
from explorer.hostinfo import HostFacts, gpu_facts, host_facts
from explorer.paths import TARGETS_DIR
from explorer.sessions import CPU_PROVIDER, CUDA_PROVIDER, open_session, session_options

Progress = Callable[[str], None]

PROVIDER = CPU_PROVIDER
GPU_PROVIDER = CUDA_PROVIDER  # a machine whose ONNX Runtime can run it gets a `gpu` processor
OPSET = 17

#: Estimates used where nothing can be measured here (each is explained where it is written).
ESTIMATED_CORE_ACTIVE_W = 4.0  # a server core's share of package TDP: 225-280 W / 64 cores, 205 W / 40 cores
ESTIMATED_CORE_IDLE_W = 0.5  # a core in a C-state plus its share of the uncore
DRAM_NJ_PER_BYTE = 0.16  # Horowitz, ISSCC 2014: ~640 pJ per 32-bit DRAM access
ESTIMATED_GPU_CACHE_KB = 6144  # NVML does not report the L2; 6 MB is Volta's, the least of data-centre GPUs since
ESTIMATED_GPU_ACTIVE_W = 250.0  # a data-centre GPU's board power under load (A100 PCIe 250 W; H100 SXM up to 700 W)
ESTIMATED_GPU_IDLE_W = 50.0  # the same GPU between work (an H200 measured 122 W: benchmarks/results/host-h200.toml)
LINK_MB = 4  # tensor size for the CPU <-> gpu link bandwidth: a large activation, not a bulk copy


@dataclass(frozen=True)
class _Settings:
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


FULL = _Settings(gemm_sizes=(256, 512, 1024), gemv=(4096, 1024), convs=((64, 64, 56), (128, 128, 28)),
                 warmup=2, min_repeats=5, max_repeats=50, target_s=1.0, copy_mb=256, chain=100,
                 power_window_s=1.0, load_window_s=0.5)
QUICK = _Settings(gemm_sizes=(512,), gemv=(4096, 1024), convs=((128, 128, 28),),
                  warmup=1, min_repeats=3, max_repeats=10, target_s=0.08, copy_mb=64, chain=50,
                  power_window_s=0.3, load_window_s=0.2)


@dataclass(frozen=True)
class _Op:
    """One single-op benchmark model."""

    key: str  # e.g. gemm512, gemv, conv64x56
    kind: str  # fc | conv
    label: str  # for comments and progress
    flops: float  # 2 x multiply-accumulates
    model: onnx.ModelProto
    x: np.ndarray


@dataclass(frozen=True)
class _Unit:
    """A processor of the profile as measured: its id, ONNX Runtime thread count, execution provider and kind."""

    id: str
    threads: int
    provider: str = PROVIDER
    kind: str = "cpu"  # cpu | gpu

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"


@dataclass(frozen=True)
class _Gpu:
    """What NVML says of the GPU (each value with where it came from), and the path between it and the CPUs."""

    name: str
    cores: tuple[int, str]
    clock_ghz: tuple[float, str]
    memory_mb: tuple[float, str]
    link_gbps: float  # host <-> device copy bandwidth, measured
    link_latency_us: float  # one small copy, measured
    link_detail: str  # how both were measured


@dataclass
class _Measured:
    """Everything the profile is written from."""

    units: tuple[_Unit, ...]
    settings: _Settings
    gflops: dict[str, dict[str, dict[str, float]]]  # unit -> precision -> op key -> GFLOP/s
    ops: dict[str, _Op]  # op key -> op (model and label)
    fp16_in_fp32: bool | None  # ORT computes the fp16 nodes in fp32 behind casts (None: unknown)
    bandwidth_gbps: dict[str, float]  # unit -> sustained copy GB/s
    overhead_us: dict[str, float]  # unit -> per-op overhead
    run_call_us: float  # session.run of a one-op graph on a tiny tensor
    power: dict[str, tuple[float, float, str, str]]  # unit -> (active W, idle W, how, how) where a counter covers it
    no_power: dict[str, str]  # unit -> why no counter covers it (its power is then an estimate)
    background_cores: float  # other processes' CPU use before calibrating (cores)
    gpu: _Gpu | None = None
    others_during: float | None = None  # other processes' average CPU use while measuring (cores)


# ---- public API -----------------------------------------------------------------------------------
def calibrate_host(out_path: Path | None = None, quick: bool = False,
                   progress: Progress | None = None) -> Path:
    """Measure this machine and write the board profile `host`; return the path written.

    `out_path` defaults to ``targets/host.toml`` (what ``load_board("host")`` reads). `quick` measures
    fewer sizes with fewer repeats (a few seconds; for tests). `progress` is called with one
    message per step. The previous profile is replaced only by a complete profile that loads.
    """
    out = Path(out_path) if out_path is not None else TARGETS_DIR / f"{HOST}.toml"
    settings = QUICK if quick else FULL
    say = progress or (lambda message: None)
    started = time.perf_counter()
    system = host_facts()
    say(f"host: {system.cpu_model}, {system.cores} cores, ONNX Runtime {ort.__version__}")
    background = busy_cores(settings.load_window_s)
    if background > BUSY_CORES:
        say(f"warning: other processes use about {background:.1f} cores; measurements will be low and noisy")
    machine_before, own_before, wall_before = _cpu_times(), time.process_time(), time.perf_counter()
    measured = _measure(system, settings, background, say)
    measured.others_during = _others_cores(machine_before, own_before, wall_before)
    if measured.others_during is not None and measured.others_during > BUSY_CORES:
        say(f"warning: other processes used about {measured.others_during:.1f} cores while measuring; "
            "the profile says so")
    elapsed = time.perf_counter() - started
    text = _render(system, measured, elapsed, quick)
    say(f"writing {out}")
    _write_atomically(out, text)
    return out


# ---- measurement ----------------------------------------------------------------------------------
def _measure(system: HostFacts, settings: _Settings, background: float, say: Progress) -> _Measured:
    cores = system.cores
    gpu_unit = _gpu_unit(say)
    units = (_Unit("cpu", cores), _Unit("cpu1", 1)) + ((gpu_unit,) if gpu_unit else ())
    ops = _benchmark_ops(settings)
    gflops: dict[str, dict[str, dict[str, float]]] = {u.id: {p: {} for p in PRECISIONS} for u in units}
    for op in ops.values():
        say(f"{op.label}: building fp32, fp16 and int8 variants")
        variants = _variants(op)
        for unit in units:
            for prec, model in variants.items():
                seconds = _time_model(model, {"x": op.x}, unit, settings)
                gflops[unit.id][prec][op.key] = op.flops / seconds / 1e9
            summary = ", ".join(f"{p} {gflops[unit.id][p][op.key]:.1f}" for p in PRECISIONS)
            say(f"{op.label} on {unit.id} ({_unit_text(unit)}): {summary} GFLOP/s")
    fp16_in_fp32 = _fp16_computed_in_fp32()
    overhead: dict[str, float] = {}
    run_call_us = math.inf
    for unit in units:
        say(f"per-op overhead on {unit.id}: a chain of {settings.chain} tiny Add ops")
        overhead[unit.id], one_op_us = _op_overhead_us(unit, settings)
        say(f"per-op overhead on {unit.id}: {overhead[unit.id]:.2f} us")
        if not unit.is_gpu:
            run_call_us = min(run_call_us, one_op_us)
    cpus = [u for u in units if not u.is_gpu]
    say(f"memory bandwidth: copy of {settings.copy_mb} MB over "
        + " and ".join(f"{u.threads} thread{'s' if u.threads > 1 else ''} ({u.id})" for u in cpus))
    copies = _copy_bandwidth_gbps(settings.copy_mb, [u.threads for u in cpus], settings)
    bandwidth = {unit.id: gbps for unit, gbps in zip(cpus, copies)}
    gpu = None
    if gpu_unit:
        say(f"memory bandwidth of the gpu: y = x * 1 on {settings.copy_mb} MB in its own memory")
        bandwidth[gpu_unit.id] = _device_bandwidth_gbps(gpu_unit, settings)
        say(f"transfers between the CPUs' memory and the gpu's: {LINK_MB} MB and 8 floats in and out")
        gpu = _gpu_facts(gpu_unit, settings, system)
        say(f"transfers: {gpu.link_gbps:.1f} GB/s, {gpu.link_latency_us:.1f} us per copy")
    say("memory bandwidth: " + ", ".join(f"{uid} {gbps:.1f} GB/s" for uid, gbps in bandwidth.items()))
    power, no_power = _measure_power(units, ops, settings, say)
    return _Measured(units=units, settings=settings, gflops=gflops, ops=ops, fp16_in_fp32=fp16_in_fp32,
                     bandwidth_gbps=bandwidth, overhead_us=overhead, run_call_us=run_call_us,
                     power=power, no_power=no_power, background_cores=background, gpu=gpu)


def _unit_text(unit: _Unit) -> str:
    """How a unit runs ONNX Runtime, for messages and comments."""
    if unit.is_gpu:
        return f"ONNX Runtime {unit.provider}"
    return f"{unit.threads} ONNX Runtime thread{'s' if unit.threads > 1 else ''}"


def _gpu_unit(say: Progress) -> _Unit | None:
    """The `gpu` processor when ONNX Runtime here has GPU_PROVIDER and can run a model on it, else None."""
    if GPU_PROVIDER not in ort.get_available_providers():
        return None
    unit = _Unit("gpu", 1, GPU_PROVIDER, "gpu")
    probe = _gemm_op("probe", 8, 8, 8, "probe", np.random.default_rng(1))
    try:
        session = blockrun.open_session(blockrun.BlockSpec(probe.model.SerializeToString(), 1, GPU_PROVIDER), 0)
        session.run(None, {"x": probe.x})
    except Exception as error:  # BlockRunError, or ORT's own for a kernel, memory or library failure when running
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        say(f"warning: ONNX Runtime has {GPU_PROVIDER} but cannot run a model on it ({reason}); "
            "the profile gets no gpu processor")
        return None
    say(f"gpu: ONNX Runtime {GPU_PROVIDER} runs here; the profile gets a `gpu` processor")
    return unit


def _benchmark_ops(settings: _Settings) -> dict[str, _Op]:
    rng = np.random.default_rng(0)
    ops = [_gemm_op(f"gemm{n}", n, n, n, f"GEMM {n}x{n}x{n}", rng) for n in settings.gemm_sizes]
    k, n = settings.gemv
    ops.append(_gemm_op("gemv", 1, k, n, f"batch-1 fc 1x{k} -> {n} (GEMV)", rng))
    ops += [_conv_op(cin, cout, hw, rng) for cin, cout, hw in settings.convs]
    return {op.key: op for op in ops}


def _model(node: onnx.NodeProto, x_shape: list[int], y_shape: list[int],
           initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "calibrate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return model


def _gemm_op(key: str, m: int, k: int, n: int, label: str, rng: np.random.Generator) -> _Op:
    weight = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.zeros(n, np.float32), "B")]
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="op", transB=1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return _Op(key, "fc", label, 2.0 * m * k * n, _model(node, [m, k], [m, n], inits), x)


def _conv_op(cin: int, cout: int, hw: int, rng: np.random.Generator) -> _Op:
    weight = (rng.standard_normal((cout, cin, 3, 3)) / math.sqrt(9 * cin)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.zeros(cout, np.float32), "B")]
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="op", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = rng.standard_normal((1, cin, hw, hw)).astype(np.float32)
    model = _model(node, [1, cin, hw, hw], [1, cout, hw, hw], inits)
    return _Op(f"conv{cin}x{hw}", "conv", f"3x3 conv {cin}->{cout} at {hw}x{hw}",
               2.0 * cout * cin * 9 * hw * hw, model, x)


def _variants(op: _Op) -> dict[str, onnx.ModelProto]:
    """The op at each precision, rewritten as explorer rewrites layers (int8 calibrated on op.x)."""
    return {
        "fp32": op.model,
        "fp16": precision.apply_precisions(op.model, {"op": "fp16"}),
        "int8": precision.apply_precisions(op.model, {"op": "int8"}, calibration_inputs=op.x),
    }


def _session(model: onnx.ModelProto, unit: _Unit, optimized_path: str | None = None) -> ort.InferenceSession:
    """A session as explorer's blocks run (a node the provider lacks falls back to the CPU provider), quiet; with
    `optimized_path`, ONNX Runtime writes its basic-optimised graph there (to see what it computes)."""
    options = session_options(unit.threads)
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return open_session(model, unit.provider, options=options, strict=False)


def _time_runs(run: Callable[[], object], settings: _Settings) -> float:
    """Median seconds of `run` after warm-up; repeats until about settings.target_s has passed."""
    for _ in range(settings.warmup):
        run()
    times: list[float] = []
    deadline = time.perf_counter() + settings.target_s
    while len(times) < settings.max_repeats and (len(times) < settings.min_repeats
                                                 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_model(model: onnx.ModelProto, feed: dict[str, np.ndarray], unit: _Unit,
                settings: _Settings) -> float:
    """Median seconds of one run on `unit`. On a gpu the inputs and outputs stay in its memory (ONNX Runtime's
    I/O binding): the copies to and from the CPUs' memory are the links' share, measured apart."""
    session = _session(model, unit)
    try:
        if not unit.is_gpu:
            return _time_runs(functools.partial(session.run, None, feed), settings)
        binding = _device_binding(session, feed, unit)
        return _time_runs(functools.partial(session.run_with_iobinding, binding), settings)
    finally:
        del session


def _device_binding(session: ort.InferenceSession, feed: dict[str, np.ndarray], unit: _Unit) -> ort.IOBinding:
    """An I/O binding with the inputs copied into the unit's memory once and the outputs left there."""
    device = _ort_device(unit)
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    return binding


def _fp16_computed_in_fp32() -> bool | None:
    """Whether ORT's CPU provider runs an fp16 Gemm in fp32 behind Casts it inserts (its optimised graph)."""
    rng = np.random.default_rng(1)
    model = precision.apply_precisions(_gemm_op("probe", 8, 8, 8, "probe", rng).model, {"op": "fp16"})
    try:
        with tempfile.TemporaryDirectory(prefix="explorer-calibrate-") as tmp:
            path = str(Path(tmp, "optimized.onnx"))
            _session(model, _Unit("cpu1", 1), optimized_path=path)
            optimized = onnx.load(path)
    except Exception:  # ORT's own exception types; the answer is then unknown
        return None
    # element type of the Gemm's weight input: a Cast's target or a (possibly constant-folded) initializer
    types = {init.name: init.data_type for init in optimized.graph.initializer}
    for node in optimized.graph.node:
        if node.op_type == "Cast":
            types.update({out: a.i for a in node.attribute if a.name == "to" for out in node.output})
    gemm = next((node for node in optimized.graph.node if node.op_type == "Gemm"), None)
    weight_type = types.get(gemm.input[1]) if gemm is not None else None
    return {TensorProto.FLOAT: True, TensorProto.FLOAT16: False}.get(weight_type) if weight_type is not None else None


def _op_overhead_us(unit: _Unit, settings: _Settings) -> tuple[float, float]:
    """(per-op overhead, whole run of a one-op graph) in microseconds, on a 1x8 tensor."""
    x = np.ones((1, 8), np.float32)
    times = {}
    for n in (1, settings.chain):
        nodes, previous = [], "x"
        for i in range(n):
            out = "y" if i == n - 1 else f"t{i}"
            nodes.append(helper.make_node("Add", [previous, "c"], [out], name=f"add{i}"))
            previous = out
        graph = helper.make_graph(
            nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
            [numpy_helper.from_array(np.full((1, 8), 1e-3, np.float32), "c")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 9
        tiny = dataclasses.replace(settings, warmup=max(settings.warmup, 5),
                                   min_repeats=max(settings.min_repeats, 20), max_repeats=2000)
        times[n] = _time_model(model, {"x": x}, unit, tiny)
    per_op = max(0.0, (times[settings.chain] - times[1]) / (settings.chain - 1))
    return per_op * 1e6, times[1] * 1e6


def _copy_bandwidth_gbps(size_mb: int, thread_counts: list[int], settings: _Settings) -> list[float]:
    """Sustained copy bandwidth per thread count: bytes read + written per second, the array split over threads."""
    n = size_mb * 2**20 // 8
    source = np.ones(n, np.float64)
    target = np.zeros_like(source)  # touched: no page faults in the timed copies
    timing = _copy_timing(settings)
    results = []
    for threads in thread_counts:
        bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            seconds = _time_runs(functools.partial(_copy_in_parts, pool, source, target, bounds), timing)
        results.append(2 * source.nbytes / seconds / 1e9)
    return results


def _copy_in_parts(pool: ThreadPoolExecutor, source: np.ndarray, target: np.ndarray,
                   bounds: list[tuple[int, int]]) -> None:
    """Copy `source` into `target`, each part [lo, hi) of `bounds` in one of the pool's threads."""
    def part(lo_hi: tuple[int, int]) -> None:
        lo, hi = lo_hi
        np.copyto(target[lo:hi], source[lo:hi])

    list(pool.map(part, bounds))


def _device_bandwidth_gbps(unit: _Unit, settings: _Settings) -> float:
    """Sustained bandwidth of a gpu's own memory: a tensor of settings.copy_mb scaled by one (Mul) with input and
    output bound in that memory (ONNX Runtime's I/O binding), bytes read + written per second."""
    n = settings.copy_mb * 2**20 // 4
    session = _session(_scale_model(n), unit)
    binding = _device_binding(session, {"x": np.ones(n, np.float32)}, unit)
    seconds = _time_runs(lambda: session.run_with_iobinding(binding), _copy_timing(settings))
    return 2 * n * 4 / seconds / 1e9


def _scale_model(n: int) -> onnx.ModelProto:
    """y = x * 1 on n floats: one read and one write of every element."""
    node = helper.make_node("Mul", ["x", "one"], ["y"], name="scale")
    return _model(node, [n], [n], [numpy_helper.from_array(np.ones((), np.float32), "one")])


def _copy_timing(settings: _Settings) -> _Settings:
    """Fewer timed repeats for the large copies (each already takes a while)."""
    return dataclasses.replace(settings, warmup=1, min_repeats=max(3, settings.min_repeats // 2))


def _ort_device(unit: _Unit) -> str:
    """ONNX Runtime's device name for OrtValues in the unit's memory."""
    return "cuda" if unit.provider == CUDA_PROVIDER else "cpu"


def _gpu_facts(unit: _Unit, settings: _Settings, system: HostFacts) -> _Gpu:
    """The gpu's name, cores, clock and free memory from NVML (estimates where NVML does not say), and what
    handing a tensor to it and back costs, measured as explorer's blocks do it: session.run of y = x * 1 with
    NumPy in and out, less the same run with both in the gpu's memory, for 8 floats (the fixed cost) and for
    LINK_MB (the bandwidth)."""
    timing = _copy_timing(settings)
    round_trip: dict[int, float] = {}
    for n in (8, LINK_MB * 2**20 // 4):
        session = _session(_scale_model(n), unit)
        x = np.ones(n, np.float32)
        binding = _device_binding(session, {"x": x}, unit)
        resident = _time_runs(functools.partial(session.run_with_iobinding, binding), timing)
        from_numpy = _time_runs(functools.partial(session.run, None, {"x": x}), timing)
        round_trip[n] = max(from_numpy - resident, 0.0)  # one copy in and one out
        del session
    small, large = round_trip.values()
    link_gbps = 2 * LINK_MB * 2**20 / max(large - small, 1e-9) / 1e9
    detail = (f"median session.run of y = x * 1 on {unit.provider} with NumPy in and out, less the same with x and y "
              f"bound in the gpu's memory ({timing.min_repeats}-{timing.max_repeats} runs each)")
    facts = gpu_facts(system.available_mb)
    return _Gpu(name=facts.name, cores=facts.cores, clock_ghz=facts.clock_ghz, memory_mb=facts.memory_mb, link_gbps=link_gbps,
                link_latency_us=small / 2 * 1e6, link_detail=detail)


# ---- power ----------------------------------------------------------------------------------------
def _average_power_w(counter: blockrun.EnergyCounter, work: Callable[[], object], window_s: float) -> float | None:
    """Average power the counter sees while `work` is repeated for about window_s seconds (None: no reading);
    a coarse counter (NVML's) is read from one of its steps to another."""
    if counter.window_s:
        blockrun.run_until_step(counter, work)
    before, start = counter.read(), time.perf_counter()
    while time.perf_counter() - start < window_s:
        work()
    if counter.window_s:
        blockrun.run_until_step(counter, work)
    used = counter.used(before, counter.read())
    return None if used is None else used * 1e-6 / (time.perf_counter() - start)


def _measure_power(units: tuple[_Unit, ...], ops: dict[str, _Op], settings: _Settings, say: Progress
                   ) -> tuple[dict[str, tuple[float, float, str, str]], dict[str, str]]:
    """Per unit (active W, idle W, how active was measured, how idle was) where a counter covers it: NVML's
    for the gpu (first, straight after its other measurements), RAPL's package counter for the CPUs; and
    for the others why not."""
    op = max((o for o in ops.values() if o.kind == "fc"), key=lambda o: o.flops)
    power: dict[str, tuple[float, float, str, str]] = {}
    no_power: dict[str, str] = {}
    for unit in (u for u in units if u.is_gpu):
        measured = _gpu_power(unit, op, settings, say)
        if isinstance(measured, str):
            no_power[unit.id] = measured
        else:
            power[unit.id] = measured
    cpus = [u for u in units if not u.is_gpu]
    rapl = blockrun.rapl_counter()
    idle = None
    if rapl is not None:
        say("power of the CPUs: RAPL package energy counter")
        idle = _average_power_w(rapl, lambda: time.sleep(0.05), settings.power_window_s)
    if rapl is None or idle is None:
        no_power.update({u.id: f"no readable RAPL energy counter ({blockrun.RAPL_ENERGY}) on this machine" for u in cpus})
        say(f"power of the CPUs: {no_power[cpus[0].id]}; estimates")
        return power, no_power
    cores = max(u.threads for u in cpus)
    detail = (f"RAPL package energy ({blockrun.RAPL_ENERGY}) over {settings.power_window_s:g} s: idle package "
              f"{idle:.1f} W (sleeping), busy while running {op.label} fp32")
    for unit in cpus:
        session = _session(op.model, unit)
        busy = _average_power_w(rapl, functools.partial(session.run, None, {"x": op.x}), settings.power_window_s)
        del session
        if busy is None:
            no_power[unit.id] = "the RAPL counter gave no reading while the cores were busy"
            continue
        idle_share = idle * unit.threads / cores
        power[unit.id] = (max(busy - idle + idle_share, idle_share), idle_share,
                          f"{detail} on {_unit_text(unit)}, less the idle share of the cores it leaves idle",
                          f"{detail}; idle package power x {unit.threads}/{cores} of the cores")
    return power, no_power


def _gpu_power(unit: _Unit, op: _Op, settings: _Settings, say: Progress) -> tuple[float, float, str, str] | str:
    """The gpu's (active W, idle W, how, how) from NVML's counter, or why there is none."""
    nvml = blockrun.nvml_counter()
    if nvml is None:
        say("power of the gpu: no readable NVML energy counter; estimates")
        return "no readable NVML energy counter for the gpu"
    window_s = max(settings.power_window_s, 2 * nvml.window_s)
    say(f"power of the gpu: {nvml.source}, {window_s:g} s idle and {window_s:g} s busy")
    idle = _average_power_w(nvml, lambda: time.sleep(0.05), window_s)
    session = _session(op.model, unit)
    binding = _device_binding(session, {"x": op.x}, unit)
    busy = _average_power_w(nvml, functools.partial(session.run_with_iobinding, binding), window_s)
    del session
    if idle is None or busy is None:
        return "the NVML counter gave no reading"
    how = f"{nvml.source} over {window_s:g} s, from one of its steps to another"
    return (busy, min(idle, busy), f"{how}, while running {op.label} fp32 in its memory (the whole GPU)",
            f"{how}, while this process slept straight after the GPU's own measurements (the whole GPU, idle "
            "between work as between a plan's blocks)")


# ---- rendering and writing ------------------------------------------------------------------------
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


def _render(system: HostFacts, m: _Measured, elapsed_s: float, quick: bool) -> str:
    cores = system.cores
    size_mb, available_mb = system.size_mb, system.available_mb
    cpu_bandwidth = {u.id: m.bandwidth_gbps[u.id] for u in m.units if not u.is_gpu}
    memory_bw = max(cpu_bandwidth.values())
    best_unit = _largest(cpu_bandwidth)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    mode = "quick mode: fewer sizes and repeats" if quick else "full mode"
    providers = ", ".join(dict.fromkeys(u.provider for u in m.units))
    gpu_text = f" and {m.gpu.name}" if m.gpu else ""
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
                            f"measured: {m.gpu.link_detail}: {LINK_MB} MB each way, less the fixed cost"),
                      _line(f"latency_us = {_f(m.gpu.link_latency_us, 1)}",
                            f"measured: {m.gpu.link_detail}: half the time of 8 floats in and out"),
                      _line(f"energy_nj_per_byte = {_f(2 * DRAM_NJ_PER_BYTE, 3)}",
                            f"estimate: {dram_copy}; the bus transfer's own energy is not measured here")]
    return "\n".join(lines) + "\n"


def _render_unit(unit: _Unit, system: HostFacts, m: _Measured, memory_bw: float, available_mb: float) -> list[str]:
    s = m.settings
    cores = system.cores
    threads = unit.threads
    thread_text = _unit_text(unit)
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
        gpu = m.gpu
        if gpu is None:
            raise ValueError(f"processor {unit.id} is a gpu, but its NVML facts and links were not measured")
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


def _write_atomically(out: Path, text: str) -> None:
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
