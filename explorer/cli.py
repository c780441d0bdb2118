"""The `explorer` command line."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from explorer import __version__
from explorer.api import DEFAULT_BUDGET
from explorer.errors import ExplorerError, termination_as_interrupt

#: Defaults of the options that define a Problem (DeepX: 5 s per inference, about 5 points of accuracy).
PARSER_DEFAULTS = {"model": "vgg", "board": "tegra-k1", "measure": "sim", "objective": "energy", "latency_ms": 5000.0,
                   "max_accuracy_drop": 5.0, "memory_mb": None, "seed": 0, "data": None, "input_shape": None,
                   "synthetic_inputs": None}
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)


# ---- shared helpers -------------------------------------------------------------------------------
def _fmt_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _emit_json(data: dict) -> None:
    """`--json`: the command's one JSON object on stdout (the human text went to stderr)."""
    import json

    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def _load(args: argparse.Namespace):
    """LayerGraph and dataset (or None) for --model/--data/--input-shape."""
    from explorer.graph import parse_input_shapes
    from explorer.zoo import load_graph_and_data

    return load_graph_and_data(args.model, getattr(args, "data", None),
                               parse_input_shapes(getattr(args, "input_shape", None)))


def _scorer(args: argparse.Namespace, graph, dataset):
    """The AccuracyScorer of a command: on the data, else (or with --synthetic-inputs) on synthetic inputs."""
    from explorer.accuracy import AccuracyScorer
    from explorer.synthetic import check_one_source, scoring_data

    synthetic = getattr(args, "synthetic_inputs", None)
    check_one_source(getattr(args, "data", None), synthetic)
    return AccuracyScorer(graph.model, scoring_data(graph, dataset, synthetic))


def _zoo_note(model_name: str) -> None:
    from explorer.zoo import ZOO

    entry = ZOO.get(model_name)
    if entry is not None and not entry.trained:
        console.print(f"[yellow]note:[/] {entry.name}: {entry.note}")


# ---- commands -------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> None:
    from explorer.zoo import ZOO, cached_metrics

    table = Table(title="Built-in model zoo (figures of the reference build: fp32, ONNX Runtime)")
    for column in ("name", "input", "trained", "params", "MB", "MFLOPs", "top-1 % (10k test / 2k val)", "description",
                   "note"):
        table.add_column(column, overflow="fold")
    for entry in ZOO.values():
        top1 = f"{entry.top1_test:.2f} / {entry.top1_subset:.2f}" if entry.top1_test is not None else "-"
        note = entry.note
        if entry.recipe is not None and entry.shipped_file is None:
            built = cached_metrics(entry.recipe)
            note += (f"; built here: {built['test_top1_points']:.2f} / {built['subset_top1_points']:.2f} %" if built
                     else "; not built here yet")
        table.add_row(entry.name, "x".join(map(str, entry.input_shape)), "yes" if entry.trained else "no",
                      _fmt_count(entry.params) if entry.params else "-",
                      f"{entry.size_mb:.1f}" if entry.size_mb is not None else "-",
                      f"{entry.mflops:.1f}" if entry.mflops is not None else "-", top1, entry.description, note)
    console.print(table)
    console.print("Your own model: --model path/to/model.onnx --data val.npz (arrays x and optional integer labels y)")


def cmd_inspect(args: argparse.Namespace) -> None:
    from explorer.compress import Compressor

    started = time.perf_counter()
    graph, _ = _load(args)
    compressor = Compressor(graph)
    table = Table(title=f"{graph.source}: {len(graph.layers)} decision layers, "
                        f"{_fmt_count(graph.total_flops)}FLOPs, {_fmt_count(graph.total_params)} params (batch {graph.feed_shape()[0]})")
    for column in ("#", "layer", "op", "input", "output", "weight", "FLOPs", "params", "travels with", "offered rungs"):
        table.add_column(column, overflow="fold")
    for layer in graph.layers:
        rungs = compressor.ladder_with_errors(layer.name) if args.errors else compressor.ladder(layer.name)
        offered = ", ".join(r.label() + (f" ({r.rel_error:.2f})" if args.errors and r.method != "full" else "")
                            for r in rungs[1:]) or ("kept (grouped)" if not layer.factorisable else "none saves")
        attached = [graph.node_by_name[n].op_type for n in layer.node_names if n != layer.name]
        table.add_row(str(layer.index), layer.name, layer.op_type, "x".join(map(str, layer.input_shape)),
                      "x".join(map(str, layer.output_shape)), "x".join(map(str, layer.weight_shape)),
                      _fmt_count(layer.all_flops), _fmt_count(layer.params), " ".join(attached), offered)
    console.print(table)
    if args.errors:
        console.print("rung (x.xx) = relative Frobenius reconstruction error of the layer's weights")
    _zoo_note(args.model)
    console.print(f"inspected in {time.perf_counter() - started:.1f} s")


def cmd_rewrite(args: argparse.Namespace) -> None:
    import onnx

    from explorer.accuracy import calibration_inputs, drop_text
    from explorer.compress import Compressor
    from explorer.plan import Plan

    graph, dataset = _load(args)
    plan = Plan.load(args.plan)
    scorer = _scorer(args, graph, dataset)
    x_calibration, calibration_source = calibration_inputs(graph, scorer.dataset)
    model = Compressor(graph).rewrite(plan, x_calibration)
    onnx.save(model, args.out)
    console.print(f"wrote {args.out}")
    if any(d.precision == "int8" for _, d in plan.decisions):
        console.print(f"int8 calibrated on {calibration_source}")
    result = scorer.score(model)
    if result.measured:
        console.print(f"accuracy: {result.describe()} (uncompressed: {100 * scorer.baseline.value:.2f}%, "
                      f"{drop_text(scorer.drop(result), result.basis, result.samples)})")
    else:
        console.print(f"[yellow]{result.describe()}[/]")
    _zoo_note(args.model)


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from explorer.accuracy import rungs_within_bound
    from explorer.compress import Compressor

    graph, dataset = _load(args)
    started = time.perf_counter()
    compressor = Compressor(graph)
    scorer = _scorer(args, graph, dataset)
    table = _sensitivity(graph, compressor, scorer)
    view = Table(title=f"Accuracy drop (points of {table.metric}) when one layer alone is compressed; "
                       f"uncompressed {100 * table.baseline:.2f}% on {scorer.dataset.source}"
                       + (" (estimates, not measured)" if scorer.synthetic else ""))
    view.add_column("layer")
    view.add_column("rung")
    for precision in ("fp32", "fp16", "int8"):
        view.add_column(precision, justify="right")
    for layer in graph.layers:  # on synthetic inputs the table holds the rungs within the reconstruction-error bound
        for rung in rungs_within_bound(compressor, layer.name) if scorer.synthetic else compressor.ladder(layer.name):
            cells = [_sensitivity_cell(table.drop(layer.name, rung.method, rung.rank, p), rung.method == "full" and p == "fp32",
                                       scorer.synthetic) for p in ("fp32", "fp16", "int8")]
            view.add_row(layer.name, rung.label(), *cells)
    console.print(view)
    source = "cache" if table.from_cache else "measured now"
    console.print(f"{len(table.drops)} entries ({source}) in {time.perf_counter() - started:.1f} s")
    if scorer.synthetic:
        console.print(f"[yellow]{scorer.label}[/]; rungs within the reconstruction-error bound only")


