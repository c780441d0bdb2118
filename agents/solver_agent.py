"""The analytic DAD/RLC plan alone: solve, measure, recalibrate and re-solve.

Its trials are what `explorer.measured_solver.MeasuredSolver.solve` evaluates: the reference plans (the
best feasible one is the bound the solver must beat), then one plan per round. It stops when a round beats the best measured plan,
when the model predicts nothing better, when the rounds run out or at the budget, whichever comes
first, so it may use fewer evaluations than the budget. Deterministic: the seed is not used.
"""
from __future__ import annotations

import logging

from explorer.errors import ExplorerError
from explorer.measured_solver import MeasuredSolver
from explorer.problem import Problem
from explorer.searching import BudgetedProblem, BudgetExhausted, SearchResult, TrialCallback

log = logging.getLogger(__name__)


class SolverAgent:
    """Rounds of the exact integer program on the (recalibrated) additive cost model."""

    name = "solver"
    anytime = True  # proposals do not depend on the budget: best_so_far[n - 1] is the result at budget n

    def __init__(self, rounds: int = 6, time_limit_s: float = 60.0):
        self.rounds = rounds
        self.time_limit_s = time_limit_s

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> SearchResult:
        budgeted = BudgetedProblem(problem, budget, self.name, callback)
        try:
            solver = MeasuredSolver(budgeted.problem, budgeted.evaluate, time_limit_s=self.time_limit_s)
            budgeted.result.seed_plan = solver.solve(self.rounds).plan
        except BudgetExhausted:
            pass
        except ExplorerError as error:  # nothing (better) on the model: the measured plans are the result
            if not budgeted.result.trials:
                raise
            log.warning("solver: %s", error)
        except KeyboardInterrupt:
            budgeted.result.interrupted = True
        return budgeted.result
