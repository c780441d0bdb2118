"""PPO agent: sb3-contrib's MaskablePPO on DeployEnv, seeded by the solver and extending it.

Seeded by the solver:
1. the measured solver plan (`solve_measured`, its evaluations counted in the budget) is the first
   trial, so the best-so-far is never worse than the solver's;
2. the policy is warm-started by behaviour cloning: the integer program is solved on the cost model
   for several accuracy limits and latency budgets (no measurement), each plan is replayed through
   the environment, and the policy's masked action distribution is fitted by cross-entropy to the
   (observation, action) pairs, once with the solver plan as the observation's suggestion (so the
   policy spreads over the solver's alternatives) and once with each plan as its own suggestion
   (so it learns to follow the suggestion when it changes);
3. the solver's suggestion for each layer is part of the observation.
Extending it: PPO optimises the *measured* reward, and every `recalibrate_every` measured trials the
measurements recalibrate the cost model (per processor, op kind and precision, from the measured
blocks) and the accuracy budget the solver uses (the measured/estimated accuracy-loss ratio of the
trials), the solver re-solves with the best measured plan as incumbent, its plan is evaluated, and
the best measured plan becomes the suggestion.

The budget counts distinct plans: an episode that repeats a plan is free, so the number of episodes
is capped too (`episodes_per_evaluation` x budget). Learning stops exactly at the budget.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.base import BudgetedProblem, BudgetExhausted, SearchResult, TrialCallback
from envs.deploy import DeployEnv
from explorer.accuracy import sensitivity_table
from explorer.errors import ExplorerError
from explorer.plan import Plan
from explorer.problem import Problem
from explorer.solver import Instance, MeasuredSolve, _block_observations, instance_for, predicted, solve, solve_measured

ACCURACY_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)  # accuracy limits of the behaviour-cloning plans, x the limit
LATENCY_SCALES = (1.0, 0.7)  # latency budgets of those plans, x the solver plan's predicted latency
ACCURACY_SCALE_RANGE = (0.5, 3.0)  # how far measurements may move the solver's accuracy budget
RATIO_QUANTILE = 0.9  # conservative measured/estimated accuracy-loss ratio
SOLVE_SECONDS = 20.0


class PPOAgent:
    """MaskablePPO seeded by the solver (first trial, behaviour cloning, suggestion in the
    observation), recalibrating the cost model and re-solving as it measures."""

    name = "ppo"

    def __init__(self, episodes_per_update: int = 8, minibatches: int = 2, epochs: int = 4,
                 learning_rate: float = 3e-4, entropy_coef: float = 0.01, clip_range: float = 0.2,
                 hidden: tuple[int, ...] = (64, 64), bc_steps: int = 300, bc_learning_rate: float = 3e-3,
                 strays: int = 4, alternative_weight: float = 0.1, recalibrate_every: int = 16,
                 episodes_per_evaluation: int = 20):
        self.episodes_per_update = episodes_per_update
        self.minibatches = minibatches
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.entropy_coef = entropy_coef
        self.clip_range = clip_range
        self.hidden = hidden
        self.bc_steps = bc_steps
        self.bc_learning_rate = bc_learning_rate
        self.strays = strays
        self.alternative_weight = alternative_weight
        self.recalibrate_every = recalibrate_every
        self.episodes_per_evaluation = episodes_per_evaluation

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> SearchResult:
        """Search within `budget` measured evaluations (distinct plans), deterministic for a seed."""
        budgeted = BudgetedProblem(problem, budget, self.name, callback)
        with _single_thread():
            try:
                self._search(budgeted, seed)
            except BudgetExhausted:
                pass
        return budgeted.result

    def _search(self, budgeted: BudgetedProblem, seed: int) -> None:
        set_random_seed(seed)
        budgeted.source = "solver"
        try:
            start = solve_measured(budgeted)
        except ExplorerError:  # the cost model finds no feasible plan: PPO searches unseeded
            start = None
        guide = SolverGuide(budgeted, start, self.recalibrate_every)
        env = DeployEnv(problem=budgeted, suggestion=guide.suggestion, cost_model=guide.cost_model)
        guide.env = env
        layers = len(env.layers)
        n_steps = layers * self.episodes_per_update
        model = MaskablePPO("MlpPolicy", DummyVecEnv([lambda: env]), learning_rate=self.learning_rate,
                            n_steps=n_steps, batch_size=max(n_steps // self.minibatches, 1), n_epochs=self.epochs,
                            gamma=1.0, gae_lambda=0.95, clip_range=self.clip_range, ent_coef=self.entropy_coef,
                            policy_kwargs={"net_arch": list(self.hidden)}, seed=seed, device="cpu", verbose=0)
        if guide.suggestion is not None:
            behaviour_clone(model, env, self._demonstrations(env, guide, seed), self.bc_steps, self.bc_learning_rate)
        budgeted.source = "policy"
        episodes = self.episodes_per_evaluation * budgeted.budget
        model.learn(total_timesteps=episodes * layers, callback=_SearchProgress(budgeted, guide, episodes))


    def _demonstrations(self, env: DeployEnv, guide: "SolverGuide", seed: int) -> list[Demonstration]:
        """Follow the suggestion (each solver plan as its own suggestion, and strayed trajectories
        of the solver plan labelled with it), and, with a small weight, its alternatives."""
        suggestion = guide.suggestion
        alternatives = guide.alternatives()
        rng = np.random.default_rng(seed)
        demonstrations = [Demonstration(plan, plan, plan, 1.0) for plan in alternatives]
        for _ in range(self.strays * len(alternatives)):
            demonstrations.append(Demonstration(_stray(env, suggestion, rng), suggestion, suggestion, 1.0))
        demonstrations += [Demonstration(plan, suggestion, plan, self.alternative_weight) for plan in alternatives[1:]]
        return demonstrations


@dataclass(frozen=True)
class Demonstration:
    """A trajectory to imitate: `plan` is played with `suggestion` in the observations, and each
    step is labelled with the decision of `labels`, weighted by `weight`."""

    plan: Plan
    suggestion: Plan
    labels: Plan
    weight: float


def behaviour_clone(model: MaskablePPO, env: DeployEnv, demonstrations: list[Demonstration], steps: int,
                    learning_rate: float) -> float:
    """Fit the policy's masked action distribution to the demonstrations by weighted
    cross-entropy (full batch, Adam); returns the final loss."""
    observations, masks, actions, weights = [], [], [], []
    for demo in demonstrations:
        for observation, mask, action in env.demonstration(demo.plan, demo.suggestion, demo.labels):
            observations.append(observation)
            masks.append(mask)
            actions.append(action)
            weights.append(demo.weight)
    observations_t = torch.as_tensor(np.array(observations))
    actions_t = torch.as_tensor(np.array(actions))
    weights_t = torch.as_tensor(np.array(weights, dtype=np.float32))
    masks_np = np.array(masks)
    policy = model.policy
    policy.set_training_mode(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    loss = torch.zeros(())
    for _ in range(steps):
        log_prob = policy.get_distribution(observations_t, action_masks=masks_np).log_prob(actions_t)
        loss = -(weights_t * log_prob).sum() / weights_t.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.set_training_mode(False)
    return float(loss.detach())


def _stray(env: DeployEnv, plan: Plan, rng: np.random.Generator, layers: int = 2) -> Plan:
    """`plan` with a few layers changed to random valid decisions."""
    for index in rng.choice(len(env.layers), size=min(layers, len(env.layers)), replace=False):
        layer = env.layers[int(index)]
        options = env.problem.choices(layer)
        plan = plan.with_decision(layer.name, options[int(rng.integers(len(options)))])
    return plan


class SolverGuide:
    """The solver's side of the search: its plans, recalibrated from the measurements."""

    def __init__(self, problem: BudgetedProblem, start: MeasuredSolve | None, every: int):
        self.problem = problem
        self.every = every
        self.base_model = start.cost_model if start else problem.cost_model
        self.cost_model = self.base_model
        self.sensitivity = sensitivity_table(problem.graph, problem.compressor, problem.scorer) if problem.scorer.measured else None
        self.suggestion: Plan | None = start.plan if start else None
        self.start_latency_s = next((s.latency_s for s, _ in start.rounds if s.plan == start.plan), None) if start else None
        self.env: DeployEnv | None = None
        self.refreshed_at = len(problem.result.trials)
        self._observations: list[tuple] = []  # block observations of the trials, by the base model
        self._accuracy_pairs: list[tuple[float, float]] = []  # (estimated, measured) accuracy loss per trial
        self._seen = 0

    @property
    def due(self) -> bool:
        return len(self.problem.result.trials) - self.refreshed_at >= self.every

    def alternatives(self) -> list[Plan]:
        """Distinct plans of the integer program for several accuracy limits and latency budgets
        (no measurement): the solver plan first."""
        instance = instance_for(self.problem, self.cost_model, self.sensitivity)
        plans = [self.suggestion]
        for latency_scale in LATENCY_SCALES:
            for accuracy_scale in ACCURACY_SCALES:
                variant = copy.copy(instance)
                if variant.accuracy_limit is not None:
                    variant.accuracy_limit *= accuracy_scale
                if self.start_latency_s is not None and latency_scale != 1.0:
                    budget = self.start_latency_s * latency_scale
                    variant.latency_budget_s = min(budget, variant.latency_budget_s or budget)
                solution = solve(variant, time_limit_s=SOLVE_SECONDS)
                if solution.plan is not None and solution.plan not in plans:
                    plans.append(solution.plan)
        return plans

    def refresh(self) -> None:
        """Recalibrate from every trial so far, re-solve with the best measured plan as incumbent,
        evaluate the solver's plan and make the best measured plan the suggestion."""
        self.refreshed_at = len(self.problem.result.trials)
        self._absorb_trials()
        self.cost_model = self.base_model.calibrated(self._observations)
        instance = instance_for(self.problem, self.cost_model, self.sensitivity)
        if instance.accuracy_limit is not None:
            instance.accuracy_limit *= self.accuracy_scale()
        best = self.problem.result.best_plan
        solution = solve(instance, _predicted_objective(instance, best) if best else None, SOLVE_SECONDS)
        if solution.plan is not None and self.problem.remaining > 0:
            self.problem.source = "solver"
            try:
                self.problem.evaluate(solution.plan)
            finally:
                self.problem.source = "policy"
        self.suggestion = self.problem.result.best_plan or solution.plan or self.suggestion
        self.env.set_suggestion(self.suggestion)
        self.env.set_cost_model(self.cost_model)

    def accuracy_scale(self) -> float:
        """Factor on the accuracy limit the solver uses: 1 / (a high quantile of the measured over
        estimated accuracy loss of the trials that used a real share of the limit)."""
        limit = self.problem.constraints.max_accuracy_drop
        ratios = [max(measured, 0.0) / estimated for estimated, measured in self._accuracy_pairs
                  if limit and estimated >= 0.25 * limit]
        if not ratios:
            return 1.0
        ratio = float(np.quantile(ratios, RATIO_QUANTILE))
        return float(np.clip(1.0 / max(ratio, 1e-9), *ACCURACY_SCALE_RANGE))

    def _absorb_trials(self) -> None:
        for trial in self.problem.result.trials[self._seen:]:
            self._observations += _block_observations(self.problem, self.base_model, trial.plan, trial.evaluation)
            if self.sensitivity is not None and trial.evaluation.accuracy_drop is not None:
                estimate = sum(self.sensitivity.estimate(name, d.method, d.rank, d.precision) for name, d in trial.plan.decisions)
                self._accuracy_pairs.append((estimate, trial.evaluation.accuracy_drop))
        self._seen = len(self.problem.result.trials)


def _predicted_objective(instance: Instance, plan: Plan) -> float | None:
    """The plan's objective on the instance's model (None if a decision is not among its choices)."""
    picks = []
    for options, (_, decision) in zip(instance.choices, plan.decisions):
        index = next((i for i, choice in enumerate(options) if choice.decision == decision), None)
        if index is None:
            return None
        picks.append(index)
    return predicted(instance, picks)["objective"]


class _SearchProgress(BaseCallback):
    """Stops learning at the budget or the episode cap; lets the solver guide refresh when due."""

    def __init__(self, problem: BudgetedProblem, guide: SolverGuide, max_episodes: int):
        super().__init__()
        self.problem = problem
        self.guide = guide
        self.max_episodes = max_episodes
        self.episodes = 0

    def _on_step(self) -> bool:
        self.episodes += sum("evaluation" in info for info in self.locals["infos"])
        if self.problem.remaining > 0 and self.guide.due:
            self.guide.refresh()
        return self.problem.remaining > 0 and self.episodes < self.max_episodes


@contextmanager
def _single_thread():
    """Small networks train fastest, and reproducibly, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
