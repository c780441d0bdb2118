"""Tracking searches in MLflow: one parent run per search, one child run per trial.

Layout in the tracking store (any MLflow tracking URI; default SQLite under runs/):

- one **experiment** per model and board, e.g. "vgg @ tegra-k1", described (`mlflow.note.content`) by
  EXPERIMENT_NOTE unless a user described it;
- one **parent run** per search: the settings as params, tags SEARCH_TAGS, the best-so-far objective
  and the feasible count as metric series (step = trial number), the best plan's metrics at the end,
  `measured_evaluations` and `predicted_evaluations` (explorer.screening), artifacts `best_plan.json`,
  `convergence.png`, `pareto.png`, `summary.md`, and the summary as the run's description. Plans a
  search answered with the kernel table's prediction instead of measuring them are counted there and
  not logged as child runs: a child run is a measurement (plan sets and `explorer export --run` read
  them as measured figures), and a search may make many times its budget of predictions;
- one **child run per trial** ("trial N", tag `mlflow.parentRunId`): three params per decision layer
  (`decision_params`: `conv1_1.rung = spatial:16`, `conv1_1.precision = int8`, `conv1_1.processor =
  gpu`: short values, which MLflow's parallel-coordinates view keeps whole); metrics latency_ms,
  latency_spread_ms, energy_mj, memory_mb, accuracy_percent, accuracy_drop_points (when measured),
  objective, feasible (0/1), eval_seconds; tags trial, source, measured_by, plan_digest,
  accuracy_basis (where the accuracy is agreement without labels or estimated on synthetic inputs),
  violations (if any). Runs logged before (one `Decision.label()` per layer, `accuracy_drop` as a
  fraction) still read back (`logged_plan`, `logged_drop_points`).

Logging never makes the search wait: `log_trial` only puts the trial on a queue, and a worker
thread writes what has gathered as one batch, through MLflow's public client alone: per child run
the three calls the client needs, `create_run` (with its tags, name and start time), one
`log_batch` (params and metrics) and `set_terminated` (status and end time), and one `log_batch` of
the parent's metric points per batch. A tracking server gets the child runs on a few threads at
once (its round trips overlap); a SQLite or file store on one (it serialises writes anyway: more
threads only wait on its lock). On the default SQLite store that is about 20 ms of CPU per trial in
the background, MLflow's own per-call work (a SQLAlchemy session, the run's or experiment's lookup
and a commit per store call, six per trial); benchmarks/tracking_overhead.py measures what it costs
a whole simulated search.
"""
from __future__ import annotations

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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars in CLI output
# set_terminated on a tracking server prints two "View run" lines to stdout per run: one per trial would
# flood the terminal and break --json (the search prints its own way to open the UI)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
logging.getLogger("alembic").setLevel(logging.WARNING)

from mlflow.entities import Metric, Param, Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME  # noqa: E402

from explorer.errors import ExplorerError  # noqa: E402
from explorer.paths import runs_dir  # noqa: E402
from explorer.plan import Decision, Plan  # noqa: E402
from explorer.plots import PlotSettings, convergence_plot, pareto_plot  # noqa: E402
from explorer.stores import ensure_sqlite_store, first_value, sqlite_file, table_names  # noqa: E402

if TYPE_CHECKING:  # agents build on explorer, not the other way round
    from explorer.searching import SearchResult, Trial

log = logging.getLogger(__name__)