def _sensitivity_cell(drop: float, reference: bool, synthetic: bool) -> str:
    """A sensitivity-table cell in points; an estimate on synthetic inputs never reads 0.00."""
    if reference:
        return "reference"
    if synthetic and abs(drop) < 5e-5:
        return "none seen"
    return f"{100 * drop:+.2f}"


def cmd_zoo_train(args: argparse.Namespace) -> None:
    from explorer.zoo import train

    path, metrics = train(args.name, out_dir=Path(args.out) if args.out else None, epochs=args.epochs, seed=args.seed,
                          data_dir=args.data_dir)
    console.print(f"wrote {path} ({metrics['onnx_bytes'] / 1e6:.2f} MB, sha256 {metrics['sha256'][:16]})")
    console.print(f"top-1: {metrics['test_top1_points']:.2f} % on the 10,000 Fashion-MNIST test images, "
                  f"{metrics['subset_top1_points']:.2f} % on the shipped 2,000-image subset (fp32, ONNX Runtime)")
    console.print(f"{metrics['parameters']:,} parameters, {metrics['decision_layers']} decision layers, "
                  f"{metrics['mflops']:.2f} MFLOPs per image; {metrics['epochs']} epochs, seed {metrics['seed']}, "
                  f"trained in {metrics['train_seconds']:.0f} s (torch {metrics['torch']})")
    if metrics["same_as_before"] is not None:
        console.print("same bytes as the file it replaced" if metrics["same_as_before"]
                      else "the bytes differ from the file it replaced")


def cmd_boards(args: argparse.Namespace) -> None:
    from explorer.boards import board_names, load_board

    if not args.name:
        table = Table(title="Board profiles (targets/*.toml)")
        for column in ("name", "processors", "memory", "description"):
            table.add_column(column, overflow="fold")
        for name in board_names():
            board = load_board(name)
            table.add_row(name, ", ".join(f"{p.id} ({p.kind})" for p in board.processors.values()),
                          f"{board.memory.size_mb:g} MB, {board.memory.bandwidth_gbps:g} GB/s", board.description)
        console.print(table)
        console.print("`explorer boards NAME` shows one; `explorer calibrate` measures this machine as board `host`")
        return
    board = load_board(args.name)
    console.print(f"[bold]{board.name}[/]: {board.description}\n{board.path}")
    table = Table(title="processors")
    for column in ("id", "kind", "cores x GHz", "peak GFLOP/s", "efficiency", "memory", "power active/idle",
                   "launch", "ONNX Runtime provider", "threads"):
        table.add_column(column, overflow="fold")
    for p in board.processors.values():
        table.add_row(p.id, p.kind, f"{p.cores} x {p.clock_ghz:g}",
                      " ".join(f"{k}={v:g}" for k, v in p.peak_gflops.items()),
                      " ".join(f"{k}={v:g}" for k, v in p.efficiency.items()),
                      f"{p.memory_mb:g} MB, {p.bandwidth_gbps:g} GB/s", f"{p.active_power_w:g} / {p.idle_power_w:g} W",
                      f"{p.launch_overhead_us:g} us", p.provider, str(p.threads))
    console.print(table)
    links = Table(title="transfer paths")
    for column in ("between", "via", "bandwidth", "latency", "energy"):
        links.add_column(column)
    for link in board.links:
        links.add_row(" - ".join(link.between), link.via, f"{link.bandwidth_gbps:g} GB/s", f"{link.latency_us:g} us",
                      f"{link.energy_nj_per_byte:g} nJ/B + {link.energy_uj_per_transfer:g} uJ")
    console.print(links)


def _problem(args: argparse.Namespace):
    """Problem for the --model/--data/--board/--measure/constraint options (explorer.api.load_problem)."""
    from explorer.api import load_problem
    from explorer.graph import parse_input_shapes

    return load_problem(args.model, args.board, measure=args.measure, data=getattr(args, "data", None),
                        synthetic_inputs=getattr(args, "synthetic_inputs", None),
                        input_shapes=parse_input_shapes(getattr(args, "input_shape", None)), latency_ms=args.latency_ms,
                        max_accuracy_drop_points=args.max_accuracy_drop, memory_mb=args.memory_mb,
                        objective=args.objective, seed=args.seed, wait_for_servers=getattr(args, "wait_for_servers", 0.0))


def print_evaluation(evaluation, title: str) -> None:
    """Per-block table and totals of one evaluation."""
    table = Table(title=title)
    for column in ("block", "processor", "layers", "latency ms", "spread ms", "transfer in ms", "energy mJ", "weights MB"):
        table.add_column(column, overflow="fold")
    for b in evaluation.blocks:
        layers = b.layers[0] if len(b.layers) == 1 else f"{b.layers[0]} .. {b.layers[-1]} ({len(b.layers)})"
        table.add_row(str(b.index), b.processor, layers, f"{b.latency_ms:.3f}", f"{b.spread_ms:.3f}",
                      f"{b.transfer_ms:.3f}", f"{b.energy_mj:.3f}", f"{b.weight_mb:.3f}")
    console.print(table)
    console.print(f"latency {evaluation.latency_ms:.3f} ms (spread {evaluation.latency_spread_ms:.3f}), "
                  f"energy {evaluation.energy_mj:.3f} mJ ({evaluation.energy_source}), weights {evaluation.memory_mb:.2f} MB"
                  + (f", peak resident memory {evaluation.peak_memory_mb:.0f} MB" if evaluation.peak_memory_mb else ""))
    console.print(f"accuracy: {evaluation.accuracy_text()}")
    if evaluation.accuracy_basis:
        console.print(f"[yellow]accuracy basis:[/] {evaluation.accuracy_basis}")
    status = "[green]feasible[/]" if evaluation.feasible else "[red]infeasible:[/] " + "; ".join(evaluation.violations)
    console.print(f"{status}\nmeasured by: {evaluation.measured_by}")


