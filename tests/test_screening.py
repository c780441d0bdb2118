"""Screening (explorer.screening): on a real device with a kernel table, plans the table predicts far from the best
are answered with the prediction and not measured. A fake real device (simulated=False) measures exactly what a
hand-filled kernel table predicts (or a fixed multiple of it), so which plans are screened is known."""
import json
from dataclasses import replace

import numpy as np
import pytest
from boardbuild import write_board
from netbuild import small_cnn

import explorer
from explorer.accuracy import AccuracyScorer
from explorer.agents.random_search import RandomAgent
from explorer.blockrun import AdaptiveRepeats, median_ci
from explorer.boards import load_board
from explorer.cost import CostModel
from explorer.graph import LayerGraph
from explorer.kernels import KernelCostModel, KernelTable, Terms
from explorer.measure import Device, Interleaved, Measurement, Measurer, SimMeasurer
from explorer.plan import Decision
from explorer.problem import Constraints, Excess, Objective, Problem
from explorer.screening import MIN_MARGIN, Screen
from explorer.searching import BudgetedProblem, make_agent

DEVICE = Device("fake device (test)", "1.0")
NO_LIMITS = Constraints(latency_ms=None, max_accuracy_drop=None)
SLOWER = {"cpu": 1.0, "cpu1": 3.0}  # cpu1 runs everything three times slower
PRECISION = {"fp32": 1.0, "fp16": 0.8, "int8": 0.6}
ADAPTIVE = AdaptiveRepeats()


class TableDevice(Measurer):
    """A real device (not simulated) whose every measurement is `scale` x what its kernel table predicts."""

    name = "fake"
    simulated = False
    parallelism = 1

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.model: KernelCostModel | None = None  # set once the problem (its compressor) exists
        self.measured: list[str] = []  # digests of the plans measured, in order

    def identity(self, board):
        return f"table-device-v1:{self.scale}"

    def label(self, board):
        return "fake device (the kernel table's figures)"

    def device(self, board):
        return DEVICE

    def int8_exact(self):
        return True

    def _figures(self, plan) -> Measurement:
        assert self.model is not None
        cost = self.model.plan_cost(plan)
        return Measurement(cost.latency_s * 1e3 * self.scale, 0.0, cost.energy_j * 1e3 * self.scale, "fake",
                           {p: b / 2**20 for p, b in cost.weight_bytes_by_processor.items()}, [], self.label(None))

    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        self.measured.append(plan.digest())
        return self._figures(plan)

    def measure_interleaved(self, graph, compressor, board, plans, calibration_inputs=None, repeats=5,
                            adaptive=ADAPTIVE) -> list[Interleaved]:
        results = []
        for plan in plans:
            one = self._figures(plan)
            rounds = [one.latency_ms] * 8
            whole = replace(one, latency_ci_ms=median_ci(rounds), ci_confidence=0.95, ci_target=adaptive.target,
                            ci_target_met=True, repeats=8)
            results.append(Interleaved(whole, [one] * 8))
        return results


def kernel_table(problem: Problem, without: str | None = None) -> KernelTable:
    """Every term of the problem's plans, by hand: a layer's seconds grow with its rung's work, fall with its
    precision, triple on cpu1; merge, pair and edge terms small. `without`: leave that processor's layer terms out."""
    terms = Terms(problem.graph, problem.board, problem.compressor)
    layers = problem.graph.layers
    seconds: dict[str, float] = {}
    for layer in layers:
        full = problem.compressor.rung(layer.name, "full", None).flops
        for d in problem.choices(layer):
            if d.processor != without:
                work = problem.compressor.rung(layer.name, d.method, d.rank).flops / max(full, 1)
                seconds[terms.layer(layer.index, d)] = 1e-4 * SLOWER[d.processor] * PRECISION[d.precision] * (0.2 + work)
    for pid, processor in problem.board.processors.items():
        for i in range(len(layers)):
            seconds[terms.merge(i, Decision(processor=pid))] = -1e-6
            for a in processor.precisions:
                seconds[terms.edge(i, Decision(precision=a, processor=pid))] = 2e-6
                for b in processor.precisions:
                    if i + 1 < len(layers):
                        seconds[terms.pair(i, Decision(precision=a, processor=pid), Decision(precision=b, processor=pid))] = 0.0
    return KernelTable(DEVICE, seconds)


@pytest.fixture
def board(tmp_path):
    return load_board(str(write_board(tmp_path / "cpuboard.toml", ["cpu", "cpu1"], threads=[1, 1])))


def device_problem(board, scale: float = 1.0, without: str | None = None, disk_cache: bool = False,
                   constraints: Constraints = NO_LIMITS) -> tuple[Problem, TableDevice]:
    """A problem on the fake device, its cost model the hand-filled table (the device measures it exactly, x scale)."""
    graph = LayerGraph(small_cnn())
    device = TableDevice(scale)
    problem = Problem(graph, board, device, AccuracyScorer(graph.model, None), constraints, Objective.parse("latency"),
                      use_disk_cache=disk_cache)
    problem.cost_model = KernelCostModel(board, graph, problem.compressor, kernel_table(problem, without))
    device.model = KernelCostModel(board, graph, problem.compressor, kernel_table(problem))  # the truth: every term
    return problem, device


