"""What a search's summary says: the reference plans, the plan the agent was seeded with, the best plan
found, and the gain over the best reference and over the fp32 baseline (the same figures in the terminal,
the MLflow parent run and the benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass

from explorer.plots import PlotSettings
from explorer.problem import Evaluation, Problem

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


def confirmation_candidates(problem: Problem, result) -> list[tuple[str, object]]:
    """(name, Plan) to confirm: the search's best CONFIRM_TOP feasible plans and the best feasible reference."""
    names = {plan.digest(): name for name, plan in problem.reference_plans()}
    if result.seed_plan is not None:
        names.setdefault(result.seed_plan.digest(), "solver plan")
    feasible = sorted((t for t in result.trials if t.evaluation.feasible), key=lambda t: t.evaluation.objective)
    chosen: dict[str, tuple[str, object]] = {}
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
    from explorer.accuracy import SYNTHETIC_LABEL

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
    data = figures | {
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
