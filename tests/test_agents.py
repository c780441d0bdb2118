"""The non-RL search agents and the registry: budgets, feasibility, determinism, TPE's start plans,
NSGA-II's Pareto front, resuming an Optuna study, tiny design spaces (PPO once, marked slow)."""
import math

import numpy as np
import pytest
from boardbuild import write_board
from netbuild import mlp, random_inputs

from explorer.accuracy import AccuracyScorer
from explorer.agents import AGENTS, make_agent
from explorer.agents.optuna_agents import CONSTRAINTS, constraint_values
from explorer.agents.random_search import design_space_size
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.problem import Constraints, Objective, Problem
from explorer.searching import PARETO_METRICS
from explorer.solver import solve_problem
from explorer.studies import default_study_name

SEARCH_AGENTS = ("random", "optuna-tpe", "optuna-nsga2")  # budget-filling agents
BUDGET = 12


def _problem(board=None, use_disk_cache=True, latency_ms=0.3, max_accuracy_drop=0.05, objective="energy") -> Problem:
    graph = LayerGraph(mlp())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 200), None, "random inputs"))
    return Problem(graph, board or load_board("tegra-k1"), SimMeasurer(seed=0), scorer,
                   Constraints(latency_ms=latency_ms, max_accuracy_drop=max_accuracy_drop), Objective.parse(objective),
                   use_disk_cache=use_disk_cache)


@pytest.fixture(scope="module")
def problem() -> Problem:
    return _problem()


def _agent(name: str, **options):
    if name.startswith("optuna"):
        options.setdefault("storage", "memory")
    return make_agent(name, **options)


def _check_result(result, problem: Problem, budget: int) -> None:
    digests = [t.plan.digest() for t in result.trials]
    assert len(set(digests)) == len(digests)
    assert [t.number for t in result.trials] == list(range(len(result.trials)))
    assert len(result.best_so_far) == len(result.trials) <= budget
    assert all(a >= b for a, b in zip(result.best_so_far, result.best_so_far[1:]))
    feasible = [t.evaluation.objective for t in result.trials if t.evaluation.feasible]
    if feasible:
        assert result.best.feasible and result.best.objective == min(feasible) == result.best_so_far[-1]
    else:
        assert result.best_trial is None and result.best_so_far[-1] == math.inf
    for trial in result.trials:
        assert trial.evaluation is problem.evaluate(trial.plan)  # the one seam, same cached evaluation


@pytest.mark.parametrize("name", SEARCH_AGENTS)
def test_search_agents_spend_the_budget_exactly_and_never_report_an_infeasible_best(problem, name):
    result = _agent(name).search(problem, BUDGET, seed=0)
    assert result.agent == name and not result.interrupted
    assert len(result.trials) == BUDGET
    _check_result(result, problem, BUDGET)
    references = [plan for _, plan in problem.reference_plans()]
    assert [t.plan for t in result.trials[:len(references)]] == references  # every search measures them first
    assert {t.source for t in result.trials[:len(references)]} == {"reference"}
    assert result.best is not None and result.best.objective <= min(  # never worse than a reference
        problem.evaluate(plan).objective for plan in references if problem.evaluate(plan).feasible)


@pytest.mark.parametrize("name", AGENTS)
def test_ctrl_c_returns_the_trials_so_far_marked_interrupted(problem, name):
    """Every agent catches KeyboardInterrupt the same way: what was measured comes back, flagged."""
    def interrupt_after_two(trial, result) -> None:
        if len(result.trials) == 2:
            raise KeyboardInterrupt

    result = _agent(name).search(problem, BUDGET, seed=0, callback=interrupt_after_two)
    assert result.interrupted and len(result.trials) == 2
    _check_result(result, problem, BUDGET)


def test_solver_agent_is_the_measured_solver_loop_within_the_budget(problem):
    result = make_agent("solver").search(problem, BUDGET, seed=0)
    _check_result(result, problem, BUDGET)
    references = [plan for _, plan in problem.reference_plans()]
    rounds = result.trials[len(references):]
    assert [t.plan for t in result.trials[:len(references)]] == references  # the measured plans it has to beat
    assert 1 <= len(rounds) <= 6 and {t.source for t in rounds} == {"solver"}
    _, best_reference, _ = problem.best_reference()
    assert rounds[0].plan == solve_problem(problem, incumbent=best_reference).plan
    assert result.seed_plan in [t.plan for t in rounds]  # the agent's own plan, not a reference
    assert result.best.objective <= problem.evaluate(best_reference).objective
    two_rounds = _problem(latency_ms=0.32)  # the first solver plan runs 0.325 ms: a second round is needed
    full = make_agent("solver").search(two_rounds, BUDGET, seed=0)
    assert [t.evaluation.feasible for t in full.trials[len(references):]] == [False, True]
    cut = make_agent("solver").search(two_rounds, len(references) + 1, seed=0)  # stops at the budget
    assert [t.plan for t in cut.trials] == [t.plan for t in full.trials[:len(references) + 1]]


@pytest.mark.parametrize("name", SEARCH_AGENTS)
def test_same_seed_gives_the_same_search_and_another_seed_another(problem, name):
    first, again = (_agent(name).search(problem, BUDGET, seed=3) for _ in range(2))
    assert [t.plan for t in first.trials] == [t.plan for t in again.trials]
    assert first.best_so_far == again.best_so_far
    shorter = _agent(name).search(problem, 5, seed=3)  # `anytime`: a smaller budget gives a prefix
    assert _agent(name).anytime and [t.plan for t in shorter.trials] == [t.plan for t in first.trials[:5]]
    other = _agent(name).search(problem, BUDGET, seed=4)
    assert [t.plan for t in other.trials] != [t.plan for t in first.trials]