def cmd_measure(args: argparse.Namespace) -> None:
    from explorer.plan import Plan

    problem = _problem(args)
    plan = Plan.load(args.plan) if args.plan else problem.baseline_plan()
    what = f"plan {args.plan}" if args.plan else "baseline: uncompressed fp32 on the best single processor"
    evaluation = problem.evaluate(plan)
    print_evaluation(evaluation, f"{problem.graph.source} on {problem.board.name} ({what})")
    _zoo_note(args.model)
    if args.json:
        from explorer.report import constraints_json, evaluation_json

        _emit_json({"command": "measure", "model": problem.graph.source, "board": problem.board.name,
                    "constraints": constraints_json(problem), "plan": plan.to_json(),
                    "evaluation": evaluation_json(evaluation), "blocks": evaluation.to_json()["blocks"]})
    if not evaluation.feasible:  # scripts read the status; a person reads the last line
        console.print(f"[red]infeasible[/]: {'; '.join(evaluation.violations)}", highlight=False, soft_wrap=True)
        raise SystemExit(1)


def print_plan(problem, plan, title: str) -> None:
    """Per-layer table of a plan: rung, precision, processor, params and reconstruction error."""
    table = Table(title=title)
    for column in ("#", "layer", "op", "rung", "precision", "processor", "params", "FLOPs"):
        table.add_column(column)
    for (name, decision), layer in zip(plan.decisions, problem.graph.layers):
        rung = problem.compressor.rung(name, decision.method, decision.rank)
        table.add_row(str(layer.index), name, layer.op_type, rung.label(), decision.precision, decision.processor,
                      _fmt_count(rung.params), _fmt_count(rung.flops))
    console.print(table)


def print_comparison(rows: list[tuple[str, object]], baseline=None, objective_column: bool = True) -> None:
    """Side-by-side metrics of several evaluations: (name, Evaluation); with `baseline`, each figure's change
    against it in percent; `objective_column=False` where the objective is one of the figures shown."""
    from explorer.report import drop_cell, with_change

    bases = sorted({e.accuracy_basis for _, e in rows if e.accuracy_basis})
    table = Table(title="evaluated through Problem.evaluate" + (f"; accuracy: {', '.join(bases)}" if bases else "")
                        + ("; (+N%): change against the fp32 baseline" if baseline is not None else ""))
    for column in ("plan", "latency ms", "energy mJ", "weights MB", "accuracy", "feasible") + ("objective",) * objective_column:
        table.add_column(column, no_wrap=column == "plan")  # the figures may wrap, a plan's name reads whole
    for name, e in rows:
        accuracy = ("not measured" if e.accuracy is None else f"{100 * e.accuracy:.2f} %"
                    + (f" {e.accuracy_metric}" if e.accuracy_basis else "") + f" ({drop_cell(e)})")
        figures = [with_change(getattr(e, key), getattr(baseline, key) if baseline is not None else None)
                   for key in ("latency_ms", "energy_mj", "memory_mb")]
        table.add_row(name, *figures, accuracy, "yes" if e.feasible else "no: " + "; ".join(e.violations),
                      *([f"{e.objective:.4g}"] if objective_column else []))
    console.print(table)


def print_limits(problem, best) -> None:
    """The constraints and how close the best plan (an Evaluation, or None) comes to each; what each
    processor id is."""
    from explorer.report import constraint_lines, processor_legend

    lines = constraint_lines(problem, best)
    if lines:
        console.print(("constraints (the best plan):\n  " if best is not None else "constraints:\n  ") + "\n  ".join(lines),
                      highlight=False)
    console.print("processors:\n  " + "\n  ".join(processor_legend(problem.board)), highlight=False)


def cmd_solve(args: argparse.Namespace) -> None:
    from explorer.measured_solver import solve_measured

    problem = _problem(args)
    if problem.scorer.measured:
        _sensitivity(problem.graph, problem.compressor, problem.scorer, _sensitivity_status(problem))
    with err_console.status("solving the integer program (HiGHS), evaluating, re-solving"):
        result = solve_measured(problem)
    solution = next(s for s, e in result.rounds if s.plan == result.plan)
    print_plan(problem, result.plan, f"solver plan for {problem.graph.source} on {problem.board.name} "
                                     f"(objective: {problem.objective.describe()})")
    console.print(f"predicted by the cost model: latency {solution.latency_s * 1e3:.3f} ms, energy {solution.energy_j * 1e3:.3f} mJ, "
                  f"weights {solution.weight_bytes / 2**20:.3f} MB, {_solver_accuracy_text(problem, solution)}; "
                  f"{solution.status} in {solution.seconds:.2f} s")
    rows = [(name, problem.evaluate(plan)) for name, plan in problem.reference_plans()]  # the rounds had to beat them
    rows += [(f"solver round {i + 1}" + (" (chosen)" if s.plan == result.plan else ""), e) for i, (s, e) in enumerate(result.rounds)]
    print_comparison(rows, problem.baseline(), objective_column=problem.objective.single is None)
    evaluation = result.evaluation
    print_limits(problem, evaluation if result.feasible else None)
    if not result.feasible:
        console.print("[red]no solver round was feasible when evaluated[/]: the additive model is too optimistic here; "
                      "loosen the constraints or let a search agent take over")
    console.print(f"measured by: {evaluation.measured_by}")
    if not problem.scorer.measured or problem.scorer.synthetic:
        console.print(f"[yellow]{problem.scorer.label}[/]")
    if args.out:
        result.plan.save(Path(args.out))
        console.print(f"wrote {args.out}")
    _zoo_note(args.model)
    if args.json:
        from explorer.report import constraints_json, evaluation_json

        baseline = problem.baseline()
        _emit_json({"command": "solve", "model": problem.graph.source, "board": problem.board.name,
                    "objective": problem.objective.describe(), "constraints": constraints_json(problem),
                    "feasible": result.feasible, "plan": result.plan.to_json(),
                    "predicted": {"latency_ms": solution.latency_s * 1e3, "energy_mj": solution.energy_j * 1e3,
                                  "memory_mb": solution.weight_bytes / 2**20, "status": solution.status,
                                  "solve_seconds": solution.seconds,
                                  "accuracy_drop_points": 100 * solution.accuracy_drop if problem.scorer.measured else None},
                    "evaluation": evaluation_json(evaluation, baseline),
                    "rows": [{"name": name} | evaluation_json(e, baseline) for name, e in rows], "out": args.out})


def _sensitivity_status(problem) -> str:
    if problem.scorer.synthetic:
        return "sensitivity table (estimated on synthetic inputs once per model, then cached)"
    return "sensitivity table (measured once per model and data, then cached)"


def _solver_accuracy_text(problem, solution) -> str:
    """The solver's additive accuracy-drop estimate, said for what it is."""
    from explorer.accuracy import drop_text

    if not problem.scorer.measured:
        return "accuracy drop not estimated (no data)"
    drop = drop_text(solution.accuracy_drop, problem.scorer.basis, len(problem.scorer.dataset.x))
    return f"additive accuracy estimate: {drop}"


