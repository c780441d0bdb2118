"""What explorer delivers on this machine against what a user would do anyway, measured in one interleaved run.

    .venv/bin/python benchmarks/host_delivery.py [--models vgg,dnn,cnn] [--budget 300] [--agent ppo]
        [--samples N] [--json F] [--markdown F]
    .venv/bin/python benchmarks/host_delivery.py --from-json F [F ...]   # the tables of earlier runs

Needs the `host` board (`explorer calibrate`). For each zoo model: explorer searches on the host (`--measure
host`, 1-point accuracy limit) once for the latency objective and once for energy, each search confirming its
best plans; then the original fp32 model, whole-model int8 (ONNX Runtime static QDQ, per-channel, calibrated
on the data), whole-model fp16 and the two best confirmed plans are measured again side by side, interleaved
(A B C ..., B C A ..., until every median's 95 % interval is within +/-3 % or a cap), at batch 1 and batch 32.
Reported per plan: top-1 on the held-out data (scored with the session options the bundle runs with), latency
(median and interval), weight MB, peak resident memory of a process that loads the plan's model.onnx and runs
it (batch 1), and every ratio to fp32. `vgg16-imagenet` has no data: latency and memory only (no accuracy).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import markdown_table, write_json, zoo_problem
from explorer.agents import make_agent
from explorer.confirm import CONFIRM_REPEATS
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.measure import HostMeasurer
from explorer.problem import Problem
from explorer.searchrun import confirm_search, run_agent

ACCURACY_LIMIT_POINTS = 1.0
BATCHES = (1, 32)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report the parent's peak
_PEAK_MEMORY = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feed = {session.get_inputs()[0].name: np.load(sys.argv[2])}
for _ in range(5):
    session.run(None, feed)
status = open("/proc/self/status").read().splitlines()
print(int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024)
"""


def problem_for(model: str, objective: str, samples: int | None) -> Problem:
    """The model on the calibrated host, measured for real, with a 1-point accuracy limit (none without data)."""
    try:
        problem = zoo_problem(model, "host", "host", objective, latency_ms=None, max_accuracy_drop_points=ACCURACY_LIMIT_POINTS)
    except ExplorerError as error:
        raise SystemExit(f"host_delivery: {error}") from None
    dataset = problem.scorer.dataset
    if dataset is not None and samples is not None and samples < len(dataset.x):  # a subset for the search only
        subset = Dataset(dataset.x[:samples], None if dataset.y is None else dataset.y[:samples],
                         f"{dataset.source}, first {samples}")
        problem = Problem(problem.graph, problem.board, problem.measurer, type(problem.scorer)(problem.graph.model, subset),
                          problem.constraints, problem.objective)
    return problem


def searched_best(model: str, objective: str, agent: str, budget: int, seed: int, samples: int | None) -> dict:
    """One search and its confirmation: the best confirmed plan and how the search went."""
    problem = problem_for(model, objective, samples)
    started = time.perf_counter()
    result = run_agent(make_agent(agent), problem, budget, seed)
    if result.interrupted:  # a partial search is not the one the table reports
        raise SystemExit(f"host_delivery: the {objective} search was interrupted after {len(result.trials)} evaluations")
    confirmation, _ = confirm_search(problem, result)
    best = confirmation.best()
    print(f"  {objective} search: {len(result.trials)} evaluations in {time.perf_counter() - started:.0f} s; best "
          f"confirmed {'baseline' if best.is_baseline else best.plan.digest()[:12]} (ratio {best.ratio:.3f})", file=sys.stderr)
    return {"plan": best.plan, "objective": objective, "evaluations": len(result.trials), "ratio": best.ratio,
            "ratio_ci": best.ratio_ci, "is_baseline": best.is_baseline,
            "search_seconds": time.perf_counter() - started}


