"""The one seam: `Problem.evaluate(plan) -> Evaluation`.

Every agent, the environment, the benchmarks and the CLI evaluate plans through this call, so
validation, caching (memory and disk), accuracy scoring and feasibility live in one place.
Accuracy depends only on ranks and precisions, never on placement, and is cached that way.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from explorer.accuracy import (
    DEFAULT_ERROR_BOUND,
    NOT_MEASURED,
    AccuracyResult,
    AccuracyScorer,
    calibration_inputs,
    drop_text,
    rungs_within_bound,
)
from explorer.blockrun import int8_exact
from explorer.boards import Board
from explorer.cache import AppendOnlyCache, atomic_write_json, digest, read_json, unreadable
from explorer.compress import Compressor, Rung
from explorer.cost import CostModel
from explorer.errors import ExplorerError
from explorer.graph import Layer, LayerGraph
from explorer.measure import BlockReport, Measurement, MeasurementFailed, Measurer
from explorer.paths import cache_dir
from explorer.plan import Decision, Plan

OBJECTIVES = ("energy", "latency", "memory")
DEFAULT_LATENCY_MS = 5000.0  # DeepX: one inference never longer than 5 s
DEFAULT_MAX_ACCURACY_DROP = 0.05  # DeepX: compression limited to about a 5 % accuracy fall


@dataclass(frozen=True)
class Constraints:
    """Limits a feasible plan respects (None: no limit)."""

    latency_ms: float | None = DEFAULT_LATENCY_MS
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP  # fraction: 0.01 = one point
    memory_mb: float | None = None  # total weight memory


@dataclass(frozen=True)
class Objective:
    """Minimise one metric, or a weighted sum of metrics each relative to the baseline plan."""

    weights: tuple[tuple[str, float], ...] = (("energy", 1.0),)

    @classmethod
    def parse(cls, text: str) -> Objective:
        """'energy', 'latency', 'memory', or a weighted sum like 'energy:0.7,latency:0.3'."""
        weights = []
        for part in text.split(","):
            name, _, weight = part.strip().partition(":")
            if name not in OBJECTIVES:
                raise ExplorerError(f"unknown objective {name!r}: use one of {', '.join(OBJECTIVES)} "
                                    "or a weighted sum like energy:0.7,latency:0.3")
            try:
                value = float(weight) if weight else 1.0
            except ValueError:
                raise ExplorerError(f"objective weight {weight!r} is not a number (e.g. energy:0.7,latency:0.3)") from None
            if not (math.isfinite(value) and value > 0):  # a zero or negative weight would reward the worse plan
                raise ExplorerError(f"objective weight {name}:{weight} must be a positive number (e.g. energy:0.7,latency:0.3); "
                                    "leave a metric out instead of giving it weight 0")
            weights.append((name, value))
        return cls(tuple(weights))

    @property
    def single(self) -> str | None:
        return self.weights[0][0] if len(self.weights) == 1 else None

    def describe(self) -> str:
        return self.single or " + ".join(f"{w:g} x {n}/baseline" for n, w in self.weights)


def metric_value(name: str, latency_ms: float, energy_mj: float, memory_mb: float) -> float:
    return {"energy": energy_mj, "latency": latency_ms, "memory": memory_mb}[name]


#: What a constraint limits; every Excess is of one kind (Optuna's constraint list has one value per kind).
CONSTRAINT_KINDS = ("latency", "accuracy_drop", "memory")
ACCURACY_LIMIT_FLOOR = 1e-3  # a zero accuracy limit counts as 0.1 point when an excess is made relative to it


@dataclass(frozen=True)
class Excess:
    """One constraint of one plan: the measured value against its limit, and how far past it, relative.

    Made once, by `Problem.evaluate`, for every constraint that applies (the latency budget, the accuracy
    limit, the total weight-memory limit, each processor holding weights and the board's memory): the
    Evaluation's feasibility and violations, the environment's reward and Optuna's constraints all read it.
    """

    kind: str  # one of CONSTRAINT_KINDS
    subject: str  # what is limited: "latency", "accuracy drop", "weight memory" (total), a processor id, "board memory"
    value: float  # ms, fraction, MB
    limit: float

    @property
    def broken(self) -> bool:
        return self.value > self.limit

    @property
    def relative(self) -> float:
        """(value - limit) / limit: > 0 when broken, <= 0 when met (a zero limit counts as a small one)."""
        floor = ACCURACY_LIMIT_FLOOR if self.kind == "accuracy_drop" else 1e-12
        return (self.value - self.limit) / max(self.limit, floor)


@dataclass
class Evaluation:
    """Everything known about one plan: measured cost, accuracy, feasibility, objective."""

    plan_digest: str
    latency_ms: float
    latency_spread_ms: float
    energy_mj: float
    energy_source: str
    memory_mb: float  # total weight memory
    memory_mb_by_processor: dict[str, float]
    accuracy: float | None
    accuracy_metric: str
    accuracy_drop: float | None
    feasible: bool  # no constraint broken (and measured at all)
    violations: list[str]  # the broken constraints (or the failed measurement), in words
    objective: float
    measured_by: str
    blocks: list[BlockReport] = field(default_factory=list)
    excess: list[Excess] = field(default_factory=list)  # every constraint that applies (none for a failed measurement)
    peak_memory_mb: float | None = None
    error: str | None = None  # the measurement failed (a failed trial: infeasible, not cached)
    accuracy_basis: str = ""  # "" (top-1 on labels), accuracy.UNLABELLED_LABEL or accuracy.SYNTHETIC_LABEL
    accuracy_samples: int = 0
    predicted: bool = False  # latency, energy and memory are a cost model's prediction, not a measurement (explorer.screening)

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def total_excess(self) -> float:
        """The sum of the relative excesses of the broken constraints (0 when none is broken)."""
        return sum(max(0.0, e.relative) for e in self.excess)

    def worst_excess(self, kind: str) -> float | None:
        """The largest relative excess of the constraints of one kind (None: no constraint of that kind)."""
        values = [e.relative for e in self.excess if e.kind == kind]
        return max(values) if values else None

    def to_json(self) -> dict:
        return asdict(self)

    def accuracy_text(self) -> str:
        if self.accuracy is None:
            return NOT_MEASURED
        return (f"{100 * self.accuracy:.2f}% {self.accuracy_metric} "
                f"({drop_text(self.accuracy_drop, self.accuracy_basis, self.accuracy_samples)})")


class Problem:
    """A model, a board, a measurer, validation data, constraints and an objective."""

    def __init__(self, graph: LayerGraph, board: Board, measurer: Measurer, scorer: AccuracyScorer,
                 constraints: Constraints = Constraints(), objective: Objective = Objective(),
                 compressor: Compressor | None = None, use_disk_cache: bool = True,
                 error_bound: float | None = DEFAULT_ERROR_BOUND):
        self.graph = graph
        self.board = board
        self.measurer = measurer
        self.scorer = scorer
        self.constraints = constraints
        self.objective = objective
        # int8 quantised so that neither this machine (it scores every plan) nor the measured device saturates
        self.compressor = compressor or Compressor(graph, reduce_range=not (int8_exact() and measurer.int8_exact()))
        self.cost_model: CostModel = CostModel(board, graph, self.compressor)
        self.cost_model_note = "roofline model" + (" of the simulated board" if getattr(measurer, "simulated", False) else "")
        self.use_disk_cache = use_disk_cache
        self.error_bound = error_bound  # without data: max relative reconstruction error per layer (None: no bound)
        self.calibration_inputs, self.calibration_source = calibration_inputs(graph, scorer.dataset)
        self.settings: dict | None = None  # the names it was built from (explorer.api.load_problem), for tracking
        self.screening = True  # a search on a real device may answer plans with predictions (explorer.screening); False: never
        self.evaluations = 0  # measured (not cached) evaluations
        self._memory_cache: dict[str, Evaluation] = {}
        self._accuracy_cache: dict[str, AccuracyResult] = {}
        self._baseline: Evaluation | None = None
        int8 = self.compressor.int8_scheme
        self._key = digest(graph.fingerprint(), scorer.data_digest(), board.digest, measurer.identity(board), int8)
        self._accuracy_key = digest(graph.fingerprint(), scorer.data_digest(), "accuracy-v1", int8)
        self._measurements = AppendOnlyCache(self.cache_file())

    # ---- the design space ---------------------------------------------------------------------
    def rungs(self, layer: Layer) -> list[Rung]:
        """Rungs offered for a layer: without data limited by the reconstruction-error bound, on synthetic
        inputs too (they are not the real distribution; there the bound is at most DEFAULT_ERROR_BOUND, the
        rungs their sensitivity table covers)."""
        if self.scorer.synthetic:
            bound = DEFAULT_ERROR_BOUND if self.error_bound is None else min(self.error_bound, DEFAULT_ERROR_BOUND)
            return rungs_within_bound(self.compressor, layer.name, bound)
        if self.scorer.measured or self.error_bound is None:
            return self.compressor.ladder(layer.name)
        return rungs_within_bound(self.compressor, layer.name, self.error_bound)

    def choices(self, layer: Layer) -> list[Decision]:
        """Every valid decision for a layer: offered rung x supported precision x capable processor."""
        options = []
        for rung in self.rungs(layer):
            for pid, processor in self.board.processors.items():
                for precision in processor.precisions:
                    if layer.op_type in processor.ops:
                        options.append(Decision(rung.method, rung.rank, precision, pid))
        return options

    def validate(self, plan: Plan) -> None:
        """ExplorerError naming the first decision that is not in the design space."""
        names = [name for name, _ in plan.decisions]
        if names != [layer.name for layer in self.graph.layers]:
            raise ExplorerError("the plan's layers are not this model's decision layers: make the plan for this model")
        for (name, decision), layer in zip(plan.decisions, self.graph.layers):
            if decision.processor is None:
                raise ExplorerError(f"layer {name} has no processor: every decision needs one of "
                                    f"{', '.join(self.board.processor_ids)}")
            processor = self.board.processor(decision.processor)
            if decision.precision not in processor.precisions:
                raise ExplorerError(f"layer {name}: {decision.processor} of {self.board.name} does not run {decision.precision} "
                                    f"(it runs {', '.join(processor.precisions)})")
            if layer.op_type not in processor.ops:
                raise ExplorerError(f"layer {name}: {decision.processor} does not run {layer.op_type}")
            rung = self.compressor.rung(name, decision.method, decision.rank)
            if (rung.method, rung.rank) not in {(r.method, r.rank) for r in self.rungs(layer)}:
                raise ExplorerError(f"layer {name}: rung {rung.label()} exceeds the reconstruction-error bound used without data")

    # ---- evaluation ---------------------------------------------------------------------------
    @property
    def parallelism(self) -> int:
        """How many plans the measurer measures at once (agents batch their proposals to match)."""
        return self.measurer.parallelism

    def evaluate(self, plan: Plan) -> Evaluation:
        """Measure (or recall) a plan and score it; the only path agents use.

        A measurement that fails (MeasurementFailed: no measurement server could measure it) gives a
        failed, infeasible Evaluation that is not cached, so the plan can be measured again later.
        """
        return self.evaluate_many([plan])[0]

    def evaluate_many(self, plans: list[Plan]) -> list[Evaluation]:
        """Evaluate several plans; those not cached are measured together (in parallel where the
        measurer can: measurement servers) while their accuracy is scored here."""
        recalled = [self._recalled(plan) for plan in plans]
        todo = {plan.digest(): plan for plan, e in zip(plans, recalled) if e is None}
        measured = self._measure_new(list(todo.values())) if todo else {}
        evaluations = [e if e is not None else measured[plan.digest()] for plan, e in zip(plans, recalled)]
        for evaluation in evaluations:
            if math.isnan(evaluation.objective):
                evaluation.objective = self.objective_value(evaluation)
        return evaluations

    def _recalled(self, plan: Plan) -> Evaluation | None:
        """The plan's evaluation from memory or from the disk cache (None: it must be measured)."""
        plan_digest = plan.digest()
        cached = self._memory_cache.get(plan_digest)
        if cached is not None:
            return cached
        self.validate(plan)
        stored = self._measurements.get(plan_digest) if self.use_disk_cache else None
        if stored is None:
            return None
        # recalled(): a cached figure whose interval missed its target, or made while busy, says so
        evaluation = self._score(plan, plan_digest, Measurement.from_json(stored).recalled())
        self._memory_cache[plan_digest] = evaluation
        return evaluation

    def _measure_new(self, plans: list[Plan]) -> dict[str, Evaluation]:
        """Measure plans that no cache holds; accuracy is scored meanwhile. Failed ones are not cached."""
        def measure_all() -> list[Measurement | MeasurementFailed]:
            return self.measurer.measure_many(self.graph, self.compressor, self.board, plans, self.calibration_inputs)

        if self.parallelism > 1:  # measurement servers measure while the accuracy is scored here
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(measure_all)
                try:
                    for plan in plans:
                        self.accuracy(plan)
                    measurements = pending.result()
                except KeyboardInterrupt:  # end the measurer's waits now, or leaving the pool waits for them
                    self.measurer.cancel()
                    raise
        else:
            measurements = measure_all()
        evaluations = {}
        for plan, measurement in zip(plans, measurements):
            plan_digest = plan.digest()
            if isinstance(measurement, MeasurementFailed):
                evaluations[plan_digest] = self._failed(plan_digest, str(measurement))
                continue
            self.evaluations += 1
            if self.use_disk_cache:
                self._measurements.put(plan_digest, measurement.to_json())
            evaluation = self._score(plan, plan_digest, measurement)
            self._memory_cache[plan_digest] = evaluation
            evaluations[plan_digest] = evaluation
        return evaluations

    def _measured(self, plan: Plan) -> Evaluation:
        """The plan's evaluation before the objective is filled in (cached in memory and on disk)."""
        evaluation = self._recalled(plan)
        if evaluation is None:
            evaluation = self._measure_new([plan])[plan.digest()]
            if evaluation.failed:
                raise ExplorerError(f"measuring {plan.digest()[:12]} failed: {evaluation.error}")
        return evaluation

    def _failed(self, plan_digest: str, error: str) -> Evaluation:
        """A failed trial: nothing measured, infeasible, objective +inf."""
        nan = math.nan
        return Evaluation(plan_digest=plan_digest, latency_ms=nan, latency_spread_ms=nan, energy_mj=nan, energy_source="",
                          memory_mb=nan, memory_mb_by_processor={}, accuracy=None, accuracy_metric="", accuracy_drop=None,
                          feasible=False, violations=[f"measurement failed: {error}"], objective=math.inf,
                          measured_by=self.measurer.label(self.board), error=error)

    def cache_file(self) -> Path:
        """Where measurements of this model + data + board + measurer are cached on disk."""
        return cache_dir("evaluations") / f"{self._key}.jsonl"

    def accuracy(self, plan: Plan) -> AccuracyResult:
        """Accuracy of the plan's ranks and precisions (placement does not matter), cached."""
        key = digest(*(f"{n}|{d.method}|{d.rank}|{d.precision}" for n, d in plan.decisions))
        if key in self._accuracy_cache:
            return self._accuracy_cache[key]
        path = cache_dir("accuracy") / self._accuracy_key / f"{key}.json" if self.use_disk_cache else None
        stored = read_json(path) if path and self.scorer.measured else None
        try:
            result = (AccuracyResult(stored["value"], stored["metric"], stored["samples"], self.scorer.basis,
                                     stored.get("detail", "")) if stored is not None else None)
        except (KeyError, TypeError, IndexError, AttributeError) as exc:  # valid JSON of another shape: a miss
            if path is not None:
                unreadable(path, ValueError(f"no {exc} in it"))
            result = None
        if result is None:
            if self.scorer.measured:
                # rewrite_shared takes a model's input name -> batch too; compress.py annotates an array alone
                result = self.scorer.score(self.compressor.rewrite_shared(plan, self.calibration_inputs))  # type: ignore[arg-type]
                if path:
                    atomic_write_json(path, asdict(result))
            else:
                result = self.scorer.baseline
        self._accuracy_cache[key] = result
        return result

    def _score(self, plan: Plan, plan_digest: str, m: Measurement) -> Evaluation:
        accuracy = self.accuracy(plan)
        drop = self.scorer.drop(accuracy)
        memory_mb = sum(m.memory_mb_by_processor.values())
        excess = self.excess(m.latency_ms, drop, m.memory_mb_by_processor)
        violations = [_violation(e, accuracy.basis) for e in excess if e.broken]
        evaluation = Evaluation(
            plan_digest=plan_digest, latency_ms=m.latency_ms, latency_spread_ms=m.latency_spread_ms,
            energy_mj=m.energy_mj, energy_source=m.energy_source, memory_mb=memory_mb,
            memory_mb_by_processor=m.memory_mb_by_processor, accuracy=accuracy.value,
            accuracy_metric=accuracy.metric, accuracy_drop=drop, feasible=not violations, violations=violations,
            objective=math.nan, measured_by=m.measured_by, blocks=list(m.blocks), excess=excess,
            peak_memory_mb=m.peak_memory_mb, accuracy_basis=accuracy.basis, accuracy_samples=accuracy.samples,
        )
        return evaluation

    def score(self, plan: Plan, measurement: Measurement, predicted: bool = False) -> Evaluation:
        """The plan scored on given figures as a measured plan is (its accuracy scored for real, every constraint's
        excess, feasibility, the objective); `predicted`: the figures are a cost model's prediction, not a measurement
        (explorer.screening), and the Evaluation says so. Nothing is cached."""
        evaluation = self._score(plan, plan.digest(), measurement)
        evaluation.objective = self.objective_value(evaluation)
        evaluation.predicted = predicted
        return evaluation

    def excess(self, latency_ms: float, accuracy_drop: float | None, memory_mb_by_processor: dict[str, float]) -> list[Excess]:
        """Every constraint that applies to a plan measured so: the latency budget, the accuracy limit (when the
        drop is known), the weight-memory limit, the capacity of each processor holding weights, and the
        board's available memory for the weights held on it (not on a remote processor)."""
        c = self.constraints
        excess = []
        if c.latency_ms is not None:
            excess.append(Excess("latency", "latency", latency_ms, c.latency_ms))
        if c.max_accuracy_drop is not None and accuracy_drop is not None:
            excess.append(Excess("accuracy_drop", "accuracy drop", accuracy_drop, c.max_accuracy_drop))
        if c.memory_mb is not None:
            excess.append(Excess("memory", "weight memory", sum(memory_mb_by_processor.values()), c.memory_mb))
        local = 0.0
        for pid, mb in memory_mb_by_processor.items():
            processor = self.board.processor(pid)
            excess.append(Excess("memory", pid, mb, processor.memory_mb))
            local += 0.0 if processor.is_remote else mb
        excess.append(Excess("memory", "board memory", local, self.board.memory.available_mb))
        return excess

    def objective_value(self, e: Evaluation) -> float:
        """The scalar to minimise (single metric as is; weighted sums relative to the baseline)."""
        if self.objective.single:
            return metric_value(self.objective.single, e.latency_ms, e.energy_mj, e.memory_mb)
        base = self.baseline()
        return sum(w * metric_value(n, e.latency_ms, e.energy_mj, e.memory_mb)
                   / max(metric_value(n, base.latency_ms, base.energy_mj, base.memory_mb), 1e-12)
                   for n, w in self.objective.weights)

    # ---- reference plans ----------------------------------------------------------------------
    def uniform_plan(self, processor: str, precision: str = "fp32") -> Plan:
        """Every layer uncompressed at one precision on one processor."""
        return Plan.uniform([layer.name for layer in self.graph.layers], Decision(precision=precision, processor=processor))

    def baseline_plan(self) -> Plan:
        """The uncompressed fp32 model on the best single processor (by the objective, feasible first)."""
        return self.baseline_candidates()[0][0]

    def baseline_candidates(self) -> list[tuple[Plan, Evaluation]]:
        """Uncompressed fp32 on each processor that can run every layer, best first.

        Ranked by feasibility, then by the objective's first metric (a weighted objective is
        relative to this baseline, so it cannot rank it).
        """
        first = self.objective.weights[0][0]
        candidates = []
        for pid, processor in self.board.processors.items():
            if "fp32" in processor.precisions and all(layer.op_type in processor.ops for layer in self.graph.layers):
                plan = self.uniform_plan(pid)
                candidates.append((plan, self._measured(plan)))
        if not candidates:
            raise ExplorerError(f"no processor of {self.board.name} runs the whole model in fp32: there is no baseline")
        candidates.sort(key=lambda pe: (not pe[1].feasible,
                                        metric_value(first, pe[1].latency_ms, pe[1].energy_mj, pe[1].memory_mb)))
        return candidates

    def reference_plans(self) -> list[tuple[str, Plan]]:
        """What a user would try without this tool, each with its name: the uncompressed model in fp32 on
        every processor that runs all of it (the baseline first), then the whole model in int8 (ONNX
        Runtime's static QDQ quantisation, per-channel, calibrated on the data) and in fp16 on every
        processor that runs all of it at that precision. Every search measures these first."""
        baseline = self.baseline_plan()
        plans = [(f"fp32 on {baseline.decisions[0][1].processor} (baseline)", baseline)]
        for precision, what in (("fp32", "fp32"), ("int8", "whole-model int8 (static QDQ, per-channel)"),
                                ("fp16", "whole-model fp16")):
            for pid, processor in self.board.processors.items():
                plan = self.uniform_plan(pid, precision)
                if (precision in processor.precisions and plan != baseline
                        and all(layer.op_type in processor.ops for layer in self.graph.layers)):
                    plans.append((f"{what} on {pid}", plan))
        return plans

    def best_reference(self) -> tuple[str, Plan, Evaluation] | None:
        """The best feasible reference plan by the objective (None when none is feasible)."""
        feasible = [(name, plan, self.evaluate(plan)) for name, plan in self.reference_plans()]
        feasible = [(name, plan, e) for name, plan, e in feasible if e.feasible]
        return min(feasible, key=lambda item: item[2].objective) if feasible else None

    def baseline(self) -> Evaluation:
        """Evaluation of the baseline plan."""
        if self._baseline is None:
            self._baseline = self._measured(self.baseline_plan())  # set first: a weighted objective needs it
            self.evaluate(self.baseline_plan())
        return self._baseline

    def random_plan(self, rng: np.random.Generator) -> Plan:
        """A uniformly random valid plan (for tests, benchmarks and the random agent)."""
        decisions = {}
        for layer in self.graph.layers:
            options = self.choices(layer)
            decisions[layer.name] = options[int(rng.integers(len(options)))]
        return Plan.from_dict(decisions)


def _violation(e: Excess, accuracy_basis: str) -> str:
    """A broken constraint in words."""
    if e.kind == "latency":
        return f"latency {e.value:.3f} ms > budget {e.limit:g} ms"
    if e.kind == "accuracy_drop":
        basis = f" ({accuracy_basis})" if accuracy_basis else ""
        return f"accuracy drop {100 * e.value:.2f} points > limit {100 * e.limit:g}{basis}"
    if e.subject == "weight memory":
        return f"weight memory {e.value:.2f} MB > limit {e.limit:g} MB"
    if e.subject == "board memory":
        return f"weights {e.value:.1f} MB > the board's available {e.limit:g} MB"
    return f"{e.subject} holds {e.value:.1f} MB of weights > its {e.limit:g} MB"
