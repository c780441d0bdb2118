"""Confirmation: a search's best plans measured again, interleaved with the baseline, before any is reported.

A search keeps the one figure each plan got, and the best of many noisy figures is biased low (the
winner's curse: a plan with one lucky measurement wins). So the figures a search reports are confirmed:
the candidates and the baseline are measured afresh - never recalled from the cache, and not written to
it - interleaved in rounds (A B C, B C A, ...) in one run on one device, so that background load and
drift hit all alike, until every plan's interval of the median latency and its per-round ratio to the
baseline are within the target (+/-3 % at 95 %) or a time cap (30 s). The ratio to the baseline is the
median of the per-round paired ratios of the problem's objective, with its distribution-free interval
(order statistics, as for the median latency: explorer.blockrun.median_ci). `best_confirmed` picks the
feasible plan with the lowest confirmed ratio, the baseline included: a candidate that loses on
confirmation is never the best. Simulated boards confirm with the simulator's noise and say so.

    confirmation = confirm(problem, [plan_a, plan_b])  # the baseline: problem.baseline_plan()
    best = best_confirmed(confirmation)                # None when no plan is feasible
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from explorer.blockrun import AdaptiveRepeats, ci_within, median_ci
from explorer.errors import ExplorerError
from explorer.measure import Interleaved, Measurement, Measurer
from explorer.plan import Plan
from explorer.problem import Evaluation, Problem, metric_value

# Confirmation aims for the interval a search's measurements aim for, with a cap for the whole run (all plans).
CONFIRM_REPEATS = AdaptiveRepeats(max_seconds=30.0)
REPEATS_PER_ROUND = 5  # each plan's repeats in one round (a round's median pairs with the baseline's)


@dataclass
class ConfirmedPlan:
    """One plan as confirmation measured it (ratios: this plan over the baseline, < 1 is better)."""

    plan: Plan
    is_baseline: bool
    measurement: Measurement  # fresh: median over all rounds, its interval, repeats, target met, load;
    #                           energy: median of the rounds'
    evaluation: Evaluation  # the problem's scoring of that measurement: feasibility, accuracy, memory, objective
    searched: Evaluation | None  # what the search had for this plan (memory or disk cache), None if nothing
    rounds: int
    ratio: float  # objective ratio: median of the per-round paired ratios (a weighted objective: weighted ratios)
    ratio_ci: tuple[float, float] | None  # its interval (None: too few rounds)
    latency_ratio: float
    latency_ratio_ci: tuple[float, float] | None
    energy_ratio: float
    energy_ratio_ci: tuple[float, float] | None
    target_met: bool  # the latency interval and the latency-ratio interval both got within the target

    @property
    def latency_ms(self) -> float:
        return self.measurement.latency_ms

    @property
    def latency_ci_ms(self) -> tuple[float, float] | None:
        return self.measurement.latency_ci_ms

    @property
    def energy_mj(self) -> float:
        return self.measurement.energy_mj

    @property
    def feasible(self) -> bool:
        return self.evaluation.feasible

    @property
    def beats_baseline(self) -> bool:
        """Better than the baseline with the whole interval of its ratio (not just by its median)."""
        return not self.is_baseline and self.ratio_ci is not None and self.ratio_ci[1] < 1.0

    def to_json(self) -> dict:
        m, searched = self.measurement, self.searched
        return {"plan_digest": self.plan.digest(), "baseline": self.is_baseline, "feasible": self.feasible,
                "violations": self.evaluation.violations, "latency_ms": m.latency_ms, "latency_ci_ms": m.latency_ci_ms,
                "energy_mj": m.energy_mj, "energy_source": m.energy_source, "objective": self.evaluation.objective,
                "ratio": self.ratio, "ratio_ci": self.ratio_ci, "latency_ratio": self.latency_ratio,
                "latency_ratio_ci": self.latency_ratio_ci, "energy_ratio": self.energy_ratio,
                "energy_ratio_ci": self.energy_ratio_ci, "beats_baseline": self.beats_baseline, "rounds": self.rounds,
                "repeats": m.repeats, "target_met": self.target_met, "busy": m.busy, "others_cores": m.others_cores,
                "searched_latency_ms": searched.latency_ms if searched else None,
                "searched_objective": searched.objective if searched else None}


@dataclass
class Confirmation:
    """The outcome of one confirmation run."""

    plans: list[ConfirmedPlan]  # the baseline first, then the candidates in the order given (repeats dropped)
    objective: str
    measured_by: str
    simulated: bool  # the simulator's noise, not a measurement of hardware
    seconds: float  # wall time of the run

    @property
    def baseline(self) -> ConfirmedPlan:
        return self.plans[0]

    @property
    def busy(self) -> bool:
        """Other processes kept the machine busy during the run (the ratios are paired, the absolute figures less sure)."""
        return any(p.measurement.busy for p in self.plans)

    def best(self) -> ConfirmedPlan | None:
        return best_confirmed(self)

    def to_json(self) -> dict:
        best = self.best()
        return {"objective": self.objective, "measured_by": self.measured_by, "simulated": self.simulated,
                "seconds": self.seconds, "busy": self.busy, "best": best.plan.digest() if best else None,
                "plans": [p.to_json() for p in self.plans]}


def confirm(problem: Problem, candidates: list[Plan], baseline: Plan | None = None,
            repeats: int = REPEATS_PER_ROUND, adaptive: AdaptiveRepeats = CONFIRM_REPEATS) -> Confirmation:
    """Measure `candidates` and `baseline` (default: the problem's baseline plan) afresh, interleaved, through
    the problem's measurer (its `measure_interleaved`), and score them by the problem's constraints and
    objective. MeasurementFailed when the measurer cannot measure them now (e.g. no measurement server could)."""
    if repeats < 1:
        raise ExplorerError(f"confirmation needs at least 1 repeat per round (got {repeats})")
    measurer = problem.measurer
    # a measurer registered by a user may not implement it (the protocol's own is a stub)
    if getattr(type(measurer), "measure_interleaved", Measurer.measure_interleaved) is Measurer.measure_interleaved:
        raise ExplorerError(f"the {measurer.name} measurer cannot confirm plans: it has no measure_interleaved")
    baseline = baseline or problem.baseline_plan()
    plans = list({plan.digest(): plan for plan in [baseline, *candidates]}.values())  # baseline first, once each
    for plan in plans:
        problem.validate(plan)
    searched = [problem._recalled(plan) for plan in plans]  # for comparison only: nothing below reads them
    started = time.perf_counter()
    results: list[Interleaved] = measurer.measure_interleaved(  # the protocol types calibration_inputs narrower
        problem.graph, problem.compressor, problem.board, plans,  # than Problem holds them (one array per input)
        problem.calibration_inputs, repeats, adaptive)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    base_rounds = results[0].rounds
    confirmed = []
    for index, (plan, result, before) in enumerate(zip(plans, results, searched)):
        if len(result.rounds) != len(base_rounds):
            raise ExplorerError(f"the {measurer.name} measurer returned {len(result.rounds)} rounds for one plan and "
                                f"{len(base_rounds)} for the baseline: interleaved rounds must pair")
        ratios = {name: np.array([_metric(name, r) / max(_metric(name, b), 1e-12)
                                  for r, b in zip(result.rounds, base_rounds)]) for name in ("latency", "energy", "memory")}
        weights = problem.objective.weights
        objective = np.asarray(sum(w * ratios[name] for name, w in weights) / sum(w for _, w in weights))
        measurement = result.measurement
        if result.rounds:  # the rounds' median energy: one round's counter glitch does not move it
            measurement = replace(measurement, energy_mj=float(np.median([r.energy_mj for r in result.rounds])))
        evaluation = problem._score(plan, plan.digest(), measurement)
        evaluation.objective = problem.objective_value(evaluation)
        tight = bool(measurement.ci_target_met) and (index == 0 or ci_within(ratios["latency"], adaptive.target,
                                                                            adaptive.confidence))
        confirmed.append(ConfirmedPlan(
            plan, index == 0, measurement, evaluation, before, len(result.rounds),
            *_median_and_ci(objective, adaptive), *_median_and_ci(ratios["latency"], adaptive),
            *_median_and_ci(ratios["energy"], adaptive), tight))
    return Confirmation(confirmed, problem.objective.describe(), results[0].measurement.measured_by,
                        bool(measurer.simulated), seconds)


def best_confirmed(confirmation: Confirmation) -> ConfirmedPlan | None:
    """The feasible plan with the lowest confirmed objective ratio, the baseline included (a tie goes to the
    baseline: no gain is claimed without one); None when no plan is feasible. Only confirmed figures count:
    a plan that looked best in the search but loses here is not picked."""
    feasible = [p for p in confirmation.plans if p.feasible]
    return min(feasible, key=lambda p: (p.ratio, not p.is_baseline)) if feasible else None


def _metric(name: str, m: Measurement) -> float:
    return metric_value(name, m.latency_ms, m.energy_mj, sum(m.memory_mb_by_processor.values()))


def _median_and_ci(values: np.ndarray, adaptive: AdaptiveRepeats) -> tuple[float, tuple[float, float] | None]:
    if len(values) == 0:
        raise ExplorerError("confirmation measured no rounds")
    return float(np.median(values)), median_ci(values, adaptive.confidence)
