"""Time the DAD/RLC integer program (HiGHS) on the full design space, several repeats, medians.

    .venv/bin/python benchmarks/solver_timing.py [--repeats 5] [--json out.json]

vgg on tegra-k1 uses the shipped validation data (sensitivity table measured once, cached);
vgg16-imagenet has no data, so its rungs are limited by the reconstruction-error bound (singular
values computed once, cached). Set-up time is reported apart from the solve itself. Every repeat
goes to HiGHS: the solve cache (runs/cache/solves/) is bypassed, which would otherwise answer
repeats 2 to n from memory.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks.common import markdown_table, write_json, zoo_problem
from explorer.highs import solve_cache_bypassed
from explorer.milp import solve
from explorer.solver import instance_for

# (model, board, latency budget ms, accuracy-drop limit in points, every rung offered even without data)
CASES = [("vgg", "tegra-k1", 250.0, 1.0, False), ("vgg", "snapdragon-800", 250.0, 1.0, False),
         ("vgg16-imagenet", "tegra-k1", 5000.0, None, False), ("vgg16-imagenet", "tegra-k1", 5000.0, None, True),
         ("vgg16-imagenet", "snapdragon-800", 5000.0, None, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows, records = [], []
    for model, board, latency_ms, drop, all_rungs in CASES:
        print(f"{model} on {board}: setting up", file=sys.stderr)
        started = time.perf_counter()
        problem = zoo_problem(model, board, latency_ms=latency_ms, max_accuracy_drop_points=drop)
        if all_rungs:
            problem.error_bound = None
        instance = instance_for(problem)
        setup_s = time.perf_counter() - started
        times, statuses = [], set()
        for _ in range(args.repeats):
            with solve_cache_bypassed():
                solution = solve(instance)
            times.append(solution.seconds)
            statuses.add(solution.status)
        binaries = sum(len(c) for c in instance.choices)
        record = {"model": model, "board": board, "all_rungs": all_rungs, "layers": len(instance.choices), "binaries": binaries,
                  "setup_s": setup_s, "solve_median_s": statistics.median(times), "solve_max_s": max(times),
                  "status": "/".join(sorted(statuses))}
        records.append(record)
        space = "all rungs (no error bound)" if all_rungs else ("measured accuracy" if drop else "error-bounded rungs")
        rows.append([model, board, space, record["layers"], binaries, f"{setup_s:.1f}", f"{record['solve_median_s']:.3f}",
                     f"{record['solve_max_s']:.3f}", record["status"]])
    print(markdown_table(["model", "board", "space", "layers", "binary variables", "set-up s (first run incl. caches)",
                          f"solve median s ({args.repeats} runs)", "solve max s", "status"], rows))
    write_json(args.json, records)


if __name__ == "__main__":
    main()
