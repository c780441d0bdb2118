"""DeployEnv: decide a network's deployment one decision layer at a time (Gymnasium API).

Episode: one step per decision layer, in layer order; the episode ends after the last layer, when
the whole plan is evaluated through `problem.evaluate(plan)` (measured, cached by the Problem).

Action: ``MultiDiscrete([max rungs, processors, 3 precisions])`` over the union of every layer's
options: a rung index into the layer's ladder (`Problem.rungs`), a processor index
(`Board.processor_ids`) and a precision index (`explorer.boards.PRECISIONS`: fp32, fp16, int8).

Masks (`action_masks()`, sb3-contrib's MultiDiscrete format: the three boolean masks concatenated)
are per dimension, so they describe a *rectangle* R x P x Q of the layer's options, and every
combination inside it is a valid decision that fits memory:

- precision depends on the processor, and a rectangle cannot express "int8 on the CPU but not on
  a GPU without int8" (masking int8 whenever such a GPU is on offer would remove int8 on Tegra K1
  altogether). So a processor runs a requested precision it lacks at the narrowest precision it
  has that is at least as wide (never less accurate than asked where it can be: int8 on the Kepler
  GPU runs as fp16, fp16 on the Hexagon DSP as fp32). Q holds the precisions that at least one
  processor of P runs;
- R: rungs offered for the layer; P: processors that run the layer's op;
- memory: a decision is admissible when its weights fit the processor, the board's shared memory and
  the optional total limit, *and* the later layers can still be completed at their smallest option
  (all on one processor, or on the solver suggestion's processors). That completion argument holds
  from step to step, so a mask is never empty. When memory binds, the rectangle of admissible
  decisions with the most distinct decisions is offered (one holding the suggestion if possible).
  Only a board whose memory no completion fits at all (no suggestion, no single processor holding
  the smallest model) drops the memory part; its plans then evaluate infeasible.

An action outside the masks (e.g. a random `action_space.sample()` of an env checker) is projected
onto the rectangle dimension by dimension (nearest rung index, nearest processor index, precision
as above), so every step yields a valid decision; `info["projected"]` says when it did.

Observation (Box float32 in [0, 10], fixed size for a model and board): static features of the
layer (op one-hot, log FLOPs, log parameters, log input and output activation bytes, position,
rungs offered), running totals of the cost model and sensitivity table (predicted latency so far /
budget, predicted energy so far / the baseline's, estimated accuracy loss / limit, weights per
processor / its capacity, local weights / the board's available memory), the previous layer's
processor (one-hot; the input's host processor before the first layer) and the solver's suggestion
for the layer (rung index normalised, processor one-hot, precision one-hot; zeros without one).

Reward: 0 until the last step; then, from the measured Evaluation, ``reference / objective`` for a
feasible plan (> 0; the reference is the cost model's prediction of the uncompressed fp32 baseline,
so no measurement is spent outside the agent's budget) and ``-1 - log(1 + violation)`` for an
infeasible one (<= -1), violation being the sum of the relative excesses over the latency budget,
accuracy limit and memory capacities (`Evaluation.total_excess`). Every infeasible plan scores below every feasible one.
``info`` of the last step carries the `evaluation` and the `plan`; every step's ``info`` its
`decision`. `set_suggestion` and `set_cost_model` (an agent's re-solves and recalibrations) take
effect at the next reset; `demonstration(plan)` replays a plan's (observation, masks, action) pairs
without measuring it (behaviour cloning).
"""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from explorer.accuracy import SensitivityTable, sensitivity_table
from explorer.boards import PRECISIONS
from explorer.cost import BYTES_PER_ELEMENT, CostModel
from explorer.errors import ExplorerError
from explorer.graph import DECISION_OPS
from explorer.plan import Decision, Plan
from explorer.problem import DEFAULT_MAX_ACCURACY_DROP, Evaluation, Problem

