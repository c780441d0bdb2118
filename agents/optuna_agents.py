"""Optuna search agents: TPE on the problem's objective, NSGA-II on a four-metric Pareto front.

Search space (explorer.studies.DesignSpace): one categorical parameter per decision layer; its choices
are the layer's `Problem.choices(layer)` as decision labels (`Decision.label`, e.g.
"spatial:16/int8@gpu"), so every sampled plan is valid and optuna-dashboard shows (and ranks the
importance of) decisions, not list indices. The samplers work on a choice's position in the list, so
labels sample exactly as indices did. A study made before the labels (its parameters are indices) is
resumed as it is, with indices.

Start plans: a new study starts with enqueued trials: the problem's reference plans (the
uncompressed model in fp32 on each processor, whole-model int8 and fp16: what a user would try
anyway), then the solver's cost-model plan (`solve_problem`, no measurement), so that the samplers
have feasible anchors even when the additive model's plan misses a constraint once measured, and the
best found is never worse than a reference.

Constraints: before Optuna is told a trial's values, its system attribute "constraints" gets one
value per entry of CONSTRAINTS (<= 0 when satisfied), read from the Evaluation's excess
(`Evaluation.worst_excess`): latency, accuracy drop and memory (the worst of the weight-memory limit, a
processor's capacity and the board's memory), each relative to its limit, and "other", 1 when the
Problem reports a violation the others do not explain. This list is the form
optuna-dashboard reads to mark infeasible trials, and Optuna's samplers read it too (Optuna 5's
`Trial.set_constraint` writes "constraints:NAME" attributes, which the dashboard does not read). The
Problem's verdict is the authority: a feasible plan never gets a positive value. TPE then models
every feasible trial as better than every infeasible one (infeasible ones ranked by total violation,
their values unread); NSGA-II uses constrained domination.

What optuna-dashboard shows: the objectives by name with their units (`Study.set_metric_names`;
NSGA-II's accuracy drop in points); per trial the user attributes "objective" (the problem's
objective as measured) and, when infeasible, "violations" (the Problem's reasons); and as the study's
user attributes the model, board, objective, limits (accuracy in points), who measured, the accuracy
basis and the MLflow parent run and tracking URI of the last search that opened it (`link_run`). Its
best trial of a single-objective study is the least value whatever the constraints (optuna-dashboard
#772), so a TPE trial that is infeasible is told +inf: the best trial shown is the best feasible one,
and TPE, which never reads an infeasible trial's value, samples as before.

Storage and resume: studies live in an Optuna storage (explorer.studies.open_storage: default SQLite
`runs/optuna.db`; any Optuna storage URL, an Optuna storage object or "memory"), under a name derived from the model,
board, objective, agent, seed and a hash of the remaining settings (constraints, measurer, data,
board file). An existing study is resumed: its complete trials are replayed in order through the
BudgetedProblem (their measurements come from the Problem's caches; only a plan whose cache is gone
is measured again) and count toward the budget, so the study ends with `budget` distinct evaluated
plans and the result covers the whole study. The resumed sampler is seeded with seed + the study's
trial count (deterministic, but not a replay of the first session's random stream).

Distributed search (`shared=True`): several processes or machines add trials to one study (an
Optuna RDB storage such as PostgreSQL). Each counts only its own trials against its budget, samples
with its own seed (TPE with constant_liar, so running trials elsewhere are not proposed again) and
records each trial's study number and, as the user attribute `worker`, the process that asked for it
(explorer/workers.py fails and re-queues a dead worker's trials); the study's start plans are
enqueued once, by whoever creates it.

Duplicates: a sampler may propose a plan already evaluated; the BudgetedProblem returns it free,
Optuna is still told its values (marked with the user attribute duplicate=True), and it does not
count. The search stops when the budget is spent, when every plan of the design space has been
evaluated, or after `asks_per_trial` x budget asks that brought nothing new (a plan screened on a real
device, answered with the kernel table's prediction, is new: explorer.screening caps those).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from explorer.errors import ExplorerError
from explorer.plan import Plan
from explorer.problem import CONSTRAINT_KINDS, Evaluation, Problem
from explorer.report import objective_label
from explorer.searching import (
    PARETO_METRIC_NAMES,
    PARETO_METRICS,
    BudgetedProblem,
    BudgetExhausted,
    SearchResult,
    Trial,
    TrialCallback,
    pareto_front,
    pareto_point,
)
from explorer.solver import solve_problem
from explorer.studies import DesignSpace, default_study_name, open_storage
from explorer.workers import WORKER_ATTR, worker_identity

CONSTRAINTS = (*CONSTRAINT_KINDS, "other")
CONSTRAINTS_ATTR = "constraints"  # the trial system attribute optuna-dashboard and Optuna's samplers read (a list)

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)


@dataclass
class ParetoSearchResult(SearchResult):
    """A SearchResult with the Pareto front of the feasible trials."""

    pareto: list[Trial] = field(default_factory=list)


def constraint_values(evaluation: Evaluation) -> list[float]:
    """One value per entry of CONSTRAINTS, <= 0 when satisfied, consistent with evaluation.feasible: the
    evaluation's worst relative excess of each kind (0 where no constraint of that kind applies)."""
    values = [evaluation.worst_excess(kind) or 0.0 for kind in CONSTRAINT_KINDS]
    if evaluation.feasible:
        return [min(v, 0.0) for v in values] + [0.0]
    return values + [0.0 if max(values) > 0 else 1.0]


