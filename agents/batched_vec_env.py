"""A vectorised environment whose episodes end together, so the plans they complete are measured as one batch."""
from __future__ import annotations

from typing import cast

from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from explorer.envs.deploy import DeployEnv


class BatchedEvaluationVecEnv(DummyVecEnv):
    """DummyVecEnv of DeployEnvs, which end their episodes on the same step (one step per layer): when
    the problem measures several plans at once (measurement servers), the plans those steps complete are
    evaluated together first, in environment order, and the environments then find them evaluated.
    With one plan at a time it is DummyVecEnv."""

    def step_wait(self) -> VecEnvStepReturn:
        envs = cast(list[DeployEnv], self.envs)  # DummyVecEnv types them as gymnasium.Env
        problem = envs[0].problem
        if problem.parallelism > 1:
            plans = [plan for env, action in zip(envs, self.actions) if (plan := env.plan_if(action)) is not None]
            if len(plans) > 1:
                problem.evaluate_many(plans)
        return super().step_wait()
