"""What ONNX Runtime's CUDA provider and NVML's GPU energy counter give on this machine.

Run it on a machine with an NVIDIA GPU and onnxruntime-gpu (`pip install onnxruntime-gpu`, which replaces
onnxruntime); elsewhere it says what is missing, checks what it can and exits with status 2.

    .venv/bin/python benchmarks/cuda_check.py [--model vgg] [--board tegra-k1]

It prints, as Markdown:
1. ONNX Runtime's version and providers, and NVML's energy counter: how often it advances while a large
   MatMul runs on the GPU and the power it implies next to NVML's own power reading.
2. `--model` measured with `--measure host` (the board's processors mapped to this machine's providers:
   on tegra-k1 the gpu runs on CUDAExecutionProvider, cpu and lpc on the CPU): every layer on the gpu in
   fp32, in fp16, every layer on the cpu in fp32, and the solver's plan (solved on sim for the issue-5
   setting: energy, latency <= 1.25 x the baseline, accuracy drop <= 1 point). Latency, energy and where
   the energy figure comes from, accuracy drop. Energy is counted only when the counters cover every
   provider the board maps (RAPL and NVML for tegra-k1), else modelled for every plan alike.
   The solver puts every layer on the cpu there, so a fifth plan splits it: convolutions on the gpu.
3. That split plan exported as a bundle and run by the runtime with `strict` (no CPU fall-back): which
   provider each block ran on, and the largest difference from the same rewritten model run whole on
   the CPU over 256 validation images (and how many top-1 labels differ).
With the CUDA provider it also times the all-gpu fp32 plan's blocks 5 more times, fresh, counting only
their own provider's energy (NVML), to show what the counter gives and its spread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from benchmarks.common import markdown_table, zoo_problem
from explorer.blockrun import CUDA_PROVIDER, nvml_counter, nvml_device
from explorer.errors import ExplorerError
from explorer.plan import Decision, Plan


def nvml_cadence(seconds: float = 3.0) -> str:
    """How often NVML's energy counter advances while a 4096^2 MatMul runs on the GPU, and the power it implies."""
    counter = nvml_counter()
    if counter is None:
        return "NVML energy counter: not readable here (nvidia-ml-py, the driver's libnvidia-ml, or the counter missing)"
    n = 4096
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA_PROVIDER])
    feed = {x: np.random.default_rng(0).standard_normal((n, n)).astype(np.float32) for x in "ab"}
    session.run(None, feed)
    import pynvml

    handle, _ = nvml_device()  # the GPU whose counter this reads (a readable counter means a device was found)
    changes, powers = [], []  # (time, value) at each step of the counter; NVML's power readings
    start, last = time.perf_counter(), counter.read()
    while time.perf_counter() - start < seconds:
        session.run(None, feed)
        value = counter.read()
        if value != last:
            changes.append((time.perf_counter(), value))
            last = value
        powers.append(pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3)
    elapsed = time.perf_counter() - start
    if len(changes) < 2:
        return f"NVML energy counter ({counter.source}): advanced {len(changes)} times in {elapsed:.2f} s of MatMuls"
    steps = np.diff([t for t, _ in changes]) * 1e3
    (t0, e0), (t1, e1) = changes[0], changes[-1]
    return (f"NVML energy counter ({counter.source}): advanced {len(changes)} times in {elapsed:.2f} s of MatMuls "
            f"(median step {np.median(steps):.1f} ms, min {np.min(steps):.1f}, max {np.max(steps):.1f}); "
            f"{(e1 - e0) / 1e6 / (t1 - t0):.0f} W from the counter (first to last step), NVML power reading median "
            f"{statistics.median(powers):.0f} W")


def measured_rows(model: str, board: str) -> tuple[list[list[object]], Plan | None, object]:
    """One row per plan measured with --measure host; the solver plan and the host problem."""
    from explorer.measured_solver import solve_measured

    sim = zoo_problem(model, board, "sim", latency_ms=None, max_accuracy_drop_points=1)
    baseline_ms = sim.baseline().latency_ms
    sim = zoo_problem(model, board, "sim", latency_ms=1.25 * baseline_ms, max_accuracy_drop_points=1)
    solver_plan = solve_measured(sim).plan
    host = zoo_problem(model, board, "host", latency_ms=None, max_accuracy_drop_points=None)
    layers = [name for name, _ in solver_plan.decisions]
    plans = [("all gpu fp32", Plan.uniform(layers, Decision(processor="gpu"))),
             ("all gpu fp16", Plan.uniform(layers, Decision(precision="fp16", processor="gpu"))),
             ("all cpu fp32", Plan.uniform(layers, Decision(processor="cpu"))),
             ("solver plan (sim, issue-5 setting)", solver_plan),
             (SPLIT, split_plan(host, solver_plan))]
    rows = []
    for label, plan in plans:
        places = ", ".join(sorted({d.processor for _, d in plan.decisions}))
        try:
            evaluation = host.evaluate(plan)
        except ExplorerError as error:
            rows.append([label, places, "not measured", "", str(error), "", ""])
            continue
        rows.append([label, places, f"{evaluation.latency_ms:.3f}", f"{evaluation.energy_mj:.3f}",
                     evaluation.energy_source, f"{100 * evaluation.accuracy_drop:.2f}", evaluation.measured_by])
    return rows, plans[-1][1], host


