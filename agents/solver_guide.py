"""The solver's side of a PPO search: its plans to imitate, and re-solves as the search measures.

The measured solver's rounds (`MeasuredSolver.solve`) start the search; the guide goes on with the same
MeasuredSolver. At each refresh it absorbs every trial measured since (the rounds' cost model fitted to
every trial of the search, the accuracy budget to their measured/estimated loss: `fit_accuracy`),
re-solves with the best measured plan as incumbent and measures that plan, then up to `local_proposals`
plans the solver predicts best within LOCAL_RADIUS layers of the best measured plan; the best measured
plan becomes the suggestion. Every other refresh, the local plans and the suggestion start from the best
measured plan with accuracy headroom instead (`SolverGuide.refresh`).
"""
from __future__ import annotations

import copy

from explorer.cost import CostModel
from explorer.measured_solver import MeasuredSolve, MeasuredSolver
from explorer.milp import Instance, picks_for, predicted, solve
from explorer.plan import Plan
from explorer.searching import BudgetedProblem, Trial

ACCURACY_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)  # accuracy limits of the behaviour-cloning plans, x the limit
LATENCY_SCALES = (1.0, 0.7)  # latency budgets of those plans, x the solver plan's predicted latency
SOLVE_SECONDS = 20.0
LOCAL_RADIUS = 3  # layers a local proposal of the solver may change in the plan it starts from
LOCAL_RESOLVES = 16  # local solves per proposal, each excluding the measured plan the previous one returned
HEADROOM_FRACTION = 0.6  # every other refresh anchors at the best plan measured within this share of the accuracy limit


class SolverGuide:
    """The solver's plans for the policy, from a MeasuredSolver that learns from every trial of the search."""

    def __init__(self, problem: BudgetedProblem, start: MeasuredSolve | None):
        """`start`: the measured solver's rounds that began the search (None: they found nothing)."""
        self.problem = problem
        self.solver = start.solver if start else MeasuredSolver(problem.problem, problem.evaluate)
        # the solver's plan, even where a reference measured better: cloning a compressed plan puts the policy
        # near the plans that beat the references (cloning the fp32 baseline kept it there: measured on vgg)
        self.suggestion: Plan | None = start.plan if start else problem.result.best_plan
        self.start_latency_s = (next((s.latency_s for s, _ in start.rounds if s.plan == start.plan), None)
                                if start else None)
        self._absorbed = 0  # trials absorbed by the solver
        self._cuts: list[list[int]] = []  # measured plans (choice indices) the local solves had to exclude
        self._refreshes = 0

    @property
    def cost_model(self) -> CostModel:
        """The cost model, recalibrated by the measurements absorbed so far."""
        return self.solver.cost_model

    def alternatives(self) -> list[Plan]:
        """Distinct plans of the integer program for several accuracy limits and latency budgets
        (on the cost model: no measurement)."""
        instance = self.solver.instance()
        plans: list[Plan] = []
        for latency_scale in LATENCY_SCALES:
            for accuracy_scale in ACCURACY_SCALES:
                variant = copy.copy(instance)
                if variant.accuracy_limit is not None:
                    variant.accuracy_limit *= accuracy_scale
                if self.start_latency_s is not None and latency_scale != 1.0:
                    budget = self.start_latency_s * latency_scale
                    variant.latency_budget_s = min(budget, variant.latency_budget_s or budget)
                solution = solve(variant, time_limit_s=SOLVE_SECONDS)
                if solution.plan is not None and solution.plan not in plans:
                    plans.append(solution.plan)
        return plans

    def refresh(self, local_proposals: int = 0) -> Plan | None:
        """Absorb every trial so far, re-solve with the best measured plan as incumbent, evaluate the
        solver's plan and up to `local_proposals` plans of `local_plan` around the best measured plan;
        the suggestion becomes the best measured plan (returned).

        Every other refresh, local proposals and suggestion start instead from the best plan that
        leaves accuracy headroom (`best_with_headroom`): a best plan at the accuracy limit has no
        neighbour that compresses more, one with headroom does, so the search does not stall there."""
        self.solver.absorb((trial.plan, trial.evaluation) for trial in self.problem.result.trials[self._absorbed:])
        self._absorbed = len(self.problem.result.trials)
        self.solver.fit_accuracy()
        instance = self.solver.instance()
        solution = self.solver.propose(self.problem.result.best_plan, instance, SOLVE_SECONDS)
        self._evaluate(solution.plan, "solver")
        roomy = self.best_with_headroom() if self._refreshes % 2 else None
        self._refreshes += 1
        anchor = roomy or self.problem.result.best_trial
        for _ in range(local_proposals):
            if anchor is None or not self._evaluate(self.local_plan(instance, anchor), "solver-local"):
                break
        self.suggestion = (roomy.plan if roomy else self.problem.result.best_plan) or solution.plan or self.suggestion
        return self.suggestion

    def best_with_headroom(self) -> Trial | None:
        """The best feasible trial whose measured accuracy loss is at most HEADROOM_FRACTION of the
        limit (None without an accuracy limit or such a trial)."""
        limit = self.solver.problem.constraints.max_accuracy_drop
        if not limit:
            return None
        roomy = [t for t in self.problem.result.trials if t.evaluation.feasible
                 and t.evaluation.accuracy_drop is not None and t.evaluation.accuracy_drop <= HEADROOM_FRACTION * limit]
        return min(roomy, key=lambda t: t.evaluation.objective, default=None)

    def local_plan(self, instance: Instance, anchor: Trial) -> Plan | None:
        """The plan the model predicts best among the unmeasured ones that change at most
        LOCAL_RADIUS layers of the anchor's plan and are predicted no worse than it, the accuracy
        estimate anchored at that plan's measured loss: its additive estimate plus the measured
        headroom to the limit, scaled like the global budget (None if the model sees none)."""
        anchor_picks = picks_for(instance, anchor.plan)
        if anchor_picks is None:
            return None
        local = copy.copy(instance)
        predicted_anchor = predicted(local, anchor_picks)
        limit = self.solver.problem.constraints.max_accuracy_drop
        if local.accuracy_limit is not None and limit is not None and anchor.evaluation.accuracy_drop is not None:
            headroom = max(limit - anchor.evaluation.accuracy_drop, 0.0)
            local.accuracy_limit = predicted_anchor["accuracy_drop"] + headroom * self.solver.accuracy_scale
        nearby = [picks for picks in self._cuts if sum(a != b for a, b in zip(picks, anchor_picks)) <= LOCAL_RADIUS]
        cuts = [anchor_picks] + nearby
        for _ in range(LOCAL_RESOLVES):  # cuts added lazily: excluding every measured plan nearby slows HiGHS down
            solution = solve(local, predicted_anchor["objective"], SOLVE_SECONDS, exclude=cuts, near=(anchor_picks, LOCAL_RADIUS))
            if solution.plan is None or not self.problem.has_measured(solution.plan):
                return solution.plan
            cut = picks_for(local, solution.plan)
            assert cut is not None  # the solver's plans are made of the instance's choices
            cuts.append(cut)
            self._cuts.append(cut)
        return None

    def _evaluate(self, plan: Plan | None, source: str) -> bool:
        """Measure a new plan of the solver's (if any and the budget allows); whether it was measured."""
        if plan is None or self.problem.remaining <= 0 or self.problem.has_measured(plan):
            return False
        self.problem.evaluate(plan, source)
        return True