def cmd_search(args: argparse.Namespace) -> None:
    """The main job: search, track every trial in MLflow, summarise, say how to export."""
    if args.workers < 1:
        raise ExplorerError(f"--workers must be at least 1 (got {args.workers})")
    if args.workers > 1:
        return _search_distributed(args)
    if args.parent_run:
        return _search_worker(args)
    from explorer.measure import AgentsUnreachable
    from explorer.tracking import SearchTracker

    problem = _problem(args)
    agent = _search_agent(args, shared=bool(args.study))
    tracking_uri, experiment, params = _search_settings(problem, args)
    baseline = _prepare(problem)
    state = {"result": None}
    ended: AgentsUnreachable | None = None  # the measurement agents are gone: the search ends with what it has
    with SearchTracker(tracking_uri, experiment, f"{args.agent} seed {args.seed}", params, resume_run_id=args.resume,
                       tags=_search_tags(problem, args)) as tracker, \
            _progress() as progress:
        task = progress.add_task(f"{args.agent} search", total=args.budget, status="")
        if args.agent.startswith("optuna"):
            agent.link_run(tracker.run_id, tracker.tracking_uri)  # the study's user attributes name the run
        already_logged = tracker.logged_digests  # resuming: the agent replays these from the caches

        def on_trial(trial, result) -> None:
            state["result"] = result
            if trial.plan.digest() not in already_logged:
                tracker.log_trial(trial, result)
            progress.update(task, completed=len(result.trials), status=_progress_status(problem, result))

        try:
            result = agent.search(problem, args.budget, args.seed, on_trial)
        except KeyboardInterrupt:  # before the agent's own handler is in place (agents return what they have)
            result = state["result"]
            if result is not None:
                result.interrupted = True
        except AgentsUnreachable as error:
            ended, result = error, state["result"]
            if result is None:  # nothing measured: nothing to summarise (the parent run ends FAILED)
                raise
        if result is None or result.interrupted:  # Ctrl-C
            tracker.mark_killed()
            progress.stop()
            best = result.best if result else None
            err_console.print(f"[yellow]interrupted[/] after {len(result.trials) if result else 0} evaluations; "
                              f"the MLflow run {tracker.run_id} is marked KILLED and keeps every logged trial")
            if best:
                err_console.print(f"best so far: {problem.objective.describe()} {best.objective:.4g} "
                                  f"(latency {best.latency_ms:.3f} ms, energy {best.energy_mj:.3f} mJ)")
            err_console.print(f"resume with: explorer search {' '.join(_search_args(args, resume=tracker.run_id))}")
            raise SystemExit(130)
        progress.stop()
        if ended:
            err_console.print(f"[red]the search ended early[/] after {len(result.trials)} of {args.budget} evaluations: {ended}")
        report = _conclude_search(problem, tracker, result, baseline, args, ended=str(ended) if ended else None)
    _say_next(problem, tracking_uri, tracker.run_id, experiment, result, args, report)
    if ended:
        raise ended  # one line, exit code 2; the summary is written and the parent run marked FAILED


def _search_agent(args: argparse.Namespace, shared: bool = False, **options):
    """The --agent, with the Optuna options (--storage, --study) where it is an Optuna agent."""
    from explorer.searching import make_agent

    if args.agent.startswith("optuna"):
        options = {"storage": args.storage, "study_name": args.study, "shared": shared} | options
    elif args.storage or args.study or args.workers > 1:
        raise ExplorerError(f"--storage, --study and --workers share an Optuna study; {args.agent} does not use one: "
                            "use --agent optuna-tpe or optuna-nsga2")
    return make_agent(args.agent, **options)


def _search_settings(problem, args: argparse.Namespace) -> tuple[str, str, dict]:
    """Tracking URI, experiment name and the parent run's params of a search."""
    from explorer.tracking import resolve_tracking_uri

    experiment = f"{Path(problem.graph.source).stem} @ {problem.board.name}"
    # the settings under their option names (so `explorer export --run` can rebuild the problem), and what they mean
    params = {key: getattr(args, key) for key in PARSER_DEFAULTS}
    params.update({"agent": args.agent, "budget": args.budget, "objective_meaning": problem.objective.describe(),
                   "measured_by": problem.measurer.label(problem.board),
                   "data_source": problem.scorer.dataset.source if problem.scorer.dataset else "none (accuracy not measured)",
                   "accuracy_basis": problem.scorer.label})
    return resolve_tracking_uri(args.tracking_uri), experiment, params


def _search_tags(problem, args: argparse.Namespace) -> dict[str, str]:
    """The parent run's tags (model, board, agent, objective, measured_by) and its description until the
    summary replaces it."""
    from explorer.report import constraint_lines
    from explorer.tracking import NOTE_TAG

    limits = "; ".join(constraint_lines(problem, None))
    return {"model": Path(problem.graph.source).stem, "board": problem.board.name, "agent": args.agent,
            "objective": problem.objective.describe(), "measured_by": problem.measurer.label(problem.board),
            NOTE_TAG: f"{args.agent} search of {problem.graph.source} on {problem.board.name}, budget {args.budget}: "
                      f"minimise {problem.objective.describe()}" + (f" ({limits})" if limits else "")
                      + ". The summary replaces this when the search ends."}


def _prepare(problem):
    """Measure (or recall) the sensitivity table and the baseline before a search; the baseline's Evaluation."""
    if problem.scorer.measured:
        _sensitivity(problem.graph, problem.compressor, problem.scorer, _sensitivity_status(problem))
    with err_console.status("baseline: uncompressed fp32 on each processor"):
        return problem.baseline()


