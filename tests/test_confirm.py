"""Confirmation: a search's best plans measured afresh, interleaved with the baseline, and the best picked
from confirmed figures only. The outlier scenarios use a fake measurer (injected latencies, no timing);
the simulated and host runs check that confirmation works through the real measurers."""
import numpy as np
import pytest
from boardbuild import write_board
from netbuild import small_cnn

from explorer.accuracy import AccuracyScorer
from explorer.blockrun import AdaptiveRepeats, ci_within, median_ci
from explorer.boards import load_board
from explorer.confirm import best_confirmed, confirm
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.measure import BlockReport, HostMeasurer, Interleaved, Measurement, Measurer, SimMeasurer
from explorer.plan import Decision
from explorer.problem import Constraints, Objective, Problem

NO_LIMITS = Constraints(latency_ms=None, max_accuracy_drop=None)


class LuckyMeasurer(Measurer):
    """Each plan has a true latency (ms) and energy; plan `lucky`'s first measurement comes out at 0.5 ms (a
    noise outlier the cache keeps). Interleaved rounds are honest: the true figures with 1 % seeded noise."""

    name = "fake"
    simulated = False
    parallelism = 1

    def __init__(self, truth: dict[str, float], lucky: str | None = None, seed: int = 0):
        self.truth, self.lucky, self.rng = truth, lucky, np.random.default_rng(seed)
        self.measured: list[str] = []
        self.interleaved: list[list[str]] = []

    def identity(self, board):
        return "fake-v1"

    def label(self, board):
        return "fake measurer (injected latencies)"

    def int8_exact(self):
        return True

    def _one(self, latency_ms: float, **interval) -> Measurement:
        return Measurement(latency_ms, 0.0, 2.0 * latency_ms, "injected", {"cpu": 1.0},
                           [BlockReport(0, "cpu", [], latency_ms, 0.0, 0.0, 2.0 * latency_ms, 1.0)], self.label(None),
                           **interval)

    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        digest = plan.digest()
        first = digest not in self.measured
        self.measured.append(digest)
        return self._one(0.5 if digest == self.lucky and first else self.truth[digest])

    def measure_interleaved(self, graph, compressor, board, plans, calibration_inputs=None, repeats=5,
                            adaptive=AdaptiveRepeats()) -> list[Interleaved]:
        self.interleaved.append([p.digest() for p in plans])
        rounds = 8
        results = []
        for plan in plans:
            per_round = self.truth[plan.digest()] * self.rng.lognormal(0.0, 0.01, rounds)
            whole = self._one(float(np.median(per_round)), latency_ci_ms=median_ci(per_round), ci_confidence=0.95,
                              ci_target=adaptive.target, ci_target_met=ci_within(per_round, adaptive.target),
                              repeats=rounds)
            results.append(Interleaved(whole, [self._one(float(v)) for v in per_round]))
        return results


@pytest.fixture
def board(tmp_path):
    return load_board(str(write_board(tmp_path / "cpuboard.toml", ["cpu", "cpu1"], threads=[1, 1])))


def _problem(board, measurer, constraints=NO_LIMITS, objective="latency") -> Problem:
    graph = LayerGraph(small_cnn())
    return Problem(graph, board, measurer, AccuracyScorer(graph.model, None), constraints, Objective.parse(objective),
                   use_disk_cache=False)


def _plans(problem):
    """The baseline (all on cpu) and two candidates: x (one layer moved) and y (another moved)."""
    base = problem.uniform_plan("cpu")
    x = base.with_decision(problem.graph.layers[1].name, Decision(processor="cpu1"))
    y = base.with_decision(problem.graph.layers[2].name, Decision(processor="cpu1"))
    return base, x, y


def _lucky_setup(board, constraints=NO_LIMITS, objective="latency"):
    probe = _problem(board, SimMeasurer())
    base, x, y = _plans(probe)
    truth = {base.digest(): 1.0, x.digest(): 1.1, y.digest(): 0.9, probe.uniform_plan("cpu1").digest(): 1.3}
    measurer = LuckyMeasurer(truth, lucky=x.digest())
    return _problem(board, measurer, constraints, objective), measurer, base, x, y


