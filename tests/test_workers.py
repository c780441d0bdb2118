"""The distributed search's supervisor (explorer/workers.py) without PostgreSQL: how it settles what a
dead worker left in the Optuna study and in MLflow, and how it replaces dead workers or stops.

The worker kill on PostgreSQL with real workers is in test_distributed.py."""
import sys

import pytest
from mlflow.tracking import MlflowClient
from netbuild import mlp, random_inputs
from optuna.trial import TrialState
from rich.console import Console

from explorer import workers
from explorer.accuracy import AccuracyScorer
from explorer.agents.optuna_agents import OptunaTPEAgent
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.problem import Constraints, Objective, Problem
from explorer.searching import SearchResult, Trial
from explorer.studies import DesignSpace, is_measured, open_storage
from explorer.tracking import SearchTracker, read_search
from explorer.workers import LOST_ATTR, RECOVERED_TAG, WORKER_ATTR, Supervisor, worker_identity

EXPERIMENT = "mlp @ tegra-k1"
DEAD = "elsewhere:4242"  # the identity of a worker that is gone


@pytest.fixture(scope="module")
def problem() -> Problem:
    graph = LayerGraph(mlp())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 100), None, "random inputs"))
    return Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=0), scorer, Constraints(latency_ms=0.3, max_accuracy_drop=0.05),
                   Objective.parse("energy"))


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"  # made once: MLflow's schema takes seconds


def _supervisor(problem, study, storage, tracker, command=None, budget=4, shared_study=False, console=None, **kwargs):
    return Supervisor(problem, study, storage, tracker, command or (lambda budget, seed: []),
                      lambda remaining: ["--budget", str(remaining), "--study", study.study_name], budget=budget,
                      workers=2, seed=0, folder=kwargs.pop("folder"), env=None, console=console or Console(),
                      source="tpe", shared_study=shared_study, **kwargs)


def _children(uri: str, run_id: str) -> dict[int, object]:
    runs = read_search(uri, run_id).trials
    numbers = [int(run.data.tags["trial"]) for run in runs]
    assert len(numbers) == len(set(numbers)), f"a trial is in MLflow more than once: {numbers}"
    return dict(zip(numbers, runs))


