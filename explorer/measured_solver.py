"""The solver corrected by measurement: solve on the cost model, measure the plan, recalibrate, re-solve with
the best measured plan as incumbent.

The additive model misjudges real effects (accuracy drops compound; overheads, shapes and contention it
lacks). A `MeasuredSolver` keeps what the measurements taught it: the cost model recalibrated per
(processor, op kind, precision) from the measured blocks it absorbed, and the accuracy budget it gives
the program (a factor on the limit, from the measured/estimated accuracy loss). Its own rounds
(`MeasuredSolver.solve`, `solve_measured`) serve the `solver` agent and `explorer solve`, and start PPO,
whose `SolverGuide` goes on re-solving with the same MeasuredSolver between rollouts.

Two ways to learn, for two paces: a round of `solve` corrects the model it was solved on (`settle` after
each absorbed plan) and tightens the accuracy budget while plans break the limit (`tighten_accuracy`), so
a few rounds reach a feasible plan; the guide pools the many trials of a search (one fit of the settled
model to all of them, which the median makes robust to noise) and fits the budget to a high quantile of
their measured/estimated accuracy loss (`fit_accuracy`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from explorer.accuracy import sensitivity_table
from explorer.cost import CostModel
from explorer.errors import ExplorerError
from explorer.kernels import KernelCostModel, blocks_at_typical_speed
from explorer.milp import Instance, Solution, objective_of, picks_for, solve
from explorer.plan import Plan
from explorer.problem import Evaluation, Problem
from explorer.solver import Observation, at_plan_working_set, block_observations, instance_for

ACCURACY_SCALE_RANGE = (0.5, 3.0)  # how far measurements may move the accuracy budget (`fit_accuracy`)
RATIO_QUANTILE = 0.9  # conservative measured/estimated accuracy-loss ratio (`fit_accuracy`)
TIGHTEN_RANGE = (0.1, 0.8)  # each round that broke the accuracy limit shrinks the budget by this much (`tighten_accuracy`)
# On a measured kernel table, a plan whose latency measured beside the table's reference plan lies further than this
# from its prediction is not yet trusted: the table is fitted again with its blocks and the next round must beat it.
PREDICTION_TOLERANCE = 0.10


@dataclass
class MeasuredSolve:
    """Rounds of solve -> evaluate -> feed the measurement back -> re-solve."""

    plan: Plan  # the best plan found (feasible when any round was)
    evaluation: Evaluation  # its Evaluation
    rounds: list[tuple[Solution, Evaluation]]  # (solution, evaluation) per round
    solver: MeasuredSolver  # what the rounds taught: recalibrated cost model, accuracy budget
    # on a kernel table: each round's plan's seconds at the table's typical speed (measured beside its reference plan)
    typical_s: dict[str, float] = field(default_factory=dict)  # by plan digest

    def prediction_error(self, solution: Solution) -> float | None:
        """A round's predicted latency over its plan's latency at the table's typical speed, - 1 (None: no kernel
        table, or its paired measurement failed)."""
        assert solution.plan is not None
        seconds = self.typical_s.get(solution.plan.digest())
        return solution.latency_s / seconds - 1 if seconds else None

    @property
    def feasible(self) -> bool:
        return self.evaluation.feasible

    @property
    def cost_model(self) -> CostModel:
        """The cost model after recalibration."""
        return self.solver.cost_model


class MeasuredSolver:
    """The integer program of a Problem on what the measurements so far taught: `absorb` a measured plan,
    `propose` the program's plan bounded by an incumbent, `solve` for rounds of both until a measured win.

    `evaluate` measures a plan (default: the Problem's; a search passes its budgeted one, which records trials).
    `check_predictions`: on a measured kernel table, each round's plan is also measured beside the table's reference
    plan (a device measurement more per round, outside any search budget), the table refitted with those blocks at
    its typical speed, and a plan measured further than PREDICTION_TOLERANCE from its prediction does not end the
    rounds."""

    def __init__(self, problem: Problem, evaluate: Callable[[Plan], Evaluation] | None = None,
                 cost_model: CostModel | None = None, time_limit_s: float = 60.0, check_predictions: bool = False):
        self.problem = problem
        self.check_predictions = check_predictions
        self.evaluate = evaluate or problem.evaluate
        self.base_model = cost_model or problem.cost_model
        self.cost_model = self.base_model  # the base model fitted to the measured blocks absorbed since it became the base
        self.sensitivity = (sensitivity_table(problem.graph, problem.compressor, problem.scorer)
                            if problem.scorer.measured else None)
        self.time_limit_s = time_limit_s
        self.accuracy_scale = 1.0  # factor on the accuracy limit the program gets
        self._observations: dict[str, list[Observation]] = {}  # by plan digest, since the base model became the base
        # the same, for a kernel table: (plan, its blocks' seconds, whether at the table's typical speed)
        self._measured: dict[str, tuple[Plan, list[float], bool]] = {}
        self._accuracy: dict[str, tuple[float, float]] = {}  # by plan digest: (estimated, measured) accuracy loss

    def absorb(self, measured: Iterable[tuple[Plan, Evaluation]], typical_blocks: dict[str, list[float]] | None = None) -> None:
        """Learn from measured plans (a failed measurement teaches nothing): the base model is fitted to their
        blocks and those absorbed before (a median ratio per processor, op kind and precision), their accuracy
        loss joins `accuracy_pairs`. A plan absorbed again is counted once. A kernel table is fitted again with
        their blocks instead (KernelCostModel.with_measured): their seconds at the table's typical speed where
        `typical_blocks` has them (by plan digest), else the evaluation's (at the device's speed then)."""
        measured = list(measured)
        for plan, evaluation in measured:
            key = plan.digest()
            if evaluation.failed:
                continue
            if key not in self._observations:
                self._observations[key] = block_observations(self.problem, self.base_model, plan, evaluation)
            if self.sensitivity is not None and evaluation.accuracy_drop is not None and key not in self._accuracy:
                estimate = sum(self.sensitivity.estimate(name, d.method, d.rank, d.precision) for name, d in plan.decisions)
                self._accuracy[key] = (estimate, evaluation.accuracy_drop)
        if isinstance(self.base_model, KernelCostModel):  # measured terms: fitted again with these blocks
            known = typical_blocks or {}
            for plan, evaluation in measured:
                if evaluation.failed:
                    continue
                at_typical = known.get(plan.digest())
                self._measured[plan.digest()] = (plan, at_typical, True) if at_typical else (
                    plan, [block.latency_ms / 1e3 for block in evaluation.blocks], False)
            self.cost_model = self.base_model.with_measured(list(self._measured.values()))
            return
        self.cost_model = self.base_model.calibrated([o for observations in self._observations.values() for o in observations])

    def settle(self) -> None:
        """Make the recalibrated cost model the base: what was absorbed is built into it, and what is absorbed
        next is fitted from it (each round of `solve` corrects the model that round was solved on)."""
        self.base_model = self.cost_model
        self._observations = {}
        self._measured = {}

    @property
    def accuracy_pairs(self) -> list[tuple[float, float]]:
        """(estimated, measured) accuracy loss of every plan absorbed (the estimate: the sensitivity table's sum)."""
        return list(self._accuracy.values())

    def instance(self) -> Instance:
        """The program on the recalibrated cost model, with the Problem's accuracy limit."""
        return instance_for(self.problem, self.cost_model, self.sensitivity)

    def propose(self, incumbent: Plan | None, instance: Instance | None = None, time_limit_s: float | None = None,
                incumbent_latency_s: float | None = None, exclude: Iterable[Plan] = ()) -> Solution:
        """The program's plan (of `instance`, by default `self.instance()`) with the accuracy limit times
        `accuracy_scale`, its objective bounded by the incumbent's predicted one (None: no bound), or, with the
        latency objective and `incumbent_latency_s`, by the incumbent's latency as measured; other than the plans
        in `exclude`; on the working set of the plan it finds (`explorer.solver.at_plan_working_set`)."""
        exclude = list(exclude)

        def solve_on(model: CostModel) -> Solution:
            scaled = copy.copy(instance or instance_for(self.problem, model, self.sensitivity))
            if scaled.accuracy_limit is not None:
                scaled.accuracy_limit *= self.accuracy_scale
            bound = objective_of(scaled, incumbent) if incumbent is not None else None
            if bound is not None and incumbent_latency_s is not None and self.problem.objective.single == "latency":
                bound = incumbent_latency_s
            cuts = [picks for picks in (picks_for(scaled, plan) for plan in exclude) if picks is not None]
            return solve(scaled, bound, self.time_limit_s if time_limit_s is None else time_limit_s, exclude=cuts)

        return solve_on(self.cost_model) if instance is not None else at_plan_working_set(self.cost_model, solve_on)

    def tighten_accuracy(self, solution: Solution, evaluation: Evaluation) -> None:
        """After a plan broke the accuracy limit when measured: shrink the budget by its estimated/measured
        loss, by TIGHTEN_RANGE (at least x0.8 a round, so that a few rounds reach a feasible plan)."""
        limit = self.problem.constraints.max_accuracy_drop
        if evaluation.accuracy_drop is not None and evaluation.accuracy_drop > (limit or np.inf):
            ratio = solution.accuracy_drop / max(evaluation.accuracy_drop, 1e-9)
            self.accuracy_scale *= float(np.clip(ratio, *TIGHTEN_RANGE))

    def fit_accuracy(self) -> float:
        """Set (and return) the budget from every absorbed plan that used a real share of the limit:
        1 / (a high quantile of their measured over estimated accuracy loss), within ACCURACY_SCALE_RANGE."""
        limit = self.problem.constraints.max_accuracy_drop
        ratios = [max(measured, 0.0) / estimated for estimated, measured in self.accuracy_pairs
                  if limit and estimated >= 0.25 * limit]
        self.accuracy_scale = 1.0
        if ratios:
            ratio = float(np.quantile(ratios, RATIO_QUANTILE))
            self.accuracy_scale = float(np.clip(1.0 / max(ratio, 1e-9), *ACCURACY_SCALE_RANGE))
        return self.accuracy_scale

    def solve(self, rounds: int = 6, incumbent: Plan | None = None) -> MeasuredSolve:
        """Rounds of: propose a plan that beats the best measured one on the model, evaluate it, absorb it.

        The bound is the best feasible of the reference plans and the incumbent, measured. While the
        evaluated plan is infeasible (accuracy: `tighten_accuracy`) or no better than that bound, the next
        round re-solves on the recalibrated model. Stops at the first feasible plan that beats the bound (with
        `check_predictions`: and whose latency at the table's typical speed is within PREDICTION_TOLERANCE of its
        prediction; one that missed becomes the bound), or when the model predicts nothing better. Returns the best
        feasible round (or the last one) and every round; ExplorerError when there was no round."""
        problem = self.problem
        known = [plan for _, plan in problem.reference_plans()] + ([incumbent] if incumbent is not None else [])
        feasible_known = [(self.evaluate(plan).objective, plan) for plan in known if self.evaluate(plan).feasible]
        best_known = min(feasible_known, key=lambda pair: pair[0])[1] if feasible_known else None
        history: list[tuple[Solution, Evaluation]] = []
        typical_s: dict[str, float] = {}
        for _ in range(rounds):
            solution = self.propose(best_known, incumbent_latency_s=typical_s.get(best_known.digest()) if best_known else None,
                                    exclude=[s.plan for s, _ in history if s.plan is not None] if typical_s else ())
            if solution.plan is None:
                if not history and best_known is None:
                    raise ExplorerError(f"no plan meets the constraints: {solution.message}")
                break  # the (recalibrated) model predicts nothing better than the best measured plan
            if any(solution.plan == earlier.plan for earlier, _ in history):
                break  # the corrected model proposes what it measured already: nothing more to learn
            evaluation = self.evaluate(solution.plan)
            history.append((solution, evaluation))
            blocks = self.typical_blocks(solution.plan) if not evaluation.failed else None
            if blocks is not None:
                typical_s[solution.plan.digest()] = sum(blocks)
            self.absorb([(solution.plan, evaluation)], {solution.plan.digest(): blocks} if blocks else None)
            self.settle()
            if evaluation.feasible:
                if best_known is None or evaluation.objective < self.evaluate(best_known).objective:
                    if blocks is None or abs(solution.latency_s / sum(blocks) - 1) <= PREDICTION_TOLERANCE:
                        break
                    best_known = solution.plan  # its prediction missed: the next plan must beat it as measured
                continue
            self.tighten_accuracy(solution, evaluation)
        if not history:
            if best_known is not None and best_known == incumbent:
                raise ExplorerError(f"the solver's model predicts nothing better than the incumbent plan "
                                    f"({self.evaluate(incumbent).objective:.4g}, measured)")
            name = next((name for name, plan in problem.reference_plans() if plan == best_known), "the baseline")
            raise ExplorerError(f"the solver's model predicts nothing better than the best reference plan ({name})")
        feasible = [(s, e) for s, e in history if e.feasible]
        at_typical = [typical_s.get(s.plan.digest()) if s.plan is not None else None for s, _ in feasible]
        if problem.objective.single == "latency" and feasible and None not in at_typical:
            # rounds measured seconds apart compare at the table's typical speed (each beside its reference plan)
            best_solution, best = feasible[int(np.argmin(np.asarray(at_typical, dtype=float)))]
        else:
            best_solution, best = min(feasible, key=lambda se: se[1].objective) if feasible else history[-1]
        assert best_solution.plan is not None  # every round's solution has a plan
        return MeasuredSolve(best_solution.plan, best, history, self, typical_s)

    def typical_blocks(self, plan: Plan) -> list[float] | None:
        """On a measured kernel table: the plan's blocks' seconds at the table's typical speed, measured beside the
        model's reference plan (kernels.measure_paired), which the table's own measurements were; else None."""
        if not (self.check_predictions and isinstance(self.base_model, KernelCostModel)) or self.problem.measurer.simulated:
            return None
        measured = blocks_at_typical_speed(self.problem, self.base_model, plan)
        return None if measured is None else measured[0]


def solve_measured(problem: Problem, rounds: int = 6, incumbent: Plan | None = None, cost_model: CostModel | None = None,
                   time_limit_s: float = 60.0) -> MeasuredSolve:
    """Rounds of the measured solver on a Problem (`MeasuredSolver.solve`), its cost model by default; on a kernel
    table, until a plan's prediction holds (`check_predictions`)."""
    return MeasuredSolver(problem, cost_model=cost_model, time_limit_s=time_limit_s,
                          check_predictions=True).solve(rounds, incumbent)
