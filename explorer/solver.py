"""The analytic DAD/RLC solver: an exact mixed-integer program over rank, processor and precision.

Variables: a binary x[l, c] per layer l and choice c = (rung, precision, processor); exactly one
per layer. Transfers between consecutive layers are linearised exactly with flow variables
y[l, p, q] >= 0 (sum over q of y[l, p, q] = placement of layer l on p, sum over p = placement of
layer l + 1 on q), which equal the product of the two placements at any integer point. The input
comes from, and the output returns to, the board's first processor.

Objective: energy, latency, weight memory, or a weighted sum (each relative to the baseline).
Constraints: latency <= budget, the additive accuracy-drop estimate from the sensitivity table
<= limit, weights per processor <= its memory, local weights <= the board's available memory,
total weights <= an optional limit; an optional incumbent value bounds the objective from above.
Solved exactly with SciPy's HiGHS (`scipy.optimize.milp`). Exact on its model, which is the
additive cost model: the measured (or simulated) result of its plan differs, which is what the
search agents are for.
"""
from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import scipy
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix, lil_matrix

from explorer.cache import AppendOnlyCache, digest
from explorer.errors import ExplorerError
from explorer.paths import cache_dir
from explorer.plan import Decision, Plan

METRICS = ("energy", "latency", "memory")


@dataclass(frozen=True)
class Choice:
    """One option of one layer with its additive costs."""

    decision: Decision
    latency_s: float
    energy_j: float
    weight_bytes: float
    accuracy_drop: float  # estimate from the sensitivity table (0 when not measured)


@dataclass
class Instance:
    """What the integer program needs, independent of where the numbers came from."""

    layer_names: list[str]
    choices: list[list[Choice]]
    processors: list[str]
    transfer: list[dict[tuple[str, str], tuple[float, float]]]  # per boundary l -> l+1: (s, J) for p != q
    entry: dict[str, tuple[float, float]]  # (s, J) to bring the input to the first layer's processor
    exit: dict[str, tuple[float, float]]  # (s, J) to bring the output back
    capacity_bytes: dict[str, float]  # per processor
    local: set[str] = field(default_factory=set)  # processors that share the board's memory
    local_capacity_bytes: float = float("inf")
    latency_budget_s: float | None = None
    accuracy_limit: float | None = None
    memory_limit_bytes: float | None = None
    weights: dict[str, float] = field(default_factory=lambda: {"energy": 1.0})  # metric -> weight / scale


@dataclass
class Solution:
    """The optimal plan on the model, its predicted metrics and how the solve went."""

    plan: Plan | None
    status: str  # optimal | infeasible | time limit
    objective: float
    latency_s: float
    energy_j: float
    weight_bytes: float
    accuracy_drop: float
    seconds: float
    message: str = ""

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


def predicted(instance: Instance, picks: list[int]) -> dict[str, float]:
    """Additive metrics of a choice index per layer (the model the solver optimises)."""
    chosen = [instance.choices[l][c] for l, c in enumerate(picks)]
    procs = [c.decision.processor for c in chosen]
    latency = sum(c.latency_s for c in chosen) + instance.entry[procs[0]][0] + instance.exit[procs[-1]][0]
    energy = sum(c.energy_j for c in chosen) + instance.entry[procs[0]][1] + instance.exit[procs[-1]][1]
    for l in range(len(procs) - 1):
        if procs[l] != procs[l + 1]:
            seconds, joules = instance.transfer[l][(procs[l], procs[l + 1])]
            latency, energy = latency + seconds, energy + joules
    memory = sum(c.weight_bytes for c in chosen)
    drop = sum(c.accuracy_drop for c in chosen)
    value = {"energy": energy, "latency": latency, "memory": memory}
    objective = sum(w * value[m] for m, w in instance.weights.items())
    return {"latency": latency, "energy": energy, "memory": memory, "accuracy_drop": drop, "objective": objective}


