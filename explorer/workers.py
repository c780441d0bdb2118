"""Distributed search workers: local worker processes on one shared Optuna study, and their supervisor.

`explorer search --workers N` starts N worker processes (`explorer search ... --parent-run RUN`), each
with its share of the budget and its own seed, on one Optuna study (the coordination) and one MLflow
parent run. The `Supervisor` starts them, shows their progress, and keeps the search whole when one
dies:

- Every trial a worker asks for carries the user attribute `worker` = "host:pid" (the Optuna agent
  sets it right after `ask`, before sampling), so the supervisor knows whose trial is whose.
  Optuna's heartbeat is not used: it runs only inside `Study.optimize` (the agents ask and tell),
  and the supervisor, being the workers' parent, learns of a death at once, not after a grace period.
- A worker killed by a signal (kill -9, the OOM killer, a crash in native code) or ending in an
  unexpected error: its RUNNING trials are failed (user attribute `lost`) and queued again with the
  same parameters (Optuna's RetryHeartbeatStaleTrialCallback), and a new worker with the next free
  seed takes the rest of its share, so the study still reaches the budget. A search replaces at most
  N workers; after that, or when a worker reports bad input (exit 2, which a new one would repeat),
  the search cannot go on: the other workers are stopped and the command that goes on is printed,
  as after Ctrl-C. A worker interrupted on its own (exit 130: SIGTERM, Ctrl-C) stops the search as
  Ctrl-C does.
- At the end (finished, stopped or interrupted), Optuna is the source of truth: it records a trial
  in one transaction when the worker tells it, while a worker's MLflow logging writes batches from a
  background thread, so a killed worker loses up to one batch. Each trial of this search's workers
  that Optuna counts as measured and MLflow lacks is logged from the study (its measurement read
  back from the shared cache; tag `recovered`), and a child run whose trial Optuna does not count (a
  worker died after logging it but before telling Optuna; its parameters were queued again) is
  tagged `lost` and deleted (`mlflow runs restore` brings it back). Then the two stores hold the
  same trials, each once.
"""
from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from explorer.searching import SearchResult, Trial
from explorer.studies import DesignSpace, is_measured, measured_trial_count

if TYPE_CHECKING:
    from rich.console import Console

    from explorer.problem import Problem
    from explorer.tracking import SearchTracker

WORKER_ATTR = "worker"  # Optuna trial user attribute: the process that asked for it, "host:pid"
LOST_ATTR = "lost"  # on a trial failed because its worker died, and on an MLflow run of such a trial
RECOVERED_TAG = "recovered"  # on an MLflow run the supervisor logged from the Optuna study
POLL_SECONDS = 1.0  # how often the supervisor looks at the workers and the study
STOP_SECONDS = 60.0  # how long stopped workers get to end their trial and write MLflow, before SIGKILL
NOT_REPLACED = {2: "bad input", 130: "interrupted"}  # worker exit statuses a new worker would not fix


def worker_identity(pid: int | None = None) -> str:
    """The `worker` attribute of the trials that process `pid` (default: this one) asks for."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def exit_text(returncode: int) -> str:
    """How a worker ended, in words: 'failed (exit 1)', 'was killed by SIGKILL (exit -9)'."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name} (exit {returncode})"
        except ValueError:
            return f"was killed by signal {-returncode} (exit {returncode})"
    return f"{'was interrupted' if returncode == 130 else 'failed'} (exit {returncode})"


