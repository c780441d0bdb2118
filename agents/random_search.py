"""Random search: uniformly random valid plans, distinct, until the budget is spent.

Each layer's decision is drawn uniformly from `Problem.choices(layer)`, seeded. A plan already
evaluated is drawn again at no cost; the search stops when the budget is spent, when every plan of
the design space has been evaluated, or after `attempts_per_trial` x budget draws that brought nothing
new (a design space much smaller than the budget cannot make it loop for long). A plan screened on a
real device (answered with the kernel table's prediction, explorer.screening) is new: the search goes on
until its device measurements are spent (screening caps its predictions).
"""
from __future__ import annotations

import math

import numpy as np

from explorer.problem import Problem
from explorer.searching import BudgetedProblem, SearchResult, TrialCallback


def design_space_size(problem: Problem) -> int:
    """How many distinct plans the problem has (exact, may be astronomically large)."""
    return math.prod(len(problem.choices(layer)) for layer in problem.graph.layers)


class RandomAgent:
    """Uniformly random valid plans."""

    name = "random"
    anytime = True  # proposals do not depend on the budget: best_so_far[n - 1] is the result at budget n

    def __init__(self, attempts_per_trial: int = 20):
        self.attempts_per_trial = attempts_per_trial

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> SearchResult:
        budgeted = BudgetedProblem(problem, budget, self.name, callback)
        trials = budgeted.result.trials
        target = min(budget, design_space_size(problem))
        rng = np.random.default_rng(seed)
        batch = max(1, problem.parallelism)  # plans measured at once (measurement servers)
        predicted = budgeted.result.predicted  # plans screened on a real device: new plans too, not stalls
        stalls, limit = 0, self.attempts_per_trial * budget // batch + 1
        try:
            while len(trials) < target and stalls < limit:
                before = len(trials) + len(predicted)
                budgeted.evaluate_many([problem.random_plan(rng) for _ in range(min(batch, target - len(trials)))])
                stalls += len(trials) + len(predicted) == before  # every draw one evaluated before
        except KeyboardInterrupt:
            budgeted.result.interrupted = True
        return budgeted.result