def test_a_screened_search_spends_at_most_its_budget_and_reports_no_prediction_as_measured(board):
    problem, device = device_problem(board, disk_cache=True)
    budget = 12
    result = RandomAgent().search(problem, budget, seed=0)

    assert len(device.measured) == len(set(device.measured)) <= budget  # device measurements, each plan once
    assert len(result.trials) <= budget and len(result.best_so_far) == len(result.trials)
    # screened plans are not stalls: the search goes on until the device budget is spent (predictions are capped)
    assert len(result.trials) == budget
    assert result.predicted, "the random plans the table predicts far from the best are screened"
    assert all(t.evaluation.predicted and "predicted" in t.evaluation.measured_by for t in result.predicted)
    assert not any(t.evaluation.predicted for t in result.trials)
    measured = {t.plan.digest() for t in result.trials}
    screened = {t.plan.digest() for t in result.predicted}
    assert not measured & screened and not screened & set(device.measured)
    # every reference plan measured; the best is a measured plan, better than every screened one by the margin
    assert {plan.digest() for _, plan in problem.reference_plans()} <= measured
    assert result.best is not None and not result.best.predicted and result.best_plan.digest() in measured
    assert all(t.evaluation.objective > result.best.objective * (1 + MIN_MARGIN) for t in result.predicted)
    assert "5.0%" in (result.screening or "")  # exact predictions: the margin stays at its least
    # predictions never enter the evaluation cache
    cached = problem.cache_file().read_text()
    assert all(digest not in cached for digest in screened) and all(digest in cached for digest in measured)


def test_a_predicted_plan_asked_again_is_free_and_stays_predicted(board):
    problem, device = device_problem(board)
    budgeted = BudgetedProblem(problem, 12, "test")
    rng = np.random.default_rng(0)
    plans = [problem.random_plan(rng) for _ in range(40)]
    budgeted.evaluate_many(plans)
    screened = budgeted.result.predicted
    assert screened
    before = (len(device.measured), len(budgeted.result.trials), len(screened))
    again = budgeted.evaluate(screened[0].plan)
    assert again is screened[0].evaluation and again.predicted and budgeted.has_measured(screened[0].plan)
    assert (len(device.measured), len(budgeted.result.trials), len(budgeted.result.predicted)) == before
    with pytest.raises(ValueError, match="predicted"):  # a prediction can never become a trial
        budgeted._record(screened[0].plan, again, "test", 0.0, None)


def test_unsure_predictions_are_measured(board):
    """Without cpu1's layer terms the table prices them with the roofline model: a plan on cpu1 is measured, even
    one the whole table would screen."""
    screened, measured = [], []
    for without in (None, "cpu1"):
        problem, _ = device_problem(board, without=without)
        budgeted = BudgetedProblem(problem, 60, "test")
        rng = np.random.default_rng(1)
        budgeted.evaluate_many([problem.random_plan(rng) for _ in range(40)])
        screened.append({t.plan.digest(): t.plan for t in budgeted.result.predicted})
        measured.append({t.plan.digest() for t in budgeted.result.trials})
    on_cpu1 = {digest for digest, plan in screened[0].items() if any(d.processor == "cpu1" for _, d in plan.decisions)}
    assert on_cpu1 and on_cpu1 <= measured[1]
    assert all(all(d.processor == "cpu" for _, d in plan.decisions) for plan in screened[1].values())


def test_the_margin_follows_the_errors_seen():
    """The margin: at least MIN_MARGIN, else the quantile of the errors seen."""
    screen = Screen.__new__(Screen)
    screen.errors = []
    assert screen.margin == MIN_MARGIN
    screen.errors = [0.01, 0.02]
    assert screen.margin == MIN_MARGIN
    screen.errors = [0.3, 0.3, 0.3]
    assert screen.margin == pytest.approx(0.3)


def test_a_device_slower_than_its_table_screens_less(board):
    """A device 30 % slower than its table: the margin grows to the error seen, so fewer plans are screened."""
    exact, _ = device_problem(board)
    slow, _ = device_problem(board, scale=1.3)
    screened = [len(RandomAgent().search(problem, 12, seed=0).predicted) for problem in (exact, slow)]
    result = RandomAgent().search(slow, 12, seed=0)
    assert "23.1%" in (result.screening or "")  # predicted / measured - 1 = 1 / 1.3 - 1
    assert screened[1] < screened[0]


