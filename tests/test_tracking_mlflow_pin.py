"""The MLflow behaviour explorer.tracking relies on, through MLflow's public client alone.

Needs only MLflow, pytest and explorer.tracking (no ONNX, no torch), so that .ci/mlflow-compat can
run the behaviour test against another MLflow in a throwaway environment: the newest one pip gets,
or the oldest pyproject.toml allows.
"""
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param

from explorer.tracking import default_tracking_uri, tracking_client

CONSTRAINTS = Path(__file__).parent.parent / "constraints.txt"


def test_mlflow_is_the_pinned_version():
    """The behaviour below was last checked on the pinned MLflow: re-run .ci/mlflow-compat when the pin moves."""
    pins = dict(line.strip().split("==") for line in CONSTRAINTS.read_text().splitlines() if "==" in line)
    assert mlflow.__version__ == pins["mlflow"], "re-check this behaviour when the MLflow pin moves"


def test_mlflow_public_api_behaviour():
    """What the tracker relies on, through MLflow's public client on a store explorer made: a parent and child
    runs found by the parent tag, params and metric points of several steps in one log_batch, the end state
    and time set_terminated gives, and descriptions (mlflow.note.content) on runs and experiments."""
    client = tracking_client(default_tracking_uri())  # explorer's SQLite store, made complete first
    name = f"pin {time.time_ns()}"
    experiment = client.create_experiment(name, tags={"mlflow.note.content": "experiment text"})
    parent = client.create_run(experiment, tags={"model": "m", "mlflow.note.content": "parent text"}, run_name="search")
    child = client.create_run(experiment, start_time=1000, tags={"mlflow.parentRunId": parent.info.run_id, "trial": "0"},
                              run_name="trial 0")
    client.log_batch(child.info.run_id, params=[Param("conv.rung", "spatial:16"), Param("conv.processor", "lpc")],
                     metrics=[Metric("accuracy_drop_points", 1.45, 2000, 0)], synchronous=True)
    client.log_batch(parent.info.run_id, metrics=[Metric("best_so_far", v, 2000, step) for step, v in enumerate((3.0, 2.0, 1.0))],
                     synchronous=True)
    client.set_terminated(child.info.run_id, "FAILED", end_time=3000)

    found = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [run.info.run_id for run in found] == [child.info.run_id]
    run = found[0]
    assert run.info.status == "FAILED" and (run.info.start_time, run.info.end_time) == (1000, 3000)
    assert run.info.run_name == "trial 0" and run.data.tags["trial"] == "0"
    assert run.data.params == {"conv.rung": "spatial:16", "conv.processor": "lpc"}
    assert run.data.metrics == {"accuracy_drop_points": 1.45}
    history = client.get_metric_history(parent.info.run_id, "best_so_far")
    assert sorted((p.step, p.value) for p in history) == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert client.get_run(parent.info.run_id).data.metrics["best_so_far"] == 1.0  # the latest step's value
    assert client.get_run(parent.info.run_id).data.tags["mlflow.note.content"] == "parent text"
    assert client.get_experiment(experiment).tags["mlflow.note.content"] == "experiment text"
    client.set_terminated(parent.info.run_id)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
