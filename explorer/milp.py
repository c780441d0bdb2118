"""The DAD/RLC integer program, exact: one choice of (rank, processor, precision) per layer, on additive costs.

It knows nothing of models, boards or Problems: an `Instance` is lists of numbers (`explorer.solver`
builds one from a Problem). Variables: a binary x[l, c] per layer l and choice c = (rung, precision, processor); exactly one
per layer. Transfers between consecutive layers are linearised exactly with flow variables
y[l, p, q] >= 0 (sum over q of y[l, p, q] = placement of layer l on p, sum over p = placement of
layer l + 1 on q), which equal the product of the two placements at any integer point. The input
comes from, and the output returns to, the board's first processor.

Objective: energy, latency, weight memory, or a weighted sum (each relative to the baseline).
Constraints: latency <= budget, the additive accuracy-drop estimate from the sensitivity table
<= limit, weights per processor <= its memory, local weights <= the board's available memory,
total weights <= an optional limit; an optional incumbent value bounds the objective from above.
Solved exactly with SciPy's HiGHS (`explorer.highs`), on rows scaled so that HiGHS's absolute
tolerances are a fixed, tiny fraction of every limit and of the objective (see FEASIBILITY_RTOL), and
every answer is checked before it is returned: the plan's totals recomputed from the instance against
every limit, HiGHS's bound against the plan's objective. Exact on its model, which is the additive cost
model: the measured (or simulated) result of its plan differs, which is what `explorer.measured_solver`
and the search agents are for.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import LinearConstraint
from scipy.sparse import coo_matrix

from explorer.highs import run_milp
from explorer.plan import Decision, Plan

METRICS = ("energy", "latency", "memory")
log = logging.getLogger(__name__)

# What "feasible" and "optimal" mean, at any scale (seconds or nanoseconds, joules or nanojoules).
# HiGHS's tolerances are absolute, in the units of the program it is given: a row may be exceeded by
# mip_feasibility_tolerance, a binary may sit that far from 0 or 1 (and a row be cheated by that times
# its coefficients), and a branch is pruned once its bound is within max(mip_feasibility_tolerance,
# mip_abs_gap) of the incumbent. In seconds and joules (a plan takes ~1e-4 s and ~1e-4 J) HiGHS's
# defaults (1e-6) let budgets be broken by 1 us and optima be missed by 0.1 %. So HiGHS sees every row
# scaled by its own reference: a limit row (latency budget, accuracy limit, weights, incumbent bound) by
# its limit, the objective by its lower bound (every layer at its cheapest choice, which no plan beats),
# each made to read _REFERENCE = 1; choices that alone break a limit are fixed to 0 (`upper_bounds`), so
# no coefficient is much above 1. With mip_feasibility_tolerance and mip_abs_gap at FEASIBILITY_RTOL, a
# limit holds to FEASIBILITY_RTOL of itself and the optimum to ~FEASIBILITY_RTOL of the objective, and a
# binary's integrality slack moves a row by ~1e-9 per layer at most; the LP tolerances follow. Anything
# HiGHS still gets past this is caught by the check of every answer (`violations`).
FEASIBILITY_RTOL = 1e-9  # a plan meets a limit when its total <= limit + FEASIBILITY_RTOL * |limit|
OBJECTIVE_RTOL = 1e-8  # "optimal": no feasible plan is better by more than this fraction of the objective
_REFERENCE = 1.0
_HIGHS_TOLERANCE = FEASIBILITY_RTOL * _REFERENCE
_HIGHS_OPTIONS = {"mip_rel_gap": 0.0, "mip_abs_gap": _HIGHS_TOLERANCE, "mip_feasibility_tolerance": _HIGHS_TOLERANCE,
                  "primal_feasibility_tolerance": _HIGHS_TOLERANCE, "dual_feasibility_tolerance": _HIGHS_TOLERANCE,
                  "presolve": True}
_SPREAD = 1e-4  # a reference is at least this fraction of the row's largest total: no coefficient above ~1e4
_REPAIRS = 8  # re-solves, each excluding the last plan HiGHS returned that broke a limit, before giving up


@dataclass(frozen=True)
class Choice:
    """One option of one layer with its additive costs."""

    decision: Decision
    latency_s: float
    energy_j: float
    weight_bytes: float
    accuracy_drop: float  # estimate from the sensitivity table (0 when not measured)
    # What the costs between this layer and its neighbours depend on (Instance.transfer, entry and exit are keyed
    # by it): its processor unless given (a kernel table's costs depend on the processor and the precision).
    state: str = ""

    processor: str = field(init=False, repr=False, compare=False)  # the decision's, never None

    def __post_init__(self) -> None:
        if self.decision.processor is None:
            raise ValueError(f"a choice of the integer program runs on a processor: {self.decision} has none")
        object.__setattr__(self, "processor", self.decision.processor)  # frozen: set once, read in every total
        if not self.state:
            object.__setattr__(self, "state", self.decision.processor)


@dataclass
class Instance:
    """What the integer program needs, independent of where the numbers came from."""

    layer_names: list[str]
    choices: list[list[Choice]]
    processors: list[str]
    # per boundary l -> l+1: (s, J) between the states of the two layers (a pair not given costs nothing)
    transfer: list[dict[tuple[str, str], tuple[float, float]]]
    entry: dict[str, tuple[float, float]]  # (s, J) to bring the input to the first layer's state
    exit: dict[str, tuple[float, float]]  # (s, J) to bring the output back
    capacity_bytes: dict[str, float]  # per processor
    local: set[str] = field(default_factory=set)  # processors that share the board's memory
    local_capacity_bytes: float = float("inf")
    latency_budget_s: float | None = None
    accuracy_limit: float | None = None
    memory_limit_bytes: float | None = None
    weights: dict[str, float] = field(default_factory=lambda: {"energy": 1.0})  # metric -> weight / scale
    states: list[str] = field(default_factory=list)  # the choices' states when they are not just processors

    @property
    def boundary_states(self) -> list[str]:
        """What transfer, entry and exit are keyed by: the states, or the processors."""
        return self.states or self.processors


@dataclass
class Solution:
    """The optimal plan on the model, its predicted metrics and how the solve went.

    status: "optimal" (verified: the plan meets every limit, its totals recomputed from the instance, and
    its objective is the value HiGHS proved optimal: no feasible plan is better by more than OBJECTIVE_RTOL),
    "feasible" (verified feasible, optimality not shown), "time limit" (the best verified plan HiGHS had
    in the time, if any) or "infeasible" (no plan meets the limits; `message` says which cannot be met)."""

    plan: Plan | None
    status: str  # optimal | feasible | infeasible | time limit
    objective: float
    latency_s: float
    energy_j: float
    weight_bytes: float
    accuracy_drop: float
    seconds: float
    message: str = ""
    objective_scale: float = float("nan")  # HiGHS saw the objective multiplied by this (see _REFERENCE)

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


@dataclass(frozen=True)
class _Limit:
    """One upper limit on an additive total of a plan."""

    name: str  # for messages: "latency", "weights on gpu", ...
    metric: str  # latency | energy | memory | accuracy | objective
    bound: float
    processors: frozenset[str] | None = None  # memory: weights on these processors only (None: all)


@dataclass(frozen=True)
class _Answer:
    """HiGHS's answer to one program: status (0 optimal, 1 limit reached, 2 infeasible), the variables, the
    objective at them (scaled, as HiGHS saw it), the objective's scale and HiGHS's message."""

    status: int
    x: np.ndarray | None
    fun: float | None
    scale: float
    message: str


def _limits(instance: Instance, latency: bool = True, accuracy: bool = True, memory: bool = True,
            incumbent_objective: float | None = None) -> list[_Limit]:
    """The instance's limits (the ones asked for) and the incumbent's bound on the objective, if any: what
    the program constrains and `violations` checks."""
    limits = []
    if latency and instance.latency_budget_s is not None:
        limits.append(_Limit("latency", "latency", instance.latency_budget_s))
    if accuracy and instance.accuracy_limit is not None:
        limits.append(_Limit("estimated accuracy drop", "accuracy", instance.accuracy_limit))
    if memory:
        limits += [_Limit(f"weights on {proc}", "memory", capacity, frozenset({proc}))
                   for proc, capacity in instance.capacity_bytes.items()]
        if instance.local and np.isfinite(instance.local_capacity_bytes):
            limits.append(_Limit("weights in the board's memory", "memory", instance.local_capacity_bytes,
                                 frozenset(instance.local)))
        if instance.memory_limit_bytes is not None:
            limits.append(_Limit("weights", "memory", instance.memory_limit_bytes))
    if incumbent_objective is not None:
        limits.append(_Limit("objective (bounded by the incumbent's)", "objective", incumbent_objective))
    return limits


def _terms(instance: Instance, picks: Sequence[int], metric: str, processors: frozenset[str] | None = None) -> list[float]:
    """The additive terms of one total of a plan (a choice index per layer)."""
    if metric == "objective":
        return [w * t for m, w in instance.weights.items() for t in _terms(instance, picks, m)]
    chosen = [instance.choices[layer][c] for layer, c in enumerate(picks)]
    if metric == "accuracy":
        return [c.accuracy_drop for c in chosen]
    if metric == "memory":
        return [c.weight_bytes for c in chosen if processors is None or c.processor in processors]
    position, attribute = {"latency": (0, "latency_s"), "energy": (1, "energy_j")}[metric]
    states = [c.state for c in chosen]
    terms = [getattr(c, attribute) for c in chosen]
    terms += [instance.entry[states[0]][position], instance.exit[states[-1]][position]]
    terms += [instance.transfer[b][pair][position] for b, pair in enumerate(zip(states, states[1:]))
              if pair in instance.transfer[b]]
    return terms


def _total(instance: Instance, picks: Sequence[int], metric: str, processors: frozenset[str] | None = None) -> float:
    """A total of a plan, exactly rounded (math.fsum: the float64 nearest the exact sum of its terms)."""
    return math.fsum(_terms(instance, picks, metric, processors))


def _meets(total: float, bound: float) -> bool:
    return total <= bound + FEASIBILITY_RTOL * abs(bound)


def predicted(instance: Instance, picks: list[int]) -> dict[str, float]:
    """Additive metrics of a choice index per layer (the model the solver optimises), exactly rounded."""
    return {"latency": _total(instance, picks, "latency"), "energy": _total(instance, picks, "energy"),
            "memory": _total(instance, picks, "memory"), "accuracy_drop": _total(instance, picks, "accuracy"),
            "objective": _total(instance, picks, "objective")}


def violations(instance: Instance, picks: Sequence[int], incumbent_objective: float | None = None) -> list[str]:
    """The limits a plan breaks (beyond FEASIBILITY_RTOL), each as 'what total > limit', its totals
    recomputed from the instance; empty when it meets every one."""
    broken = []
    for limit in _limits(instance, incumbent_objective=incumbent_objective):
        total = _total(instance, picks, limit.metric, limit.processors)
        if not _meets(total, limit.bound):
            broken.append(f"{limit.name} {_two_values(limit.metric, total, limit.bound)}")
    return broken


_UNITS = {"latency": (1e3, "ms"), "energy": (1e3, "mJ"), "memory": (1.0, "B"), "megabytes": (2.0**-20, "MB"),
          "accuracy": (100.0, "points"), "objective": (1.0, "")}


def _distinct(metric: str, total: float, bound: float) -> tuple[str, str]:
    """Both values in the metric's public unit, with as many digits as it takes to tell them apart."""
    scale, unit = _UNITS[metric]
    digits = 4
    while digits < 17 and f"{total * scale:.{digits}g}" == f"{bound * scale:.{digits}g}":
        digits += 1
    return f"{total * scale:.{digits}g} {unit}".rstrip(), f"{bound * scale:.{digits}g} {unit}".rstrip()