SPLIT = "split: convolutions on the gpu (fp16 for int8), the rest on the cpu; the solver's ranks"


def split_plan(problem, plan: Plan) -> Plan:
    """`plan` with its convolutions moved to the gpu (int8 there becomes fp16, which the gpu has)."""
    gpu = problem.board.processor("gpu")
    decisions = {}
    for name, decision in plan.decisions:
        if problem.graph.layer_by_name[name].op_type == "Conv":
            precision = decision.precision if decision.precision in gpu.precisions else "fp16"
            decision = Decision(decision.method, decision.rank, precision, "gpu")
        decisions[name] = decision
    return Plan.from_dict(decisions)


def gpu_blocks_energy(host, plan: Plan, times: int = 5) -> str:
    """`times` fresh timings of the plan's blocks counting only their own providers' energy (NVML alone for
    an all-gpu plan): what the counter gives, outside a search's board-wide rule."""
    from explorer.blockrun import time_blocks
    from explorer.measure import block_specs

    _, specs, inputs = block_specs(host.graph, host.compressor, host.board, plan, host.calibration_inputs, 1)
    runs = [time_blocks(specs, inputs, warmup=3, repeats=15) for _ in range(times)]
    latency = [float(np.median(r.seconds.sum(axis=1))) * 1e3 for r in runs]
    if any(r.energy_uj is None for r in runs):
        return f"{times} timings: latency median {statistics.median(latency):.3f} ms; no energy: {runs[0].energy_source}"
    energy = [r.energy_uj / 1e3 / 15 for r in runs]
    return (f"{times} fresh timings of its blocks, energy of their own provider only: latency median "
            f"{statistics.median(latency):.3f} ms (min {min(latency):.3f}, max {max(latency):.3f}), energy median "
            f"{statistics.median(energy):.2f} mJ (min {min(energy):.2f}, max {max(energy):.2f}; {runs[0].energy_source})")


def bundle_rows(host, plan: Plan, images: int = 256) -> list[list[object]]:
    """The plan's bundle run strictly on its providers against the rewritten model whole on the CPU."""
    from explorer.export import export_bundle
    from explorer.runtime import Bundle

    x = np.asarray(host.scorer.dataset.x[:images], dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = export_bundle(host, plan, Path(folder) / "bundle")
        try:
            bundle = Bundle.load(path, strict=True)
        except ExplorerError as error:
            return [["bundle of the split plan (strict)", "not run", str(error), "", ""]]
        started = time.perf_counter()
        got = bundle.run(x)
        seconds = time.perf_counter() - started
        whole = host.compressor.rewrite(plan, host.calibration_inputs)
        reference = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
        want = reference.run(None, {reference.get_inputs()[0].name: x})[0]
        runs_on = ", ".join(f"{p}: {bundle.providers.count(p)}" for p in sorted(set(bundle.providers)))
        return [["bundle of the split plan (strict)", runs_on, f"{np.max(np.abs(got - want)):.2e}",
                 f"{int(np.sum(got.argmax(1) != want.argmax(1)))} of {len(x)}", f"{seconds * 1e3 / len(x):.3f}"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg")
    parser.add_argument("--board", default="tegra-k1")
    args = parser.parse_args()
    providers = ort.get_available_providers()
    print(f"ONNX Runtime {ort.__version__}, providers: {', '.join(providers)}")
    has_cuda = CUDA_PROVIDER in providers
    if has_cuda:
        print(nvml_cadence())
    else:
        print(f"{CUDA_PROVIDER} is not in this ONNX Runtime: install onnxruntime-gpu on a machine with an NVIDIA GPU; "
              "the rows that need it say so")
    rows, split, host = measured_rows(args.model, args.board)
    print()
    print(markdown_table(["plan", "processors", "latency ms", "energy mJ", "energy from", "accuracy drop (pt)",
                          "measured by"], rows))
    if has_cuda:
        layers = [name for name, _ in split.decisions]
        print("\nAll gpu fp32, " + gpu_blocks_energy(host, Plan.uniform(layers, Decision(processor="gpu"))))
    print()
    print(markdown_table(["what", "blocks ran on", "max abs difference", "top-1 labels that differ", "ms per image"],
                         bundle_rows(host, split)))
    return 0 if has_cuda else 2


if __name__ == "__main__":
    sys.exit(main())
