"""Scenario benchmark of runtime adaptation (issue 28): a sequence of conditions replayed on a bundle with a
plan set, for (a) the single best static plan and (b) the adaptive runtime (``adapt="auto"``).

The workload is a compute-heavy convolutional network built here with seeded, untrained weights: 3x32x32
input, 256-channel 3x3 convolutions, about 3.5 GFLOPs per image. On tegra-k1-cloud, offloading it to the
cloud costs the board less energy than running it locally. Accuracy is not measured (no data). The plan set
is hand-picked, not a search's front: the whole model on each processor at each precision it runs, all at
full rank, exported with ``export_bundle(plan_set=...)``.

Phases, in order. Each phase has a number of requests, the network the board has, the memory the bundle may
use, and a latency budget per request:

1. link good: the round trip and bandwidth the board profile assumes (50 ms, 20 Mbit/s);
2. link degraded: 300 ms, 2 Mbit/s, with a 250 ms budget (a user waits);
3. link down;
4. link down with memory squeezed below the fp32 weights;
5. link good with a tight budget;
6. link good again.

Two replays:

- ``sim``: the simulated tegra-k1-cloud board. Each request's latency and energy are the plan's simulated
  figures, re-estimated for the phase's link the way the runtime estimates them (explorer.adapt.estimate).
  The adaptive runtime decides with the runtime's own rule (explorer.adapt.Hysteresis), knowing the link as
  its last request measured it. A remote call on a down link waits `explorer.runtime.REMOTE_TIMEOUT_S`
  (the board pays its radio listening) before the request fails (static) or is finished on the best local
  plan (adaptive).
- ``loopback``: a real ``explorer serve`` subprocess on 127.0.0.1 runs the remote blocks; the link is
  throttled in-process (explorer.offload's ``throttle``, a simulation of a slower link); the agent is
  killed for the down phases and started again on the same port. The host is not the board. Latency is
  measured wall time here. Energy and the budget check use the board's simulated figures for the plan
  that answered, so a request meets its budget when it was answered by a plan whose board latency fits;
  a failed request costs the radio's listening power over the time it took (a killed agent refuses at
  once, unlike a lost WiFi link that times out).
  Switch time is measured.

    python benchmarks/adaptation.py [--requests 6] [--json out.json] [--skip-loopback]
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, write_json  # noqa: E402
from explorer.accuracy import AccuracyScorer  # noqa: E402
from explorer.adapt import NETWORK_OFF, Conditions, Hysteresis, Link, estimate  # noqa: E402
from explorer.boards import load_board  # noqa: E402
from explorer.errors import ExplorerError  # noqa: E402
from explorer.export import export_bundle  # noqa: E402
from explorer.measure import SimMeasurer  # noqa: E402
from explorer.plan import Decision, Plan  # noqa: E402
from explorer.planset import SetMember  # noqa: E402
from explorer.problem import Constraints, Objective, Problem  # noqa: E402
from explorer.runtime import REMOTE_TIMEOUT_S, Bundle, ProviderFallbackWarning  # noqa: E402
from explorer.zoo import load_graph  # noqa: E402

BOARD = "tegra-k1-cloud"
GOOD, DEGRADED = Link(50.0, 20.0), Link(300.0, 2.0)
PROBE_EVERY_S = 0.5  # how often the adaptive runtime probes a down link (a probe runs before an inference)


def build_model(seed: int = 0) -> onnx.ModelProto:
    """The benchmark's network: seeded, untrained, compute-heavy for its small input."""
    rng = np.random.default_rng(seed)
    layers = [(3, 64, 1), (64, 256, 1), (256, 256, 1), (256, 256, 1), (256, 256, 2)]
    nodes, inits, x = [], [], "input"
    for i, (cin, cout, stride) in enumerate(layers):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1],
                                   strides=[stride] * 2, kernel_shape=[3, 3]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    w = (rng.standard_normal((10, 256)) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(w, "wfc"), numpy_helper.from_array(np.zeros(10, np.float32), "bfc")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "offload_net", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                   ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_bundle(folder: Path) -> tuple[Path, Problem]:
    """The problem (simulated tegra-k1-cloud, energy) and a bundle whose set holds every whole-model plan."""
    path = folder / "offload_net.onnx"
    onnx.save(build_model(), path)
    graph = load_graph(str(path))
    problem = Problem(graph, load_board(BOARD), SimMeasurer(seed=0), AccuracyScorer(graph.model, None),
                      Constraints(latency_ms=5000.0, max_accuracy_drop=0.05), Objective.parse("energy"))
    names = [layer.name for layer in graph.layers]
    members = []
    for pid, processor in problem.board.processors.items():
        for precision in processor.precisions:
            plan = Plan(tuple((n, Decision("full", None, precision, pid)) for n in names))
            evaluation = problem.evaluate(plan)
            if evaluation.feasible:
                members.append(SetMember(plan, evaluation, None, [f"{precision} on {pid}"]))
    members.sort(key=lambda m: m.evaluation.objective)  # the best (least energy) first: the static plan
    bundle = export_bundle(problem, members[0].plan, folder / "bundle", evaluation=members[0].evaluation,
                           plan_set=members)
    return bundle, problem


def phases(bundle: Bundle, requests: int) -> list[dict]:
    """The scenario; the squeeze and the tight budget follow from the plans' own figures."""
    local = [p for p in bundle.plans if not p["needs"]["network"]]
    fp32 = max(p["needs"]["memory_mb"] for p in local)
    fastest = min(p["figures"]["latency_ms"] for p in bundle.plans)
    squeeze, tight = round(0.5 * fp32, 3), round(1.5 * fastest, 1)
    return [{"name": "link good", "network": GOOD, "memory_mb": None, "latency_ms": 5000.0},
            {"name": "link degraded (300 ms, 2 Mbit/s), a user waits", "network": DEGRADED, "memory_mb": None,
             "latency_ms": 250.0},
            {"name": "link down", "network": NETWORK_OFF, "memory_mb": None, "latency_ms": 5000.0},
            {"name": f"link down, memory squeezed to {squeeze:g} MB", "network": NETWORK_OFF, "memory_mb": squeeze,
             "latency_ms": 5000.0},
            {"name": f"link good, tight budget {tight:g} ms", "network": GOOD, "memory_mb": None, "latency_ms": tight},
            {"name": "link good again", "network": GOOD, "memory_mb": None, "latency_ms": 5000.0}], requests


def _wait_energy_mj(board) -> float:
    """What the board spends waiting for a remote call that times out: its radio listening (the remote
    processor's active power, which the profile charges for waiting), over the runtime's timeout."""
    remote = next(p for p in board.processors.values() if p.is_remote)
    return remote.active_power_w * REMOTE_TIMEOUT_S * 1e3


def _served(entry: dict, phase: dict) -> bool:
    network_ok = not entry["needs"]["network"] or phase["network"] != NETWORK_OFF
    return network_ok and (phase["memory_mb"] is None or entry["needs"]["memory_mb"] <= phase["memory_mb"])


def replay_sim(plans: list[dict], objective: dict, scenario: list[dict], requests: int, adaptive: bool,
               wait_mj: float) -> list[dict]:
    """Per phase: energy, latency and requests that met their budget, on the simulated board."""
    by_id = {p["id"]: p for p in plans}
    current, known, hysteresis, rows = plans[0]["id"], GOOD, Hysteresis(), []
    for phase in scenario:
        energy = latency = met = served = switches = 0.0
        for _ in range(requests):
            if adaptive:
                try:
                    decision = hysteresis.decide(plans, current, Conditions(phase["latency_ms"], phase["memory_mb"],
                                                                            known), objective)
                except ExplorerError:
                    decision = None  # nothing meets the conditions: keep the plan (the runtime warns)
                if decision is not None:
                    current, switches = decision.plan_id, switches + 1
            entry = by_id[current]
            figures = estimate(entry, Conditions(network=phase["network"] if phase["network"] != NETWORK_OFF else None))
            request_mj, request_ms, answered = figures.energy_mj, figures.latency_ms, _served(entry, phase)
            if entry["needs"]["network"] and phase["network"] == NETWORK_OFF:
                request_mj, request_ms = wait_mj, REMOTE_TIMEOUT_S * 1e3  # the call times out
                if adaptive:  # ... and the same request is finished on the best local plan
                    local = min((p for p in plans if _served(p, phase)), key=lambda p: p["figures"]["objective"])
                    request_mj += local["figures"]["energy_mj"]
                    request_ms += local["figures"]["latency_ms"]
                    current, switches, answered = local["id"], switches + 1, True
            if not answered and not (entry["needs"]["network"] and phase["network"] == NETWORK_OFF):
                request_mj = request_ms = 0.0  # it does not fit in memory: not run
            known = phase["network"]  # its remote call, failed call or probe of a down link tells the runtime the link
            energy, latency = energy + request_mj, latency + request_ms
            served += answered
            met += answered and request_ms <= phase["latency_ms"]
        rows.append({"phase": phase["name"], "energy_mj": energy, "mean_latency_ms": latency / requests,
                     "met": int(met), "served": int(served), "requests": requests, "switches": int(switches)})
    return rows


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Agent:
    """A real `explorer serve` subprocess on loopback, killed and started again on the same port."""

    def __init__(self, port: int, token: str):
        self.port, self.token, self.process = port, token, None

    def start(self) -> None:
        env = dict(os.environ, EXPLORER_SERVER_TOKEN=self.token)
        self.process = subprocess.Popen([sys.executable, "-m", "explorer.entry", "serve", "--port", str(self.port)],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if re.search(r"listening on", line or ""):
                return
            if self.process.poll() is not None:
                break
        raise RuntimeError(f"explorer serve did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None


def replay_loopback(path: Path, scenario: list[dict], requests: int, adaptive: bool, wait_w: float) -> list[dict]:
    """The scenario on a real agent (see the module's docstring)."""
    token, port = secrets.token_urlsafe(16), _free_port()
    agent = Agent(port, token)
    agent.start()
    squeeze = {"memory_mb": None}
    bundle = Bundle.load(path, remote=f"http://127.0.0.1:{port}", token=token, throttle=GOOD, probe_every_s=PROBE_EVERY_S,
                         adapt="auto" if adaptive else None, fall_back=adaptive,
                         memory_probe=lambda: squeeze["memory_mb"] if squeeze["memory_mb"] is not None else 1e6)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    reference = Bundle.load(path, plan=next(p["id"] for p in bundle.plans if not p["needs"]["network"])).run(x)
    by_id = {p["id"]: p for p in bundle.plans}
    rows = []
    try:
        for phase in scenario:
            down = phase["network"] == NETWORK_OFF
            if down:
                agent.kill()
            elif agent.process is None:
                agent.start()
            bundle.client.throttle = phase["network"] if not down else None
            squeeze["memory_mb"] = phase["memory_mb"]
            switches_before, energy, wall, met, served = len(bundle.switches), 0.0, 0.0, 0, 0
            for _ in range(requests):
                started = time.perf_counter()
                try:
                    out = bundle.run(x, latency_ms=phase["latency_ms"])
                    answered = bool(np.allclose(out, reference, rtol=1e-3, atol=1e-3))  # the same model on each plan
                except ExplorerError:
                    answered = False  # the pinned plan's remote call failed
                took_ms = 1e3 * (time.perf_counter() - started)
                wall += took_ms
                entry = by_id[bundle.last_plan]
                answered = answered and _served(entry, phase)
                board = estimate(entry, Conditions(network=phase["network"] if not down else None))
                # a failed request: the radio listened while it waited (here the killed agent refuses at once)
                energy += board.energy_mj if answered else wait_w * took_ms
                served += answered
                met += answered and board.latency_ms <= phase["latency_ms"]
            phase_switches = bundle.switches[switches_before:]
            rows.append({"phase": phase["name"], "energy_mj": energy, "mean_wall_ms": wall / requests, "met": met,
                         "served": served, "requests": requests, "switches": len(phase_switches),
                         "switch_ms": [round(1e3 * s.seconds, 2) for s in phase_switches]})
    finally:
        agent.kill()
    return rows


def _table(rows_static: list[dict], rows_adaptive: list[dict], latency_key: str) -> str:
    label = {"mean_latency_ms": "mean latency ms", "mean_wall_ms": "mean wall ms"}[latency_key]
    header = ["phase", "static: met / served / requests", "static energy mJ", f"static {label}",
              "adaptive: met / served / requests", "adaptive energy mJ", f"adaptive {label}", "switches"]
    body = []
    for s, a in zip(rows_static, rows_adaptive):
        switch = f"{a['switches']}" + (f" ({', '.join(f'{ms:g}' for ms in a['switch_ms'])} ms)" if a.get("switch_ms") else "")
        body.append([s["phase"], f"{s['met']} / {s['served']} / {s['requests']}", f"{s['energy_mj']:.1f}",
                     f"{s[latency_key]:.1f}", f"{a['met']} / {a['served']} / {a['requests']}", f"{a['energy_mj']:.1f}",
                     f"{a[latency_key]:.1f}", switch])
    total = lambda rows, key: sum(r[key] for r in rows)  # noqa: E731
    body.append(["**all phases**", f"{total(rows_static, 'met')} / {total(rows_static, 'served')} / "
                 f"{total(rows_static, 'requests')}", f"{total(rows_static, 'energy_mj'):.1f}", "",
                 f"{total(rows_adaptive, 'met')} / {total(rows_adaptive, 'served')} / {total(rows_adaptive, 'requests')}",
                 f"{total(rows_adaptive, 'energy_mj'):.1f}", "", f"{total(rows_adaptive, 'switches')}"])
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6, help="requests per phase (default 6)")
    parser.add_argument("--json", help="write the results as JSON")
    parser.add_argument("--skip-loopback", action="store_true", help="only the simulated replay")
    args = parser.parse_args(argv)
    # without a CUDA build here the gpu and cloud blocks open on the CPU; in the loopback replay the agent runs the cloud's
    warnings.filterwarnings("ignore", category=ProviderFallbackWarning)
    with tempfile.TemporaryDirectory(prefix="adaptation-") as folder:
        path, problem = make_bundle(Path(folder))
        bundle = Bundle.load(path)
        scenario, requests = phases(bundle, args.requests)
        wait_mj = _wait_energy_mj(problem.board)
        print(f"plan set ({BOARD}, simulated figures; accuracy not measured: untrained weights, no data):")
        print(markdown_table(["plan", "description", "latency ms", "energy mJ", "weights MB on board", "network"],
                             [[p["id"], p["description"], f"{p['figures']['latency_ms']:.2f}",
                               f"{p['figures']['energy_mj']:.2f}", f"{p['needs']['memory_mb']:.2f}",
                               "yes" if p["needs"]["network"] else "no"] for p in bundle.plans]))
        results = {"plans": [{k: p[k] for k in ("id", "description", "figures", "needs")} for p in bundle.plans],
                   "phases": [{**ph, "network": ph["network"] if isinstance(ph["network"], str)
                               else [ph["network"].rtt_ms, ph["network"].bandwidth_mbit_s]} for ph in scenario]}
        static = replay_sim(bundle.plans, bundle.objective, scenario, requests, False, wait_mj)
        adaptive = replay_sim(bundle.plans, bundle.objective, scenario, requests, True, wait_mj)
        results["sim"] = {"static": static, "adaptive": adaptive}
        print(f"\nsimulated {BOARD} (figures of the simulated board; a timed-out remote call: {REMOTE_TIMEOUT_S:g} s, "
              f"{wait_mj:.0f} mJ):")
        print(_table(static, adaptive, "mean_latency_ms"))
        if not args.skip_loopback:
            wait_w = wait_mj / (REMOTE_TIMEOUT_S * 1e3)
            static = replay_loopback(path, scenario, requests, False, wait_w)
            adaptive = replay_loopback(path, scenario, requests, True, wait_w)
            results["loopback"] = {"static": static, "adaptive": adaptive}
            print("\nloopback: a real explorer serve, link throttled in-process (simulated), agent killed when down; "
                  "wall ms measured on this host, energy and budgets from the board's simulated figures:")
            print(_table(static, adaptive, "mean_wall_ms"))
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
