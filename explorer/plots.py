"""The plots of a search: convergence per agent against the reference plans, and the trade-offs
(latency and accuracy drop against energy) with the feasible Pareto front.

Axes fit the trials: a limit (latency budget, accuracy limit) is drawn only where it falls inside the
range of the data, and otherwise noted on the panel, so that a 5000 ms budget does not squeeze trials
of a few milliseconds into a stripe at x = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from explorer.searching import SearchResult, Trial

#: How far past the data a limit may lie and still be drawn (as a share of the data's span).
LIMIT_MARGIN = 0.5
_AGENT_COLOURS = ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


@dataclass(frozen=True)
class PlotSettings:
    """What the plots need beyond the trials: the objective's axis label (with its unit), the limits,
    and the reference plans to draw as (name, objective)."""

    objective_label: str = "objective (lower is better)"
    latency_budget_ms: float | None = None
    max_accuracy_drop_points: float | None = None
    references: tuple[tuple[str, float], ...] = ()


def staircase(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (both minimised), by the first one: the step line
    of a panel's front (explorer.searching.pareto_front is the trials' front on every metric at once)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _columns(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """The x values and the y values of some points (what matplotlib takes)."""
    return [x for x, _ in points], [y for _, y in points]


def limit_in_range(limit: float | None, values: list[float]) -> bool:
    """Whether a limit lies close enough to the data to be drawn without squeezing it."""
    if limit is None or not values:
        return False
    low, high = min(values), max(values)
    margin = LIMIT_MARGIN * max(high - low, abs(high), 1e-12)
    return low - margin <= limit <= high + margin


def _limit_line(axes: Axes, limit: float | None, values: list[float], label: str, unit: str) -> None:
    """A dashed vertical line at the limit when it is in range, else a note in the panel's corner."""
    if limit is None:
        return
    if limit_in_range(limit, values):
        axes.axvline(limit, color="tab:red", linestyle="--", linewidth=1, label=f"{label} ({limit:g} {unit})")
    elif values:
        side = "right" if limit > max(values) else "left"
        axes.text(0.99 if side == "right" else 0.01, 0.99, f"{label} {limit:g} {unit}: off the chart ({side})",
                  transform=axes.transAxes, ha=side, va="top", fontsize=8, color="tab:red")


def _tradeoff_panel(axes: Axes, result: SearchResult, x_of, x_label: str, limit: float | None, limit_label: str,
                    limit_unit: str) -> None:
    """Energy against one other metric: every trial, the feasible Pareto front, the best plan, the limit."""
    def points(feasible: bool) -> list[tuple[float, float]]:
        return _finite([(x_of(t), t.evaluation.energy_mj) for t in result.trials
                        if t.evaluation.feasible == feasible and x_of(t) is not None])

    feasible, infeasible = points(True), points(False)
    if infeasible:
        axes.scatter(*_columns(infeasible), s=12, marker="x", color="tab:gray", alpha=0.6, label="infeasible")
    if feasible:
        axes.scatter(*_columns(feasible), s=14, color="tab:blue", alpha=0.6, label="feasible")
        front = staircase(feasible)
        axes.step(*_columns(front), where="post", color="tab:orange", linewidth=1.5)
        axes.scatter(*_columns(front), s=40, facecolors="none", edgecolors="tab:orange", label="Pareto front (feasible)")
    best = result.best_trial
    if best is not None and x_of(best) is not None:
        axes.scatter([x_of(best)], [best.evaluation.energy_mj], s=160, marker="*", color="tab:red", zorder=5, label="best")
    _limit_line(axes, limit, [x for x, _ in feasible + infeasible], limit_label, limit_unit)
    if not feasible and not infeasible:
        axes.text(0.5, 0.5, f"no trial has a {x_label.split(' (')[0]}", transform=axes.transAxes, ha="center")
    axes.set_xlabel(x_label)
    axes.set_ylabel("energy (mJ)")
    axes.grid(alpha=0.3)
    if feasible or infeasible:
        axes.legend(loc="best", fontsize=8)


def _accuracy_drop_points(trial: Trial) -> float | None:
    drop = trial.evaluation.accuracy_drop
    return None if drop is None else 100 * drop


def pareto_figure(result: SearchResult, settings: PlotSettings = PlotSettings()) -> Figure:
    """Two panels: latency against energy, and accuracy drop (points) against energy."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5), dpi=110)
    latency_axes, accuracy_axes = figure.subplots(1, 2)
    _tradeoff_panel(latency_axes, result, lambda t: t.evaluation.latency_ms, "latency (ms)",
                    settings.latency_budget_ms, "latency budget", "ms")
    _tradeoff_panel(accuracy_axes, result, _accuracy_drop_points, "accuracy drop (points)",
                    settings.max_accuracy_drop_points, "accuracy limit", "points")
    figure.suptitle(f"{result.agent}: {len(result.trials)} trials, {result.feasible_count} feasible")
    figure.tight_layout()
    return figure


def convergence_figure(result: SearchResult, settings: PlotSettings = PlotSettings()) -> Figure:
    """Every trial's objective and each agent's best feasible so far against measured evaluations, with
    the reference plans (what a user would try without the tool) as horizontal lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4.8), dpi=110)
    axes = figure.add_subplot()
    numbered = list(enumerate(result.trials, start=1))
    for feasible, colour, label in ((True, "tab:blue", "feasible trial"), (False, "tab:gray", "infeasible trial")):
        points = _finite([(n, t.evaluation.objective) for n, t in numbered if t.evaluation.feasible == feasible])
        if points:
            axes.scatter(*_columns(points), s=10, alpha=0.5, color=colour, label=label, marker="o" if feasible else "x")
    agents = list(dict.fromkeys(t.agent for t in result.trials))
    for agent, colour in zip(agents, _AGENT_COLOURS * (1 + len(agents) // len(_AGENT_COLOURS))):
        best, curve = math.inf, []
        for n, trial in numbered:
            if trial.agent == agent and trial.evaluation.feasible and trial.evaluation.objective < best:
                best = trial.evaluation.objective
            if math.isfinite(best):
                curve.append((n, best))
        if curve:
            axes.step(*zip(*curve), where="post", color=colour, linewidth=2, label=f"best feasible so far: {agent}")
    for (name, objective), style in zip(settings.references, ("--", ":", "-.") * len(settings.references)):
        if math.isfinite(objective):
            axes.axhline(objective, color="black", linestyle=style, linewidth=1, alpha=0.7, label=f"{name}: {objective:.4g}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("measured evaluations")
    axes.set_ylabel(settings.objective_label)
    axes.set_title(f"{result.agent}: convergence")
    axes.grid(alpha=0.3)
    if numbered or settings.references:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.tight_layout()
    return figure


def pareto_plot(result: SearchResult, path: Path, settings: PlotSettings = PlotSettings()) -> Path:
    """pareto_figure saved as a PNG."""
    pareto_figure(result, settings).savefig(path)
    return Path(path)


def convergence_plot(result: SearchResult, path: Path, settings: PlotSettings = PlotSettings()) -> Path:
    """convergence_figure saved as a PNG."""
    convergence_figure(result, settings).savefig(path)
    return Path(path)
