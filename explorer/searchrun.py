"""A search run: one search of a Problem from start to end, the same for `explorer search`, `explorer.search()`
and the benchmarks.

    run = SearchRun(problem, "optuna-tpe", budget=50, seed=0, settings=problem.settings)
    result = run.run(agent)                  # sensitivity table, baseline, tracked search, confirmation, summary
    run.run_id, run.report                   # the MLflow parent run; what `--json` prints of it

The steps: measure (or recall) the sensitivity table and the fp32 baseline; open the MLflow parent run (or
reopen an interrupted one: its trials are replayed from the caches, not logged twice); let the agent search,
logging each trial (on a real device with a kernel table, plans it predicts far from the best are answered with
the prediction and counted, not measured or logged: explorer.screening); then compare with the reference
plans, confirm the best plans by interleaved re-measurement and log the summary, its metrics and plots. Ctrl-C
or SIGTERM (as KeyboardInterrupt) during the search ends it with what it has: the parent run is marked KILLED and
`--resume RUN_ID` continues it. Measurement servers that stay unreachable end it early: what was measured is
summarised, the run FAILED.
`run_agent` is the interrupt-safe core alone, for the benchmarks' untracked searches.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from explorer.confirm import Confirmation, confirm
from explorer.measure import MeasurementFailed, ServersUnreachable
from explorer.paths import runs_dir
from explorer.plan import Plan
from explorer.problem import Evaluation, Problem
from explorer.report import (
    confirmation_candidates,
    confirmed_headline,
    confirmed_metrics,
    console,
    constraint_lines,
    ended_early_markdown,
    err_console,
    gains,
    plot_settings,
    print_best_plan,
    print_confirmation,
    print_interrupted,
    print_search_figures,
    search_json,
    search_progress,
    sensitivity_status,
    sensitivity_with_progress,
    summary_markdown,
    summary_rows,
)
from explorer.screening import Screen
from explorer.searching import Agent, SearchResult, TrialCallback
from explorer.sessions import worker_environment
from explorer.studies import default_storage_url, default_study_name, open_storage
from explorer.tracking import NOTE_TAG, SearchTracker, resolve_tracking_uri
from explorer.workers import Supervisor


def run_agent(agent: Agent, problem: Problem, budget: int, seed: int, on_trial: TrialCallback | None = None) -> SearchResult:
    """`agent.search(problem, budget, seed, on_trial)`, stopped by Ctrl-C at any instant: every agent catches
    KeyboardInterrupt and returns what it has (`interrupted` set); one that arrives before the agent's own
    handler is in place gives the trials seen so far (none: an empty result), marked interrupted too."""
    seen: list[SearchResult] = []

    def record(trial, result: SearchResult) -> None:
        seen[:] = [result]
        if on_trial is not None:
            on_trial(trial, result)

    try:
        return agent.search(problem, budget, seed, record)
    except KeyboardInterrupt:
        result = seen[0] if seen else SearchResult(agent=agent.name)
        result.interrupted = True
        return result


def confirm_search(problem: Problem, result: SearchResult,
                   candidates: list[tuple[str, Plan]] | None = None) -> tuple[Confirmation, dict[str, str]]:
    """The search's best plans and the best reference (`candidates`, default report.confirmation_candidates)
    measured again interleaved with the baseline (explorer.confirm; the baseline alone when nothing was
    feasible), and the names of the plans."""
    candidates = confirmation_candidates(problem, result) if candidates is None else candidates
    return confirm(problem, [plan for _, plan in candidates]), {plan.digest(): name for name, plan in candidates}


def prepare(problem: Problem) -> Evaluation:
    """Measure (or recall) the sensitivity table and the baseline before a search; the baseline's Evaluation."""
    if problem.scorer.measured:
        sensitivity_with_progress(problem.graph, problem.compressor, problem.scorer, sensitivity_status(problem.scorer))
    with err_console.status("baseline: uncompressed fp32 on each processor"):
        return problem.baseline()