def _two_values(metric: str, total: float, bound: float) -> str:
    return " > ".join(_distinct(metric, total, bound))


def solve(instance: Instance, incumbent_objective: float | None = None, time_limit_s: float = 60.0,
          exclude: Sequence[Sequence[int]] = (), near: tuple[Sequence[int], int] | None = None) -> Solution:
    """Solve the instance exactly; `incumbent_objective` (if given) bounds the objective from above.
    `exclude`: plans (a choice index per layer, see `picks_for`) the solution must differ from;
    `near` = (picks, radius): the solution differs from that plan in at most `radius` layers.

    The plan HiGHS returns is verified (`violations`, the exclusions, the neighbourhood); one that breaks
    a limit is excluded and the program solved again (exact: it was infeasible), at most _REPAIRS times."""
    started = time.perf_counter()
    program = _Program(instance)
    limits = _limits(instance, incumbent_objective=incumbent_objective)
    layers = len(instance.choices)
    cuts = [list(picks) for picks in exclude]
    repaired: list[str] = []
    while True:
        selections: list[tuple[np.ndarray, float, float]] = [(program.selection_row(picks), -np.inf, layers - 1)
                                                             for picks in cuts]
        if near is not None:
            selections.append((program.selection_row(near[0]), layers - near[1], np.inf))
        result = program.run("objective", limits, selections, time_limit_s)
        if result.x is None:
            break
        picks = program.picks(result.x)
        broken = violations(instance, picks, incumbent_objective)
        if picks in [list(p) for p in exclude]:
            broken.append("a plan it must differ from")
        if near is not None and sum(a != b for a, b in zip(picks, near[0])) > near[1]:
            broken.append(f"more than {near[1]} layers away from the plan it must stay near")
        if not broken:
            break
        log.warning("HiGHS returned a plan that breaks %s; excluded, solving again", "; ".join(broken))
        repaired.append("; ".join(broken))
        if result.status != 0 or len(repaired) > _REPAIRS or picks in cuts:
            seconds = time.perf_counter() - started
            what = "the best plan HiGHS found in the time limit" if result.status != 0 else "HiGHS's plans"
            return Solution(None, "time limit" if result.status != 0 else "infeasible", np.inf, np.nan, np.nan,
                            np.nan, np.nan, seconds, f"no verified plan: {what} broke {'; then '.join(repaired)}",
                            result.scale)
        cuts.append(picks)
    seconds = time.perf_counter() - started
    if result.x is None:
        if result.status == 2:
            message = _diagnose(instance, program, incumbent_objective, time_limit_s)
        else:
            message = f"no plan within the time limit ({result.message})"
        return Solution(None, "infeasible" if result.status == 2 else "time limit", np.inf, np.nan, np.nan, np.nan,
                        np.nan, seconds, message, result.scale)
    metrics = predicted(instance, picks)
    plan = Plan(tuple((name, options[c].decision) for name, options, c in zip(instance.layer_names, instance.choices, picks)))
    # HiGHS proved that no plan is better than its objective value by more than its tolerance (scaled: a
    # fraction FEASIBILITY_RTOL of the objective); that holds for this plan when its recomputed objective is that value
    fun = metrics["objective"] * result.scale if result.fun is None else result.fun
    proven = result.status == 0 and result.fun is not None and (
        metrics["objective"] * result.scale - fun <= 2 * _HIGHS_TOLERANCE + 1e-12 * abs(fun))
    status = "optimal" if proven else ("time limit" if result.status != 0 else "feasible")
    message = (f"{status}: meets every limit (recomputed, within {FEASIBILITY_RTOL:g} of each); objective "
               f"{metrics['objective']:.10g} recomputed, {fun / result.scale:.10g} by HiGHS, which saw it "
               f"x {result.scale:.6g}")
    if repaired:
        message += f"; {len(repaired)} plan(s) HiGHS returned first broke a limit and were excluded"
    log.debug("solve: %s", message)
    return Solution(plan, status, metrics["objective"], metrics["latency"], metrics["energy"], metrics["memory"],
                    metrics["accuracy_drop"], seconds, message, result.scale)


