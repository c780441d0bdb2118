"""Optuna search agents: TPE on the problem's objective, NSGA-II on a four-metric Pareto front.

Search space: one categorical parameter per decision layer; its choices are the layer's
`Problem.choices(layer)` as decision labels (`Decision.label`, e.g. "spatial:16/int8@gpu"), so every
sampled plan is valid and optuna-dashboard shows (and ranks the importance of) decisions, not list
indices. The samplers work on a choice's position in the list, so labels sample exactly as indices
did. A study made before the labels (its parameters are indices) is resumed as it is, with indices.

Start plans: a new study starts with enqueued trials: the problem's reference plans (the
uncompressed model in fp32 on each processor, whole-model int8 and fp16: what a user would try
anyway), then the solver's cost-model plan (`solve_problem`, no measurement), so that the samplers
have feasible anchors even when the additive model's plan misses a constraint once measured, and the
best found is never worse than a reference.

Constraints: before Optuna is told a trial's values, its system attribute "constraints" gets one
value per entry of CONSTRAINTS (<= 0 when satisfied): latency, accuracy drop and memory (the worst of
the weight-memory limit, a processor's capacity and the board's memory), each relative to its limit,
and "other", 1 when the Problem reports a violation the others do not explain. This list is the form
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

Storage and resume: studies live in an Optuna storage (default: SQLite `runs/optuna.db`; any
Optuna storage URL, an Optuna storage object or "memory"), under a name derived from the model,
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
evaluated, or after `asks_per_trial` x budget asks.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import shlex
import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.trial import TrialState

from agents.base import BudgetedProblem, BudgetExhausted, SearchResult, Trial, TrialCallback
from explorer.cache import digest
from explorer.errors import ExplorerError
from explorer.paths import runs_dir
from explorer.plan import Plan
from explorer.problem import Evaluation, Problem
from explorer.report import objective_label
from explorer.solver import solve_problem
from explorer.stores import ensure_sqlite_store, first_value, sqlite_file, table_names
from explorer.workers import WORKER_ATTR, worker_identity

PARETO_METRICS = ("latency_ms", "energy_mj", "memory_mb", "accuracy_drop")
PARETO_METRIC_NAMES = ("latency (ms)", "energy (mJ)", "weight memory (MB)", "accuracy drop (points)")  # as told to NSGA-II
CONSTRAINTS = ("latency", "accuracy_drop", "memory", "other")
CONSTRAINTS_ATTR = "constraints"  # the trial system attribute optuna-dashboard and Optuna's samplers read (a list)

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)


@dataclass
class ParetoSearchResult(SearchResult):
    """A SearchResult with the Pareto front of the feasible trials."""

    pareto: list[Trial] = field(default_factory=list)


def constraint_values(problem: Problem, evaluation: Evaluation) -> list[float]:
    """One value per entry of CONSTRAINTS, <= 0 when satisfied, consistent with evaluation.feasible."""
    c = problem.constraints
    latency = (evaluation.latency_ms - c.latency_ms) / max(c.latency_ms, 1e-12) if c.latency_ms is not None else 0.0
    accuracy = 0.0
    if c.max_accuracy_drop is not None and evaluation.accuracy_drop is not None:  # a zero limit counts as 0.1 point
        accuracy = (evaluation.accuracy_drop - c.max_accuracy_drop) / max(c.max_accuracy_drop, 1e-3)
    memory = [(evaluation.memory_mb - c.memory_mb) / max(c.memory_mb, 1e-12)] if c.memory_mb is not None else []
    local = 0.0
    for pid, mb in evaluation.memory_mb_by_processor.items():
        processor = problem.board.processor(pid)
        memory.append((mb - processor.memory_mb) / max(processor.memory_mb, 1e-12))
        local += 0.0 if processor.is_remote else mb
    available = problem.board.memory.available_mb
    memory.append((local - available) / max(available, 1e-12))
    values = [latency, accuracy, max(memory)]
    if evaluation.feasible:
        return [min(v, 0.0) for v in values] + [0.0]
    return values + [0.0 if max(values) > 0 else 1.0]


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """The feasible trials that no other feasible trial dominates on PARETO_METRICS (all minimised)."""
    feasible = [t for t in trials if t.evaluation.feasible]
    if not feasible:
        return []
    points = np.array([_pareto_point(t.evaluation) for t in feasible])
    front = []
    for trial, point in zip(feasible, points):
        dominated = np.any(np.all(points <= point, axis=1) & np.any(points < point, axis=1))
        if not dominated:
            front.append(trial)
    return front


def _pareto_point(evaluation: Evaluation) -> list[float]:
    """PARETO_METRICS in the units of PARETO_METRIC_NAMES (the accuracy drop in points)."""
    return [evaluation.latency_ms, evaluation.energy_mj, evaluation.memory_mb, 100 * (evaluation.accuracy_drop or 0.0)]


def study_settings(problem: Problem) -> dict:
    """What a study's trials mean, as its user attributes (optuna-dashboard shows them with the study)."""
    c = problem.constraints
    return {"model": problem.graph.source, "board": problem.board.name, "objective": objective_label(problem),
            "latency_limit_ms": c.latency_ms if c.latency_ms is not None else "none",
            "max_accuracy_drop_points": round(100 * c.max_accuracy_drop, 6) if c.max_accuracy_drop is not None else "none",
            "memory_limit_mb": c.memory_mb if c.memory_mb is not None else "none",
            "measured_by": problem.measurer.label(problem.board), "accuracy_basis": problem.scorer.label,
            "constraints": f"{', '.join(CONSTRAINTS)}: each relative to its limit, <= 0 when met"}


