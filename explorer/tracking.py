"""Tracking searches in MLflow: one parent run per search, one child run per trial.

Layout in the tracking store (any MLflow tracking URI; default SQLite under runs/):

- one **experiment** per model and board, e.g. "vgg @ tegra-k1";
- one **parent run** per search: the settings as params, the best-so-far objective and the feasible
  count as metric series (step = trial number), the best plan's metrics at the end, and artifacts
  `best_plan.json`, `convergence.png`, `pareto.png`, `summary.md`;
- one **child run per trial** ("trial N", tag `mlflow.parentRunId`): one param per decision layer
  holding `Decision.label()` (e.g. `conv1_1 = spatial:16/int8@gpu`), metrics latency_ms, energy_mj,
  memory_mb, accuracy, accuracy_drop, objective, feasible (0/1), eval_seconds, and tags trial,
  source, agent, measured_by, energy_source, plan_digest, violations.

Logging never makes the search wait: `log_trial` only puts the trial on a queue, and a worker
thread writes what has accumulated as one batch. MLflow's client API costs tens of milliseconds per
child run (three calls, each its own transaction), which would dominate a simulated search at about
a millisecond per evaluation; so on a SQL store (the default) the worker inserts a whole batch of
finished child runs in one transaction through MLflow's own table definitions. Other stores (an
MLflow tracking server, the file store) get the client API from the worker thread.
"""
from __future__ import annotations

import getpass
import json
import logging
import math
import os
import queue
import re
import shlex
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_USER

from explorer.errors import ExplorerError
from explorer.paths import runs_dir

if TYPE_CHECKING:  # agents build on explorer, not the other way round
    from agents.base import SearchResult, Trial

log = logging.getLogger(__name__)

DATABASE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_CALL = 100
MAX_PARAM_LENGTH = 6000
QUEUE_SIZE = 10_000  # trials waiting to be written before log_trial blocks
TRIAL_METRICS = ("latency_ms", "latency_spread_ms", "energy_mj", "memory_mb", "peak_memory_mb",
                 "accuracy", "accuracy_drop", "objective")


def default_tracking_uri() -> str:
    """The local SQLite store under the runs folder."""
    return f"sqlite:///{(runs_dir() / DATABASE_FILE).resolve()}"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The URI given, else $MLFLOW_TRACKING_URI, else the local SQLite store under runs/."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def experiment_name(model: str, board: str) -> str:
    """The experiment that holds every search of one model on one board."""
    return f"{model} @ {board}"


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else "file"


def _sqlite_folder(uri: str) -> Path | None:
    """The folder of a SQLite database file, or None for other stores (and in-memory SQLite)."""
    if _scheme(uri) != "sqlite" or not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent


def ui_command(tracking_uri: str | None = None) -> str:
    """The shell command that opens the MLflow UI on this tracking store."""
    uri = resolve_tracking_uri(tracking_uri)
    if _scheme(uri) in ("http", "https"):
        return f"python -m webbrowser {shlex.quote(uri)}"
    command = f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    folder = _sqlite_folder(uri)
    if folder is not None:
        command += f" --default-artifact-root {shlex.quote(str(folder / ARTIFACTS_FOLDER))}"
    if _scheme(uri) == "file":
        command = "MLFLOW_ALLOW_FILE_STORE=true " + command
    return command


def mlflow_key(name: str) -> str:
    """A layer or setting name as a valid MLflow param key (letters, digits, _ . - only)."""
    return re.sub(r"[^\w.\-]+", "_", name).strip("_.")[:250] or "_"


def _layer_keys(layer_names: list[str]) -> list[str]:
    """One distinct param key per decision layer."""
    keys: list[str] = []
    for index, name in enumerate(layer_names):
        key = mlflow_key(name)
        keys.append(f"{key}_{index}" if key in keys else key)
    return keys


