"""What a search is, whoever runs it: the Agent protocol, the budgeted problem, trials, the result, the Pareto front.

An agent proposes plans and learns from their evaluations; the budget counts *measured* evaluations,
i.e. distinct plans (asking again for a plan already evaluated in this search costs nothing and is not
a new trial). Every agent goes through `BudgetedProblem.evaluate`, so trials, best-so-far curves,
the budget and screening are kept in one place. Screening (explorer.screening, on a real device with a
kernel table): a plan the table predicts far from the best is answered with its predicted Evaluation and
not measured; such answers are counted apart (`SearchResult.predicted`), never trials, never in the
budget. A search's first trials are the problem's reference plans (`Problem.reference_plans`: what a
user would try anyway, always measured), so the best plan a search reports is never worse than any of them.

The agents live in agents/ and build on this module; the core (tracking, plots, workers, the CLI)
reads their results through it and makes them by name (`make_agent`, through `AGENT_REGISTRY`), never
importing agents/. (Not `explorer/search.py`: that submodule would replace the API function `explorer.search`.)
"""
from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from explorer.errors import ExplorerError
from explorer.plan import Plan
from explorer.problem import Constraints, Evaluation, Objective, Problem
from explorer.registry import Registry
from explorer.screening import Screen

if TYPE_CHECKING:
    import optuna

    from explorer.accuracy import AccuracyScorer
    from explorer.boards import Board
    from explorer.compress import Compressor, Rung
    from explorer.cost import CostModel
    from explorer.graph import Layer, LayerGraph
    from explorer.measure import Measurer
    from explorer.plan import Decision

#: The metrics of the Pareto front (all minimised), and their names with units as NSGA-II is told them.
PARETO_METRICS = ("latency_ms", "energy_mj", "memory_mb", "accuracy_drop")
PARETO_METRIC_NAMES = ("latency (ms)", "energy (mJ)", "weight memory (MB)", "accuracy drop (points)")


class BudgetExhausted(Exception):
    """Raised by BudgetedProblem.evaluate when a new plan would exceed the budget."""


@dataclass
class Trial:
    """One measured evaluation of a search."""

    number: int  # 0-based, in the order evaluated
    plan: Plan
    evaluation: Evaluation
    agent: str
    source: str  # what proposed it: e.g. "solver", "policy", "tpe", "random"
    seconds: float  # wall time of the evaluation (of its batch, shared out, when measured in parallel)
    study_trial: int | None = None  # the trial's number in a shared Optuna study (distributed search)

    @property
    def failed(self) -> bool:
        """The measurement failed (no agent could measure the plan): counted, never best."""
        return self.evaluation.failed


@dataclass
class SearchResult:
    """Every trial, the best feasible plan, and best-so-far against measured evaluations.

    `trials` are measured (device measurements, or a simulator's); `predicted` the plans answered with the kernel
    table's prediction instead (explorer.screening), in the order asked: never best, never on the curve."""

    agent: str
    trials: list[Trial] = field(default_factory=list)
    best_so_far: list[float] = field(default_factory=list)  # objective of the best feasible after each trial; inf before
    best_trial: Trial | None = None
    interrupted: bool = False
    seed_plan: Plan | None = None  # the solver's plan the agent started from (None: it used none)
    run_id: str | None = None  # the MLflow parent run of a tracked search (explorer.search)
    predicted: list[Trial] = field(default_factory=list)  # plans screened: answered with a prediction, not measured
    screening: str | None = None  # the screening rule with its margin at the end (None: every plan was measured)

    @property
    def best_plan(self) -> Plan | None:
        return self.best_trial.plan if self.best_trial else None

    @property
    def best(self) -> Evaluation | None:
        return self.best_trial.evaluation if self.best_trial else None

    @property
    def feasible_count(self) -> int:
        return sum(t.evaluation.feasible for t in self.trials)


TrialCallback = Callable[[Trial, SearchResult], None]


def pareto_point(evaluation: Evaluation) -> list[float]:
    """PARETO_METRICS in the units of PARETO_METRIC_NAMES (the accuracy drop in points)."""
    return [evaluation.latency_ms, evaluation.energy_mj, evaluation.memory_mb, 100 * (evaluation.accuracy_drop or 0.0)]


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """The feasible trials that no other feasible trial dominates on PARETO_METRICS (all minimised)."""
    feasible = [t for t in trials if t.evaluation.feasible]
    if not feasible:
        return []
    points = np.array([pareto_point(t.evaluation) for t in feasible])
    front = []
    for trial, point in zip(feasible, points):
        dominated = np.any(np.all(points <= point, axis=1) & np.any(points < point, axis=1))
        if not dominated:
            front.append(trial)
    return front


