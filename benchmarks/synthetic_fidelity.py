"""How far accuracy estimated on synthetic inputs is from the measured figure (vgg, its shipped data).

    PYTHONPATH=. .venv/bin/python benchmarks/synthetic_fidelity.py [--random 8] [--json out.json]

A no-data run of vgg on tegra-k1 is made for each distribution of synthetic inputs (standard normal,
the default; uniform over the range normalised Fashion-MNIST pixels take, as a user who knows the
normalisation would give): the solver plans it at synthetic-agreement limits of 1, 2 and 5 points,
and seeded random plans of that design space are drawn. Each plan's model, as that no-data run
rewrites it (int8 calibrated on the synthetic inputs), is then scored three ways: the synthetic
estimate (what the run shows), agreement with the original model on the 2,000 real validation inputs
without labels, and top-1 against their labels (the truth). Drops in points. Simulated board: only
the accuracy figures matter here.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.common import markdown_table, write_json
from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.measure import make_measurer
from explorer.measured_solver import solve_measured
from explorer.problem import Constraints, Problem
from explorer.synthetic import SyntheticInputs, synthetic_dataset
from explorer.zoo import load_graph, zoo_validation_data

# normalised Fashion-MNIST pixels: (0 - 0.2190) / 0.3318 .. (1 - 0.2190) / 0.3318 (explorer.data)
DISTRIBUTIONS = ("normal", "uniform:-0.66,2.354")
LIMITS = (0.01, 0.02, 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=8, help="seeded random plans per distribution")
    parser.add_argument("--json")
    args = parser.parse_args()
    graph = load_graph("vgg")
    real = zoo_validation_data("vgg")
    top1 = AccuracyScorer(graph.model, real)
    agreement = AccuracyScorer(graph.model, Dataset(real.x, None, "the validation inputs without labels"))
    records, rows = [], []
    for spec in DISTRIBUTIONS:
        started = time.perf_counter()
        scorer = AccuracyScorer(graph.model, synthetic_dataset(graph, SyntheticInputs.parse(spec)))
        plans = []
        for limit in LIMITS:
            problem = Problem(graph, load_board("tegra-k1"), make_measurer("sim", 0), scorer,
                              Constraints(latency_ms=5000.0, max_accuracy_drop=limit))
            print(f"{spec}: solving at {100 * limit:g} points", file=sys.stderr)
            plans.append((f"solver, limit {100 * limit:g}", solve_measured(problem).plan))
        plans += [("whole-model int8", problem.uniform_plan("cpu", "int8")),
                  ("whole-model fp16", problem.uniform_plan("cpu", "fp16"))]
        rng = np.random.default_rng(0)
        plans += [(f"random {i + 1}", problem.random_plan(rng)) for i in range(args.random)]
        for name, plan in plans:
            model = problem.compressor.rewrite_shared(plan, problem.calibration_inputs)  # as the no-data run has it
            figures = {"synthetic": scorer.drop(problem.accuracy(plan)), "real_agreement": agreement.drop(agreement.score(model)),
                       "real_top1": top1.drop(top1.score(model))}
            records.append({"distribution": spec, "plan": name, "digest": plan.digest(),
                            **{f"{k}_drop_points": 100 * v for k, v in figures.items()}})
            rows.append([spec, name] + [f"{100 * v:+.2f}" for v in figures.values()])
        print(f"{spec}: {len(plans)} plans in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(markdown_table(["synthetic inputs", "plan", "estimated on synthetic inputs", "agreement on real inputs",
                          "top-1 on real labels (truth)"], rows))
    for spec in DISTRIBUTIONS:
        mine = [r for r in records if r["distribution"] == spec]
        error = np.array([r["synthetic_drop_points"] - r["real_top1_drop_points"] for r in mine])
        print(f"\n{spec}: estimate - truth, points: median {np.median(error):+.2f}, min {error.min():+.2f}, "
              f"max {error.max():+.2f}; correlation {np.corrcoef([r['synthetic_drop_points'] for r in mine], [r['real_top1_drop_points'] for r in mine])[0, 1]:.2f}")
    write_json(args.json, records)


if __name__ == "__main__":
    main()