def _sensitivity(graph, compressor, scorer, description: str = "sensitivity table"):
    """The sensitivity table with a progress bar (count, rate, ETA); on Ctrl-C it says what was kept."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from explorer.accuracy import sensitivity_table

    state = {"done": 0, "total": 0}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            if not state["total"]:  # the first call: entries resumed from an interrupted run, not a rate
                progress.reset(task, total=total, completed=done, rate="")
            else:
                speed = progress.tasks[0].speed
                progress.update(task, completed=done, rate=f"{speed:.2f} entries/s" if speed else "")
            state.update(done=done, total=total)

        try:
            return sensitivity_table(graph, compressor, scorer, progress=update)
        except KeyboardInterrupt:
            if state["total"]:
                err_console.print(f"sensitivity table: {state['done']} of {state['total']} entries are kept; "
                                  "run the same command again to measure only the rest")
            raise


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), console=err_console)


def _progress_status(problem, result) -> str:
    best = f"best {problem.objective.describe()} {result.best.objective:.4g}" if result.best else "no feasible plan yet"
    failed = sum(t.failed for t in result.trials)
    return f"{best} | feasible {result.feasible_count}" + (f" | failed {failed}" if failed else "")


def _conclude_search(problem, tracker, result, baseline, args: argparse.Namespace, ended: str | None = None) -> dict:
    """Compare with the reference plans and the solver plan the agent started from, confirm the best plans
    by interleaved re-measurement, show the best confirmed plan and its gains, log summary and plots. `ended`:
    why the search stopped before its budget (the summary says so and the parent run ends FAILED). Returns
    what `--json` prints of it."""
    from explorer.report import gains, plot_settings, summary_rows

    rows = summary_rows(problem, result)
    print_comparison(rows, baseline, objective_column=problem.objective.single is None)
    print_limits(problem, result.best)
    found_gains = gains(problem, result)
    if found_gains:
        console.print("in the search: " + "; ".join(gain.text(problem) for gain in found_gains))
    failed = sum(t.failed for t in result.trials)
    if failed:
        console.print(f"[yellow]{failed} trial(s) failed[/]: no agent could measure them (see the FAILED child runs in MLflow)")
    confirmation, headline = _confirm(problem, result)
    confirmed = confirmation.best() if confirmation else None
    best_plan = confirmed.plan if confirmed else result.best_plan
    if best_plan is None:
        console.print("[red]no feasible plan found[/]: loosen --latency-ms, --max-accuracy-drop or --memory-mb, or raise --budget")
    else:
        print_plan(problem, best_plan, f"best plan ({len(result.trials)} evaluations, {result.feasible_count} feasible)")
    console.print(f"measured by: {(result.best or baseline).measured_by}")
    if problem.scorer.synthetic:
        console.print(f"[yellow]accuracy: {problem.scorer.label}[/]")
    summary = _summary_markdown(problem, rows, found_gains, headline, result, args, baseline)
    if ended:
        summary = summary.replace("\n\n", f"\n\n**Ended early** after {len(result.trials)} of {args.budget} evaluations: "
                                          f"{ended}\n\n", 1)
    metrics = {f"gain_over_{'best_reference' if i == 0 else 'baseline'}": gain.ratio for i, gain in enumerate(found_gains)}
    if confirmed:
        metrics |= {"confirmed_ratio_to_baseline": confirmed.ratio, "confirmed_latency_ms": confirmed.latency_ms,
                    "confirmed_energy_mj": confirmed.energy_mj,
                    "confirmed_accuracy_percent": 100 * confirmed.evaluation.accuracy
                    if confirmed.evaluation.accuracy is not None else None,
                    "confirmed_accuracy_drop_points": 100 * confirmed.evaluation.accuracy_drop
                    if confirmed.evaluation.accuracy_drop is not None else None}
        if confirmed.ratio_ci:
            metrics |= {"confirmed_ratio_low": confirmed.ratio_ci[0], "confirmed_ratio_high": confirmed.ratio_ci[1]}
    tracker.finish(result, best_plan.to_json() if best_plan else {}, summary,
                   plot_settings=plot_settings(problem, result), metrics=metrics,
                   confirmation=confirmation.to_json() if confirmation else None,  # draws the plots in a folder it removes
                   status="FAILED" if ended else None)
    from explorer.report import constraints_json, evaluation_json

    return {"command": "search", "model": problem.graph.source, "board": problem.board.name, "agent": args.agent,
            "objective": problem.objective.describe(), "constraints": constraints_json(problem),
            "evaluations": len(result.trials), "feasible_evaluations": result.feasible_count, "failed_evaluations": failed,
            "ended_early": ended, "headline": headline,
            "gains": [{"over": gain.reference, "ratio": gain.ratio} for gain in found_gains],
            "confirmed": None if not confirmed else {
                "plan_digest": confirmed.plan.digest(), "ratio_to_baseline": confirmed.ratio,
                "ratio_to_baseline_95": list(confirmed.ratio_ci) if confirmed.ratio_ci else None,
                "latency_ms": confirmed.latency_ms, "energy_mj": confirmed.energy_mj,
                "accuracy_drop_points": metrics.get("confirmed_accuracy_drop_points"),
                "simulated": confirmation.simulated},
            "best_plan": best_plan.to_json() if best_plan else None,
            "best": evaluation_json(result.best, baseline) if result.best else None,
            "rows": [{"name": name} | evaluation_json(e, baseline) for name, e in rows]}


def _confirm(problem, result):
    """Re-measure the search's best plans, the best reference and the baseline interleaved; print the table and
    the headline. (None, None) when there is nothing feasible to confirm or the measurer cannot measure now."""
    from explorer.confirm import confirm
    from explorer.measure import AgentsUnreachable, MeasurementFailed
    from explorer.report import CONFIRMATION_COLUMNS, confirmation_candidates, confirmation_rows, confirmed_headline

    candidates = confirmation_candidates(problem, result)
    if not candidates:
        return None, None
    names = {plan.digest(): name for name, plan in candidates}
    with err_console.status(f"confirming: {len(candidates)} plans and the baseline measured again, interleaved"):
        try:
            confirmation = confirm(problem, [plan for _, plan in candidates])
        except (MeasurementFailed, AgentsUnreachable) as error:
            console.print(f"[yellow]not confirmed[/]: {error}; the figures above are the search's single measurements")
            return None, None
    table = Table(title=f"confirmed: measured again interleaved with the baseline ({confirmation.baseline.rounds} rounds, "
                        f"{confirmation.seconds:.1f} s{', machine busy' if confirmation.busy else ''})")
    for column in CONFIRMATION_COLUMNS:
        table.add_column(column)
    for row in confirmation_rows(confirmation, names):
        table.add_row(*row)
    console.print(table)
    headline = confirmed_headline(problem, confirmation, names, result.best_plan.digest() if result.best_plan else None)
    console.print(headline)
    return confirmation, headline


def _say_next(problem, tracking_uri: str, run_id: str, experiment: str, result, args: argparse.Namespace,
              report: dict | None = None) -> None:
    """Where the search is in MLflow and how to export its best plan; with --json, `report` and these on stdout."""
    from explorer.tracking import ui_command

    console.print(f"MLflow run: {run_id} (experiment {experiment!r})")
    console.print(f"open the MLflow UI: {ui_command(tracking_uri)}")
    dashboard = None
    if args.agent.startswith("optuna"):
        from explorer.studies import dashboard_command

        if dashboard := dashboard_command(args.storage):
            console.print(f"open the Optuna dashboard: {dashboard}", soft_wrap=True)
    export = None
    if result.best_plan is not None:
        from explorer.paths import runs_dir

        bundle = runs_dir() / "bundles" / f"{Path(problem.graph.source).stem}-{problem.board.name}"
        export = f"explorer export --run {run_id} --out {bundle}" + (f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else "")
        console.print(f"export the best plan: {export}", soft_wrap=True)
    if args.json:
        _emit_json((report or {}) | {"run_id": run_id, "experiment": experiment, "tracking_uri": tracking_uri,
                                     "ui_command": ui_command(tracking_uri), "dashboard_command": dashboard,
                                     "export_command": export})


def _search_worker(args: argparse.Namespace) -> None:
    """One worker of a distributed search: its share of the budget on the shared study, trials logged
    as child runs of the search's parent run."""
    from explorer.tracking import SearchTracker

    if not args.study or not args.agent.startswith("optuna"):
        raise ExplorerError("--parent-run makes this process a worker of a distributed search: give the Optuna --agent, "
                            "--study and --storage of that search too")
    problem = _problem(args)
    agent = _search_agent(args, shared=True)
    tracking_uri, experiment, params = _search_settings(problem, args)
    with SearchTracker(tracking_uri, experiment, "", params, attach_run_id=args.parent_run) as tracker:
        agent.link_run(tracker.run_id, tracker.tracking_uri)
        result = agent.search(problem, args.budget, args.seed, tracker.log_trial)
    failed = sum(t.failed for t in result.trials)
    print(f"worker seed {args.seed}: {len(result.trials)} trials ({result.feasible_count} feasible, {failed} failed) "
          f"in study {args.study}" + (", interrupted" if result.interrupted else ""), flush=True)
    if result.interrupted:
        raise SystemExit(130)