class SearchRun:
    """One tracked search of `problem` by the agent called `agent_name` for `budget` measured evaluations.

    `settings`: the problem's names under the CLI's option names (`problem.settings`, or the command's
    options), logged so that `explorer export --run` rebuilds the problem. What the run found so far is kept
    on it (`run_id`, `result`, `baseline`), so an interrupted run can still be reported; `report` is what
    `--json` prints of a finished one and `ended` the error that ended it early (None: it did not).
    """

    def __init__(self, problem: Problem, agent_name: str, budget: int, seed: int, settings: dict,
                 tracking_uri: str | None = None):
        self.problem, self.agent_name, self.budget, self.seed = problem, agent_name, budget, seed
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = f"{Path(problem.graph.source).stem} @ {problem.board.name}"
        # the settings under their option names (so `explorer export --run` can rebuild the problem), and what they mean
        self.params: dict[str, Any] = dict(settings) | {
            "agent": agent_name, "budget": budget, "objective_meaning": problem.objective.describe(),
            "measured_by": problem.measurer.label(problem.board),
            "data_source": problem.scorer.dataset.source if problem.scorer.dataset else "none (accuracy not measured)",
            "accuracy_basis": problem.scorer.label, "screening": Screen.setting(problem)}
        self.run_id: str | None = None
        self.result: SearchResult | None = None
        self.baseline: Evaluation | None = None
        self.report: dict | None = None
        self.ended: ServersUnreachable | None = None
        self.go_on_args: list[str] | None = None  # a stopped distributed search: the arguments that go on with it

    def tags(self) -> dict[str, str]:
        """The parent run's tags (model, board, agent, objective, measured_by) and its description until the
        summary replaces it."""
        problem, limits = self.problem, "; ".join(constraint_lines(self.problem, None))
        return {"model": Path(problem.graph.source).stem, "board": problem.board.name, "agent": self.agent_name,
                "objective": problem.objective.describe(), "measured_by": problem.measurer.label(problem.board),
                NOTE_TAG: f"{self.agent_name} search of {problem.graph.source} on {problem.board.name}, budget "
                          f"{self.budget}: minimise {problem.objective.describe()}" + (f" ({limits})" if limits else "")
                          + ". The summary replaces this when the search ends."}

    # ---- the three ways to run ----------------------------------------------------------------
    def run(self, agent, resume_run_id: str | None = None) -> SearchResult:
        """The search in this process, from the sensitivity table to the summary; `resume_run_id` continues
        an interrupted one. Interrupted: the run is marked KILLED and the result comes back `interrupted`."""
        problem = self.problem
        self.baseline = prepare(problem)
        references = len(problem.reference_plans())
        if self.budget <= references:  # the reference plans come first and count: the agent would get no turn
            err_console.print(f"[yellow]note:[/] the first {references} evaluations are the reference plans (what you "
                              f"would try without explorer): --budget {self.budget} leaves {self.agent_name} no plan of "
                              f"its own; give more than {references}", soft_wrap=True)
        if Screen.off_reason(problem) is None:
            err_console.print("screening: plans the device's kernel table predicts far from the best are answered with "
                              "the prediction and not measured; the budget counts device measurements (--no-screen "
                              "measures every plan)", soft_wrap=True)
        with SearchTracker(self.tracking_uri, self.experiment, f"{self.agent_name} seed {self.seed}", self.params,
                           resume_run_id=resume_run_id, tags=self.tags()) as tracker, \
                search_progress(problem, f"{self.agent_name} search", self.budget) as progress:
            self.run_id = tracker.run_id
            if self.agent_name.startswith("optuna"):
                agent.link_run(tracker.run_id, tracker.tracking_uri)  # the study's user attributes name the run
            already_logged = tracker.logged_digests  # resuming: the agent replays these from the caches

            def on_trial(trial, result: SearchResult) -> None:
                self.result = result
                if trial.plan.digest() not in already_logged:
                    tracker.log_trial(trial, result)
                progress.trial(result)

            try:
                result = run_agent(agent, problem, self.budget, self.seed, on_trial)
            except ServersUnreachable as error:  # the measurement servers are gone: the search ends with what it has
                if self.result is None:  # nothing measured: nothing to summarise (the parent run ends FAILED)
                    raise
                self.ended, result = error, self.result
            self.result = result
            progress.stop()
            if result.interrupted:
                tracker.mark_killed()
                print_interrupted(problem, result, tracker.run_id)
                return result
            if self.ended:
                err_console.print(f"[red]the search ended early[/] after {len(result.trials)} of {self.budget} "
                                  f"evaluations: {self.ended}")
            self.conclude(tracker, result)
        return result

    def run_worker(self, agent, parent_run_id: str) -> SearchResult:
        """One worker of a distributed search: its share of the budget on the shared study, its trials logged
        as child runs of the search's parent run (which the supervising process ends)."""
        with SearchTracker(self.tracking_uri, self.experiment, "", self.params, attach_run_id=parent_run_id) as tracker:
            self.run_id = tracker.run_id
            agent.link_run(tracker.run_id, tracker.tracking_uri)
            self.result = run_agent(agent, self.problem, self.budget, self.seed, tracker.log_trial)
        return self.result

    def run_distributed(self, workers: int, storage: str | None, study: str | None, agent_for: Callable[..., Any],
                        search_args: Callable[..., list[str]]) -> SearchResult:
        """`workers` local worker processes share one Optuna study and this run's MLflow parent run
        (explorer.workers.Supervisor starts and watches them, and replaces one that dies).

        `study`: an existing study to add to (default: a new one named after the run); `agent_for(storage=,
        study_name=)`: the Optuna agent on the shared study; `search_args(**overrides)`: the command-line
        arguments of this search with some replaced, for the workers' and a follow-up search's commands."""
        problem = self.problem
        self.params["workers"] = workers
        self.baseline = prepare(problem)
        storage = storage or default_storage_url()
        with SearchTracker(self.tracking_uri, self.experiment, f"{self.agent_name} x{workers} workers seed {self.seed}",
                           self.params, tags=self.tags()) as tracker:
            self.run_id = tracker.run_id
            study_name = study or f"{default_study_name(problem, self.agent_name, self.seed)}-{tracker.run_id[:8]}"
            tracker.client.set_tag(tracker.run_id, "optuna_study", study_name)
            opened = open_storage(storage)  # one connection pool for the agent's study and the supervisor
            agent = agent_for(storage=opened, study_name=study_name)
            agent.link_run(tracker.run_id, tracker.tracking_uri)
            shared = agent.open_study(problem, self.seed)

            def command(budget: int, seed: int) -> list[str]:
                return [sys.executable, "-m", "explorer.cli", "search",
                        *search_args(budget=budget, seed=seed, study=study_name, storage=storage,
                                     parent_run=tracker.run_id, tracking_uri=tracker.tracking_uri, workers=None)]

            def go_on(remaining: int) -> list[str]:
                left = min(workers, remaining)
                self.go_on_args = search_args(budget=remaining, study=study_name, storage=storage,
                                              workers=left if left > 1 else None)
                return self.go_on_args

            supervisor = Supervisor(problem, shared, opened, tracker, command, go_on, budget=self.budget, workers=workers,
                                    seed=self.seed, folder=runs_dir() / "workers" / tracker.run_id,
                                    env=worker_environment(workers), console=err_console, source=agent.source,
                                    shared_study=bool(study))
            with search_progress(problem, f"{self.agent_name} search, {workers} workers", self.budget) as progress:
                try:
                    supervisor.run(lambda done: progress.done(done, f"study {study_name}"))
                except SystemExit as stop:
                    if stop.code == 130:  # interrupted (the supervisor said so): what the study has, for `--json`
                        try:
                            self.result = agent.study_result(problem, shared)
                            self.result.interrupted = True
                        except Exception as error:  # the interruption stands; its report goes without the study
                            err_console.print(f"[yellow]the study could not be read after the interruption[/]: {error}")
                    raise
            result = agent.study_result(problem, shared)
            self.result = result
            tracker.log_curve(result)
            self.conclude(tracker, result)
        return result

    # ---- the end ------------------------------------------------------------------------------
    def conclude(self, tracker: SearchTracker, result: SearchResult) -> None:
        """Compare with the reference plans and the solver plan the agent started from, confirm the best plans
        by interleaved re-measurement, show the best confirmed plan and its gains, log summary and plots; keep
        what `--json` prints in `report`. A run that `ended` early says why and its parent run ends FAILED."""
        problem, baseline = self.problem, self.baseline
        ended = str(self.ended) if self.ended else None
        rows, found_gains = summary_rows(problem, result), gains(problem, result)
        print_search_figures(problem, result, rows, baseline, found_gains)
        confirmation, headline = self._confirm(result)
        confirmed = confirmation.best() if confirmation else None
        best_plan = confirmed.plan if confirmed else result.best_plan
        print_best_plan(problem, result, best_plan, baseline)
        summary = summary_markdown(problem, self.agent_name, rows, found_gains, headline, result, baseline)
        if ended:
            summary = ended_early_markdown(summary, len(result.trials), self.budget, ended)
        tracker.finish(result, best_plan.to_json() if best_plan else {}, summary,
                       plot_settings=plot_settings(problem, result), metrics=confirmed_metrics(found_gains, confirmed),
                       confirmation=confirmation.to_json() if confirmation else None,  # draws the plots in a folder it removes
                       status="FAILED" if ended else None)
        self.report = search_json(problem, self.agent_name, result, baseline, headline=headline,
                                  confirmation=confirmation, best_plan=best_plan, ended=ended)

    def _confirm(self, result: SearchResult) -> tuple[Confirmation | None, str | None]:
        """Confirm the search's best plans and print the table and the headline; (None, None) when there is
        nothing feasible to confirm or the measurer cannot measure now."""
        candidates = confirmation_candidates(self.problem, result)
        if not candidates:
            return None, None
        with err_console.status(f"confirming: {len(candidates)} plans and the baseline measured again, interleaved"):
            try:
                confirmation, names = confirm_search(self.problem, result, candidates)
            except (MeasurementFailed, ServersUnreachable) as error:
                console.print(f"[yellow]not confirmed[/]: {error}; the figures above are the search's single measurements")
                return None, None
        headline = confirmed_headline(self.problem, confirmation, names,
                                      result.best_plan.digest() if result.best_plan else None)
        print_confirmation(confirmation, names, headline)
        return confirmation, headline

    def interrupted_report(self) -> dict:
        """What `--json` prints of an interrupted run: what it found so far, `"interrupted": true`."""
        result = self.result or SearchResult(agent=self.agent_name)
        return search_json(self.problem, self.agent_name, result, self.baseline, interrupted=True)
