"""DeployEnv: Gymnasium and stable-baselines3 checkers, masks that only offer valid decisions that fit
memory, measured rewards that rank every feasible plan above every infeasible one, subprocess vectors."""
import functools
import math
import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from boardbuild import write_board
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from netbuild import random_inputs, small_cnn
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import SubprocVecEnv

from explorer.accuracy import AccuracyScorer
from explorer.boards import PRECISIONS, load_board
from explorer.data import Dataset
from explorer.envs import DEPLOY_ID, DeployEnv
from explorer.envs.deploy import plan_reward, resolve_precision
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.problem import Constraints, Objective, Problem
from explorer.searching import BudgetedProblem

VGG = {"model": "vgg", "board": "tegra-k1", "latency_ms": 250.0, "max_accuracy_drop_points": 1, "data_samples": 300}
TIGHT = {  # processor: (memory MB, precisions, decision ops); the board holds 0.16 MB of weights
    "big": ("0.12", ("fp32", "fp16", "int8"), ("Conv", "Gemm", "MatMul")),
    "gpu": ("0.06", ("fp32", "fp16"), ("Conv", "Gemm", "MatMul")),
    "dsp": ("0.02", ("fp32", "int8"), ("Conv",)),
}


@pytest.fixture(scope="module")
def vgg_env() -> DeployEnv:
    return gymnasium.make(DEPLOY_ID, **VGG).unwrapped


def _tight_board(path: Path):
    """Three processors with different precisions and ops, and memory too small for the fp32 model."""
    write_board(path, list(TIGHT))
    head, *sections = path.read_text().split("[processors.")
    parts = [head.replace("available_mb = 1000", "available_mb = 0.16")]
    for section in sections:
        memory_mb, precisions, ops = TIGHT[section.split("]")[0]]
        lines = []
        for line in section.splitlines():
            if line.startswith("memory_mb"):
                line = f"memory_mb = {memory_mb}  # test"
            elif line.startswith("precisions"):
                line = "precisions = [" + ", ".join(f'"{p}"' for p in precisions) + "]"
            elif line.startswith("peak_gflops"):
                line = "peak_gflops = { " + ", ".join(f"{p} = 10.0" for p in precisions) + " }  # test"
            elif line.startswith("ops"):
                line = "ops = [" + ", ".join(f'"{o}"' for o in ops) + "]"
            lines.append(line)
        parts.append("\n".join(lines) + "\n")
    path.write_text("[processors.".join(parts))
    return load_board(str(path))


def _cnn_problem(board, constraints: Constraints) -> Problem:
    graph = LayerGraph(small_cnn())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 64), None, "random inputs"))
    return Problem(graph, board, SimMeasurer(seed=0), scorer, constraints, Objective.parse("energy"))


@pytest.fixture(scope="module")
def tight_env(tmp_path_factory) -> DeployEnv:
    board = _tight_board(tmp_path_factory.mktemp("boards") / "tight.toml")
    return DeployEnv(problem=_cnn_problem(board, Constraints(latency_ms=None, max_accuracy_drop=None)))


def _split_masks(env: DeployEnv) -> list[np.ndarray]:
    """The masks of the rung, processor and precision sub-actions."""
    return np.split(env.action_masks(), np.cumsum(env.action_space.nvec)[:-1])