class BudgetedProblem:
    """A Problem seen through a budget: counts distinct plans, records trials and best-so-far, screens.

    It offers the Problem's description and design space (graph, board, constraints, choices,
    reference plans...) by name, so code written for a Problem (the solver's measured loop, the
    environment) runs on a budget unchanged; `problem` is the Problem itself.
    """

    def __init__(self, problem: Problem, budget: int, agent: str, callback: TrialCallback | None = None,
                 references: bool = True):
        """``references``: the problem's reference plans are this search's first trials, measured when the
        agent first evaluates anything (inside its own Ctrl-C handling); an agent that proposes them
        itself, e.g. through an Optuna study's queue, passes False."""
        if budget < 1:
            raise ValueError("the budget must be at least one evaluation")
        self.problem = problem
        self.budget = budget
        self.result = SearchResult(agent)
        self.callback = callback
        self.source = agent
        self._seen: dict[str, Evaluation] = {}
        self._failed_in_batch: dict[str, Evaluation] = {}  # failed plans of the last batch, not yet asked for again
        self._references_pending = references
        self.screen = Screen.for_problem(problem, budget)  # None: every plan is measured
        self._predicted: dict[str, Evaluation] = {}  # plans answered with their prediction (asking again is free)
        if self.screen is not None:
            self.result.screening = self.screen.describe()

    # ---- the Problem's description and design space, as it has them now -------------------------
    @property
    def graph(self) -> LayerGraph:
        return self.problem.graph

    @property
    def board(self) -> Board:
        return self.problem.board

    @property
    def measurer(self) -> Measurer:
        return self.problem.measurer

    @property
    def scorer(self) -> AccuracyScorer:
        return self.problem.scorer

    @property
    def constraints(self) -> Constraints:
        return self.problem.constraints

    @property
    def objective(self) -> Objective:
        return self.problem.objective

    @property
    def compressor(self) -> Compressor:
        return self.problem.compressor

    @property
    def cost_model(self) -> CostModel:
        return self.problem.cost_model

    @property
    def parallelism(self) -> int:
        return self.problem.parallelism

    def rungs(self, layer: Layer) -> list[Rung]:
        return self.problem.rungs(layer)

    def choices(self, layer: Layer) -> list[Decision]:
        return self.problem.choices(layer)

    def validate(self, plan: Plan) -> None:
        self.problem.validate(plan)

    def uniform_plan(self, processor: str, precision: str = "fp32") -> Plan:
        return self.problem.uniform_plan(processor, precision)

    def baseline_plan(self) -> Plan:
        return self.problem.baseline_plan()

    def reference_plans(self) -> list[tuple[str, Plan]]:
        return self.problem.reference_plans()

    def random_plan(self, rng: np.random.Generator) -> Plan:
        return self.problem.random_plan(rng)

    def objective_value(self, evaluation: Evaluation) -> float:
        return self.problem.objective_value(evaluation)

    # ---- evaluation through the budget ----------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.budget - len(self.result.trials)

    def has_measured(self, plan: Plan) -> bool:
        """Whether this search already measured the plan successfully or answered it with its prediction (asking
        for it again is free)."""
        return plan.digest() in self._seen or plan.digest() in self._predicted

    def evaluate(self, plan: Plan, source: str | None = None, study_trial: int | None = None) -> Evaluation:
        """Evaluate a plan; a new plan beyond the budget raises BudgetExhausted."""
        key = plan.digest()
        if key in self._seen:
            return self._seen[key]
        if key in self._predicted:
            return self._predicted[key]
        if key in self._failed_in_batch:  # failed moments ago in a batch: that trial stands, no second one
            return self._failed_in_batch.pop(key)
        if self.remaining <= 0:
            raise BudgetExhausted
        evaluation = self.evaluate_many([plan], [source], [study_trial])[0]
        if evaluation is None:  # the reference plans took the rest of the budget
            raise BudgetExhausted
        return evaluation

    def evaluate_many(self, plans: list[Plan], sources: list[str | None] | None = None,
                      study_trials: list[int | None] | None = None) -> list[Evaluation | None]:
        """Evaluate several plans at once (in parallel where the measurer can); a new plan beyond the
        budget gets None. Plans already evaluated in this search are free (a failed one is not:
        it is measured again). With a screen, each new plan is predicted first, and one the screen skips is
        answered with its prediction (never a reference plan); the others are measured, and their predictions'
        errors set the screen's margin."""
        if self._references_pending:
            self._references_pending = False
            references = [plan for _, plan in self.problem.reference_plans()]
            self.evaluate_many(references, ["reference"] * len(references))
        sources = sources or [None] * len(plans)
        study_trials = study_trials or [None] * len(plans)
        new: dict[str, tuple[Plan, str | None, int | None]] = {}
        guesses: dict[str, tuple[Evaluation, bool]] = {}  # the predictions of the plans measured, and whether sure
        best = self.result.best_trial.evaluation.objective if self.result.best_trial else None
        for plan, source, number in zip(plans, sources, study_trials):
            key = plan.digest()
            if key in self._seen or key in self._predicted or key in new or len(new) >= self.remaining:
                continue
            if self.screen is not None:
                started = time.perf_counter()
                guesses[key] = predicted, sure = self.screen.predict(plan)
                if source != "reference" and self.screen.skips(predicted, sure, best):
                    self._answer(plan, predicted, source, time.perf_counter() - started, number)
                    continue
            new[key] = (plan, source, number)
        started = time.perf_counter()
        evaluations = self.problem.evaluate_many([plan for plan, _, _ in new.values()]) if new else []
        seconds = (time.perf_counter() - started) / max(1, len(new))
        fresh = {}
        for (key, (plan, source, number)), evaluation in zip(new.items(), evaluations):
            if self.screen is not None:
                self.screen.learn(*guesses[key], evaluation)
            self._record(plan, evaluation, source, seconds, number)
            fresh[key] = evaluation
        if self.screen is not None:
            self.result.screening = self.screen.describe()
        self._failed_in_batch = {key: e for key, e in fresh.items() if e.failed} if len(new) > 1 else {}
        return [self._seen.get(plan.digest()) or fresh.get(plan.digest()) or self._predicted.get(plan.digest())
                for plan in plans]

    def _answer(self, plan: Plan, predicted: Evaluation, source: str | None, seconds: float,
                study_trial: int | None) -> None:
        """A plan answered with its prediction: kept (asking again is free) and counted, never a trial. No callback:
        predictions are not logged as trials (explorer.tracking counts them on the parent run)."""
        assert self.screen is not None and predicted.predicted
        self.screen.answered += 1
        self._predicted[plan.digest()] = predicted
        self.result.predicted.append(Trial(len(self.result.predicted), plan, predicted, self.result.agent,
                                           source or self.source, seconds, study_trial))

    def _record(self, plan: Plan, evaluation: Evaluation, source: str | None, seconds: float, study_trial: int | None) -> None:
        if evaluation.predicted:  # never a trial: a trial is what the device (or the simulator) measured
            raise ValueError(f"plan {plan.digest()[:12]} was predicted, not measured: it cannot be a trial")
        trial = Trial(len(self.result.trials), plan, evaluation, self.result.agent, source or self.source, seconds, study_trial)
        if not evaluation.failed:
            self._seen[plan.digest()] = evaluation
        result = self.result
        result.trials.append(trial)
        if evaluation.feasible and (result.best_trial is None or evaluation.objective < result.best_trial.evaluation.objective):
            result.best_trial = trial
        result.best_so_far.append(result.best_trial.evaluation.objective if result.best_trial else math.inf)
        if self.callback:
            self.callback(trial, result)