def peak_memory_mb(model: onnx.ModelProto, x: np.ndarray) -> float:
    """Resident high-water mark (MB) of a fresh process that loads `model` in ONNX Runtime and runs it on x."""
    with tempfile.TemporaryDirectory() as folder:
        path, inputs = Path(folder, "model.onnx"), Path(folder, "x.npy")
        onnx.save(model, path)
        np.save(inputs, x)
        done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(path), str(inputs)], capture_output=True,
                              text=True, timeout=600, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def deliver(model: str, agent: str, budget: int, seed: int, samples: int | None) -> dict:
    """The searches, then every plan measured again side by side at each batch size."""
    print(f"{model}:", file=sys.stderr)
    accuracy_known = problem_for(model, "latency", None).scorer.measured
    objectives = ("latency", "energy") if accuracy_known else ("latency",)
    found = [searched_best(model, objective, agent, budget, seed, samples) for objective in objectives]
    problem = problem_for(model, "latency", None)  # the full held-out data for the table's accuracy
    baseline = problem.baseline_plan()
    processor = baseline.decisions[0][1].processor
    plans = [("fp32 (original)", baseline)]
    for precision, name in (("int8", "whole-model int8"), ("fp16", "whole-model fp16")):
        if precision in problem.board.processor(processor).precisions:
            plans.append((name, problem.uniform_plan(processor, precision)))
    plans += [(f"explorer best ({f['objective']})", f["plan"]) for f in found]
    rows = {name: {"plan_digest": plan.digest()} for name, plan in plans}
    for name, plan in plans:
        evaluation = problem.evaluate(plan)
        rows[name] |= {"top1": evaluation.accuracy, "accuracy_drop_points": None if evaluation.accuracy_drop is None
                       else 100 * evaluation.accuracy_drop, "weight_mb": evaluation.memory_mb,
                       "energy_source": evaluation.energy_source}
        x = problem.calibration_inputs[:1]
        rows[name]["peak_memory_mb"] = peak_memory_mb(problem.compressor.rewrite(plan, problem.calibration_inputs), x)
    for batch in BATCHES:
        measurer = HostMeasurer(batch=batch)
        measured = measurer.measure_interleaved(problem.graph, problem.compressor, problem.board,
                                                [plan for _, plan in plans], problem.calibration_inputs, 5, CONFIRM_REPEATS)
        for (name, _), result in zip(plans, measured):
            m = result.measurement
            rows[name][f"latency_ms_b{batch}"] = m.latency_ms
            rows[name][f"latency_ci_ms_b{batch}"] = m.latency_ci_ms
            rows[name][f"energy_mj_b{batch}"] = m.energy_mj
            rows[name][f"busy_b{batch}"] = m.busy
    base = rows["fp32 (original)"]
    for row in rows.values():
        for batch in BATCHES:
            row[f"speedup_b{batch}"] = base[f"latency_ms_b{batch}"] / row[f"latency_ms_b{batch}"]
        row["weight_ratio"] = base["weight_mb"] / row["weight_mb"]
    return {"model": model, "agent": agent, "budget": budget, "seed": seed, "search_samples": samples,
            "searches": [{k: v for k, v in f.items() if k != "plan"} | {"plan": f["plan"].to_json()} for f in found],
            "plans": rows}


def markdown(report: dict) -> str:
    """One table per model: every plan's figures and ratios to fp32."""
    header = ["plan", "top-1 %", "drop pts", "latency b1 ms [95 %]", "x fp32 b1", "latency b32 ms [95 %]", "x fp32 b32",
              "weights MB", "x less", "peak MB"]
    parts = []
    for entry in report["models"]:
        rows = []
        for name, row in entry["plans"].items():
            def latency(batch: int) -> str:
                ci = row[f"latency_ci_ms_b{batch}"]
                return f"{row[f'latency_ms_b{batch}']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{row[f'latency_ms_b{batch}']:.3f}"
            top1 = "-" if row["top1"] is None else f"{100 * row['top1']:.2f}"
            drop = "-" if row["accuracy_drop_points"] is None else f"{row['accuracy_drop_points']:+.2f}"
            rows.append([name, top1, drop, latency(1), f"{row['speedup_b1']:.2f}", latency(32), f"{row['speedup_b32']:.2f}",
                         f"{row['weight_mb']:.2f}", f"{row['weight_ratio']:.2f}", f"{row['peak_memory_mb']:.0f}"])
        searches = "; ".join(f"{s['objective']}: {s['evaluations']} evaluations, {s['search_seconds']:.0f} s"
                             for s in entry["searches"])
        parts.append(f"**{entry['model']}** ({entry['agent']}, budget {entry['budget']}, seed {entry['seed']}; {searches})\n\n"
                     + markdown_table(header, rows))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg,dnn,cnn")
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--agent", default="ppo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=None, help="validation samples the searches score on (default: all)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--from-json", nargs="+", metavar="F", help="print the tables of earlier runs' --json files")
    args = parser.parse_args(argv)
    if args.from_json:
        report = {"models": [entry for path in args.from_json for entry in json.loads(Path(path).read_text())["models"]]}
    else:
        report = {"command": " ".join(sys.argv), "models": []}
        for model in args.models.split(","):
            report["models"].append(deliver(model, args.agent, args.budget, args.seed, args.samples))
            write_json(args.json, report)  # after every model: a stopped run keeps what it finished
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
