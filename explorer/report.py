"""What the user sees: the terminal's tables and progress bars, a search's summary (the same figures in the
terminal, the MLflow parent run and the benchmarks: the reference plans, the plan the agent was seeded with, the
best plan found, its gains and its confirmation) and the `--json` objects of scripts."""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from explorer.accuracy import SYNTHETIC_LABEL, AccuracyScorer, drop_text, rungs_within_bound, sensitivity_table
from explorer.boards import Board, board_names, load_board
from explorer.compress import Compressor
from explorer.graph import LayerGraph
from explorer.plan import Plan
from explorer.plots import PlotSettings
from explorer.problem import Evaluation, Problem
from explorer.screening import Screen
from explorer.zoo import ZOO, cached_metrics

#: The command's output (stderr with --json, whose stdout holds the JSON object alone).
console = Console(width=None if sys.stdout.isatty() else 140)
#: Progress, warnings and errors.
err_console = Console(stderr=True)

#: How the gain of one plan over another reads, by objective.
_GAIN_WORDS = {"latency": "faster", "energy": "less energy", "memory": "less weight memory"}
#: The unit of each single-metric objective.
_UNITS = {"latency": "ms", "energy": "mJ", "memory": "MB"}


@dataclass(frozen=True)
class Gain:
    """How much better `best` is than a reference on the objective: reference / best (> 1: better)."""

    reference: str
    ratio: float

    def text(self, problem: Problem) -> str:
        words = _GAIN_WORDS.get(problem.objective.single or "", "lower objective")
        return f"{self.ratio:.2f}x {words} than {self.reference}"


def _measured(result) -> dict[str, Evaluation]:
    """The search's evaluations by plan digest (failed trials left out)."""
    return {trial.plan.digest(): trial.evaluation for trial in result.trials if not trial.failed}


def summary_rows(problem: Problem, result) -> list[tuple[str, Evaluation]]:
    """(name, Evaluation) of every reference plan measured in the search, the solver plan the agent was
    seeded with (where it used one and measured it) and the best plan found, in that order."""
    measured = _measured(result)
    rows = [(name, measured[plan.digest()]) for name, plan in problem.reference_plans() if plan.digest() in measured]
    if result.seed_plan is not None and result.seed_plan.digest() in measured:
        rows.append((f"solver plan (DAD/RLC; {result.agent} started from it)", measured[result.seed_plan.digest()]))
    if result.best is not None:
        rows.append((f"best found by {result.agent}", result.best))
    return rows


def gains(problem: Problem, result) -> list[Gain]:
    """The best plan's gain over the best feasible reference plan and over the fp32 baseline (the
    uncompressed model on the best single processor), where they were measured and are feasible."""
    best = result.best
    if best is None:
        return []
    measured = _measured(result)
    references = [(name, measured[plan.digest()]) for name, plan in problem.reference_plans()
                  if plan.digest() in measured and measured[plan.digest()].feasible]
    if not references:
        return []
    name, reference = min(references, key=lambda item: item[1].objective)
    found = [Gain(f"the best reference ({name})", reference.objective / max(best.objective, 1e-12))]
    baseline = measured.get(problem.baseline_plan().digest())
    if baseline is not None and baseline.feasible and baseline is not reference:
        found.append(Gain("the fp32 baseline", baseline.objective / max(best.objective, 1e-12)))
    return found


#: How many of a search's best plans are confirmed (with the best reference and the baseline).
CONFIRM_TOP = 5


def confirmation_candidates(problem: Problem, result) -> list[tuple[str, Plan]]:
    """(name, Plan) to confirm: the search's best CONFIRM_TOP feasible plans and the best feasible reference."""
    names = {plan.digest(): name for name, plan in problem.reference_plans()}
    if result.seed_plan is not None:
        names.setdefault(result.seed_plan.digest(), "solver plan")
    feasible = sorted((t for t in result.trials if t.evaluation.feasible), key=lambda t: t.evaluation.objective)
    chosen: dict[str, tuple[str, Plan]] = {}
    for trial in feasible:
        if len(chosen) == CONFIRM_TOP:
            break
        chosen.setdefault(trial.plan.digest(), (names.get(trial.plan.digest(), f"trial {trial.number}"), trial.plan))
    best_reference = next((t for t in feasible if t.source == "reference"), None)
    if best_reference is not None:
        chosen.setdefault(best_reference.plan.digest(), (names[best_reference.plan.digest()], best_reference.plan))
    return list(chosen.values())