def _search_distributed(args: argparse.Namespace) -> None:
    """`--workers N`: N local worker processes share one Optuna study and one MLflow parent run
    (explorer/workers.py starts and watches them, and replaces one that dies)."""
    from explorer.paths import runs_dir
    from explorer.sessions import worker_environment
    from explorer.studies import default_storage_url, default_study_name, open_storage
    from explorer.tracking import SearchTracker
    from explorer.workers import Supervisor

    if not args.agent.startswith("optuna"):
        raise ExplorerError(f"--workers {args.workers} starts Optuna workers on one shared study, and {args.agent} is not "
                            "an Optuna agent: use --agent optuna-tpe or optuna-nsga2 (or leave --workers out)")
    if args.parent_run or args.resume:
        raise ExplorerError("--workers starts a new distributed search: leave out --parent-run and --resume "
                            "(to add trials to its study, start `explorer search --study NAME --storage URL`)")
    if args.workers > args.budget:
        raise ExplorerError(f"--workers {args.workers} is more than --budget {args.budget}: every worker needs at least one trial")
    problem = _problem(args)
    tracking_uri, experiment, params = _search_settings(problem, args)
    params["workers"] = args.workers
    baseline = _prepare(problem)
    storage = args.storage or default_storage_url()
    with SearchTracker(tracking_uri, experiment, f"{args.agent} x{args.workers} workers seed {args.seed}", params,
                       tags=_search_tags(problem, args)) as tracker:
        study_name = args.study or f"{default_study_name(problem, args.agent, args.seed)}-{tracker.run_id[:8]}"
        tracker.client.set_tag(tracker.run_id, "optuna_study", study_name)
        opened = open_storage(storage)  # one connection pool for the agent's study and the supervisor
        agent = _search_agent(args, shared=True, storage=opened, study_name=study_name)
        agent.link_run(tracker.run_id, tracker.tracking_uri)
        study = agent.open_study(problem, args.seed)

        def command(budget: int, seed: int) -> list[str]:
            return [sys.executable, "-m", "explorer.cli", "search",
                    *_search_args(args, budget=budget, seed=seed, study=study_name, storage=storage,
                                  parent_run=tracker.run_id, tracking_uri=tracker.tracking_uri, workers=None)]

        def go_on(remaining: int) -> list[str]:
            workers = min(args.workers, remaining)
            return _search_args(args, budget=remaining, study=study_name, storage=storage, workers=workers if workers > 1 else None)

        supervisor = Supervisor(problem, study, opened, tracker, command, go_on, budget=args.budget, workers=args.workers,
                                seed=args.seed, folder=runs_dir() / "workers" / tracker.run_id,
                                env=worker_environment(args.workers), console=err_console, source=agent.source,
                                shared_study=bool(args.study))
        with _progress() as progress:
            task = progress.add_task(f"{args.agent} search, {args.workers} workers", total=args.budget, status="")
            supervisor.run(lambda done: progress.update(task, completed=done, status=f"study {study_name}"))
        result = agent.study_result(problem, study)
        tracker.log_curve(result)
        report = _conclude_search(problem, tracker, result, baseline, args)
    _say_next(problem, tracking_uri, tracker.run_id, experiment, result, args, report)


def _search_args(args: argparse.Namespace, **overrides) -> list[str]:
    """The command-line arguments of this search (with some replaced): to resume it or start workers."""
    values = {"board": args.board, "model": args.model, "agent": args.agent, "budget": args.budget,
              "objective": args.objective, "latency_ms": args.latency_ms, "max_accuracy_drop": args.max_accuracy_drop,
              "measure": args.measure, "seed": args.seed, "data": args.data, "memory_mb": args.memory_mb,
              "input_shape": args.input_shape, "synthetic_inputs": args.synthetic_inputs, "tracking_uri": args.tracking_uri, "storage": args.storage, "study": args.study,
              "workers": args.workers if args.workers > 1 else None,
              "wait_for_servers": getattr(args, "wait_for_servers", 0.0) or None,  # only when not the default (0)
              "resume": None, "parent_run": None} | overrides
    parts = []
    for key, value in values.items():
        for item in (value if isinstance(value, list) else [value]):  # a repeatable option: once per value
            if item is not None:
                parts += ["--" + key.replace("_", "-"), f"{item:g}" if isinstance(item, float) else str(item)]
    return parts


def _summary_markdown(problem, rows, found_gains, headline, result, args, baseline=None) -> str:
    """The search summary logged to MLflow as summary.md and as the parent run's description."""
    from explorer.report import constraint_lines, processor_legend, with_change

    lines = [f"# {args.agent} search: {problem.graph.source} on {problem.board.name}", "",
             f"Objective: minimise {problem.objective.describe()}.",
             f"Accuracy: {problem.scorer.label}.",
             f"{len(result.trials)} measured evaluations, {result.feasible_count} feasible.", ""]
    if headline:
        lines += [headline[0].upper() + headline[1:] + ".", ""]
    if found_gains:
        lines += ["In the search (single measurements): " + "; ".join(gain.text(problem) for gain in found_gains) + ".", ""]
    limits = constraint_lines(problem, result.best)
    if limits:
        lines += ["Constraints" + (" and the best plan's figures:" if result.best is not None else ":"), ""]
        lines += [f"- {line}" for line in limits] + [""]
    lines += ["(+N%): change against the fp32 baseline.", "",
              "| plan | latency ms | energy mJ | weights MB | accuracy | feasible | measured by |", "|---|---|---|---|---|---|---|"]
    for name, e in rows:
        figures = " | ".join(with_change(getattr(e, key), getattr(baseline, key) if baseline is not None else None)
                             for key in ("latency_ms", "energy_mj", "memory_mb"))
        lines.append(f"| {name} | {figures} | {e.accuracy_text()} | {'yes' if e.feasible else 'no'} | {e.measured_by} |")
    if result.best_plan is not None:
        lines += ["", "| layer | decision |", "|---|---|"] + [f"| {n} | {d.label()} |" for n, d in result.best_plan.decisions]
    lines += ["", "Processors:", ""] + [f"- {line}" for line in processor_legend(problem.board)]
    return "\n".join(lines) + "\n"


