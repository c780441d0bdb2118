"""Picking a bundle's plan for the current conditions, and switching plans as they change.

Conditions are what the app has now: a latency budget per inference (DeepX: 5 s by default, 250 ms when a
user waits), the memory the bundle may use on the device, and the network (``off``, or a round trip and a
bandwidth; None: the network the search assumed). A plan *meets* them when its latency - recorded in
plan.json, and for plans with remote blocks re-estimated for the given link as the cost model counts it
(every network transfer pays half a round trip and its bytes over the bandwidth) - fits the budget, its
weight memory on the board fits the memory, and it needs no network when the network is off. Of the plans
that meet them :func:`choose` takes the one with the lowest objective the search used (least energy by
default); when none does, one line names the closest plan and what it needs.

:class:`Hysteresis` is the rule of ``Bundle.load(DIR, adapt="auto")``: leave the current plan at once when
it no longer meets the conditions; move to a better one only after it has met them with a margin
(:data:`MARGIN`) at :data:`SETTLE` checks in a row, so that conditions near a limit do not make it flap.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from explorer.errors import ExplorerError

NETWORK_OFF = "off"
SETTLE = 3  # checks in a row a better plan must meet the conditions (with the margin) before the switch
MARGIN = 0.8  # a better plan must need at most this share of the latency budget and of the memory


@dataclass(frozen=True)
class Link:
    """A network link as measured or given: round trip (ms) and bandwidth (Mbit/s)."""

    rtt_ms: float
    bandwidth_mbit_s: float

    def text(self) -> str:
        return f"{self.rtt_ms:g} ms round trip, {self.bandwidth_mbit_s:g} Mbit/s"


@dataclass(frozen=True)
class Conditions:
    """What the bundle may use now (None: no limit; network None: as the search assumed)."""

    latency_ms: float | None = None
    memory_mb: float | None = None
    network: Link | str | None = None  # a Link, NETWORK_OFF, or None

    def __post_init__(self) -> None:
        for name in ("latency_ms", "memory_mb"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                option = "--" + name.replace("_", "-")
                raise ExplorerError(f"{option} {value!r}: give a positive number ({name.split('_')[0]} in "
                                    f"{'ms' if name == 'latency_ms' else 'MB'})")
        object.__setattr__(self, "network", parse_network(self.network))

    def text(self) -> str:
        parts = []
        if self.latency_ms is not None:
            parts.append(f"latency <= {self.latency_ms:g} ms")
        if self.memory_mb is not None:
            parts.append(f"memory <= {self.memory_mb:g} MB")
        if self.network == NETWORK_OFF:
            parts.append("network off")
        elif isinstance(self.network, Link):
            parts.append(f"network {self.network.text()}")
        return ", ".join(parts) or "no limits"


def parse_network(value) -> Link | str | None:
    """--network: None, 'off', 'RTT_MS,MBPS', a (rtt_ms, mbit_s) pair or a Link; ExplorerError otherwise."""
    if value is None or isinstance(value, Link):
        if isinstance(value, Link):
            _check_link(value.rtt_ms, value.bandwidth_mbit_s, f"{value.rtt_ms},{value.bandwidth_mbit_s}")
        return value
    if isinstance(value, str):
        if value.strip().lower() == NETWORK_OFF:
            return NETWORK_OFF
        parts = value.split(",")
        try:
            rtt, mbps = (float(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            rtt = mbps = None
        if rtt is None or mbps is None:
            raise ExplorerError(f"--network {value!r}: give off, or the round trip in ms and the bandwidth in Mbit/s "
                                "as RTT_MS,MBPS (e.g. 50,20)")
        return _check_link(rtt, mbps, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _check_link(float(value[0]), float(value[1]), f"{value[0]},{value[1]}")
    raise ExplorerError(f"network {value!r}: give None, 'off', 'RTT_MS,MBPS' or (rtt_ms, mbit_s)")


def _check_link(rtt: float, mbps: float, text: str) -> Link:
    if not (math.isfinite(rtt) and math.isfinite(mbps) and rtt >= 0 and mbps > 0):
        raise ExplorerError(f"--network {text}: the round trip must be 0 ms or more and the bandwidth above 0 Mbit/s")
    return Link(rtt, mbps)


@dataclass(frozen=True)
class Estimate:
    """A plan's figures under some conditions, and what keeps it from meeting them (empty: it meets them)."""

    plan_id: str
    latency_ms: float | None
    energy_mj: float | None
    memory_mb: float | None
    objective: float
    problems: tuple[str, ...]
    estimated: bool  # latency and energy re-estimated for another network link (a model, not a measurement)

    @property
    def meets(self) -> bool:
        return not self.problems


