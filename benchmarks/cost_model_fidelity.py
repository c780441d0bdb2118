"""Cost-model fidelity on this machine: predicted vs measured latency per unit block.

    .venv/bin/python benchmarks/cost_model_fidelity.py [--plans 50] [--plans-large 10] [--calibrate] [--json out.json]

Random plans of vgg and vgg16-imagenet on the `host` board (written by `explorer calibrate`; with
--calibrate it is measured first) are measured for real with ONNX Runtime (HostMeasurer). Every
unit block's measured median latency is compared with the additive cost model's prediction (sum of
its layers), raw and after calibration: per-(processor, op kind, precision) factors fitted on the
other half of the plans (two-fold cross-fitting, so no block is predicted by factors fitted on it).
Reported: the share of blocks within +/-10 % and +/-25 %.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks.common import markdown_table, write_json
from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.measure import HostMeasurer
from explorer.problem import Constraints, Problem
from explorer.zoo import load_graph, zoo_validation_data


def block_pairs(problem: Problem, plans, cost_model) -> list[list[tuple]]:
    """Per plan, per block: (observations for calibration, predicted s, measured s)."""
    per_plan = []
    for index, plan in enumerate(plans):
        print(f"  plan {index + 1}/{len(plans)}", file=sys.stderr)
        evaluation = problem.evaluate(plan)
        blocks = []
        for block in evaluation.blocks:
            layers = []
            for name in block.layers:
                d = plan[name]
                layer = problem.graph.layer_by_name[name]
                rung = problem.compressor.rung(name, d.method, d.rank)
                layers.append((d.processor, layer.kind, d.precision, cost_model.layer_cost(layer, rung, d.precision, d.processor).latency_s))
            blocks.append((layers, block.latency_ms / 1e3))
        per_plan.append(blocks)
    return per_plan


def shares(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    errors = np.array([abs(p - m) / m for p, m in pairs])
    return float(np.mean(errors <= 0.10)), float(np.mean(errors <= 0.25))


def evaluate_model(model: str, plans_count: int, seed: int, measurer: HostMeasurer) -> dict:
    graph = load_graph(model)
    problem = Problem(graph, load_board("host"), measurer, AccuracyScorer(graph.model, zoo_validation_data(model)),
                      Constraints(latency_ms=None, max_accuracy_drop=None))
    problem.use_disk_cache = False
    rng = np.random.default_rng(seed)
    plans = [problem.random_plan(rng) for _ in range(plans_count)]
    model_cost = problem.cost_model
    per_plan = block_pairs(problem, plans, model_cost)
    raw = [(sum(c for *_, c in layers), measured) for blocks in per_plan for layers, measured in blocks]
    calibrated = []
    halves = (range(0, plans_count, 2), range(1, plans_count, 2))
    for fit, test in (halves, halves[::-1]):
        observations = []
        for i in fit:
            for layers, measured in per_plan[i]:
                predicted = sum(c for *_, c in layers)
                observations += [(p, k, q, c, c * measured / predicted) for p, k, q, c in layers]
        fitted = model_cost.calibrated(observations)
        for i in test:
            for layers, measured in per_plan[i]:
                predicted = sum(c * fitted.factors.get((p, k, q), 1.0) for p, k, q, c in layers)
                calibrated.append((predicted, measured))
    raw10, raw25 = shares(raw)
    cal10, cal25 = shares(calibrated)
    return {"model": model, "plans": plans_count, "blocks": len(raw), "raw_within_10": raw10, "raw_within_25": raw25,
            "calibrated_within_10": cal10, "calibrated_within_25": cal25,
            "median_ratio_raw": float(np.median([m / p for p, m in raw]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=50, help="random plans of vgg")
    parser.add_argument("--plans-large", type=int, default=10, help="random plans of vgg16-imagenet (each takes seconds)")
    parser.add_argument("--calibrate", action="store_true", help="measure this machine first (explorer calibrate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.calibrate:
        from explorer.calibrate import calibrate_host

        calibrate_host(progress=lambda message: print(f"calibrate: {message}", file=sys.stderr))
    records = []
    for model, count, measurer in (("vgg", args.plans, HostMeasurer(warmup=3, repeats=15)),
                                   ("vgg16-imagenet", args.plans_large, HostMeasurer(warmup=1, repeats=5))):
        if count:
            print(f"{model}: {count} random plans on host", file=sys.stderr)
            records.append(evaluate_model(model, count, args.seed, measurer))
    rows = [[r["model"], r["plans"], r["blocks"], f"{100 * r['raw_within_10']:.0f}%", f"{100 * r['raw_within_25']:.0f}%",
             f"{100 * r['calibrated_within_10']:.0f}%", f"{100 * r['calibrated_within_25']:.0f}%", f"{r['median_ratio_raw']:.2f}"]
            for r in records]
    print(markdown_table(["model", "random plans", "blocks", "raw within 10%", "raw within 25%", "calibrated within 10%",
                          "calibrated within 25%", "median measured/predicted (raw)"], rows))
    write_json(args.json, records)


if __name__ == "__main__":
    main()
