"""The DAD/RLC integer program: exact against brute force, sensible placements, clear infeasibility."""
import itertools
import re

import numpy as np
import pytest
from boardbuild import write_board
from netbuild import mlp, random_inputs, redundant_mlp, small_cnn
from test_solver_boundary import Grid, check

from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.highs import _highs_debug_prints_hidden, _libc
from explorer.measure import SimMeasurer
from explorer.milp import Choice, Instance, picks_for, predicted, solve
from explorer.plan import Decision
from explorer.problem import Constraints, Objective, Problem
from explorer.solver import solve_problem

PROCESSORS = ["cpu", "gpu", "dsp"]


def _random_instance(rng: np.random.Generator, layers=4, rungs=3, precisions=("fp32", "int8")) -> Instance:
    speed = {p: rng.uniform(0.5, 2.0) for p in PROCESSORS}
    power = {p: rng.uniform(0.5, 3.0) for p in PROCESSORS}
    choices = []
    for _ in range(layers):
        base = rng.uniform(1e-3, 5e-3)
        options = []
        for r in range(rungs):
            for p in PROCESSORS:
                for precision in precisions:
                    shrink = (1 - 0.3 * r) * (0.6 if precision == "int8" else 1.0)
                    latency = base * shrink / speed[p] * rng.uniform(0.8, 1.2)
                    drop = (0.01 * r + (0.005 if precision == "int8" else 0)) * rng.uniform(0.5, 1.5)
                    options.append(Choice(Decision("svd" if r else "full", 8 * r or None, precision, p), latency,
                                          latency * power[p], 1e6 * shrink, drop))
        choices.append(options)
    transfer = [{(a, b): (rng.uniform(0, 2e-3), rng.uniform(0, 4e-3)) for a in PROCESSORS for b in PROCESSORS if a != b}
                for _ in range(layers - 1)]
    entry = {p: (0.0, 0.0) if p == "cpu" else (rng.uniform(0, 1e-3), rng.uniform(0, 1e-3)) for p in PROCESSORS}
    exit_ = {p: (0.0, 0.0) if p == "cpu" else (rng.uniform(0, 1e-3), rng.uniform(0, 1e-3)) for p in PROCESSORS}
    metric = rng.choice(["energy", "latency", "memory"])
    return Instance(
        layer_names=[f"l{i}" for i in range(layers)], choices=choices, processors=PROCESSORS, transfer=transfer,
        entry=entry, exit=exit_, capacity_bytes={p: rng.uniform(1.5e6, 4e6) for p in PROCESSORS},
        local=set(PROCESSORS), local_capacity_bytes=rng.uniform(2.5e6, 4.5e6),
        latency_budget_s=rng.uniform(4e-3, 2e-2), accuracy_limit=rng.uniform(0.005, 0.06),
        memory_limit_bytes=rng.uniform(2e6, 4e6) if rng.random() < 0.5 else None, weights={str(metric): 1.0},
    )


def test_solver_matches_brute_force_on_random_instances():
    """The verdict, the returned plan's feasibility (totals recomputed by the brute force, every limit) and
    its objective match enumerating every plan (see test_solver_boundary for the boundaries)."""
    rng = np.random.default_rng(2024)
    verdicts = [check(Grid(instance), instance) for instance in (_random_instance(rng) for _ in range(50))]
    assert 0 < verdicts.count("infeasible") < 50  # both outcomes were exercised


def test_incumbent_bounds_the_objective():
    instance = _random_instance(np.random.default_rng(7))
    instance.latency_budget_s, instance.accuracy_limit, instance.memory_limit_bytes = 1.0, 1.0, None
    optimum = solve(instance)
    assert solve(instance, incumbent_objective=optimum.objective).objective == pytest.approx(optimum.objective)
    assert solve(instance, incumbent_objective=optimum.objective * 0.9).status == "infeasible"


