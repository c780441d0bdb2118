"""What every search agent shares: the protocol, the budgeted evaluator and the result.

An agent proposes plans and learns from their evaluations; the budget counts *measured*
evaluations, i.e. distinct plans (asking again for a plan already evaluated in this search costs
nothing and is not a new trial). Every agent goes through `BudgetedProblem.evaluate`, so trials,
best-so-far curves and the budget are kept in one place.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from explorer.plan import Plan
from explorer.problem import Evaluation, Problem


class BudgetExhausted(Exception):
    """Raised by BudgetedProblem.evaluate when a new plan would exceed the budget."""


@dataclass
class Trial:
    """One measured evaluation of a search."""

    number: int  # 0-based, in the order evaluated
    plan: Plan
    evaluation: Evaluation
    agent: str
    source: str  # what proposed it: e.g. "solver", "policy", "tpe", "random"
    seconds: float  # wall time of the evaluation


@dataclass
class SearchResult:
    """Every trial, the best feasible plan, and best-so-far against measured evaluations."""

    agent: str
    trials: list[Trial] = field(default_factory=list)
    best_so_far: list[float] = field(default_factory=list)  # objective of the best feasible after each trial; inf before
    best_trial: Trial | None = None
    interrupted: bool = False

    @property
    def best_plan(self) -> Plan | None:
        return self.best_trial.plan if self.best_trial else None

    @property
    def best(self) -> Evaluation | None:
        return self.best_trial.evaluation if self.best_trial else None

    @property
    def feasible_count(self) -> int:
        return sum(t.evaluation.feasible for t in self.trials)


TrialCallback = Callable[[Trial, SearchResult], None]


class BudgetedProblem:
    """A Problem seen through a budget: counts distinct plans, records trials and best-so-far.

    Attribute access other than `evaluate` is passed through to the Problem, so code written for
    a Problem (the solver's measured loop, the environment) runs unchanged on a budget.
    """

    def __init__(self, problem: Problem, budget: int, agent: str, callback: TrialCallback | None = None):
        if budget < 1:
            raise ValueError("the budget must be at least one evaluation")
        self.problem = problem
        self.budget = budget
        self.result = SearchResult(agent)
        self.callback = callback
        self.source = agent
        self._seen: dict[str, Evaluation] = {}

    def __getattr__(self, name):
        return getattr(self.problem, name)

    @property
    def remaining(self) -> int:
        return self.budget - len(self.result.trials)

    def evaluate(self, plan: Plan, source: str | None = None) -> Evaluation:
        """Evaluate a plan; a new plan beyond the budget raises BudgetExhausted."""
        key = plan.digest()
        if key in self._seen:
            return self._seen[key]
        if self.remaining <= 0:
            raise BudgetExhausted
        started = time.perf_counter()
        evaluation = self.problem.evaluate(plan)
        trial = Trial(len(self.result.trials), plan, evaluation, self.result.agent, source or self.source,
                      time.perf_counter() - started)
        self._seen[key] = evaluation
        result = self.result
        result.trials.append(trial)
        if evaluation.feasible and (result.best_trial is None or evaluation.objective < result.best_trial.evaluation.objective):
            result.best_trial = trial
        result.best_so_far.append(result.best_trial.evaluation.objective if result.best_trial else math.inf)
        if self.callback:
            self.callback(trial, result)
        return evaluation


class Agent(Protocol):
    """A search agent."""

    name: str

    def search(self, problem: Problem, budget: int, seed: int, callback: TrialCallback | None = None) -> SearchResult:
        """Search for the best feasible plan within `budget` measured evaluations."""