def dashboard_command(storage: str | BaseStorage | None) -> str | None:
    """The shell command that opens optuna-dashboard on this storage (None for one in memory)."""
    url = default_storage_url() if storage is None else storage
    if not isinstance(url, str) or url == "memory":
        return None
    command = f"optuna-dashboard {shlex.quote(url)}"
    if importlib.util.find_spec("optuna_dashboard") is None:  # not one of explorer's dependencies
        command += "  (pip install optuna-dashboard)"
    return command


class DesignSpace:
    """Plans as Optuna parameters: one categorical parameter per layer, its choices the layer's decision
    labels in Problem.choices order (or, `labelled=False`, the indices that studies made before the
    labels store)."""

    def __init__(self, problem: Problem, labelled: bool = True):
        self.layer_names = [layer.name for layer in problem.graph.layers]
        self.choices = [problem.choices(layer) for layer in problem.graph.layers]
        self.labelled = labelled
        values = [[d.label() for d in options] if labelled else list(range(len(options))) for options in self.choices]
        self.distributions = {name: CategoricalDistribution(v) for name, v in zip(self.layer_names, values)}
        self._positions = [{value: i for i, value in enumerate(v)} for v in values]  # value -> position in choices
        self.size = math.prod(len(options) for options in self.choices)

    @classmethod
    def for_study(cls, problem: Problem, study: optuna.Study) -> DesignSpace:
        """The design space as `study` stores it: labels, or indices in a study made before the labels
        (resumed as it is); one line when the study was made for another model or design space."""
        trial = next((t for t in study.get_trials(deepcopy=False) if t.distributions or t.system_attrs.get("fixed_params")), None)
        if trial is None:
            return cls(problem)
        for space in (cls(problem), cls(problem, labelled=False)):
            if space._fits(trial):
                if not space.labelled:
                    log.info("Optuna study %s stores choice indices (made before explorer labelled its choices): "
                             "resumed with indices", study.study_name)
                return space
        raise ExplorerError(f"Optuna study {study.study_name!r} was made for another model or design space: "
                            "give another study name or storage")

    def _fits(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether the trial's parameters (a queued trial's fixed values) are this space's."""
        if trial.distributions:
            return all(self.distributions.get(name) == distribution for name, distribution in trial.distributions.items())
        positions = dict(zip(self.layer_names, self._positions))
        return all(name in positions and type(value) is type(next(iter(positions[name]))) and value in positions[name]
                   for name, value in trial.system_attrs["fixed_params"].items())

    def plan(self, params: dict, study_name: str) -> Plan:
        try:
            return Plan.from_dict({name: options[positions[params[name]]]
                                   for name, options, positions in zip(self.layer_names, self.choices, self._positions)})
        except (KeyError, TypeError):
            raise ExplorerError(f"Optuna study {study_name!r} was made for another model or design space: "
                                "give another study name or storage") from None

    def params(self, plan: Plan) -> dict[str, str | int]:
        return {name: distribution.choices[options.index(plan[name])]
                for (name, distribution), options in zip(self.distributions.items(), self.choices)}


