"""How sure a measurement is: the median's distribution-free interval, repeats that adapt until it is tight
(or a cap), interleaved timing, and measurements that keep their interval in the cache. Times are injected
through a fake clock: nothing here asserts on real timings."""
import itertools

import numpy as np
import onnxruntime as ort
import pytest
from netbuild import small_cnn
from onnx import TensorProto, helper
from scipy import stats

from explorer import blockrun
from explorer.accuracy import AccuracyScorer
from explorer.blockrun import (
    AdaptiveRepeats,
    BlockSpec,
    BlockTimes,
    EnergyCounter,
    ci_within,
    median_ci,
    median_ci_ranks,
    min_samples,
    rounds_met,
    time_blocks,
    time_interleaved,
)
from explorer.boards import load_board
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.measure import BlockReport, Measurement, SimMeasurer
from explorer.problem import Constraints, Objective, Problem


def _matmul_block(n: int = 8) -> bytes:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [n, n], np.ones(n * n, np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


INPUTS = {"x": np.ones((1, 8), np.float32)}


class FakeClock:
    """Returns its time, then moves on by the next step: a timed run (two reads) lasts one step."""

    def __init__(self, steps):
        self.steps = iter(steps)
        self.now = 0.0

    def __call__(self) -> float:
        now = self.now
        self.now += next(self.steps)
        return now


def lognormal_steps(sigma: float, seed: int = 0, scale: float = 1e-3):
    rng = np.random.default_rng(seed)
    while True:
        yield float(scale * rng.lognormal(0.0, sigma))


# ---- the interval of the median -------------------------------------------------------------------
def test_median_interval_ranks_are_the_order_statistics_of_the_tables():
    assert median_ci_ranks(5) is None and min_samples() == 6  # 1 - 2 / 2^5 = 93.75 % < 95 %
    assert median_ci_ranks(6) == (0, 5)  # x(1)..x(6): 96.9 %
    assert median_ci_ranks(10) == (1, 8)  # x(2)..x(9): 97.9 %
    assert median_ci_ranks(15) == (3, 11)  # x(4)..x(12): 96.5 %
    assert median_ci_ranks(100) == (39, 60)  # x(40)..x(61)
    assert median_ci_ranks(10, 0.99) == (0, 9) and min_samples(0.99) == 8
    values = np.random.default_rng(0).permutation(np.arange(10.0))
    assert median_ci(values) == (1.0, 8.0) and median_ci(values[:5]) is None


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_median_interval_is_the_narrowest_that_covers_by_the_binomial(confidence):
    for n in [*range(1, 400), 1000, 2999, 10_000]:
        ranks = median_ci_ranks(n, confidence)
        if ranks is None:
            assert 1 - 2 * stats.binom.cdf(0, n, 0.5) < confidence
            continue
        k = ranks[0]
        assert ranks[1] == n - 1 - k
        assert 1 - 2 * stats.binom.cdf(k, n, 0.5) >= confidence  # x(k+1)..x(n-k) covers
        assert 1 - 2 * stats.binom.cdf(k + 1, n, 0.5) < confidence  # one rank narrower does not


def test_interval_within_target_is_relative_to_the_median():
    tight = np.full(20, 1.0) + np.linspace(-0.02, 0.02, 20)
    assert ci_within(tight, 0.03) and not ci_within(tight, 0.001) and not ci_within(tight[:5], 0.5)
    # one huge outlier moves the order statistics by one rank, not the interval's width
    assert ci_within(np.append(tight, 1000.0), 0.03)


def test_adaptive_repeats_check_their_settings():
    for bad in (dict(target=0.0), dict(confidence=1.0), dict(max_seconds=0), dict(max_repeats=0), dict(min_repeat_ms=-1)):
        with pytest.raises(ExplorerError, match="adaptive repeats need"):
            AdaptiveRepeats(**bad)
    with pytest.raises(ExplorerError, match="no setting repeat"):
        AdaptiveRepeats.from_json({"repeat": 3})
    assert AdaptiveRepeats.from_json(AdaptiveRepeats(target=0.05).to_json()) == AdaptiveRepeats(target=0.05)


# ---- adaptive repeats ---------------------------------------------------------------------------------
def _rounds(first: int, total: int) -> list[int]:
    """Repeat counts at the round boundaries when the cap is far: each round adds half as many again."""
    counts = [first]
    while counts[-1] < total:
        counts.append(counts[-1] + max(1, counts[-1] // 2))
    return counts


def test_repeats_stop_at_the_first_round_whose_interval_is_tight():
    adaptive = AdaptiveRepeats(target=0.03, min_repeat_ms=0, max_seconds=86_400)
    times = time_blocks([BlockSpec(_matmul_block())], INPUTS, 0, 15, adaptive=adaptive,
                        clock=FakeClock(lognormal_steps(0.15)))
    totals = times.seconds.sum(axis=1)
    counts = _rounds(15, len(totals))
    assert counts[-1] == len(totals) > 15 and times.number == 1  # it had to add rounds ...
    assert ci_within(totals, 0.03)  # ... stopped once tight ...
    assert not any(ci_within(totals[:n], 0.03) for n in counts[:-1])  # ... and not before
    # identical steps: tight at once
    steady = time_blocks([BlockSpec(_matmul_block())], INPUTS, 0, 15, adaptive=adaptive, clock=FakeClock(iter(lambda: 1e-3, None)))
    assert steady.seconds.shape == (15, 1)


def test_repeats_stop_at_the_time_cap_or_the_repeat_cap_when_the_interval_stays_wide():
    clock = FakeClock(lognormal_steps(1.5))
    capped = time_blocks([BlockSpec(_matmul_block())], INPUTS, 0, 15, clock=clock,
                         adaptive=AdaptiveRepeats(min_repeat_ms=0, max_seconds=0.2))
    assert not ci_within(capped.seconds.sum(axis=1), 0.03) and clock.now >= 0.2 and len(capped.seconds) > 15
    counted = time_blocks([BlockSpec(_matmul_block())], INPUTS, 0, 15, clock=FakeClock(lognormal_steps(1.5)),
                          adaptive=AdaptiveRepeats(min_repeat_ms=0, max_seconds=86_400, max_repeats=40))
    assert len(counted.seconds) == 40  # 15, 22, 33, then 7 to the cap of 40


def test_a_repeat_averages_enough_passes_to_last_min_repeat_ms():
    times = time_blocks([BlockSpec(_matmul_block())], INPUTS, 0, 15, clock=FakeClock(iter(lambda: 0.3e-3, None)),
                        adaptive=AdaptiveRepeats(min_repeat_ms=1.0))
    assert times.number == 4 and np.allclose(times.seconds, 0.3e-3)  # the mean of 4 passes of 0.3 ms
    # one preempted warm-up pass (5 ms) does not set the number: the median warm-up pass does
    steps = itertools.chain([5e-3, 1e-6, 0.3e-3, 1e-6, 0.3e-3], iter(lambda: 0.3e-3, None))
    warmed = time_blocks([BlockSpec(_matmul_block())], INPUTS, 3, 15, clock=FakeClock(steps),
                         adaptive=AdaptiveRepeats(min_repeat_ms=1.0))
    assert warmed.number == 4
    fixed = time_blocks([BlockSpec(_matmul_block())], INPUTS, 0, 7)
    assert fixed.number == 1 and fixed.seconds.shape == (7, 1)  # without `adaptive`: exactly the repeats asked


def test_a_timing_reports_other_processes_cpu_use(monkeypatch):
    ticks = iter([[100, 0, 0, 1000, 0, 0, 0, 0, 0], [100 + 10**6, 0, 0, 1000, 0, 0, 0, 0, 0]])
    monkeypatch.setattr(blockrun, "cpu_times", lambda: next(ticks))  # the machine all busy meanwhile
    times = time_blocks([BlockSpec(_matmul_block())], INPUTS, 0, 3)
    assert times.others_cores > blockrun.BUSY_CORES


# ---- interleaved timing ---------------------------------------------------------------------------------
def test_interleaved_rounds_rotate_and_stop_when_every_interval_and_ratio_is_tight(monkeypatch):
    widths, order = (8, 16, 32), []
    init, timed = blockrun._Chain.__init__, blockrun._Chain.timed

    def labelled(self, sessions, inputs, run_options):
        init(self, sessions, inputs, run_options)
        self.chain = widths.index(inputs["x"].shape[1])

    monkeypatch.setattr(blockrun._Chain, "__init__", labelled)
    monkeypatch.setattr(blockrun._Chain, "timed", lambda self, *args: order.append(self.chain) or timed(self, *args))
    chains = [([BlockSpec(_matmul_block(n))], {"x": np.ones((1, n), np.float32)}) for n in widths]
    times = time_interleaved(chains, 0, 5, AdaptiveRepeats(min_repeat_ms=0, max_seconds=86_400),
                             clock=FakeClock(iter(lambda: 1e-3, None)))
    rounds = min_samples()  # identical steps: tight as soon as the per-round ratios have an interval
    assert order == [i % 3 for start in range(rounds) for i in range(start, start + 3)]  # A B C, B C A, C A B, ...
    assert all(t.seconds.shape == (5 * rounds, 1) and t.round_count == rounds for t in times)
    assert times[1].rounds == [j for j in range(rounds) for _ in range(5)] and times[0].round(2).seconds.shape == (5, 1)
    assert all(t.peak_memory_mb is None for t in times)  # one process held every chain: no per-plan figure


def test_each_chain_runs_one_untimed_pass_before_its_repeats_in_every_round(monkeypatch):
    """The first pass after another chain ran is cold; a plan deployed runs warm, pass after pass."""
    events = []
    run_pass, timed = blockrun._Chain.run_pass, blockrun._Chain.timed
    monkeypatch.setattr(blockrun._Chain, "run_pass", lambda self: events.append(("pass", id(self))) or run_pass(self))
    monkeypatch.setattr(blockrun._Chain, "timed", lambda self, *args: events.append(("timed", id(self))) or timed(self, *args))
    chains = [([BlockSpec(_matmul_block(n))], {"x": np.ones((1, n), np.float32)}) for n in (8, 16)]
    times = time_interleaved(chains, 0, 5, AdaptiveRepeats(min_repeat_ms=0, max_seconds=86_400, max_repeats=15),
                             clock=FakeClock(iter(lambda: 1e-3, None)))
    rounds = times[0].round_count
    assert [kind for kind, _ in events] == ["pass", "timed"] * (2 * rounds)
    assert all(events[k][1] == events[k + 1][1] for k in range(0, len(events), 2))  # warmed, then timed: the same chain


def test_interleaved_timing_reads_energy_per_chain_and_round(monkeypatch):
    spent = []

    class CountingSession(ort.InferenceSession):
        def run(self, names, feed, *args):
            spent.append(1000.0 * next(iter(feed.values())).shape[1] / 8)  # 1 mJ a pass for width 8, 2 for 16
            return super().run(names, feed, *args)

    monkeypatch.setattr(blockrun.ort, "InferenceSession", CountingSession)
    counter = EnergyCounter("fake counter", lambda: float(sum(spent)))
    monkeypatch.setattr(blockrun, "energy_counters", lambda providers: ([counter], None))
    chains = [([BlockSpec(_matmul_block(n))], {"x": np.ones((1, n), np.float32)}) for n in (8, 16)]
    times = time_interleaved(chains, 1, 5, AdaptiveRepeats(min_repeat_ms=0, max_seconds=86_400, max_repeats=15),
                             clock=FakeClock(iter(lambda: 1e-3, None)))
    assert [t.energy_uj_by_round for t in times] == [[5000.0] * 3, [10000.0] * 3]  # capped at 3 rounds of 5
    assert times[0].energy_uj == 15000.0 and times[0].energy_source == "fake counter"


def test_rounds_met_needs_tight_medians_and_tight_paired_ratios():
    adaptive = AdaptiveRepeats()
    steady = [np.full(5, 1.0)] * 6
    drifting = [np.full(5, 1.0 + 0.1 * j) for j in range(6)]
    assert rounds_met([steady, [2 * r for r in steady]], adaptive)
    assert not rounds_met([steady[:5], steady[:5]], adaptive)  # five rounds: no interval of the ratio yet
    assert rounds_met([steady], adaptive)  # one chain: no ratio to check
    # both drift together: each median is loose, but their paired ratios are exact
    assert not rounds_met([drifting, [2 * r for r in drifting]], adaptive)
    assert rounds_met([drifting, [2 * r for r in drifting]], AdaptiveRepeats(target=0.3))
    assert not rounds_met([steady, drifting], AdaptiveRepeats(target=0.15))  # medians tight enough, ratio not


# ---- measurements keep their interval ---------------------------------------------------------------
OLD_CACHED = {"latency_ms": 0.252, "latency_spread_ms": 0.115, "energy_mj": 1.0, "energy_source": "modelled",
              "memory_mb_by_processor": {"cpu": 1.0}, "measured_by": "host (median of 15)", "peak_memory_mb": None,
              "blocks": [{"index": 0, "processor": "cpu", "layers": ["a"], "latency_ms": 0.252, "spread_ms": 0.1,
                          "transfer_ms": 0.0, "energy_mj": 1.0, "weight_mb": 1.0}]}


def test_measurements_cached_before_the_interval_existed_still_load():
    old = Measurement.from_json(OLD_CACHED)
    assert old.latency_ms == 0.252 and old.latency_ci_ms is None and old.ci_target_met is None and old.repeats is None
    assert not old.busy and old.caveats() == [] and old.recalled() == old


def test_a_measurement_round_trips_its_interval():
    m = Measurement(1.0, 0.1, 2.0, "modelled", {"cpu": 1.0}, [BlockReport(0, "cpu", ["a"], 1.0, 0.1, 0.0, 2.0, 1.0)],
                    "host", latency_ci_ms=(0.9, 1.1), ci_confidence=0.95, ci_target=0.03, ci_target_met=False,
                    repeats=120, passes_per_repeat=4, others_cores=1.4)
    back = Measurement.from_json(m.to_json())
    assert back == m and back.latency_ci_ms == (0.9, 1.1) and back.busy
    notes = back.caveats()
    assert "+/-10.0 %, missed the +/-3 % target" in notes[0] and "1.4 cores" in notes[1]


def test_a_recalled_loose_or_busy_measurement_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path))
    graph = LayerGraph(small_cnn())

    def problem():
        return Problem(graph, load_board("tegra-k1"), SimMeasurer(), AccuracyScorer(graph.model, None),
                       Constraints(latency_ms=None, max_accuracy_drop=None), Objective.parse("latency"))

    first = problem()
    plan, other = first.uniform_plan("cpu"), first.uniform_plan("gpu")
    fresh = first.evaluate(plan)
    assert "cached" not in fresh.measured_by
    loose = Measurement.from_json({**first._measurements.get(plan.digest()), "latency_ci_ms": [0.5, 2.0],
                                   "ci_confidence": 0.95, "ci_target": 0.03, "ci_target_met": False, "others_cores": 1.2})
    first._measurements.put(plan.digest(), loose.to_json())
    first.evaluate(other)
    again = problem()
    recalled = again.evaluate(plan)
    assert again.evaluations == 0 and recalled.latency_ms == loose.latency_ms
    assert "[cached: its 95 % interval" in recalled.measured_by and "missed the +/-3 % target" in recalled.measured_by
    assert "other processes used 1.2 cores" in recalled.measured_by
    assert "cached" not in again.evaluate(other).measured_by  # a sure figure is recalled as it was


def test_block_times_from_an_older_agent_load():
    old = {"seconds": [[0.001], [0.002]], "energy_uj": None, "energy_source": "none", "peak_memory_mb": 50.0,
           "providers": [["CPUExecutionProvider"]]}
    times = BlockTimes.from_json(old)
    assert times.number == 1 and times.others_cores is None and times.rounds is None and times.round_count == 0
    full = BlockTimes(np.ones((4, 1)), 8.0, "x", None, [["CPUExecutionProvider"]], 3, 0.5, [0, 0, 1, 1], [4.0, 4.0])
    back = BlockTimes.from_json(full.to_json())
    assert back.number == 3 and back.rounds == [0, 0, 1, 1] and back.round(1).energy_uj == 4.0