def _masked_action(env: DeployEnv, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random action among the unmasked values of each sub-action."""
    return np.array([rng.choice(np.flatnonzero(mask)) for mask in _split_masks(env)])


def _rollout(env: DeployEnv, rng: np.random.Generator, unmasked_share: float = 0.0):
    """Play one episode of masked random actions (some fully random if unmasked_share > 0)."""
    env.reset()
    steps = []
    while True:
        action = env.action_space.sample() if rng.random() < unmasked_share else _masked_action(env, rng)
        _, reward, terminated, truncated, info = env.step(action)
        steps.append(info)
        if terminated:
            return reward, steps


def test_registered_env_from_names_passes_both_checkers(vgg_env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gymnasium_check_env(vgg_env)
        sb3_check_env(vgg_env)
    ladder = max(len(vgg_env.problem.rungs(layer)) for layer in vgg_env.problem.graph.layers)
    assert list(vgg_env.action_space.nvec) == [ladder, 3, len(PRECISIONS)]
    observation, _ = vgg_env.reset(seed=0)
    assert vgg_env.observation_space.contains(observation)
    assert vgg_env.action_masks().shape == (ladder + 3 + len(PRECISIONS),)


def test_suggestion_replays_exactly_and_reward_is_measured(vgg_env):
    """The solver's plan is reachable through the masks; the last step carries the measured evaluation."""
    vgg_env.reset(seed=0)
    for index, (_, decision) in enumerate(vgg_env.suggestion.decisions):
        _, reward, terminated, _, info = vgg_env.step(vgg_env.encode(index, decision))
        assert info["decision"] == decision and not info["projected"]
        assert terminated == (index == len(vgg_env.layers) - 1)
    assert info["plan"] == vgg_env.suggestion
    assert info["evaluation"] is vgg_env.problem.evaluate(info["plan"])
    assert reward == plan_reward(info["evaluation"], vgg_env.reference)
    with pytest.raises(ExplorerError, match="reset"):
        vgg_env.step(vgg_env.encode(0, vgg_env.suggestion.decisions[0][1]))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_masked_actions_build_valid_plans_that_fit_memory(tight_env, seed):
    """Any action drawn from the masks (and any projected out-of-mask action) is a valid decision,
    the plan passes Problem.validate and no memory capacity overflows."""
    rng = np.random.default_rng(seed)
    _, steps = _rollout(tight_env, rng, unmasked_share=0.2)
    problem, evaluation = tight_env.problem, steps[-1]["evaluation"]
    for layer, info in zip(problem.graph.layers, steps):
        assert info["decision"] in problem.choices(layer)
    problem.validate(steps[-1]["plan"])
    assert not evaluation.violations  # no constraint but memory: nothing may be violated


def test_masks_follow_memory_precisions_and_ops(tight_env):
    """On the tight board memory really binds, and the masks stay rectangles of valid decisions."""
    rng = np.random.default_rng(0)
    narrowed = 0
    for _ in range(20):
        tight_env.reset()
        for layer_index, layer in enumerate(tight_env.layers):
            rungs, procs, precs = (tuple(np.flatnonzero(m)) for m in _split_masks(tight_env))
            capable = [i for i, p in enumerate(tight_env.processor_ids) if layer.op_type in TIGHT[p][2]]
            assert set(procs) <= set(capable)  # the dsp never gets a Gemm
            narrowed += len(rungs) < len(tight_env.rungs[layer_index]) or len(procs) < len(capable)
            for r in rungs:
                for p in procs:
                    for q in precs:
                        decision, projected = tight_env.decode((r, p, q), (rungs, procs, precs), layer_index)
                        assert not projected and decision.precision in TIGHT[decision.processor][1]
            tight_env.step(_masked_action(tight_env, rng))
    assert narrowed > 0
    assert resolve_precision("int8", ("fp32", "fp16")) == "fp16"
    assert resolve_precision("fp16", ("fp32", "int8")) == "fp32"
    assert resolve_precision("fp32", ("int8",)) == "int8"


def test_infeasible_plans_score_below_every_feasible_plan():
    unconstrained = _cnn_problem(load_board("tegra-k1"), Constraints(latency_ms=None, max_accuracy_drop=None))
    plans = [unconstrained.random_plan(np.random.default_rng(i)) for i in range(6)]
    latencies = [unconstrained.evaluate(plan).latency_ms for plan in plans]
    env = DeployEnv(problem=_cnn_problem(load_board("tegra-k1"),
                                         Constraints(latency_ms=float(np.median(latencies)), max_accuracy_drop=None)))
    rng = np.random.default_rng(1)
    feasible, infeasible = [], []
    for _ in range(16):
        reward, steps = _rollout(env, rng)
        evaluation = steps[-1]["evaluation"]
        if evaluation.feasible:
            assert reward == pytest.approx(env.reference / evaluation.objective)
            feasible.append(reward)
        else:
            assert reward <= -1
            infeasible.append(reward)
    assert feasible and infeasible
    assert max(infeasible) < 0 < min(feasible)
    assert all(math.isfinite(r) for r in feasible + infeasible)


def test_demonstration_replays_without_measuring(vgg_env):
    suggestion = vgg_env.suggestion
    vgg_env.reset(seed=0)
    vgg_env.step(vgg_env.encode(0, suggestion.decisions[0][1]))
    measured = vgg_env.problem.evaluations
    plan = vgg_env.problem.random_plan(np.random.default_rng(3))
    steps = vgg_env.demonstration(plan, labels=suggestion)
    assert len(steps) == len(vgg_env.layers) and vgg_env.problem.evaluations == measured
    labels = [list(vgg_env.encode(i, d)) for i, (_, d) in enumerate(suggestion.decisions)]
    assert [list(a) for _, _, a in steps] == labels
    followed = [o for o, _, _ in vgg_env.demonstration(suggestion)]
    assert any(not np.array_equal(o, f) for (o, _, _), f in zip(steps, followed))  # the states are `plan`'s
    for index, (_, decision) in enumerate(suggestion.decisions[1:], start=1):  # the episode in progress goes on
        _, _, _, _, info = vgg_env.step(vgg_env.encode(index, decision))
    assert info["plan"] == suggestion


def test_budgeted_problem_counts_distinct_plans(vgg_env):
    budgeted = BudgetedProblem(vgg_env.problem, 2, "test", references=False)  # counting alone
    env = DeployEnv(problem=budgeted, suggestion=vgg_env.suggestion)
    for _ in range(2):  # the same plan twice: one trial
        env.reset()
        for index, (_, decision) in enumerate(env.suggestion.decisions):
            env.step(env.encode(index, decision))
    assert len(budgeted.result.trials) == 1 and budgeted.result.trials[0].plan == env.suggestion


def test_subprocess_vector_env_matches_the_single_env(vgg_env):
    rng = np.random.default_rng(7)
    episodes = []
    for _ in range(2):
        vgg_env.reset(seed=0)
        actions, terminated = [], False
        while not terminated:
            actions.append(_masked_action(vgg_env, rng))
            _, reward, terminated, _, info = vgg_env.step(actions[-1])
        episodes.append((actions, reward, info["plan"]))
    vector = SubprocVecEnv([functools.partial(gymnasium.make, f"explorer.envs:{DEPLOY_ID}", **VGG)] * 2)
    try:
        vector.seed(0)
        vector.reset()
        vgg_env.reset(seed=0)
        assert (np.stack(vector.env_method("action_masks")) == vgg_env.action_masks()).all()
        for actions, reward, plan in episodes:
            for action in actions:
                _, rewards, dones, infos = vector.step(np.stack([action, action]))
            assert dones.all() and list(rewards) == pytest.approx([reward, reward], abs=0)
            assert infos[0]["plan"] == infos[1]["plan"] == plan
    finally:
        vector.close()
