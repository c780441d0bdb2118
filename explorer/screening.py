"""Screening: on a real device, device measurements go to the plans the kernel table ranks near the best.

A search on a real device (`not problem.measurer.simulated`) whose cost model is the device's measured kernel
table (`explorer.kernels.KernelCostModel`) predicts every new plan an agent proposes before it is measured, and
answers some with the prediction instead (`Screen`). The budget counts device measurements; the predictions a
search made instead are counted beside them (`SearchResult.predicted`) and reported with them. A predicted
Evaluation says so (`Evaluation.predicted`, its `measured_by`) and never becomes a trial: it is never the best
plan, never confirmed, never cached as a measurement, never exported, never on a best-so-far curve. A simulated
board has no screening: its simulator is the device, and every plan is simulated and labelled so.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from explorer.kernels import KernelCostModel
from explorer.measure import Measurement

if TYPE_CHECKING:
    from explorer.plan import Plan
    from explorer.problem import Evaluation, Problem

#: The least margin: the kernel table's plan predictions, checked on held-out plans (`explorer.kernels.check`), are
#: typically within a few per cent, and a device's run-to-run noise is about as large.
MIN_MARGIN = 0.05
#: The margin follows this quantile of the relative errors (prediction / measurement - 1) seen on measured plans.
ERROR_QUANTILE = 0.9
#: Predictions a search may make per unit of its budget; then every plan is measured, so that a search ends.
PREDICTIONS_PER_MEASUREMENT = 20


class Screen:
    """Whether a new plan is measured on the device or answered with the kernel table's prediction.

    The prediction (`predict`) is the cost model's latency, energy and weight memory of the plan (`plan_prediction`),
    its accuracy scored for real (it is not a device measurement), scored by `Problem.score` as a measured plan is.
    A plan is answered with it (`skips`), and no device measurement is spent on it, when:

    * it breaks the accuracy limit: its accuracy is scored for real, so no measurement can make it feasible; or
    * a feasible plan has been measured, the table priced every term of the plan (the prediction is sure), and it
      is predicted worse than the best measured objective by more than the margin, or past a latency or memory
      limit by more than the margin.

    Otherwise it is measured: before any feasible measurement, when the prediction is unsure (a term came from the
    fitted predictor or the roofline model), and near the best. The margin is the larger of MIN_MARGIN and the
    ERROR_QUANTILE of the worst relative error (objective, latency, weight memory) of the sure predictions of the
    plans measured so far (the reference plans first), so a table that misjudges this device screens less. After
    PREDICTIONS_PER_MEASUREMENT x the budget predictions every plan is measured. The reference plans are always
    measured (`BudgetedProblem` never asks).
    """

    def __init__(self, problem: Problem, cost_model: KernelCostModel, budget: int):
        self.problem, self.cost_model = problem, cost_model
        self.cap = PREDICTIONS_PER_MEASUREMENT * budget
        self.answered = 0  # plans answered with their prediction
        self.errors: list[float] = []  # per measured plan with a sure prediction: its worst relative error

    @staticmethod
    def off_reason(problem: Problem) -> str | None:
        """Why a search of `problem` measures every plan (None: it screens)."""
        if problem.measurer.simulated:
            return "a simulated board: the simulator is the device, every plan is simulated"
        if not isinstance(problem.cost_model, KernelCostModel):
            return "no kernel table of this device to predict with (`explorer profile` measures one)"
        if not problem.screening:
            return "turned off (--no-screen)"
        return None

    @classmethod
    def for_problem(cls, problem: Problem, budget: int) -> Screen | None:
        """The screen of a search of `problem` with `budget` device measurements (None: every plan is measured)."""
        if cls.off_reason(problem) is not None:
            return None
        assert isinstance(problem.cost_model, KernelCostModel)  # off_reason said so
        return cls(problem, problem.cost_model, budget)

    @classmethod
    def setting(cls, problem: Problem) -> str:
        """Screening of a search of `problem` in words: the rule, or why it is off."""
        reason = cls.off_reason(problem)
        return f"off: {reason}" if reason else "on: " + RULE.format(margin=MARGIN.format(seen="measured plans"))

    @property
    def margin(self) -> float:
        """The relative margin a sure prediction must clear to be trusted (see the class)."""
        if not self.errors:
            return MIN_MARGIN
        return max(MIN_MARGIN, float(np.quantile(self.errors, ERROR_QUANTILE)))

    def predict(self, plan: Plan) -> tuple[Evaluation, bool]:
        """The plan's predicted Evaluation (marked predicted) and whether the table priced every term of it."""
        self.problem.validate(plan)
        cost, sure = self.cost_model.plan_prediction(plan)
        table = self.cost_model.table.device
        figures = Measurement(
            latency_ms=cost.latency_s * 1e3, latency_spread_ms=math.nan, energy_mj=cost.energy_j * 1e3,
            energy_source="predicted: the kernel table's latency at the board's powers",
            memory_mb_by_processor={p: b / 2**20 for p, b in cost.weight_bytes_by_processor.items()}, blocks=[],
            measured_by=f"predicted by the kernel table of {table.fingerprint}, ONNX Runtime {table.onnxruntime} "
                        "(not measured)")
        return self.problem.score(plan, figures, predicted=True), sure

    def skips(self, predicted: Evaluation, sure: bool, best_objective: float | None) -> bool:
        """Whether the plan is answered with `predicted` (no device measurement); `best_objective`: the best
        measured feasible objective so far (None: none yet)."""
        if self.answered >= self.cap:
            return False
        if any(e.broken for e in predicted.excess if e.kind == "accuracy_drop"):
            return True
        if best_objective is None or not sure:
            return False
        margin = self.margin
        return (predicted.objective > best_objective * (1 + margin)
                or any(e.relative > margin for e in predicted.excess if e.kind != "accuracy_drop"))

    def learn(self, predicted: Evaluation, sure: bool, measured: Evaluation) -> None:
        """Keep the error of a sure prediction of a plan that was then measured (a failed measurement teaches nothing)."""
        if not sure or measured.failed:
            return
        pairs = ((predicted.objective, measured.objective), (predicted.latency_ms, measured.latency_ms),
                 (predicted.memory_mb, measured.memory_mb))
        errors = [abs(p / m - 1) for p, m in pairs if math.isfinite(p) and math.isfinite(m) and m > 0]
        if errors:
            self.errors.append(max(errors))

    def describe(self) -> str:
        """The rule with the margin it has now (a search's result keeps it as `screening`)."""
        seen = f"{len(self.errors)} measured plans" if self.errors else "measured plans (none yet)"
        return RULE.format(margin=f"{self.margin:.1%}: " + MARGIN.format(seen=seen))


#: The rule in words (the summary, the MLflow parent run, `--json`).
RULE = ("every new plan is first predicted with the device's kernel table; it is not measured, and the agent gets the "
        "prediction, when its accuracy (scored for real) breaks the limit, or when the table holds every term of it and "
        "it is predicted worse than the best measured plan, or past a latency or memory limit, by more than the margin "
        "({margin}); the reference plans, plans near the best, plans with terms the table lacks and every plan before a "
        f"feasible one was measured are measured, and every plan after {PREDICTIONS_PER_MEASUREMENT} x the budget "
        "predictions")
MARGIN = f"at least {MIN_MARGIN:.0%}, else the {ERROR_QUANTILE:.0%} quantile of the prediction errors seen on {{seen}}"
