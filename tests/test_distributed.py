"""Distributed search: worker processes share one Optuna study on PostgreSQL and one MLflow store.

The PostgreSQL server comes from Debian's `postgresql` package (installed by `.ci/setup --tests`) and is
started for this module in a temporary folder. Without the package the tests are skipped, except
under CI=true, where they fail.
"""
import os

import optuna
import pytest
from mlflow.tracking import MlflowClient
from netbuild import small_cnn
from pgserver import TemporaryPostgres, postgres_bin

from explorer.cli import main
from explorer.paths import runs_dir
from explorer.tracking import read_search, search_run_settings


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed on CI: `.ci/setup --tests` installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed (bash .ci/setup --tests installs it)")
    with TemporaryPostgres() as server:
        yield server


def _run_id(out: str) -> str:
    return next(line.split()[2] for line in out.splitlines() if line.startswith("MLflow run:"))


def test_two_workers_share_one_study_with_exact_trials_all_in_mlflow(postgres, tmp_path, capsys):
    optuna_url, mlflow_url = postgres.create_database("optuna"), postgres.create_database("mlflow")
    model = tmp_path / "cnn.onnx"
    model.write_bytes(small_cnn().SerializeToString())
    budget = 13  # uneven on purpose: shares of 7 and 6
    argv = ["search", "--model", str(model), "--board", "tegra-k1", "--agent", "optuna-tpe", "--budget", str(budget),
            "--workers", "2", "--storage", optuna_url, "--tracking-uri", mlflow_url, "--seed", "5"]
    assert main(argv) == 0
    run_id = _run_id(capsys.readouterr().out)

    search = read_search(mlflow_url, run_id)
    assert search.parent.info.status == "FINISHED" and search.parent.data.metrics["trials"] == budget
    study_name = search.parent.data.tags["optuna_study"]
    study = optuna.load_study(study_name=study_name, storage=optuna_url)
    measured = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs["duplicate"]]
    assert len(measured) == budget  # exact: no trial lost, none extra
    assert study.user_attrs["mlflow_run_id"] == run_id and study.metric_names == ["energy (mJ)"]  # as optuna-dashboard shows it
    # every measured trial appears in MLflow exactly once, as a child of the search's parent run
    logged = [int(run.data.tags["trial"]) for run in search.trials]
    assert sorted(logged) == sorted(t.number for t in measured) and len(set(logged)) == budget
    digests = {int(run.data.tags["trial"]): run.data.tags["plan_digest"] for run in search.trials}
    assert all(digests[t.number] == t.user_attrs["plan_digest"] for t in measured)
    # both workers took part, each with its share
    sources = MlflowClient(mlflow_url).search_runs([search.parent.info.experiment_id],
                                                   f"tags.mlflow.parentRunId = '{run_id}'", max_results=100)
    assert len(sources) == budget
    assert {t.user_attrs["source"] for t in measured} >= {"reference", "solver", "tpe"}
    # artifacts of a database store go under runs/, not into whatever folder the search ran from
    artifact_root = MlflowClient(mlflow_url).get_experiment(search.parent.info.experiment_id).artifact_location
    assert artifact_root == (runs_dir() / "mlartifacts").resolve().as_uri()
    settings, best_plan = search_run_settings(mlflow_url, run_id)  # what `explorer export --run` reads
    assert best_plan["decisions"] and settings["budget"] == budget


def test_workers_are_for_optuna_agents(capsys):
    assert main(["search", "--agent", "ppo", "--workers", "2"]) == 2
    assert "optuna-tpe" in capsys.readouterr().err
    assert main(["search", "--agent", "optuna-tpe", "--workers", "5", "--budget", "3"]) == 2
    assert "more than --budget" in capsys.readouterr().err
    assert main(["search", "--agent", "random", "--study", "shared"]) == 2
    assert "Optuna study" in capsys.readouterr().err


