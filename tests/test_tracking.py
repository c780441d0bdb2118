"""MLflow tracking: a real tracking server on loopback, the default SQLite store, kill/resume, speed."""
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflowserver import wait_until_healthy
from netbuild import random_inputs, small_cnn

from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.paths import runs_dir
from explorer.plots import staircase
from explorer.problem import Constraints, Objective, Problem
from explorer.searching import BudgetedProblem, SearchResult, Trial
from explorer.tracking import (
    SearchTracker,
    default_tracking_uri,
    experiment_name,
    logged_plan,
    read_search,
    search_run_settings,
    ui_command,
)

EXPERIMENT = experiment_name("small_cnn", "tegra-k1")
SETTINGS = {"model": "small_cnn", "board": "tegra-k1", "agent": "random", "budget": 12, "objective": "energy",
            "constraints": {"latency_ms": 1.2, "max_accuracy_drop": None}, "measurer": "sim", "seed": 0,
            "data": "64 random inputs"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def problem():
    graph = LayerGraph(small_cnn())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 64), None, "random inputs"))
    return Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=0), scorer,
                   Constraints(latency_ms=1.2, max_accuracy_drop=None), Objective.parse("energy"))


def random_search(problem, budget: int, seed: int, callback) -> SearchResult:
    """A real search: random plans through the budgeted evaluator, every trial to the callback (no reference
    plans first: these tests are about what is logged, and random trials vary more)."""
    budgeted = BudgetedProblem(problem, budget, "random", callback, references=False)
    rng = np.random.default_rng(seed)
    while budgeted.remaining:
        budgeted.evaluate(problem.random_plan(rng))
    return budgeted.result


def summary_of(result: SearchResult) -> str:
    return f"# random search\n\n{len(result.trials)} trials, {result.feasible_count} feasible\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, artifacts proxied by the server; stopped afterwards."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"),
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no background job runner
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(uri, server, 60, folder / "server.log")
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def check_tracked_search(uri: str, run_id: str, result: SearchResult, first_trial: int = 0, previous_best: float = math.inf):
    """Everything the tracker promises, read back through the public MLflow client.

    `first_trial` and `previous_best`: where a resumed run stood before `result` was logged.
    """
    tracked = read_search(uri, run_id)
    parent = tracked.parent
    assert parent.info.status == "FINISHED" and parent.info.run_name == "random seed 0"
    assert {k: parent.data.params[k] for k in ("model", "board", "agent", "budget", "measurer")} == \
        {"model": "small_cnn", "board": "tegra-k1", "agent": "random", "budget": "12", "measurer": "sim"}
    assert json.loads(parent.data.params["constraints"]) == SETTINGS["constraints"]

    trials = tracked.trials[first_trial:]
    assert len(trials) == len(result.trials)
    for run, trial in zip(trials, result.trials):
        e = trial.evaluation
        number = first_trial + trial.number
        assert run.info.run_name == f"trial {number}" and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == run_id and run.data.tags["trial"] == str(number)
        assert run.data.tags["source"] == "random" and run.data.tags["measured_by"] == e.measured_by
        assert run.data.tags["plan_digest"] == trial.plan.digest()
        assert ("violations" in run.data.tags) == (not e.feasible)
        assert run.data.params == {f"{name}.{part}": value for name, d in trial.plan.decisions
                                   for part, value in zip(("rung", "precision", "processor"),
                                                          (d.label().split("/")[0], d.precision, d.processor))}
        assert logged_plan(run.data.params, [name for name, _ in trial.plan.decisions]) == trial.plan
        metrics = run.data.metrics
        assert metrics["feasible"] == float(e.feasible)
        for key in ("latency_ms", "energy_mj", "memory_mb", "objective"):
            assert metrics[key] == pytest.approx(getattr(e, key), rel=1e-12)
        assert metrics["accuracy_percent"] == pytest.approx(100 * e.accuracy, rel=1e-12)  # points, not fractions
        assert metrics["accuracy_drop_points"] == pytest.approx(100 * e.accuracy_drop, rel=1e-12, abs=1e-12)
        assert "accuracy" not in metrics and "accuracy_drop" not in metrics

    client = MlflowClient(uri)
    feasible_counts = client.get_metric_history(run_id, "feasible_count")
    assert [p.step for p in sorted(feasible_counts, key=lambda p: p.step)] == list(range(first_trial + len(result.trials)))
    best_curve = sorted(client.get_metric_history(run_id, "best_so_far"), key=lambda p: p.step)
    new_points = [(p.step, p.value) for p in best_curve if p.step >= first_trial]
    expected = [(first_trial + n, min(previous_best, b)) for n, b in enumerate(result.best_so_far)]
    assert new_points == [(step, pytest.approx(b)) for step, b in expected if math.isfinite(b)]
    assert parent.data.metrics["best_objective"] == pytest.approx(result.best.objective)
    assert parent.data.metrics["best_energy_mj"] == pytest.approx(result.best.energy_mj)
    assert parent.data.metrics["feasible_count"] == sum(run.data.metrics["feasible"] for run in tracked.trials)

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best_plan.json", "convergence.png", "pareto.png", "summary.md"} <= artifacts
    folder = Path(client.download_artifacts(run_id, ""))
    assert json.loads((folder / "best_plan.json").read_text()) == result.best_plan.to_json()
    assert (folder / "summary.md").read_text() == summary_of(result)
    assert parent.data.tags["mlflow.note.content"] == summary_of(result)  # the run's description in MLflow's UI
    assert "accuracy_drop_points" in client.get_experiment(parent.info.experiment_id).tags["mlflow.note.content"]
    assert (folder / "convergence.png").read_bytes().startswith(PNG_MAGIC)
    assert (folder / "pareto.png").read_bytes().startswith(PNG_MAGIC)


