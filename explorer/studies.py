"""Optuna studies of plans: the storage, the design space as Optuna parameters, study names, and which trials
spent a measurement.

Shared by the Optuna agents (agents/optuna_agents.py), the supervisor of distributed workers
(explorer/workers.py) and the CLI, none of which imports another for it.

Storage: default SQLite `runs/optuna.db`; any Optuna storage URL (PostgreSQL for many workers or
machines), an Optuna storage object, or "memory". Parameters: one categorical parameter per decision
layer, its choices the layer's `Problem.choices(layer)` as decision labels (`Decision.label`, e.g.
"spatial:16/int8@gpu"), so optuna-dashboard shows decisions, not list indices; a study made before the
labels (its parameters are indices) is read as it is, with indices.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import shlex

import optuna
from optuna.distributions import CategoricalChoiceType, CategoricalDistribution
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.trial import TrialState

from explorer.cache import digest
from explorer.errors import ExplorerError, error_line
from explorer.paths import runs_dir
from explorer.plan import Plan
from explorer.problem import Problem
from explorer.stores import ensure_sqlite_store, first_value, sqlite_file, table_names

log = logging.getLogger(__name__)


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

    def params(self, plan: Plan) -> dict[str, CategoricalChoiceType]:
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
        first_line = error_line(error)
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