def default_study_name(problem: Problem, agent: str, seed: int) -> str:
    """agent-model-board-objective-seed-settings: a study is resumed only under the same settings."""
    objective = problem.objective.single or "+".join(f"{name}{weight:g}" for name, weight in problem.objective.weights)
    settings = digest(repr(problem.constraints), problem.board.digest, problem.measurer.identity(problem.board),
                      problem.scorer.data_digest())
    return f"{agent}-{problem.graph.fingerprint()[:12]}-{problem.board.name}-{objective}-seed{seed}-{settings[:8]}"


def default_storage_url() -> str:
    """The default Optuna storage: SQLite runs/optuna.db."""
    return f"sqlite:///{(runs_dir() / 'optuna.db').resolve()}"


def is_measured(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that spent a measurement: complete and not a repeat, or failed measuring (not one failed
    because its worker died: that one is queued again)."""
    return ((trial.state == TrialState.COMPLETE and not trial.user_attrs.get("duplicate"))
            or (trial.state == TrialState.FAIL and "error" in trial.user_attrs))


def measured_trial_count(study: optuna.Study) -> int:
    """Trials of the study that spent a measurement (`is_measured`)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)) if is_measured(t))


def open_storage(storage: str | BaseStorage | None) -> BaseStorage:
    """None: SQLite runs/optuna.db; "memory": in memory (nothing to resume); else an Optuna storage URL
    (postgresql://user@host/db for many workers or machines). SQLite transactions take the write lock
    when they begin (`serialise_sqlite_transactions`) and wait up to a minute for it, so a few local
    workers can share one file and never take the same queued trial."""
    if storage is None:
        storage = default_storage_url()
    if isinstance(storage, BaseStorage):
        return storage
    if storage == "memory":
        return InMemoryStorage()
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    path = sqlite_file(storage)
    if path is not None:  # made atomically under a lock: a kill or a second process never half-makes it
        ensure_sqlite_store(path, "the Optuna storage", lambda file: _create_optuna_storage(file, engine_kwargs),
                            _optuna_storage_problem, _optuna_storage_has_data)
    try:
        rdb = RDBStorage(storage, engine_kwargs=engine_kwargs)
    except Exception as error:  # SQLAlchemy raises several types for a bad URL
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExplorerError(f"cannot open the Optuna storage {storage!r} ({first_line}): give a database URL "
                            "like sqlite:///runs/optuna.db or postgresql://user@host/db") from None
    if rdb.engine.dialect.name == "sqlite":  # after Optuna's schema checks: they hold a session while they open a
        serialise_sqlite_transactions(rdb.engine)  # second connection, which BEGIN IMMEDIATE would make wait on the first
        rdb.remove_session()
        rdb.engine.dispose()  # the connections Optuna's schema check opened lack the hook: new ones get it
    return rdb


def serialise_sqlite_transactions(engine) -> None:
    """Make every transaction on a pysqlite engine take SQLite's write lock when it begins.

    SQLite has no row locks: Optuna's `SELECT ... FOR UPDATE` when a worker takes a queued trial does
    nothing there, and Python's sqlite3 does not even begin a transaction before the SELECT, so two
    workers could read the same WAITING trial and both run it (Optuna issues #4621, #4002).
    SQLAlchemy's recipe for pysqlite: sqlite3 stops emitting BEGIN itself, and each transaction opens
    with BEGIN IMMEDIATE, so the read and the update that takes a trial are one serialised step. A
    second process waits for the lock within the connection's busy `timeout` rather than failing.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _create_optuna_storage(path, engine_kwargs: dict) -> None:
    """A complete Optuna storage in a new SQLite file: Optuna's tables, version row and schema stamp."""
    storage = RDBStorage(f"sqlite:///{path}", engine_kwargs=engine_kwargs)
    storage.remove_session()
    storage.engine.dispose()


