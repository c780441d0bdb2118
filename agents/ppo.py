"""PPO agent: sb3-contrib's MaskablePPO on DeployEnv, seeded by the solver and extending it.

Seeded by the solver:
1. the measured solver (`solve_measured`: the baseline plan, then solve -> measure -> recalibrate
   rounds; every evaluation counted in the budget) goes first, so the best-so-far is never worse
   than the solver's measured plan;
2. the policy is warm-started by behaviour cloning (weighted cross-entropy of its masked action
   distribution, Adam, full batch) on trajectories replayed through the environment without
   measuring them: the integer program solved on the cost model for several accuracy limits and
   latency budgets gives a few distinct plans; each is imitated with itself as the observation's
   suggestion (so the policy learns to follow the suggestion), trajectories that strayed from the
   suggestion at a few random layers are labelled with the suggestion (so it finds its way back),
   and with a small weight the alternatives are imitated under the suggestion (so its deviations
   go where the solver's trade-offs are);
3. the suggestion for each layer is part of the observation.
Extending it: PPO optimises the *measured* reward; every `recalibrate_every` measured trials, and
whenever `stuck_episodes` episodes in a row repeated known plans, the measurements recalibrate the
cost model (per processor, op kind and precision, from the measured blocks) and the solver's accuracy
budget (the measured/estimated accuracy-loss ratio of the trials), the solver re-solves with the best
measured plan as incumbent, its plan is evaluated, then up to `local_proposals` plans the solver
predicts best within LOCAL_RADIUS layers of the best measured plan; the best measured plan becomes
the suggestion and the policy is re-anchored on it by a short behaviour cloning (the best measured
plans are then the alternatives). Every other refresh, the local plans and the suggestion start from
the best measured plan with accuracy headroom instead (`SolverGuide.refresh`).

The budget counts distinct plans: an episode that repeats a plan is free, so episodes are capped
too (`episodes_per_evaluation` x budget). Learning stops exactly at the budget.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv

from envs.deploy import DeployEnv
from explorer.accuracy import sensitivity_table
from explorer.errors import ExplorerError
from explorer.plan import Plan
from explorer.problem import Problem
from explorer.searching import BudgetedProblem, BudgetExhausted, SearchResult, Trial, TrialCallback
from explorer.solver import (
    Instance,
    MeasuredSolve,
    block_observations,
    instance_for,
    objective_of,
    picks_for,
    predicted,
    solve,
    solve_measured,
)

ACCURACY_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)  # accuracy limits of the behaviour-cloning plans, x the limit
LATENCY_SCALES = (1.0, 0.7)  # latency budgets of those plans, x the solver plan's predicted latency
ACCURACY_SCALE_RANGE = (0.5, 3.0)  # how far measurements may move the solver's accuracy budget
RATIO_QUANTILE = 0.9  # conservative measured/estimated accuracy-loss ratio
SOLVE_SECONDS = 20.0
BEST_ALTERNATIVES = 4  # best measured plans imitated (lightly) when re-anchoring
LOCAL_RADIUS = 3  # layers a local proposal of the solver may change in the plan it starts from
LOCAL_RESOLVES = 16  # local solves per proposal, each excluding the measured plan the previous one returned
HEADROOM_FRACTION = 0.6  # every other refresh anchors at the best plan measured within this share of the accuracy limit


@dataclass(frozen=True)
class Demonstration:
    """A trajectory to imitate: `plan` is played with `suggestion` in the observations, and each
    step is labelled with the decision of `labels`, weighted by `weight`."""

    plan: Plan
    suggestion: Plan
    labels: Plan
    weight: float


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
        with _fast_torch():
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
            start = solve_measured(budgeted)
        except ExplorerError:  # the cost model predicts no feasible plan: PPO searches unseeded
            start = None
        budgeted.result.seed_plan = start.plan if start else None
        guide = SolverGuide(budgeted, start)
        envs = [DeployEnv(problem=budgeted, suggestion=guide.suggestion, cost_model=guide.cost_model)
                for _ in range(self.parallel_episodes)]
        layers = len(envs[0].layers)
        n_steps = layers * max(self.episodes_per_update // self.parallel_episodes, 1)
        model = MaskablePPO("MlpPolicy", BatchedEvaluationVecEnv([lambda e=e: e for e in envs]),  # in-process: one budget
                            learning_rate=self.learning_rate, n_steps=n_steps,
                            batch_size=max(n_steps * self.parallel_episodes // self.minibatches, 1),
                            n_epochs=self.epochs, gamma=1.0, gae_lambda=0.95, clip_range=self.clip_range,
                            ent_coef=self.entropy_coef, policy_kwargs={"net_arch": list(self.hidden)}, seed=seed,
                            device="cpu", verbose=0)
        model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes an empty /tmp/SB3-* folder per search
        rng = np.random.default_rng(seed)
        if guide.suggestion is not None:
            demonstrations = self.demonstrations(envs[0], guide.suggestion, guide.alternatives(), rng)
            behaviour_clone(model, envs[0], demonstrations, self.bc_steps, self.bc_learning_rate, self.smoothing)
        budgeted.source = "policy"
        episodes = self.episodes_per_evaluation * budgeted.budget
        progress = _SearchProgress(self, budgeted, guide, envs, rng, episodes)
        model.learn(total_timesteps=episodes * layers, callback=progress)

    def demonstrations(self, env: DeployEnv, suggestion: Plan, alternatives: list[Plan],
                        rng: np.random.Generator) -> list[Demonstration]:
        """Follow the suggestion (each plan as its own suggestion; strayed trajectories labelled
        with the suggestion) and, with a small weight, deviate towards the alternatives."""
        plans = [suggestion] + [plan for plan in alternatives if plan != suggestion]
        demonstrations = [Demonstration(plan, plan, plan, 1.0) for plan in plans]
        demonstrations += [Demonstration(_stray(env, suggestion, rng), suggestion, suggestion, 1.0)
                           for _ in range(self.strays * len(plans))]
        demonstrations += [Demonstration(plan, suggestion, plan, self.alternative_weight) for plan in plans[1:]]
        return demonstrations


class BatchedEvaluationVecEnv(DummyVecEnv):
    """DummyVecEnv whose environments end their episodes on the same step (one step per layer): when
    the problem measures several plans at once (remote agents), the plans those steps complete are
    evaluated together first, in environment order, and the environments then find them evaluated.
    With one plan at a time it is DummyVecEnv."""

    def step_wait(self):
        problem = self.envs[0].problem
        if problem.parallelism > 1:
            plans = [plan for env, action in zip(self.envs, self.actions) if (plan := env.plan_if(action)) is not None]
            if len(plans) > 1:
                problem.evaluate_many(plans)
        return super().step_wait()


def behaviour_clone(model: MaskablePPO, env: DeployEnv, demonstrations: list[Demonstration], steps: int,
                    learning_rate: float, smoothing: float) -> float:
    """Fit the policy's masked action distribution to the demonstrations: weighted cross-entropy
    with label smoothing (each sub-action's target puts `smoothing` uniformly on its unmasked
    values, so however long it trains the policy keeps that much exploration), full batch, Adam.
    Returns the final loss."""
    observations, masks, actions, weights = [], [], [], []
    for demo in demonstrations:
        for observation, mask, action in env.demonstration(demo.plan, demo.suggestion, demo.labels):
            observations.append(observation)
            masks.append(mask)
            actions.append(action)
            weights.append(demo.weight)
    observations_t = torch.as_tensor(np.array(observations))
    actions_t = torch.as_tensor(np.array(actions), dtype=torch.long)
    weights_t = torch.as_tensor(np.array(weights, dtype=np.float32))
    masks_np = np.array(masks)
    masks_t = torch.split(torch.as_tensor(masks_np, dtype=torch.float32), list(env.action_space.nvec), dim=1)
    policy = model.policy
    policy.set_training_mode(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    loss = torch.zeros(())
    with _fast_torch():
        for _ in range(steps):
            distribution = policy.get_distribution(observations_t, action_masks=masks_np)
            per_sample = torch.zeros(len(weights_t))
            for dim, (categorical, mask) in enumerate(zip(distribution.distributions, masks_t)):
                log_probs = categorical.logits  # normalised; masked values are very negative
                chosen = log_probs.gather(1, actions_t[:, dim:dim + 1]).squeeze(1)
                uniform = (log_probs * mask).sum(1) / mask.sum(1)
                per_sample = per_sample - (1 - smoothing) * chosen - smoothing * uniform
            loss = (weights_t * per_sample).sum() / weights_t.sum()
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

    def __init__(self, problem: BudgetedProblem, start: MeasuredSolve | None):
        self.problem = problem
        self.base_model = start.cost_model if start else problem.cost_model
        self.cost_model = self.base_model
        self.sensitivity = (sensitivity_table(problem.graph, problem.compressor, problem.scorer)
                            if problem.scorer.measured else None)
        # the solver's plan, even where a reference measured better: cloning a compressed plan puts the policy
        # near the plans that beat the references (cloning the fp32 baseline kept it there: measured on vgg)
        self.suggestion: Plan | None = start.plan if start else problem.result.best_plan
        self.start_latency_s = (next((s.latency_s for s, _ in start.rounds if s.plan == start.plan), None)
                                if start else None)
        self._observations: list[tuple] = []  # block observations of the trials, by the base model
        self._accuracy_pairs: list[tuple[float, float]] = []  # (estimated, measured) accuracy loss per trial
        self._absorbed = 0
        self._cuts: list[list[int]] = []  # measured plans (choice indices) the local solves had to exclude
        self._refreshes = 0

    def alternatives(self) -> list[Plan]:
        """Distinct plans of the integer program for several accuracy limits and latency budgets
        (on the cost model: no measurement)."""
        instance = instance_for(self.problem, self.cost_model, self.sensitivity)
        plans: list[Plan] = []
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

    def refresh(self, local_proposals: int = 0) -> Plan | None:
        """Recalibrate from every trial so far, re-solve with the best measured plan as incumbent,
        evaluate the solver's plan and up to `local_proposals` plans of `local_plan` around the best
        measured plan; the suggestion becomes the best measured plan (returned).

        Every other refresh, local proposals and suggestion start instead from the best plan that
        leaves accuracy headroom (`best_with_headroom`): a best plan at the accuracy limit has no
        neighbour that compresses more, one with headroom does, so the search does not stall there."""
        self._absorb_trials()
        self.cost_model = self.base_model.calibrated(self._observations)
        instance = instance_for(self.problem, self.cost_model, self.sensitivity)
        scaled = copy.copy(instance)
        if scaled.accuracy_limit is not None:
            scaled.accuracy_limit *= self.accuracy_scale()
        best = self.problem.result.best_plan
        solution = solve(scaled, objective_of(scaled, best) if best else None, SOLVE_SECONDS)
        self._evaluate(solution.plan, "solver")
        roomy = self.best_with_headroom() if self._refreshes % 2 else None
        self._refreshes += 1
        anchor = roomy or self.problem.result.best_trial
        for _ in range(local_proposals):
            if anchor is None or not self._evaluate(self.local_plan(instance, anchor), "solver-local"):
                break
        self.suggestion = (roomy.plan if roomy else self.problem.result.best_plan) or solution.plan or self.suggestion
        return self.suggestion

    def best_with_headroom(self) -> Trial | None:
        """The best feasible trial whose measured accuracy loss is at most HEADROOM_FRACTION of the
        limit (None without an accuracy limit or such a trial)."""
        limit = self.problem.constraints.max_accuracy_drop
        if not limit:
            return None
        roomy = [t for t in self.problem.result.trials if t.evaluation.feasible
                 and t.evaluation.accuracy_drop is not None and t.evaluation.accuracy_drop <= HEADROOM_FRACTION * limit]
        return min(roomy, key=lambda t: t.evaluation.objective, default=None)

    def local_plan(self, instance: Instance, anchor: Trial) -> Plan | None:
        """The plan the model predicts best among the unmeasured ones that change at most
        LOCAL_RADIUS layers of the anchor's plan and are predicted no worse than it, the accuracy
        estimate anchored at that plan's measured loss: its additive estimate plus the measured
        headroom to the limit, scaled like the global budget (None if the model sees none)."""
        anchor_picks = picks_for(instance, anchor.plan)
        if anchor_picks is None:
            return None
        local = copy.copy(instance)
        predicted_anchor = predicted(local, anchor_picks)
        limit = self.problem.constraints.max_accuracy_drop
        if local.accuracy_limit is not None and limit is not None and anchor.evaluation.accuracy_drop is not None:
            headroom = max(limit - anchor.evaluation.accuracy_drop, 0.0)
            local.accuracy_limit = predicted_anchor["accuracy_drop"] + headroom * self.accuracy_scale()
        cuts = [anchor_picks] + [picks for picks in self._cuts if sum(a != b for a, b in zip(picks, anchor_picks)) <= LOCAL_RADIUS]
        for _ in range(LOCAL_RESOLVES):  # cuts added lazily: excluding every measured plan nearby slows HiGHS down
            solution = solve(local, predicted_anchor["objective"], SOLVE_SECONDS, exclude=cuts, near=(anchor_picks, LOCAL_RADIUS))
            if solution.plan is None or not self.problem.has_measured(solution.plan):
                return solution.plan
            cuts.append(picks_for(local, solution.plan))
            self._cuts.append(cuts[-1])
        return None

    def _evaluate(self, plan: Plan | None, source: str) -> bool:
        """Measure a new plan of the solver's (if any and the budget allows); whether it was measured."""
        if plan is None or self.problem.remaining <= 0 or self.problem.has_measured(plan):
            return False
        self.problem.evaluate(plan, source)
        return True

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
        for trial in self.problem.result.trials[self._absorbed:]:
            self._observations += block_observations(self.problem, self.base_model, trial.plan, trial.evaluation)
            if self.sensitivity is not None and trial.evaluation.accuracy_drop is not None:
                estimate = sum(self.sensitivity.estimate(name, d.method, d.rank, d.precision)
                               for name, d in trial.plan.decisions)
                self._accuracy_pairs.append((estimate, trial.evaluation.accuracy_drop))
        self._absorbed = len(self.problem.result.trials)


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
            demonstrations = self.agent.demonstrations(self.envs[0], suggestion, best, self.rng)
            behaviour_clone(self.model, self.envs[0], demonstrations, self.agent.anchor_steps,
                            self.agent.bc_learning_rate, self.agent.smoothing)


@contextmanager
def _fast_torch():
    """Small networks train fastest, and reproducibly, on one thread; the masked distributions'
    argument validation costs more than the network itself."""
    threads, validate = torch.get_num_threads(), torch.distributions.Distribution._validate_args
    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.distributions.Distribution.set_default_validate_args(validate)
