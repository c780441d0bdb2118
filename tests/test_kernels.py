"""Kernel tables (explorer.kernels): profiled on a fake device whose block times are exactly additive in the table's
terms (hidden seconds per term, no timing), the table prices blocks, plans and the solver's integer program exactly;
tables are kept per device and ONNX Runtime version, terms are keyed by what the device runs (not by model), an
interrupted profile resumes, and terms a table lacks fall back to the predictor or the roofline model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from boardbuild import write_board
from netbuild import mlp, small_cnn

from explorer import kernels, report
from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.cli import main
from explorer.compress import Compressor
from explorer.confirm import confirm
from explorer.graph import LayerGraph
from explorer.kernels import (
    KINDS,
    MEASURED_WEIGHT,
    PAIRED_GROUP,
    SEARCHED_WEIGHT,
    KernelCostModel,
    KernelStore,
    Terms,
    at_typical_speed,
    check,
    design_plans,
    device_cost_model,
    fit_terms,
    plan_seconds,
    profile,
    term_kind,
)
from explorer.measure import BlockReport, Device, Interleaved, Measurement, MeasurementFailed, Measurer
from explorer.measured_solver import MeasuredSolver, solve_measured
from explorer.milp import picks_for, predicted
from explorer.partition import block_boundaries
from explorer.plan import Decision
from explorer.problem import Constraints, Objective, Problem
from explorer.report import solve_confirmation_json
from explorer.solver import instance_for, solve_problem

EXACT = 1e-6  # relative: what "exact" means for sums of floats fitted by least squares


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch) -> Path:
    """Every test its own runs folder: kernel stores are per device, and the fake device is the same in every test."""
    folder = tmp_path / "runs"
    monkeypatch.setenv("EXPLORER_RUNS", str(folder))
    return folder


@pytest.fixture
def board(tmp_path):
    """Two CPU-provider processors that differ in threads (so in every term's key)."""
    return load_board(str(write_board(tmp_path / "duo.toml", ["cpu", "cpu1"], threads=[1, 2])))


@pytest.fixture
def quick_predictor(monkeypatch):
    """The predictor with fewer, smaller tree ensembles: what it predicts is not tested here, only where it is used
    (its full size takes about a second per term on two busy cores)."""
    from explorer import predictor

    trees = predictor.HistGradientBoostingRegressor
    monkeypatch.setattr(predictor, "MEMBERS", 2)
    monkeypatch.setattr(predictor, "HistGradientBoostingRegressor", lambda **options: trees(**{**options, "max_iter": 10}))


class AdditiveDevice(Measurer):
    """A device whose unit blocks take exactly the sum of hidden seconds of their terms: a random positive value per
    layer term, a negative merge term, small random pair and (positive) edge corrections (times `corrections`), every
    block of a plan times exp(`pressure` x the plan's working set in MB) (cache pressure).
    Values are drawn the first time a term is met (so identical terms of two models cost the same). Keeps the plans of
    every call of measure_interleaved_many (each group's reference plan left out); `interrupt_at`: the call (1-based)
    that raises KeyboardInterrupt (Ctrl-C)."""

    name = "fake"
    simulated = False

    def __init__(self, corrections: float = 1.0, seed: int = 0, parallelism: int = 1,
                 fingerprint: str = "fake additive device", onnxruntime: str = "1.0-fake", pressure: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.corrections, self.pressure = corrections, pressure
        self.parallelism = parallelism
        self.fingerprint, self.onnxruntime = fingerprint, onnxruntime
        self.hidden: dict[str, float] = {}
        self.batches: list[list[str]] = []  # plan digests of each measure_interleaved_many call
        self.interrupt_at: int | None = None
        self.broken: set[str] = set()  # digests of plans that cannot be measured (MeasurementFailed)
        self.speed = 1.0  # every time multiplied by this (a device slower than while it was profiled: > 1)

    def identity(self, board):
        return f"fake-additive:{self.fingerprint}:{self.onnxruntime}"

    def label(self, board):
        return "fake additive device (hidden seconds per term)"

    def device(self, board) -> Device:
        return Device(self.fingerprint, self.onnxruntime)

    def int8_exact(self):
        return True

    def seconds(self, key: str) -> float:
        if key not in self.hidden:
            kind = term_kind(key)
            if kind == "layer":
                self.hidden[key] = float(self.rng.uniform(1e-4, 2e-3))
            elif kind == "merge":
                self.hidden[key] = -float(self.rng.uniform(2e-5, 5e-5))
            elif kind == "edge":  # a QuantizeLinear takes time
                self.hidden[key] = self.corrections * float(self.rng.uniform(0.0, 1e-5))
            else:
                self.hidden[key] = self.corrections * float(self.rng.uniform(-1e-5, 1e-5))
        return self.hidden[key]

    def block_seconds(self, graph, board, compressor, plan) -> list[float]:
        terms = Terms(graph, board, compressor)
        factor = float(np.exp(self.pressure * terms.working_set_mb(plan)))
        return [factor * sum(self.seconds(k) for k in keys) for keys in terms.blocks(plan)]

    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        if plan.digest() in self.broken:
            raise MeasurementFailed("this plan cannot be measured on the fake device")
        seconds = [self.speed * s for s in self.block_seconds(graph, board, compressor, plan)]
        blocks = [BlockReport(b, boundary.processor, list(boundary.layer_names), 1e3 * s, 0.0, 0.0, 0.0, 0.0)
                  for b, (boundary, s) in enumerate(zip(block_boundaries(graph, plan), seconds))]
        return Measurement(1e3 * sum(seconds), 0.0, 0.0, "fake", {}, blocks, self.label(board))

    def measure_interleaved(self, graph, compressor, board, plans, calibration_inputs=None, repeats=5, adaptive=None):
        measured = [self.measure(graph, compressor, board, plan) for plan in plans]
        return [Interleaved(m, [m]) for m in measured]  # one round: the device never changes speed

    def measure_interleaved_many(self, graph, compressor, board, groups, calibration_inputs=None, repeats=5,
                                 adaptive=None):
        if self.interrupt_at is not None and len(self.batches) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.batches.append([plan.digest() for group in groups for plan in group[1:]])  # after each reference plan
        return super().measure_interleaved_many(graph, compressor, board, groups, calibration_inputs, repeats, adaptive)

    def measured(self) -> list[str]:
        return [d for batch in self.batches for d in batch]


def _problem(model: onnx.ModelProto, board, measurer) -> Problem:
    graph = LayerGraph(model)
    return Problem(graph, board, measurer, AccuracyScorer(graph.model, None),
                   Constraints(latency_ms=None, max_accuracy_drop=None), Objective.parse("latency"), use_disk_cache=False)


def _truth(device: AdditiveDevice, problem: Problem, plan) -> list[float]:
    return device.block_seconds(problem.graph, problem.board, problem.compressor, plan)


def _layer_keys(problem: Problem) -> set[str]:
    terms = Terms(problem.graph, problem.board, problem.compressor)
    return {terms.layer(layer.index, d) for layer in problem.graph.layers for d in problem.choices(layer)}


# ---- 1. an additive device: the table is exact --------------------------------------------------------
def test_cache_pressure_is_the_slope_of_log_block_time_in_the_plans_working_set():
    block = (["layer:a", "layer:b", "merge:ab"], 1e-3)
    other = (["layer:c"], 2e-4)
    plans = [(ws, [(block[0], block[1] * np.exp(0.03 * ws)), (other[0], other[1] * np.exp(0.03 * ws))])
             for ws in (2.0, 10.0, 40.0)]
    assert kernels.cache_pressure(plans) == pytest.approx(0.03, rel=1e-9)
    assert kernels.cache_pressure([(ws, [(keys, 1e-3 / (1 + ws))]) for ws, keys in ((1, ["x"]), (5, ["x"]))]) == 0.0
    assert kernels.cache_pressure([(1.0, [block]), (5.0, [other])]) == 0.0  # no block measured in two plans


def test_a_device_under_cache_pressure_is_priced_at_each_plans_working_set(board, capsys):
    device = AdditiveDevice(corrections=0.0, pressure=2.0)  # 7.4x slower per MB: small_cnn's plans hold 0.1-0.5 MB
    problem = _problem(small_cnn(), board, device)
    result = profile(problem)
    table = result.table
    assert table.pressure == pytest.approx(2.0, rel=EXACT)
    model, note = device_cost_model(problem)
    assert "cache pressure: blocks 638.9 % slower per MB" in note
    terms = Terms(problem.graph, problem.board, problem.compressor)
    rng = np.random.default_rng(5)
    plans = [plan for plan in (problem.random_plan(rng) for _ in range(60))
             if terms.working_set_mb(plan) <= table.pressure_cap_mb]
    assert len(plans) > 20
    for plan in plans:
        truth = _truth(device, problem, plan)
        assert model.block_seconds(plan) == pytest.approx(truth, rel=EXACT)
        assert model.plan_cost(plan).latency_s == pytest.approx(sum(truth), rel=EXACT)
        assert plan_seconds(table, terms, plan)[0] == pytest.approx(sum(truth), rel=EXACT)
    report.print_profile(problem, result)  # what `explorer profile` says of it
    assert "cache pressure: blocks 638.9 % slower per MB of the plan's weights" in capsys.readouterr().out
    assert report.profile_json(problem, result)["cache_pressure_per_mb"] == pytest.approx(2.0, rel=EXACT)
    solution = solve_problem(problem, cost_model=model)  # the program at the working set of the plan it finds
    assert solution.plan is not None
    assert solution.latency_s == pytest.approx(sum(_truth(device, problem, solution.plan)), rel=kernels.PRESSURE_SETTLED)
    at_none = instance_for(problem, model)  # terms at no working set: the plan's own time is far from that sum
    picks = picks_for(at_none, solution.plan)
    assert picks is not None and predicted(at_none, picks)["latency"] < 0.8 * sum(_truth(device, problem, solution.plan))
    problem.cost_model, problem.cost_model_note = model, note  # `explorer solve`: its rounds' predictions hold
    measured = solve_measured(problem)
    assert all(abs(measured.prediction_error(s)) <= kernels.PRESSURE_SETTLED for s, _ in measured.rounds)


def test_a_table_profiled_on_an_additive_device_prices_blocks_plans_and_the_solver_exactly(board):
    device = AdditiveDevice(corrections=0.0)  # layer and merge terms (pair and edge terms: 0)
    problem = _problem(small_cnn(), board, device)
    design = design_plans(problem)
    result = profile(problem)
    assert (result.measured, result.recalled, result.failed) == (len(design), 0, 0)
    assert result.blocks_now == sum(len(block_boundaries(problem.graph, plan)) for plan in design) == result.table.blocks
    table, terms = result.table, Terms(problem.graph, problem.board, problem.compressor)
    assert all(result.table.counts()[kind] > 0 for kind in KINDS)
    assert table.pressure == pytest.approx(0.0, abs=1e-12)  # blocks run as fast in every plan: no cache pressure
    assert _layer_keys(problem) <= set(table.seconds)  # every layer choice of the model measured
    for key, seconds in table.seconds.items():
        if term_kind(key) in ("layer", "merge"):
            assert seconds == pytest.approx(device.hidden[key], rel=EXACT), key

    model, note = device_cost_model(problem)
    assert isinstance(model, KernelCostModel) and model.table.blocks == table.blocks
    assert "kernel table of fake additive device, ONNX Runtime 1.0-fake" in note and "roofline" not in note
    rng = np.random.default_rng(3)
    for _ in range(40):
        plan = problem.random_plan(rng)
        truth = _truth(device, problem, plan)
        total, per_block = plan_seconds(table, terms, plan)
        assert per_block == pytest.approx(truth, rel=EXACT)
        assert total == pytest.approx(sum(truth), rel=EXACT)
        assert model.block_seconds(plan) == pytest.approx(truth, rel=EXACT)
        assert model.plan_cost(plan).latency_s == pytest.approx(sum(truth), rel=EXACT)

    solution = solve_problem(problem, cost_model=model)
    assert solution.optimal and solution.plan is not None
    fastest = sum(_truth(device, problem, solution.plan))
    assert solution.latency_s == pytest.approx(fastest, rel=EXACT)  # what the device takes for the solver's plan
    others = design + [problem.random_plan(rng) for _ in range(200)]
    assert fastest <= min(sum(_truth(device, problem, plan)) for plan in others) * (1 + EXACT)
    assert set(model.sources) == {"table"}  # every term of the program from the table
    assert model.plan_prediction(solution.plan)[1]

    checked = check(problem, model, [problem.random_plan(rng) for _ in range(10)])
    assert checked.fallback_terms == 0 and len(checked.plan_errors) == 10
    assert max(map(abs, checked.block_errors + checked.plan_errors)) < EXACT


def test_the_integer_program_prices_a_plan_as_the_sum_of_its_predicted_blocks(board):
    device = AdditiveDevice(corrections=1.0)  # pair and edge terms too
    problem = _problem(small_cnn(), board, device)
    profile(problem)
    model, _ = device_cost_model(problem)
    assert isinstance(model, KernelCostModel)
    instance = instance_for(problem, model)
    terms = Terms(problem.graph, problem.board, problem.compressor)
    rng = np.random.default_rng(5)
    for _ in range(40):
        plan = problem.random_plan(rng)
        picks = picks_for(instance, plan)
        assert picks is not None
        blocks = model.block_seconds(plan)
        assert predicted(instance, picks)["latency"] == pytest.approx(sum(blocks), rel=1e-9)
        assert blocks == pytest.approx(plan_seconds(model.table, terms, plan)[1], rel=1e-9)  # the table's own sum
    assert set(model.sources) == {"table"}


def test_the_fit_recovers_layer_terms_and_every_block_the_design_determines(board, monkeypatch):
    """With pair and edge corrections and no ridge (exact data needs none), the layer terms come out exactly, and so
    does every block of a random plan whose terms the designed plans determine (its row is in their row space)."""
    monkeypatch.setattr(kernels, "_RIDGE", 0.0)
    device = AdditiveDevice(corrections=1.0)
    problem = _problem(mlp(), board, device)
    design = design_plans(problem)
    table = profile(problem).table
    terms = Terms(problem.graph, problem.board, problem.compressor)
    for key in _layer_keys(problem):
        assert table.seconds[key] == pytest.approx(device.hidden[key], rel=EXACT), key
    keys = sorted(table.seconds)
    column = {key: j for j, key in enumerate(keys)}

    def row(block: list[str]) -> np.ndarray:
        out = np.zeros(len(keys))
        for key in block:
            out[column[key]] += 1
        return out

    design_rows = np.array([row(block) for plan in design for block in terms.blocks(plan)])
    _, singular, vt = np.linalg.svd(design_rows)
    null = vt[int(np.sum(singular > 1e-9)):]
    rng = np.random.default_rng(7)
    determined = 0
    for _ in range(60):
        plan = problem.random_plan(rng)
        for block, truth, prediction in zip(terms.blocks(plan), _truth(device, problem, plan),
                                            plan_seconds(table, terms, plan)[1]):
            if np.abs(null @ row(block)).max() < 1e-9:
                determined += 1
                assert prediction == pytest.approx(truth, rel=EXACT)
    assert determined > 60


def test_the_designed_plans_determine_every_block_of_random_plans(board, monkeypatch):
    monkeypatch.setattr(kernels, "_RIDGE", 0.0)  # no shrinkage: only what the design leaves undetermined is wrong
    device = AdditiveDevice(corrections=1.0)
    problem = _problem(mlp(), board, device)
    table = profile(problem).table
    terms = Terms(problem.graph, problem.board, problem.compressor)
    rng = np.random.default_rng(7)
    for _ in range(60):
        plan = problem.random_plan(rng)
        assert plan_seconds(table, terms, plan)[1] == pytest.approx(_truth(device, problem, plan), rel=EXACT)


# ---- 2. cache keys ------------------------------------------------------------------------------------
def test_another_device_or_onnx_runtime_starts_a_new_table(board, runs):
    device = AdditiveDevice()
    problem = _problem(mlp(), board, device)
    plans = design_plans(problem)[:4]
    first = profile(problem, plans=plans)
    store = first.store
    assert store.path.is_file() and store.path.parent == runs / "cache" / "kernels"
    assert KernelStore(Device("fake additive device", "1.0-fake")).path == store.path  # the same device: its file
    assert KernelStore(Device("fake additive device", "1.0-fake")).table().blocks == first.table.blocks > 0
    others = [KernelStore(Device("another CPU x8 (x86_64)", "1.0-fake")),
              KernelStore(Device("fake additive device", "1.1-fake")),
              KernelStore(Device("fake additive device", "1.0-fake", simulated=True))]
    assert len({store.path, *(other.path for other in others)}) == 4
    for other in others:
        table = other.table()
        assert not other.path.exists() and table.seconds == {} and table.blocks == 0 and other.entries() == []
    device.onnxruntime = "1.1-fake"  # an upgrade: everything is measured again, into the new file
    again = profile(problem, plans=plans)
    assert (again.measured, again.recalled) == (4, 0) and again.store.path == others[1].path
    device.onnxruntime = "1.0-fake"
    assert (profile(problem, plans=plans).recalled, len(store.entries())) == (4, 4)  # the old table is still there


def test_term_keys_follow_what_the_device_runs_not_which_model_runs_it(board):
    graphs = [LayerGraph(mlp(seed=0, sizes=(64, 96, 80, 10))),
              LayerGraph(mlp(seed=1, sizes=(64, 96, 80, 12))),  # other weights, a wider last layer
              LayerGraph(mlp(seed=0, sizes=(64, 128, 80, 10)))]  # a wider first layer (so a wider input to the second)
    a, b, c = (Terms(g, board, Compressor(g)) for g in graphs)
    fp32, int8 = Decision(precision="fp32", processor="cpu"), Decision(precision="int8", processor="cpu")
    assert graphs[0].fingerprint() != graphs[1].fingerprint()
    for index in (0, 1):  # identical layers of two models: one key
        assert a.layer(index, fp32) == b.layer(index, fp32) and a.layer(index, int8) == b.layer(index, int8)
    assert a.pair(0, fp32, int8) == b.pair(0, fp32, int8) and a.edge(1, int8) == b.edge(1, int8)
    assert a.layer(2, fp32) != b.layer(2, fp32) and a.pair(1, fp32, fp32) != b.pair(1, fp32, fp32)  # a changed layer
    assert a.layer(0, fp32) != c.layer(0, fp32) and a.layer(1, fp32) != c.layer(1, fp32)
    assert a.merge(0, fp32) == b.merge(0, int8)  # one per processor and shape handed over, any model
    rung = Compressor(graphs[0]).ladder(graphs[0].layers[0].name)[1]
    variants = [int8, Decision(precision="fp32", processor="cpu1"), Decision(rung.method, rung.rank, "fp32", "cpu")]
    assert len({a.layer(0, fp32), *(a.layer(0, d) for d in variants)}) == 4  # every part of the decision counts
    assert len({a.layer(0, fp32), a.layer(1, fp32), a.layer(2, fp32)}) == 3

    device = AdditiveDevice()  # profiled on one device, the shared layers' terms pool their blocks
    first = profile(_problem(mlp(seed=0, sizes=(64, 96, 80, 10)), board, device))
    second_problem = _problem(mlp(seed=1, sizes=(64, 96, 80, 12)), board, device)
    second = profile(second_problem)
    assert second.recalled == 0 and second.measured > 0  # another model's plans: measured
    shared = a.layer(0, fp32)
    assert second.table.observed[shared] > first.table.observed[shared]
    assert second.table.observed[a.layer(2, fp32)] == first.table.observed[a.layer(2, fp32)]  # only the first model's


# ---- 3. resumable profiling ----------------------------------------------------------------------------
def test_an_interrupted_profile_resumes_where_it_stopped_and_skips_a_torn_line(board):
    device = AdditiveDevice(parallelism=2)
    problem = _problem(mlp(), board, device)
    problem.baseline_plan()  # measured (and kept in memory) before the count starts: the warm-up needs it
    design = design_plans(problem)
    device.batches.clear()
    step = 2 * PAIRED_GROUP  # plans per batch: a group on each of two servers
    device.interrupt_at = 3  # Ctrl-C in the third batch
    with pytest.raises(KeyboardInterrupt):
        profile(problem)
    assert len(design) > 3 * step and device.measured() == [plan.digest() for plan in design[:2 * step]]
    store = KernelStore(device.device(board))
    assert [entry["plan"] for entry in store.entries()] == device.measured()  # kept as each batch came back

    lines = store.path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 * step
    store.path.write_bytes(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])  # the last write torn
    assert len(KernelStore(device.device(board)).entries()) == 2 * step - 1

    device.batches.clear()
    device.interrupt_at = None
    progress: list[tuple[int, int]] = []
    result = profile(problem, progress=lambda done, total: progress.append((done, total)))
    kept = 2 * step - 1
    assert (result.recalled, result.measured, result.failed) == (kept, len(design) - kept, 0)
    assert device.measured() == [plan.digest() for plan in design[kept:]]  # the torn one again, then the rest
    assert progress[0] == (kept, len(design)) and progress[-1] == (len(design), len(design))
    reread = KernelStore(device.device(board))
    assert sorted(entry["plan"] for entry in reread.entries()) == sorted(plan.digest() for plan in design)

    device.batches.clear()
    done = profile(problem)
    assert (done.recalled, done.measured, device.batches) == (len(design), 0, [])

    device.fingerprint = "the same device, profiled at one go"
    whole = profile(problem).table
    assert whole.blocks == result.table.blocks
    assert whole.seconds.keys() == result.table.seconds.keys()
    assert [whole.seconds[k] for k in sorted(whole.seconds)] == pytest.approx(
        [result.table.seconds[k] for k in sorted(whole.seconds)], rel=1e-6, abs=1e-12)


def test_a_plan_that_cannot_be_measured_fails_alone_and_a_later_profile_tries_it_again(board):
    device = AdditiveDevice()
    problem = _problem(mlp(), board, device)
    design = design_plans(problem)
    spared = {problem.baseline_plan().digest(), kernels.reference_plan(problem).digest()}  # measured in every run
    device.broken = {next(plan.digest() for plan in design[1:] if plan.digest() not in spared)}
    result = profile(problem)
    assert (result.measured, result.failed) == (len(design) - 1, 1)
    assert {entry["plan"] for entry in KernelStore(device.device(board)).entries()} == {
        plan.digest() for plan in design if plan.digest() not in device.broken}
    device.broken = set()
    again = profile(problem)
    assert (again.recalled, again.measured, again.failed) == (len(design) - 1, 1, 0)


def test_a_budget_measures_that_many_plans_and_a_later_profile_the_rest(board, quick_predictor):
    device = AdditiveDevice(parallelism=2)
    problem = _problem(mlp(), board, device)
    design = design_plans(problem)
    first = profile(problem, budget=8)
    assert (first.measured, first.recalled) == (8, 0) and len(set(device.measured()) & {p.digest() for p in design}) == 8
    rest = profile(problem)
    assert (rest.recalled, rest.measured) == (8, len(design) - 8)


# ---- 4. what prices a term the table lacks -------------------------------------------------------------
def test_without_a_table_the_problem_keeps_its_roofline_model_and_is_told_how_to_measure_one(board):
    problem = _problem(mlp(), board, AdditiveDevice())
    model, note = device_cost_model(problem)
    assert model is problem.cost_model and not isinstance(model, KernelCostModel)
    assert note.startswith("roofline model (no kernel table of this device")
    assert f"`explorer profile --board {board.name} --model {problem.graph.source} --measure fake`" in note


def test_terms_of_another_model_come_from_the_predictor(board, quick_predictor):
    device = AdditiveDevice()
    profile(_problem(mlp(seed=0, sizes=(64, 96, 80, 10)), board, device))

    cnn = _problem(small_cnn(), board, device)  # nothing of it measured but the processors' merge terms
    model, note = device_cost_model(cnn)
    assert isinstance(model, KernelCostModel) and model.predictor is not None
    wanted = len(_layer_keys(cnn))
    assert f"{wanted} of the model's {wanted} layer choices are not in the table: predicted by gradient-boosted" in note
    assert "explorer profile" in note
    instance_for(cnn, model)
    assert model.sources["predictor"] >= wanted and model.sources["table"] == 2 and "roofline" not in model.sources
    assert f"{model.sources['predictor']} from the predictor" in model.describe() and "roofline" not in model.describe()

    wider = _problem(mlp(seed=1, sizes=(64, 96, 80, 12)), board, device)  # the last layer changed
    model, note = device_cost_model(wider)
    terms = Terms(wider.graph, board, wider.compressor)
    last = wider.graph.layers[2]
    missing = {terms.layer(2, d) for d in wider.choices(last)}
    assert f"{len(missing)} of the model's {len(_layer_keys(wider))} layer choices are not in the table" in note
    instance_for(wider, model)
    for layer in wider.graph.layers:
        for d in wider.choices(layer):
            key = terms.layer(layer.index, d)
            assert model.source(key) == ("predictor" if key in missing else "table"), (layer.name, d)
    assert model.sources["table"] > 0 and model.sources["predictor"] >= len(missing)
    text = model.describe()
    assert f"{model.sources['table']} from the table" in text and f"{model.sources['predictor']} from the predictor" in text


def test_without_a_predictor_missing_terms_come_from_the_roofline_model(board):
    device = AdditiveDevice()
    mlp_problem = _problem(mlp(), board, device)
    table = profile(mlp_problem).table
    cnn = _problem(small_cnn(), board, device)
    model = KernelCostModel(board, cnn.graph, cnn.compressor, table)  # no predictor
    instance_for(cnn, model)
    assert model.sources["roofline"] > 0 and model.sources["table"] == 2 and "predictor" not in model.sources
    text = model.describe()
    assert f"{model.sources['roofline']} from the roofline" in text
    assert "(the roofline model for terms not in the table: `explorer profile` measures them)" in text
    layer = cnn.graph.layers[0]
    for rung in cnn.compressor.ladder(layer.name)[:2]:  # the roofline's own figure
        assert model.layer_latency_s(layer, rung, "int8", "cpu1") == pytest.approx(
            cnn.cost_model.layer_latency_s(layer, rung, "int8", "cpu1"), rel=1e-12)
    terms = Terms(cnn.graph, board, cnn.compressor)
    first, second = Decision(precision="fp16", processor="cpu"), Decision(precision="int8", processor="cpu")
    assert model.source(terms.pair(0, first, second)) == "roofline"
    assert model.boundary(0, first, second)[0] == pytest.approx(table.seconds.get(terms.merge(0, first), 0.0))  # pair: 0

    with_table = KernelCostModel(board, mlp_problem.graph, mlp_problem.compressor, table)  # its own model: all measured
    with_table.block_seconds(mlp_problem.uniform_plan("cpu1"))
    assert set(with_table.sources) == {"table"} and "roofline" not in with_table.describe()


def test_a_table_too_small_to_predict_from_leaves_missing_terms_to_the_roofline_model(board):
    device = AdditiveDevice()
    small = _problem(mlp(), board, device)
    profile(small, plans=[small.uniform_plan("cpu")])  # one block: three layer terms, too few to predict from
    cnn = _problem(small_cnn(), board, device)
    model, note = device_cost_model(cnn)
    assert isinstance(model, KernelCostModel) and model.predictor is None
    assert "layer choices are not in the table: the roofline model prices them" in note


def test_calibrating_a_kernel_cost_model_leaves_its_measured_terms_alone(board):
    """The measured solver calibrates its cost model after every round of measurements: a kernel table's terms are
    measured already, so the calibrated model prices every plan as before (`explorer profile` adds measurements)."""
    device = AdditiveDevice(corrections=0.0)
    problem = _problem(mlp(), board, device)
    profile(problem)
    model, _ = device_cost_model(problem)
    assert isinstance(model, KernelCostModel)
    plans = [problem.random_plan(np.random.default_rng(9)) for _ in range(5)]
    before = [model.block_seconds(plan) for plan in plans]
    layer = problem.graph.layers[0]
    rung = problem.compressor.ladder(layer.name)[0]
    seconds = model.layer_latency_s(layer, rung, "fp32", "cpu")
    calibrated = model.calibrated([("cpu", layer.kind, "fp32", seconds, 2 * seconds)])
    assert isinstance(calibrated, KernelCostModel) and calibrated.table is model.table
    assert calibrated.layer_latency_s(layer, rung, "fp32", "cpu") == seconds
    assert [calibrated.block_seconds(plan) for plan in plans] == before
    assert [sum(b) for b in before] == pytest.approx([sum(_truth(device, problem, plan)) for plan in plans], rel=EXACT)


# ---- 5. the command line -------------------------------------------------------------------------------
def test_profile_on_the_simulated_board_is_refused_in_one_line(capsys, tmp_path, runs):
    onnx.save(mlp(), tmp_path / "mlp.onnx")
    board_path = write_board(tmp_path / "duo.toml", ["cpu", "cpu1"])
    code = main(["profile", "--model", str(tmp_path / "mlp.onnx"), "--board", str(board_path), "--measure", "sim"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--measure sim: a simulated board needs no kernel table" in err
    assert not (runs / "cache" / "kernels").exists() or not any((runs / "cache" / "kernels").iterdir())



def test_solve_confirms_its_plan_against_the_table_at_the_devices_typical_speed(board):
    device = AdditiveDevice(corrections=0.0)
    problem = _problem(small_cnn(), board, device)
    profile(problem)
    problem.cost_model, problem.cost_model_note = device_cost_model(problem)
    result = solve_measured(problem)
    device.speed = 2.0  # half as fast as while profiling (a busy shared machine)
    confirmation = confirm(problem, [result.plan, *(plan for _, plan in problem.reference_plans())])
    figures = solve_confirmation_json(problem, result, confirmation, at_typical_speed(problem, result.plan))
    assert figures["prediction_error"] == pytest.approx(-0.5, rel=1e-6)  # absolute: the device's speed now
    assert figures["device_speed"] == pytest.approx(2.0, rel=1e-6)
    assert figures["latency_ms_at_typical_speed"] == pytest.approx(figures["latency_ms"] / 2, rel=1e-6)
    assert abs(figures["prediction_error_at_typical_speed"]) < EXACT
    assert figures["no_worse_than_references"]


def test_a_measured_plan_refits_the_table_towards_its_blocks(board):
    """The measured solver's feedback on a kernel table: a plan measured slower than the table said is fitted again
    with its blocks, and the refitted table predicts that plan closer to what was measured (the other plans' terms
    stay measured)."""
    device = AdditiveDevice(corrections=0.0)
    problem = _problem(mlp(), board, device)
    profile(problem)
    model, _ = device_cost_model(problem)
    assert isinstance(model, KernelCostModel)
    plan = problem.random_plan(np.random.default_rng(3))
    truth = _truth(device, problem, plan)
    refitted = model.with_measured([(plan, [2 * seconds for seconds in truth], True)])
    before, after = sum(model.block_seconds(plan)), sum(refitted.block_seconds(plan))
    assert before == pytest.approx(sum(truth), rel=EXACT)
    assert sum(truth) < after < 2 * sum(truth)  # pulled towards the measurement, held by the designed blocks
    assert refitted.table.blocks == model.table.blocks + len(truth) and len(refitted.table.chosen) == len(truth)
    blocks = model.terms.blocks(plan)
    as_designed, _ = fit_terms(model.table.observations + [(keys, 2 * t) for keys, t in zip(blocks, truth)] * MEASURED_WEIGHT)
    assert after > sum(as_designed[key] for keys in blocks for key in keys)  # not weighed down as outliers
    assert model.with_measured([]).block_seconds(plan) == pytest.approx(model.block_seconds(plan), rel=EXACT)
    agreeing = model.with_measured([(plan, truth, True)])  # measured as the table predicts: nothing to correct
    assert agreeing.block_seconds(plan) == pytest.approx(truth, rel=1e-4)
    searched = model.with_measured([(plan, [2 * seconds for seconds in truth], False)])  # a trial at the device's speed
    assert len(searched.table.observations) == len(model.table.observations) + SEARCHED_WEIGHT * len(truth)
    assert not searched.table.chosen and sum(truth) <= sum(searched.block_seconds(plan)) < after  # fitted as designed


def test_solve_goes_on_while_its_plans_miss_their_prediction_and_compares_at_the_typical_speed(board):
    """`explorer solve` on a kernel table: on a device twice as slow as while profiled, an exact table's first plan
    holds (compared at the typical speed: one round); when the device runs that plan's layers 1.5x slower than
    the table says, the prediction misses, the table is refitted with its blocks and the rounds go on (the solver
    agent's rounds, which do not check predictions, stop at the first plan that beats the references)."""
    device = AdditiveDevice(corrections=0.0)
    problem = _problem(small_cnn(), board, device)
    profile(problem)
    problem.cost_model, problem.cost_model_note = device_cost_model(problem)
    device.speed = 2.0
    exact = solve_measured(problem)
    assert len(exact.rounds) == 1
    assert exact.prediction_error(exact.rounds[0][0]) == pytest.approx(0.0, abs=EXACT)

    device.speed = 1.0
    first = exact.plan
    terms = Terms(problem.graph, problem.board, problem.compressor)
    for key in {key for block in terms.blocks(first) for key in block if term_kind(key) == "layer"}:
        device.hidden[key] *= 1.5
    problem = _problem(small_cnn(), board, device)  # measures afresh (a Problem keeps its evaluations)
    problem.cost_model, problem.cost_model_note = device_cost_model(problem)
    assert len(MeasuredSolver(problem).solve().rounds) == 1  # no prediction checked: it still beats the references
    result = solve_measured(problem)
    (solution, _), *later = result.rounds
    assert solution.plan == first and result.prediction_error(solution) < -0.25
    assert later, "a plan that missed its prediction ended the rounds"
    assert set(result.typical_s) == {s.plan.digest() for s, _ in result.rounds}
    assert len({s.plan.digest() for s, _ in result.rounds}) == len(result.rounds)  # a plan measured is not proposed again
    assert result.typical_s[result.plan.digest()] == min(result.typical_s.values())  # the best round at typical speed
