"""The search's plots fit their data, carry units, and show the agents and reference plans."""
import numpy as np
import pytest
from netbuild import random_inputs, small_cnn

from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.plots import PlotSettings, convergence_figure, limit_in_range, pareto_figure
from explorer.problem import Constraints, Objective, Problem
from explorer.report import objective_label, plot_settings
from explorer.searching import BudgetedProblem


def make_problem(latency_ms: float | None) -> Problem:
    graph = LayerGraph(small_cnn())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 64), None, "random inputs"))
    return Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=0), scorer,
                   Constraints(latency_ms=latency_ms, max_accuracy_drop=0.05), Objective.parse("energy"))


@pytest.fixture(scope="module")
def searched():
    """A problem with the default 5000 ms budget (far above every trial) and a search on it that measured
    the reference plans first."""
    problem = make_problem(5000.0)
    budgeted = BudgetedProblem(problem, 16, "random")
    rng = np.random.default_rng(0)
    while budgeted.remaining:
        budgeted.evaluate(problem.random_plan(rng))
    return problem, budgeted.result


def test_the_latency_axis_fits_the_trials_when_the_budget_is_far_off(searched):
    problem, result = searched
    latency_axes, accuracy_axes = pareto_figure(result, plot_settings(problem, result)).axes
    latencies = [t.evaluation.latency_ms for t in result.trials]
    low, high = latency_axes.get_xlim()
    assert low <= min(latencies) and max(latencies) <= high
    assert high < 10 * max(latencies), "a 5000 ms budget line would stretch the axis"
    assert "off the chart" in " ".join(text.get_text() for text in latency_axes.texts)
    assert latency_axes.get_xlabel() == "latency (ms)" and latency_axes.get_ylabel() == "energy (mJ)"
    assert accuracy_axes.get_xlabel() == "accuracy drop (points)"


def test_a_budget_within_the_data_is_drawn():
    assert limit_in_range(1.0, [0.8, 1.2])
    assert limit_in_range(1.3, [0.8, 1.2])
    assert not limit_in_range(5000.0, [0.8, 1.2])
    assert not limit_in_range(None, [0.8, 1.2])


def test_convergence_plot_has_units_agents_and_reference_lines(searched):
    problem, result = searched
    settings = plot_settings(problem, result)
    assert settings.references, "the search measured the reference plans"
    axes = convergence_figure(result, settings).axes[0]
    assert axes.get_ylabel() == "energy (mJ)" == objective_label(problem)
    labels = axes.get_legend_handles_labels()[1]
    assert "best feasible so far: random" in labels
    assert settings.references[0][0] == "fp32 on cpu (baseline)"
    for name, objective in settings.references[1:]:  # only where a reference beats the baseline
        assert name.startswith("best reference: ") and objective < settings.references[0][1]
    assert all(any(label.startswith(name) for label in labels) for name, _ in settings.references)


def test_a_weighted_objective_is_labelled_relative_to_the_baseline():
    problem = make_problem(5000.0)
    problem.objective = Objective.parse("energy:0.7,latency:0.3")
    assert objective_label(problem) == "0.7 x energy/baseline + 0.3 x latency/baseline (relative to the baseline)"


def test_plots_of_a_search_without_trials_draw():
    from explorer.searching import SearchResult
    empty = SearchResult(agent="random")
    assert len(pareto_figure(empty, PlotSettings(latency_budget_ms=5.0)).axes) == 2
    assert convergence_figure(empty).axes[0].get_ylabel() == "objective (lower is better)"