def test_a_dead_workers_trials_are_failed_and_queued_again_and_mlflow_ends_with_the_studys_trials(problem, mlflow_uri, tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    agent = OptunaTPEAgent(storage=storage, study_name="settle", shared=True)
    budget = len(problem.reference_plans()) + 2  # the start plans and some sampled ones: the queue is empty
    with SearchTracker(mlflow_uri, EXPERIMENT, "parent", {}) as parent:
        with SearchTracker(mlflow_uri, EXPERIMENT, "", {}, attach_run_id=parent.run_id) as worker:
            agent.search(problem, budget, seed=0, callback=worker.log_trial)  # a live worker: this process
        study, space = agent.study, DesignSpace(problem)
        measured = [t for t in study.get_trials() if is_measured(t)]
        assert len(measured) == budget and {t.user_attrs[WORKER_ATTR] for t in measured} == {worker_identity()}
        assert not [t for t in study.get_trials() if t.state == TrialState.WAITING]
        # 1. a worker told Optuna, then died before its MLflow batch was written
        told_not_logged = measured[2].number
        MlflowClient(mlflow_uri).delete_run(_children(mlflow_uri, parent.run_id)[told_not_logged].info.run_id)
        # 2. a worker logged its trial to MLflow, then died before telling Optuna
        orphan = study.ask()
        orphan.set_user_attr(WORKER_ATTR, DEAD)
        plan = space.plan({name: orphan.suggest_categorical(name, d.choices) for name, d in space.distributions.items()},
                          study.study_name)
        twice = measured[1]  # and 5. two workers took the same queued trial (SQLite) and both logged it
        twice_plan = space.plan(twice.params, study.study_name)
        with SearchTracker(mlflow_uri, EXPERIMENT, "", {}, attach_run_id=parent.run_id) as dead:
            dead.log_trial(Trial(0, plan, problem.evaluate(plan), "optuna-tpe", "tpe", 0.1, orphan.number), SearchResult("tpe"))
            dead.log_trial(Trial(1, twice_plan, problem.evaluate(twice_plan), "optuna-tpe", "reference", 0.1, twice.number),
                           SearchResult("tpe"))
        # 3. a worker died while sampling: some parameters, nothing measured
        sampling = study.ask()
        sampling.set_user_attr(WORKER_ATTR, DEAD)
        sampling.suggest_categorical(space.layer_names[0], space.distributions[space.layer_names[0]].choices)
        # 4. a worker died inside ask(), before it owned the trial: once with a fresh trial, once with a queued start plan
        unowned = study.ask()
        study.enqueue_trial(measured[0].params, user_attrs={"source": "reference"})
        unowned_queued = study.ask()
        assert len(read_search(mlflow_uri, parent.run_id).trials) == budget - 1 + 2  # one missing, one extra, one twice

        supervisor = _supervisor(problem, study, storage, parent, folder=tmp_path / "workers")
        supervisor.identities = {worker_identity(), DEAD}
        supervisor.settle()

        trials = {t.number: t for t in study.get_trials()}
        assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
        for lost in (orphan, sampling, unowned, unowned_queued):
            assert trials[lost.number].state == TrialState.FAIL and LOST_ATTR in trials[lost.number].user_attrs
            assert not is_measured(trials[lost.number])
        retries = [t for t in trials.values() if t.state == TrialState.WAITING]
        assert [t.system_attrs["failed_trial"] for t in retries] == [orphan.number, unowned_queued.number]  # complete ones
        assert retries[0].params == orphan.params and WORKER_ATTR not in retries[0].user_attrs  # a new owner takes it
        assert retries[1].system_attrs["fixed_params"] == measured[0].params and retries[1].user_attrs == {"source": "reference"}
        # MLflow: exactly the measured trials, each once; the recovered one says so, the orphan's run is deleted
        children = _children(mlflow_uri, parent.run_id)
        assert sorted(children) == sorted(t.number for t in measured)
        recovered = children[told_not_logged]
        assert RECOVERED_TAG in recovered.data.tags and recovered.data.tags["plan_digest"] == measured[2].user_attrs["plan_digest"]
        assert [n for n, run in children.items() if RECOVERED_TAG in run.data.tags] == [told_not_logged]
        gone = MlflowClient(mlflow_uri).search_runs([parent.experiment_id], f"tags.trial = '{orphan.number}'",
                                                    run_view_type=3)  # ViewType.ALL
        assert [run.info.lifecycle_stage for run in gone] == ["deleted"] and LOST_ATTR in gone[0].data.tags
        both = MlflowClient(mlflow_uri).search_runs([parent.experiment_id], f"tags.trial = '{twice.number}'", run_view_type=3)
        assert sorted(run.info.lifecycle_stage for run in both) == ["active", "deleted"]
        supervisor.settle()  # settling again changes nothing
        assert _children(mlflow_uri, parent.run_id).keys() == children.keys()

        # another worker takes the queued trials first: the orphan's plan is measured after all
        other = OptunaTPEAgent(storage=storage, study_name="settle", shared=True)
        with SearchTracker(mlflow_uri, EXPERIMENT, "", {}, attach_run_id=parent.run_id) as worker:
            result = other.search(problem, 1, seed=9, callback=worker.log_trial)
        rerun = study.trials[result.trials[0].study_trial]
        assert result.trials[0].plan == plan and rerun.system_attrs["failed_trial"] == orphan.number
        assert rerun.state == TrialState.COMPLETE and rerun.user_attrs[WORKER_ATTR] == worker_identity()


KILL_ITSELF = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]


@pytest.fixture
def empty_search(problem, mlflow_uri, tmp_path, monkeypatch):
    """A study and a parent run for fake workers that measure nothing; polls quickly."""
    monkeypatch.setattr(workers, "POLL_SECONDS", 0.05)
    storage = open_storage("memory")
    study = OptunaTPEAgent(storage=storage, study_name="fake", shared=True).open_study(problem, 0)
    with SearchTracker(mlflow_uri, EXPERIMENT, "fake workers", {}) as tracker:
        yield study, storage, tracker


def test_dead_workers_are_replaced_with_their_share_until_the_search_cannot_go_on_then_it_says_how(problem, empty_search,
                                                                                                     tmp_path, capsys):
    study, storage, tracker = empty_search
    started = []

    def command(budget, seed):
        started.append((budget, seed))
        return KILL_ITSELF

    supervisor = _supervisor(problem, study, storage, tracker, command, budget=5, folder=tmp_path / "w",
                             console=Console(stderr=True, width=400))
    with pytest.raises(SystemExit) as stopped:
        supervisor.run(lambda done: None)
    assert stopped.value.code == 1
    # shares 3 and 2 with seeds 0 and 1; each dead worker's share goes to a new one with the next seed, twice
    # (as many as there are workers), then the search stops
    assert started[:2] == [(3, 0), (2, 1)] and len(started) == 4
    assert sorted(started[2:]) in ([(2, 3), (3, 2)], [(2, 2), (3, 3)])
    err = capsys.readouterr().err
    assert err.count("killed by SIGKILL (exit -9)") == 3 and err.count("a new worker (seed") == 2
    assert "2 worker(s) were replaced already" in err
    assert f"go on with: explorer search --budget 5 --study {study.study_name}" in err
    assert len(list((tmp_path / "w").glob("worker-*.log"))) == 4