def cmd_export(args: argparse.Namespace) -> None:
    """Export a plan (from a search's MLflow run, or a plan.json) as a runnable bundle."""
    from explorer.export import export_bundle
    from explorer.plan import Plan
    from explorer.planset import parse_plans_option
    from explorer.report import confirmed_figures

    if bool(args.run) == bool(args.plan):
        raise ExplorerError("give exactly one of --run RUN_ID (a search's MLflow run) or --plan plan.json")
    set_size = parse_plans_option(args.plans)
    if set_size is not None and not args.run:
        raise ExplorerError("--plans pareto|N reads the plan set from a search's trials: give --run RUN_ID")
    run_id = None
    if args.run:
        from explorer.tracking import default_tracking_uri, search_confirmation, search_run_settings

        settings, plan_json = search_run_settings(args.tracking_uri or default_tracking_uri(), args.run)
        for key, value in settings.items():  # the search's own settings, unless given here
            if getattr(args, key, None) in (None, PARSER_DEFAULTS.get(key)):
                setattr(args, key, value)
        plan, run_id = Plan.from_json(plan_json), args.run
        confirmation = search_confirmation(args.tracking_uri or default_tracking_uri(), args.run)
    else:
        plan, confirmation = Plan.load(args.plan), None
    problem = _problem(args)
    with err_console.status("evaluating the plan(s) and writing the bundle"):
        evaluation = problem.evaluate(plan)
        plan_set = None
        if set_size is not None:
            from explorer.planset import search_plan_set
            from explorer.tracking import read_search

            plan_set = search_plan_set(problem, read_search(args.tracking_uri or default_tracking_uri(), run_id), plan, confirmation, set_size)
        path = export_bundle(problem, plan, Path(args.out), evaluation=evaluation, run_id=run_id, overwrite=args.overwrite,
                             confirmed=confirmed_figures(confirmation, plan), plan_set=plan_set)
    console.print(f"wrote bundle {path} ({len(evaluation.blocks)} unit blocks; {evaluation.measured_by})")
    if plan_set:
        _print_plan_set(path)
    console.print(f"run it: explorer run {path} --input x.npy [--output y.npy] [--timing]")


def _print_plan_set(path: Path) -> None:
    """The plans of an exported bundle: figures, what they need, their roles."""
    import json

    manifest = json.loads((path / "plan.json").read_text())
    table = Table(title=f"plan set: {len(manifest['plans'])} plans, {len(manifest['files']) - 1} unit-block files "
                        f"({sum(len(p['blocks']) for p in manifest['plans'])} blocks in all, shared ones stored once)")
    for column in ("plan", "description", "latency ms", "energy mJ", "weights MB on board", "accuracy drop (points)",
                   "network", "roles", "figures"):
        table.add_column(column, overflow="fold")
    for p in manifest["plans"]:
        f, network = p["figures"], p["needs"]["network"]
        drop = f"{f['accuracy_drop_points']:.2f}" if f["accuracy_drop_points"] is not None else "not measured"
        table.add_row(p["id"], p["description"], f"{f['latency_ms']:.3f}", f"{f['energy_mj']:.3f}",
                      f"{f['local_memory_mb']:.2f}", drop,
                      f"{network['rtt_ms']:g} ms, {network['bandwidth_mbit_s']:g} Mbit/s" if network else "none",
                      ", ".join(p["roles"]), f["source"] + (" (simulated)" if f["simulated"] else ""))
    console.print(table)


