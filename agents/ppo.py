"""PPO agent: sb3-contrib's MaskablePPO on DeployEnv, seeded by the solver and extending it.

Seeded by the solver:
1. the measured solver's rounds (`MeasuredSolver.solve`: the reference plans, then solve -> measure ->
   recalibrate rounds; every evaluation counted in the budget) go first, so the best-so-far is never
   worse than the solver's measured plan;
2. the policy is warm-started by behaviour cloning (`explorer.agents.behaviour_cloning`) of the plans the
   integer program gives on the cost model for several accuracy limits and latency budgets
   (`SolverGuide.alternatives`), replayed through the environment without measuring them;
3. the suggestion for each layer is part of the observation.
Extending it: PPO optimises the *measured* reward; every `recalibrate_every` measured trials, and
whenever `stuck_episodes` episodes in a row repeated known plans, the solver's side
(`explorer.agents.solver_guide.SolverGuide`) learns from the trials, re-solves with the best measured plan as
incumbent, measures its plan and up to `local_proposals` plans near the best measured one, and the
policy is re-anchored on the new suggestion by a short behaviour cloning (the best measured plans are
then the alternatives).

The budget counts distinct plans: an episode that repeats a plan is free, so episodes are capped
too (`episodes_per_evaluation` x budget). Learning stops exactly at the budget.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import gymnasium as gym
import numpy as np
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import set_random_seed

from explorer.agents.batched_vec_env import BatchedEvaluationVecEnv
from explorer.agents.behaviour_cloning import Demonstration, behaviour_clone, demonstrations, fast_torch
from explorer.agents.solver_guide import SolverGuide
from explorer.envs.deploy import DeployEnv
from explorer.errors import ExplorerError
from explorer.measured_solver import MeasuredSolver
from explorer.plan import Plan
from explorer.problem import Problem
from explorer.searching import BudgetedProblem, BudgetExhausted, SearchResult, TrialCallback

BEST_ALTERNATIVES = 4  # best measured plans imitated (lightly) when re-anchoring


class PPOAgent:
    """MaskablePPO seeded by the solver (first trials, behaviour cloning, suggestion in the
    observation), recalibrating the cost model and re-solving as it measures."""

    name = "ppo"
    anytime = False  # PPO's updates depend on the budget: a smaller budget is another search

    def __init__(self, episodes_per_update: int = 8, parallel_episodes: int = 4, minibatches: int = 2,
                 epochs: int = 4, learning_rate: float = 3e-4, entropy_coef: float = 0.01, clip_range: float = 0.2,
                 hidden: tuple[int, ...] = (64, 64), bc_steps: int = 300, anchor_steps: int = 100,
                 bc_learning_rate: float = 3e-3, smoothing: float = 0.02, strays: int = 4,
                 alternative_weight: float = 0.1,
                 recalibrate_every: int = 16, stuck_episodes: int = 32, episodes_per_evaluation: int = 20,
                 local_proposals: int = 2):
        self.episodes_per_update = episodes_per_update  # episodes per PPO update, over all parallel ones
        self.parallel_episodes = parallel_episodes  # environments stepped together (one batched forward pass)
        self.minibatches = minibatches
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.entropy_coef = entropy_coef
        self.clip_range = clip_range
        self.hidden = hidden
        self.bc_steps = bc_steps  # behaviour cloning before PPO
        self.anchor_steps = anchor_steps  # behaviour cloning on the best plan at each refresh
        self.bc_learning_rate = bc_learning_rate
        self.smoothing = smoothing  # label smoothing of behaviour cloning: the exploration it leaves
        self.strays = strays  # strayed trajectories per imitated plan
        self.alternative_weight = alternative_weight
        self.recalibrate_every = recalibrate_every  # measured trials between refreshes
        self.stuck_episodes = stuck_episodes  # episodes without a new plan that force a refresh
        self.episodes_per_evaluation = episodes_per_evaluation
        self.local_proposals = local_proposals  # solver's plans near the best measured one, per refresh

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> SearchResult:
        """Search within `budget` measured evaluations (distinct plans), deterministic for a seed;
        Ctrl-C ends it early with the trials so far (`interrupted` set)."""
        budgeted = BudgetedProblem(problem, budget, self.name, callback)
        with fast_torch():
            try:
                self._search(budgeted, seed)
            except BudgetExhausted:
                pass
            except KeyboardInterrupt:  # like every agent: Ctrl-C returns what was measured, marked interrupted
                budgeted.result.interrupted = True
        return budgeted.result

    def _search(self, budgeted: BudgetedProblem, seed: int) -> None:
        set_random_seed(seed)
        budgeted.source = "solver"
        try:
            start = MeasuredSolver(budgeted.problem, budgeted.evaluate).solve()
        except ExplorerError:  # the cost model predicts no feasible plan: PPO searches unseeded
            start = None
        budgeted.result.seed_plan = start.plan if start else None
        guide = SolverGuide(budgeted, start)
        envs = [DeployEnv(problem=budgeted, suggestion=guide.suggestion, cost_model=guide.cost_model)
                for _ in range(self.parallel_episodes)]
        layers = len(envs[0].layers)
        n_steps = layers * max(self.episodes_per_update // self.parallel_episodes, 1)
        model = MaskablePPO("MlpPolicy", BatchedEvaluationVecEnv([_returning(env) for env in envs]),  # in-process: one budget
                            learning_rate=self.learning_rate, n_steps=n_steps,
                            batch_size=max(n_steps * self.parallel_episodes // self.minibatches, 1),
                            n_epochs=self.epochs, gamma=1.0, gae_lambda=0.95, clip_range=self.clip_range,
                            ent_coef=self.entropy_coef, policy_kwargs={"net_arch": list(self.hidden)}, seed=seed,
                            device="cpu", verbose=0)
        model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes an empty /tmp/SB3-* folder per search
        rng = np.random.default_rng(seed)
        if guide.suggestion is not None:
            demos = self.demonstrations(envs[0], guide.suggestion, guide.alternatives(), rng)
            behaviour_clone(model, envs[0], demos, self.bc_steps, self.bc_learning_rate, self.smoothing)
        budgeted.source = "policy"
        episodes = self.episodes_per_evaluation * budgeted.budget
        progress = _SearchProgress(self, budgeted, guide, envs, rng, episodes)
        model.learn(total_timesteps=episodes * layers, callback=progress)

    def demonstrations(self, env: DeployEnv, suggestion: Plan, alternatives: list[Plan],
                       rng: np.random.Generator) -> list[Demonstration]:
        """What to imitate with this agent's `strays` and `alternative_weight` (see `behaviour_cloning.demonstrations`)."""
        return demonstrations(env, suggestion, alternatives, rng, self.strays, self.alternative_weight)


