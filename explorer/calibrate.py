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
carries a comment saying how it was measured or why it is an estimate (:mod:`explorer.hostprofile` writes
it). The file is written atomically, once it loads as a board: an interrupted or failed calibration never
leaves a broken profile and keeps the previous one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from explorer import blockrun, precision
from explorer.blockrun import BUSY_CORES, busy_cores  # the load check, shared with the measurers
from explorer.blockrun import cpu_times as _cpu_times
from explorer.blockrun import others_cores as _others_cores
from explorer.boards import HOST, PRECISIONS
from explorer.errors import error_line
from explorer.hostinfo import HostFacts, gpu_facts, host_facts
from explorer.hostprofile import BenchmarkOp, Gpu, Measured, Settings, Unit, render_profile, write_profile
from explorer.paths import TARGETS_DIR
from explorer.sessions import CUDA_PROVIDER, open_session, session_options

Progress = Callable[[str], None]

GPU_PROVIDER = CUDA_PROVIDER  # a machine whose ONNX Runtime can run it gets a `gpu` processor
OPSET = 17
LINK_MB = 4  # tensor size for the CPU <-> gpu link bandwidth: a large activation, not a bulk copy


FULL = Settings(gemm_sizes=(256, 512, 1024), gemv=(4096, 1024), convs=((64, 64, 56), (128, 128, 28)),
                 warmup=2, min_repeats=5, max_repeats=50, target_s=1.0, copy_mb=256, chain=100,
                 power_window_s=1.0, load_window_s=0.5)
QUICK = Settings(gemm_sizes=(512,), gemv=(4096, 1024), convs=((128, 128, 28),),
                  warmup=1, min_repeats=3, max_repeats=10, target_s=0.08, copy_mb=64, chain=50,
                  power_window_s=0.3, load_window_s=0.2)


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
    text = render_profile(system, measured, elapsed, quick)
    say(f"writing {out}")
    write_profile(out, text)
    return out


# ---- measurement ----------------------------------------------------------------------------------
def _measure(system: HostFacts, settings: Settings, background: float, say: Progress) -> Measured:
    cores = system.cores
    gpu_unit = _gpu_unit(say)
    units = (Unit("cpu", cores), Unit("cpu1", 1)) + ((gpu_unit,) if gpu_unit else ())
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
            say(f"{op.label} on {unit.id} ({unit.runs_text()}): {summary} GFLOP/s")
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
    return Measured(units=units, settings=settings, gflops=gflops, ops=ops, fp16_in_fp32=fp16_in_fp32,
                     bandwidth_gbps=bandwidth, overhead_us=overhead, run_call_us=run_call_us,
                     power=power, no_power=no_power, background_cores=background, gpu=gpu)


def _gpu_unit(say: Progress) -> Unit | None:
    """The `gpu` processor when ONNX Runtime here has GPU_PROVIDER and can run a model on it, else None."""
    if GPU_PROVIDER not in ort.get_available_providers():
        return None
    unit = Unit("gpu", 1, GPU_PROVIDER, "gpu")
    probe = _gemm_op("probe", 8, 8, 8, "probe", np.random.default_rng(1))
    try:
        session = blockrun.open_session(blockrun.BlockSpec(probe.model.SerializeToString(), 1, GPU_PROVIDER), 0)
        session.run(None, {"x": probe.x})
    except Exception as error:  # BlockRunError, or ORT's own for a kernel, memory or library failure when running
        reason = error_line(error, 300)
        say(f"warning: ONNX Runtime has {GPU_PROVIDER} but cannot run a model on it ({reason}); "
            "the profile gets no gpu processor")
        return None
    say(f"gpu: ONNX Runtime {GPU_PROVIDER} runs here; the profile gets a `gpu` processor")
    return unit


def _benchmark_ops(settings: Settings) -> dict[str, BenchmarkOp]:
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


def _gemm_op(key: str, m: int, k: int, n: int, label: str, rng: np.random.Generator) -> BenchmarkOp:
    weight = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.zeros(n, np.float32), "B")]
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="op", transB=1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return BenchmarkOp(key, "fc", label, 2.0 * m * k * n, _model(node, [m, k], [m, n], inits), x)


def _conv_op(cin: int, cout: int, hw: int, rng: np.random.Generator) -> BenchmarkOp:
    weight = (rng.standard_normal((cout, cin, 3, 3)) / math.sqrt(9 * cin)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.zeros(cout, np.float32), "B")]
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="op", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = rng.standard_normal((1, cin, hw, hw)).astype(np.float32)
    model = _model(node, [1, cin, hw, hw], [1, cout, hw, hw], inits)
    return BenchmarkOp(f"conv{cin}x{hw}", "conv", f"3x3 conv {cin}->{cout} at {hw}x{hw}",
               2.0 * cout * cin * 9 * hw * hw, model, x)


def _variants(op: BenchmarkOp) -> dict[str, onnx.ModelProto]:
    """The op at each precision, rewritten as explorer rewrites layers (int8 calibrated on op.x)."""
    return {
        "fp32": op.model,
        "fp16": precision.apply_precisions(op.model, {"op": "fp16"}),
        "int8": precision.apply_precisions(op.model, {"op": "int8"}, calibration_inputs=op.x),
    }


def _session(model: onnx.ModelProto, unit: Unit, optimized_path: str | None = None) -> ort.InferenceSession:
    """A session as explorer's blocks run (a node the provider lacks falls back to the CPU provider), quiet; with
    `optimized_path`, ONNX Runtime writes its basic-optimised graph there (to see what it computes)."""
    options = session_options(unit.threads)
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return open_session(model, unit.provider, options=options, strict=False)


def _time_runs(run: Callable[[], object], settings: Settings) -> float:
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


def _time_model(model: onnx.ModelProto, feed: dict[str, np.ndarray], unit: Unit,
                settings: Settings) -> float:
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


def _device_binding(session: ort.InferenceSession, feed: dict[str, np.ndarray], unit: Unit) -> ort.IOBinding:
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
            _session(model, Unit("cpu1", 1), optimized_path=path)
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


def _op_overhead_us(unit: Unit, settings: Settings) -> tuple[float, float]:
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


def _copy_bandwidth_gbps(size_mb: int, thread_counts: list[int], settings: Settings) -> list[float]:
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


def _device_bandwidth_gbps(unit: Unit, settings: Settings) -> float:
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


def _copy_timing(settings: Settings) -> Settings:
    """Fewer timed repeats for the large copies (each already takes a while)."""
    return dataclasses.replace(settings, warmup=1, min_repeats=max(3, settings.min_repeats // 2))


def _ort_device(unit: Unit) -> str:
    """ONNX Runtime's device name for OrtValues in the unit's memory."""
    return "cuda" if unit.provider == CUDA_PROVIDER else "cpu"


def _gpu_facts(unit: Unit, settings: Settings, system: HostFacts) -> Gpu:
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
    return Gpu(facts=gpu_facts(system.available_mb), link_gbps=link_gbps, link_latency_us=small / 2 * 1e6,
               link_detail=detail, link_mb=LINK_MB)


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


def _measure_power(units: tuple[Unit, ...], ops: dict[str, BenchmarkOp], settings: Settings, say: Progress
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
                          f"{detail} on {unit.runs_text()}, less the idle share of the cores it leaves idle",
                          f"{detail}; idle package power x {unit.threads}/{cores} of the cores")
    return power, no_power


def _gpu_power(unit: Unit, op: BenchmarkOp, settings: Settings, say: Progress) -> tuple[float, float, str, str] | str:
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