@dataclass
class _Worker:
    slot: int  # 0..N-1; a replacement takes the slot of the worker it replaces
    seed: int
    budget: int  # this process's share of the budget
    log_path: Path
    process: subprocess.Popen

    @property
    def identity(self) -> str:
        return worker_identity(self.process.pid)

    def last_line(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"


class _Stop(Exception):
    """The search cannot go on, or a worker was interrupted: `status` is the command's exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Supervisor:
    """Runs a distributed search's worker processes on one Optuna study and one MLflow parent run.

    `command(budget, seed)` is a worker's command line; `go_on(remaining)` the arguments of the
    `explorer search` that takes up the rest of the budget. `shared_study`: other processes may add
    to the study (`--study` was given), so only this search's own workers' trials are touched.
    """

    def __init__(self, problem: Problem, study: optuna.Study, storage: BaseStorage, tracker: SearchTracker,
                 command: Callable[[int, int], list[str]], go_on: Callable[[int], list[str]], *, budget: int,
                 workers: int, seed: int, folder: Path, env: dict[str, str], console: Console, source: str,
                 shared_study: bool):
        self.problem, self.study, self.storage, self.tracker = problem, study, storage, tracker
        self.command, self.go_on = command, go_on
        self.budget, self.workers, self.seed = budget, workers, seed
        self.folder, self.env, self.console, self.source = folder, env, console, source
        self.shared_study = shared_study
        self.already = measured_trial_count(study)  # measured before this search (a study joined with --study)
        self.running: list[_Worker] = []
        self.identities: set[str] = set()  # every worker this search started
        self.replacements = 0

    # ---- the run ------------------------------------------------------------------------------
    def run(self, on_progress: Callable[[int], None]) -> None:
        """Start the workers and wait for them; returns when the study has this search's budget.

        A dead worker is replaced (see the module); Ctrl-C, or a search that cannot go on, stops
        every worker, makes MLflow agree with the study, prints the go-on command and raises
        SystemExit (130 interrupted, 2 a worker's bad input, 1 cannot go on otherwise)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        shares = [self.budget // self.workers + (i < self.budget % self.workers) for i in range(self.workers)]
        try:
            for slot, share in enumerate(shares):
                self._start(slot, share, self.seed + slot)
            while self.running:
                on_progress(self.done())
                time.sleep(POLL_SECONDS)
                self._check()
            on_progress(self.done())
        except (KeyboardInterrupt, _Stop) as stop:
            self._stop_all()
            self.settle()
            self._say_stopped(stop)  # raises SystemExit
        self.settle()

    def done(self) -> int:
        """Measured trials this search added to the study."""
        return measured_trial_count(self.study) - self.already

    def _start(self, slot: int, budget: int, seed: int) -> _Worker:
        replacement = seed >= self.seed + self.workers
        log_path = self.folder / (f"worker-{slot}-seed{seed}.log" if replacement else f"worker-{slot}.log")
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(self.command(budget, seed), stdout=log_file, stderr=subprocess.STDOUT, env=self.env)
        worker = _Worker(slot, seed, budget, log_path, process)
        self.running.append(worker)
        self.identities.add(worker.identity)
        return worker

    def _check(self) -> None:
        """Notice the workers that ended; replace a dead one or stop the search."""
        for worker in [w for w in self.running if w.process.poll() is not None]:
            self.running.remove(worker)
            if worker.process.returncode != 0:
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        code = worker.process.returncode
        failed, queued = self._fail_orphans({worker.identity}, f"its worker (seed {worker.seed}) {exit_text(code)}")
        left = worker.budget - self._measured_by(worker.identity)
        what = f"worker {worker.slot} (seed {worker.seed}) {exit_text(code)}"
        if code in NOT_REPLACED:  # 130: stop as Ctrl-C does; 2: bad input, exit 2 as the worker did
            raise _Stop(f"{what}: {worker.last_line()} (log: {worker.log_path})", status=code)
        lost = f"; its running trial(s) {', '.join(map(str, failed))} failed" if failed else ""
        lost += f" (queued again: {', '.join(map(str, queued))})" if queued else ""
        if left <= 0:
            self._say(f"[yellow]{what}[/] after its last trial{lost}")
            return
        if self.replacements >= self.workers:
            raise _Stop(f"{what} with {left} of its trials to go, and {self.replacements} worker(s) were replaced "
                        f"already: {worker.last_line()} (log: {worker.log_path})", status=1)
        self.replacements += 1
        new = self._start(worker.slot, left, self.seed + self.workers + self.replacements - 1)
        self._say(f"[yellow]{what}[/] after {worker.budget - left} of its {worker.budget} trials{lost}; "
                  f"a new worker (seed {new.seed}) takes the other {left} (log: {new.log_path})")

    def _stop_all(self) -> None:
        """SIGINT to every running worker (it ends its trial, writes MLflow, exits), SIGKILL after STOP_SECONDS."""
        for worker in self.running:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        for worker in self.running:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"worker {worker.slot} did not stop within {STOP_SECONDS:g} s: killed (SIGKILL)")
                worker.process.kill()
                worker.process.wait(timeout=STOP_SECONDS)
        self.running = []

    def _say_stopped(self, stop: BaseException) -> None:
        """The end of a stopped search: what happened, the go-on command, SystemExit."""
        status = stop.status if isinstance(stop, _Stop) else 130
        interrupted = status == 130
        if isinstance(stop, _Stop):
            self._say(f"[bold red]explorer: error:[/] {stop}")
        if interrupted:
            self.tracker.mark_killed()
        self._say(f"[yellow]{'interrupted' if interrupted else 'stopped'}[/]: the workers stopped; the study "
                  f"{self.study.study_name} and the MLflow run {self.tracker.run_id} "
                  f"({'KILLED' if interrupted else 'FAILED'}) keep every finished trial")
        remaining = self.budget - self.done()
        if remaining > 0:  # new workers on the same study take up the rest (a new parent run, the whole study's summary)
            self._say(f"go on with: explorer search {' '.join(self.go_on(remaining))}")
        raise SystemExit(status)

    def _say(self, text: str) -> None:
        """One line on the console, never wrapped (each says one event and is searched for in logs)."""
        self.console.print(text, highlight=False, soft_wrap=True)

    # ---- keeping the stores whole -------------------------------------------------------------
    def settle(self) -> None:
        """Every worker has ended: fail what they left RUNNING, then make MLflow agree with the study."""
        from mlflow.exceptions import MlflowException

        from explorer.errors import ExplorerError

        failed, queued = self._fail_orphans(self.identities, "its worker ended before telling Optuna",
                                            unowned=not self.shared_study)
        if failed:
            self._say(f"Optuna: trial(s) {', '.join(map(str, failed))} left RUNNING by ended workers failed"
                      + (f" (queued again: {', '.join(map(str, queued))})" if queued else ""))
        try:
            logged, removed, copies = reconcile_tracking(self.problem, self.study, self.identities, self.tracker, self.source)
        except (MlflowException, ExplorerError) as error:  # the store went away: say so, keep the search's own ending
            self._say(f"[yellow]MLflow was not brought in line with the Optuna study[/]: {error}")
            return
        if logged:
            self._say(f"MLflow: logged trial(s) {', '.join(map(str, logged))} from the Optuna study (their "
                      "worker died before writing them; tag recovered)")
        if removed:
            self._say(f"MLflow: deleted the run(s) of trial(s) {', '.join(map(str, removed))}, which Optuna "
                      "does not count (their worker ended before telling it; tag lost)")
        if copies:
            self._say(f"MLflow: deleted a second run of trial(s) {', '.join(map(str, copies))} (two workers took the same "
                      "queued trial; tag lost)")

    def _measured_by(self, identity: str) -> int:
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if is_measured(t) and t.user_attrs.get(WORKER_ATTR) == identity)

    def _fail_orphans(self, owners: set[str], reason: str, unowned: bool = False) -> tuple[list[int], list[int]]:
        """Fail the RUNNING trials of these (ended) workers, and queue each again with its parameters
        (unless a worker died while sampling them: then they are incomplete and nothing was measured).
        `unowned`: also those without an owner (a worker died inside `ask`, before it could set it).
        Returns the numbers of the trials failed and of those queued again."""
        layers = set(DesignSpace(self.problem).layer_names)
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        failed, queued = [], []
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.user_attrs.get(WORKER_ATTR)
            if owner not in owners and not (owner is None and unowned):
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                self.storage.set_trial_user_attr(trial_id, LOST_ATTR, reason)
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # told after all, just now
                continue
            failed.append(trial.number)
            if layers <= set(trial.params) | set(trial.system_attrs.get("fixed_params", {})):  # not if it died sampling
                queued.append(trial.number)
                retry = copy.deepcopy(trial)
                retry.user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "source"}  # not the dead owner
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    RetryHeartbeatStaleTrialCallback()(self.study, retry)
        return failed, queued