DATABASE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores
CONFIRMATION_ARTIFACT = "confirmation.json"
BEST_PLAN_ARTIFACT = "best_plan.json"
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_CALL = 100
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
STORE_THREADS = 4  # child runs written at once through MLflow's client to a server or database server
LOCAL_SCHEMES = ("sqlite", "file")  # stores in local files: one writer thread (see writer_threads)
QUEUE_SIZE = 10_000  # trials waiting to be written before log_trial blocks
BATCH_SECONDS = 0.5  # the worker gathers trials this long before writing them in one go
_FLUSH, _STOP = "flush", "stop"  # queue markers for the worker
NOTE_TAG = "mlflow.note.content"  # what MLflow's UI shows as the description of a run or an experiment
#: The parent run's tags, so the runs table can be filtered and grouped by them.
SEARCH_TAGS = ("model", "board", "agent", "objective", "measured_by")
EXPERIMENT_NOTE = """Every explorer search of one model on one board.

- One **parent run** per search: its settings as params (`max_accuracy_drop` in points, as
  `--max-accuracy-drop` takes it), tags model, board, agent, objective and measured_by, the
  best-so-far and feasible-count series, the best and confirmed figures, and its summary as its
  description.
- One **child run** per trial: per decision layer three params, `LAYER.rung` (full, svd:R,
  channel:R or spatial:R), `LAYER.precision` and `LAYER.processor` (a processor id of the board);
  metrics latency_ms, energy_mj, memory_mb, objective, feasible, `accuracy_percent` and
  `accuracy_drop_points` (percentage points below the uncompressed model).

Compare trials with the parallel-coordinates view: choose the `LAYER.*` params and a metric.
"""
TRIAL_METRICS = ("latency_ms", "latency_spread_ms", "energy_mj", "memory_mb", "peak_memory_mb", "objective")
#: Accuracy metrics in the units people read (an Evaluation holds fractions): MLflow name -> Evaluation field.
ACCURACY_METRICS = {"accuracy_percent": "accuracy", "accuracy_drop_points": "accuracy_drop"}
#: The parts of a layer's decision, one param each ("conv1_1.rung = spatial:16"), so that MLflow's
#: parallel-coordinates view, which shortens long values, shows every part whole.
DECISION_PARTS = ("rung", "precision", "processor")


def default_tracking_uri() -> str:
    """The local SQLite store under the runs folder."""
    return f"sqlite:///{(runs_dir() / DATABASE_FILE).resolve()}"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The URI given, else $MLFLOW_TRACKING_URI, else the local SQLite store under runs/."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def tracking_client(uri: str) -> MlflowClient:
    """An MlflowClient on `uri`; a local SQLite store is first made complete (atomically, under a lock)."""
    path = sqlite_file(uri)
    if path is not None:
        ensure_sqlite_store(path, "the MLflow store", _create_mlflow_store, _mlflow_store_problem, _mlflow_store_has_data)
    return MlflowClient(uri)


def _create_mlflow_store(path: Path) -> None:
    """A complete MLflow store in a new SQLite file: MLflow's own tables, migrations and default experiment."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{path}"
    artifacts = (path.parent / ARTIFACTS_FOLDER).resolve().as_uri()  # where MLflow would put experiment 0's
    try:
        SqlAlchemyStore(uri, artifacts)
    finally:  # MLflow keeps one engine per URI for the process: close the temporary file's (the map is
        for name in ("_engine_map", "_db_uri_sql_alchemy_engine_map"):  # private; MLflow 2 named it so)
            engine = getattr(SqlAlchemyStore, name, {}).pop(uri, None)
            if engine is not None:
                engine.dispose()


def _mlflow_store_problem(connection) -> str | None:
    """What an MLflow SQLite store lacks (None: complete): a table, the latest schema version, experiment 0."""
    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.db.utils import _get_latest_schema_revision  # imports every table definition

    missing = sorted(set(Base.metadata.tables) - table_names(connection))
    if missing:
        return f"{len(missing)} of its tables missing, e.g. {missing[0]}"
    version, head = first_value(connection, "SELECT version_num FROM alembic_version"), _get_latest_schema_revision()
    if version != head:
        return "no schema version" if version is None else f"schema version {version}, not {head}"
    if first_value(connection, "SELECT 1 FROM experiments WHERE experiment_id = 0") is None:
        return "no default experiment"
    return None


def _mlflow_store_has_data(connection) -> bool:
    """Runs, or experiments beyond MLflow's default one: a store someone used."""
    return (first_value(connection, "SELECT 1 FROM runs LIMIT 1") is not None
            or first_value(connection, "SELECT 1 FROM experiments WHERE experiment_id != 0 LIMIT 1") is not None)


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