def test_an_interrupted_distributed_search_says_how_to_go_on_and_that_reaches_the_budget(postgres, tmp_path, capsys,
                                                                                        monkeypatch):
    import shlex
    import time as real_time
    import types

    from explorer import workers
    from explorer.studies import measured_trial_count

    optuna_url, mlflow_url = postgres.create_database("optuna_go_on"), postgres.create_database("mlflow_go_on")
    model = tmp_path / "cnn.onnx"
    model.write_bytes(small_cnn().SerializeToString())
    budget = 60  # far from done when the workers are stopped
    storage = optuna.storages.RDBStorage(optuna_url)  # one connection pool: polling must be quick next to the workers

    def measured() -> int:
        names = optuna.get_all_study_names(storage=storage)
        return measured_trial_count(optuna.load_study(study_name=names[0], storage=storage)) if names else 0

    def sleep_then_ctrl_c(seconds: float) -> None:  # Ctrl-C once the workers have measured a few trials
        real_time.sleep(min(seconds, 0.05))
        if measured() >= 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(workers, "time", types.SimpleNamespace(sleep=sleep_then_ctrl_c, perf_counter=real_time.perf_counter,
                                                           time=real_time.time, monotonic=real_time.monotonic))
    argv = ["search", "--model", str(model), "--board", "tegra-k1", "--agent", "optuna-tpe", "--budget", str(budget),
            "--workers", "2", "--storage", optuna_url, "--tracking-uri", mlflow_url, "--seed", "2"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "KILLED" in err
    go_on = shlex.split(next(line for line in err.splitlines() if line.startswith("go on with: explorer search "))
                        .removeprefix("go on with: explorer search "))
    done = measured()
    assert 3 <= done < budget
    assert go_on[go_on.index("--budget") + 1] == str(budget - done) and "--study" in go_on

    monkeypatch.setattr(workers, "time", real_time)
    assert main(["search", *go_on]) == 0
    assert measured() == budget  # the study reaches the first search's budget exactly


def test_a_worker_killed_mid_way_is_replaced_and_the_study_ends_with_the_budget_each_trial_once_in_both_stores(
        postgres, tmp_path, capsys, monkeypatch):
    import collections
    import signal
    import time as real_time
    import types

    from explorer import workers
    from explorer.studies import is_measured
    from explorer.workers import LOST_ATTR, WORKER_ATTR

    optuna_url, mlflow_url = postgres.create_database("optuna_kill"), postgres.create_database("mlflow_kill")
    model = tmp_path / "cnn.onnx"
    model.write_bytes(small_cnn().SerializeToString())
    budget = 14
    storage = optuna.storages.RDBStorage(optuna_url)
    killed = {}

    def sleep_then_kill(seconds: float) -> None:  # kill -9 a worker while it runs a trial, once it has done two
        real_time.sleep(min(seconds, 0.05))
        names = optuna.get_all_study_names(storage=storage)
        if killed or not names:
            return
        trials = optuna.load_study(study_name=names[0], storage=storage).get_trials(deepcopy=False)
        done = collections.Counter(t.user_attrs.get(WORKER_ATTR) for t in trials if is_measured(t))
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING  # mid-way: done 2, share left
                   and 2 <= done[t.user_attrs.get(WORKER_ATTR)] <= budget // 2 - 3]
        if running:
            os.kill(int(running[0].user_attrs[WORKER_ATTR].rsplit(":", 1)[1]), signal.SIGKILL)
            killed["trial"], killed["worker"] = running[0].number, running[0].user_attrs[WORKER_ATTR]

    monkeypatch.setattr(workers, "time", types.SimpleNamespace(sleep=sleep_then_kill, monotonic=real_time.monotonic))
    argv = ["search", "--model", str(model), "--board", "tegra-k1", "--agent", "optuna-tpe", "--budget", str(budget),
            "--workers", "2", "--storage", optuna_url, "--tracking-uri", mlflow_url, "--seed", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert killed and "killed by SIGKILL (exit -9)" in captured.err and "a new worker (seed 5)" in captured.err

    search = read_search(mlflow_url, _run_id(captured.out))
    assert search.parent.info.status == "FINISHED" and search.parent.data.metrics["trials"] == budget
    study = optuna.load_study(study_name=search.parent.data.tags["optuna_study"], storage=optuna_url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]  # none left running for ever
    measured = [t for t in study.trials if is_measured(t)]
    assert len(measured) == budget  # exactly the budget: the dead worker's share was taken up
    logged = {int(run.data.tags["trial"]): run.data.tags["plan_digest"] for run in search.trials}
    assert len(logged) == len(search.trials) == budget  # each trial once in MLflow ...
    assert logged == {t.number: t.user_attrs["plan_digest"] for t in measured}  # ... and the same trials as Optuna
    owners = {t.user_attrs[WORKER_ATTR] for t in measured}
    assert killed["worker"] in owners and len(owners) == 3  # the two workers and the one that replaced the dead one
    dead_trial = study.trials[killed["trial"]]
    if dead_trial.state == optuna.trial.TrialState.FAIL:  # (it may have been told in the instant before the kill)
        assert LOST_ATTR in dead_trial.user_attrs
        retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead_trial.number]
        planned = {**dead_trial.system_attrs.get("fixed_params", {}), **dead_trial.params}  # a queued plan killed mid-suggest
        assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE and retry[0].params == planned
