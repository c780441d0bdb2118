"""The `explorer` command line."""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path

import onnx
import onnxruntime

from explorer import __version__, report
from explorer.accuracy import AccuracyScorer, calibration_inputs, drop_text
from explorer.api import DEFAULT_BUDGET, load_problem
from explorer.boards import load_board
from explorer.calibrate import calibrate_host
from explorer.compress import Compressor
from explorer.errors import ExplorerError, termination_as_interrupt
from explorer.export import export_bundle
from explorer.graph import parse_input_shapes
from explorer.measured_solver import solve_measured
from explorer.paths import TARGETS_DIR, runs_dir
from explorer.plan import Plan
from explorer.planset import parse_plans_option, search_plan_set
from explorer.report import console, emit_json, err_console, zoo_note
from explorer.runtime import format_run_summary, run_bundle_cli
from explorer.synthetic import check_one_source, scoring_data
from explorer.zoo import RECIPES, load_graph_and_data, train, trainable_names

# What needs MLflow, Optuna or PyTorch (a second or more each to import) is imported by the command that uses
# it, so that every other command starts at once: the search run and a search's MLflow run (explorer.searchrun,
# explorer.tracking), the agents (`explorer.searching.make_agent`, looked up when called) and the measurement server (serve).

#: Defaults of the options that define a Problem (DeepX: 5 s per inference, about 5 points of accuracy).
PARSER_DEFAULTS = {"model": "vgg", "board": "tegra-k1", "measure": "sim", "objective": "energy", "latency_ms": 5000.0,
                   "max_accuracy_drop": 5.0, "memory_mb": None, "seed": 0, "data": None, "input_shape": None,
                   "synthetic_inputs": None}


# ---- what the options build -----------------------------------------------------------------------
def _load(args: argparse.Namespace):
    """LayerGraph and dataset (or None) for --model/--data/--input-shape."""
    return load_graph_and_data(args.model, getattr(args, "data", None),
                               parse_input_shapes(getattr(args, "input_shape", None)))


def _scorer(args: argparse.Namespace, graph, dataset) -> AccuracyScorer:
    """The AccuracyScorer of a command: on the data, else (or with --synthetic-inputs) on synthetic inputs."""
    synthetic = getattr(args, "synthetic_inputs", None)
    check_one_source(getattr(args, "data", None), synthetic)
    return AccuracyScorer(graph.model, scoring_data(graph, dataset, synthetic))


def _problem(args: argparse.Namespace):
    """Problem for the --model/--data/--board/--measure/constraint options (explorer.api.load_problem)."""
    return load_problem(args.model, args.board, measure=args.measure, data=getattr(args, "data", None),
                        synthetic_inputs=getattr(args, "synthetic_inputs", None),
                        input_shapes=parse_input_shapes(getattr(args, "input_shape", None)), latency_ms=args.latency_ms,
                        max_accuracy_drop_points=args.max_accuracy_drop, memory_mb=args.memory_mb,
                        objective=args.objective, seed=args.seed, wait_for_servers=getattr(args, "wait_for_servers", 0.0))


# ---- commands -------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> None:
    report.print_models()