def test_excluded_plans_and_the_neighbourhood_bound_the_search():
    """`exclude` removes plans, `near` keeps the solution within a Hamming radius of a plan: the
    solver's answer is the brute-force best of what is left."""
    rng = np.random.default_rng(11)
    instance = _random_instance(rng, layers=3, rungs=2)
    instance.latency_budget_s, instance.accuracy_limit, instance.memory_limit_bytes = 1.0, 1.0, None
    instance.capacity_bytes = {p: 1e12 for p in PROCESSORS}
    instance.local_capacity_bytes = 1e12
    every = [list(picks) for picks in itertools.product(*(range(len(options)) for options in instance.choices))]
    objective = {tuple(picks): predicted(instance, picks)["objective"] for picks in every}
    ranked = sorted(every, key=lambda picks: objective[tuple(picks)])
    anchor = ranked[len(ranked) // 2]
    exclude = ranked[:5] + [anchor]
    allowed = [picks for picks in ranked if picks not in exclude and sum(a != b for a, b in zip(picks, anchor)) <= 1]
    solution = solve(instance, exclude=exclude, near=(anchor, 1))
    assert solution.optimal and solution.plan is not None
    assert picks_for(instance, solution.plan) == allowed[0]
    assert solve(instance, exclude=exclude).objective == pytest.approx(objective[tuple(ranked[5])])
    assert solve(instance, exclude=every).status == "infeasible"


def test_a_program_solved_before_is_recalled_with_the_same_answer(monkeypatch):
    """The solve cache: the same program (instance, incumbent, exclusions, time limit) is answered from
    runs/cache/solves/ without calling HiGHS, identically (an infeasible one too); any change solves anew."""
    from explorer import highs

    calls = []
    real_milp = highs.milp
    monkeypatch.setattr(highs, "milp", lambda *args, **kwargs: calls.append(1) or real_milp(*args, **kwargs))
    instance = _random_instance(np.random.default_rng(31))
    instance.latency_budget_s, instance.accuracy_limit, instance.memory_limit_bytes = 1.0, 1.0, None
    first = solve(instance, time_limit_s=17.0)
    assert len(calls) == 1 and first.optimal
    again = solve(instance, time_limit_s=17.0)
    assert len(calls) == 1 and again.plan == first.plan and again.objective == first.objective
    cut = solve(instance, time_limit_s=17.0, exclude=[picks_for(instance, first.plan)])  # another program
    assert len(calls) == 2 and cut.plan != first.plan
    impossible = solve(instance, incumbent_objective=first.objective * 0.5, time_limit_s=17.0)
    assert impossible.status == "infeasible"
    calls_after_first = len(calls)  # the diagnosis of an infeasible program solves more programs
    assert solve(instance, incumbent_objective=first.objective * 0.5, time_limit_s=17.0).status == "infeasible"
    assert len(calls) == calls_after_first


def _problem(board, model=None, **constraints):
    graph = LayerGraph(model or small_cnn())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 200), None, "random inputs"))
    return Problem(graph, board, SimMeasurer(), scorer, Constraints(**constraints))


def test_c_level_prints_during_a_solve_are_hidden_and_python_output_is_kept(capfd):
    print("before", flush=True)
    with _highs_debug_prints_hidden():
        _libc.printf(b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")  # as HiGHS does
    print("after", flush=True)
    _libc.printf(b"C after\n")
    _libc.fflush(None)
    assert capfd.readouterr().out == "before\nafter\nC after\n"


def test_loose_budget_places_work_where_the_profile_makes_it_cheapest(tmp_path):
    # "big" is 10x faster but draws 20x the power: energy goes to "little", latency to "big"
    path = write_board(tmp_path / "biglittle.toml", ["big", "little"], peak_gflops=[100.0, 10.0],
                       active_power_w=[20.0, 1.0], precisions='"fp32"', dram_gbps=1000.0)
    board = load_board(str(path))
    graph = LayerGraph(small_cnn())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 200), None, "random inputs"))
    for objective, expected in (("energy", "little"), ("latency", "big")):
        problem = Problem(graph, board, SimMeasurer(), scorer, Constraints(latency_ms=1e4, max_accuracy_drop=0.0),
                          Objective.parse(objective))
        plan = solve_problem(problem).plan
        assert {d.processor for _, d in plan.decisions} == {expected}, objective


def test_tight_memory_compresses_the_largest_fully_connected_layer_first(tmp_path):
    """DeepX: under a memory limit the large, redundant fully connected layer is compressed, not the
    small full-rank one, because the sensitivity table shows it costs no accuracy."""
    path = write_board(tmp_path / "single.toml", ["cpu"], precisions='"fp32"')
    graph = LayerGraph(redundant_mlp())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 400), None, "random inputs"))
    total_mb = graph.total_params * 4 / 2**20
    problem = Problem(graph, load_board(str(path)), SimMeasurer(), scorer,
                      Constraints(latency_ms=1e4, max_accuracy_drop=0.02, memory_mb=0.8 * total_mb), Objective.parse("energy"))
    plan = solve_problem(problem).plan
    big, small, _ = graph.layers
    assert big.params > 2 * small.params
    assert plan[big.name].method != "full" and plan[small.name].method == "full"
    assert problem.evaluate(plan).feasible