def test_tpe_starts_from_the_reference_plans_and_the_solver_plan_and_tells_optuna_the_constraints(problem):
    agent = _agent("optuna-tpe")
    result = agent.search(problem, BUDGET, seed=0)
    references = [plan for _, plan in problem.reference_plans()]
    n = len(references)
    assert [t.plan for t in result.trials[:n]] == references and {t.source for t in result.trials[:n]} == {"reference"}
    assert result.trials[n].plan == solve_problem(problem).plan == result.seed_plan and result.trials[n].source == "solver"
    assert {t.source for t in result.trials[n + 1:]} == {"tpe"}
    told = [t for t in agent.study.trials if not t.user_attrs["duplicate"]]
    assert len(told) == BUDGET
    for frozen, trial in zip(told, result.trials):
        assert frozen.user_attrs["plan_digest"] == trial.plan.digest()
        assert frozen.user_attrs["objective"] == trial.evaluation.objective
        assert frozen.value == (trial.evaluation.objective if trial.evaluation.feasible else math.inf)
        assert frozen.system_attrs["constraints"] == constraint_values(trial.evaluation)  # the list form
        assert len(frozen.constraints) == len(CONSTRAINTS)  # ... which Optuna's samplers read too
        assert (max(frozen.constraints.values()) <= 0) == trial.evaluation.feasible


def test_constraint_values_agree_with_the_problems_feasibility(problem):
    result = _agent("optuna-tpe").search(problem, 30, seed=1)
    assert 0 < result.feasible_count < 30
    for trial in result.trials:
        values = constraint_values(trial.evaluation)
        assert len(values) == len(CONSTRAINTS)
        assert (max(values) <= 0) == trial.evaluation.feasible
        if trial.evaluation.latency_ms > problem.constraints.latency_ms:
            assert values[0] > 0


def test_nsga2_reports_a_non_dominated_pareto_front(problem):
    result = _agent("optuna-nsga2").search(problem, 30, seed=0)
    assert result.trials[0].source == "reference" and "solver" in {t.source for t in result.trials}
    front = result.pareto
    assert front and all(t.evaluation.feasible for t in front)

    def point(trial):
        return np.array([getattr(trial.evaluation, m) for m in PARETO_METRICS])

    def dominates(a, b):
        return bool(np.all(point(a) <= point(b)) and np.any(point(a) < point(b)))

    assert not any(dominates(a, b) for a in front for b in front)
    for trial in result.trials:
        if trial.evaluation.feasible and trial not in front:
            assert any(dominates(f, trial) for f in front)
    assert result.best.objective == min(t.evaluation.objective for t in front)  # the energy optimum is on the front


def test_tpe_study_resumes_from_its_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path))  # default storage runs/optuna.db, fresh caches
    first = make_agent("optuna-tpe").search(_problem(), 6, seed=0)
    assert (tmp_path / "optuna.db").exists()
    problem = _problem()  # as in a new process: earlier measurements come back from the disk cache
    agent = make_agent("optuna-tpe")
    resumed = agent.search(problem, 10, seed=0)
    assert [t.plan for t in resumed.trials[:6]] == [t.plan for t in first.trials]
    assert len(resumed.trials) == 10 and problem.evaluations == 4  # 4 new measurements, not 10
    _check_result(resumed, problem, 10)
    assert agent.study.study_name == default_study_name(problem, "optuna-tpe", 0)
    counted = [t.user_attrs["plan_digest"] for t in agent.study.trials if not t.user_attrs["duplicate"]]
    assert counted == [t.plan.digest() for t in resumed.trials]  # one study of 10 distinct plans, not 6 + 10
    problem = _problem()
    again = make_agent("optuna-tpe").search(problem, 10, seed=0)  # complete: nothing left to do
    assert [t.plan for t in again.trials] == [t.plan for t in resumed.trials] and problem.evaluations == 0
    other_seed = make_agent("optuna-tpe").search(problem, 3, seed=1)  # another study, started afresh
    assert len(other_seed.trials) == 3 and other_seed.trials[0].source == "reference"


@pytest.mark.parametrize("name", SEARCH_AGENTS)
def test_a_design_space_smaller_than_the_budget_is_evaluated_once_and_the_search_ends(tmp_path, name):
    board = load_board(str(write_board(tmp_path / "single.toml", ["cpu"], precisions='"fp32"')))
    problem = _problem(board, latency_ms=None, max_accuracy_drop=None)
    size = design_space_size(problem)
    assert size < 40
    result = _agent(name).search(problem, 40, seed=0)
    assert len(result.trials) == size
    _check_result(result, problem, 40)


def test_make_agent_builds_agents_by_name_and_suggests_the_closest_name():
    for name in AGENTS[1:]:
        assert make_agent(name).name == name
    assert make_agent("random", attempts_per_trial=3).attempts_per_trial == 3
    with pytest.raises(ExplorerError, match="did you mean 'optuna-tpe'"):
        make_agent("optuna-tp")
    with pytest.raises(ExplorerError, match="did you mean 'random'"):
        make_agent("randon")
    with pytest.raises(ExplorerError, match="unknown agent 'zzz': choose one of ppo"):
        make_agent("zzz")
    with pytest.raises(ExplorerError, match="does not take these options.*attempts_per_trial"):
        make_agent("random", population=3)


@pytest.mark.slow
def test_ppo_through_the_registry_respects_its_budget(problem):
    """PPO may stop short of the budget (its episodes are capped when they keep repeating plans)."""
    result = make_agent("ppo").search(problem, BUDGET, seed=0)
    assert result.agent == "ppo" and 1 <= len(result.trials) <= BUDGET
    assert result.trials[0].source == "reference"
    _check_result(result, problem, BUDGET)