def _local_artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite file, under runs/ for another
    database (MLflow's default there is ./mlruns in whatever folder the search ran from), or None
    where the store decides (an MLflow server, a file store)."""
    folder = _sqlite_folder(uri)
    if folder is None and _scheme(uri) in DATABASE_SCHEMES:
        folder = runs_dir()
    return (folder / ARTIFACTS_FOLDER).resolve().as_uri() if folder is not None else None


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


def decision_params(key: str, decision: Decision) -> dict[str, str]:
    """A layer's decision as trial params: `KEY.rung`, `KEY.precision`, `KEY.processor`."""
    rung, _, rest = decision.label().partition("/")  # the label's format lives in Decision alone
    precision, _, processor = rest.partition("@")
    return dict(zip((f"{key}.{part}" for part in DECISION_PARTS), (rung, precision, processor or "none")))


def logged_decision(params: dict[str, str], key: str) -> Decision | None:
    """The decision a trial run logged for one layer: its three params, or the one label (`KEY =
    spatial:16/int8@gpu`) that runs of explorer before them hold; None where the run has neither.
    Raises ExplorerError for a value that is no decision."""
    if f"{key}.rung" in params:
        rung, precision, processor = (params.get(f"{key}.{part}", "") for part in DECISION_PARTS)
        return Decision.from_label(f"{rung}/{precision}" + (f"@{processor}" if processor not in ("", "none") else ""))
    return Decision.from_label(params[key]) if key in params else None


def logged_plan(params: dict[str, str], layer_names: list[str]) -> Plan | None:
    """The plan of a trial run from its per-layer params (None where a layer is missing or unreadable)."""
    decisions = []
    for name, key in zip(layer_names, _layer_keys(layer_names)):
        try:
            decision = logged_decision(params, key)
        except ExplorerError:
            return None
        if decision is None:
            return None
        decisions.append((name, decision))
    return Plan(tuple(decisions))


def logged_drop_points(metrics: dict[str, float]) -> float | None:
    """A trial run's accuracy drop in points (runs before `accuracy_drop_points` logged a fraction)."""
    if "accuracy_drop_points" in metrics:
        return metrics["accuracy_drop_points"]
    return 100 * metrics["accuracy_drop"] if "accuracy_drop" in metrics else None


def _finite_metrics(values: Mapping[str, float | None]) -> dict[str, float]:
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
    status: str = "FINISHED"  # FAILED: the measurement failed


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
    client = tracking_client(resolve_tracking_uri(tracking_uri))
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


def search_run_settings(tracking_uri: str | None, run_id: str) -> tuple[dict, dict]:
    """A search's settings (its parent run's params, JSON values decoded) and its best plan JSON."""
    uri = resolve_tracking_uri(tracking_uri)
    client = tracking_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ExplorerError(f"no MLflow run {run_id} in {uri}: give a search's run id (open the store with: "
                            f"{ui_command(uri)})") from None
    parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if parent:
        raise ExplorerError(f"MLflow run {run_id} is one trial of the search run {parent}: give the search's run id")
    with tempfile.TemporaryDirectory() as folder:
        try:
            plan_json = json.loads(Path(client.download_artifacts(run_id, BEST_PLAN_ARTIFACT, folder)).read_text())
        except (MlflowException, OSError):
            raise ExplorerError(f"MLflow run {run_id} has no {BEST_PLAN_ARTIFACT}: its search found no feasible plan "
                                f"or did not finish; export another run, or a plan file with --plan") from None
    return {key: _param_value(text) for key, text in run.data.params.items()}, plan_json


def search_confirmation(tracking_uri: str | None, run_id: str) -> dict | None:
    """The confirmation (interleaved re-measurement) a search logged, or None where it has none."""
    client = tracking_client(resolve_tracking_uri(tracking_uri))
    with tempfile.TemporaryDirectory() as folder:
        try:
            return json.loads(Path(client.download_artifacts(run_id, CONFIRMATION_ARTIFACT, folder)).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def writer_threads(uri: str) -> int:
    """Child runs written at once: one for a store in local files (SQLite locks the whole file per
    write, so a second thread only waits and costs CPU switching), STORE_THREADS for a server."""
    return 1 if _scheme(uri) in LOCAL_SCHEMES else STORE_THREADS


class _ClientWriter:
    """Writes finished child runs through MLflow's public client, three calls per run (the fewest
    the client allows): `create_run` (every tag, the name and start time), one `log_batch` (params
    and metrics) and `set_terminated` (status and end time); `threads` runs at once."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, threads: int):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="mlflow-child") if threads > 1 else None

    def write(self, children: list[_ChildRun], parent_metrics: list[Metric]) -> None:
        if self.pool is None:
            for child in children:
                self._write_child(child)
        else:
            list(self.pool.map(self._write_child, children))  # re-raises the first failure
        for start in range(0, len(parent_metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.parent_run_id, metrics=parent_metrics[start:start + MAX_METRICS_PER_CALL],
                                  synchronous=True)

    def _write_child(self, child: _ChildRun) -> None:
        run = self.client.create_run(self.experiment_id, start_time=child.start_ms, tags=child.tags, run_name=child.name)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in child.params.items()]
        metrics = [Metric(k, v, child.end_ms, 0) for k, v in child.metrics.items()]
        for start in range(0, max(len(params), 1), MAX_PARAMS_PER_CALL):
            self.client.log_batch(run_id, metrics=metrics if start == 0 else [],
                                  params=params[start:start + MAX_PARAMS_PER_CALL], synchronous=True)
        self.client.set_terminated(run_id, child.status, child.end_ms)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class SearchTracker:
    """Tracks one search in MLflow; use as a context manager around the search.

    ```
    with SearchTracker(uri, experiment_name("vgg", "tegra-k1"), "ppo seed 0", settings) as tracker:
        result = agent.search(problem, budget, seed, callback=tracker.log_trial)
        tracker.finish(result, result.best_plan.to_json(), summary_markdown)
    ```
    Leaving the block with KeyboardInterrupt marks the parent run KILLED (trials logged so far are
    kept), with another exception FAILED, otherwise FINISHED. `resume_run_id` reopens a parent run
    and numbers the new trials after the ones it already has. `attach_run_id` makes this a worker of
    a distributed search: its trials become child runs of that parent run (numbered by their shared
    Optuna study), and the parent run is left to the process that started it.
    """

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, params: dict,
                 resume_run_id: str | None = None, tags: dict[str, str] | None = None,
                 attach_run_id: str | None = None):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        _check_reachable(self.tracking_uri)
        self.client = tracking_client(self.tracking_uri)
        self._failure: BaseException | None = None
        self._ended = False
        try:
            self.experiment_id = self._experiment(experiment)
            self.attached = attach_run_id is not None
            if attach_run_id:
                self.run_id, self._offset, self._best, self._feasible = attach_run_id, 0, math.inf, 0
                self._check_parent(attach_run_id)
            elif resume_run_id:
                self.run_id, self._offset, self._best, self._feasible = self._reopen(resume_run_id, params)
            else:
                self.run_id = self._start(run_name, params, tags or {})
                self._offset, self._best, self._feasible = 0, math.inf, 0
            self._writer = self._make_writer()
        except MlflowException as exc:
            raise ExplorerError(f"MLflow tracking at {self.tracking_uri} failed: {exc.message.splitlines()[0]}") from None
        self._layer_keys: list[str] | None = None
        self._logged = 0  # trials logged by this tracker (numbered after the resumed run's)
        self._queue: queue.Queue[_QueuedTrial | str] = queue.Queue(QUEUE_SIZE)
        self._wake = threading.Event()
        self._worker = threading.Thread(target=self._drain, name="mlflow-tracking", daemon=True)
        self._worker.start()

    # ---- setup --------------------------------------------------------------------------------
    def _experiment(self, name: str) -> str:
        """The experiment's id, creating it (artifacts where `_local_artifact_root` says) if needed."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=_local_artifact_root(self.tracking_uri),
                                                     tags={NOTE_TAG: EXPERIMENT_NOTE})
            except MlflowException as exc:  # created meanwhile by another process
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:  # created and deleted for good meanwhile
                    raise
        if experiment.lifecycle_stage != "active":
            raise ExplorerError(f"MLflow experiment {name!r} was deleted: restore it (mlflow experiments restore "
                                f"--experiment-id {experiment.experiment_id}) or remove it for good (mlflow gc)")
        if NOTE_TAG not in experiment.tags:  # an experiment a user described keeps its description
            self.client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, EXPERIMENT_NOTE)
        return experiment.experiment_id

    def _start(self, run_name: str, params: dict, tags: dict[str, str]) -> str:
        from mlflow.tracking.context.registry import resolve_tags
        run = self.client.create_run(self.experiment_id, tags=resolve_tags(tags), run_name=run_name)
        self._log_params(run.info.run_id, {mlflow_key(k): _param_text(v) for k, v in params.items()})
        return run.info.run_id

    def _check_parent(self, run_id: str) -> None:
        try:
            parent = self.client.get_run(run_id)
        except MlflowException:
            raise ExplorerError(f"no MLflow run {run_id} in {self.tracking_uri} to attach this worker to: give the "
                                "parent run of the distributed search and the same --tracking-uri") from None
        if parent.info.status != "RUNNING":
            raise ExplorerError(f"MLflow run {run_id} has ended ({parent.info.status}): workers attach to a running search")

    def _reopen(self, run_id: str, params: dict) -> tuple[str, int, float, int]:
        """Set a parent run RUNNING again; return its next trial number, best so far and feasible count."""
        try:
            parent = self.client.get_run(run_id)
        except MlflowException:
            raise ExplorerError(f"no MLflow run {run_id} in {self.tracking_uri}: resume a run id this store shows "
                                f"(open it with: {ui_command(self.tracking_uri)})") from None
        if parent.info.experiment_id != self.experiment_id:
            raise ExplorerError(f"MLflow run {run_id} belongs to another experiment (another model or board)")
        self.client.update_run(run_id, status="RUNNING")
        logged = parent.data.params
        new = {mlflow_key(k): _param_text(v) for k, v in params.items()}
        self._log_params(run_id, {k: v for k, v in new.items() if k not in logged})
        changed = {k: v for k, v in new.items() if k in logged and logged[k] != v}
        resumes = int(parent.data.tags.get("resumes", "0")) + 1
        self.client.set_tag(run_id, "resumes", str(resumes))
        if changed:  # params cannot change in MLflow: keep the new values as a tag
            self.client.set_tag(run_id, f"resume_{resumes}_params", json.dumps(changed))
        steps = [point.step for point in self.client.get_metric_history(run_id, "feasible_count")]
        metrics = parent.data.metrics
        return run_id, 1 + max(steps, default=-1), metrics.get("best_so_far", math.inf), int(metrics.get("feasible_count", 0))

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_CALL])

    def _make_writer(self) -> _ClientWriter:
        return _ClientWriter(self.client, self.experiment_id, self.run_id, writer_threads(self.tracking_uri))

    # ---- logging trials -----------------------------------------------------------------------
    @property
    def logged_digests(self) -> set[str]:
        """Plan digests of the trials the run already had when it was resumed (empty for a new run)."""
        if not self._offset:
            return set()
        return {run.data.tags["plan_digest"] for run in read_search(self.tracking_uri, self.run_id).trials
                if "plan_digest" in run.data.tags}

    def log_trial(self, trial: Trial, result: SearchResult) -> None:
        """Queue one trial for logging (an `explorer.searching.TrialCallback`); returns at once."""
        if self._ended:
            raise RuntimeError(f"MLflow run {self.run_id} has ended: log trials before finish()/close()")
        if self._failure is not None:
            raise ExplorerError(f"MLflow logging to {self.tracking_uri} failed: {self._failure}")
        if trial.evaluation.feasible:
            self._feasible += 1
            self._best = min(self._best, trial.evaluation.objective)
        self._queue.put(_QueuedTrial(trial, self._offset + self._logged, self._best, self._feasible,
                                     int(time.time() * 1000)))
        self._logged += 1

    def flush(self) -> None:
        """Wait until every queued trial is written."""
        self._signal(_FLUSH)
        if self._failure is not None:
            raise ExplorerError(f"MLflow logging to {self.tracking_uri} failed: {self._failure}")

    def _signal(self, marker: str) -> None:
        """Hand the worker a marker, wake it and wait until it has written everything before it."""
        if self._worker.is_alive():
            self._queue.put(marker)
            self._wake.set()
            self._queue.join()

    def _drain(self) -> None:
        """Worker thread: after the first trial of a batch, sleep BATCH_SECONDS (or until flushed),
        then write everything queued as one batch; end at the _STOP marker.

        Sleeping on an event rather than on the queue means one wake-up per batch, not per trial.
        """
        while True:
            batch = [self._queue.get()]
            if isinstance(batch[0], _QueuedTrial):
                self._wake.wait(BATCH_SECONDS)
            self._wake.clear()
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            trials = [item for item in batch if isinstance(item, _QueuedTrial)]
            try:
                if trials and self._failure is None:
                    self._writer.write([self._child(item) for item in trials],
                                       [] if self.attached else self._parent_points(trials))
            except Exception as exc:  # reported to the search thread by log_trial/flush
                log.warning("MLflow logging failed: %s", exc)
                self._failure = exc
            finally:
                for _ in batch:
                    self._queue.task_done()
            if _STOP in batch:
                return

    def _child(self, item: _QueuedTrial) -> _ChildRun:
        trial, e = item.trial, item.trial.evaluation
        names = [name for name, _ in trial.plan.decisions]
        if self._layer_keys is None or len(self._layer_keys) != len(names):
            self._layer_keys = _layer_keys(names)
        metrics = _finite_metrics({name: getattr(e, name) for name in TRIAL_METRICS}
                                  | {name: None if getattr(e, field) is None else 100 * getattr(e, field)
                                     for name, field in ACCURACY_METRICS.items()})
        metrics["feasible"] = float(e.feasible)
        metrics["eval_seconds"] = trial.seconds
        number = trial.study_trial if self.attached and trial.study_trial is not None else item.number
        name = f"trial {number}"
        return _ChildRun(
            name=name,
            start_ms=item.end_ms - int(1000 * trial.seconds),
            end_ms=item.end_ms,
            params={k: v for key, (_, decision) in zip(self._layer_keys, trial.plan.decisions)
                    for k, v in decision_params(key, decision).items()},
            metrics=metrics,
            tags={MLFLOW_RUN_NAME: name, MLFLOW_PARENT_RUN_ID: self.run_id, "trial": str(number),
                  "source": trial.source, "measured_by": e.measured_by, "plan_digest": e.plan_digest}
            | ({"accuracy_basis": e.accuracy_basis} if e.accuracy_basis else {})
            | ({"violations": "; ".join(e.violations)[:MAX_TAG_LENGTH]} if e.violations else {})
            | ({"failed": e.error[:MAX_TAG_LENGTH]} if e.error is not None else {}),  # e.failed
            status="FAILED" if e.failed else "FINISHED",
        )

    @staticmethod
    def _parent_points(trials: list[_QueuedTrial]) -> list[Metric]:
        points = []
        for item in trials:
            if math.isfinite(item.best_so_far):
                points.append(Metric("best_so_far", item.best_so_far, item.end_ms, item.number))
            points.append(Metric("feasible_count", float(item.feasible_count), item.end_ms, item.number))
        return points

    def log_curve(self, result: SearchResult) -> None:
        """The parent run's best_so_far and feasible_count series for a result whose trials other
        processes logged (the workers of a distributed search)."""
        now = int(time.time() * 1000)
        points, feasible = [], 0
        for step, (trial, best) in enumerate(zip(result.trials, result.best_so_far)):
            feasible += trial.evaluation.feasible
            if math.isfinite(best):
                points.append(Metric("best_so_far", best, now, step))
            points.append(Metric("feasible_count", float(feasible), now, step))
        for start in range(0, len(points), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=points[start:start + MAX_METRICS_PER_CALL])
        self._logged = len(result.trials)

    # ---- the end of a search ------------------------------------------------------------------
    def finish(self, result: SearchResult, best_plan_json: dict | None, summary_markdown: str,
               plots: dict[str, Path] | None = None, latency_budget_ms: float | None = None,
               metrics: dict[str, float] | None = None, confirmation: dict | None = None,
               plot_settings: PlotSettings | None = None, status: str | None = None) -> None:
        """Flush, log the best plan's metrics and the artifacts, and end the parent run.

        Artifacts: best_plan.json (unless `best_plan_json` is empty: no feasible plan), summary.md,
        every plot in `plots` (artifact file name -> local file), and convergence.png and pareto.png
        drawn here unless `plots` has them (with `plot_settings`, else only the latency budget); `metrics`
        are logged with the best_* ones; `confirmation` (the confirmed re-measurement, JSON) as
        confirmation.json. The run ends KILLED when the search was interrupted, else FINISHED, unless
        `status` says otherwise (FAILED: it ended early). After a resume, the best_* metrics, the plots
        and the artifacts describe `result` (pass one that covers the whole search), while the best_so_far series and
        the feasible count carry on from the trials logged before.
        """
        self.flush()
        best = result.best
        final: dict[str, float | None] = {"trials": float(self._offset + self._logged),
                                          "measured_evaluations": float(len(result.trials)),
                                          "predicted_evaluations": float(len(result.predicted))}
        if best is not None and result.best_trial is not None:
            final |= {"best_objective": best.objective, "best_latency_ms": best.latency_ms,
                      "best_energy_mj": best.energy_mj, "best_memory_mb": best.memory_mb,
                      "best_accuracy_percent": None if best.accuracy is None else 100 * best.accuracy,
                      "best_accuracy_drop_points": None if best.accuracy_drop is None else 100 * best.accuracy_drop,
                      "best_trial": float(self._offset + result.best_trial.number)}
        final |= metrics or {}
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in _finite_metrics(final).items()])
        settings = plot_settings or PlotSettings(latency_budget_ms=latency_budget_ms)
        with tempfile.TemporaryDirectory() as folder:
            files = {name: Path(path) for name, path in (plots or {}).items()}
            for path in files.values():
                if not path.is_file():
                    raise ExplorerError(f"plot {path} does not exist: write the file before finish()")
            if "convergence.png" not in files:
                files["convergence.png"] = convergence_plot(result, Path(folder) / "convergence.png", settings)
            if "pareto.png" not in files:
                files["pareto.png"] = pareto_plot(result, Path(folder) / "pareto.png", settings)
            for name, path in files.items():
                if path.name == name:
                    self.client.log_artifact(self.run_id, str(path))
                else:  # the artifact takes the name it is given
                    renamed = Path(folder) / name
                    renamed.write_bytes(path.read_bytes())
                    self.client.log_artifact(self.run_id, str(renamed))
        if best_plan_json:
            self.client.log_dict(self.run_id, best_plan_json, BEST_PLAN_ARTIFACT)
        if confirmation:
            self.client.log_dict(self.run_id, confirmation, CONFIRMATION_ARTIFACT)
        self.client.log_text(self.run_id, summary_markdown, "summary.md")
        self.client.set_tag(self.run_id, NOTE_TAG, _note(summary_markdown))  # the run's description
        self._end(status or ("KILLED" if result.interrupted else "FINISHED"))

    def mark_killed(self) -> None:
        """The search was interrupted: keep what was logged, set the parent run KILLED."""
        self._end("KILLED")

    def _end(self, status: str) -> None:
        if self._ended:
            return
        self._stop_worker()
        if not self.attached:  # a worker leaves the parent run to the process that started the search
            self.client.set_terminated(self.run_id, status)
        self._ended = True

    def _stop_worker(self) -> None:
        self._signal(_STOP)
        self._worker.join()
        self._writer.close()

    def close(self, status: str = "FINISHED") -> None:
        """Write every queued trial and end the parent run (no-op if already ended)."""
        self._end(status)
        if self._failure is not None:
            raise ExplorerError(f"MLflow logging to {self.tracking_uri} failed: {self._failure}")

    def __enter__(self) -> SearchTracker:
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


def _note(markdown: str) -> str:
    """A description within MLflow's tag length: cut where it would not fit, and says so."""
    if len(markdown) <= MAX_TAG_LENGTH:
        return markdown
    ending = "\n\n(cut here: the whole summary is the artifact summary.md)\n"
    return markdown[:MAX_TAG_LENGTH - len(ending)].rsplit("\n", 1)[0] + ending


def _param_text(value) -> str:
    """A setting as an MLflow param: strings as they are, anything else as JSON."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_LENGTH]


def _param_value(text: str):
    """A param read back: the JSON value where it is JSON (numbers, null, lists...), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """One quick request to an MLflow server, so a wrong address fails now and not after retries."""
    if _scheme(uri) not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as exc:
        raise ExplorerError(f"no MLflow tracking server answers at {uri} ({exc}): start one (mlflow server --port ...) "
                            f"or leave the tracking URI out to use the local store under runs/") from None
