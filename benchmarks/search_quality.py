"""Search quality: every agent side by side on the same problems at equal measured-evaluation budgets.

    .venv/bin/python benchmarks/search_quality.py [--budgets 100 300 1000] [--seeds 5] [--first-seed 0]
        [--agents ppo optuna-tpe ...] [--reference-budget N] [--json out.json] [--plot out.png]

Problems: vgg (Fashion-MNIST, the full 2000-image validation set) on tegra-k1 and snapdragon-800,
measured on the simulated boards, minimising energy under a latency budget and a 1-point accuracy
limit. The latency budget defaults to 1.25 x the baseline's measured latency (the uncompressed fp32
model on its best processor): 250 ms does not bind for this small network (under 1 ms), and a
budget below the baseline's latency leaves almost nothing feasible. Whether the budget binds is
reported: a plan seen that fails only the latency budget yet beats the best known shows that it does.

Table: per agent and budget, the median over seeds of the best feasible objective, relative to the
best plan known: the best of all agents at the reference budget (default 10x the largest budget;
seed 0, cached under runs/benchmarks/; --recompute-reference after changing an agent) or anything
better found by the runs themselves. "x/n feasible" marks budgets where not every seed found a
feasible plan (a seed without one counts as infinitely bad in the median).

An agent whose proposals do not depend on the budget (its `anytime` attribute: solver, random,
Optuna) runs once per seed at the largest budget and is read off its best-so-far curve at each
budget, which is what a separate run with that budget would return; other agents (ppo) run once per
budget. All searches on one board share one Problem, so a plan measured by one search is recalled
by the next from the cache; each search still counts it against its own budget.

--first-seed K runs seeds K..SEEDS-1 only, to add seeds to earlier outputs; --seeds 0 runs only the
reference searches (the longest part, as processes of their own). An interrupted search (Ctrl-C, `kill`)
stops the benchmark; it is not a run of the table nor a reference search, but its best feasible plan so
far is a known plan: kept in runs/benchmarks/interrupted/ and, with --json, written to that file as a
partial search next to what finished, so the merge counts it for the best known. Its measurements are
cached, so a rerun recalls them instead of measuring again (same seed, same plans).

--from-json A.json B.json ...: no search; the table and the plot from earlier --json outputs, their
runs merged per board (for example boards or agents run as separate processes side by side).

Plot (--plot): per board, the median over seeds of the best-so-far curve of each agent's longest run
(relative to the best known, against measured evaluations), with the table's medians as markers.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

from explorer.accuracy import AccuracyScorer
from explorer.agents import AGENTS, make_agent
from explorer.boards import load_board
from explorer.cache import atomic_write_json, digest, read_json
from explorer.errors import ExplorerError, termination_as_interrupt
from explorer.measure import SimMeasurer
from explorer.measured_solver import solve_measured
from explorer.paths import runs_dir
from explorer.problem import Constraints, Objective, Problem
from explorer.searching import SearchResult, Trial
from explorer.searchrun import run_agent
from explorer.zoo import load_graph, zoo_validation_data

AGENT_OPTIONS = {"optuna-tpe": {"storage": "memory"}, "optuna-nsga2": {"storage": "memory"}}  # fresh studies


# colour, line style, width: a wide solid line under dashed ones, so agents with identical curves stay visible
AGENT_STYLES = {"ppo": ("tab:red", "-", 2.0), "optuna-tpe": ("tab:blue", "-", 5.0), "optuna-nsga2": ("tab:green", "--", 2.5),
                "random": ("tab:gray", ":", 2.0), "solver": ("tab:purple", "-.", 1.5)}


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Run:
    """One search of one agent with one seed (at one budget, or at the largest for anytime agents)."""

    agent: str
    seed: int
    budget: int
    anytime: bool  # may be read at any smaller budget
    result: SearchResult
    seconds: float

    def serves(self, budget: int) -> bool:
        return self.budget == budget or (self.anytime and self.budget >= budget)

    def best_at(self, budget: int) -> float:
        """Best feasible objective after `budget` measured evaluations (inf when none yet)."""
        curve = self.result.best_so_far
        return curve[min(budget, len(curve)) - 1] if curve else math.inf


@dataclass
class BoardReport:
    board: str
    problem: Problem | None  # None when read back from --json
    latency_budget_ms: float
    baseline: dict
    runs: list[Run] = field(default_factory=list)
    partial: list[dict] = field(default_factory=list)  # best plans of searches stopped before their budget
    reference: dict | None = None  # the best plan known
    searched: dict[int, dict[str, dict]] = field(default_factory=dict)  # reference budget -> agent -> its search's best
    binds: dict | None = None  # a better plan that only the latency budget excludes


def build_problem(graph, scorer, board_name: str, args) -> tuple[Problem, float, dict]:
    """The board's Problem with its latency budget (explicit, or a factor of the baseline's latency)."""
    board = load_board(board_name)
    objective = Objective.parse(args.objective)
    unconstrained = Problem(graph, board, SimMeasurer(seed=0), scorer, Constraints(latency_ms=None, max_accuracy_drop=None),
                            objective)
    base = unconstrained.baseline()
    budget = args.latency_ms if args.latency_ms is not None else args.latency_factor * base.latency_ms
    problem = Problem(graph, board, SimMeasurer(seed=0), scorer,
                      Constraints(latency_ms=budget, max_accuracy_drop=args.max_accuracy_drop), objective)
    baseline = {"processor": unconstrained.baseline_plan().decisions[0][1].processor, "latency_ms": base.latency_ms,
                "energy_mj": base.energy_mj, "memory_mb": base.memory_mb}
    return problem, budget, baseline


def new_agent(name: str):
    return make_agent(name, **AGENT_OPTIONS.get(name, {}))


def is_anytime(name: str) -> bool:
    """Whether the agent's proposals do not depend on the budget (one run serves every smaller budget)."""
    return _anytime(new_agent(name))


