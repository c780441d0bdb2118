"""Problem.evaluate throughput on the simulated board when accuracy is already cached.

    .venv/bin/python benchmarks/evaluate_speed.py [--plans 500] [--seeds 3] [--json out.json]

Plans differ only in placement (accuracy depends on ranks and precisions, not on placement, so it
is measured once); each plan is new to the measurement cache, so every call simulates the plan and
writes its cache entry. Reported per seed and as the median.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from benchmarks.common import markdown_table, write_json, zoo_problem
from explorer.plan import Plan


def run(seed: int, plans: int, disk_cache: bool) -> float:
    problem = zoo_problem("vgg", "tegra-k1")
    problem.use_disk_cache = disk_cache
    rng = np.random.default_rng(seed)
    template = problem.random_plan(rng)
    candidates = []
    for _ in range(plans):  # same ranks and precisions, random placements where valid
        decisions = {}
        for name, d in template.decisions:
            layer = problem.graph.layer_by_name[name]
            options = [c for c in problem.choices(layer) if (c.method, c.rank, c.precision) == (d.method, d.rank, d.precision)]
            decisions[name] = options[int(rng.integers(len(options)))]
        candidates.append(Plan.from_dict(decisions))
    problem.evaluate(candidates[0])  # measures the accuracy once
    started = time.perf_counter()
    for plan in candidates[1:]:
        problem.evaluate(plan)
    return (len(candidates) - 1) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows, records = [], []
    with tempfile.TemporaryDirectory() as runs:
        import os

        os.environ["EXPLORER_RUNS"] = runs
        for disk in (True, False):
            rates = [run(seed, args.plans, disk) for seed in range(args.seeds)]
            median = statistics.median(rates)
            records.append({"disk_cache": disk, "evaluations_per_s": rates, "median": median})
            rows.append(["on" if disk else "off", " / ".join(f"{r:.0f}" for r in rates), f"{median:.0f}", f"{1e3 / median:.2f}"])
    print(markdown_table(["disk cache", "evaluations/s per seed", "median evaluations/s", "ms per evaluation"], rows))
    write_json(args.json, records)


if __name__ == "__main__":
    main()