def reconcile_tracking(problem: Problem, study: optuna.Study, owners: set[str], tracker: SearchTracker,
                       source: str) -> tuple[list[int], list[int], list[int]]:
    """Make the parent run's child runs exactly the trials that `owners` measured in the study (Optuna
    is the source of truth): log those MLflow lacks, delete those Optuna does not count and second
    copies. Returns the trial numbers logged, deleted and deleted as copies. Call when those workers
    have ended."""
    from explorer.tracking import SearchTracker, read_search

    measured = {t.number: t for t in study.get_trials(deepcopy=False)
                if is_measured(t) and t.user_attrs.get(WORKER_ATTR) in owners}
    kept: set[int] = set()
    removed: list[int] = []
    copies: list[int] = []
    for run in read_search(tracker.tracking_uri, tracker.run_id).trials:
        number = int(run.data.tags.get("trial", -1))
        if number in measured and number not in kept:
            kept.add(number)
            continue
        copy_ = number in measured
        tracker.client.set_tag(run.info.run_id, LOST_ATTR, "a second run of this trial" if copy_ else
                               "Optuna does not count this trial: its worker ended before telling Optuna its result")
        tracker.client.delete_run(run.info.run_id)
        (copies if copy_ else removed).append(number)
    missing = sorted(set(measured) - kept)
    if missing:
        space = DesignSpace.for_study(problem, study)  # labels, or a pre-label study's indices
        experiment = tracker.client.get_experiment(tracker.experiment_id).name
        with SearchTracker(tracker.tracking_uri, experiment, "", {}, attach_run_id=tracker.run_id) as writer:
            result = SearchResult(source)
            for number in missing:
                frozen = measured[number]
                plan = space.plan(frozen.params, study.study_name)
                error = frozen.user_attrs.get("error")
                evaluation = problem._failed(plan.digest(), error) if error else problem.evaluate(plan)  # from the cache
                seconds = ((frozen.datetime_complete - frozen.datetime_start).total_seconds()
                           if frozen.datetime_complete and frozen.datetime_start else 0.0)
                writer.log_trial(Trial(number, plan, evaluation, source, frozen.user_attrs.get("source", source),
                                       seconds, number), result)
        for run in read_search(tracker.tracking_uri, tracker.run_id).trials:
            if int(run.data.tags.get("trial", -1)) in missing:
                tracker.client.set_tag(run.info.run_id, RECOVERED_TAG, "logged by the supervisor from the Optuna study: "
                                                                       "its worker died before writing it")
    return missing, removed, copies