def _interval(ci: tuple[float, float] | None, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "[too few rounds]"


def confirmation_rows(confirmation, names: dict[str, str]) -> list[list[str]]:
    """Table rows of a confirmation: plan, latency ms [95 % interval], energy mJ, objective ratio to the
    baseline [interval], feasible, and the latency the search had recorded."""
    rows = []
    for p in confirmation.plans:
        name = "baseline (fp32)" if p.is_baseline else names.get(p.plan.digest(), p.plan.digest()[:12])
        searched = f"{p.searched.latency_ms:.3f}" if p.searched is not None else "-"
        rows.append([name, f"{p.latency_ms:.3f} {_interval(p.latency_ci_ms)}", f"{p.energy_mj:.3f}",
                     f"{p.ratio:.3f} {_interval(p.ratio_ci)}", "yes" if p.feasible else "no", searched])
    return rows


CONFIRMATION_COLUMNS = ("plan", "latency ms [95 %]", "energy mJ", "objective / baseline [95 %]", "feasible",
                        "latency ms in the search")


def confirmed_headline(problem: Problem, confirmation, names: dict[str, str], search_best_digest: str | None) -> str:
    """One sentence: the best confirmed plan and its gain over the baseline and the best confirmed reference."""
    best = confirmation.best()
    where = " (simulated: the simulator's noise, not a hardware measurement)" if confirmation.simulated else ""
    if best is None:
        return "confirmation: no plan was feasible when measured again" + where
    words = _GAIN_WORDS.get(problem.objective.single or "", "lower objective")
    if best.is_baseline:
        text = f"confirmed: no plan beat the fp32 baseline when measured again interleaved with it{where}"
    else:
        low, high = (1 / best.ratio_ci[1], 1 / best.ratio_ci[0]) if best.ratio_ci else (None, None)
        interval = f" (95 % interval {low:.2f}-{high:.2f}x)" if low else ""
        text = (f"confirmed: {names.get(best.plan.digest(), 'the best plan')} is {1 / best.ratio:.2f}x {words} than "
                f"the fp32 baseline{interval}")
        reference_digests = {plan.digest() for _, plan in problem.reference_plans()}
        references = [p for p in confirmation.plans if p.feasible and p.plan.digest() in reference_digests]
        reference = min(references, key=lambda p: p.ratio) if references else None
        if reference is not None and reference is not best and not reference.is_baseline:
            text += f", {reference.ratio / best.ratio:.2f}x than the best reference ({names[reference.plan.digest()]})"
        text += where
    if search_best_digest is not None and search_best_digest != best.plan.digest():
        text += "; the search's own best lost on confirmation and is not reported as the best"
    return text


def confirmed_figures(confirmation: dict | None, plan) -> dict | None:
    """What a bundle records of a search's confirmation for `plan`: its confirmed figures, the baseline's and
    how they were measured (None when the plan was not confirmed)."""
    if not confirmation:
        return None
    entries = {entry["plan_digest"]: entry for entry in confirmation["plans"]}
    entry = entries.get(plan.digest())
    if entry is None:
        return None
    baseline = next(e for e in confirmation["plans"] if e["baseline"])
    return {"plan": entry, "baseline": baseline, "measured_by": confirmation["measured_by"],
            "simulated": confirmation["simulated"], "busy": confirmation["busy"], "seconds": confirmation["seconds"]}


def objective_label(problem: Problem) -> str:
    """The objective as an axis label with its unit, e.g. 'energy (mJ)'."""
    single = problem.objective.single
    if single:
        return f"{single} ({_UNITS[single]})"
    return f"{problem.objective.describe()} (relative to the baseline)"


def plot_settings(problem: Problem, result) -> PlotSettings:
    """The search's plots' labels and limits, with the fp32 baseline and the best feasible reference plan
    the search measured (the lines to beat)."""
    measured = _measured(result)
    references = [(name, measured[plan.digest()].objective) for name, plan in problem.reference_plans()
                  if plan.digest() in measured and measured[plan.digest()].feasible]
    shown = references[:1]  # the baseline comes first
    best = min(references, key=lambda item: item[1], default=None)
    if best is not None and best not in shown:
        shown.append((f"best reference: {best[0]}", best[1]))
    drop = problem.constraints.max_accuracy_drop
    return PlotSettings(objective_label=objective_label(problem), latency_budget_ms=problem.constraints.latency_ms,
                        max_accuracy_drop_points=None if drop is None else 100 * drop, references=tuple(shown))


def change_text(value: float, baseline: float | None) -> str:
    """A figure's change against the baseline's in percent, e.g. '+72%' (slower, more) or '-12%'."""
    if baseline is None or not baseline or value != value:
        return ""
    change = 100 * (value / baseline - 1)
    return "±0%" if abs(change) < 0.5 else f"{change:+.0f}%"


def with_change(value: float, baseline: float | None, digits: int = 3) -> str:
    """'1.402 (+72%)': a figure and its change against the baseline (nothing added for the baseline itself)."""
    change = change_text(value, baseline)
    return f"{value:.{digits}f}" + (f" ({change})" if change and value != baseline else "")


def drop_cell(e: Evaluation) -> str:
    """An evaluation's accuracy drop for a table cell: 'drop 1.45 pts', '~' marking an estimate on synthetic
    inputs, never a bare 0.00 for one ('no change seen')."""
    if e.accuracy_drop is None:
        return "accuracy not measured"
    if e.accuracy_basis != SYNTHETIC_LABEL:
        return f"drop {100 * e.accuracy_drop:.2f} pts"
    return "no change seen" if abs(e.accuracy_drop) < 5e-5 else f"drop ~{100 * e.accuracy_drop:.2f} pts est."


def constraint_lines(problem: Problem, evaluation: Evaluation | None) -> list[str]:
    """Each limit of the problem and, for `evaluation` (the best plan), how close it comes: 'latency <= 5000
    ms: 1.402 ms, 0.03 % of the limit'. Drops are in points."""
    c = problem.constraints
    lines = []
    if c.latency_ms is not None:
        line = f"latency <= {c.latency_ms:g} ms"
        if evaluation is not None:
            line += f": {evaluation.latency_ms:.3f} ms, {100 * evaluation.latency_ms / c.latency_ms:.3g} % of the limit"
        lines.append(line)
    if c.max_accuracy_drop is not None:
        line = f"accuracy drop <= {100 * c.max_accuracy_drop:g} pts"
        if evaluation is not None and evaluation.accuracy_drop is not None:
            headroom = 100 * (c.max_accuracy_drop - evaluation.accuracy_drop)
            line += f": {drop_cell(evaluation)}, {headroom:.2f} pts below the limit"
        elif evaluation is not None:
            line += ": accuracy not measured"
        lines.append(line)
    if c.memory_mb is not None:
        line = f"weights <= {c.memory_mb:g} MB"
        if evaluation is not None:
            line += f": {evaluation.memory_mb:.3f} MB, {100 * evaluation.memory_mb / c.memory_mb:.3g} % of the limit"
        lines.append(line)
    return lines


def processor_legend(board) -> list[str]:
    """What each processor id of the board is, e.g. 'lpc: low-power companion Cortex-A15 core ...'."""
    return [f"{p.id}{'' if p.id == p.kind else f' ({p.kind})'}: {p.description}" for p in board.processors.values()]


def evaluation_json(e: Evaluation, baseline: Evaluation | None = None) -> dict:
    """An evaluation for scripts (`--json`): units in the key names, accuracy in percent, drops in points,
    and, with `baseline`, each figure's change against it in percent."""
    figures = {"latency_ms": e.latency_ms, "latency_spread_ms": e.latency_spread_ms, "energy_mj": e.energy_mj,
               "memory_mb": e.memory_mb}
    data: dict[str, Any] = figures | {
        "energy_source": e.energy_source, "peak_memory_mb": e.peak_memory_mb,
        "accuracy_percent": None if e.accuracy is None else 100 * e.accuracy, "accuracy_metric": e.accuracy_metric,
        "accuracy_drop_points": None if e.accuracy_drop is None else 100 * e.accuracy_drop,
        "accuracy_basis": e.accuracy_basis or None, "objective": e.objective, "feasible": e.feasible,
        "violations": list(e.violations), "measured_by": e.measured_by, "plan_digest": e.plan_digest,
        "error": e.error}
    if baseline is not None:
        data["change_vs_baseline_percent"] = {
            key: 100 * (value / getattr(baseline, key) - 1) if getattr(baseline, key) else None
            for key, value in figures.items() if key != "latency_spread_ms"}
    return data


def constraints_json(problem: Problem) -> dict:
    """The problem's limits for scripts (the accuracy drop in points; null: no limit)."""
    c = problem.constraints
    return {"latency_ms": c.latency_ms, "memory_mb": c.memory_mb,
            "max_accuracy_drop_points": None if c.max_accuracy_drop is None else 100 * c.max_accuracy_drop}


# ---- the terminal ---------------------------------------------------------------------------------
def emit_json(data: dict) -> None:
    """`--json`: the command's one JSON object on stdout (the human text went to stderr)."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def fmt_count(value: float) -> str:
    """A count with its SI prefix: 1.23G, 4.50M, 12.00k, 7."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def zoo_note(model_name: str) -> None:
    """The zoo's note on an untrained model (its figures say little about accuracy)."""
    entry = ZOO.get(model_name)
    if entry is not None and not entry.trained:
        console.print(f"[yellow]note:[/] {entry.name}: {entry.note}")


def print_models() -> None:
    """The built-in model zoo."""
    table = Table(title="Built-in model zoo (figures of the reference build: fp32, ONNX Runtime)")
    for column in ("name", "input", "trained", "params", "MB", "MFLOPs", "top-1 % (10k test / 2k val)", "description",
                   "note"):
        table.add_column(column, overflow="fold")
    for entry in ZOO.values():
        top1 = f"{entry.top1_test:.2f} / {entry.top1_subset:.2f}" if entry.top1_test is not None else "-"
        note = entry.note
        if entry.recipe is not None and entry.shipped_file is None:
            built = cached_metrics(entry.recipe)
            note += (f"; built here: {built['test_top1_points']:.2f} / {built['subset_top1_points']:.2f} %" if built
                     else "; not built here yet")
        table.add_row(entry.name, "x".join(map(str, entry.input_shape)), "yes" if entry.trained else "no",
                      fmt_count(entry.params) if entry.params else "-",
                      f"{entry.size_mb:.1f}" if entry.size_mb is not None else "-",
                      f"{entry.mflops:.1f}" if entry.mflops is not None else "-", top1, entry.description, note)
    console.print(table)
    console.print("Your own model: --model path/to/model.onnx --data val.npz (arrays x and optional integer labels y)")


def print_layers(graph: LayerGraph, compressor: Compressor, errors: bool) -> None:
    """Per-layer table of a model: op, shapes, FLOPs, params and the compression rungs offered (`errors`: with
    each rung's reconstruction error)."""
    table = Table(title=f"{graph.source}: {len(graph.layers)} decision layers, {fmt_count(graph.total_flops)}FLOPs, "
                        f"{fmt_count(graph.total_params)} params (batch {graph.feed_shape()[0]})")
    for column in ("#", "layer", "op", "input", "output", "weight", "FLOPs", "params", "travels with", "offered rungs"):
        table.add_column(column, overflow="fold")
    for layer in graph.layers:
        rungs = compressor.ladder_with_errors(layer.name) if errors else compressor.ladder(layer.name)
        offered = ", ".join(r.label() + (f" ({r.rel_error:.2f})" if errors and r.method != "full" else "")
                            for r in rungs[1:]) or ("kept (grouped)" if not layer.factorisable else "none saves")
        attached = [graph.node_by_name[n].op_type for n in layer.node_names if n != layer.name]
        table.add_row(str(layer.index), layer.name, layer.op_type, "x".join(map(str, layer.input_shape)),
                      "x".join(map(str, layer.output_shape)), "x".join(map(str, layer.weight_shape)),
                      fmt_count(layer.all_flops), fmt_count(layer.params), " ".join(attached), offered)
    console.print(table)
    if errors:
        console.print("rung (x.xx) = relative Frobenius reconstruction error of the layer's weights")


def sensitivity_status(scorer: AccuracyScorer) -> str:
    """What the sensitivity table's progress bar says it is."""
    if scorer.synthetic:
        return "sensitivity table (estimated on synthetic inputs once per model, then cached)"
    return "sensitivity table (measured once per model and data, then cached)"


def sensitivity_with_progress(graph: LayerGraph, compressor: Compressor, scorer: AccuracyScorer,
                              description: str = "sensitivity table"):
    """The sensitivity table with a progress bar (count, rate, ETA); on Ctrl-C it says what was kept."""
    state = {"done": 0, "total": 0}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            if not state["total"]:  # the first call: entries resumed from an interrupted run, not a rate
                progress.reset(task, total=total, completed=done, rate="")
            else:
                speed = progress.tasks[0].speed
                progress.update(task, completed=done, rate=f"{speed:.2f} entries/s" if speed else "")
            state.update(done=done, total=total)

        try:
            return sensitivity_table(graph, compressor, scorer, progress=update)
        except KeyboardInterrupt:
            if state["total"]:
                err_console.print(f"sensitivity table: {state['done']} of {state['total']} entries are kept; "
                                  "run the same command again to measure only the rest")
            raise


def print_sensitivity(graph: LayerGraph, compressor: Compressor, scorer: AccuracyScorer, table) -> None:
    """The sensitivity table: the accuracy drop of each layer's rungs alone, per precision."""
    view = Table(title=f"Accuracy drop (points of {table.metric}) when one layer alone is compressed; "
                       f"uncompressed {100 * table.baseline:.2f}% on {scorer.dataset.source if scorer.dataset else scorer.label}"
                       + (" (estimates, not measured)" if scorer.synthetic else ""))
    view.add_column("layer")
    view.add_column("rung")
    for precision in ("fp32", "fp16", "int8"):
        view.add_column(precision, justify="right")
    for layer in graph.layers:  # on synthetic inputs the table holds the rungs within the reconstruction-error bound
        for rung in rungs_within_bound(compressor, layer.name) if scorer.synthetic else compressor.ladder(layer.name):
            cells = [_sensitivity_cell(table.drop(layer.name, rung.method, rung.rank, p), rung.method == "full" and p == "fp32",
                                       scorer.synthetic) for p in ("fp32", "fp16", "int8")]
            view.add_row(layer.name, rung.label(), *cells)
    console.print(view)


def _sensitivity_cell(drop: float, reference: bool, synthetic: bool) -> str:
    """A sensitivity-table cell in points; an estimate on synthetic inputs never reads 0.00."""
    if reference:
        return "reference"
    if synthetic and abs(drop) < 5e-5:
        return "none seen"
    return f"{100 * drop:+.2f}"


def print_boards() -> None:
    """The board profiles, one line each."""
    table = Table(title="Board profiles (targets/*.toml)")
    for column in ("name", "processors", "memory", "description"):
        table.add_column(column, overflow="fold")
    for name in board_names():
        board = load_board(name)
        table.add_row(name, ", ".join(f"{p.id} ({p.kind})" for p in board.processors.values()),
                      f"{board.memory.size_mb:g} MB, {board.memory.bandwidth_gbps:g} GB/s", board.description)
    console.print(table)
    console.print("`explorer boards NAME` shows one; `explorer calibrate` measures this machine as board `host`")


def print_board(board: Board) -> None:
    """One board profile: its processors and transfer paths."""
    console.print(f"[bold]{board.name}[/]: {board.description}\n{board.path}")
    table = Table(title="processors")
    for column in ("id", "kind", "cores x GHz", "peak GFLOP/s", "efficiency", "memory", "power active/idle",
                   "launch", "ONNX Runtime provider", "threads"):
        table.add_column(column, overflow="fold")
    for p in board.processors.values():
        table.add_row(p.id, p.kind, f"{p.cores} x {p.clock_ghz:g}",
                      " ".join(f"{k}={v:g}" for k, v in p.peak_gflops.items()),
                      " ".join(f"{k}={v:g}" for k, v in p.efficiency.items()),
                      f"{p.memory_mb:g} MB, {p.bandwidth_gbps:g} GB/s", f"{p.active_power_w:g} / {p.idle_power_w:g} W",
                      f"{p.launch_overhead_us:g} us", p.provider, str(p.threads))
    console.print(table)
    links = Table(title="transfer paths")
    for column in ("between", "via", "bandwidth", "latency", "energy"):
        links.add_column(column)
    for link in board.links:
        links.add_row(" - ".join(link.between), link.via, f"{link.bandwidth_gbps:g} GB/s", f"{link.latency_us:g} us",
                      f"{link.energy_nj_per_byte:g} nJ/B + {link.energy_uj_per_transfer:g} uJ")
    console.print(links)


def print_evaluation(evaluation: Evaluation, title: str) -> None:
    """Per-block table and totals of one evaluation."""
    table = Table(title=title)
    for column in ("block", "processor", "layers", "latency ms", "spread ms", "transfer in ms", "energy mJ", "weights MB"):
        table.add_column(column, overflow="fold")
    for b in evaluation.blocks:
        layers = b.layers[0] if len(b.layers) == 1 else f"{b.layers[0]} .. {b.layers[-1]} ({len(b.layers)})"
        table.add_row(str(b.index), b.processor, layers, f"{b.latency_ms:.3f}", f"{b.spread_ms:.3f}",
                      f"{b.transfer_ms:.3f}", f"{b.energy_mj:.3f}", f"{b.weight_mb:.3f}")
    console.print(table)
    console.print(f"latency {evaluation.latency_ms:.3f} ms (spread {evaluation.latency_spread_ms:.3f}), "
                  f"energy {evaluation.energy_mj:.3f} mJ ({evaluation.energy_source}), weights {evaluation.memory_mb:.2f} MB"
                  + (f", peak resident memory {evaluation.peak_memory_mb:.0f} MB" if evaluation.peak_memory_mb else ""))
    console.print(f"accuracy: {evaluation.accuracy_text()}")
    if evaluation.accuracy_basis:
        console.print(f"[yellow]accuracy basis:[/] {evaluation.accuracy_basis}")
    status = "[green]feasible[/]" if evaluation.feasible else "[red]infeasible:[/] " + "; ".join(evaluation.violations)
    console.print(f"{status}\nmeasured by: {evaluation.measured_by}")


def print_plan(problem: Problem, plan, title: str) -> None:
    """Per-layer table of a plan: rung, precision, processor, params and FLOPs."""
    table = Table(title=title)
    for column in ("#", "layer", "op", "rung", "precision", "processor", "params", "FLOPs"):
        table.add_column(column)
    for (name, decision), layer in zip(plan.decisions, problem.graph.layers):
        rung = problem.compressor.rung(name, decision.method, decision.rank)
        table.add_row(str(layer.index), name, layer.op_type, rung.label(), decision.precision, decision.processor,
                      fmt_count(rung.params), fmt_count(rung.flops))
    console.print(table)


def print_comparison(rows: list[tuple[str, Evaluation]], baseline: Evaluation | None = None,
                     objective_column: bool = True) -> None:
    """Side-by-side metrics of several evaluations: (name, Evaluation); with `baseline`, each figure's change
    against it in percent; `objective_column=False` where the objective is one of the figures shown."""
    bases = sorted({e.accuracy_basis for _, e in rows if e.accuracy_basis})
    table = Table(title="evaluated through Problem.evaluate" + (f"; accuracy: {', '.join(bases)}" if bases else "")
                        + ("; (+N%): change against the fp32 baseline" if baseline is not None else ""))
    for column in ("plan", "latency ms", "energy mJ", "weights MB", "accuracy", "feasible") + ("objective",) * objective_column:
        table.add_column(column, no_wrap=column == "plan")  # the figures may wrap, a plan's name reads whole
    for name, e in rows:
        accuracy = ("not measured" if e.accuracy is None else f"{100 * e.accuracy:.2f} %"
                    + (f" {e.accuracy_metric}" if e.accuracy_basis else "") + f" ({drop_cell(e)})")
        figures = [with_change(getattr(e, key), getattr(baseline, key) if baseline is not None else None)
                   for key in ("latency_ms", "energy_mj", "memory_mb")]
        table.add_row(name, *figures, accuracy, "yes" if e.feasible else "no: " + "; ".join(e.violations),
                      *([f"{e.objective:.4g}"] if objective_column else []))
    console.print(table)


def print_limits(problem: Problem, best: Evaluation | None) -> None:
    """The constraints and how close the best plan (an Evaluation, or None) comes to each; what each
    processor id is."""
    lines = constraint_lines(problem, best)
    if lines:
        console.print(("constraints (the best plan):\n  " if best is not None else "constraints:\n  ") + "\n  ".join(lines),
                      highlight=False)
    console.print("processors:\n  " + "\n  ".join(processor_legend(problem.board)), highlight=False)


def print_plan_set(path: Path) -> None:
    """The plans of an exported bundle: figures, what they need, their roles."""
    manifest = json.loads((path / "plan.json").read_text())
    table = Table(title=f"plan set: {len(manifest['plans'])} plans, {len(manifest['files']) - 1} unit-block files "
                        f"({sum(len(p['blocks']) for p in manifest['plans'])} blocks in all, shared ones stored once)")
    for column in ("plan", "description", "latency ms", "energy mJ", "weights MB on board", "accuracy drop (points)",
                   "network", "roles", "figures"):
        table.add_column(column, overflow="fold")
    for p in manifest["plans"]:
        f, network = p["figures"], p["needs"]["network"]
        drop = f"{f['accuracy_drop_points']:.2f}" if f["accuracy_drop_points"] is not None else "not measured"
        table.add_row(p["id"], p["description"], f"{f['latency_ms']:.3f}", f"{f['energy_mj']:.3f}",
                      f"{f['local_memory_mb']:.2f}", drop,
                      f"{network['rtt_ms']:g} ms, {network['bandwidth_mbit_s']:g} Mbit/s" if network else "none",
                      ", ".join(p["roles"]), f["source"] + (" (simulated)" if f["simulated"] else ""))
    console.print(table)


def print_solution(problem: Problem, result, rows: list[tuple[str, Evaluation]]) -> None:
    """The solver's plan, the cost model's prediction, its rounds against the reference plans (`rows`) and the
    limits (`result`: the solver's measured result)."""
    solution = chosen_solution(result)
    print_plan(problem, result.plan, f"solver plan for {problem.graph.source} on {problem.board.name} "
                                     f"(objective: {problem.objective.describe()})")
    console.print(f"cost model: {problem.cost_model_note}")
    console.print(f"predicted by the cost model: latency {solution.latency_s * 1e3:.3f} ms, "
                  f"energy {solution.energy_j * 1e3:.3f} mJ, weights {solution.weight_bytes / 2**20:.3f} MB, "
                  f"{_solver_accuracy_text(problem, solution)}; {solution.status} in {solution.seconds:.2f} s")
    print_comparison(rows, problem.baseline(), objective_column=problem.objective.single is None)
    checked = round_predictions(result)
    if checked:
        console.print("the rounds' plans measured beside the kernel table's reference plan, at its typical speed: "
                      + "; ".join(f"round {r['round']} {r['latency_ms_at_typical_speed']:.3f} ms, predicted "
                                  f"{r['predicted_latency_ms']:.3f} ms ({100 * r['prediction_error']:+.1f} %)"
                                  for r in checked), soft_wrap=True, highlight=False)
    evaluation = result.evaluation
    print_limits(problem, evaluation if result.feasible else None)
    if not result.feasible:
        console.print("[red]no solver round was feasible when evaluated[/]: the additive model is too optimistic here; "
                      "loosen the constraints or let a search agent take over")
    console.print(f"measured by: {evaluation.measured_by}")
    if not problem.scorer.measured or problem.scorer.synthetic:
        console.print(f"[yellow]{problem.scorer.label}[/]")


def round_predictions(result) -> list[dict]:
    """Each solver round whose plan was measured at the kernel table's typical speed: predicted against measured."""
    rounds = []
    for number, (solution, _) in enumerate(result.rounds, 1):
        error = result.prediction_error(solution)
        if error is not None:
            rounds.append({"round": number, "predicted_latency_ms": solution.latency_s * 1e3,
                           "latency_ms_at_typical_speed": result.typical_s[solution.plan.digest()] * 1e3,
                           "prediction_error": error})
    return rounds


def chosen_solution(result):
    """The solver round whose plan was chosen."""
    return next(s for s, _ in result.rounds if s.plan == result.plan)


def _solver_accuracy_text(problem: Problem, solution) -> str:
    """The solver's additive accuracy-drop estimate, said for what it is."""
    dataset = problem.scorer.dataset
    if not problem.scorer.measured or dataset is None:
        return "accuracy drop not estimated (no data)"
    drop = drop_text(solution.accuracy_drop, problem.scorer.basis, len(dataset.x))
    return f"additive accuracy estimate: {drop}"


def print_solve_confirmation(problem: Problem, result, confirmation, at_typical: tuple[float, float] | None = None) -> None:
    """The solver's plan confirmed against the reference plans (interleaved), and its prediction against that."""
    figures = solve_confirmation_json(problem, result, confirmation, at_typical)
    typical = ""
    if figures.get("latency_ms_at_typical_speed") is not None:
        typical = (f"; at the device's typical speed {figures['latency_ms_at_typical_speed']:.3f} ms "
                   f"({100 * figures['prediction_error_at_typical_speed']:+.1f} %; measured beside the table's reference "
                   f"plan, which took {figures['device_speed']:.2f}x its typical time)")
    console.print(f"confirmed ({confirmation.measured_by}): solver plan {figures['latency_ms']:.3f} ms, predicted "
                  f"{figures['predicted_latency_ms']:.3f} ms ({100 * figures['prediction_error']:+.1f} %){typical}; "
                  f"best reference "
                  f"{figures['best_reference']} {figures['best_reference_latency_ms']:.3f} ms "
                  f"({'no worse' if figures['no_worse_than_references'] else '[red]the reference is better[/]'} on "
                  f"{problem.objective.describe()})", soft_wrap=True)


def solve_confirmation_json(problem: Problem, result, confirmation, at_typical: tuple[float, float] | None = None) -> dict:
    """Confirmed latency of the solver's plan, its prediction error and the best feasible reference plan; with
    `at_typical` (kernels.at_typical_speed: the plan's seconds at the table's typical speed, and the device's speed
    then), the prediction's error against that too."""
    by_digest = {p.plan.digest(): p for p in confirmation.plans}
    chosen = by_digest[result.plan.digest()]
    references = [(name, by_digest[plan.digest()]) for name, plan in problem.reference_plans()]
    feasible = [(name, p) for name, p in references if p.evaluation.feasible] or references
    name, best = min(feasible, key=lambda item: item[1].ratio)
    predicted_ms = chosen_solution(result).latency_s * 1e3
    typical_ms, speed = (at_typical[0] * 1e3, at_typical[1]) if at_typical else (None, None)
    return {"latency_ms": chosen.latency_ms, "latency_ci_ms": chosen.latency_ci_ms, "predicted_latency_ms": predicted_ms,
            "prediction_error": predicted_ms / chosen.latency_ms - 1, "best_reference": name,
            "best_reference_latency_ms": best.latency_ms, "objective_ratio_to_best_reference": chosen.ratio / best.ratio,
            "no_worse_than_references": chosen.ratio <= best.ratio, "measured_by": confirmation.measured_by,
            "latency_ms_at_typical_speed": typical_ms, "device_speed": speed,
            "prediction_error_at_typical_speed": predicted_ms / typical_ms - 1 if typical_ms else None}


def solve_json(problem: Problem, result, rows: list[tuple[str, Evaluation]], out: str | None,
               confirmation=None, at_typical: tuple[float, float] | None = None) -> dict:
    """`explorer solve --json`: the plan, the cost model's prediction, the evaluation and the rounds."""
    solution, baseline = chosen_solution(result), problem.baseline()
    return {"command": "solve", "model": problem.graph.source, "board": problem.board.name,
            "objective": problem.objective.describe(), "constraints": constraints_json(problem),
            "feasible": result.feasible, "plan": result.plan.to_json(),
            "predicted": {"cost_model": problem.cost_model_note,
                          "latency_ms": solution.latency_s * 1e3, "energy_mj": solution.energy_j * 1e3,
                          "memory_mb": solution.weight_bytes / 2**20, "status": solution.status,
                          "solve_seconds": solution.seconds,
                          "accuracy_drop_points": 100 * solution.accuracy_drop if problem.scorer.measured else None},
            "evaluation": evaluation_json(result.evaluation, baseline),
            "rows": [{"name": name} | evaluation_json(e, baseline) for name, e in rows], "out": out,
            "round_predictions": round_predictions(result),
            "confirmed": solve_confirmation_json(problem, result, confirmation, at_typical) if confirmation is not None
            else None}


def print_zoo_training(path: Path, metrics: dict) -> None:
    """What `explorer zoo train` built: the file, its accuracy, its size and how it was trained."""
    console.print(f"wrote {path} ({metrics['onnx_bytes'] / 1e6:.2f} MB, sha256 {metrics['sha256'][:16]})")
    console.print(f"top-1: {metrics['test_top1_points']:.2f} % on the 10,000 Fashion-MNIST test images, "
                  f"{metrics['subset_top1_points']:.2f} % on the shipped 2,000-image subset (fp32, ONNX Runtime)")
    console.print(f"{metrics['parameters']:,} parameters, {metrics['decision_layers']} decision layers, "
                  f"{metrics['mflops']:.2f} MFLOPs per image; {metrics['epochs']} epochs, seed {metrics['seed']}, "
                  f"trained in {metrics['train_seconds']:.0f} s (torch {metrics['torch']})")
    if metrics["same_as_before"] is not None:
        console.print("same bytes as the file it replaced" if metrics["same_as_before"]
                      else "the bytes differ from the file it replaced")


# ---- a search in the terminal ---------------------------------------------------------------------
@contextmanager
def search_progress(problem: Problem, description: str, total: int) -> Iterator[SearchProgress]:
    """A search's progress bar on stderr (count, time, best so far); stopped when the block ends."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"), console=err_console)
    with bar:
        yield SearchProgress(problem, bar, bar.add_task(description, total=total, status=""))


@dataclass
class SearchProgress:
    """The progress bar of one search: `trial(result)` after each trial, `done(n, status)` from a supervisor."""

    problem: Problem
    bar: Progress
    task: object

    def trial(self, result) -> None:
        best = (f"best {self.problem.objective.describe()} {result.best.objective:.4g}" if result.best
                else "no feasible plan yet")
        failed = sum(t.failed for t in result.trials)
        self.bar.update(self.task, completed=len(result.trials),  # type: ignore[arg-type]  # rich's TaskID is an int
                        status=f"{best} | feasible {result.feasible_count}" + (f" | failed {failed}" if failed else "")
                        + (f" | predicted {len(result.predicted)}" if result.predicted else ""))

    def done(self, completed: int, status: str) -> None:
        self.bar.update(self.task, completed=completed, status=status)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.bar.stop()


def print_interrupted(problem: Problem, result, run_id: str) -> None:
    """What an interrupted search kept: how far it got, its MLflow run and its best plan so far."""
    best = result.best
    err_console.print(f"[yellow]interrupted[/] after {len(result.trials)} evaluations; "
                      f"the MLflow run {run_id} is marked KILLED and keeps every logged trial")
    if result.predicted:
        err_console.print(f"{len(result.predicted)} more plans were answered with the kernel table's prediction (screening)")
    if best:
        err_console.print(f"best so far: {problem.objective.describe()} {best.objective:.4g} "
                          f"(latency {best.latency_ms:.3f} ms, energy {best.energy_mj:.3f} mJ)")


def print_search_figures(problem: Problem, result, rows: list[tuple[str, Evaluation]], baseline: Evaluation | None,
                         found_gains: list[Gain]) -> None:
    """A finished search against the reference plans: the comparison, the limits, the gains, the failed trials."""
    print_comparison(rows, baseline, objective_column=problem.objective.single is None)
    print_limits(problem, result.best)
    if found_gains:
        console.print("in the search: " + "; ".join(gain.text(problem) for gain in found_gains))
    if result.screening:
        console.print(screening_text(result))
    failed = sum(t.failed for t in result.trials)
    if failed:
        console.print(f"[yellow]{failed} trial(s) failed[/]: no measurement server could measure them "
                      "(see the FAILED child runs in MLflow)")


def print_confirmation(confirmation, names: dict[str, str], headline: str) -> None:
    """The confirmation table (the plans measured again interleaved with the baseline) and its headline."""
    table = Table(title=f"confirmed: measured again interleaved with the baseline ({confirmation.baseline.rounds} rounds, "
                        f"{confirmation.seconds:.1f} s{', machine busy' if confirmation.busy else ''})")
    for column in CONFIRMATION_COLUMNS:
        table.add_column(column)
    for row in confirmation_rows(confirmation, names):
        table.add_row(*row)
    console.print(table)
    console.print(headline)


def print_best_plan(problem: Problem, result, best_plan, baseline: Evaluation | None) -> None:
    """The best plan's table (or what to loosen when none was feasible), what measured it, the accuracy basis."""
    if best_plan is None:
        console.print("[red]no feasible plan found[/]: loosen --latency-ms, --max-accuracy-drop or --memory-mb, "
                      "or raise --budget")
    else:
        print_plan(problem, best_plan, f"best plan ({len(result.trials)} evaluations, {result.feasible_count} feasible)")
    measured = result.best or baseline
    if measured is not None:
        console.print(f"measured by: {measured.measured_by}")
    if problem.scorer.synthetic:
        console.print(f"[yellow]accuracy: {problem.scorer.label}[/]")


# ---- a search's summary ---------------------------------------------------------------------------
def screening_text(result) -> str:
    """Both counts of a screened search (explorer.screening): plans measured on the device, plans answered with the
    kernel table's prediction."""
    return (f"screening: {len(result.trials)} plans measured on the device, {len(result.predicted)} answered with the "
            "kernel table's prediction instead (not measured: never best, confirmed or exported)")


def summary_markdown(problem: Problem, agent: str, rows: list[tuple[str, Evaluation]], found_gains: list[Gain],
                     headline: str | None, result, baseline: Evaluation | None = None) -> str:
    """The search summary logged to MLflow as summary.md and as the parent run's description."""
    lines = [f"# {agent} search: {problem.graph.source} on {problem.board.name}", "",
             f"Objective: minimise {problem.objective.describe()}.",
             f"Accuracy: {problem.scorer.label}.",
             f"{len(result.trials)} measured evaluations, {result.feasible_count} feasible.", ""]
    if result.screening:
        lines += [screening_text(result)[0].upper() + screening_text(result)[1:] + ".",
                  f"The rule: {result.screening}.", ""]
    if headline:
        lines += [headline[0].upper() + headline[1:] + ".", ""]
    if found_gains:
        lines += ["In the search (single measurements): " + "; ".join(gain.text(problem) for gain in found_gains) + ".", ""]
    limits = constraint_lines(problem, result.best)
    if limits:
        lines += ["Constraints" + (" and the best plan's figures:" if result.best is not None else ":"), ""]
        lines += [f"- {line}" for line in limits] + [""]
    lines += ["(+N%): change against the fp32 baseline.", "",
              "| plan | latency ms | energy mJ | weights MB | accuracy | feasible | measured by |",
              "|---|---|---|---|---|---|---|"]
    for name, e in rows:
        figures = " | ".join(with_change(getattr(e, key), getattr(baseline, key) if baseline is not None else None)
                             for key in ("latency_ms", "energy_mj", "memory_mb"))
        lines.append(f"| {name} | {figures} | {e.accuracy_text()} | {'yes' if e.feasible else 'no'} | {e.measured_by} |")
    if result.best_plan is not None:
        lines += ["", "| layer | decision |", "|---|---|"] + [f"| {n} | {d.label()} |" for n, d in result.best_plan.decisions]
    lines += ["", "Processors:", ""] + [f"- {line}" for line in processor_legend(problem.board)]
    return "\n".join(lines) + "\n"


def ended_early_markdown(summary: str, evaluations: int, budget: int, why: str) -> str:
    """The summary with, after its title, why the search ended before its budget."""
    return summary.replace("\n\n", f"\n\n**Ended early** after {evaluations} of {budget} evaluations: {why}\n\n", 1)


def confirmed_metrics(found_gains: list[Gain], confirmed) -> dict[str, float]:
    """The parent run's metrics of a summary: the gains, and the best confirmed plan's figures (those it has)."""
    metrics: dict[str, float | None] = {
        f"gain_over_{'best_reference' if i == 0 else 'baseline'}": gain.ratio for i, gain in enumerate(found_gains)}
    if confirmed:
        metrics |= {"confirmed_ratio_to_baseline": confirmed.ratio, "confirmed_latency_ms": confirmed.latency_ms,
                    "confirmed_energy_mj": confirmed.energy_mj,
                    "confirmed_accuracy_percent": 100 * confirmed.evaluation.accuracy
                    if confirmed.evaluation.accuracy is not None else None,
                    "confirmed_accuracy_drop_points": 100 * confirmed.evaluation.accuracy_drop
                    if confirmed.evaluation.accuracy_drop is not None else None}
        if confirmed.ratio_ci:
            metrics |= {"confirmed_ratio_low": confirmed.ratio_ci[0], "confirmed_ratio_high": confirmed.ratio_ci[1]}
    return {name: value for name, value in metrics.items() if value is not None}


def search_json(problem: Problem, agent: str, result, baseline: Evaluation | None, *, headline: str | None = None,
                confirmation=None, best_plan=None, ended: str | None = None, interrupted: bool = False) -> dict:
    """A search for scripts (`explorer search --json`): its figures, gains, confirmation and best plan; an
    interrupted one's has what it found so far (no confirmation) and `"interrupted": true`. Without a measured
    `baseline` (interrupted before it) there are no rows or gains: the reference plans are not measured after Ctrl-C."""
    rows = summary_rows(problem, result) if baseline is not None else []
    confirmed = confirmation.best() if confirmation else None
    best_plan = best_plan if best_plan is not None else result.best_plan
    return {"command": "search", "model": problem.graph.source, "board": problem.board.name, "agent": agent,
            "objective": problem.objective.describe(), "constraints": constraints_json(problem),
            "interrupted": interrupted, "evaluations": len(result.trials), "feasible_evaluations": result.feasible_count,
            "failed_evaluations": sum(t.failed for t in result.trials), "predicted_evaluations": len(result.predicted),
            "screening": f"on: {result.screening}" if result.screening else Screen.setting(problem),
            "ended_early": ended, "headline": headline,
            "gains": [{"over": gain.reference, "ratio": gain.ratio}
                      for gain in (gains(problem, result) if baseline is not None else [])],
            "confirmed": None if not confirmed else {
                "plan_digest": confirmed.plan.digest(), "ratio_to_baseline": confirmed.ratio,
                "ratio_to_baseline_95": list(confirmed.ratio_ci) if confirmed.ratio_ci else None,
                "latency_ms": confirmed.latency_ms, "energy_mj": confirmed.energy_mj,
                "accuracy_drop_points": None if confirmed.evaluation.accuracy_drop is None
                else 100 * confirmed.evaluation.accuracy_drop,
                "simulated": confirmation.simulated},
            "best_plan": best_plan.to_json() if best_plan else None,
            "best": evaluation_json(result.best, baseline) if result.best else None,
            "rows": [{"name": name} | evaluation_json(e, baseline) for name, e in rows]}


# ---- kernel tables (explorer profile) ---------------------------------------------------------------
@contextmanager
def profile_progress(problem: Problem) -> Iterator:
    """A progress bar (plans, rate, ETA) for `explorer.kernels.profile`; yields its `progress` callback. On Ctrl-C
    it says what was kept and how to go on."""
    state = {"done": 0, "total": 0, "start": 0}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(f"kernel table of {problem.graph.source} (designed plans)", total=None)

        def update(done: int, total: int) -> None:
            if not state["total"]:  # the first call: plans measured before (a resumed profile), not a rate
                progress.reset(task, total=total, completed=done)
                state["start"] = done
            else:
                progress.update(task, completed=done)
            state.update(done=done, total=total)

        try:
            yield update
        except KeyboardInterrupt:
            kept = state["done"] - state["start"]
            err_console.print(f"interrupted: {kept} plan(s) measured now are kept ({state['done']} of {state['total']} in "
                              "all); the same command goes on from there", soft_wrap=True)
            raise


def print_profile(problem: Problem, result, held_out=None) -> None:
    """What `explorer profile` measured, the table it gives for this model, and where it is kept."""
    counts = result.table.counts()
    console.print(f"measured {result.measured} designed plan(s) ({result.blocks_now} blocks) in {result.seconds:.0f} s"
                  + (f"; {result.recalled} were measured before" if result.recalled else "")
                  + (f"; [red]{result.failed} failed[/]" if result.failed else ""))
    console.print(f"kernel table of {result.table.device.fingerprint}, ONNX Runtime {result.table.device.onnxruntime}: "
                  f"{counts['layer']} layer, {counts['merge']} merge, {counts['pair']} pair and {counts['edge']} edge terms "
                  f"fitted to {result.table.blocks} measured blocks (every model profiled on this device); "
                  f"{result.table.pressure_note()}", soft_wrap=True)
    console.print(f"kept in {result.store.path}", soft_wrap=True)
    if held_out is not None:
        console.print(f"held-out check, {len(held_out.plan_errors)} random plans ({len(held_out.block_errors)} blocks) "
                      f"measured now: {100 * held_out.within(held_out.block_errors, 0.10):.0f} % of blocks and "
                      f"{100 * held_out.within(held_out.plan_errors, 0.10):.0f} % of plans within +/-10 % of the table's "
                      f"prediction ({100 * held_out.within(held_out.plan_errors, 0.25):.0f} % of plans within +/-25 %; "
                      f"measured as the table was, beside the reference plan, at the typical speed; the device ran at "
                      f"{held_out.speed:.2f}x its typical time meanwhile)",
                      soft_wrap=True)


def profile_json(problem: Problem, result, held_out=None) -> dict:
    check = None if held_out is None else {
        "plans": len(held_out.plan_errors), "blocks": len(held_out.block_errors), "speed": held_out.speed,
        "blocks_within_10": held_out.within(held_out.block_errors, 0.10),
        "plans_within_10": held_out.within(held_out.plan_errors, 0.10),
        "plans_within_25": held_out.within(held_out.plan_errors, 0.25)}
    return {"check": check, "command": "profile", "model": problem.graph.source, "board": problem.board.name,
            "device": result.table.device.fingerprint, "onnxruntime": result.table.device.onnxruntime,
            "plans_measured": result.measured, "plans_before": result.recalled, "plans_failed": result.failed,
            "blocks_measured": result.blocks_now, "seconds": result.seconds, "terms": result.table.counts(),
            "blocks_fitted": result.table.blocks, "cache_pressure_per_mb": result.table.pressure,
            "store": str(result.store.path)}
