"""benchmarks/search_quality.py: an interrupted search is no run of the table nor a reference search, but
its best plan so far is kept as a partial known plan (in runs/ and in the --json output, which the merge
counts for the best known), so that a plan found late in a long reference search is not lost."""
import json
import sys

import pytest
from netbuild import mlp, random_inputs

from benchmarks import search_quality
from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.paths import runs_dir
from explorer.problem import Constraints, Objective, Problem
from explorer.searching import SearchResult, Trial


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
def test_an_interrupted_search_keeps_its_best_plan_as_partial(monkeypatch, feasible):
    problem = _problem()
    plans = [problem.baseline_plan()] if feasible else []
    monkeypatch.setattr(search_quality, "new_agent", lambda name: InterruptedAgent(plans))
    seed = 3 if feasible else 4
    with pytest.raises(search_quality.SearchStopped) as stopped:
        search_quality.search("random", problem, 100, seed, "tegra-k1 random reference")
    kept = runs_dir() / "benchmarks" / "interrupted" / f"tegra-k1-random-reference-seed{seed}.json"
    assert "interrupted during tegra-k1 random reference" in str(stopped.value)
    if not feasible:
        assert "best so far" not in str(stopped.value) and not kept.exists() and stopped.value.partial is None
        return
    assert str(kept) in str(stopped.value)
    saved = json.loads(kept.read_text())
    best = problem.evaluate(plans[0])
    assert saved["partial"] is True and saved["seed"] == seed and (saved["budget"], saved["evaluations"]) == (100, 1)
    assert saved["objective"] == pytest.approx(best.objective) and saved["plan"] == plans[0].to_json()
    assert saved["problem"] == search_quality.problem_key(problem)
    assert stopped.value.partial == {k: v for k, v in saved.items() if k != "problem"}


def test_an_interrupted_benchmark_writes_what_finished_and_the_partial_best_to_its_json(monkeypatch, tmp_path):
    problem = _problem()
    plan = problem.baseline_plan()
    monkeypatch.setattr(search_quality, "load_graph", lambda name: problem.graph)
    monkeypatch.setattr(search_quality, "zoo_validation_data", lambda name: None)
    monkeypatch.setattr(search_quality, "AccuracyScorer", lambda model, data: problem.scorer)
    baseline = {"processor": "cpu", "latency_ms": 1.0, "energy_mj": 3.0, "memory_mb": 1.0}
    monkeypatch.setattr(search_quality, "build_problem", lambda graph, scorer, board, args: (problem, 2.0, baseline))
    monkeypatch.setattr(search_quality, "new_agent", lambda name: InterruptedAgent([plan]))
    out = tmp_path / "partial.json"
    monkeypatch.setattr(sys, "argv", ["search_quality.py", "--seeds", "0", "--reference-budget", "50", "--agents",
                                      "random", "--boards", "tegra-k1", "--recompute-reference", "--json", str(out)])
    with pytest.raises(SystemExit) as stopped:
        search_quality.main()
    assert "interrupted during tegra-k1 random reference after" in str(stopped.value) and str(out) in str(stopped.value)
    board = json.loads(out.read_text())["boards"]["tegra-k1"]
    objective = problem.evaluate(plan).objective
    assert board["runs"] == [] and board["reference_searches"] == {"50": {}}
    assert [(p["agent"], p["seed"], p["budget"], p["evaluations"]) for p in board["partial_searches"]] == [("random", 0, 50, 1)]
    assert board["reference"]["partial"] is True and board["reference"]["objective"] == pytest.approx(objective)
