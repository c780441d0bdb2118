"""Problem.evaluate: validation, caching (memory and disk), feasibility, accuracy by ranks only, host measurement."""
import numpy as np
import pytest
from boardbuild import write_board
from netbuild import random_inputs, small_cnn

from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.compress import decision_for
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.measure import HostMeasurer, SimMeasurer
from explorer.plan import Decision
from explorer.problem import Constraints, Objective, Problem


def _problem(board="tegra-k1", constraints=Constraints(), measurer=None, objective="energy"):
    graph = LayerGraph(small_cnn())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 100), None, "random inputs"))
    board = load_board(board) if isinstance(board, str) else board
    return Problem(graph, board, measurer or SimMeasurer(), scorer, constraints, Objective.parse(objective))


def test_evaluate_reports_everything_and_caches():
    problem = _problem()
    plan = problem.random_plan(np.random.default_rng(0))
    evaluation = problem.evaluate(plan)
    assert evaluation.latency_ms > 0 and evaluation.energy_mj > 0 and evaluation.memory_mb > 0
    assert "simulated" in evaluation.measured_by and evaluation.energy_source == "simulated"
    assert evaluation.accuracy is not None and evaluation.accuracy_metric == "agreement"
    assert evaluation.blocks and sum(len(b.layers) for b in evaluation.blocks) == len(problem.graph.layers)
    assert problem.evaluations == 1
    assert problem.evaluate(plan) is evaluation and problem.evaluations == 1
    fresh = _problem()  # a new process would read the disk cache
    again = fresh.evaluate(plan)
    assert fresh.evaluations == 0 and again.latency_ms == evaluation.latency_ms


def test_accuracy_depends_on_ranks_and_precisions_not_placement():
    problem = _problem()
    plan = problem.uniform_plan("cpu")
    layer = problem.graph.layers[1].name
    low = problem.compressor.ladder(layer)[1]
    on_cpu = plan.with_decision(layer, decision_for(low, "fp32", "cpu"))
    on_gpu = plan.with_decision(layer, decision_for(low, "fp32", "gpu"))
    a, b = problem.evaluate(on_cpu), problem.evaluate(on_gpu)
    assert a.accuracy == b.accuracy and a.latency_ms != b.latency_ms
    assert len(problem._accuracy_cache) == 1


def test_invalid_plans_get_one_clear_error():
    problem = _problem()
    plan = problem.uniform_plan("cpu")
    layer = problem.graph.layers[0].name
    with pytest.raises(ExplorerError, match="does not run int8"):
        problem.evaluate(plan.with_decision(layer, Decision(precision="int8", processor="gpu")))
    with pytest.raises(ExplorerError, match="did you mean 'gpu'"):
        problem.evaluate(plan.with_decision(layer, Decision(processor="gpuu")))
    with pytest.raises(ExplorerError, match="has no processor"):
        problem.evaluate(plan.with_decision(layer, Decision()))


def test_feasibility_names_the_failed_constraint():
    problem = _problem(constraints=Constraints(latency_ms=1e-6, max_accuracy_drop=None, memory_mb=0.001))
    evaluation = problem.evaluate(problem.uniform_plan("cpu"))
    assert not evaluation.feasible
    assert any("latency" in v for v in evaluation.violations)
    assert any("weight memory" in v for v in evaluation.violations)


def test_baseline_is_the_best_single_processor_uncompressed_fp32():
    problem = _problem(objective="latency")
    candidates = problem.baseline_candidates()
    assert {plan.decisions[0][1].processor for plan, _ in candidates} == {"cpu", "lpc", "gpu"}
    best_plan, best = candidates[0]
    assert best.latency_ms == min(e.latency_ms for _, e in candidates)
    assert all(d.method == "full" and d.precision == "fp32" for _, d in best_plan.decisions)


def test_weighted_objective_is_relative_to_the_baseline():
    problem = _problem(objective="energy:0.5,latency:0.5")
    assert problem.baseline().objective == pytest.approx(1.0)