def _anytime(agent) -> bool:
    return bool(getattr(agent, "anytime", False))


def search(agent_name: str, problem: Problem, budget: int, seed: int, label: str) -> Run:
    agent = new_agent(agent_name)
    step = max(1, budget // 10)
    measured = 0

    def report(trial: Trial, result: SearchResult) -> None:
        nonlocal measured
        measured = trial.number + 1
        if (trial.number + 1) % step == 0:
            progress(f"  {label}: {trial.number + 1}/{budget} evaluations, best {result.best_so_far[-1]:.4g}")

    started = time.perf_counter()
    result = run_agent(agent, problem, budget, seed, report)  # Ctrl-C at any instant: what it has, interrupted
    if result.interrupted:  # a partial run must not be read as a whole one (nor stored as a reference)
        partial = partial_best(result, budget, seed)
        kept = keep_partial_best(partial, problem, label) if partial else None
        raise SearchStopped(f"search_quality: interrupted during {label} after {measured} evaluations; it is no run "
                            f"of the table (the evaluations are cached: a rerun recalls them quickly)"
                            + (f"; its best so far, {kept}" if kept else ""), partial)
    seconds = time.perf_counter() - started
    best = f"{result.best.objective:.4g}" if result.best else "none feasible"
    progress(f"  {label}: done, {len(result.trials)} evaluations, best {best}, {seconds:.0f} s")
    return Run(agent_name, seed, budget, _anytime(agent), result, seconds)


class SearchStopped(Exception):
    """A search interrupted before its budget: the message to exit with, and its best plan so far (or None)."""

    def __init__(self, message: str, partial: dict | None):
        super().__init__(message)
        self.partial = partial


def partial_best(result: SearchResult, budget: int, seed: int) -> dict | None:
    """An interrupted search's best feasible plan (None when it had none): a known plan, never a reference
    (the run did not reach its budget), so that a plan found late in a long search is not lost."""
    if result.best_trial is None:
        return None
    return {**_summary(result.agent, budget, result.best_trial), "seed": seed, "evaluations": len(result.trials),
            "partial": True}


def keep_partial_best(partial: dict, problem: Problem, label: str) -> str:
    """Keep a partial best in runs/benchmarks/interrupted/ (also without --json); says what and where."""
    folder = runs_dir() / "benchmarks" / "interrupted"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{'-'.join(label.split())}-seed{partial['seed']}.json"
    atomic_write_json(path, {**partial, "problem": problem_key(problem)})
    return f"{partial['objective']:.4g}, is kept in {path} (partial: not a reference)"


def problem_key(problem: Problem) -> str:
    return digest(problem.graph.fingerprint(), problem.scorer.data_digest(), problem.board.digest,
                  problem.measurer.identity(problem.board), repr(problem.constraints), repr(problem.objective))


class ReferenceCache:
    """Best plan per agent at a reference budget (seed 0), per problem, in runs/benchmarks/.
    Several benchmark processes may share the file: each store re-reads it under a lock."""

    def __init__(self, problem: Problem, budget: int, recompute: bool = False):
        self.path = runs_dir() / "benchmarks" / "search_quality_reference.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key = problem_key(problem)
        self.entries = {} if recompute else (read_json(self.path) or {}).get(self.key, {})
        self.budget = budget

    def get(self, agent: str) -> dict | None:
        return self.entries.get(f"{agent}@{self.budget}")

    def store(self, run: Run) -> None:
        """The run's best feasible plan within the reference budget."""
        feasible = [t for t in run.result.trials[:self.budget] if t.evaluation.feasible]
        best = min(feasible, key=lambda t: t.evaluation.objective) if feasible else None
        name = f"{run.agent}@{self.budget}"
        self.entries[name] = _summary(run.agent, self.budget, best)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released on close
            cache = read_json(self.path) or {}
            cache.setdefault(self.key, {})[name] = self.entries[name]
            atomic_write_json(self.path, cache)


def _summary(agent: str, budget: int, best: Trial | None) -> dict:
    e = best.evaluation if best else None
    return {"agent": agent, "budget": budget, "objective": e.objective if e else None,
            "latency_ms": e.latency_ms if e else None, "energy_mj": e.energy_mj if e else None,
            "accuracy_drop": e.accuracy_drop if e else None, "found_at": best.number + 1 if best else None,
            "plan": best.plan.to_json() if best else None}


def _better(summary: dict, other: dict | None) -> bool:
    """Whether a plan summary (objective None: none feasible) should replace another (None: nothing yet)."""
    return other is None or (summary["objective"] is not None
                             and (other["objective"] is None or summary["objective"] < other["objective"]))


def reference_line(report: BoardReport, agents: list[str]) -> str:
    """Which agents' reference searches (seed 0, the largest reference budget) the best known is drawn
    from, and which have not been run: the best known is only as strong as that list."""
    stopped = "".join(f" Stopped early (a known plan, not a reference): {p['agent']} seed {p['seed']}, {p['evaluations']} of "
                      f"{p['budget']} evaluations, best {p['objective']:.4g} (found at evaluation {p['found_at']})."
                      for p in sorted(report.partial, key=lambda p: (p["agent"], p["seed"], p["budget"])))
    if not report.searched:
        return "Reference searches: none in these results." + stopped
    budget = max(report.searched)
    found = report.searched[budget]
    done = [f"{agent} {'none feasible' if found[agent]['objective'] is None else format(found[agent]['objective'], '.4g')}"
            + (f" (found at evaluation {found[agent]['found_at']})" if found[agent].get("found_at") else "")
            for agent in AGENTS if agent in found]
    missing = [agent for agent in agents if agent not in found]
    return (f"Reference searches at {budget} evaluations (seed 0): {', '.join(done)}"
            + (f"; not run: {', '.join(missing)}." if missing else ".") + stopped)


def best_known(report: BoardReport, references: ReferenceCache, agents: list[str]) -> dict | None:
    """The best of the agents' reference searches, of every run (a run may beat the reference) and of the
    searches stopped early."""
    candidates = [references.get(a) for a in agents]
    candidates += [_summary(r.agent, r.budget, r.result.best_trial) for r in report.runs] + report.partial
    candidates = [c for c in candidates if c and c["objective"] is not None]
    return min(candidates, key=lambda c: c["objective"]) if candidates else None


def binding_evidence(report: BoardReport) -> dict | None:
    """A plan that fails only the latency budget yet beats the best known: proof that the budget
    binds. Candidates: every plan the runs saw, and the measured solver's plan without a latency
    budget (solved on a copy of the problem, outside every search's budget)."""
    seen = [t.evaluation for run in report.runs for t in run.result.trials]
    unbounded = Problem(report.problem.graph, report.problem.board, report.problem.measurer, report.problem.scorer,
                        replace(report.problem.constraints, latency_ms=None), report.problem.objective)
    try:
        seen.append(report.problem.evaluate(solve_measured(unbounded).plan))
    except ExplorerError:
        pass
    best = None
    for e in seen:
        if (not e.feasible and all(v.startswith("latency") for v in e.violations)
                and e.objective < report.reference["objective"] and (best is None or e.objective < best.objective)):
            best = e
    return None if best is None else {"objective": best.objective, "latency_ms": best.latency_ms}


def medians(report: BoardReport, agents: list[str], budgets: list[int]) -> dict:
    """agent -> budget -> (median ratio to the best known, seeds with a feasible plan, seeds)."""
    table = {}
    for agent in agents:
        table[agent] = {}
        for budget in budgets:
            values = [r.best_at(budget) / report.reference["objective"] for r in report.runs
                      if r.agent == agent and r.serves(budget)]
            table[agent][budget] = ((statistics.median(values), sum(math.isfinite(v) for v in values), len(values)) if values
                                    else (math.nan, 0, 0))  # not run on this board
    return table


def markdown(reports: list[BoardReport], agents: list[str], budgets: list[int], seeds: list[int], args) -> str:
    lines = [f"Median over {len(seeds)} seeds of the best feasible {args.objective} relative to the best plan known "
             f"(1.000 = the best known; lower is better).", ""]
    for report in reports:
        reference = report.reference
        if reference is None:
            lines += [f"### vgg on {report.board} (sim): no agent found a feasible plan", "", reference_line(report, agents), ""]
            continue
        evidence = report.binds
        binds = (f"binds (a plan of {evidence['latency_ms']:.3f} ms reaches {evidence['objective']:.4g})" if evidence
                 else "not shown to bind (no plan seen that only the latency budget excludes and that beats the best known)")
        lines += [f"### vgg on {report.board} (sim): latency <= {report.latency_budget_ms:.3f} ms, accuracy drop <= "
                  f"{100 * args.max_accuracy_drop:g} point",
                  "",
                  f"Baseline (fp32 on {report.baseline['processor']}): {report.baseline['latency_ms']:.3f} ms, "
                  f"{report.baseline['energy_mj']:.4g} mJ. Best known: {reference['objective']:.4g} "
                  f"({found_by(reference)}, {reference['latency_ms']:.3f} ms, "
                  f"drop {100 * reference['accuracy_drop']:.2f} points). Latency budget: {binds}.",
                  "",
                  reference_line(report, agents),
                  "",
                  "| agent | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        table = medians(report, agents, budgets)
        for agent in agents:
            cells = []
            for budget in budgets:
                ratio, feasible, total = table[agent][budget]
                if total == 0:
                    cells.append("not run")
                    continue
                cell = f"{ratio:.3f}" if math.isfinite(ratio) else "none"
                if feasible < total:
                    cell += f" ({feasible}/{total} feasible)"
                cells.append(cell)
            lines.append(f"| {agent} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def found_by(summary: dict) -> str:
    """Which search found a plan summary: an agent at a budget, or a search stopped before its budget."""
    if summary.get("partial"):
        return (f"{summary['agent']} seed {summary['seed']}, stopped at {summary['evaluations']} of {summary['budget']} "
                f"evaluations")
    return f"{summary['agent']}, budget {summary['budget']}"


def median_curve(runs: list[Run], reference: float) -> list[float]:
    """Median over runs of best-so-far / reference at each evaluation (NaN where most have none feasible)."""
    length = min(len(r.result.best_so_far) for r in runs)
    return [statistics.median(r.result.best_so_far[i] / reference for r in runs) for i in range(length)]


def plot(reports: list[BoardReport], agents: list[str], budgets: list[int], path: str) -> None:
    """One panel per board: median best-so-far curves and the table's medians (PNG); nothing is
    written when no board had a feasible plan."""
    from matplotlib.figure import Figure

    reports = [r for r in reports if r.reference is not None]  # a board where nothing was feasible has no curve
    if not reports:
        return
    figure = Figure(figsize=(6.5 * len(reports), 4.5), dpi=110)
    for index, report in enumerate(reports):
        axes = figure.add_subplot(1, len(reports), index + 1)
        table = medians(report, agents, budgets)
        for agent in agents:
            colour, style, width = AGENT_STYLES.get(agent, ("black", "-", 1.5))
            runs = [r for r in report.runs if r.agent == agent]
            if not runs:  # not run on this board
                continue
            longest = max(r.budget for r in runs)
            curve = median_curve([r for r in runs if r.budget == longest], report.reference["objective"])
            points = [(n + 1, v) for n, v in enumerate(curve) if math.isfinite(v)]
            if points and points[-1][0] < longest:  # an agent that stopped early (solver) keeps its best
                points.append((longest, points[-1][1]))
            if len(points) > 1:
                axes.step(*zip(*points), where="post", color=colour, linestyle=style, linewidth=width, label=agent)
            marks = [(b, table[agent][b][0]) for b in budgets if math.isfinite(table[agent][b][0])]
            if marks:
                axes.plot(*zip(*marks), "o", color=colour, markersize=3 + width, label=None if len(points) > 1 else agent)
            elif not points:
                axes.plot([], [], color=colour, linestyle=":", label=f"{agent} (none feasible)")
        axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axes.set_xscale("log")
        axes.set_xlabel("measured evaluations")
        axes.set_ylabel("best feasible energy / best known (median over seeds)")
        axes.set_title(f"vgg on {report.board} (sim)")
        axes.grid(alpha=0.3)
        axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path)


def dump(reports: list[BoardReport], agents: list[str], budgets: list[int], seeds: list[int], args) -> dict:
    boards = {}
    for report in reports:
        table = medians(report, agents, budgets) if report.reference else None
        boards[report.board] = {
            "latency_budget_ms": report.latency_budget_ms, "baseline": report.baseline, "reference": report.reference,
            "latency_budget_binds": report.binds,
            "reference_searches": {str(budget): found for budget, found in report.searched.items()},
            "partial_searches": report.partial,
            "median_ratio": table and {a: {str(b): table[a][b][0] if math.isfinite(table[a][b][0]) else None for b in budgets} for a in agents},
            "feasible_seeds": table and {a: {str(b): table[a][b][1] for b in budgets} for a in agents},
            "runs": [{"agent": r.agent, "seed": r.seed, "budget": r.budget, "evaluations": len(r.result.trials),
                      "feasible": r.result.feasible_count, "seconds": r.seconds,
                      "best_at": {str(b): (r.best_at(b) if math.isfinite(r.best_at(b)) else None) for b in budgets if b <= r.budget},
                      "best_so_far": [v if math.isfinite(v) else None for v in r.result.best_so_far],
                      "best_plan_digest": r.result.best_plan.digest() if r.result.best_plan else None}
                     for r in report.runs],
        }
    return {"settings": {"model": "vgg", "measurer": "sim", "objective": args.objective, "budgets": budgets,
                         "seeds": seeds, "agents": agents, "reference_budget": args.reference_budget,
                         "max_accuracy_drop": args.max_accuracy_drop, "latency_factor": args.latency_factor,
                         "latency_ms": args.latency_ms},
            "boards": boards}


def load_reports(paths: list[str]) -> tuple[list[BoardReport], dict]:
    """Board reports rebuilt from --json outputs, the runs of all files merged per board, and the
    files' common settings. Exits with one line when a file cannot be read or does not fit."""
    reports: dict[str, BoardReport] = {}
    settings: dict | None = None
    anytime: dict[str, bool] = {}
    same = ("objective", "max_accuracy_drop", "latency_factor", "latency_ms")
    for path in paths:
        try:
            with open(path) as f:
                saved = json.load(f)
            current, boards = saved["settings"], saved["boards"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"search_quality: cannot read {path} ({error}): give files written by --json")
        if settings and any(settings[k] != current[k] for k in same):
            raise SystemExit(f"search_quality: {path} was run with other settings than {paths[0]}; "
                             f"{', '.join(same)} must match")
        settings = settings or current
        for name, board in boards.items():
            report = reports.setdefault(name, BoardReport(name, None, board["latency_budget_ms"], board["baseline"]))
            reference = board["reference"]
            if reference and _better(reference, report.reference):
                report.reference = reference
            evidence = board["latency_budget_binds"]
            if evidence and _better(evidence, report.binds):
                report.binds = evidence
            for budget, found in board.get("reference_searches", {}).items():
                for agent, summary in found.items():
                    if _better(summary, report.searched.setdefault(int(budget), {}).get(agent)):
                        report.searched[int(budget)][agent] = summary
            for partial in board.get("partial_searches", []):
                known = next((p for p in report.partial if (p["agent"], p["seed"], p["budget"])
                              == (partial["agent"], partial["seed"], partial["budget"])), None)
                if known is None or partial["evaluations"] > known["evaluations"]:  # the same search stopped later
                    report.partial = [p for p in report.partial if p is not known] + [partial]
            for run in board["runs"]:
                if any((r.agent, r.seed, r.budget) == (run["agent"], run["seed"], run["budget"]) for r in report.runs):
                    raise SystemExit(f"search_quality: {name} {run['agent']} seed {run['seed']} budget {run['budget']} "
                                     f"is in more than one file; give each run once")
                curve = [math.inf if v is None else v for v in run["best_so_far"]]
                agent = run["agent"]
                anytime.setdefault(agent, is_anytime(agent))
                report.runs.append(Run(agent, run["seed"], run["budget"], anytime[agent],
                                       SearchResult(agent, best_so_far=curve), run["seconds"]))
    for report in reports.values():  # a file's evidence beat that file's best; it must beat the merged best
        if report.binds and (report.reference is None or report.binds["objective"] >= report.reference["objective"]):
            report.binds = None
    return list(reports.values()), settings


def redraw(args) -> None:
    """--from-json: the table (and --plot) from saved runs, without searching."""
    reports, settings = load_reports(args.from_json)
    for key in ("objective", "max_accuracy_drop"):
        setattr(args, key, settings[key])
    present = {r.agent for report in reports for r in report.runs}
    agents = [a for a in AGENTS if a in present]
    seeds = sorted({r.seed for report in reports for r in report.runs})
    print(markdown(reports, agents, settings["budgets"], seeds, args))
    if args.plot:
        plot(reports, agents, settings["budgets"], args.plot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS)
    parser.add_argument("--budgets", nargs="+", type=int, default=[100, 300, 1000])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...); 0: only the reference searches")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds FIRST_SEED..SEEDS-1 only (to add seeds to earlier --json outputs)")
    parser.add_argument("--reference-budget", type=int, help="budget of the reference searches (default 10x the largest)")
    parser.add_argument("--boards", nargs="+", default=["tegra-k1", "snapdragon-800"])
    parser.add_argument("--objective", default="energy")
    parser.add_argument("--latency-factor", type=float, default=1.25, help="latency budget = factor x the baseline's latency")
    parser.add_argument("--latency-ms", type=float, help="explicit latency budget (overrides --latency-factor)")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    parser.add_argument("--recompute-reference", action="store_true", help="ignore the cached reference searches")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the convergence plot here (PNG)")
    parser.add_argument("--from-json", nargs="+", metavar="JSON", help="no search: table and plot from earlier --json outputs")
    args = parser.parse_args()
    if args.from_json:
        return redraw(args)
    budgets = sorted(set(args.budgets))
    if args.seeds < 0 or args.first_seed < 0 or (args.seeds and args.first_seed >= args.seeds):
        raise SystemExit(f"search_quality: --seeds {args.seeds} --first-seed {args.first_seed}: give seeds >= 0 and a first "
                         f"seed below it")
    seeds = list(range(args.first_seed, args.seeds))
    args.reference_budget = args.reference_budget or 10 * budgets[-1]

    graph = load_graph("vgg")
    scorer = AccuracyScorer(graph.model, zoo_validation_data("vgg"))
    reports = []
    for board_name in args.boards:
        problem, latency_budget, baseline = build_problem(graph, scorer, board_name, args)
        report = BoardReport(board_name, problem, latency_budget, baseline)
        references = ReferenceCache(problem, args.reference_budget, args.recompute_reference)
        progress(f"{board_name}: latency budget {latency_budget:.3f} ms (baseline {baseline['latency_ms']:.3f} ms on "
                 f"{baseline['processor']})")
        try:
            run_agents(report, problem, references, seeds, budgets, args)
        except SearchStopped as stopped:  # what finished and the partial best are still worth keeping
            report.partial += [stopped.partial] if stopped.partial else []
            finish_report(report, references, args, check_latency_budget=False)
            if args.json:
                write_json(reports + [report], budgets, seeds, args)
            raise SystemExit(str(stopped) + (f"; what finished, and the partial best, are in {args.json}" if args.json else ""))
        finish_report(report, references, args)
        reports.append(report)
    print(markdown(reports, args.agents, budgets, seeds, args))
    if args.json:
        write_json(reports, budgets, seeds, args)
    if args.plot:
        plot(reports, args.agents, budgets, args.plot)