def test_infeasible_budget_names_the_fastest_plan():
    problem = _problem(load_board("tegra-k1"), latency_ms=1e-3)
    with pytest.raises(ExplorerError, match=r"the fastest plan takes [0-9.]+ ms; the budget is 0.001 ms"):
        solve_problem(problem)


def test_calibration_factors_move_work_off_a_slower_than_modelled_processor():
    problem = _problem(load_board("tegra-k1"), model=mlp(sizes=(2048, 1024, 1024, 10)), latency_ms=1e4, max_accuracy_drop=1.0)
    problem.objective = Objective.parse("latency")
    first = solve_problem(problem).plan
    used = {d.processor for _, d in first.decisions}
    slowed = problem.cost_model
    for proc in used:
        slowed = slowed.calibrated([(proc, kind, precision, 1.0, 1000.0)
                                    for kind in ("fc", "conv") for precision in ("fp32", "fp16", "int8")])
    second = solve_problem(problem, cost_model=slowed).plan
    assert not ({d.processor for _, d in second.decisions} & used)


def test_solver_prediction_equals_the_cost_models_plan_cost():
    """One additive model: the MILP's predicted metrics are the cost model's plan_cost."""
    problem = _problem(load_board("tegra-k1-cloud"), latency_ms=1e4, max_accuracy_drop=1.0)
    solution = solve_problem(problem)
    cost = problem.cost_model.plan_cost(solution.plan)
    assert solution.latency_s == pytest.approx(cost.latency_s) and solution.energy_j == pytest.approx(cost.energy_j)
    offloaded = problem.uniform_plan("cloud")
    assert problem.cost_model.plan_cost(offloaded).latency_s > load_board("tegra-k1-cloud").network.rtt_ms / 1e3


def test_measured_solve_accepts_an_incumbent():
    from explorer.measured_solver import solve_measured

    problem = _problem(load_board("tegra-k1"), latency_ms=1e4, max_accuracy_drop=1.0)
    first = solve_measured(problem)
    again = solve_measured(problem, incumbent=first.plan)  # baseline and incumbent both feasible: compared by objective
    assert again.rounds and all(e.feasible or e.violations for _, e in again.rounds)


def test_measured_solve_names_the_bound_it_could_not_beat(monkeypatch):
    import explorer.measured_solver as measured_module
    from explorer.measured_solver import solve_measured
    from explorer.milp import Solution

    problem = _problem(load_board("tegra-k1"), latency_ms=1e4, max_accuracy_drop=1.0)
    first = solve_measured(problem)
    assert first.feasible and first.evaluation.objective < problem.baseline().objective  # the incumbent is the bound
    nan = float("nan")
    nothing = Solution(None, "infeasible", nan, nan, nan, nan, nan, 0.0, "nothing beats the bound")
    monkeypatch.setattr(measured_module, "solve", lambda *args, **kwargs: nothing)
    with pytest.raises(ExplorerError, match="nothing better than the incumbent plan"):
        solve_measured(problem, incumbent=first.plan)
    best_reference, _, _ = problem.best_reference()
    with pytest.raises(ExplorerError, match=rf"nothing better than the best reference plan \({re.escape(best_reference)}\)"):
        solve_measured(problem)


def test_the_measured_solver_counts_a_plan_once_and_settles_its_fit_into_the_base():
    """`absorb` fits the base cost model to the measured blocks (a plan absorbed again counts once, as does
    its accuracy pair); `settle` makes the fitted model the base that later measurements correct."""
    from explorer.measured_solver import MeasuredSolver

    problem = _problem(load_board("tegra-k1"), latency_ms=1e4, max_accuracy_drop=1.0)
    solver = MeasuredSolver(problem)
    plan = problem.baseline_plan()
    evaluation = problem.evaluate(plan)
    solver.absorb([(plan, evaluation)])
    fitted = solver.cost_model.factors
    assert fitted != problem.cost_model.factors and solver.base_model is problem.cost_model
    solver.absorb([(plan, evaluation), (plan, evaluation)])
    assert solver.cost_model.factors == fitted and len(solver.accuracy_pairs) == 1
    solver.settle()
    assert solver.base_model.factors == fitted
    solver.absorb([(plan, evaluation)])  # measured again against the settled model, which predicts it
    assert solver.cost_model.factors.keys() == fitted.keys() and len(solver.accuracy_pairs) == 1