def estimate(entry: dict, conditions: Conditions) -> Estimate:
    """The figures of one plan entry of plan.json under `conditions`, and the limits it breaks."""
    figures, needs = entry.get("figures") or {}, entry.get("needs") or {}
    latency, energy, memory = figures.get("latency_ms"), figures.get("energy_mj"), needs.get("memory_mb")
    network = needs.get("network")
    problems = []
    estimated = False
    if network and conditions.network == NETWORK_OFF:
        problems.append(f"needs the network (remote blocks on {', '.join(network['remote_processors'])})")
    elif network and isinstance(conditions.network, Link) and latency is not None:
        link = conditions.network
        extra_ms = (network["transfers"] * (link.rtt_ms - network["rtt_ms"]) / 2
                    + network["bytes"] * 8 / 1e3 * (1 / link.bandwidth_mbit_s - 1 / network["bandwidth_mbit_s"]))
        latency = latency + extra_ms
        energy = energy + network["radio_power_w"] * extra_ms if energy is not None else None  # W x ms = mJ
        estimated = True
    if conditions.latency_ms is not None:
        if latency is None:
            problems.append("its latency was not recorded")
        elif latency > conditions.latency_ms:
            problems.append(f"needs {latency:.3f} ms{' (estimated for this link)' if estimated else ''}")
    if conditions.memory_mb is not None:
        if memory is None:
            problems.append("its memory was not recorded")
        elif memory > conditions.memory_mb:
            problems.append(f"needs {memory:.2f} MB of weights")
    objective = figures.get("objective")
    return Estimate(entry["id"], latency, energy, memory, objective if objective is not None else math.inf,
                    tuple(problems), estimated)


def _score(estimate_: Estimate, weights: list, figures_of) -> float:
    """The objective the search used, for ranking plans under the conditions (lower is better)."""
    figures = {"latency": estimate_.latency_ms, "energy": estimate_.energy_mj, "memory": estimate_.memory_mb}
    values = {name: value for name, value in figures.items() if value is not None}
    if any(name not in values for name, _ in weights):
        return estimate_.objective
    if len(weights) == 1:
        return values[weights[0][0]]
    return sum(w * values[name] / max(figures_of(name), 1e-12) for name, w in weights)


def _ranking(plans: list[dict], objective: dict | None):
    """Sort key of estimates: the search's objective (weighted sums relative to the best plan's figures), then id."""
    weights = [tuple(w) for w in (objective or {}).get("weights", [["energy", 1.0]])]
    best_figures = plans[0].get("figures") or {}
    reference = {"latency": best_figures.get("latency_ms"), "energy": best_figures.get("energy_mj"),
                 "memory": (plans[0].get("needs") or {}).get("memory_mb")}
    return lambda e: (_score(e, weights, lambda name: reference[name] or 1.0), e.plan_id)


@dataclass(frozen=True)
class Selection:
    """The plan picked for some conditions and why."""

    plan_id: str
    estimate: Estimate
    reason: str
    conditions: Conditions