def run_agents(report: BoardReport, problem: Problem, references: ReferenceCache, seeds: list[int], budgets: list[int],
               args) -> None:
    """Every agent's runs on one board, and its reference search unless one is cached."""
    for agent in args.agents:
        anytime = is_anytime(agent)
        for seed in seeds:
            label = f"{report.board} {agent} seed {seed}"
            if anytime:  # one run read at every budget; seed 0 runs on to the reference budget if needed
                longest = max(budgets[-1], args.reference_budget) if seed == 0 and references.get(agent) is None else budgets[-1]
                report.runs.append(search(agent, problem, longest, seed, label))
            else:
                report.runs += [search(agent, problem, budget, seed, f"{label} budget {budget}") for budget in budgets]
        if references.get(agent) is None:
            reference_run = next((r for r in report.runs if r.agent == agent and r.seed == 0 and r.serves(args.reference_budget)), None)
            references.store(reference_run or search(agent, problem, args.reference_budget, 0, f"{report.board} {agent} reference"))


def finish_report(report: BoardReport, references: ReferenceCache, args, check_latency_budget: bool = True) -> None:
    """The board's reference searches done so far, its best known plan and (unless the benchmark is being
    stopped: that check measures a plan) whether the latency budget binds."""
    report.searched[args.reference_budget] = {a: references.get(a) for a in args.agents if references.get(a) is not None}
    report.reference = best_known(report, references, args.agents)
    if report.reference is None:
        progress(f"{report.board}: no agent found a feasible plan; loosen the constraints")
    elif check_latency_budget:
        report.binds = binding_evidence(report)


def write_json(reports: list[BoardReport], budgets: list[int], seeds: list[int], args) -> None:
    """The results to --json, atomically: a second Ctrl-C while writing leaves the earlier file whole."""
    atomic_write_json(args.json, dump(reports, args.agents, budgets, seeds, args))


if __name__ == "__main__":
    with termination_as_interrupt():  # `kill` stops a long run as Ctrl-C does: its measurements stay cached
        main()