def study_settings(problem: Problem) -> dict:
    """What a study's trials mean, as its user attributes (optuna-dashboard shows them with the study)."""
    c = problem.constraints
    return {"model": problem.graph.source, "board": problem.board.name, "objective": objective_label(problem),
            "latency_limit_ms": c.latency_ms if c.latency_ms is not None else "none",
            "max_accuracy_drop_points": round(100 * c.max_accuracy_drop, 6) if c.max_accuracy_drop is not None else "none",
            "memory_limit_mb": c.memory_mb if c.memory_mb is not None else "none",
            "measured_by": problem.measurer.label(problem.board), "accuracy_basis": problem.scorer.label,
            "constraints": f"{', '.join(CONSTRAINTS)}: each relative to its limit, <= 0 when met"}


class _OptunaAgent:
    """The ask/evaluate/tell loop shared by the TPE and NSGA-II agents."""

    name = ""
    source = ""  # Trial.source of sampled plans
    anytime = True  # proposals do not depend on the budget: best_so_far[n - 1] is the result at budget n
    directions: list[Literal["minimize", "maximize"]] = []

    def __init__(self, storage: str | BaseStorage | None = None, study_name: str | None = None,
                 asks_per_trial: int = 20, sampler_options: dict | None = None, shared: bool = False):
        self.storage = storage
        self.study_name = study_name
        self.shared = shared  # other workers add to the same study: count only this search's trials
        self.asks_per_trial = asks_per_trial
        self.sampler_options = sampler_options or {}
        self.study: optuna.Study | None = None  # the last search's study
        self.space: DesignSpace | None = None  # its design space, as the study stores it
        self.run_link: dict[str, str] = {}  # the MLflow parent run, written to the study's user attributes

    def link_run(self, run_id: str, tracking_uri: str) -> None:
        """Name the MLflow parent run (and its tracking URI) that logs this agent's trials in its study."""
        self.run_link = {"mlflow_run_id": run_id, "mlflow_tracking_uri": tracking_uri}

    def metric_names(self, problem: Problem) -> list[str]:
        """The objectives as optuna-dashboard names them, with units."""
        raise NotImplementedError

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def values(self, evaluation: Evaluation) -> list[float]:
        raise NotImplementedError

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> SearchResult:
        budgeted = BudgetedProblem(problem, budget, self.name, callback, references=False)  # enqueued instead
        study, space = self._open_study(problem, seed)
        budgeted.result.seed_plan = self.enqueued_solver_plan(study, space)
        resumed = any(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
        if resumed and not self.shared:  # resumed: a fresh random stream, or the sampler would redraw its first proposals
            study.sampler = self.sampler(seed + len(study.trials))
        trials = budgeted.result.trials
        target = min(budget, space.size)
        try:
            if not self.shared:
                self._replay(study, budgeted, space)
            batch = max(1, problem.parallelism)  # plans measured at once (measurement servers)
            predicted = budgeted.result.predicted  # plans screened on a real device: new plans too, not stalls
            stalls, limit = 0, self.asks_per_trial * budget // batch + 1
            while len(trials) < target and stalls < limit:
                before = len(trials) + len(predicted)
                self._step(study, budgeted, space, problem, min(batch, target - len(trials)))
                stalls += len(trials) + len(predicted) == before  # every ask one evaluated before
        except KeyboardInterrupt:
            budgeted.result.interrupted = True
        return budgeted.result

    def open_study(self, problem: Problem, seed: int) -> optuna.Study:
        """Create (with the start plans enqueued) or load the study, and describe it (`_describe`); also kept
        as `self.study`, its design space as `self.space`."""
        return self._open_study(problem, seed)[0]

    def _open_study(self, problem: Problem, seed: int) -> tuple[optuna.Study, DesignSpace]:
        study_name = self.study_name or default_study_name(problem, self.name, seed)
        study = optuna.create_study(storage=open_storage(self.storage), study_name=study_name,
                                    sampler=self.sampler(seed), directions=self.directions, load_if_exists=True)
        space = DesignSpace.for_study(problem, study)
        if not study.trials:
            self._enqueue_start_plans(study, problem, space)
        self._describe(study, problem)
        self.study, self.space = study, space
        return study, space

    def _describe(self, study: optuna.Study, problem: Problem) -> None:
        """Name the objectives and write the settings and the MLflow run as study user attributes; only what
        changed is written (every worker of a shared study opens it)."""
        names = self.metric_names(problem)
        if study.metric_names != names:
            with warnings.catch_warnings():  # set_metric_names is experimental since Optuna 3.2, and what the dashboard reads
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        stored = study.user_attrs
        for key, value in (study_settings(problem) | self.run_link).items():
            if stored.get(key) != value:
                study.set_user_attr(key, value)

    def study_result(self, problem: Problem, study: optuna.Study) -> SearchResult:
        """Every measured trial of a (shared) study in trial-number order, as one search's result.
        Their evaluations come from the Problem's caches (measured again only where a cache is gone)."""
        measured = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if not t.user_attrs.get("duplicate")]
        budgeted = BudgetedProblem(problem, max(1, len(measured)), self.name, references=False)
        space = DesignSpace.for_study(problem, study)
        for frozen in sorted(measured, key=lambda t: t.number):
            budgeted.evaluate(space.plan(frozen.params, study.study_name), frozen.user_attrs.get("source", self.source),
                              frozen.number)
        budgeted.result.seed_plan = self.enqueued_solver_plan(study, space)
        return budgeted.result

    def _step(self, study: optuna.Study, budgeted: BudgetedProblem, space: DesignSpace, problem: Problem, size: int) -> None:
        """Ask for `size` plans, evaluate them through the budget (together: in parallel where the
        measurer can), tell Optuna each one's values and constraints; a failed measurement is a
        FAIL trial."""
        asked: list[optuna.Trial] = []
        try:
            for _ in range(size):
                asked.append(trial := study.ask())
                if self.shared:  # owned before sampling: the supervisor fails and re-queues a dead worker's trials
                    trial.set_user_attr(WORKER_ATTR, worker_identity())
                for name, distribution in space.distributions.items():  # what ask(space.distributions) does
                    trial.suggest_categorical(name, distribution.choices)
            plans = [space.plan(trial.params, study.study_name) for trial in asked]
            sources = [trial.user_attrs.get("source", self.source) for trial in asked]
            measured_before = {plan.digest() for plan in plans if budgeted.has_measured(plan)}
            evaluations = budgeted.evaluate_many(plans, sources, [trial.number for trial in asked])
        except BaseException:
            for trial in asked:
                study.tell(trial, state=TrialState.FAIL)
            raise
        for trial, plan, source, evaluation in zip(asked, plans, sources, evaluations):
            if evaluation is None:  # beyond the budget: never evaluated
                study.tell(trial, state=TrialState.FAIL)
                continue
            trial.set_user_attr("source", source)
            trial.set_user_attr("plan_digest", plan.digest())
            trial.set_user_attr("duplicate", plan.digest() in measured_before)  # left out of the study's result
            measured_before.add(plan.digest())
            if evaluation.failed:
                trial.set_user_attr("error", (evaluation.error or "")[:500])
                study.tell(trial, state=TrialState.FAIL)
                continue
            trial.set_user_attr("objective", evaluation.objective)
            if not evaluation.feasible:
                trial.set_user_attr("violations", "; ".join(evaluation.violations))
            trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_ATTR, constraint_values(evaluation))
            study.tell(trial, self.values(evaluation))

    def _replay(self, study: optuna.Study, budgeted: BudgetedProblem, space: DesignSpace) -> None:
        """Count a resumed study's complete trials, in order, as this search's first trials."""
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if done:
            log.info("resuming Optuna study %s: %d complete trials", study.study_name, len(done))
        for frozen in done:
            try:
                budgeted.evaluate(space.plan(frozen.params, study.study_name), frozen.user_attrs.get("source", self.source))
            except BudgetExhausted:
                return

    def _enqueue_start_plans(self, study: optuna.Study, problem: Problem, space: DesignSpace) -> None:
        """The reference plans (the baseline first: feasible whenever anything simple is), then the
        solver's cost-model plan."""
        for _, plan in problem.reference_plans():
            study.enqueue_trial(space.params(plan), user_attrs={"source": "reference"}, skip_if_exists=True)
        try:
            solver_plan = solve_problem(problem).plan
        except ExplorerError as error:
            log.warning("no solver plan to start from (%s)", error)
            return
        if solver_plan is None:  # the model finds nothing feasible
            log.warning("no solver plan to start from (the cost model finds no feasible plan)")
            return
        study.enqueue_trial(space.params(solver_plan), user_attrs={"source": "solver"}, skip_if_exists=True)

    @staticmethod
    def enqueued_solver_plan(study: optuna.Study, space: DesignSpace) -> Plan | None:
        """The solver's plan enqueued when the study was created (None if it has none)."""
        for trial in study.get_trials(deepcopy=False):
            if trial.user_attrs.get("source") == "solver":
                return space.plan(trial.params or trial.system_attrs["fixed_params"], study.study_name)
        return None


