"""The plan set of a bundle: the feasible Pareto front of a search, thinned, and what each plan needs.

A bundle holds the search's best plan and, with ``explorer export --plans pareto|N``, a set of other
plans for other conditions (DeepX: resources change while an app runs). The set is the feasible Pareto
front over latency, energy, weight memory and accuracy drop of the search's trials (read back from its
MLflow child runs), thinned to at most N plans whose figures differ meaningfully, and always holding
(in this order of priority) the best plan, the best plan that needs no network, the one with the least
weight memory among those that need no network, and the one with the least weight memory.

What a plan *needs* is what the runtime checks before it picks it (:mod:`explorer.adapt`): its latency,
its weight memory on the board (and per processor) and, for plans with remote blocks, the network round
trip and bandwidth it assumed, with the transfers and bytes that cross the network, so that its latency
can be estimated on another link.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from explorer.errors import ExplorerError
from explorer.partition import block_boundaries
from explorer.plan import Plan

if TYPE_CHECKING:  # the problem module builds on this one
    from explorer.problem import Evaluation

DEFAULT_SET_SIZE = 8
#: Two plans differ meaningfully when some figure differs by more than this fraction (accuracy drop: points).
MEANINGFUL_FRACTION = 0.05
MEANINGFUL_DROP_POINTS = 0.1
ROLE_BEST, ROLE_LOCAL, ROLE_SMALLEST_LOCAL, ROLE_SMALLEST, ROLE_PARETO = (
    "best", "best without network", "least memory without network", "least memory", "Pareto front")


@dataclass
class SetMember:
    """One plan of a bundle's set: the plan, its evaluation, its confirmed figures (or None), its roles."""

    plan: Plan
    evaluation: Evaluation | None
    confirmed: dict | None = None
    roles: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    plan: Plan
    latency_ms: float
    energy_mj: float
    memory_mb: float
    drop_points: float
    objective: float
    remote: bool

    @property
    def point(self) -> tuple[float, float, float, float]:
        return (self.latency_ms, self.energy_mj, self.memory_mb, self.drop_points)


def parse_plans_option(text: str | None) -> int | None:
    """--plans: 'best' -> None (the best plan alone), 'pareto' -> the default size, N -> N (at least 1)."""
    if text is None or text == "best":
        return None
    if text == "pareto":
        return DEFAULT_SET_SIZE
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ExplorerError(f"--plans {text!r}: give best (the best plan alone), pareto (up to {DEFAULT_SET_SIZE} plans) "
                        "or a number of plans of at least 1")


def trial_plans(search, layer_names: list[str]) -> list[tuple[Plan, dict[str, float]]]:
    """(Plan, metrics) of every finished feasible trial of a tracked search (explorer.tracking.read_search),
    rebuilt from the child runs' per-layer params; a trial whose rebuilt plan does not match its recorded
    digest (another model) is left out."""
    from explorer.tracking import logged_plan

    found = []
    for run in search.trials:
        metrics = run.data.metrics
        if run.info.status != "FINISHED" or metrics.get("feasible") != 1.0:
            continue
        plan = logged_plan(run.data.params, layer_names)
        if plan is not None and plan.digest() == run.data.tags.get("plan_digest"):
            found.append((plan, dict(metrics)))
    return found


