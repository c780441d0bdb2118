"""The PPO agent on vgg / tegra-k1: exact budget, never worse than the measured solver plan,
deterministic for a seed, behaviour cloning that reproduces the solver's plan."""
import numpy as np
import pytest
from sb3_contrib import MaskablePPO

from explorer import load_problem
from explorer.agents.behaviour_cloning import Demonstration, behaviour_clone
from explorer.agents.ppo import PPOAgent
from explorer.agents.solver_guide import HEADROOM_FRACTION, LOCAL_RADIUS, SolverGuide
from explorer.envs import DeployEnv
from explorer.measured_solver import MeasuredSolver
from explorer.searching import BudgetedProblem

BUDGET = 38  # 8 reference plans, then 30 of the agent's own
VGG = {"model": "vgg", "board": "tegra-k1", "objective": "energy", "latency_ms": 250.0, "max_accuracy_drop_points": 1,
       "data_samples": 300}


@pytest.fixture(scope="module")
def problem():
    return load_problem(**VGG)


@pytest.fixture(scope="module")
def solver_objective(problem) -> float:
    """The measured solver plan's objective (what PPO's first trials evaluate)."""
    budgeted = BudgetedProblem(problem, 100, "solver")
    measured = MeasuredSolver(problem, budgeted.evaluate).solve()
    assert measured.feasible
    return measured.evaluation.objective


@pytest.fixture(scope="module")
def runs(problem):
    return [PPOAgent().search(problem, BUDGET, seed=0) for _ in range(2)]


def test_spends_exactly_the_budget_on_distinct_plans(runs, problem):
    result = runs[0]
    assert result.agent == "ppo" and len(result.trials) == BUDGET == len(result.best_so_far)
    assert len({t.plan.digest() for t in result.trials}) == BUDGET
    assert {t.source for t in result.trials} == {"reference", "solver", "solver-local", "policy"}
    for trial in result.trials:
        problem.validate(trial.plan)


def _distance(a, b) -> int:
    return sum(x != y for (_, x), (_, y) in zip(a.decisions, b.decisions))


def test_local_proposals_stay_near_the_best_measured_plan_or_the_best_with_headroom(runs, problem):
    """Each of the solver's local proposals changes 1 to LOCAL_RADIUS layers of a plan that was, before
    it, the best measured plan or the best one with accuracy headroom."""
    result = runs[0]
    limit = problem.constraints.max_accuracy_drop
    local = [t for t in result.trials if t.source == "solver-local"]
    assert local
    for trial in local:
        anchors, best, roomy = [], None, None
        for earlier in result.trials[:trial.number]:
            e = earlier.evaluation
            if e.feasible and (best is None or e.objective < best.evaluation.objective):
                best = earlier
                anchors.append(earlier.plan)
            roomier = roomy is None or e.objective < roomy.evaluation.objective
            if e.feasible and e.accuracy_drop <= HEADROOM_FRACTION * limit and roomier:
                roomy = earlier
                anchors.append(earlier.plan)
        assert 1 <= min(_distance(trial.plan, anchor) for anchor in anchors) <= LOCAL_RADIUS


def test_every_other_refresh_suggests_the_best_plan_with_accuracy_headroom(runs, problem, monkeypatch):
    """Refreshes alternate the suggestion: the best measured plan, then the best one whose measured
    accuracy loss is within HEADROOM_FRACTION of the limit (here the plans of a search, replayed; the
    fraction lowered so that the search's best plan, 1 of the 300 images lost, has too little headroom)."""
    monkeypatch.setattr("explorer.agents.solver_guide.HEADROOM_FRACTION", 0.2)
    budgeted = BudgetedProblem(problem, BUDGET + 10, "ppo")
    for trial in runs[0].trials:
        budgeted.evaluate(trial.plan, trial.source)
    limit = problem.constraints.max_accuracy_drop
    roomy = [t for t in budgeted.result.trials if t.evaluation.feasible and t.evaluation.accuracy_drop <= 0.2 * limit]
    expected = min(roomy, key=lambda t: t.evaluation.objective)
    assert expected is not budgeted.result.best_trial  # the best plan uses more of the limit: the two differ
    guide = SolverGuide(budgeted, None)
    assert guide.best_with_headroom() is expected
    assert guide.refresh() == budgeted.result.best_plan
    assert guide.refresh() == guide.best_with_headroom().plan
    assert guide.refresh() == budgeted.result.best_plan


def test_best_is_feasible_and_never_worse_than_the_solver(runs, solver_objective):
    result = runs[0]
    assert result.best.feasible
    assert result.best.objective <= solver_objective
    assert result.best_so_far[-1] == result.best.objective
    assert all(a >= b for a, b in zip(result.best_so_far, result.best_so_far[1:]))


def test_same_seed_same_search(runs):
    first, second = runs
    assert first.best_so_far == second.best_so_far
    assert [t.plan.digest() for t in first.trials] == [t.plan.digest() for t in second.trials]


def test_a_budget_smaller_than_the_solver_needs_stops_exactly(problem):
    references = len(problem.reference_plans())
    result = PPOAgent().search(problem, references + 2, seed=0)
    assert len(result.trials) == references + 2
    assert [t.source for t in result.trials] == ["reference"] * references + ["solver"] * 2


def test_behaviour_cloning_reproduces_the_suggested_plan(problem):
    """After cloning, the policy's most likely actions replay the solver plan it was shown."""
    env = DeployEnv(problem=problem)
    model = MaskablePPO("MlpPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu")
    suggestion = env.suggestion
    loss = behaviour_clone(model, env, [Demonstration(suggestion, suggestion, suggestion, 1.0)], 200, 3e-3, 0.0)
    chosen = []
    for observation, masks, _ in env.demonstration(suggestion):
        action, _ = model.predict(observation, action_masks=masks, deterministic=True)
        chosen.append(list(action))
    assert chosen == [list(env.encode(i, d)) for i, (_, d) in enumerate(suggestion.decisions)]
    assert np.isfinite(loss) and loss < 0.2