def _optuna_storage_problem(connection) -> str | None:
    """What an Optuna SQLite storage lacks (None: complete); Optuna stamps its schema version last."""
    from optuna.storages._rdb import models

    missing = sorted(set(models.BaseModel.metadata.tables) - table_names(connection))
    if missing:
        return f"{len(missing)} of its tables missing, e.g. {missing[0]}"
    if first_value(connection, "SELECT schema_version FROM version_info") is None:
        return "no version row"
    if first_value(connection, "SELECT version_num FROM alembic_version") is None:
        return "no schema version"
    return None


def _optuna_storage_has_data(connection) -> bool:
    return first_value(connection, "SELECT 1 FROM studies LIMIT 1") is not None


class _OptunaAgent:
    """The ask/evaluate/tell loop shared by the TPE and NSGA-II agents."""

    name = ""
    source = ""  # Trial.source of sampled plans
    anytime = True  # proposals do not depend on the budget: best_so_far[n - 1] is the result at budget n
    directions: list[str] = []

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
        study = self.open_study(problem, seed)
        space = self.space
        budgeted.result.seed_plan = self.enqueued_solver_plan(study, space)
        resumed = any(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
        if resumed and not self.shared:  # resumed: a fresh random stream, or the sampler would redraw its first proposals
            study.sampler = self.sampler(seed + len(study.trials))
        trials = budgeted.result.trials
        target = min(budget, space.size)
        try:
            if not self.shared:
                self._replay(study, budgeted, space)
            batch = max(1, problem.parallelism)  # plans measured at once (remote agents)
            for _ in range(self.asks_per_trial * budget // batch + 1):
                if len(trials) >= target:
                    break
                self._step(study, budgeted, space, problem, min(batch, target - len(trials)))
        except KeyboardInterrupt:
            budgeted.result.interrupted = True
        return budgeted.result

    def open_study(self, problem: Problem, seed: int) -> optuna.Study:
        """Create (with the start plans enqueued) or load the study, and describe it (`_describe`); also kept
        as `self.study`, its design space as `self.space`."""
        study_name = self.study_name or default_study_name(problem, self.name, seed)
        self.study = optuna.create_study(storage=open_storage(self.storage), study_name=study_name,
                                         sampler=self.sampler(seed), directions=self.directions, load_if_exists=True)
        self.space = DesignSpace.for_study(problem, self.study)
        if not self.study.trials:
            self._enqueue_start_plans(self.study, problem, self.space)
        self._describe(self.study, problem)
        return self.study

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
        measured = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not t.user_attrs.get("duplicate")]
        budgeted = BudgetedProblem(problem, max(1, len(measured)), self.name, references=False)
        space = DesignSpace.for_study(problem, study)
        for frozen in sorted(measured, key=lambda t: t.number):
            budgeted.evaluate(space.plan(frozen.params, study.study_name), frozen.user_attrs.get("source", self.source), frozen.number)
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
                trial.set_user_attr("error", evaluation.error[:500])
                study.tell(trial, state=TrialState.FAIL)
                continue
            trial.set_user_attr("objective", evaluation.objective)
            if not evaluation.feasible:
                trial.set_user_attr("violations", "; ".join(evaluation.violations))
            trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_ATTR, constraint_values(problem, evaluation))
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
    directions = ["minimize"]

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        options = {"constant_liar": True} if self.shared else {}  # workers in parallel avoid each other's running trials
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
    directions = ["minimize"] * len(PARETO_METRICS)

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        options = {"population_size": 20, **self.sampler_options}
        return optuna.samplers.NSGAIISampler(seed=seed, **options)

    def values(self, evaluation: Evaluation) -> list[float]:
        return _pareto_point(evaluation)

    def metric_names(self, problem: Problem) -> list[str]:
        return list(PARETO_METRIC_NAMES)

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> ParetoSearchResult:
        result = super().search(problem, budget, seed, callback)
        return ParetoSearchResult(**{f.name: getattr(result, f.name) for f in fields(SearchResult)},
                                  pareto=pareto_front(result.trials))