def solve(instance: Instance, incumbent_objective: float | None = None, time_limit_s: float = 60.0,
          exclude: Sequence[Sequence[int]] = (), near: tuple[Sequence[int], int] | None = None) -> Solution:
    """Solve the instance exactly; `incumbent_objective` (if given) bounds the objective from above.
    `exclude`: plans (a choice index per layer, see `picks_for`) the solution must differ from;
    `near` = (picks, radius): the solution differs from that plan in at most `radius` layers."""
    started = time.perf_counter()
    program = _Program(instance)
    rows = program.constraints(include_latency=True, include_accuracy=True, include_memory=True)
    if incumbent_objective is not None:
        rows.append((program.objective_row(), -np.inf, incumbent_objective * (1 + 1e-9) + 1e-12))
    layers = len(instance.choices)
    rows += [(program.selection_row(picks), -np.inf, layers - 1) for picks in exclude]
    if near is not None:
        picks, radius = near
        rows.append((program.selection_row(picks), layers - radius, np.inf))
    result = program.run(program.objective_row(), rows, time_limit_s)
    seconds = time.perf_counter() - started
    if result.status == 2 or result.x is None:
        message = _diagnose(instance, program, incumbent_objective, time_limit_s) if result.status == 2 else result.message
        return Solution(None, "infeasible" if result.status == 2 else "time limit", np.inf, np.nan, np.nan, np.nan,
                        np.nan, seconds, message)
    picks = program.picks(result.x)
    metrics = predicted(instance, picks)
    plan = Plan(tuple((name, instance.choices[l][c].decision) for l, (name, c) in enumerate(zip(instance.layer_names, picks))))
    status = "optimal" if result.status == 0 else "time limit"
    return Solution(plan, status, metrics["objective"], metrics["latency"], metrics["energy"], metrics["memory"],
                    metrics["accuracy_drop"], seconds, result.message)