def cmd_inspect(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    graph, _ = _load(args)
    report.print_layers(graph, Compressor(graph), args.errors)
    zoo_note(args.model)
    console.print(f"inspected in {time.perf_counter() - started:.1f} s")


def cmd_rewrite(args: argparse.Namespace) -> None:
    graph, dataset = _load(args)
    plan = Plan.load(args.plan)
    scorer = _scorer(args, graph, dataset)
    x_calibration, calibration_source = calibration_inputs(graph, scorer.dataset)
    model = Compressor(graph).rewrite(plan, x_calibration)  # type: ignore[arg-type]  # several inputs come by name
    onnx.save(model, args.out)
    console.print(f"wrote {args.out}")
    if any(d.precision == "int8" for _, d in plan.decisions):
        console.print(f"int8 calibrated on {calibration_source}")
    result = scorer.score(model)
    uncompressed = scorer.baseline.value
    if result.measured and uncompressed is not None:
        console.print(f"accuracy: {result.describe()} (uncompressed: {100 * uncompressed:.2f}%, "
                      f"{drop_text(scorer.drop(result), result.basis, result.samples)})")
    else:
        console.print(f"[yellow]{result.describe()}[/]")
    zoo_note(args.model)


def cmd_sensitivity(args: argparse.Namespace) -> None:
    graph, dataset = _load(args)
    started = time.perf_counter()
    compressor = Compressor(graph)
    scorer = _scorer(args, graph, dataset)
    table = report.sensitivity_with_progress(graph, compressor, scorer)
    report.print_sensitivity(graph, compressor, scorer, table)
    source = "cache" if table.from_cache else "measured now"
    console.print(f"{len(table.drops)} entries ({source}) in {time.perf_counter() - started:.1f} s")
    if scorer.synthetic:
        console.print(f"[yellow]{scorer.label}[/]; rungs within the reconstruction-error bound only")


def cmd_zoo_train(args: argparse.Namespace) -> None:
    path, metrics = train(args.name, out_dir=Path(args.out) if args.out else None, epochs=args.epochs, seed=args.seed,
                          data_dir=args.data_dir)
    report.print_zoo_training(path, metrics)


def cmd_boards(args: argparse.Namespace) -> None:
    if args.name:
        report.print_board(load_board(args.name))
    else:
        report.print_boards()


def cmd_measure(args: argparse.Namespace) -> None:
    problem = _problem(args)
    plan = Plan.load(args.plan) if args.plan else problem.baseline_plan()
    what = f"plan {args.plan}" if args.plan else "baseline: uncompressed fp32 on the best single processor"
    evaluation = problem.evaluate(plan)
    report.print_evaluation(evaluation, f"{problem.graph.source} on {problem.board.name} ({what})")
    zoo_note(args.model)
    if args.json:
        emit_json({"command": "measure", "model": problem.graph.source, "board": problem.board.name,
                   "constraints": report.constraints_json(problem), "plan": plan.to_json(),
                   "evaluation": report.evaluation_json(evaluation), "blocks": evaluation.to_json()["blocks"]})
    if not evaluation.feasible:  # scripts read the status; a person reads the last line
        console.print(f"[red]infeasible[/]: {'; '.join(evaluation.violations)}", highlight=False, soft_wrap=True)
        raise SystemExit(1)


def cmd_solve(args: argparse.Namespace) -> None:
    problem = _problem(args)
    if problem.scorer.measured:
        report.sensitivity_with_progress(problem.graph, problem.compressor, problem.scorer,
                                         report.sensitivity_status(problem.scorer))
    with err_console.status("solving the integer program (HiGHS), evaluating, re-solving"):
        result = solve_measured(problem)
    rows = [(name, problem.evaluate(plan)) for name, plan in problem.reference_plans()]  # the rounds had to beat them
    rows += [(f"solver round {i + 1}" + (" (chosen)" if s.plan == result.plan else ""), e)
             for i, (s, e) in enumerate(result.rounds)]
    report.print_solution(problem, result, rows)
    confirmation, at_typical = None, None
    if not problem.measurer.simulated:  # the plan against the references again, interleaved: the figures to trust
        from explorer.confirm import confirm
        from explorer.kernels import at_typical_speed

        references = [plan for _, plan in problem.reference_plans()]
        with err_console.status("confirming: the solver's plan and the reference plans measured again, interleaved"):
            confirmation = confirm(problem, [result.plan, *references])
            at_typical = at_typical_speed(problem, result.plan)  # against a kernel table's typical speed
        report.print_solve_confirmation(problem, result, confirmation, at_typical)
    if args.out:
        result.plan.save(Path(args.out))
        console.print(f"wrote {args.out}")
    zoo_note(args.model)
    if args.json:
        emit_json(report.solve_json(problem, result, rows, args.out, confirmation, at_typical))


def cmd_search(args: argparse.Namespace) -> None:
    """The main job: search, track every trial in MLflow, summarise, say how to export."""
    from explorer.screening import Screen
    from explorer.searchrun import SearchRun

    if args.workers > 1:
        _check_distributed(args)
    elif args.parent_run and (not args.study or not args.agent.startswith("optuna")):
        raise ExplorerError("--parent-run makes this process a worker of a distributed search: give the Optuna --agent, "
                            "--study and --storage of that search too")
    if args.parent_run:  # its supervisor stops it with SIGINT, which a shell's background job inherits ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def search_args(**overrides) -> list[str]:  # this search's arguments, --no-screen kept
        return _search_args(args, **overrides) + (["--no-screen"] if args.no_screen else [])

    run = None
    try:
        problem = _problem(args)
        problem.screening = not args.no_screen
        if (args.study or args.parent_run or args.workers > 1) and Screen.off_reason(problem) is None:
            problem.screening = False  # a shared study's trials are measured ones: its workers reconcile them so
            if not args.parent_run:
                err_console.print("[yellow]note:[/] a shared Optuna study measures every plan (no screening)")
        agent = None if args.workers > 1 else _search_agent(args, shared=bool(args.study or args.parent_run))
        run = SearchRun(problem, args.agent, args.budget, args.seed, {key: getattr(args, key) for key in PARSER_DEFAULTS},
                        args.tracking_uri)
        if args.parent_run:
            return _search_worker(args, run, agent)
        if args.workers > 1:
            result = run.run_distributed(args.workers, args.storage, args.study,
                                         lambda **options: _search_agent(args, shared=True, **options), search_args)
        else:
            result = run.run(agent, resume_run_id=args.resume)
    except KeyboardInterrupt:  # before the search or after it (while confirming): the JSON of what is known
        if args.json and not args.parent_run:
            if args.workers > 1:  # --workers takes no --resume: its supervisor's command goes on (none yet: run it again)
                go_on = run.go_on_args if run is not None and run.run_id else search_args()
            else:
                go_on = search_args(resume=run.run_id if run else None)
            _emit_interrupted(args, run, go_on)
        raise
    except SystemExit as stop:  # the supervisor of --workers stopped the search (and said how to go on)
        if stop.code == 130 and args.json and run is not None:
            _emit_interrupted(args, run, run.go_on_args)
        raise
    if result.interrupted:
        resume = search_args(resume=run.run_id)
        err_console.print(f"resume with: explorer search {' '.join(resume)}")
        if args.json:
            _emit_interrupted(args, run, resume)
        raise SystemExit(130)
    _say_next(args, run, result)
    if run.ended:
        raise run.ended  # one line, exit code 2; the summary is written and the parent run marked FAILED


def _search_agent(args: argparse.Namespace, shared: bool = False, **options):
    """The --agent, with the Optuna options (--storage, --study) where it is an Optuna agent."""
    from explorer.searching import make_agent

    if args.agent.startswith("optuna"):
        options = {"storage": args.storage, "study_name": args.study, "shared": shared} | options
    elif args.storage or args.study or args.workers > 1:
        raise ExplorerError(f"--storage, --study and --workers share an Optuna study; {args.agent} does not use one: "
                            "use --agent optuna-tpe or optuna-nsga2")
    return make_agent(args.agent, **options)


def _check_distributed(args: argparse.Namespace) -> None:
    """`--workers N` starts N local Optuna workers on one shared study: refuse what cannot be shared."""
    if not args.agent.startswith("optuna"):
        raise ExplorerError(f"--workers {args.workers} starts Optuna workers on one shared study, and {args.agent} is not "
                            "an Optuna agent: use --agent optuna-tpe or optuna-nsga2 (or leave --workers out)")
    if args.parent_run or args.resume:
        raise ExplorerError("--workers starts a new distributed search: leave out --parent-run and --resume "
                            "(to add trials to its study, start `explorer search --study NAME --storage URL`)")
    if args.workers > args.budget:
        raise ExplorerError(f"--workers {args.workers} is more than --budget {args.budget}: every worker needs at least "
                            "one trial")


def _search_worker(args: argparse.Namespace, run, agent) -> None:
    """One worker of a distributed search (`--parent-run`, set by `--workers`): one line for its supervisor."""
    result = run.run_worker(agent, args.parent_run)
    failed = sum(t.failed for t in result.trials)
    print(f"worker seed {args.seed}: {len(result.trials)} trials ({result.feasible_count} feasible, {failed} failed) "
          f"in study {args.study}" + (", interrupted" if result.interrupted else ""), flush=True)
    if result.interrupted:
        raise SystemExit(130)


def _emit_interrupted(args: argparse.Namespace, run, go_on: list[str] | None) -> None:
    """`--json` of an interrupted search: what it found so far, its MLflow run and the command that goes on
    (`go_on`: its arguments; None: nothing is left to do)."""
    from explorer.tracking import ui_command

    if run is None:  # interrupted before the problem was built: nothing found, the same command starts again
        data = {"command": "search", "agent": args.agent, "interrupted": True, "evaluations": 0, "run_id": None}
    else:
        data = run.interrupted_report() | {"run_id": run.run_id, "experiment": run.experiment,
                                           "tracking_uri": run.tracking_uri, "ui_command": ui_command(run.tracking_uri)}
    emit_json(data | {"resume_command": f"explorer search {' '.join(go_on)}" if go_on is not None else None})


def _say_next(args: argparse.Namespace, run, result) -> None:
    """Where the search is in MLflow and how to export its best plan; with --json, the run's report and these."""
    from explorer.tracking import ui_command

    console.print(f"MLflow run: {run.run_id} (experiment {run.experiment!r})")
    console.print(f"open the MLflow UI: {ui_command(run.tracking_uri)}", soft_wrap=True)  # a command to copy: never wrapped
    dashboard = None
    if args.agent.startswith("optuna"):
        from explorer.studies import dashboard_command

        if dashboard := dashboard_command(args.storage):
            console.print(f"open the Optuna dashboard: {dashboard}", soft_wrap=True)
    export = None
    if result.best_plan is not None:
        # one folder per search, so the printed command works as printed after an earlier search's export
        bundle = runs_dir() / "bundles" / f"{Path(run.problem.graph.source).stem}-{run.problem.board.name}-{run.run_id[:8]}"
        export = (f"explorer export --run {run.run_id} --out {bundle}"
                  + (f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""))
        console.print(f"export the best plan: {export}", soft_wrap=True)
    if args.json:
        emit_json((run.report or {}) | {"run_id": run.run_id, "experiment": run.experiment,
                                        "tracking_uri": run.tracking_uri, "ui_command": ui_command(run.tracking_uri),
                                        "dashboard_command": dashboard, "export_command": export})


def _search_args(args: argparse.Namespace, **overrides) -> list[str]:
    """The command-line arguments of this search (with some replaced): to resume it or start workers."""
    values = {"board": args.board, "model": args.model, "agent": args.agent, "budget": args.budget,
              "objective": args.objective, "latency_ms": args.latency_ms, "max_accuracy_drop": args.max_accuracy_drop,
              "measure": args.measure, "seed": args.seed, "data": args.data, "memory_mb": args.memory_mb,
              "input_shape": args.input_shape, "synthetic_inputs": args.synthetic_inputs, "tracking_uri": args.tracking_uri,
              "storage": args.storage, "study": args.study,
              "workers": args.workers if args.workers > 1 else None,
              "wait_for_servers": getattr(args, "wait_for_servers", 0.0) or None,  # only when not the default (0)
              "resume": None, "parent_run": None} | overrides
    parts = []
    for key, value in values.items():
        for item in (value if isinstance(value, list) else [value]):  # a repeatable option: once per value
            if item is not None:
                parts += ["--" + key.replace("_", "-"), f"{item:g}" if isinstance(item, float) else str(item)]
    return parts


def cmd_export(args: argparse.Namespace) -> None:
    """Export a plan (from a search's MLflow run, or a plan.json) as a runnable bundle."""
    if bool(args.run) == bool(args.plan):
        raise ExplorerError("give exactly one of --run RUN_ID (a search's MLflow run) or --plan plan.json")
    set_size = parse_plans_option(args.plans)
    if set_size is not None and not args.run:
        raise ExplorerError("--plans pareto|N reads the plan set from a search's trials: give --run RUN_ID")
    run_id = None
    if args.run:
        from explorer.tracking import default_tracking_uri, read_search, search_confirmation, search_run_settings

        tracking_uri = args.tracking_uri or default_tracking_uri()
        settings, plan_json = search_run_settings(tracking_uri, args.run)
        for key, value in settings.items():  # the search's own settings, unless given here
            if getattr(args, key, None) in (None, PARSER_DEFAULTS.get(key)):
                setattr(args, key, value)
        plan, run_id = Plan.from_json(plan_json), args.run
        confirmation = search_confirmation(tracking_uri, args.run)
    else:
        plan, confirmation = Plan.load(args.plan), None
    problem = _problem(args)
    with err_console.status("evaluating the plan(s) and writing the bundle"):
        evaluation = problem.evaluate(plan)
        plan_set = None
        if set_size is not None:
            plan_set = search_plan_set(problem, read_search(tracking_uri, args.run), plan, confirmation, set_size)
        path = export_bundle(problem, plan, Path(args.out), evaluation=evaluation, run_id=run_id, overwrite=args.overwrite,
                             confirmed=report.confirmed_figures(confirmation, plan), plan_set=plan_set)
    console.print(f"wrote bundle {path} ({len(evaluation.blocks)} unit blocks; {evaluation.measured_by})")
    if plan_set:
        report.print_plan_set(path)
    console.print(f"run it: explorer run {path} --input x.npy [--output y.npy] [--timing]", soft_wrap=True)


def cmd_run(args: argparse.Namespace) -> None:
    """Run an exported bundle on an input with ONNX Runtime (the plan that meets the conditions given)."""
    summary = run_bundle_cli(args.bundle, args.input, args.output, strict=args.strict, timing=args.timing,
                             latency_ms=args.latency_ms, memory_mb=args.memory_mb, network=args.network, remote=args.remote)
    console.print(format_run_summary(summary), highlight=False)
    for message in summary.get("fallbacks", []):
        err_console.print(f"[yellow]warning:[/] {message}")


def cmd_profile(args: argparse.Namespace) -> None:
    """Measure the model's kernel table on the device (resumable), and say what it holds and how well it predicts."""
    from explorer.kernels import profile

    problem = _problem(args)
    if problem.measurer.simulated:
        raise ExplorerError("--measure sim: a simulated board needs no kernel table (its simulator is the device); profile "
                            "a real one: --board host --measure host, or --measure remote://HOST:PORT")
    with report.profile_progress(problem) as update:
        result = profile(problem, progress=update, seed=args.seed, budget=args.plans)
    held_out = None
    if args.check:  # additivity on plans the fit never saw
        import numpy as np

        from explorer.kernels import KernelCostModel, check

        rng = np.random.default_rng(args.seed + 1000)
        model = KernelCostModel(problem.board, problem.graph, problem.compressor, result.table)
        with err_console.status(f"checking the table on {args.check} random plans it was not fitted to"):
            held_out = check(problem, model, [problem.random_plan(rng) for _ in range(args.check)])
    report.print_profile(problem, result, held_out)
    if args.json:
        emit_json(report.profile_json(problem, result, held_out))


def cmd_calibrate(args: argparse.Namespace) -> None:
    path = calibrate_host(Path(args.out) if args.out else None, quick=args.quick,
                          progress=lambda message: err_console.print(f"calibrate: {message}"))
    if Path(path).resolve() == (TARGETS_DIR / "host.toml").resolve():  # ./targets is where names are looked up first
        console.print(f"wrote {path}: use it with --board host from this folder (or --board {path} from any)", soft_wrap=True)
    else:
        console.print(f"wrote {path}: use it with --board {path}", soft_wrap=True)


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
    parser = OneLineParser(prog="explorer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"explorer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show ONNX Runtime's own warnings (e.g. unused initializers), silenced by default")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=PARSER_DEFAULTS["model"],
                       help="zoo name (see `explorer models`) or path to an .onnx file")
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
        p.add_argument("--board", default=PARSER_DEFAULTS["board"],
                       help="board profile name (see `explorer boards`) or path to a .toml")
        p.add_argument("--measure", default=PARSER_DEFAULTS["measure"],
                       help="sim (simulated board), host (this machine, with --board host) or remote://HOST:PORT[,HOST:PORT...] "
                            "(boards running `explorer serve`; token in $EXPLORER_SERVER_TOKEN)")
        p.add_argument("--objective", default=PARSER_DEFAULTS["objective"],
                       help="energy, latency, memory, or a weighted sum like energy:0.7,latency:0.3")
        p.add_argument("--latency-ms", type=positive_float, default=PARSER_DEFAULTS["latency_ms"],
                       help="latency budget per inference (default 5000, as DeepX)")
        p.add_argument("--max-accuracy-drop", type=accuracy_points, default=PARSER_DEFAULTS["max_accuracy_drop"],
                       help="accuracy drop limit in points (default 5)")
        p.add_argument("--memory-mb", type=positive_float, help="limit on total weight memory")
        p.add_argument("--seed", type=seed_int, default=PARSER_DEFAULTS["seed"])
        p.add_argument("--wait-for-servers", type=non_negative_float, default=0.0, metavar="SECONDS",
                       help="with --measure remote://: how long to wait (probing, with a countdown) when no measurement "
                            "server can be reached, before the search ends with what it measured (default 0)")

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
    p.add_argument("--workers", type=positive_int, default=1,
                   help="local worker processes sharing one Optuna study (Optuna agents; default 1)")
    p.add_argument("--study", help="Optuna study to share with other processes or machines (with --storage): this "
                   "process adds --budget trials to it")
    p.add_argument("--parent-run", help=argparse.SUPPRESS)  # set by --workers: log trials under this MLflow run
    p.add_argument("--no-screen", action="store_true",
                   help="measure every plan the agent proposes (on a real device with a kernel table, plans it predicts "
                   "far from the best are otherwise answered with the prediction and not measured)")
    json_option(p)
    p.set_defaults(func=cmd_search)

    sub.add_parser("serve", help="run the measurement server on a board (see `explorer serve --help`)", add_help=False)

    p = sub.add_parser("export",
                       help="export a plan as a bundle the runtime executes (plan.json, model.onnx, one ONNX per block)")
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
                   "server (token in $EXPLORER_SERVER_TOKEN); without it they run on the local CPU")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("profile", help="measure the model's kernel table on the device (what the solver prices plans "
                       "with on real hardware); resumable")
    model_options(p)
    problem_options(p)
    p.add_argument("--plans", type=positive_int, help="measure at most this many designed plans, those whose terms the "
                   "predictor is least sure of first (default: all)")
    p.add_argument("--check", type=int, default=6, metavar="N", help="then measure N random plans the table was not "
                   "fitted to and report how well it predicts them (default 6; 0: no check)")
    json_option(p)
    p.set_defaults(func=cmd_profile)

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
    if argv[:1] == ["serve"]:  # the measurement server parses its own options
        from explorer.serve import main as serve_main

        return serve_main(argv[1:])
    try:
        with termination_as_interrupt():  # from the start: an interrupt while modules load ends as cleanly
            args = build_parser().parse_args(argv)
            console.stderr = bool(getattr(args, "json", False))  # --json: stdout holds the JSON object alone
            if not args.verbose:
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