class _Program:
    """Variable layout and rows of the mixed-integer program (numpy over the choices, rows built once)."""

    def __init__(self, instance: Instance):
        self.instance = instance
        self.states = instance.boundary_states
        self.offsets = np.cumsum([0] + [len(c) for c in instance.choices])
        self.n_x = int(self.offsets[-1])
        self.n_layers = len(instance.choices)
        p = len(self.states)
        self.n_y = (self.n_layers - 1) * p * p
        self.n = self.n_x + self.n_y
        self.state_index = {q: i for i, q in enumerate(self.states)}
        every = [choice for choices in instance.choices for choice in choices]
        self.layer_of = np.repeat(np.arange(self.n_layers), np.diff(self.offsets))
        self.state_of = np.array([self.state_index[c.state] for c in every], dtype=np.int64)
        attributes = (("latency", "latency_s"), ("energy", "energy_j"), ("memory", "weight_bytes"), ("accuracy", "accuracy_drop"))
        self.values = {metric: np.array([getattr(c, attribute) for c in every], dtype=float) for metric, attribute in attributes}
        self.proc_name = [c.processor for c in every]
        self._rows: dict[tuple, np.ndarray] = {}
        self._spans: dict[tuple, tuple[float, float, float, np.ndarray]] = {}
        self.structure = self._structure()

    def x(self, layer: int, choice: int) -> int:
        return int(self.offsets[layer] + choice)

    def y(self, boundary: int, p: int, q: int) -> int:
        k = len(self.states)
        return self.n_x + boundary * k * k + p * k + q

    def metric_row(self, metric: str, processors: frozenset[str] | None = None) -> np.ndarray:
        """Coefficients of one additive total (seconds, joules, bytes, accuracy drop or the objective) over
        all variables; memory counts the weights on `processors` only (None: all). Shared: do not modify."""
        key = (metric, processors)
        if key in self._rows:
            return self._rows[key]
        inst = self.instance
        if metric == "objective":
            row = np.zeros(self.n)
            for m, w in inst.weights.items():
                row = row + w * self.metric_row(m)
        else:
            row = np.zeros(self.n)
            values = self.values[metric].copy()
            if processors is not None:
                values[[name not in processors for name in self.proc_name]] = 0.0
            position = {"latency": 0, "energy": 1}.get(metric)
            if position is not None:
                entry = np.array([inst.entry[q][position] for q in self.states])
                exit_ = np.array([inst.exit[q][position] for q in self.states])
                first, last = self.layer_of == 0, self.layer_of == self.n_layers - 1
                values[first] += entry[self.state_of[first]]
                values[last] += exit_[self.state_of[last]]
                for boundary, costs in enumerate(inst.transfer):
                    for (a, b), pair in costs.items():
                        row[self.y(boundary, self.state_index[a], self.state_index[b])] = pair[position]
            row[:self.n_x] = values
        self._rows[key] = row
        return row

    def selection_row(self, picks: Sequence[int]) -> np.ndarray:
        """Coefficients counting the layers whose choice is the one in `picks`."""
        row = np.zeros(self.n)
        row[[self.x(layer, c) for layer, c in enumerate(picks)]] = 1.0
        return row

    def _per_layer(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each layer's least, largest and largest absolute coefficient (every layer has a choice)."""
        starts = self.offsets[:-1]
        values = row[:self.n_x]
        return (np.minimum.reduceat(values, starts), np.maximum.reduceat(values, starts),
                np.maximum.reduceat(np.abs(values), starts))

    def span(self, metric: str, processors: frozenset[str] | None = None) -> tuple[float, float, float, np.ndarray]:
        """(least, largest, largest absolute) total of a `metric_row` over the plans, each layer at its extreme
        choice plus each boundary at its extreme transfer (bounds, not always reached), and each layer's
        least coefficient."""
        key = (metric, processors)
        if key not in self._spans:
            row = self.metric_row(metric, processors)
            if np.any(np.diff(self.offsets) == 0):  # a layer without a choice: no plan at all
                self._spans[key] = 0.0, 0.0, 0.0, np.zeros(self.n_layers)
            else:
                least, largest, magnitude = self._per_layer(row)
                flows = row[self.n_x:].reshape(self.n_layers - 1, -1) if self.n_y else np.zeros((0, 1))
                self._spans[key] = (float(least.sum() + np.minimum(flows.min(axis=1), 0.0).sum()),
                                    float(largest.sum() + np.maximum(flows.max(axis=1), 0.0).sum()),
                                    float(magnitude.sum() + np.abs(flows).max(axis=1).sum()), least)
        return self._spans[key]

    def _structure(self) -> LinearConstraint:
        """Exactly one choice per layer; the flows y sum to the placements on both sides of each boundary:
        row n_layers + 2 (l P + p) is layer l's side on processor p, the next row layer l + 1's."""
        n_layers, k = self.n_layers, len(self.states)
        j = np.arange(self.n_x)
        before, after = self.layer_of < n_layers - 1, self.layer_of > 0
        boundary, p, q = np.unravel_index(np.arange(self.n_y), (max(n_layers - 1, 0), k, k))
        rows = np.concatenate([self.layer_of, n_layers + 2 * (self.layer_of[before] * k + self.state_of[before]),
                               n_layers + 2 * ((self.layer_of[after] - 1) * k + self.state_of[after]) + 1,
                               n_layers + 2 * (boundary * k + p), n_layers + 2 * (boundary * k + q) + 1])
        cols = np.concatenate([j, j[before], j[after], self.n_x + np.arange(self.n_y), self.n_x + np.arange(self.n_y)])
        data = np.concatenate([np.ones(self.n_x), -np.ones(int(before.sum()) + int(after.sum())), np.ones(2 * self.n_y)])
        count = n_layers + 2 * (n_layers - 1) * k
        bounds = np.r_[np.ones(n_layers), np.zeros(count - n_layers)]
        return LinearConstraint(coo_matrix((data, (rows, cols)), shape=(count, self.n)).tocsr(), bounds, bounds)

    def scaled_rows(self, limits: Sequence[_Limit]) -> list[tuple[np.ndarray, float, float]]:
        """The limits as rows scaled so that each limit reads _REFERENCE (see FEASIBILITY_RTOL); a limit no
        plan can exceed is left out."""
        rows = []
        for limit in limits:
            row = self.metric_row(limit.metric, limit.processors)
            _, largest, magnitude, _ = self.span(limit.metric, limit.processors)
            if largest <= limit.bound:
                continue
            scale = _REFERENCE / max(abs(limit.bound), _SPREAD * magnitude)
            rows.append((row * scale, -np.inf, limit.bound * scale))
        return rows

    def upper_bounds(self, limits: Sequence[_Limit]) -> np.ndarray:
        """1 for every variable but the choices no plan can take, 0: those whose cost alone, with every other
        layer at its cheapest, breaks a limit. Exact, and it keeps HiGHS from trading a large coefficient
        times its integrality tolerance against a limit (a binary at 1e-9 of a 100x-the-budget choice)."""
        upper = np.ones(self.n)
        if np.any(np.diff(self.offsets) == 0):
            return upper
        for limit in limits:
            row = self.metric_row(limit.metric, limit.processors)
            least, _, magnitude, layer_least = self.span(limit.metric, limit.processors)
            margin = 2 * FEASIBILITY_RTOL * abs(limit.bound) + 1e-12 * magnitude  # beyond any rounding
            others = least - layer_least[self.layer_of]
            upper[:self.n_x][others + row[:self.n_x] > limit.bound + margin] = 0.0
        return upper

    def objective_scale(self, metric: str) -> float:
        """The factor that makes the lower bound of the objective (a `metric_row`) read _REFERENCE (see
        FEASIBILITY_RTOL)."""
        least, _, magnitude, _ = self.span(metric)
        reference = max(least, _SPREAD * magnitude)
        return _REFERENCE / reference if reference > 0 else 1.0

    def run(self, minimise: str, limits: Sequence[_Limit], selections: Sequence[tuple[np.ndarray, float, float]],
            time_limit_s: float) -> _Answer:
        """HiGHS's answer for this program (minimise a `metric_row` under `limits` and `selections`), with the
        factor HiGHS saw the objective multiplied by (see `objective_scale`)."""
        scale = self.objective_scale(minimise)
        objective = self.metric_row(minimise) * scale
        rows = self.scaled_rows(limits) + list(selections)
        constraints = [self.structure]
        if rows:
            constraints.append(LinearConstraint(np.array([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows]))
        integrality = np.r_[np.ones(self.n_x), np.zeros(self.n_y)]
        result = run_milp(objective, constraints, integrality, self.upper_bounds(limits), time_limit_s, _HIGHS_OPTIONS)
        return _Answer(result.status, result.x, result.fun, scale, result.message)

    def picks(self, x: np.ndarray) -> list[int]:
        return [int(np.argmax(x[self.offsets[layer]:self.offsets[layer + 1]])) for layer in range(self.n_layers)]

    def least(self, metric: str, limits: Sequence[_Limit], time_limit_s: float) -> float | None:
        """The least total of a metric over the plans that meet `limits` (recomputed at HiGHS's plan;
        None when HiGHS finds none)."""
        result = self.run(metric, limits, [], time_limit_s)
        return None if result.status != 0 or result.x is None else _total(self.instance, self.picks(result.x), metric)


def _diagnose(instance: Instance, program: _Program, incumbent: float | None, time_limit_s: float) -> str:
    """Name the constraint that cannot be met and the best value reachable for it (recomputed)."""
    reasons = []
    if instance.latency_budget_s is not None:
        fastest = program.least("latency", _limits(instance, latency=False), time_limit_s)
        if fastest is not None and not _meets(fastest, instance.latency_budget_s):
            took, budget = _distinct("latency", fastest, instance.latency_budget_s)
            reasons.append(f"the fastest plan takes {took}; the budget is {budget}")
    if instance.memory_limit_bytes is not None:
        smallest = program.least("memory", _limits(instance, latency=False, memory=False), time_limit_s)
        if smallest is not None and not _meets(smallest, instance.memory_limit_bytes):
            needs, limit = _distinct("megabytes", smallest, instance.memory_limit_bytes)
            reasons.append(f"the smallest plan needs {needs} of weights; the limit is {limit}")
    if not reasons:
        alone = program.run("latency", _limits(instance, latency=False, accuracy=False), [], time_limit_s)
        if alone.status == 2:
            reasons.append("the model's weights do not fit in the processors' memory at any rank and precision")
    if not reasons and incumbent is not None:
        reasons.append(f"no plan beats the incumbent's objective {incumbent:g}")
    if not reasons:
        reasons.append("the latency, accuracy and memory constraints cannot all be met together: loosen one "
                       "(--latency-ms, --max-accuracy-drop, --memory-mb)")
    return "; ".join(reasons)


def picks_for(instance: Instance, plan: Plan) -> list[int] | None:
    """The plan as a choice index per layer of the instance (None if a decision is not among its choices)."""
    picks = []
    for options, (_, decision) in zip(instance.choices, plan.decisions):
        index = next((i for i, choice in enumerate(options) if choice.decision == decision), None)
        if index is None:
            return None
        picks.append(index)
    return picks


def objective_of(instance: Instance, plan: Plan) -> float | None:
    """The plan's objective on the instance's model (None if a decision is not among its choices)."""
    picks = picks_for(instance, plan)
    return None if picks is None else predicted(instance, picks)["objective"]

