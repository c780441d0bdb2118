"""Scaling out: evaluations per second with 1, 2 and 4 measurement servers, and with 1 and 2 Optuna workers.

    .venv/bin/explorer calibrate --quick      # once: the `host` board the servers measure
    .venv/bin/python benchmarks/scale_out.py [--servers 1 2 4] [--plans 24] [--workers 1 2] [--budget 40] [--seeds 3]

Servers: `explorer serve` processes on loopback measure vgg plans for real (ONNX Runtime, the host
board with one thread per processor, 3 warm-up runs and 15 timed repeats per plan); the random agent
proposes the same plans (per seed) for every server count, in batches of one plan per server. Every
plan's accuracy is scored and its model rewritten before timing (local work that servers do not share
out: about 0.3 s per vgg plan here, which bounds a real search's rate whatever the number of servers),
and the measurement cache is emptied before each run, so the table shows measurement throughput:
splitting into unit blocks, uploads, and timing on the servers.

Workers: `explorer search --agent optuna-tpe --workers N` (simulated tegra-k1, vgg with its
accuracy measured) on a fresh runs folder each time (the sensitivity table and SVDs are copied in,
the evaluation and accuracy caches are not); rates over the search phase (the study's first trial
start to its last trial end) and over the whole command.

Each row is the median over seeds; ratios are to the first column. On a machine with C cores,
more than C busy processes cannot run faster than C: the core count is printed with the table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "scale-out-benchmark"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def start_servers(count: int) -> list[tuple[subprocess.Popen, str]]:
    servers = []
    for _ in range(count):
        process = subprocess.Popen([sys.executable, "-m", "explorer.entry", "serve", "--port", "0"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env=os.environ | {"EXPLORER_SERVER_TOKEN": TOKEN})
        line = process.stdout.readline()
        servers.append((process, line.split("listening on ")[1].split(" ")[0]))
    return servers


def single_threaded_host() -> Path:
    """The host profile with every processor at one ONNX Runtime thread (a copy in a temporary folder):
    N servers then need N cores, not 2N, and do not slow each other by oversubscription."""
    import re

    from explorer.paths import TARGETS_DIR

    source = TARGETS_DIR / "host.toml"
    if not source.is_file():
        raise SystemExit("scale_out: no host board profile: run `.venv/bin/explorer calibrate --quick` first")
    copy = Path(tempfile.mkdtemp(prefix="explorer-scale-out-board-")) / "host.toml"
    copy.write_text(re.sub(r"(?m)^threads = \d+", "threads = 1", source.read_text()))
    return copy


def server_rates(counts: list[int], plans: int, seeds: int) -> dict[int, list[float]]:
    """Evaluations per second per server count, one value per seed."""
    os.environ["EXPLORER_SERVER_TOKEN"] = TOKEN
    from explorer.accuracy import AccuracyScorer
    from explorer.agents import make_agent
    from explorer.boards import load_board
    from explorer.errors import ExplorerError
    from explorer.problem import Constraints, Objective, Problem
    from explorer.remote import RemoteMeasurer
    from explorer.zoo import load_graph, zoo_validation_data

    try:
        board = load_board(single_threaded_host())
    except ExplorerError as error:
        raise SystemExit(f"scale_out: {error}") from None
    graph = load_graph("vgg")
    scorer = AccuracyScorer(graph.model, zoo_validation_data("vgg"))
    servers = start_servers(max(counts))
    rates: dict[int, list[float]] = {count: [] for count in counts}
    try:
        for seed in range(seeds):
            for count in counts:
                spec = "remote://" + ",".join(address for _, address in servers[:count])
                problem = Problem(graph, board, RemoteMeasurer(spec), scorer,
                                  Constraints(latency_ms=None, max_accuracy_drop=None), Objective.parse("latency"))
                for plan in _plans(problem, plans, seed):  # local work first: what servers do not share out
                    problem.accuracy(plan)
                    problem.compressor.rewrite_shared(plan, problem.calibration_inputs)  # (accuracy may come from disk)
                problem.cache_file().unlink(missing_ok=True)
                started = time.perf_counter()
                result = make_agent("random").search(problem, plans, seed)
                seconds = time.perf_counter() - started
                assert len(result.trials) == plans and not any(t.failed for t in result.trials)
                rates[count].append(plans / seconds)
                progress(f"  servers {count}, seed {seed}: {plans} plans in {seconds:.1f} s ({plans / seconds:.2f}/s)")
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait()
    return rates


def _plans(problem, count: int, seed: int):
    """The plans the random agent proposes with this seed (the same for every server count)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seen, plans = set(), []
    while len(plans) < count:
        plan = problem.random_plan(rng)
        if plan.digest() not in seen:
            seen.add(plan.digest())
            plans.append(plan)
    return plans