def test_a_worker_with_bad_input_is_not_replaced_and_one_that_finishes_ends_the_search(problem, empty_search, tmp_path, capsys):
    study, storage, tracker = empty_search
    bad = [sys.executable, "-c", "import sys; print('explorer: error: no such board'); sys.exit(2)"]
    supervisor = _supervisor(problem, study, storage, tracker, lambda budget, seed: bad, folder=tmp_path / "bad",
                             console=Console(stderr=True, width=400))
    with pytest.raises(SystemExit) as stopped:
        supervisor.run(lambda done: None)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "exit 2): explorer: error: no such board" in err and "a new worker" not in err
    assert "go on with: explorer search --budget 4" in err

    fine = _supervisor(problem, study, storage, tracker, lambda budget, seed: [sys.executable, "-c", "pass"],
                       folder=tmp_path / "fine")
    seen = []
    fine.run(seen.append)  # returns: every worker ended well
    assert seen and seen[-1] == 0


def test_sqlite_workers_take_each_queued_trial_exactly_once(tmp_path):
    """SQLite has no row locks: without BEGIN IMMEDIATE, concurrent ask() took one queued trial twice (Optuna #4621)."""
    import collections
    import threading

    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    queued = 30
    study = optuna.create_study(study_name="queue", storage=open_storage(url))
    for x in range(queued):
        study.enqueue_trial({"x": x})
    workers_n, taken, errors = 4, [], []
    barrier = threading.Barrier(workers_n, timeout=60)

    def worker() -> None:  # a separate storage (engine, connections) per worker, as separate processes have
        try:
            storage = open_storage(url)
            own = optuna.load_study(study_name="queue", storage=storage)
            barrier.wait()
            while True:
                trial = own.ask()
                fixed = storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
                if fixed is None:  # the queue is empty: a freshly sampled trial
                    return
                taken.append(fixed["x"])
                own.tell(trial, 0.0)  # a trial another worker also took would fail here: told twice
        except Exception as error:  # the assertion below says what went wrong
            errors.append(repr(error))

    threads = [threading.Thread(target=worker) for _ in range(workers_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads) and errors == []
    twice = {x: n for x, n in collections.Counter(taken).items() if n > 1}
    assert twice == {} and sorted(taken) == list(range(queued))


def test_sqlite_storage_waits_for_a_writer_within_its_busy_timeout(tmp_path):
    """The BEGIN IMMEDIATE hook keeps sqlite3's busy timeout: a locked file is waited for, not an error."""
    import sqlite3
    import threading
    import time

    from optuna.study import StudyDirection

    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = open_storage(url)
    storage.create_new_study([StudyDirection.MINIMIZE], "locked")
    holder = sqlite3.connect(tmp_path / "optuna.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing
    release = threading.Timer(0.5, holder.execute, args=("COMMIT",))
    release.start()
    started = time.monotonic()
    try:
        assert storage.get_study_id_from_name("locked") is not None
    finally:
        release.join()
        holder.close()
    assert time.monotonic() - started >= 0.4  # it waited for the lock, then went on


def test_two_workers_on_the_default_sqlite_storage_end_with_exactly_the_budget_in_optuna_and_mlflow(mlflow_uri, tmp_path,
                                                                                                   monkeypatch, capsys):
    import optuna
    from netbuild import small_cnn

    from explorer.cli import main

    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path / "runs"))  # a fresh default storage, runs/optuna.db
    model = tmp_path / "cnn.onnx"
    model.write_bytes(small_cnn().SerializeToString())
    budget = 9  # the start plans (taken by both workers at once) and sampled ones; shares of 5 and 4
    argv = ["search", "--model", str(model), "--board", "tegra-k1", "--agent", "optuna-tpe", "--budget", str(budget),
            "--workers", "2", "--seed", "2", "--tracking-uri", mlflow_uri]  # the module's store: its schema is made once
    assert main(argv) == 0
    out = capsys.readouterr().out
    run_id = next(line.split()[2] for line in out.splitlines() if line.startswith("MLflow run:"))
    search = read_search(mlflow_uri, run_id)
    assert search.parent.info.status == "FINISHED" and search.parent.data.metrics["trials"] == budget
    study = optuna.load_study(study_name=search.parent.data.tags["optuna_study"],
                              storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    measured = [t for t in study.trials if is_measured(t)]
    assert len(measured) == budget and not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert {t.user_attrs["source"] for t in measured} >= {"reference", "solver"}
    assert len({t.user_attrs[WORKER_ATTR] for t in measured}) == 2
    logged = {int(run.data.tags["trial"]): run.data.tags["plan_digest"] for run in search.trials}
    assert len(search.trials) == budget and logged == {t.number: t.user_attrs["plan_digest"] for t in measured}
