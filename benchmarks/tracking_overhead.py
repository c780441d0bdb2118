"""What MLflow tracking costs a simulated search: the same random search untracked and tracked.

    .venv/bin/python benchmarks/tracking_overhead.py [--budget 1000] [--repeats 3] [--warm [--runs DIR]]
                                                     [--model vgg] [--board tegra-k1] [--json out.json]

Cold (the default): every search starts in its own fresh runs folder, as a first search does, so
neither recalls the other's measurements. --warm: every search runs in one folder that an
untracked search of the same plans filled first (or DIR, kept between invocations; the filling
search then only tops it up): every evaluation is recalled from the caches in well under a
millisecond, the worst case for logging (a search replayed after an interruption, or an agent that
revisits plans it has scored). The tracked search logs every trial to a fresh SQLite MLflow store
through the public client (explorer.tracking.SearchTracker) and is timed until every trial is
written and the parent run ended. Each repeat runs both searches, in alternating order; the figures
reported are medians over the repeats, and the overhead is (tracked - untracked) / untracked of the
medians, for wall time and for this process's CPU time (all threads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks.common import markdown_table, write_json


def timed_search(model: str, board: str, budget: int, tracked: bool, runs: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one random search in `runs` (None: a fresh folder);
    a tracked search logs to a fresh SQLite store of its own."""
    with tempfile.TemporaryDirectory() as fresh, tempfile.TemporaryDirectory() as store:
        os.environ["EXPLORER_RUNS"] = runs or fresh
        from benchmarks.common import zoo_problem
        from explorer.agents import make_agent
        from explorer.tracking import DATABASE_FILE, SearchTracker, experiment_name

        problem = zoo_problem(model, board)
        tracker = SearchTracker(f"sqlite:///{store}/{DATABASE_FILE}", experiment_name(model, board), "overhead",
                                {"budget": budget}) if tracked else None  # the store is made before the clock starts
        wall, cpu = time.perf_counter(), time.process_time()
        make_agent("random").search(problem, budget, 0, tracker.log_trial if tracker else None)
        if tracker:
            tracker.close()
        return time.perf_counter() - wall, time.process_time() - cpu


def _overhead(tracked: float, untracked: float) -> str:
    return f"{100 * (tracked - untracked) / untracked:+.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="vgg")
    parser.add_argument("--board", default="tegra-k1")
    parser.add_argument("--warm", action="store_true", help="every evaluation recalled from the caches (see above)")
    parser.add_argument("--runs", help="with --warm: the cache folder to fill and reuse (default: a temporary one)")
    parser.add_argument("--json")
    args = parser.parse_args()
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as shared:
        runs = (args.runs or shared) if args.warm else None
        if args.warm:
            timed_search(args.model, args.board, args.budget, tracked=False, runs=runs)  # fills the caches
        for repeat in range(args.repeats):
            for tracked in (False, True) if repeat % 2 == 0 else (True, False):
                times[tracked].append(timed_search(args.model, args.board, args.budget, tracked, runs))
                print(f"repeat {repeat + 1}: {'tracked' if tracked else 'untracked'} wall {times[tracked][-1][0]:.2f} s, "
                      f"CPU {times[tracked][-1][1]:.2f} s", flush=True)
    wall = {tracked: statistics.median(w for w, _ in runs_) for tracked, runs_ in times.items()}
    cpu = {tracked: statistics.median(c for _, c in runs_) for tracked, runs_ in times.items()}
    rows: list[list[object]] = [
        [name, f"{wall[tracked]:.2f}", " ".join(f"{w:.2f}" for w, _ in times[tracked]), f"{cpu[tracked]:.2f}",
         " ".join(f"{c:.2f}" for _, c in times[tracked])]
        for name, tracked in (("untracked", False), ("tracked (SQLite, public client)", True))]
    print()
    print(markdown_table(["random search", "median wall s", "each", "median CPU s", "each"], rows))
    print(f"\ntracking overhead ({args.budget} evaluations, {args.model} on {args.board}, simulated, "
          f"{'warm' if args.warm else 'cold'} caches, median of {args.repeats}): wall {_overhead(wall[True], wall[False])}, "
          f"CPU {_overhead(cpu[True], cpu[False])}; logging {1e3 * (cpu[True] - cpu[False]) / args.budget:.1f} ms "
          f"of CPU per trial")
    write_json(args.json, {"budget": args.budget, "model": args.model, "board": args.board, "warm": args.warm,
                           "repeats": args.repeats, "untracked": times[False], "tracked": times[True],
                           "untracked_s": wall[False], "tracked_s": wall[True], "untracked_cpu_s": cpu[False],
                           "tracked_cpu_s": cpu[True], "overhead_fraction": (wall[True] - wall[False]) / wall[False],
                           "cpu_overhead_fraction": (cpu[True] - cpu[False]) / cpu[False]})


if __name__ == "__main__":
    main()