def worker_rates(counts: list[int], budget: int, seeds: int) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Evaluations per second of `explorer search --workers N` per worker count, one value per seed:
    over the whole command, and over the search phase (first trial started to last trial finished,
    from the Optuna study's timestamps)."""
    import optuna

    base = Path(tempfile.mkdtemp(prefix="explorer-scale-out-"))
    env = os.environ | {"EXPLORER_RUNS": str(base / "warm")}
    progress("  sensitivity table (once, copied into every run)")
    subprocess.run([sys.executable, "-m", "explorer.cli", "sensitivity", "--model", "vgg"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    whole: dict[int, list[float]] = {count: [] for count in counts}
    phase: dict[int, list[float]] = {count: [] for count in counts}
    try:
        for seed in range(seeds):
            for count in counts:
                runs = base / f"w{count}-s{seed}"
                for folder in ("sensitivity", "svd"):
                    if (base / "warm" / "cache" / folder).is_dir():
                        shutil.copytree(base / "warm" / "cache" / folder, runs / "cache" / folder)
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "explorer.cli", "search", "--board", "tegra-k1", "--model", "vgg",
                                "--agent", "optuna-tpe", "--budget", str(budget), "--workers", str(count), "--seed", str(seed)],
                               cwd=ROOT, env=os.environ | {"EXPLORER_RUNS": str(runs)}, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                seconds = time.perf_counter() - started
                storage = f"sqlite:///{runs / 'optuna.db'}"
                trials = [t for summary in optuna.get_all_study_summaries(storage)
                          for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials
                          if t.datetime_start and t.datetime_complete]
                span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
                whole[count].append(budget / seconds)
                phase[count].append(budget / span)
                progress(f"  workers {count}, seed {seed}: {budget} evaluations, command {seconds:.1f} s "
                         f"({budget / seconds:.2f}/s), search phase {span:.1f} s ({budget / span:.2f}/s)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return whole, phase


def table(title: str, what: str, rates: dict[int, list[float]]) -> str:
    counts = sorted(rates)
    medians = {c: statistics.median(rates[c]) for c in counts}
    first = medians[counts[0]]
    lines = [f"### {title}", "", "| " + what + " | " + " | ".join(str(c) for c in counts) + " |",
             "|---|" + "---:|" * len(counts),
             "| evaluations/s (median) | " + " | ".join(f"{medians[c]:.2f}" for c in counts) + " |",
             f"| ratio to {counts[0]} | " + " | ".join(f"{medians[c] / first:.2f}" for c in counts) + " |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--plans", type=int, default=24, help="plans measured per run (remote servers)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--budget", type=int, default=60, help="evaluations per search (Optuna workers)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-servers", action="store_true")
    parser.add_argument("--skip-workers", action="store_true")
    args = parser.parse_args()
    out = [f"{os.cpu_count()} cores on this machine; median over {args.seeds} seeds.", ""]
    if not args.skip_servers:
        progress("measurement servers on loopback (host board):")
        out.append(table(f"Measurement servers (vgg on host, {args.plans} plans, warm-up 3, 15 repeats)", "servers",
                         server_rates(sorted(args.servers), args.plans, args.seeds)))
    if not args.skip_workers:
        progress("Optuna workers on one study (SQLite under runs/):")
        whole, phase = worker_rates(sorted(args.workers), args.budget, args.seeds)
        title = f"Optuna workers (optuna-tpe, vgg on simulated tegra-k1, accuracy measured, {args.budget} evaluations)"
        out.append(table(f"{title}: search phase (first trial started to last finished)", "workers", phase))
        out.append(table(f"{title}: whole command (start-up, baseline, solver and summary included)", "workers", whole))
    print("\n".join(out))


if __name__ == "__main__":
    main()