@runtime_checkable
class Agent(Protocol):
    """A search agent: what the CLI, the API, the benchmarks and the tests ask of every agent."""

    name: str  # its name in AGENT_REGISTRY
    anytime: bool  # its proposals do not depend on the budget: best_so_far[n - 1] is its result at budget n

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> SearchResult:
        """Search for the best feasible plan within `budget` measured evaluations (distinct plans),
        deterministic for a seed; Ctrl-C ends it early with the trials so far (`interrupted` set)."""
        ...


@runtime_checkable
class StudyAgent(Agent, Protocol):
    """An agent that keeps its trials in an Optuna study, which other processes may share (the Optuna
    agents): what a tracked or distributed search asks of it besides `search`."""

    source: str  # Trial.source of the plans its sampler proposes
    study: optuna.Study | None  # the last search's study

    def link_run(self, run_id: str, tracking_uri: str) -> None:
        """Name the MLflow parent run (and its tracking URI) that logs its trials, in its study."""
        ...

    def open_study(self, problem: Problem, seed: int) -> optuna.Study:
        """Create (with the start plans enqueued) or load the study of this problem and seed."""
        ...

    def study_result(self, problem: Problem, study: optuna.Study) -> SearchResult:
        """Every measured trial of a (shared) study, in trial-number order, as one search's result."""
        ...


#: The search agents by name, one module each under agents/ (named by entry point: agents/ builds on this module).
AGENT_REGISTRY: Registry[type[Agent]] = Registry("agent", {
    "ppo": "explorer.agents.ppo:PPOAgent",
    "optuna-tpe": "explorer.agents.optuna_agents:OptunaTPEAgent",
    "optuna-nsga2": "explorer.agents.optuna_agents:OptunaNSGA2Agent",
    "random": "explorer.agents.random_search:RandomAgent",
    "solver": "explorer.agents.solver_agent:SolverAgent",
})


def make_agent(name: str, **options: Any) -> Agent:
    """The agent called `name`, built with its keyword options (ExplorerError for an unknown name or option)."""
    cls = AGENT_REGISTRY.lookup(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as error:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        raise ExplorerError(f"agent {name!r} does not take these options ({error}): it accepts "
                            f"{', '.join(accepted) or 'none'}") from None
    return cls(**options)