def test_confirmation_discards_a_lucky_outlier_and_picks_the_best_confirmed_plan(board):
    problem, measurer, base, x, y = _lucky_setup(board)
    searched = problem.evaluate_many([base, x, y])
    assert min(searched, key=lambda e: e.objective).plan_digest == x.digest()  # x looks best from its one figure
    measured_before = list(measurer.measured)
    confirmation = confirm(problem, [x, y], base)
    assert measurer.measured == measured_before  # nothing recalled or measured one by one: only fresh rounds
    assert measurer.interleaved == [[base.digest(), x.digest(), y.digest()]]  # the baseline first, in one run
    by_plan = {p.plan.digest(): p for p in confirmation.plans}
    cx, cy, cb = by_plan[x.digest()], by_plan[y.digest()], confirmation.baseline
    assert cb.is_baseline and cb.ratio == 1.0 and cb.ratio_ci == (1.0, 1.0)
    assert cx.searched.latency_ms == 0.5 and cx.latency_ms == pytest.approx(1.1, rel=0.03)  # ranked honestly
    assert cx.ratio == pytest.approx(1.1, rel=0.03) and cx.ratio_ci[0] > 1.0 and not cx.beats_baseline
    assert cy.ratio == pytest.approx(0.9, rel=0.03) and cy.ratio_ci[1] < 1.0 and cy.beats_baseline
    assert best_confirmed(confirmation) is cy and confirmation.best() is cy
    assert cy.target_met and cy.rounds == 8 and not confirmation.simulated
    summary = confirmation.to_json()
    assert summary["best"] == y.digest() and summary["plans"][1]["searched_latency_ms"] == 0.5


def test_when_every_candidate_loses_on_confirmation_the_baseline_is_best(board):
    problem, _, base, x, _ = _lucky_setup(board)
    problem.evaluate(x)  # the lucky 0.5 ms
    confirmation = confirm(problem, [x, base, x], base)
    assert [p.plan.digest() for p in confirmation.plans] == [base.digest(), x.digest()]  # once each
    assert confirmation.best().is_baseline


def test_feasibility_is_judged_on_the_confirmed_latency(board):
    problem, _, base, x, y = _lucky_setup(board, Constraints(latency_ms=0.95, max_accuracy_drop=None))
    assert problem.evaluate(x).feasible  # 0.5 ms in the search
    confirmation = confirm(problem, [x, y], base)
    feasible = {p.plan.digest(): p.feasible for p in confirmation.plans}
    assert feasible == {base.digest(): False, x.digest(): False, y.digest(): True}
    assert "latency" in confirmation.plans[1].evaluation.violations[0]
    assert confirmation.best().plan.digest() == y.digest()
    tight, _, base, x, _ = _lucky_setup(board, Constraints(latency_ms=0.5, max_accuracy_drop=None))
    assert best_confirmed(confirm(tight, [x], base)) is None  # nothing feasible: nothing reported as best


def test_a_weighted_objective_is_confirmed_as_weighted_paired_ratios(board):
    problem, _, base, _, y = _lucky_setup(board, objective="energy:0.5,latency:0.5")
    confirmed = confirm(problem, [y], base).plans[1]
    # the fake's energy is twice its latency: every per-round ratio is the same for both metrics
    assert confirmed.latency_ratio == pytest.approx(confirmed.energy_ratio)
    assert confirmed.ratio == pytest.approx(confirmed.latency_ratio)


def test_a_measurer_without_interleaved_measurement_cannot_confirm(board):
    class OneAtATime:
        name, simulated, parallelism = "one", False, 1

        def identity(self, board):
            return "one"

        def label(self, board):
            return "one"

    problem = _problem(board, SimMeasurer())
    problem.measurer = OneAtATime()
    with pytest.raises(ExplorerError, match="cannot confirm"):
        confirm(problem, [], problem.uniform_plan("cpu"))


def test_simulated_confirmation_uses_the_simulators_noise_and_says_so():
    graph = LayerGraph(small_cnn())
    problem = Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=3), AccuracyScorer(graph.model, None), NO_LIMITS,
                      Objective.parse("energy"), use_disk_cache=False)
    candidate = problem.uniform_plan("cpu").with_decision(graph.layers[2].name, Decision(processor="gpu"))
    first, again = confirm(problem, [candidate]), confirm(problem, [candidate])
    assert first.simulated and "simulated" in first.measured_by
    assert first.to_json()["plans"] == again.to_json()["plans"]  # seeded: the same figures again
    plan = first.plans[1]
    assert plan.rounds >= 6 and plan.measurement.repeats == 5 * plan.rounds and plan.latency_ci_ms is not None
    assert plan.ratio == pytest.approx(plan.energy_ratio)  # the objective is energy


def test_host_confirmation_measures_real_rounds(board):
    problem = _problem(board, HostMeasurer(warmup=1))
    base, x, _ = _plans(problem)
    confirmation = confirm(problem, [x], base, adaptive=AdaptiveRepeats(max_seconds=2.0))
    assert not confirmation.simulated and "interleaved" in confirmation.measured_by
    for plan in confirmation.plans:
        m = plan.measurement
        assert plan.rounds >= 1 and m.repeats == 5 * plan.rounds and m.passes_per_repeat >= 1
        assert m.ci_target == 0.03 and m.others_cores is not None and m.latency_ms > 0
        assert m.latency_ci_ms is None or m.latency_ci_ms[0] <= m.latency_ms <= m.latency_ci_ms[1]
    assert confirmation.baseline.ratio == 1.0 and confirmation.best() is not None