def test_interrupted_cache_write_leaves_the_cache_readable():
    problem = _problem()
    plans = [problem.random_plan(np.random.default_rng(seed)) for seed in (5, 6)]
    first = problem.evaluate(plans[0])
    with open(problem.cache_file(), "ab") as handle:  # as if killed in the middle of the next write
        handle.write(b'{"key":"' + plans[1].digest().encode() + b'","value":{"latency_ms":1.')
    fresh = _problem()
    assert fresh.evaluate(plans[0]).latency_ms == first.latency_ms and fresh.evaluations == 0
    assert fresh.evaluate(plans[1]).latency_ms > 0 and fresh.evaluations == 1
    again = _problem()
    assert again.evaluate(plans[1]).latency_ms > 0 and again.evaluations == 0  # torn line skipped, new one read


def test_host_measurement_is_real_and_repeatable(tmp_path):
    board = load_board(str(write_board(tmp_path / "hostlike.toml", ["cpu", "cpu1"], threads=[2, 1])))
    problem = _problem(board=board, measurer=HostMeasurer(warmup=2, repeats=15))
    problem.use_disk_cache = False
    plan = problem.uniform_plan("cpu")
    plan = plan.with_decision(problem.graph.layers[3].name, Decision(processor="cpu1"))
    first = problem.evaluate(plan)
    problem._memory_cache.clear()
    second = problem.evaluate(plan)
    assert "host" in first.measured_by and first.latency_ms > 0 and first.latency_spread_ms >= 0
    assert len(first.blocks) == 3 and all(b.latency_ms > 0 for b in first.blocks)
    assert first.peak_memory_mb is None or first.peak_memory_mb > 10
    assert "modelled" in first.energy_source or "RAPL" in first.energy_source
    # repeatable: the two medians agree within half the value or a few spreads (the machine may be busy)
    assert abs(second.latency_ms - first.latency_ms) <= max(0.5 * first.latency_ms, 4 * first.latency_spread_ms)


def test_host_measurement_refuses_boards_it_cannot_run():
    problem = _problem(measurer=HostMeasurer())
    with pytest.raises(ExplorerError, match="CUDAExecutionProvider"):
        problem.evaluate(problem.uniform_plan("gpu"))


def test_without_data_compressed_rungs_within_the_error_bound_are_valid():
    graph = LayerGraph(small_cnn())
    problem = Problem(graph, load_board("tegra-k1"), SimMeasurer(), AccuracyScorer(graph.model, None), error_bound=0.9)
    layer = graph.layers[4]
    allowed = problem.rungs(layer)
    assert len(allowed) > 1
    plan = problem.uniform_plan("cpu").with_decision(layer.name, decision_for(allowed[1], "fp32", "cpu"))
    evaluation = problem.evaluate(plan)
    assert evaluation.accuracy is None and "not measured" in evaluation.accuracy_text()
    problem.random_plan(np.random.default_rng(0))


def test_every_constraint_has_one_excess_that_feasibility_violations_reward_and_optuna_read():
    from explorer.agents.optuna_agents import constraint_values
    from explorer.envs.deploy import plan_reward

    problem = _problem(constraints=Constraints(latency_ms=1e-3, max_accuracy_drop=0.0, memory_mb=1e-4))
    evaluation = problem.evaluate(problem.uniform_plan("cpu", "int8"))
    kinds = [(e.kind, e.subject) for e in evaluation.excess]
    assert kinds == [("latency", "latency"), ("accuracy_drop", "accuracy drop"), ("memory", "weight memory"),
                     ("memory", "cpu"), ("memory", "board memory")]
    broken = [e for e in evaluation.excess if e.broken]
    assert not evaluation.feasible and len(evaluation.violations) == len(broken) >= 2
    assert all(e.relative > 0 for e in broken) and all(e.relative <= 0 for e in evaluation.excess if not e.broken)
    assert evaluation.total_excess == pytest.approx(sum(e.relative for e in broken))
    assert plan_reward(evaluation, 1.0) == pytest.approx(-1 - np.log1p(evaluation.total_excess))
    values = constraint_values(evaluation)
    assert values[0] == evaluation.worst_excess("latency") > 0 and values[2] == evaluation.worst_excess("memory") > 0
    loose = _problem(constraints=Constraints(latency_ms=None, max_accuracy_drop=None)).evaluate(problem.uniform_plan("cpu"))
    assert loose.feasible and [e.subject for e in loose.excess] == ["cpu", "board memory"] and loose.total_excess == 0
    assert constraint_values(loose) == [0.0, 0.0, loose.worst_excess("memory"), 0.0]