def _finite_metrics(values: dict[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


@dataclass
class _ChildRun:
    """A finished trial as MLflow entities (built in the worker thread)."""

    name: str
    start_ms: int
    end_ms: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


@dataclass
class _QueuedTrial:
    trial: Trial
    number: int  # trial number within the tracked search (continues after a resume)
    best_so_far: float
    feasible_count: int
    end_ms: int


@dataclass
class TrackedSearch:
    """One search read back from the store: the parent run and its trial runs in trial order."""

    parent: Run
    trials: list[Run]


def read_search(tracking_uri: str | None, run_id: str) -> TrackedSearch:
    """Read a tracked search back: the parent run and every child run, ordered by trial number."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    parent = client.get_run(run_id)
    children: list[Run] = []
    token = None
    while True:
        page = client.search_runs([parent.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'",
                                  max_results=1000, page_token=token)
        children.extend(page)
        token = page.token
        if not token:
            break
    children.sort(key=lambda run: int(run.data.tags.get("trial", -1)))
    return TrackedSearch(parent, children)


class _ClientWriter:
    """Writes child runs through the MLflow client API: works with every store, ~3 calls a trial."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id

    def write(self, children: list[_ChildRun], parent_metrics: list[Metric]) -> None:
        for child in children:
            run = self.client.create_run(self.experiment_id, start_time=child.start_ms, tags=child.tags,
                                         run_name=child.name)
            run_id = run.info.run_id
            params = [Param(k, v) for k, v in child.params.items()]
            metrics = [Metric(k, v, child.end_ms, 0) for k, v in child.metrics.items()]
            for start in range(0, max(len(params), 1), MAX_PARAMS_PER_CALL):
                self.client.log_batch(run_id, metrics=metrics if start == 0 else [],
                                      params=params[start:start + MAX_PARAMS_PER_CALL])
            self.client.set_terminated(run_id, "FINISHED", end_time=child.end_ms)
        self.write_parent_metrics(parent_metrics)

    def write_parent_metrics(self, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.parent_run_id, metrics=metrics[start:start + MAX_METRICS_PER_CALL])


class _SqlBulkWriter(_ClientWriter):
    """Inserts a batch of finished child runs in one transaction (SQL stores only).

    It uses the store's own session factory and MLflow's own table definitions, so the rows are
    exactly what `create_run` + `log_batch` + `set_terminated` would write, at a fraction of a
    millisecond per trial instead of tens of milliseconds.
    """

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, store):
        super().__init__(client, experiment_id, parent_run_id)
        from mlflow.store.tracking.dbmodels import models
        self.models = models
        self.store = store
        self.artifact_root = client.get_experiment(experiment_id).artifact_location

    def write(self, children: list[_ChildRun], parent_metrics: list[Metric]) -> None:
        from mlflow.utils.uri import append_to_uri_path
        from sqlalchemy import insert

        m = self.models
        runs, tags, params, metrics = [], [], [], []
        for child in children:
            run_id = uuid.uuid4().hex
            runs.append({
                "run_uuid": run_id, "name": child.name, "source_type": "UNKNOWN", "source_name": "",
                "entry_point_name": "", "user_id": child.tags.get(MLFLOW_USER, "unknown"),
                "status": "FINISHED", "start_time": child.start_ms, "end_time": child.end_ms,
                "deleted_time": None, "source_version": "", "lifecycle_stage": "active",
                "artifact_uri": append_to_uri_path(self.artifact_root, run_id, "artifacts"),
                "experiment_id": int(self.experiment_id),
            })
            tags += [{"run_uuid": run_id, "key": k, "value": v} for k, v in child.tags.items()]
            params += [{"run_uuid": run_id, "key": k, "value": v} for k, v in child.params.items()]
            metrics += [{"run_uuid": run_id, "key": k, "value": v, "timestamp": child.end_ms, "step": 0, "is_nan": False}
                        for k, v in child.metrics.items()]
        with self.store.ManagedSessionMaker(read_only=False) as session:
            session.execute(insert(m.SqlRun), runs)
            for table, rows in ((m.SqlTag, tags), (m.SqlParam, params), (m.SqlMetric, metrics), (m.SqlLatestMetric, metrics)):
                if rows:
                    session.execute(insert(table), rows)
        self.write_parent_metrics(parent_metrics)


class SearchTracker:
    """Tracks one search in MLflow; use as a context manager around the search.

    ```
    with SearchTracker(uri, experiment_name("vgg", "tegra-k1"), "ppo seed 0", settings) as tracker:
        result = agent.search(problem, budget, seed, callback=tracker.log_trial)
        tracker.finish(result, result.best_plan.to_json(), summary_markdown)
    ```
    Leaving the block with KeyboardInterrupt marks the parent run KILLED (trials logged so far are
    kept), with another exception FAILED, otherwise FINISHED. `resume_run_id` reopens a parent run
    and numbers the new trials after the ones it already has.
    """

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, params: dict,
                 resume_run_id: str | None = None, tags: dict[str, str] | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        _check_reachable(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        self._failure: BaseException | None = None
        self._ended = False
        try:
            self.experiment_id = self._experiment(experiment)
            if resume_run_id:
                self.run_id, self._offset, self._best, self._feasible = self._reopen(resume_run_id, params)
            else:
                self.run_id = self._start(run_name, params, tags or {})
                self._offset, self._best, self._feasible = 0, math.inf, 0
            self._writer = self._make_writer()
        except MlflowException as exc:
            raise ExplorerError(f"MLflow tracking at {self.tracking_uri} failed: {exc.message.splitlines()[0]}") from None
        self._user = getpass.getuser()
        self._layer_keys: list[str] | None = None
        self._queue: queue.Queue[_QueuedTrial | None] = queue.Queue(QUEUE_SIZE)
        self._worker = threading.Thread(target=self._drain, name="mlflow-tracking", daemon=True)
        self._worker.start()

    # ---- setup --------------------------------------------------------------------------------
    def _experiment(self, name: str) -> str:
        """The experiment's id, creating it (with artifacts next to a SQLite file) if needed."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            folder = _sqlite_folder(self.tracking_uri)
            location = (folder / ARTIFACTS_FOLDER).resolve().as_uri() if folder else None
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException as exc:  # created meanwhile by another process
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage != "active":
            raise ExplorerError(f"MLflow experiment {name!r} was deleted: restore it (mlflow experiments restore "
                                f"--experiment-id {experiment.experiment_id}) or remove it for good (mlflow gc)")
        return experiment.experiment_id

    def _start(self, run_name: str, params: dict, tags: dict[str, str]) -> str:
        from mlflow.tracking.context.registry import resolve_tags
        run = self.client.create_run(self.experiment_id, tags=resolve_tags(tags), run_name=run_name)
        self._log_params(run.info.run_id, {mlflow_key(k): _param_text(v) for k, v in params.items()})
        return run.info.run_id

    def _reopen(self, run_id: str, params: dict) -> tuple[str, int, float, int]:
        """Set a parent run RUNNING again; return where its trial numbering and metrics stand."""
        try:
            done = read_search(self.tracking_uri, run_id)
        except MlflowException:
            raise ExplorerError(f"no MLflow run {run_id} in {self.tracking_uri}: resume a run id this store shows "
                                f"(open it with: {ui_command(self.tracking_uri)})") from None
        if done.parent.info.experiment_id != self.experiment_id:
            raise ExplorerError(f"MLflow run {run_id} belongs to another experiment (another model or board)")
        self.client.update_run(run_id, status="RUNNING")
        logged = done.parent.data.params
        new = {mlflow_key(k): _param_text(v) for k, v in params.items()}
        self._log_params(run_id, {k: v for k, v in new.items() if k not in logged})
        changed = {k: v for k, v in new.items() if k in logged and logged[k] != v}
        resumes = int(done.parent.data.tags.get("resumes", "0")) + 1
        self.client.set_tag(run_id, "resumes", str(resumes))
        if changed:
            self.client.set_tag(run_id, f"resume_{resumes}_params", json.dumps(changed))
        offset = 1 + max((int(run.data.tags["trial"]) for run in done.trials if "trial" in run.data.tags), default=-1)
        metrics = done.parent.data.metrics
        return run_id, offset, metrics.get("best_so_far", math.inf), int(metrics.get("feasible_count", 0))

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_CALL])

    def _make_writer(self) -> _ClientWriter:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        store = self.client._tracking_client.store  # MLflow exposes no public accessor for the store
        if isinstance(store, SqlAlchemyStore):
            return _SqlBulkWriter(self.client, self.experiment_id, self.run_id, store)
        return _ClientWriter(self.client, self.experiment_id, self.run_id)

    # ---- logging trials -----------------------------------------------------------------------
    def log_trial(self, trial: Trial, result: SearchResult) -> None:
        """Queue one trial for logging (an `agents.base.TrialCallback`); returns at once."""
        if self._failure is not None:
            raise ExplorerError(f"MLflow logging to {self.tracking_uri} failed: {self._failure}")
        if trial.evaluation.feasible:
            self._feasible += 1
            self._best = min(self._best, trial.evaluation.objective)
        self._queue.put(_QueuedTrial(trial, self._offset + trial.number, self._best, self._feasible,
                                     int(time.time() * 1000)))

    def flush(self) -> None:
        """Wait until every queued trial is written."""
        self._queue.join()
        if self._failure is not None:
            raise ExplorerError(f"MLflow logging to {self.tracking_uri} failed: {self._failure}")

    def _drain(self) -> None:
        """Worker thread: write whatever has accumulated as one batch, until the None sentinel."""
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            trials = [item for item in batch if item is not None]
            try:
                if trials and self._failure is None:
                    self._writer.write([self._child(item) for item in trials], self._parent_points(trials))
            except Exception as exc:  # reported to the search thread by log_trial/flush
                log.warning("MLflow logging failed: %s", exc)
                self._failure = exc
            finally:
                for _ in batch:
                    self._queue.task_done()
            if batch[-1] is None:
                return

    def _child(self, item: _QueuedTrial) -> _ChildRun:
        trial, e = item.trial, item.trial.evaluation
        names = [name for name, _ in trial.plan.decisions]
        if self._layer_keys is None or len(self._layer_keys) != len(names):
            self._layer_keys = _layer_keys(names)
        metrics = _finite_metrics({name: getattr(e, name) for name in TRIAL_METRICS})
        metrics["feasible"] = float(e.feasible)
        metrics["eval_seconds"] = trial.seconds
        name = f"trial {item.number}"
        return _ChildRun(
            name=name,
            start_ms=item.end_ms - int(1000 * trial.seconds),
            end_ms=item.end_ms,
            params={key: decision.label() for key, (_, decision) in zip(self._layer_keys, trial.plan.decisions)},
            metrics=metrics,
            tags={MLFLOW_RUN_NAME: name, MLFLOW_PARENT_RUN_ID: self.run_id, MLFLOW_USER: self._user,
                  "trial": str(item.number), "agent": trial.agent, "source": trial.source,
                  "measured_by": e.measured_by, "energy_source": e.energy_source,
                  "accuracy_metric": e.accuracy_metric if e.accuracy is not None else "not measured",
                  "plan_digest": e.plan_digest, "violations": "; ".join(e.violations)[:MAX_PARAM_LENGTH] or "none"},
        )

    @staticmethod
    def _parent_points(trials: list[_QueuedTrial]) -> list[Metric]:
        points = []
        for item in trials:
            if math.isfinite(item.best_so_far):
                points.append(Metric("best_so_far", item.best_so_far, item.end_ms, item.number))
            points.append(Metric("feasible_count", float(item.feasible_count), item.end_ms, item.number))
        return points

    # ---- the end of a search ------------------------------------------------------------------
    def finish(self, result: SearchResult, best_plan_json: dict | None, summary_markdown: str,
               plots: dict[str, Path] | None = None, latency_budget_ms: float | None = None) -> None:
        """Flush, log the best plan's metrics and the artifacts, and end the parent run.

        Artifacts: best_plan.json, convergence.png, pareto.png, summary.md, and every extra plot
        in `plots` (artifact file name -> local file). The run ends KILLED when the search was
        interrupted, else FINISHED.
        """
        self.flush()
        best = result.best
        final = {"trials": float(self._offset + len(result.trials)), "feasible_count": float(self._feasible)}
        if best is not None:
            final |= {"best_objective": best.objective, "best_latency_ms": best.latency_ms,
                      "best_energy_mj": best.energy_mj, "best_memory_mb": best.memory_mb,
                      "best_accuracy": best.accuracy, "best_accuracy_drop": best.accuracy_drop,
                      "best_trial": float(self._offset + result.best_trial.number)}
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in _finite_metrics(final).items()])
        with tempfile.TemporaryDirectory() as folder:
            files = {"convergence.png": Path(folder) / "convergence.png", "pareto.png": Path(folder) / "pareto.png"}
            convergence_plot(result, files["convergence.png"])
            pareto_plot(result, files["pareto.png"], latency_budget_ms)
            for name, path in (plots or {}).items():
                if not Path(path).is_file():
                    raise ExplorerError(f"plot {path} does not exist: write the file before finish()")
                files[name] = Path(folder) / name
                files[name].write_bytes(Path(path).read_bytes())
            for path in files.values():
                self.client.log_artifact(self.run_id, str(path))
        if best_plan_json is not None:
            self.client.log_dict(self.run_id, best_plan_json, "best_plan.json")
        self.client.log_text(self.run_id, summary_markdown, "summary.md")
        self._end("KILLED" if result.interrupted else "FINISHED")

    def mark_killed(self) -> None:
        """The search was interrupted: keep what was logged, set the parent run KILLED."""
        self._end("KILLED")

    def _end(self, status: str) -> None:
        if self._ended:
            return
        self._stop_worker()
        self.client.set_terminated(self.run_id, status)
        self._ended = True

    def _stop_worker(self) -> None:
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()

    def close(self, status: str = "FINISHED") -> None:
        """Write every queued trial and end the parent run (no-op if already ended)."""
        self._end(status)
        if self._failure is not None:
            raise ExplorerError(f"MLflow logging to {self.tracking_uri} failed: {self._failure}")

    def __enter__(self) -> "SearchTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:  # never mask the exception that is leaving the block
            try:
                self._end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
            except Exception as failure:
                log.warning("could not end MLflow run %s: %s", self.run_id, failure)

    def __repr__(self) -> str:
        return f"SearchTracker({self.tracking_uri!r}, run {self.run_id})"


def _param_text(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_LENGTH]


def _check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """One quick request to an MLflow server, so a wrong address fails now and not after retries."""
    if _scheme(uri) not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as exc:
        raise ExplorerError(f"no MLflow tracking server answers at {uri} ({exc}): start one (mlflow server --port ...) "
                            f"or leave the tracking URI out to use the local store under runs/") from None


# ---- plots --------------------------------------------------------------------------------------
def convergence_plot(result: SearchResult, path: Path) -> Path:
    """Best-so-far objective against measured evaluations, with every trial's objective (PNG)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=110)
    axes = figure.add_subplot()
    evaluations = [i + 1 for i in range(len(result.trials))]
    for feasible, colour, label in ((True, "tab:blue", "feasible trial"), (False, "tab:gray", "infeasible trial")):
        points = [(n, t.evaluation.objective) for n, t in zip(evaluations, result.trials)
                  if t.evaluation.feasible == feasible and math.isfinite(t.evaluation.objective)]
        if points:
            axes.scatter(*zip(*points), s=10, alpha=0.5, color=colour, label=label, marker="o" if feasible else "x")
    curve = [(n, b) for n, b in zip(evaluations, result.best_so_far) if math.isfinite(b)]
    if curve:
        axes.step(*zip(*curve), where="post", color="tab:red", linewidth=2, label="best feasible so far")
    axes.set_xlabel("measured evaluations")
    axes.set_ylabel("objective (lower is better)")
    axes.set_title(f"{result.agent}: convergence")
    axes.grid(alpha=0.3)
    if evaluations:
        axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (both minimised), by the first one."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def pareto_plot(result: SearchResult, path: Path, latency_budget_ms: float | None = None) -> Path:
    """Latency against energy of every trial, feasible or not, with the feasible Pareto front (PNG)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=110)
    axes = figure.add_subplot()
    feasible = [(t.evaluation.latency_ms, t.evaluation.energy_mj) for t in result.trials if t.evaluation.feasible]
    infeasible = [(t.evaluation.latency_ms, t.evaluation.energy_mj) for t in result.trials if not t.evaluation.feasible]
    if infeasible:
        axes.scatter(*zip(*infeasible), s=12, marker="x", color="tab:gray", alpha=0.6, label="infeasible")
    if feasible:
        axes.scatter(*zip(*feasible), s=14, color="tab:blue", alpha=0.6, label="feasible")
        front = pareto_front(feasible)
        axes.step(*zip(*front), where="post", color="tab:orange", linewidth=1.5)
        axes.scatter(*zip(*front), s=40, facecolors="none", edgecolors="tab:orange", label="Pareto front (feasible)")
    if result.best is not None:
        axes.scatter([result.best.latency_ms], [result.best.energy_mj], s=160, marker="*", color="tab:red",
                     zorder=5, label="best")
    if latency_budget_ms is not None:
        axes.axvline(latency_budget_ms, color="tab:red", linestyle="--", linewidth=1, label="latency budget")
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("energy (mJ)")
    axes.set_title(f"{result.agent}: {len(result.trials)} trials")
    axes.grid(alpha=0.3)
    if result.trials:
        axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)