def test_search_logged_to_a_tracking_server(mlflow_server, problem, capsys):
    with SearchTracker(mlflow_server, EXPERIMENT, "random seed 0", SETTINGS) as tracker:
        result = random_search(problem, 12, seed=0, callback=tracker.log_trial)
        assert 0 < result.feasible_count < 12, "the test needs feasible and infeasible trials"
        tracker.finish(result, result.best_plan.to_json(), summary_of(result), latency_budget_ms=1.2)
    assert "View run" not in capsys.readouterr().out  # MLflow's per-run links would flood stdout (and --json)
    check_tracked_search(mlflow_server, tracker.run_id, result)
    assert MlflowClient(mlflow_server).get_experiment_by_name(EXPERIMENT).artifact_location.startswith("mlflow-artifacts:")
    assert ui_command(mlflow_server).endswith(mlflow_server)


def test_default_store_is_sqlite_under_runs_and_works_offline(problem, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with SearchTracker(None, EXPERIMENT, "random seed 0", SETTINGS) as tracker:
        result = random_search(problem, 12, seed=0, callback=tracker.log_trial)
        extra = tmp_path / "agents.png"
        extra.write_bytes(PNG_MAGIC)
        tracker.finish(result, result.best_plan.to_json(), summary_of(result), plots={"agents.png": extra})
    uri = default_tracking_uri()
    assert tracker.tracking_uri == uri == f"sqlite:///{(runs_dir() / 'mlflow.db').resolve()}"
    check_tracked_search(uri, tracker.run_id, result)
    client = MlflowClient(uri)
    assert "agents.png" in {a.path for a in client.list_artifacts(tracker.run_id)}
    location = client.get_experiment_by_name(EXPERIMENT).artifact_location
    assert location == (runs_dir() / "mlartifacts").resolve().as_uri()
    command = ui_command(None)
    assert command.startswith("mlflow ui --backend-store-uri sqlite:///") and "--default-artifact-root" in command

    settings, plan_json = search_run_settings(None, tracker.run_id)  # what `explorer export --run` reads
    assert settings == SETTINGS and plan_json == result.best_plan.to_json()
    trial_run = read_search(None, tracker.run_id).trials[0].info.run_id
    with pytest.raises(ExplorerError, match=f"one trial of the search run {tracker.run_id}"):
        search_run_settings(None, trial_run)


def test_interrupted_search_is_killed_and_resumes_the_same_run(problem):
    uri = default_tracking_uri()  # a fresh SQLite file costs seconds of schema migrations: share the default one
    with pytest.raises(KeyboardInterrupt):
        with SearchTracker(uri, EXPERIMENT, "random seed 0", SETTINGS) as tracker:
            def stop_after_five(trial: Trial, result: SearchResult):
                tracker.log_trial(trial, result)
                if trial.number == 4:
                    raise KeyboardInterrupt
            random_search(problem, 12, seed=0, callback=stop_after_five)
    run_id = tracker.run_id
    killed = read_search(uri, run_id)
    assert killed.parent.info.status == "KILLED" and len(killed.trials) == 5
    best_before = min((run.data.metrics["objective"] for run in killed.trials if run.data.metrics["feasible"]), default=math.inf)
    with pytest.raises(ExplorerError, match="has no best_plan.json"):
        search_run_settings(uri, run_id)

    resumed = SearchTracker(uri, EXPERIMENT, "ignored on resume", SETTINGS | {"budget": 7}, resume_run_id=run_id)
    assert resumed.run_id == run_id and MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    result = random_search(problem, 7, seed=0, callback=resumed.log_trial)
    resumed.finish(result, result.best_plan.to_json(), summary_of(result))
    check_tracked_search(uri, run_id, result, first_trial=5, previous_best=best_before)
    after = read_search(uri, run_id)
    assert [int(run.data.tags["trial"]) for run in after.trials] == list(range(12))
    assert after.parent.data.params["budget"] == "12"  # MLflow params are immutable
    assert after.parent.data.tags["resumes"] == "1" and json.loads(after.parent.data.tags["resume_1_params"]) == {"budget": "7"}
    best = min(run.data.metrics["objective"] for run in after.trials if run.data.metrics["feasible"])
    assert after.parent.data.metrics["best_so_far"] == pytest.approx(best)

    again = SearchTracker(uri, EXPERIMENT, "random seed 0", SETTINGS, resume_run_id=run_id)
    again.mark_killed()
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_logging_never_blocks_the_search(problem):
    """log_trial only queues: the writer threads (MLflow's public client, three calls a trial) keep up in the
    background; what logging costs a whole search is measured by benchmarks/tracking_overhead.py."""
    sample = random_search(problem, 12, seed=0, callback=None).trials
    trials = [Trial(n, sample[n % 12].plan, sample[n % 12].evaluation, "random", "random", 0.001) for n in range(100)]
    uri = default_tracking_uri()
    tracker = SearchTracker(uri, EXPERIMENT, "speed", SETTINGS)
    result = SearchResult("random")
    started = time.perf_counter()
    slowest_call = 0.0
    for trial in trials:
        result.trials.append(trial)
        result.best_so_far.append(1.0)
        call = time.perf_counter()
        tracker.log_trial(trial, result)
        slowest_call = max(slowest_call, time.perf_counter() - call)
    queued = time.perf_counter() - started
    tracker.flush()
    elapsed = time.perf_counter() - started
    tracker.close()
    print(f"100 trials queued in {1000 * queued:.1f} ms, written in {elapsed:.2f} s ({1000 * elapsed / 100:.1f} ms per "
          f"trial); slowest log_trial call {1000 * slowest_call:.2f} ms")
    assert slowest_call < 0.05 and queued < 0.5 and elapsed < 60
    assert len(read_search(uri, tracker.run_id).trials) == 100


def test_file_store_goes_through_the_client_api(problem, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    uri = (tmp_path / "mlruns").as_uri()
    with SearchTracker(uri, EXPERIMENT, "random seed 0", SETTINGS) as tracker:
        result = random_search(problem, 12, seed=0, callback=tracker.log_trial)
        tracker.finish(result, result.best_plan.to_json(), summary_of(result))
    check_tracked_search(uri, tracker.run_id, result)
    assert ui_command(uri).startswith("MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file://")


def test_unreachable_server_fails_at_once_with_a_fix():
    started = time.perf_counter()
    with pytest.raises(ExplorerError, match="no MLflow tracking server answers"):
        SearchTracker(f"http://127.0.0.1:{free_port()}", EXPERIMENT, "x", {})
    assert time.perf_counter() - started < 10


def test_local_stores_get_one_writer_thread_and_servers_several():
    """SQLite locks its whole file per write: a second writer thread would only wait on it."""
    from explorer.tracking import STORE_THREADS, writer_threads

    assert writer_threads("sqlite:////tmp/runs/mlflow.db") == writer_threads("file:///tmp/mlruns") == 1
    assert writer_threads("http://127.0.0.1:5000") == writer_threads("postgresql+psycopg://h/db") == STORE_THREADS > 1


def test_staircase_keeps_only_undominated_points():
    points = [(1.0, 5.0), (2.0, 3.0), (2.5, 4.0), (3.0, 1.0), (4.0, 1.0), (1.0, 6.0)]
    assert staircase(points) == [(1.0, 5.0), (2.0, 3.0), (3.0, 1.0)]


def test_trials_read_back_into_the_same_plans_in_both_param_forms(problem):
    """The plan set and the workers rebuild plans from trial params: the three params a layer has now and
    the one label (and the drop as a fraction) that runs logged before them."""
    from explorer.planset import trial_plans
    from explorer.tracking import logged_drop_points

    uri = default_tracking_uri()
    names = [layer.name for layer in problem.graph.layers]
    with SearchTracker(uri, EXPERIMENT, "read back", SETTINGS) as tracker:
        result = random_search(problem, 6, seed=1, callback=tracker.log_trial)
    expected = [t.plan for t in result.trials if t.evaluation.feasible]
    assert expected, "the test needs a feasible trial"
    assert [plan for plan, _ in trial_plans(read_search(uri, tracker.run_id), names)] == expected

    client = MlflowClient(uri)  # a trial as explorer logged it before: one label per layer, fractions
    old = result.trials[0]
    parent = client.create_run(tracker.experiment_id, run_name="old search")
    child = client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": parent.info.run_id, "trial": "0",
                                                           "plan_digest": old.plan.digest()})
    client.log_batch(child.info.run_id, params=[Param(name, d.label()) for name, d in old.plan.decisions],
                     metrics=[Metric("feasible", 1.0, 0, 0), Metric("accuracy_drop", 0.0145, 0, 0)], synchronous=True)
    client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)
    [(plan, metrics)] = trial_plans(read_search(uri, parent.info.run_id), names)
    assert plan == old.plan and logged_drop_points(metrics) == pytest.approx(1.45)
    assert logged_plan({names[0]: "full/fp32@cpu"}, names) is None  # a layer missing: no plan
    assert logged_plan({f"{n}.rung": "wide:3" for n in names}, names) is None  # not a decision: no plan
