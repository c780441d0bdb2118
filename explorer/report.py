"""What a search's summary says: the reference plans, the plan the agent was seeded with, the best plan
found, and the gain over the best reference and over the fp32 baseline (the same figures in the terminal,
the MLflow parent run and the benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass

from explorer.problem import Evaluation, Problem

#: How the gain of one plan over another reads, by objective.
_GAIN_WORDS = {"latency": "faster", "energy": "less energy", "memory": "less weight memory"}


@dataclass(frozen=True)
class Gain:
    """How much better `best` is than a reference on the objective: reference / best (> 1: better)."""

    reference: str
    ratio: float

    def text(self, problem: Problem) -> str:
        words = _GAIN_WORDS.get(problem.objective.single or "", "lower objective")
        return f"{self.ratio:.2f}x {words} than {self.reference}"


def summary_rows(problem: Problem, result) -> list[tuple[str, Evaluation]]:
    """(name, Evaluation) of every reference plan measured in the search, the solver plan the agent was
    seeded with (where it used one and measured it) and the best plan found, in that order."""
    measured = {trial.plan.digest(): trial.evaluation for trial in result.trials if not trial.failed}
    rows = [(name, measured[plan.digest()]) for name, plan in problem.reference_plans() if plan.digest() in measured]
    if result.seed_plan is not None and result.seed_plan.digest() in measured:
        rows.append((f"solver plan (DAD/RLC; {result.agent} started from it)", measured[result.seed_plan.digest()]))
    if result.best is not None:
        rows.append((f"best found by {result.agent}", result.best))
    return rows


def gains(problem: Problem, result) -> list[Gain]:
    """The best plan's gain over the best feasible reference plan and over the fp32 baseline (the
    uncompressed model on the best single processor), where they were measured and are feasible."""
    best = result.best
    if best is None:
        return []
    measured = {trial.plan.digest(): trial.evaluation for trial in result.trials if not trial.failed}
    references = [(name, measured[plan.digest()]) for name, plan in problem.reference_plans()
                  if plan.digest() in measured and measured[plan.digest()].feasible]
    if not references:
        return []
    name, reference = min(references, key=lambda item: item[1].objective)
    found = [Gain(f"the best reference ({name})", reference.objective / max(best.objective, 1e-12))]
    baseline = measured.get(problem.baseline_plan().digest())
    if baseline is not None and baseline.feasible and baseline is not reference:
        found.append(Gain("the fp32 baseline", baseline.objective / max(best.objective, 1e-12)))
    return found