def cmd_run(args: argparse.Namespace) -> None:
    """Run an exported bundle on an input with ONNX Runtime (the plan that meets the conditions given)."""
    from explorer.runtime import format_run_summary, run_bundle_cli

    summary = run_bundle_cli(args.bundle, args.input, args.output, strict=args.strict, timing=args.timing,
                             latency_ms=args.latency_ms, memory_mb=args.memory_mb, network=args.network, remote=args.remote)
    console.print(format_run_summary(summary), highlight=False)
    for message in summary.get("fallbacks", []):
        err_console.print(f"[yellow]warning:[/] {message}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from explorer.calibrate import calibrate_host

    path = calibrate_host(Path(args.out) if args.out else None, quick=args.quick,
                          progress=lambda message: err_console.print(f"calibrate: {message}"))
    from explorer.paths import TARGETS_DIR

    board = "host" if Path(path).resolve() == (TARGETS_DIR / "host.toml").resolve() else str(path)
    console.print(f"wrote {path}: use it with --board {board}", soft_wrap=True)


# ---- parser ---------------------------------------------------------------------------------------
# Option types: argparse turns their ArgumentTypeError into one line ("argument --budget: ...") and exit 2.
def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (a latency or memory limit)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0 (leave the option out for the default)")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (a wait in seconds)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def accuracy_points(text: str) -> float:
    """An accuracy-drop limit in points: 0 to 100."""
    value = _number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 100 points (e.g. 1 for one point of accuracy)")
    return value


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} must be at least {least}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (a budget, a worker or epoch count)."""
    return _whole(text, 1)


def seed_int(text: str) -> int:
    """A random seed: a whole number of at least 0 (NumPy's generators take no negative seed)."""
    return _whole(text, 0)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (what is wrong, where to read more) and exit status 2;
    its sub-commands' parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from explorer.zoo import RECIPES, trainable_names

    parser = OneLineParser(prog="explorer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"explorer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show ONNX Runtime's own warnings (e.g. unused initializers), silenced by default")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=PARSER_DEFAULTS["model"], help="zoo name (see `explorer models`) or path to an .onnx file")
        p.add_argument("--data", help=".npz validation data with array x and optional integer labels y")
        p.add_argument("--input-shape", action="append", metavar="NAME=DIMS",
                       help="size of a model input, batch first, e.g. x=1x3x48x320 (repeat per input): needed where the "
                            "model's input has symbolic dimensions other than the batch and no --data gives them; "
                            "batch 1 keeps a symbolic batch, a larger one fixes it")
        p.add_argument("--synthetic-inputs", metavar="DIST",
                       help="without --data, accuracy is estimated (not measured) as agreement with the original model on "
                            "seeded synthetic inputs drawn from DIST: normal (default), normal:MEAN,STD or uniform:LO,HI, in "
                            "the units the model's input takes; giving it replaces a zoo model's shipped data")

    def problem_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--board", default=PARSER_DEFAULTS["board"], help="board profile name (see `explorer boards`) or path to a .toml")
        p.add_argument("--measure", default=PARSER_DEFAULTS["measure"], help="sim (simulated board), host (this machine, with --board host) or "
                       "remote://HOST:PORT[,HOST:PORT...] (boards running `explorer serve`; token in $EXPLORER_AGENT_TOKEN)")
        p.add_argument("--objective", default=PARSER_DEFAULTS["objective"], help="energy, latency, memory, or a weighted sum like energy:0.7,latency:0.3")
        p.add_argument("--latency-ms", type=positive_float, default=PARSER_DEFAULTS["latency_ms"], help="latency budget per inference (default 5000, as DeepX)")
        p.add_argument("--max-accuracy-drop", type=accuracy_points, default=PARSER_DEFAULTS["max_accuracy_drop"], help="accuracy drop limit in points (default 5)")
        p.add_argument("--memory-mb", type=positive_float, help="limit on total weight memory")
        p.add_argument("--seed", type=seed_int, default=PARSER_DEFAULTS["seed"])
        p.add_argument("--wait-for-servers", type=non_negative_float, default=0.0, metavar="SECONDS",
                       help="with --measure remote://: how long to wait (probing, with a countdown) when no measurement "
                            "agent can be reached, before the search ends with what it measured (default 0)")

    def json_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout for scripts (accuracy in "
                       "percent, drops in points, units in the key names); the tables go to stderr")

    p = sub.add_parser("models", help="list the built-in model zoo")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", help="per-layer table: op, shapes, FLOPs, params, offered compression rungs")
    model_options(p)
    p.add_argument("--errors", action="store_true", help="also compute each rung's reconstruction error (SVD of every layer)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("rewrite", help="write the model rewritten for a plan (ranks and precisions) and score its accuracy")
    model_options(p)
    p.add_argument("--plan", required=True, help="plan.json")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("sensitivity", help="measure (or show the cached) per-layer accuracy sensitivity table")
    model_options(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("boards", help="list the board profiles, or show one")
    p.add_argument("name", nargs="?", help="board to show")
    p.set_defaults(func=cmd_boards)

    p = sub.add_parser("measure", help="measure one plan (default: the baseline) on a board: per-block table and totals")
    model_options(p)
    problem_options(p)
    p.add_argument("--plan", help="plan.json (default: uncompressed fp32 on the best single processor)")
    json_option(p)
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("solve", help="the analytic DAD/RLC plan (exact integer program on the cost model), evaluated")
    model_options(p)
    problem_options(p)
    p.add_argument("--out", help="write the plan to this JSON file")
    json_option(p)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("search", help="the main job: search the best plan, track every trial in MLflow")
    model_options(p)
    problem_options(p)
    p.add_argument("--agent", default="ppo", help="ppo (default), optuna-tpe, optuna-nsga2, random or solver")
    p.add_argument("--budget", type=positive_int, default=DEFAULT_BUDGET, help=f"measured evaluations (default {DEFAULT_BUDGET})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under runs/)")
    p.add_argument("--storage", help="Optuna storage URL for the optuna agents (default: SQLite under runs/)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted search (its MLflow parent run id)")
    p.add_argument("--workers", type=positive_int, default=1, help="local worker processes sharing one Optuna study (Optuna agents; "
                   "default 1)")
    p.add_argument("--study", help="Optuna study to share with other processes or machines (with --storage): this "
                   "process adds --budget trials to it")
    p.add_argument("--parent-run", help=argparse.SUPPRESS)  # set by --workers: log trials under this MLflow run
    json_option(p)
    p.set_defaults(func=cmd_search)

    sub.add_parser("serve", help="run the measurement agent on a board (see `explorer serve --help`)", add_help=False)

    p = sub.add_parser("export", help="export a plan as a bundle the runtime executes (plan.json, model.onnx, one ONNX per block)")
    model_options(p)
    problem_options(p)
    p.add_argument("--run", help="MLflow run id of a search: export its best plan with its settings")
    p.add_argument("--plan", help="plan.json to export (with --model/--board)")
    p.add_argument("--out", required=True, help="bundle folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (atomically)")
    p.add_argument("--plans", default="best", help="best (the best plan alone, the default), pareto (the search's "
                   "feasible Pareto front, thinned to 8 plans) or N (at most N plans); with --run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of the run (default: SQLite under runs/)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="run an exported bundle with ONNX Runtime (checksums verified, one session per block)")
    p.add_argument("bundle", help="bundle folder written by `explorer export`")
    p.add_argument("--input", required=True, help=".npy input (or .npz with x; a model with several inputs: .npz with "
                   "one array per input by name)")
    p.add_argument("--output", help="write the first output to this .npy file, or every output by name to a .npz")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back to the CPU when a provider is missing")
    p.add_argument("--timing", action="store_true", help="per-block and total time: the median of repeated runs after "
                   "3 warm-up runs, with its 95 %% interval")
    p.add_argument("--latency-ms", type=float, help="run the least-energy plan of the bundle within this latency")
    p.add_argument("--memory-mb", type=float, help="... within this much weight memory on the board")
    p.add_argument("--network", help="... with this network: off, or RTT_MS,MBPS (default: as the search assumed)")
    p.add_argument("--remote", metavar="http://HOST:PORT", help="run the plan's remote blocks on this `explorer serve` "
                   "agent (token in $EXPLORER_AGENT_TOKEN); without it they run on the local CPU")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("calibrate", help="measure this machine with ONNX Runtime and write the `host` board profile")
    p.add_argument("--out", help="output TOML (default: targets/host.toml)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (seconds instead of a minute)")
    p.set_defaults(func=cmd_calibrate)

    zoo = sub.add_parser("zoo", help="reproduce the zoo's trained artifacts")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    p = zoo_sub.add_parser("train", help="train a zoo model and write its ONNX file and validation subset")
    p.add_argument("name", help=f"zoo model to train ({', '.join(trainable_names())})")
    p.add_argument("--epochs", type=positive_int, help="training epochs (default: the recipe's, "
                   + ", ".join(f"{name} {recipe.epochs}" for name, recipe in RECIPES.items()) + ")")
    p.add_argument("--seed", type=seed_int, help="training seed (default: the recipe's, 0)")
    p.add_argument("--out", help="output folder (default: vgg replaces the package's zoo_data files; "
                   "dnn and cnn go to the cache under runs/, where --model NAME finds them)")
    p.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST idx .gz files "
                                                  "(default: /usr/share/datasets/fashion-mnist)")
    p.set_defaults(func=cmd_zoo_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one command; user errors print one line and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the measurement agent parses its own options
        from explorer.serve import main as serve_main

        return serve_main(argv[1:])
    try:
        with termination_as_interrupt():  # from the start: an interrupt while modules load ends as cleanly
            args = build_parser().parse_args(argv)
            console.stderr = bool(getattr(args, "json", False))  # --json: stdout holds the JSON object alone
            if not args.verbose:
                import onnxruntime

                onnxruntime.set_default_logger_severity(3)  # errors only: its warnings flood searches with data
            args.func(args)
    except ExplorerError as exc:
        err_console.print(f"[bold red]explorer: error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("explorer: interrupted")
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        console.stderr = False
    return 0


if __name__ == "__main__":
    sys.exit(main())