def pareto_indices(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point dominates (every coordinate minimised; duplicates kept once)."""
    front: list[int] = []
    for i, p in enumerate(points):
        dominated = any(all(a <= b for a, b in zip(q, p)) and q != p for q in points)
        if not dominated and all(points[j] != p for j in front):
            front.append(i)
    return front


def _differs(a: _Candidate, b: _Candidate) -> bool:
    relative = any(abs(x - y) > MEANINGFUL_FRACTION * max(abs(x), abs(y), 1e-9)
                   for x, y in ((a.latency_ms, b.latency_ms), (a.energy_mj, b.energy_mj), (a.memory_mb, b.memory_mb)))
    return relative or abs(a.drop_points - b.drop_points) > MEANINGFUL_DROP_POINTS


def _distance(a: _Candidate, b: _Candidate) -> float:
    """Distance in log figures (accuracy drop in points), for spreading the kept plans over the front."""
    logs = sum((math.log(max(x, 1e-9)) - math.log(max(y, 1e-9))) ** 2
               for x, y in ((a.latency_ms, b.latency_ms), (a.energy_mj, b.energy_mj), (a.memory_mb, b.memory_mb)))
    return math.sqrt(logs + (a.drop_points - b.drop_points) ** 2)


def thin(best: _Candidate, candidates: list[_Candidate], limit: int) -> list[tuple[_Candidate, list[str]]]:
    """At most `limit` plans: the must-haves first (best, best local, least-memory local, least memory), then
    front plans that differ meaningfully from every kept one, farthest first; each with its roles."""
    local = [c for c in candidates if not c.remote]
    musts = [(ROLE_BEST, best)]
    if local:
        musts.append((ROLE_LOCAL, min(local, key=lambda c: (c.objective, c.memory_mb))))
        musts.append((ROLE_SMALLEST_LOCAL, min(local, key=lambda c: (c.memory_mb, c.objective))))
    if candidates:
        musts.append((ROLE_SMALLEST, min(candidates, key=lambda c: (c.memory_mb, c.remote, c.objective))))
    kept: dict[str, tuple[_Candidate, list[str]]] = {}
    for role, candidate in musts:
        digest = candidate.plan.digest()
        if digest in kept:
            kept[digest][1].append(role)
        elif len(kept) < limit:
            kept[digest] = (candidate, [role])
    front = [candidates[i] for i in pareto_indices([c.point for c in candidates])]
    front.sort(key=lambda c: (c.objective, c.plan.digest()))  # deterministic order before the greedy spread
    while len(kept) < limit:
        chosen = [c for c, _ in kept.values()]
        options = [c for c in front if c.plan.digest() not in kept and all(_differs(c, k) for k in chosen)]
        if not options:
            break
        farthest = max(options, key=lambda c: min(_distance(c, k) for k in chosen))
        kept[farthest.plan.digest()] = (farthest, [ROLE_PARETO])
    for candidate, roles in kept.values():
        if candidate in front and ROLE_PARETO not in roles:
            roles.append(ROLE_PARETO)
    return list(kept.values())


def search_plan_set(problem, search, best_plan: Plan, confirmation: dict | None, limit: int) -> list[SetMember]:
    """The plan set of a tracked search for `problem` (built with the search's settings): the best plan first.

    Every kept plan is evaluated again through `problem.evaluate` (the caches answer for the search's own
    plans) so that its figures and memory per processor are the problem's; one that is no longer feasible
    there is left out.
    """
    from explorer.report import confirmed_figures
    from explorer.tracking import logged_drop_points

    remote = {pid for pid, p in problem.board.processors.items() if p.is_remote}

    def candidate(plan: Plan, m: dict[str, float]) -> _Candidate:
        drop = logged_drop_points(m)
        return _Candidate(plan, m["latency_ms"], m["energy_mj"], m["memory_mb"], drop if drop is not None else 0.0,
                          m.get("objective", m["energy_mj"]), any(d.processor in remote for _, d in plan.decisions))

    trials = trial_plans(search, [layer.name for layer in problem.graph.layers])
    pool: dict[str, _Candidate] = {}
    for plan, metrics in trials:
        if all(k in metrics for k in ("latency_ms", "energy_mj", "memory_mb")):
            pool.setdefault(plan.digest(), candidate(plan, metrics))
    best_evaluation = problem.evaluate(best_plan)
    best = pool.get(best_plan.digest()) or candidate(best_plan, {
        "latency_ms": best_evaluation.latency_ms, "energy_mj": best_evaluation.energy_mj,
        "memory_mb": best_evaluation.memory_mb, "objective": best_evaluation.objective}
        | ({} if best_evaluation.accuracy_drop is None else {"accuracy_drop_points": 100 * best_evaluation.accuracy_drop}))
    members = []
    for chosen, roles in thin(best, list(pool.values()), limit):
        evaluation = best_evaluation if chosen is best else problem.evaluate(chosen.plan)
        if not evaluation.feasible and chosen is not best:
            continue
        members.append(SetMember(chosen.plan, evaluation, confirmed_figures(confirmation, chosen.plan), roles))
    return members


def network_needs(problem, plan: Plan) -> dict | None:
    """What a plan with remote blocks assumed of the network and what crosses it (None: it needs none).

    As the simulator and the cost model count it: every tensor that enters or leaves a remote block pays
    half a round trip plus its bytes over the bandwidth, and the output returns to the first processor.
    """
    board, graph = problem.board, problem.graph
    if board.network is None or not any(board.processor(d.processor).is_remote for _, d in plan.decisions):
        return None
    boundaries = block_boundaries(graph, plan)
    host = board.processor_ids[0]
    transfers, nbytes = 0, 0
    for index, boundary in enumerate(boundaries):
        for tensor in boundary.inputs:
            source = next((boundaries[i].processor for i in range(index) if tensor in boundaries[i].outputs), host)
            if board.link(source, boundary.processor).via == "network":
                transfers, nbytes = transfers + 1, nbytes + graph.tensor_bytes(tensor)
    if board.link(boundaries[-1].processor, host).via == "network":
        transfers += len(graph.output_names)
        nbytes += sum(graph.tensor_bytes(t) for t in graph.output_names)
    return {"rtt_ms": board.network.rtt_ms, "bandwidth_mbit_s": board.network.bandwidth_mbit_s,
            "radio_power_w": board.network.radio_power_w, "transfers": transfers, "bytes": nbytes,
            "remote_processors": sorted({b.processor for b in boundaries if board.processor(b.processor).is_remote})}


def describe(problem, plan: Plan) -> str:
    """A short description of a plan: its processors in block order and its precisions and factorisations."""
    processors = list(dict.fromkeys(d.placed_processor for _, d in plan.decisions))  # in block order
    precisions: dict[str, int] = {}
    for _, d in plan.decisions:
        precisions[d.precision] = precisions.get(d.precision, 0) + 1
    factorised = sum(d.method != "full" for _, d in plan.decisions)
    text = f"{'+'.join(processors)}; " + ", ".join(f"{n} {p}" for p, n in sorted(precisions.items()))
    return text + (f"; {factorised} factorised" if factorised else "")


def plan_figures(member: SetMember, problem) -> dict | None:
    """The figures a bundle records for one plan of its set (confirmed where the search confirmed it, else the
    search's measurement; `source` says which (confirmed: interleaved re-measurement), `simulated` whether it
    is a simulated board's figure, `measured_by` who measured it; None without an evaluation)."""
    e = member.evaluation
    if e is None:
        return None
    local = sum(mb for pid, mb in e.memory_mb_by_processor.items() if not problem.board.processor(pid).is_remote)
    figures = {"latency_ms": e.latency_ms, "energy_mj": e.energy_mj, "memory_mb": e.memory_mb,
               "local_memory_mb": local, "memory_mb_by_processor": dict(e.memory_mb_by_processor),
               "accuracy_drop_points": 100 * e.accuracy_drop if e.accuracy_drop is not None else None,
               "objective": e.objective, "measured_by": e.measured_by,
               "simulated": "simulated" in e.measured_by, "source": "search"}
    confirmed = member.confirmed
    if confirmed is not None:
        entry = confirmed["plan"]
        figures.update(latency_ms=entry["latency_ms"], energy_mj=entry["energy_mj"], objective=entry["objective"],
                       source="confirmed", measured_by=confirmed["measured_by"],
                       simulated=bool(confirmed["simulated"]))
    return figures