def test_no_screen_a_simulated_board_or_no_kernel_table_measure_every_plan(board):
    problem, device = device_problem(board)
    result = explorer.search(problem, agent="random", budget=12, track=False, screen=False)  # as --no-screen
    assert Screen.off_reason(problem) == "turned off (--no-screen)" and Screen.setting(problem).startswith("off: ")
    assert not result.predicted and result.screening is None and len(result.trials) == 12
    assert len(device.measured) == 12

    roofline, _ = device_problem(board)
    roofline.cost_model = CostModel(board, roofline.graph, roofline.compressor)
    assert "no kernel table" in (Screen.off_reason(roofline) or "")

    graph = LayerGraph(small_cnn())
    sim = Problem(graph, board, SimMeasurer(), AccuracyScorer(graph.model, None), NO_LIMITS, Objective.parse("latency"),
                  use_disk_cache=False)
    sim.cost_model = KernelCostModel(board, graph, sim.compressor, kernel_table(sim))
    assert "simulated" in (Screen.off_reason(sim) or "") and Screen.for_problem(sim, 12) is None
    assert not RandomAgent().search(sim, 12, seed=0).predicted


def test_the_rule_on_one_prediction(board):
    """Screened: a sure prediction worse than the best by more than the margin, or past a limit by more than it, and
    (sure or not, measured feasible plan or not) one that breaks the accuracy limit, which is scored for real."""
    problem, _ = device_problem(board)
    plan = problem.uniform_plan("cpu1")
    screen = Screen.for_problem(problem, 12)
    assert screen is not None
    predicted, sure = screen.predict(plan)
    assert sure and predicted.predicted and predicted.feasible
    objective = predicted.objective
    assert not screen.skips(predicted, sure, None)  # no feasible measurement yet: measure
    assert not screen.skips(predicted, sure, objective / (1 + MIN_MARGIN / 2))  # near the best
    assert screen.skips(predicted, sure, objective / (1 + 2 * MIN_MARGIN))  # worse than the best by more than the margin
    assert not screen.skips(predicted, False, objective / 2)  # unsure: measure
    for factor, skipped in ((1 + 2 * MIN_MARGIN, True), (1 + MIN_MARGIN / 2, False)):  # past the latency limit
        problem.constraints = Constraints(latency_ms=predicted.latency_ms / factor, max_accuracy_drop=None)
        past, _ = screen.predict(plan)
        assert not past.feasible and screen.skips(past, sure, past.objective) is skipped
    broken = replace(predicted, excess=[Excess("accuracy_drop", "accuracy drop", 0.1, 0.05)])
    assert screen.skips(broken, False, None)


@pytest.mark.parametrize("agent", ["optuna-tpe", "solver"])
def test_other_agents_search_through_the_screen(board, agent):
    problem, device = device_problem(board)
    result = make_agent(agent, **({"storage": "memory"} if agent.startswith("optuna") else {})).search(problem, 12, 0)
    assert len(device.measured) <= 12 and len(result.trials) <= 12
    assert result.best is not None and not result.best.predicted
    assert not {t.plan.digest() for t in result.trials} & {t.plan.digest() for t in result.predicted}
    if agent.startswith("optuna"):  # screened asks are new plans, not stalls: the device budget is spent
        assert len(result.trials) == 12


def test_a_tracked_search_reports_both_counts(board, tmp_path):
    """The summary, --json and the MLflow parent run carry the measured and the predicted counts; predicted plans are
    not logged as trials, not confirmed."""
    from explorer.searchrun import SearchRun
    from explorer.tracking import read_search

    problem, device = device_problem(board)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = SearchRun(problem, "random", 12, 0, {"model": "small-cnn", "board": "cpuboard", "measure": "fake"}, uri)
    result = run.run(RandomAgent())
    report = run.report
    assert report is not None
    json.dumps(report, default=str)
    assert report["evaluations"] == len(result.trials) <= 12
    assert report["predicted_evaluations"] == len(result.predicted) > 0
    assert report["screening"].startswith("on: ")
    screened = {t.plan.digest() for t in result.predicted}
    assert report["best"]["plan_digest"] not in screened and report["confirmed"]["plan_digest"] not in screened

    tracked = read_search(uri, run.run_id)
    metrics, params = tracked.parent.data.metrics, tracked.parent.data.params
    assert metrics["measured_evaluations"] == len(result.trials)
    assert metrics["predicted_evaluations"] == len(result.predicted)
    assert params["screening"].startswith("on: ")
    assert len(tracked.trials) == len(result.trials)  # predicted plans are counted, not logged as trials
    assert not {run.data.tags["plan_digest"] for run in tracked.trials} & screened
    summary = tracked.parent.data.tags["mlflow.note.content"]
    assert f"{len(result.predicted)} answered with the kernel table's prediction" in summary


def test_the_cli_takes_no_screen():
    from explorer.cli import build_parser

    args = build_parser().parse_args(["search", "--no-screen"])
    assert args.no_screen
    assert not build_parser().parse_args(["search"]).no_screen
