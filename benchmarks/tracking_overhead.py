"""What MLflow tracking costs a simulated search: the same random search untracked and tracked.

    .venv/bin/python benchmarks/tracking_overhead.py [--budget 1000] [--model vgg] [--board tegra-k1] [--warm] [--json out.json]

Each search starts in its own fresh runs folder (cold caches, as a first search does), so neither
recalls the other's measurements. With --warm both run in one folder that an untracked search of
the same plans filled first: every evaluation is recalled from the caches in well under a
millisecond, the worst case for logging (a search replayed after an interruption, or an agent that
revisits placements of ranks it has scored). The tracked search logs every trial to a SQLite MLflow store
through the public client (explorer.tracking.SearchTracker) and is timed until every trial is
written and the parent run ended; the figure reported is (tracked - untracked) / untracked.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import markdown_table, write_json


def timed_search(model: str, board: str, budget: int, tracked: bool, runs: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one random search in `runs` (None: a fresh folder)."""
    with tempfile.TemporaryDirectory() as fresh:
        os.environ["EXPLORER_RUNS"] = runs or fresh
        from agents import make_agent
        from benchmarks.common import zoo_problem
        from explorer.tracking import SearchTracker, default_tracking_uri, experiment_name

        problem = zoo_problem(model, board)
        tracker = SearchTracker(default_tracking_uri(), experiment_name(model, board), "overhead",
                                {"budget": budget}) if tracked else None  # the store is made before the clock starts
        wall, cpu = time.perf_counter(), time.process_time()
        make_agent("random").search(problem, budget, 0, tracker.log_trial if tracker else None)
        if tracker:
            tracker.close()
        return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--model", default="vgg")
    parser.add_argument("--board", default="tegra-k1")
    parser.add_argument("--warm", action="store_true", help="every evaluation recalled from the caches (see above)")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as shared:
        runs = shared if args.warm else None
        if args.warm:
            timed_search(args.model, args.board, args.budget, tracked=False, runs=runs)  # fills the caches
        untracked = timed_search(args.model, args.board, args.budget, tracked=False, runs=runs)
        tracked = timed_search(args.model, args.board, args.budget, tracked=True, runs=runs)
    overhead = (tracked[0] - untracked[0]) / untracked[0]
    rows = [[name, f"{wall:.1f}", f"{cpu:.1f}", f"{1e3 * wall / args.budget:.1f}"]
            for name, (wall, cpu) in (("untracked", untracked), ("tracked (SQLite, public client)", tracked))]
    print(markdown_table(["random search", "wall s", "CPU s", "ms per evaluation"], rows))
    print(f"\ntracking overhead: {100 * overhead:+.1f} % of the untracked search's wall time "
          f"({args.budget} evaluations, {args.model} on {args.board}, simulated, {'warm' if args.warm else 'cold'} caches)")
    write_json(args.json, {"budget": args.budget, "model": args.model, "board": args.board, "warm": args.warm,
                           "untracked_s": untracked[0], "tracked_s": tracked[0], "untracked_cpu_s": untracked[1],
                           "tracked_cpu_s": tracked[1], "overhead_fraction": overhead})


if __name__ == "__main__":
    main()
