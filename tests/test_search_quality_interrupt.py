"""benchmarks/search_quality.py: an interrupted search records nothing as a result, but keeps its best plan
so far as a partial known plan (so that a plan found late in a long reference search is not lost)."""
import json

import pytest

from agents.base import SearchResult, Trial
from benchmarks import search_quality
from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.paths import runs_dir
from explorer.problem import Constraints, Objective, Problem
from netbuild import mlp, random_inputs


def _problem() -> Problem:
    graph = LayerGraph(mlp())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 200), None, "random inputs"))
    return Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=0), scorer,
                   Constraints(latency_ms=None, max_accuracy_drop=0.05), Objective.parse("energy"))


class InterruptedAgent:
    """Measures the given plans, then stops as a Ctrl-C makes every agent stop: result marked interrupted."""

    name = "random"
    anytime = True

    def __init__(self, plans):
        self.plans = plans

    def search(self, problem, budget, seed, callback=None) -> SearchResult:
        result = SearchResult(self.name, interrupted=True)
        for number, plan in enumerate(self.plans):
            trial = Trial(number, plan, problem.evaluate(plan), self.name, "test", 0.0)
            result.trials.append(trial)
            if trial.evaluation.feasible and (result.best_trial is None
                                              or trial.evaluation.objective < result.best.objective):
                result.best_trial = trial
        return result


@pytest.mark.parametrize("feasible", [True, False])
def test_an_interrupted_search_keeps_its_best_plan_as_partial_and_records_nothing(monkeypatch, feasible):
    problem = _problem()
    plans = [problem.baseline_plan()] if feasible else []
    monkeypatch.setattr(search_quality, "new_agent", lambda name: InterruptedAgent(plans))
    seed = 3 if feasible else 4
    with pytest.raises(SystemExit) as stopped:
        search_quality.search("random", problem, 100, seed, "tegra-k1 random reference")
    kept = runs_dir() / "benchmarks" / "interrupted" / f"tegra-k1-random-reference-seed{seed}.json"
    assert "interrupted during tegra-k1 random reference" in str(stopped.value)
    if not feasible:
        assert "best so far" not in str(stopped.value) and not kept.exists()
        return
    assert str(kept) in str(stopped.value)
    saved = json.loads(kept.read_text())
    best = problem.evaluate(plans[0])
    assert saved["partial"] is True and saved["seed"] == seed and saved["budget"] == 1
    assert saved["objective"] == pytest.approx(best.objective) and saved["plan"] == plans[0].to_json()
    assert saved["problem"] == search_quality.problem_key(problem)