def choose(plans: list[dict], conditions: Conditions, objective: dict | None) -> Selection:
    """The plan (entry of plan.json's `plans`) with the lowest objective among those that meet the conditions.

    ExplorerError with one line naming the closest plan and what it needs when none meets them.
    """
    key = _ranking(plans, objective)
    estimates = [estimate(entry, conditions) for entry in plans]
    meeting = [e for e in estimates if e.meets]
    word = (objective or {}).get("description", "energy")
    if not meeting:
        # the closest: one that needs no network when there is none (the app cannot conjure one), then the fewest
        # and smallest excesses over the limits
        closest = min(estimates, key=lambda e: (any(p.startswith("needs the network") for p in e.problems),
                                                len(e.problems), _shortfall(e, conditions)))
        entry = next(p for p in plans if p["id"] == closest.plan_id)
        raise ExplorerError(f"no plan of the bundle meets {conditions.text()}: the closest is {closest.plan_id} "
                            f"({entry.get('description', '')}), which {'; '.join(closest.problems)}; "
                            "loosen the conditions or export more plans (explorer export --plans pareto)")
    chosen = min(meeting, key=key)
    entry = next(p for p in plans if p["id"] == chosen.plan_id)
    figures = f"{chosen.latency_ms:.3f} ms, {chosen.energy_mj:.3f} mJ" if chosen.latency_ms is not None else "no figures"
    if (entry.get("figures") or {}).get("simulated"):
        figures += " simulated"
    left_out = [e for e in estimates if not e.meets]
    reason = (f"{chosen.plan_id} ({entry.get('description', '')}; {figures}"
              f"{', estimated for this link' if chosen.estimated else ''}): the lowest {word} of the {len(meeting)} of "
              f"{len(plans)} plans that meet {conditions.text()}")
    if left_out:
        reason += "; left out: " + "; ".join(f"{e.plan_id} {', '.join(e.problems)}" for e in left_out[:3])
        if len(left_out) > 3:
            reason += f" and {len(left_out) - 3} more"
    return Selection(chosen.plan_id, chosen, reason, conditions)


def _shortfall(e: Estimate, conditions: Conditions) -> float:
    """How far a plan is from meeting the conditions (relative excess over each limit it breaks)."""
    total = 0.0
    if conditions.latency_ms is not None and e.latency_ms is not None:
        total += max(0.0, e.latency_ms / conditions.latency_ms - 1)
    if conditions.memory_mb is not None and e.memory_mb is not None:
        total += max(0.0, e.memory_mb / conditions.memory_mb - 1)
    return total


def with_margin(conditions: Conditions, margin: float = MARGIN) -> Conditions:
    """The conditions shrunk by the hysteresis margin (what a better plan must meet before a switch to it)."""
    return Conditions(conditions.latency_ms * margin if conditions.latency_ms is not None else None,
                      conditions.memory_mb * margin if conditions.memory_mb is not None else None, conditions.network)


@dataclass
class Hysteresis:
    """Decides, check by check, whether to switch plans (see the module's docstring)."""

    settle: int = SETTLE
    margin: float = MARGIN
    _candidate: str | None = field(default=None, repr=False)
    _streak: int = field(default=0, repr=False)

    def decide(self, plans: list[dict], current: str, conditions: Conditions, objective: dict | None) -> Selection | None:
        """The plan to switch to now, or None to stay. ExplorerError when no plan meets the conditions."""
        now = choose(plans, conditions, objective)
        if not estimate(next(p for p in plans if p["id"] == current), conditions).meets:
            self._candidate, self._streak = None, 0
            return now if now.plan_id != current else None  # the current plan breaks a limit: leave it at once
        try:
            target = choose(plans, with_margin(conditions, self.margin), objective)
        except ExplorerError:
            target = None
        if target is None or target.plan_id == current or not _better(plans, target.plan_id, current, conditions, objective):
            self._candidate, self._streak = None, 0
            return None
        self._streak = self._streak + 1 if target.plan_id == self._candidate else 1
        self._candidate = target.plan_id
        if self._streak < self.settle:
            return None
        self._candidate, self._streak = None, 0
        return Selection(target.plan_id, estimate(next(p for p in plans if p["id"] == target.plan_id), conditions),
                         target.reason + f" (with a {100 * (1 - self.margin):.0f} % margin, {self.settle} checks in a row)",
                         conditions)


def _better(plans: list[dict], a: str, b: str, conditions: Conditions, objective: dict | None) -> bool:
    """Whether plan `a` ranks before plan `b` by the objective under the conditions."""
    key = _ranking(plans, objective)
    by_id = {p["id"]: p for p in plans}
    return key(estimate(by_id[a], conditions)) < key(estimate(by_id[b], conditions))


def available_memory_mb() -> float | None:
    """Memory the OS can give now (Linux MemAvailable; elsewhere free physical pages), None where unknown."""
    from explorer.blockrun import proc_field_mb

    available = proc_field_mb("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):
        return None