OBSERVATION_HIGH = 10.0  # running ratios are clipped here (10x a budget is far outside anything useful)
SOLVER = "solver"  # `suggestion=` default: solve the integer program on the cost model
_PRECISION_COLOURS = {"fp32": (80, 140, 255), "fp16": (90, 220, 120), "int8": (255, 170, 60)}  # render("rgb_array")


def make_problem(model: str = "vgg", board: str = "tegra-k1", *, max_accuracy_drop: float | None = None,
                 **names) -> Problem:
    """`explorer.load_problem` under its former name: the same keywords, the accuracy limit in points
    (`max_accuracy_drop_points=1` is one point). The former fraction `max_accuracy_drop` is refused."""
    from explorer.api import load_problem

    if max_accuracy_drop is not None:
        raise ExplorerError(f"max_accuracy_drop={max_accuracy_drop!r} was a fraction; the limit is now in points: pass "
                            f"max_accuracy_drop_points={100 * max_accuracy_drop:g} (1 = one point of accuracy)")
    try:
        inspect.signature(load_problem).bind(model, board, **names)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(load_problem).parameters)
        raise ExplorerError(f"{error}: the problem's names are explorer.load_problem's ({accepted})") from None
    return load_problem(model, board, **names)


def resolve_precision(requested: str, supported: tuple[str, ...]) -> str:
    """The precision a processor runs when `requested` is asked: itself, else the narrowest one it
    supports that is at least as wide (never less accurate than asked), else its widest."""
    if requested in supported:
        return requested
    wide_enough = [p for p in supported if BYTES_PER_ELEMENT[p] >= BYTES_PER_ELEMENT[requested]]
    if wide_enough:
        return min(wide_enough, key=lambda p: BYTES_PER_ELEMENT[p])
    return max(supported, key=lambda p: BYTES_PER_ELEMENT[p])


def plan_reward(evaluation: Evaluation, reference: float) -> float:
    """Feasible: reference / objective (> 0). Infeasible: -1 - log(1 + violation) (<= -1), the violation being
    the evaluation's total excess over its constraints. A failed measurement (nothing known about the plan)
    scores -1: below every feasible plan, not a lesson."""
    if evaluation.feasible:
        return float(reference / max(evaluation.objective, 1e-12))
    if evaluation.failed:
        return -1.0
    return float(-1.0 - math.log1p(evaluation.total_excess))


@dataclass
class _Episode:
    """The running state of one episode."""

    host: str
    decisions: list[Decision] = field(default_factory=list)
    latency_s: float = 0.0
    energy_j: float = 0.0
    accuracy_loss: float = 0.0
    weight_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def previous(self) -> str:
        return self.decisions[-1].placed_processor if self.decisions else self.host