class _SearchProgress(BaseCallback):
    """Stops learning at the budget or the episode cap; refreshes the solver's side and re-anchors
    the policy between rollouts when due (so every rollout is collected by one policy)."""

    def __init__(self, agent: PPOAgent, problem: BudgetedProblem, guide: SolverGuide, envs: list[DeployEnv],
                 rng: np.random.Generator, max_episodes: int):
        super().__init__()
        self.agent = agent
        self.problem = problem
        self.guide = guide
        self.envs = envs
        self.rng = rng
        self.max_episodes = max_episodes
        self.episodes = 0
        self.episodes_without_new_plan = 0
        self.trials_at_refresh = len(problem.result.trials)
        self.known_trials = len(problem.result.trials)

    def _on_step(self) -> bool:
        trials = len(self.problem.result.trials)
        finished = sum("evaluation" in info for info in self.locals["infos"])
        self.episodes += finished
        self.episodes_without_new_plan = 0 if trials > self.known_trials else self.episodes_without_new_plan + finished
        self.known_trials = trials
        return self.problem.remaining > 0 and self.episodes < self.max_episodes

    def _on_rollout_start(self) -> None:
        due = len(self.problem.result.trials) - self.trials_at_refresh >= self.agent.recalibrate_every
        if self.problem.remaining <= 0 or not (due or self.episodes_without_new_plan >= self.agent.stuck_episodes):
            return
        suggestion = self.guide.refresh(self.agent.local_proposals)
        self.trials_at_refresh = len(self.problem.result.trials)
        self.episodes_without_new_plan = 0
        for env in self.envs:
            env.set_suggestion(suggestion)
            env.set_cost_model(self.guide.cost_model)
        if suggestion is not None:
            feasible = sorted((t for t in self.problem.result.trials if t.evaluation.feasible),
                              key=lambda t: t.evaluation.objective)
            best = [t.plan for t in feasible[:BEST_ALTERNATIVES + 1]]
            demos = self.agent.demonstrations(self.envs[0], suggestion, best, self.rng)
            behaviour_clone(cast(MaskablePPO, self.model), self.envs[0], demos, self.agent.anchor_steps,
                            self.agent.bc_learning_rate, self.agent.smoothing)


def _returning(env: DeployEnv) -> Callable[[], gym.Env]:
    """A maker of `env` itself, as a vectorised environment takes one."""
    return lambda: env