class _Program:
    """Variable layout and rows of the mixed-integer program."""

    def __init__(self, instance: Instance):
        self.instance = instance
        self.procs = instance.processors
        self.offsets = np.cumsum([0] + [len(c) for c in instance.choices])
        self.n_x = int(self.offsets[-1])
        n_layers = len(instance.choices)
        p = len(self.procs)
        self.n_y = (n_layers - 1) * p * p
        self.n = self.n_x + self.n_y
        self.proc_index = {q: i for i, q in enumerate(self.procs)}

    def x(self, layer: int, choice: int) -> int:
        return int(self.offsets[layer] + choice)

    def y(self, boundary: int, p: int, q: int) -> int:
        k = len(self.procs)
        return self.n_x + boundary * k * k + p * k + q

    def metric_row(self, metric: str) -> np.ndarray:
        """Coefficients of one additive metric (seconds, joules or bytes) over all variables."""
        inst = self.instance
        row = np.zeros(self.n)
        attribute = {"latency": "latency_s", "energy": "energy_j", "memory": "weight_bytes"}[metric]
        position = {"latency": 0, "energy": 1}.get(metric)
        for l, choices in enumerate(inst.choices):
            for c, choice in enumerate(choices):
                value = getattr(choice, attribute)
                if position is not None:
                    proc = choice.decision.processor
                    if l == 0:
                        value += inst.entry[proc][position]
                    if l == len(inst.choices) - 1:
                        value += inst.exit[proc][position]
                row[self.x(l, c)] = value
        if position is not None:
            for l, costs in enumerate(inst.transfer):
                for (a, b), pair in costs.items():
                    row[self.y(l, self.proc_index[a], self.proc_index[b])] = pair[position]
        return row

    def selection_row(self, picks: Sequence[int]) -> np.ndarray:
        """Coefficients counting the layers whose choice is the one in `picks`."""
        row = np.zeros(self.n)
        row[[self.x(l, c) for l, c in enumerate(picks)]] = 1.0
        return row

    def objective_row(self) -> np.ndarray:
        return sum(w * self.metric_row(m) for m, w in self.instance.weights.items())

    def constraints(self, include_latency: bool, include_accuracy: bool, include_memory: bool) -> list:
        inst = self.instance
        rows: list[tuple[np.ndarray, float, float]] = []
        n_layers = len(inst.choices)
        structure = lil_matrix((n_layers + 2 * (n_layers - 1) * len(self.procs), self.n))
        r = 0
        for l, choices in enumerate(inst.choices):  # exactly one choice per layer
            for c in range(len(choices)):
                structure[r, self.x(l, c)] = 1.0
            r += 1
        for l in range(n_layers - 1):  # flow: y sums to the placements on both sides of the boundary
            for pi, p in enumerate(self.procs):
                for c, choice in enumerate(inst.choices[l]):
                    if choice.decision.processor == p:
                        structure[r, self.x(l, c)] = -1.0
                for q in range(len(self.procs)):
                    structure[r, self.y(l, pi, q)] = 1.0
                r += 1
                for c, choice in enumerate(inst.choices[l + 1]):
                    if choice.decision.processor == p:
                        structure[r, self.x(l + 1, c)] = -1.0
                for q in range(len(self.procs)):
                    structure[r, self.y(l, q, pi)] = 1.0
                r += 1
        self.structure = LinearConstraint(structure.tocsr(), 1.0 * np.r_[np.ones(n_layers), np.zeros(r - n_layers)],
                                          np.r_[np.ones(n_layers), np.zeros(r - n_layers)])
        if include_latency and inst.latency_budget_s is not None:
            rows.append((self.metric_row("latency"), -np.inf, inst.latency_budget_s))
        if include_accuracy and inst.accuracy_limit is not None:
            row = np.zeros(self.n)
            for l, choices in enumerate(inst.choices):
                for c, choice in enumerate(choices):
                    row[self.x(l, c)] = choice.accuracy_drop
            rows.append((row, -np.inf, inst.accuracy_limit))
        if include_memory:
            for proc, capacity in inst.capacity_bytes.items():
                rows.append((self._weights_on({proc}), -np.inf, capacity))
            if inst.local and np.isfinite(inst.local_capacity_bytes):
                rows.append((self._weights_on(inst.local), -np.inf, inst.local_capacity_bytes))
            if inst.memory_limit_bytes is not None:
                rows.append((self.metric_row("memory"), -np.inf, inst.memory_limit_bytes))
        return rows

    def _weights_on(self, procs: set[str]) -> np.ndarray:
        row = np.zeros(self.n)
        for l, choices in enumerate(self.instance.choices):
            for c, choice in enumerate(choices):
                if choice.decision.processor in procs:
                    row[self.x(l, c)] = choice.weight_bytes
        return row

    def run(self, objective: np.ndarray, rows: list, time_limit_s: float) -> SimpleNamespace:
        """HiGHS's result (status, x, fun, message) for this program, recalled from the solve cache when
        the same program was solved before (see `_solve_key`)."""
        constraints = [self.structure]
        if rows:
            constraints.append(LinearConstraint(np.array([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows]))
        integrality = np.r_[np.ones(self.n_x), np.zeros(self.n_y)]
        key = _solve_key(objective, constraints, integrality, time_limit_s)
        cached = _solve_cache().get(key)
        if cached is not None:
            x = None
            if cached["x"] is not None:
                x = np.zeros(self.n)
                x[cached["x"][0]] = cached["x"][1]
            return SimpleNamespace(status=cached["status"], x=x, fun=cached["fun"], message=cached["message"])
        with _highs_debug_prints_hidden():
            result = milp(objective, constraints=constraints, integrality=integrality,
                          bounds=Bounds(np.zeros(self.n), np.ones(self.n)),
                          options={"time_limit": time_limit_s, "mip_rel_gap": 0.0, "presolve": True})
        x = None if result.x is None else np.asarray(result.x)
        nonzero = None if x is None else np.flatnonzero(np.abs(x) > 1e-12)
        _solve_cache().put(key, {"status": int(result.status), "message": str(result.message),
                                 "fun": None if result.fun is None else float(result.fun),
                                 "x": None if x is None else [nonzero.tolist(), x[nonzero].tolist()]})
        return SimpleNamespace(status=int(result.status), x=x, fun=result.fun, message=result.message)

    def picks(self, x: np.ndarray) -> list[int]:
        return [int(np.argmax(x[self.offsets[l]:self.offsets[l + 1]])) for l in range(len(self.instance.choices))]


_SOLVE_CACHES: dict[Path, AppendOnlyCache] = {}


def _solve_cache() -> AppendOnlyCache:
    """HiGHS results by program, in runs/cache/solves/ (one per runs folder). A search replayed from the
    evaluation cache (a benchmark run again after an interruption) makes the same solves: recalled, they
    cost nothing, and a solve that reached its time limit gives the same answer again."""
    path = cache_dir("solves") / "highs.jsonl"
    if path not in _SOLVE_CACHES:
        _SOLVE_CACHES[path] = AppendOnlyCache(path)
    return _SOLVE_CACHES[path]


def _solve_key(objective: np.ndarray, constraints: list[LinearConstraint], integrality: np.ndarray,
               time_limit_s: float) -> str:
    """A digest of everything HiGHS is given (and of SciPy's version, which fixes the HiGHS inside)."""
    parts: list[bytes] = [scipy.__version__.encode(), repr(float(time_limit_s)).encode(),
                          np.ascontiguousarray(objective, dtype=float).tobytes(),
                          np.ascontiguousarray(integrality, dtype=float).tobytes()]
    for constraint in constraints:
        matrix = csr_matrix(constraint.A)
        parts += [repr(matrix.shape).encode(), matrix.indptr.tobytes(), matrix.indices.tobytes(),
                  np.ascontiguousarray(matrix.data, dtype=float).tobytes(),
                  np.ascontiguousarray(constraint.lb, dtype=float).tobytes(),
                  np.ascontiguousarray(constraint.ub, dtype=float).tobytes()]
    return digest(*parts)


_libc = ctypes.CDLL(None)


@contextmanager
def _highs_debug_prints_hidden() -> Iterator[None]:
    """Discard what C code writes to stdout meanwhile: the HiGHS inside SciPy 1.17 prints a debugging line
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();") with printf even when
    its output is off (ERGO-Code/HiGHS#2783), which would land in the middle of a search's output."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        _libc.fflush(None)  # C's buffered stdout goes to /dev/null too, not out after the restore
        os.dup2(saved, 1)
        os.close(saved)


def _diagnose(instance: Instance, program: _Program, incumbent: float | None, time_limit_s: float) -> str:
    """Name the constraint that cannot be met and the best value reachable for it."""
    reasons = []
    checks = [("latency", instance.latency_budget_s, lambda v: f"the fastest plan takes {v * 1e3:.3f} ms; the budget is {instance.latency_budget_s * 1e3:g} ms"),
              ("memory", instance.memory_limit_bytes, lambda v: f"the smallest plan needs {v / 2**20:.2f} MB of weights; the limit is {instance.memory_limit_bytes / 2**20:g} MB")]
    for metric, limit, text in checks:
        if limit is None:
            continue
        rows = program.constraints(include_latency=False, include_accuracy=metric != "accuracy", include_memory=metric != "memory")
        best = program.run(program.metric_row(metric), rows, time_limit_s)
        if best.status == 0 and best.fun > limit * (1 + 1e-9):
            reasons.append(text(best.fun))
    if not reasons:
        rows = program.constraints(include_latency=False, include_accuracy=False, include_memory=True)
        alone = program.run(program.metric_row("latency"), rows, time_limit_s)
        if alone.status == 2:
            reasons.append("the model's weights do not fit in the processors' memory at any rank and precision")
    if not reasons and incumbent is not None:
        reasons.append(f"no plan beats the incumbent's objective {incumbent:g}")
    if not reasons:
        reasons.append("the latency, accuracy and memory constraints cannot all be met together: loosen one "
                       "(--latency-ms, --max-accuracy-drop, --memory-mb)")
    return "; ".join(reasons)


def instance_for(problem, cost_model=None, sensitivity=None) -> Instance:
    """The integer program of a Problem: its design space priced by the (calibrated) cost model,
    accuracy loss estimated additively from the sensitivity table (SensitivityTable.estimate)."""
    from explorer.accuracy import sensitivity_table

    cost_model = cost_model or problem.cost_model
    graph, board = problem.graph, problem.board
    if sensitivity is None and problem.scorer.measured:
        sensitivity = sensitivity_table(graph, problem.compressor, problem.scorer)
    choices = []
    for layer in graph.layers:
        options = []
        for decision in problem.choices(layer):
            rung = problem.compressor.rung(layer.name, decision.method, decision.rank)
            cost = cost_model.layer_cost(layer, rung, decision.precision, decision.processor)
            drop = sensitivity.estimate(layer.name, rung.method, rung.rank, decision.precision) if sensitivity else 0.0
            options.append(Choice(decision, cost.latency_s, cost.energy_j, cost.weight_bytes, drop))
        choices.append(options)
    processors = list(board.processor_ids)
    transfer = [{(a, b): cost_model.transfer(layer, a, b) for a in processors for b in processors if a != b}
                for layer in graph.layers[:-1]]
    entry = {p: cost_model.input_transfer(p) for p in processors}
    exit_ = {p: cost_model.output_transfer(p) for p in processors}
    c = problem.constraints
    instance = Instance(
        layer_names=[layer.name for layer in graph.layers], choices=choices, processors=processors,
        transfer=transfer, entry=entry, exit=exit_,
        capacity_bytes={p: proc.memory_mb * 2**20 for p, proc in board.processors.items()},
        local={p for p, proc in board.processors.items() if not proc.is_remote},
        local_capacity_bytes=board.memory.available_mb * 2**20,
        latency_budget_s=c.latency_ms / 1e3 if c.latency_ms is not None else None,
        accuracy_limit=c.max_accuracy_drop if sensitivity is not None else None,
        memory_limit_bytes=c.memory_mb * 2**20 if c.memory_mb is not None else None,
    )
    weights = dict(problem.objective.weights)
    if len(weights) > 1:  # relative to the baseline plan's predicted metrics
        baseline = problem.baseline_plan()
        base = predicted(instance, picks_for(instance, baseline))
        weights = {m: w / max(base[m], 1e-30) for m, w in weights.items()}
    instance.weights = weights
    return instance


def solve_problem(problem, incumbent: Plan | None = None, cost_model=None, time_limit_s: float = 60.0) -> Solution:
    """Solve a Problem on its (calibrated) cost model; an incumbent plan bounds the objective.

    Raises ExplorerError with the diagnosis when no plan satisfies the constraints.
    """
    instance = instance_for(problem, cost_model)
    bound = objective_of(instance, incumbent) if incumbent is not None else None
    solution = solve(instance, bound, time_limit_s)
    if solution.status == "infeasible":
        raise ExplorerError(f"no plan meets the constraints: {solution.message}")
    return solution


@dataclass
class MeasuredSolve:
    """Rounds of solve -> evaluate -> feed the measurement back -> re-solve."""

    plan: Plan  # the best plan found (feasible when any round was)
    evaluation: object  # its Evaluation
    rounds: list[tuple[Solution, object]]  # (solution, evaluation) per round
    cost_model: object  # the cost model after recalibration

    @property
    def feasible(self) -> bool:
        return self.evaluation.feasible


def solve_measured(problem, rounds: int = 6, incumbent: Plan | None = None, cost_model=None,
                   time_limit_s: float = 60.0) -> MeasuredSolve:
    """Solve, evaluate the plan through Problem.evaluate, and let the measurement correct the model.

    The additive model misjudges real effects (accuracy drops compound; overheads, shapes and
    contention it lacks), so after every evaluated round the cost model is recalibrated per
    (processor, op kind, precision) from the measured blocks, and while the evaluated plan is
    infeasible (accuracy: the additive budget shrinks by the estimated/measured ratio) or no better
    than the best plan measured so far (the reference plans, the incumbent, earlier rounds), the solver
    re-solves with that best plan's predicted objective as the bound. Stops at the first feasible
    plan that beats the best measured one, or when the model predicts nothing better.
    Returns the best feasible round (or the last one) and every round.
    """
    from explorer.accuracy import sensitivity_table

    cost_model = cost_model or problem.cost_model
    sensitivity = sensitivity_table(problem.graph, problem.compressor, problem.scorer) if problem.scorer.measured else None
    known = [plan for _, plan in problem.reference_plans()] + ([incumbent] if incumbent is not None else [])
    feasible_known = [(problem.evaluate(plan).objective, plan) for plan in known if problem.evaluate(plan).feasible]
    best_known = min(feasible_known, key=lambda pair: pair[0])[1] if feasible_known else None
    accuracy_scale = 1.0
    history: list[tuple[Solution, object]] = []
    for _ in range(rounds):
        instance = instance_for(problem, cost_model, sensitivity)
        if instance.accuracy_limit is not None:
            instance.accuracy_limit *= accuracy_scale
        bound = objective_of(instance, best_known) if best_known is not None else None
        solution = solve(instance, bound, time_limit_s)
        if solution.plan is None:
            if not history and bound is None:
                raise ExplorerError(f"no plan meets the constraints: {solution.message}")
            break  # the (recalibrated) model predicts nothing better than the best measured plan
        evaluation = problem.evaluate(solution.plan)
        history.append((solution, evaluation))
        cost_model = cost_model.calibrated(block_observations(problem, cost_model, solution.plan, evaluation))
        if evaluation.feasible:
            if best_known is None or evaluation.objective < problem.evaluate(best_known).objective:
                break
            continue
        if evaluation.accuracy_drop is not None and evaluation.accuracy_drop > (problem.constraints.max_accuracy_drop or np.inf):
            ratio = solution.accuracy_drop / max(evaluation.accuracy_drop, 1e-9)
            accuracy_scale *= float(np.clip(ratio, 0.1, 0.8))
    if not history:
        if best_known is not None and best_known == incumbent:
            raise ExplorerError(f"the solver's model predicts nothing better than the incumbent plan "
                                f"({problem.evaluate(incumbent).objective:.4g}, measured)")
        name = next((name for name, plan in problem.reference_plans() if plan == best_known), "the baseline")
        raise ExplorerError(f"the solver's model predicts nothing better than the best reference plan ({name})")
    feasible = [(s, e) for s, e in history if e.feasible]
    best_solution, best = min(feasible, key=lambda se: se[1].objective) if feasible else history[-1]
    return MeasuredSolve(best_solution.plan, best, history, cost_model)


def picks_for(instance: Instance, plan: Plan) -> list[int] | None:
    """The plan as a choice index per layer of the instance (None if a decision is not among its choices)."""
    picks = [next((i for i, ch in enumerate(options) if ch.decision == d), None)
             for options, (_, d) in zip(instance.choices, plan.decisions)]
    return None if None in picks else picks


def objective_of(instance: Instance, plan: Plan) -> float | None:
    """The plan's objective on the instance's model (None if a decision is not among its choices)."""
    picks = picks_for(instance, plan)
    return None if picks is None else predicted(instance, picks)["objective"]


def block_observations(problem, cost_model, plan: Plan, evaluation) -> list[tuple[str, str, str, float, float]]:
    """(processor, op kind, precision, predicted s, measured s) per layer, from measured blocks
    (a block's measured/predicted ratio is shared by its layers)."""
    observations = []
    layers = problem.graph.layer_by_name
    for block in evaluation.blocks:
        costs = []
        for name in block["layers"]:
            decision = plan[name]
            rung = problem.compressor.rung(name, decision.method, decision.rank)
            costs.append((layers[name], decision, cost_model.layer_cost(layers[name], rung, decision.precision, decision.processor).latency_s))
        predicted_s = sum(c for _, _, c in costs)
        ratio = (block["latency_ms"] / 1e3) / max(predicted_s, 1e-12)
        observations += [(d.processor, layer.kind, d.precision, c, c * ratio) for layer, d, c in costs]
    return observations
