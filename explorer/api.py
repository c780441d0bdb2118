"""The Python API: build a Problem from names, search it (tracked in MLflow), export the best plan.

    import explorer
    problem = explorer.load_problem("vgg", "tegra-k1", latency_ms=250, max_accuracy_drop_points=1)
    result = explorer.search(problem, agent="optuna-tpe", budget=50)      # logged to MLflow like `explorer search`
    path = explorer.export_plan(problem, result, "runs/bundles/vgg-tegra-k1")
    y = explorer.Bundle.load(path).run(x)

Accuracy limits are in points (1 = one point of top-1) here as on the command line; the Problem
keeps fractions inside. `load_problem` is the one factory of a Problem from names: the CLI, the
Gymnasium environment and the benchmarks all build theirs with it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.errors import ExplorerError
from explorer.export import export_bundle
from explorer.measure import make_measurer
from explorer.plan import Plan
from explorer.problem import DEFAULT_LATENCY_MS, DEFAULT_MAX_ACCURACY_DROP, Constraints, Objective, Problem
from explorer.synthetic import check_one_source, scoring_data
from explorer.zoo import load_graph_and_data

DEFAULT_MAX_ACCURACY_DROP_POINTS = 100 * DEFAULT_MAX_ACCURACY_DROP  # DeepX: about 5 points
DEFAULT_BUDGET = 200  # measured evaluations, as `explorer search --budget`


def load_problem(model: str = "vgg", board: str = "tegra-k1", *, measure: str = "sim", data: str | Path | None = None,
                 synthetic_inputs: str | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 latency_ms: float | None = DEFAULT_LATENCY_MS,
                 max_accuracy_drop_points: float | None = DEFAULT_MAX_ACCURACY_DROP_POINTS,
                 memory_mb: float | None = None, objective: str = "energy", seed: int = 0,
                 wait_for_servers: float = 0.0, data_samples: int | None = None):
    """A Problem from names, as `explorer search` builds it from its options.

    `model`: a zoo name or an ONNX path; `board`: a board name or TOML path; `measure`: sim, host or
    remote://HOST:PORT[,...]; `data`: an .npz of validation data (default: a zoo model's shipped data;
    `data_samples` keeps the first N); `synthetic_inputs`: score on synthetic inputs instead (as
    --synthetic-inputs); `input_shapes`: sizes of symbolic inputs ({"x": (1, 3, 48, 320)}, as
    --input-shape); `max_accuracy_drop_points`: the accuracy-loss limit in points (None: no limit);
    `latency_ms`, `memory_mb`: limits (None: none); `objective`: energy, latency, memory or a weighted
    sum; `seed`: the measurer's; `wait_for_servers`: seconds to wait for a remote measurement server.
    The names are kept in `problem.settings` (under the CLI's option names), so a tracked search
    records what rebuilds the problem.
    """
    _check_limit("latency_ms", latency_ms)
    _check_limit("memory_mb", memory_mb)
    if max_accuracy_drop_points is not None and not (_is_number(max_accuracy_drop_points)
                                                     and 0 <= max_accuracy_drop_points <= 100):
        raise ExplorerError(f"max_accuracy_drop_points={max_accuracy_drop_points!r} must be between 0 and 100 points "
                            "(e.g. 1 for one point of accuracy; None for no limit)")
    check_one_source(data, synthetic_inputs)
    objective_ = Objective.parse(objective)  # a bad objective fails before the model is loaded
    graph, dataset = load_graph_and_data(model, data, input_shapes, data_samples)
    drop = None if max_accuracy_drop_points is None else max_accuracy_drop_points / 100  # fractions inside
    problem = Problem(graph, load_board(board), make_measurer(measure, seed, wait_for_servers),
                      AccuracyScorer(graph.model, scoring_data(graph, dataset, synthetic_inputs)),
                      Constraints(latency_ms=latency_ms, max_accuracy_drop=drop, memory_mb=memory_mb), objective_)
    problem.settings = {  # the CLI's option names and units (PARSER_DEFAULTS), for tracking and `explorer export --run`
        "model": model, "board": board, "measure": measure, "objective": objective, "latency_ms": latency_ms,
        "max_accuracy_drop": max_accuracy_drop_points, "memory_mb": memory_mb, "seed": seed,
        "data": str(data) if data is not None else None,
        "input_shape": [f"{name}={'x'.join(str(d) for d in dims)}" for name, dims in input_shapes.items()]
        if input_shapes else None,
        "synthetic_inputs": synthetic_inputs}
    if not problem.measurer.simulated:  # a real device: its measured kernel table, when it has one
        from explorer.kernels import device_cost_model

        problem.cost_model, problem.cost_model_note = device_cost_model(problem)
    return problem


def search(problem, agent: str = "optuna-tpe", budget: int = DEFAULT_BUDGET, seed: int = 0, track: bool = True,
           tracking_uri: str | None = None, resume: str | None = None, screen: bool = True, **agent_options):
    """Search `problem` with the agent called `agent` (ppo, optuna-tpe, optuna-nsga2, random, solver) for
    `budget` measured evaluations; returns the agents' SearchResult.

    With `track` (default) this is the search run of `explorer search` (explorer.searchrun): a parent run
    in MLflow with the settings (accuracy in points), one child run per trial, the reference plans and
    the best plans confirmed by interleaved re-measurement, the summary and the plots; its run id is
    `result.run_id` (`explorer export --run RUN_ID` reads it). Ctrl-C ends it with what it has:
    `result.interrupted`, the run KILLED, and `resume=result.run_id` continues it. The problem must come
    from `load_problem`, whose names rebuild it. `tracking_uri`: default the store under runs/ (or
    $EXPLORER_RUNS). `screen=False` measures every plan (as `--no-screen`; it sets `problem.screening`): on a real
    device with a kernel table, plans it predicts far from the best are otherwise answered with the prediction and
    not measured (explorer.screening; `result.predicted` counts them). `agent_options`: the agent's own keywords
    (e.g. storage= for Optuna).
    """
    from explorer.searching import make_agent

    if not (isinstance(budget, int) and budget >= 1):
        raise ExplorerError(f"budget={budget!r} must be a whole number of measured evaluations, at least 1")
    searcher = make_agent(agent, **agent_options)
    problem.screening = screen
    if not track:
        return searcher.search(problem, budget, seed)
    settings = getattr(problem, "settings", None)
    if settings is None:
        raise ExplorerError("track=True records the names that rebuild the problem: build it with "
                            "explorer.load_problem(...), or search with track=False")
    if settings["latency_ms"] is None or settings["max_accuracy_drop"] is None:
        raise ExplorerError("track=True logs the search as `explorer search` does, which always has a latency and an "
                            "accuracy limit: give latency_ms and max_accuracy_drop_points, or search with track=False")
    from explorer.searchrun import SearchRun  # MLflow: imported by a tracked search only

    # the seed logged is the search's (the CLI has one for both the measurer and the search)
    run = SearchRun(problem, agent, budget, seed, settings | {"seed": seed}, tracking_uri)
    result = run.run(searcher, resume_run_id=resume)
    result.run_id = run.run_id
    if run.ended:
        raise run.ended  # the measurement servers could not be reached: the summary of what was measured is logged
    return result


def export_plan(problem, found, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the bundle of `found` (a SearchResult: its best plan, or a Plan) for `problem` into `out`, as
    `explorer export` does; returns the bundle's path. Run it with `explorer.Bundle.load(path).run(x)`."""
    from explorer.searching import SearchResult

    if isinstance(found, SearchResult):
        plan, run_id = found.best_plan, found.run_id
        if plan is None:
            raise ExplorerError("the search found no feasible plan to export: loosen latency_ms, "
                                "max_accuracy_drop_points or memory_mb, or raise the budget")
    elif isinstance(found, Plan):
        plan, run_id = found, None
    else:
        raise ExplorerError(f"export_plan exports a SearchResult or a Plan, not {type(found).__name__}")
    return export_bundle(problem, plan, Path(out), evaluation=problem.evaluate(plan), run_id=run_id, overwrite=overwrite)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_limit(name: str, value) -> None:
    if value is not None and not (_is_number(value) and value > 0):
        raise ExplorerError(f"{name}={value!r} must be a number above 0 (None for no limit)")