class OptunaTPEAgent(_OptunaAgent):
    """Tree-structured Parzen estimator on the problem's objective; infeasible plans rank last."""

    name = "optuna-tpe"
    source = "tpe"
    directions: list[Literal["minimize", "maximize"]] = ["minimize"]

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        # workers in parallel avoid each other's running trials
        options: dict[str, Any] = {"constant_liar": True} if self.shared else {}
        return optuna.samplers.TPESampler(seed=seed, **options, **self.sampler_options)

    def values(self, evaluation: Evaluation) -> list[float]:
        """The objective; +inf when infeasible, so that the least value (optuna-dashboard's best trial) is
        the best feasible one. TPE never reads it: constraints rank every infeasible trial last."""
        return [evaluation.objective if evaluation.feasible else math.inf]

    def metric_names(self, problem: Problem) -> list[str]:
        return [objective_label(problem)]


class OptunaNSGA2Agent(_OptunaAgent):
    """NSGA-II over latency, energy, weight memory and accuracy drop (in points), with constrained domination.

    The result's best trial is the best feasible by the problem's objective; `pareto` holds the
    Pareto front of the feasible trials. The population defaults to 20 (not Optuna's 50): a
    measurement budget of a few hundred then still spans many generations.
    """

    name = "optuna-nsga2"
    source = "nsga2"
    directions: list[Literal["minimize", "maximize"]] = ["minimize"] * len(PARETO_METRICS)

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        options = {"population_size": 20, **self.sampler_options}
        return optuna.samplers.NSGAIISampler(seed=seed, **options)

    def values(self, evaluation: Evaluation) -> list[float]:
        return pareto_point(evaluation)

    def metric_names(self, problem: Problem) -> list[str]:
        return list(PARETO_METRIC_NAMES)

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> ParetoSearchResult:
        result = super().search(problem, budget, seed, callback)
        return ParetoSearchResult(**{f.name: getattr(result, f.name) for f in fields(SearchResult)},
                                  pareto=pareto_front(result.trials))