class DeployEnv(gym.Env):
    """One step per decision layer: (rung, processor, precision); measured reward at the end.

    Build it from names (`model`, `board` and the other keywords of `explorer.load_problem`, the
    accuracy limit in points: `max_accuracy_drop_points=1`; picklable, so it works in subprocess
    vector environments) or from an existing `problem` (a Problem or an agent's BudgetedProblem; the
    names are then ignored). `suggestion`: "solver" (solve the integer program on the cost model, no
    measurement), a Plan, or None. `cost_model`: the model behind the running totals (default: the
    problem's). `render_mode`: None, "ansi" (the decisions so far as text) or "rgb_array" (one row per
    layer, one column per processor, coloured by precision, brighter for more weights).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, model: str = "vgg", board: str = "tegra-k1", *, problem=None,
                 suggestion: Plan | str | None = SOLVER, cost_model: CostModel | None = None,
                 render_mode: str | None = None, **names):
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ExplorerError(f"render_mode={render_mode!r} is not one of {', '.join(self.metadata['render_modes'])} "
                                "(or None)")
        self.render_mode = render_mode
        if problem is None:
            problem = make_problem(model, board, **names)
        self.problem = problem
        self.board = problem.board
        self.layers = list(problem.graph.layers)
        self.processor_ids = list(problem.board.processor_ids)
        self.host = self.processor_ids[0]
        self.rungs = [problem.rungs(layer) for layer in self.layers]
        self.max_rungs = max(len(r) for r in self.rungs)
        self.sensitivity: SensitivityTable | None = (
            sensitivity_table(problem.graph, problem.compressor, problem.scorer) if problem.scorer.measured else None)
        self.cost_model = cost_model or problem.cost_model
        self._pending_cost_model: CostModel | None = None
        self._capacity = np.array([problem.board.processor(p).memory_mb * 2**20 for p in self.processor_ids])
        self._local = np.array([not problem.board.processor(p).is_remote for p in self.processor_ids])
        self._local_capacity = problem.board.memory.available_mb * 2**20
        limit = problem.constraints.memory_mb
        self._total_capacity = limit * 2**20 if limit is not None else math.inf
        self._capable = [[layer.op_type in problem.board.processor(p).ops for p in self.processor_ids]
                         for layer in self.layers]
        self._precisions = [problem.board.processor(p).precisions for p in self.processor_ids]
        self._static = self._static_features()
        baseline = self._baseline_cost()
        self.reference = self._reference_objective(baseline)
        self._reference_latency_s = max(baseline.latency_s, 1e-12)
        self._reference_energy_j = max(baseline.energy_j, 1e-12)
        self.suggestion = self._initial_suggestion(suggestion)
        self._pending_suggestion: Plan | None = None
        self._completions = self._completion_needs()
        self._unbounded_rectangles = self._rectangles_without_memory_limits()
        self.action_space = spaces.MultiDiscrete([self.max_rungs, len(self.processor_ids), len(PRECISIONS)])
        n = len(self.processor_ids)
        size = self._static.shape[1] + (3 + n + 1) + n + (1 + n + len(PRECISIONS))
        self.observation_space = spaces.Box(0.0, OBSERVATION_HIGH, (size,), np.float32)
        self._episode = _Episode(self.host)
        self._rectangle = self._offer(self._episode)

    # ---- public API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self._pending_suggestion is not None:
            self.suggestion, self._pending_suggestion = self._pending_suggestion, None
            self._completions = self._completion_needs()
        if self._pending_cost_model is not None:
            self.cost_model, self._pending_cost_model = self._pending_cost_model, None
        self._episode = _Episode(self.host)
        self._rectangle = self._offer(self._episode)
        return self._observation(self._episode), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        episode = self._episode
        if len(episode.decisions) == len(self.layers):
            raise ExplorerError("the episode is over: call reset() before step()")
        decision, projected = self.decode(action, self._rectangle, len(episode.decisions))
        self._advance(episode, decision)
        info: dict = {"decision": decision, "projected": projected}
        reward = 0.0
        terminated = len(episode.decisions) == len(self.layers)
        if terminated:
            plan = self.plan_of(episode)
            evaluation = self.problem.evaluate(plan)
            reward = plan_reward(evaluation, self.reference)
            info.update(plan=plan, evaluation=evaluation)
        else:
            self._rectangle = self._offer(episode)
        return self._observation(episode), reward, terminated, False, info

    def action_masks(self) -> np.ndarray:
        """Concatenated boolean masks (rungs, processors, precisions) for the current layer."""
        rungs, procs, precs = self._rectangle
        mask = np.zeros(self.max_rungs + len(self.processor_ids) + len(PRECISIONS), dtype=bool)
        mask[list(rungs)] = True
        mask[[self.max_rungs + p for p in procs]] = True
        mask[[self.max_rungs + len(self.processor_ids) + q for q in precs]] = True
        return mask

    def set_suggestion(self, plan: Plan | None) -> None:
        """Use `plan` as the solver's suggestion from the next reset on."""
        self._pending_suggestion = plan

    def set_cost_model(self, cost_model: CostModel) -> None:
        """Use a (recalibrated) cost model for the running totals from the next reset on."""
        self._pending_cost_model = cost_model

    def render(self):
        """The episode so far as `render_mode` says: text ("ansi") or an RGB image ("rgb_array"); None without a mode."""
        episode = self._episode
        if self.render_mode == "ansi":
            lines = [f"{layer.name}: {decision.label()}" for layer, decision in zip(self.layers, episode.decisions)]
            if len(episode.decisions) < len(self.layers):
                lines.append(f"{self.layers[len(episode.decisions)].name}: next")
            return "\n".join(lines) + "\n"
        if self.render_mode == "rgb_array":
            cell = 8  # pixels per layer (rows) and per processor (columns)
            image = np.full((len(self.layers) * cell, len(self.processor_ids) * cell, 3), 32, dtype=np.uint8)
            for index, decision in enumerate(episode.decisions):
                full = max(r.params for r in self.rungs[index])
                params = next(r.params for r in self.rungs[index] if (r.method, r.rank) == decision.rung)
                shade = 0.35 + 0.65 * params / max(full, 1)  # brighter: more weights kept
                p = self.processor_ids.index(decision.processor)
                image[index * cell:(index + 1) * cell, p * cell:(p + 1) * cell] = \
                    (np.array(_PRECISION_COLOURS[decision.precision]) * shade).astype(np.uint8)
            return image
        return None

    def encode(self, layer_index: int, decision: Decision) -> np.ndarray:
        """The action that chooses `decision` at layer `layer_index`."""
        rung = next(i for i, r in enumerate(self.rungs[layer_index])
                    if (r.method, r.rank) == (decision.method, decision.rank))
        return np.array([rung, self.processor_ids.index(decision.processor), PRECISIONS.index(decision.precision)])

    def demonstration(self, plan: Plan, suggestion: Plan | None = None,
                      labels: Plan | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(observation, masks, action) at every layer while `plan` is played, without evaluating it.

        The observations carry `suggestion` (default: the current one); the actions are those of
        `labels` (default: the plan itself), so a demonstration can also say "go back to the labels'
        decision" along a trajectory that strayed from them. The episode in progress is left
        untouched; a step whose labelled action falls outside the masks is left out.
        """
        labels = labels or plan
        saved = self.suggestion, self._completions, self._rectangle
        if suggestion is not None:
            self.suggestion = suggestion
            self._completions = self._completion_needs()
        try:
            episode = _Episode(self.host)
            steps = []
            for index, ((_, decision), (_, label)) in enumerate(zip(plan.decisions, labels.decisions)):
                self._rectangle = self._offer(episode)
                action = self.encode(index, label)
                if self.decode(action, self._rectangle, index) == (label, False):
                    steps.append((self._observation(episode), self.action_masks(), action))
                self._advance(episode, decision)
            return steps
        finally:
            self.suggestion, self._completions, self._rectangle = saved

    def plan_if(self, action) -> Plan | None:
        """The plan this action completes when it is the episode's last step, else None (nothing changes)."""
        episode = self._episode
        if len(episode.decisions) != len(self.layers) - 1:
            return None
        decision, _ = self.decode(action, self._rectangle, len(episode.decisions))
        return Plan(tuple((layer.name, d) for layer, d in zip(self.layers, [*episode.decisions, decision])))

    def plan_of(self, episode: _Episode) -> Plan:
        """The plan of an episode's decisions."""
        return Plan(tuple((layer.name, d) for layer, d in zip(self.layers, episode.decisions)))

    # ---- decisions --------------------------------------------------------------------------
    def decode(self, action, rectangle, layer_index: int) -> tuple[Decision, bool]:
        """The decision an action takes at a layer, and whether it had to be projected onto the masks."""
        rungs, procs, precs = rectangle
        r, p, q = (int(a) for a in action)
        projected = r not in rungs or p not in procs or q not in precs
        r = r if r in rungs else min(rungs, key=lambda i: (abs(i - r), i))
        p = p if p in procs else min(procs, key=lambda i: (abs(i - p), i))
        if q not in precs:
            q = PRECISIONS.index(resolve_precision(PRECISIONS[q], tuple(PRECISIONS[i] for i in precs)))
        rung = self.rungs[layer_index][r]
        precision = resolve_precision(PRECISIONS[q], self._precisions[p])
        return Decision(rung.method, rung.rank, precision, self.processor_ids[p]), projected

    def _advance(self, episode: _Episode, decision: Decision) -> None:
        index = len(episode.decisions)
        layer = self.layers[index]
        rung = self.problem.compressor.rung(layer.name, decision.method, decision.rank)
        processor = decision.placed_processor
        cost = self.cost_model.layer_cost(layer, rung, decision.precision, processor)
        if index == 0:
            seconds, joules = self.cost_model.input_transfer(processor)
        else:
            seconds, joules = self.cost_model.transfer(self.layers[index - 1], episode.previous, processor)
        episode.latency_s += cost.latency_s + seconds
        episode.energy_j += cost.energy_j + joules
        if self.sensitivity is not None:
            episode.accuracy_loss += self.sensitivity.estimate(layer.name, rung.method, rung.rank, decision.precision)
        episode.weight_bytes[processor] = episode.weight_bytes.get(processor, 0.0) + cost.weight_bytes
        episode.decisions.append(decision)

    def _offer(self, episode: _Episode) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The rectangle (rung, processor, precision indices) offered at the episode's next layer."""
        index = len(episode.decisions)
        if index == len(self.layers):
            return tuple(range(self.max_rungs)), tuple(range(len(self.processor_ids))), tuple(range(len(PRECISIONS)))
        if self._unbounded_rectangles is not None:
            return self._unbounded_rectangles[index]
        n_rungs, n_procs = len(self.rungs[index]), len(self.processor_ids)
        capable = [p for p in range(n_procs) if self._capable[index][p]]
        admissible = self._admissible(episode, index)  # [rung, processor, precision actually run]
        decoded = np.zeros((n_rungs, n_procs, len(PRECISIONS)), dtype=bool)
        for p in capable:
            for q, name in enumerate(PRECISIONS):
                decoded[:, p, q] = admissible[:, p, PRECISIONS.index(resolve_precision(name, self._precisions[p]))]
        total = int(admissible.sum())
        best, best_score = None, None
        suggested = self._suggested_indices(index)
        for size in range(len(capable), 0, -1):
            for procs in itertools.combinations(capable, size):
                runnable = sorted({PRECISIONS.index(q) for p in procs for q in self._precisions[p]})
                for qsize in range(len(runnable), 0, -1):
                    for precs in itertools.combinations(runnable, qsize):
                        rungs = tuple(int(r) for r in np.flatnonzero(decoded[:, list(procs)][:, :, list(precs)].all(axis=(1, 2))))
                        if not rungs:
                            continue
                        distinct = sum(len({resolve_precision(PRECISIONS[q], self._precisions[p]) for q in precs})
                                       for p in procs) * len(rungs)
                        holds = suggested is not None and (suggested[0] in rungs and suggested[1] in procs
                                                           and suggested[2] in precs)
                        score = (holds, distinct)
                        if best_score is None or score > best_score:
                            best, best_score = (rungs, procs, precs), score
                        if distinct == total and best is not None:
                            return best  # the whole admissible set is a rectangle
        if best is None:  # cannot happen: _admissible offers at least one valid decision
            raise ExplorerError(f"no valid decision for layer {self.layers[index].name}")
        return best

    def _rectangles_without_memory_limits(self) -> list[tuple] | None:
        """Per layer, every valid option, when even the largest options of all layers on any one
        processor fit every capacity (memory can never bind); None otherwise."""
        rectangles = []
        for index, layer in enumerate(self.layers):
            capable = tuple(p for p in range(len(self.processor_ids)) if self._capable[index][p])
            if not capable:
                raise ExplorerError(f"no processor of {self.board.name} runs layer {layer.name} ({layer.op_type}): "
                                    "add the op to a processor's `ops`")
            runnable = tuple(sorted({PRECISIONS.index(q) for p in capable for q in self._precisions[p]}))
            rectangles.append((tuple(range(len(self.rungs[index]))), capable, runnable))
        largest = sum(max(r.params for r in rungs) for rungs in self.rungs) * max(BYTES_PER_ELEMENT.values())
        fits = (largest <= self._capacity.min() and largest <= self._local_capacity and largest <= self._total_capacity)
        return rectangles if fits else None

    def _admissible(self, episode: _Episode, index: int) -> np.ndarray:
        """[rung, processor, precision]: valid decisions whose weights fit now and leave room to finish."""
        n_procs = len(self.processor_ids)
        params = np.array([r.params for r in self.rungs[index]], dtype=float)
        valid = np.zeros((len(params), n_procs, len(PRECISIONS)), dtype=bool)
        weights = np.zeros_like(valid, dtype=float)
        for p in range(n_procs):
            if self._capable[index][p]:
                for q, name in enumerate(PRECISIONS):
                    if name in self._precisions[p]:
                        valid[:, p, q] = True
                        weights[:, p, q] = params * BYTES_PER_ELEMENT[name]
        used = np.array([episode.weight_bytes.get(p, 0.0) for p in self.processor_ids])
        after = used[None, None, None, :] + weights[..., None] * np.eye(n_procs)[None, :, None, :]  # [r, p, q, proc]
        fits_now = self._fits(after)
        need = self._completions[:, index + 1] if self._completions.size else np.zeros((0, n_procs))
        completes = np.zeros_like(valid)
        for row in need:  # one completion candidate: bytes per processor the later layers need
            completes |= self._fits(after + row)
        # completable, else fitting now, else valid (see the module docstring): never empty
        return next((a for a in (valid & completes, valid & fits_now) if a.any()), valid)

    def _fits(self, weights: np.ndarray) -> np.ndarray:
        """Whether weights per processor (last axis) respect every capacity."""
        local = (weights * self._local).sum(-1)
        return ((weights <= self._capacity).all(-1) & (local <= self._local_capacity)
                & (weights.sum(-1) <= self._total_capacity))

    def _completion_needs(self) -> np.ndarray:
        """[candidate, layer, processor]: bytes the layers from `layer` on need at their smallest
        option, for each completion candidate (all on one processor; the suggestion's placement)."""
        n_layers, n_procs = len(self.layers), len(self.processor_ids)
        smallest = np.full((n_layers, n_procs), math.inf)
        for i, rungs in enumerate(self.rungs):
            for p in range(n_procs):
                if self._capable[i][p]:
                    narrowest = min(BYTES_PER_ELEMENT[q] for q in self._precisions[p])
                    smallest[i, p] = min(r.params for r in rungs) * narrowest
        placements = [[p] * n_layers for p in range(n_procs)]
        if self.suggestion is not None:
            placements.append([self.processor_ids.index(d.processor) for _, d in self.suggestion.decisions])
        candidates = []
        for placement in placements:
            need = np.zeros((n_layers + 1, n_procs))
            for i in range(n_layers - 1, -1, -1):
                need[i] = need[i + 1]
                need[i, placement[i]] += smallest[i, placement[i]]
            if np.isfinite(need).all():
                candidates.append(need)
        return np.array(candidates) if candidates else np.zeros((0, n_layers + 1, n_procs))

    def _suggested_indices(self, index: int) -> tuple[int, int, int] | None:
        if self.suggestion is None:
            return None
        r, p, q = (int(a) for a in self.encode(index, self.suggestion.decisions[index][1]))
        return r, p, q

    def _initial_suggestion(self, suggestion: Plan | str | None) -> Plan | None:
        if suggestion is None or isinstance(suggestion, Plan):
            return suggestion
        if suggestion != SOLVER:
            raise ExplorerError(f"suggestion={suggestion!r}: give {SOLVER!r}, a Plan or None")
        from explorer.solver import solve_problem

        try:
            return solve_problem(self.problem).plan
        except ExplorerError:  # the model finds nothing feasible: no suggestion
            return None

    # ---- observation ------------------------------------------------------------------------
    def _static_features(self) -> np.ndarray:
        """Per layer: op one-hot, log FLOPs, log params, log activation bytes in/out, position, rungs."""
        def scaled(values):
            logs = np.log1p(np.asarray(values, dtype=float))
            return logs / max(logs.max(), 1e-12)

        layers = self.layers
        onehot = np.array([[layer.op_type == op for op in DECISION_OPS] for layer in layers], dtype=float)
        activation_in = [4 * math.prod(layer.input_shape or (0,)) for layer in layers]
        activation_out = [4 * math.prod(layer.output_shape or (0,)) for layer in layers]
        position = np.arange(len(layers)) / max(len(layers) - 1, 1)
        offered = np.array([len(r) for r in self.rungs]) / self.max_rungs
        return np.column_stack([onehot, scaled([layer.flops for layer in layers]),
                                scaled([layer.params for layer in layers]),
                                scaled(activation_in), scaled(activation_out), position, offered])

    def _baseline_cost(self):
        """The cost model's view of the baseline: the uncompressed fp32 model on the single processor
        the objective's first metric prefers (no measurement, so nothing is spent outside a budget)."""
        first = self.problem.objective.weights[0][0]
        costs = [self.cost_model.plan_cost(self.problem.uniform_plan(pid)) for p, pid in enumerate(self.processor_ids)
                 if "fp32" in self._precisions[p] and all(capable[p] for capable in self._capable)]
        if not costs:
            raise ExplorerError(f"no processor of {self.board.name} runs the whole model in fp32: there is no baseline")
        return min(costs, key=lambda cost: _metrics(cost)[first])

    def _reference_objective(self, baseline) -> float:
        """The baseline's predicted objective in the Evaluation's units (a weighted objective is
        already relative to the baseline: its weights' sum)."""
        objective = self.problem.objective
        if not objective.single:
            return float(sum(w for _, w in objective.weights))
        return max(_metrics(baseline)[objective.single], 1e-12)

    def _observation(self, episode: _Episode) -> np.ndarray:
        index = len(episode.decisions)
        n = len(self.processor_ids)
        static = self._static[index] if index < len(self.layers) else np.zeros(self._static.shape[1])
        if index == len(self.layers):
            static[-2] = 1.0  # position: past the last layer
        c = self.problem.constraints
        budget_s = c.latency_ms / 1e3 if c.latency_ms is not None else self._reference_latency_s
        limit = c.max_accuracy_drop if c.max_accuracy_drop is not None else DEFAULT_MAX_ACCURACY_DROP
        weights = np.array([episode.weight_bytes.get(p, 0.0) for p in self.processor_ids])
        totals = [episode.latency_s / budget_s, episode.energy_j / self._reference_energy_j,
                  episode.accuracy_loss / max(limit, 1e-6)]
        local = (weights * self._local).sum() / self._local_capacity
        previous = np.eye(n)[self.processor_ids.index(episode.previous)]
        suggestion = np.zeros(1 + n + len(PRECISIONS))
        suggested = self._suggested_indices(index) if index < len(self.layers) else None
        if suggested is not None:
            r, p, q = suggested
            suggestion[0] = r / max(self.max_rungs - 1, 1)
            suggestion[1 + p] = 1.0
            suggestion[1 + n + q] = 1.0
        features = np.concatenate([static, totals, weights / self._capacity, [local], previous, suggestion])
        return np.clip(features, 0.0, OBSERVATION_HIGH).astype(np.float32)


def _metrics(cost) -> dict[str, float]:
    """A PlanCost in the Evaluation's units: mJ, ms, MB."""
    return {"energy": cost.energy_j * 1e3, "latency": cost.latency_s * 1e3,
            "memory": sum(cost.weight_bytes_by_processor.values()) / 2**20}


