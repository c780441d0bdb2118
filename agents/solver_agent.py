"""The analytic DAD/RLC plan alone: solve, measure, recalibrate and re-solve until feasible.

Its measured rounds (`explorer.solver.solve_measured`) are its trials; it stops when a round is
feasible, when the rounds run out or at the budget, whichever comes first, so it may use fewer
evaluations than the budget. Deterministic: the seed is not used.
"""
from __future__ import annotations

from agents.base import BudgetedProblem, BudgetExhausted, SearchResult, TrialCallback
from explorer.problem import Problem
from explorer.solver import solve_measured


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
            solve_measured(budgeted, rounds=self.rounds, time_limit_s=self.time_limit_s)
        except BudgetExhausted:
            pass
        except KeyboardInterrupt:
            budgeted.result.interrupted = True
        return budgeted.result
