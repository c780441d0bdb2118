"""Plan sets in bundles: the set read from a tracked search, blocks shared between plans stored once, selection
for a table of conditions, adaptation with hysteresis (adapt="auto"), tampering, bad conditions, old bundles."""
import json
import shutil
import threading
import warnings

import numpy as np
import pytest

import explorer.export
from explorer.accuracy import AccuracyScorer
from explorer.adapt import Conditions, choose
from explorer.boards import load_board
from explorer.cli import main
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.export import MANIFEST_FILE, export_bundle
from explorer.measure import SimMeasurer
from explorer.plan import Decision, Plan
from explorer.planset import ROLE_BEST, ROLE_LOCAL, ROLE_SMALLEST_LOCAL, SetMember, parse_plans_option, search_plan_set
from explorer.problem import Constraints, Objective, Problem
from explorer.runtime import Bundle, ProviderFallbackWarning
from explorer.searching import SearchResult, Trial
from explorer.tracking import SearchTracker, default_tracking_uri, read_search
from explorer.zoo import load_graph, zoo_validation_data

SAMPLES = 100
LAYERS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
          "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc1", "fc2", "fc3"]


def _split(first: tuple[str, str], rest: tuple[str, str], at: int = 8) -> Plan:
    """The first `at` layers at (precision, processor) `first`, the others at `rest`, all full rank."""
    return Plan(tuple((name, Decision("full", None, *(first if i < at else rest))) for i, name in enumerate(LAYERS)))


PLANS = {  # name -> plan; the cloud and gpu splits share their first unit block (layers 0-7, fp32 on the cpu)
    "fp32 cpu": _split(("fp32", "cpu"), ("fp32", "cpu")),
    "int8 lpc": _split(("int8", "lpc"), ("int8", "lpc")),
    "int8 cpu": _split(("int8", "cpu"), ("int8", "cpu")),
    "cpu then cloud": _split(("fp32", "cpu"), ("fp32", "cloud")),
    "cpu then int8 lpc": _split(("fp32", "cpu"), ("int8", "lpc")),
    "cpu then gpu": _split(("fp32", "cpu"), ("fp32", "gpu")),
    "cloud": _split(("fp32", "cloud"), ("fp32", "cloud")),
}


def _quiet_load(path, **kwargs) -> Bundle:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)  # gpu and cloud blocks run on the CPU here
        return Bundle.load(path, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """vgg on tegra-k1-cloud (simulated), every plan of PLANS evaluated, and a bundle holding them all."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXPLORER_RUNS", str(tmp_path_factory.getbasetemp() / "runs"))
        graph = load_graph("vgg")
        data = zoo_validation_data("vgg")
        problem = Problem(graph, load_board("tegra-k1-cloud"), SimMeasurer(seed=0),
                          AccuracyScorer(graph.model, Dataset(data.x[:SAMPLES], data.y[:SAMPLES], data.source)),
                          Constraints(latency_ms=5000, max_accuracy_drop=0.05), Objective.parse("energy"))
        evaluations = {name: problem.evaluate(plan) for name, plan in PLANS.items()}
        members = [SetMember(plan, evaluations[name], None, [name]) for name, plan in PLANS.items()]
        path = export_bundle(problem, PLANS["fp32 cpu"], tmp_path_factory.mktemp("sets") / "all",
                             evaluation=evaluations["fp32 cpu"], plan_set=members)
        yield problem, evaluations, path


def _ids(path) -> dict[str, str]:
    """Plan name (its role in PLANS) -> plan id in the bundle."""
    return {entry["roles"][0]: entry["id"] for entry in json.loads((path / MANIFEST_FILE).read_text())["plans"]}


def test_a_plan_set_stores_shared_blocks_once(setup):
    problem, evaluations, path = setup
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    plans = {entry["roles"][0]: entry for entry in manifest["plans"]}
    assert list(plans) == list(PLANS) and manifest["plans"][0]["digest"] == PLANS["fp32 cpu"].digest()
    first = {name: plans[name]["blocks"][0]["file"] for name in ("cpu then cloud", "cpu then int8 lpc", "cpu then gpu")}
    assert first["cpu then cloud"] == first["cpu then gpu"]  # the same block in two plans: one file
    assert first["cpu then int8 lpc"] != first["cpu then gpu"]  # it ends by quantising what crosses to the int8 layers
    assert plans["int8 lpc"]["blocks"][0]["file"] == plans["int8 cpu"]["blocks"][0]["file"]  # same bytes, two processors
    assert plans["cloud"]["blocks"][0]["file"] == plans["fp32 cpu"]["blocks"][0]["file"]
    assert plans["cpu then cloud"]["blocks"][1]["file"] == plans["cpu then gpu"]["blocks"][1]["file"]
    referenced = [block["file"] for entry in manifest["plans"] for block in entry["blocks"]]
    stored = sorted(str(p.relative_to(path)) for p in (path / "blocks").iterdir())
    assert stored == sorted(set(referenced)) and len(stored) == len(referenced) - 4
    assert set(manifest["files"]) == set(stored) | {"model.onnx"}
    cloud = plans["cpu then cloud"]
    assert cloud["needs"]["network"]["remote_processors"] == ["cloud"] and cloud["needs"]["network"]["rtt_ms"] == 50.0
    assert cloud["needs"]["network"]["transfers"] == 2  # the crossing into the cloud and the output coming back
    assert cloud["blocks"][1]["remote"] and not cloud["blocks"][0]["remote"]
    assert plans["fp32 cpu"]["needs"]["network"] is None
    for name, entry in plans.items():  # the figures of each plan are its own evaluation's, labelled simulated
        e = evaluations[name]
        assert entry["figures"]["energy_mj"] == e.energy_mj and entry["figures"]["source"] == "search"
        assert entry["figures"]["simulated"] and entry["needs"]["latency_ms"] == e.latency_ms
        local = sum(mb for pid, mb in e.memory_mb_by_processor.items() if pid != "cloud")
        assert entry["needs"]["memory_mb"] == pytest.approx(local)
    assert plans["cloud"]["needs"]["memory_mb"] == 0.0
    bundle = _quiet_load(path)
    x = problem.scorer.dataset.x[:20]
    for name, plan_id in _ids(path).items():  # every plan runs, and gives its own model's outputs
        bundle.use(plan_id)
        reference = problem.compressor.rewrite(PLANS[name], problem.calibration_inputs)
        from explorer.sessions import run_model

        np.testing.assert_allclose(bundle.run(x), run_model(reference, x), rtol=1e-4, atol=1e-4)


ENTRIES = [  # synthetic plans: (id, latency ms, energy mJ, memory MB on the board, network needs)
    ("A", 40.0, 5.0, 10.0, None),
    ("B", 120.0, 2.0, 0.5, {"rtt_ms": 50.0, "bandwidth_mbit_s": 20.0, "transfers": 2, "bytes": 100_000,
                             "radio_power_w": 0.01, "remote_processors": ["cloud"]}),
    ("C", 15.0, 8.0, 10.0, None),
    ("D", 80.0, 6.0, 2.0, None),
]


def _entries() -> list[dict]:
    return [{"id": i, "description": f"plan {i}", "figures": {"latency_ms": lat, "energy_mj": mj, "objective": mj},
             "needs": {"latency_ms": lat, "memory_mb": mb, "network": net}} for i, lat, mj, mb, net in ENTRIES]


@pytest.mark.parametrize("conditions, expected", [
    ({}, "B"),  # the least energy
    ({"network": "off"}, "A"),
    ({"latency_ms": 30}, "C"),
    ({"latency_ms": 100}, "A"),  # B needs 120 ms
    ({"memory_mb": 5, "network": "off"}, "D"),
    ({"latency_ms": 250, "network": "200,20"}, "A"),  # B on a 200 ms link: 120 + 2 x 150 / 2 = 270 ms
    ({"latency_ms": 300, "network": "200,20"}, "B"),
    ({"latency_ms": 300, "network": (50, 2)}, "A"),  # 100 kB at 2 instead of 20 Mbit/s: +360 ms
    ({"latency_ms": 130, "network": "10,100"}, "B"),  # a better link than assumed: faster
])
def test_selection_picks_the_least_energy_plan_that_meets_the_conditions(conditions, expected):
    selection = choose(_entries(), Conditions(**conditions), {"description": "energy", "weights": [["energy", 1.0]]})
    assert selection.plan_id == expected
    assert selection.reason.startswith(f"{expected} (plan {expected}") and "the lowest energy" in selection.reason


def test_selection_by_the_search_objective_and_estimates_for_a_link():
    latency = {"description": "latency", "weights": [["latency", 1.0]]}
    assert choose(_entries(), Conditions(), latency).plan_id == "C"
    selection = choose(_entries(), Conditions(network="10,100"), None)
    assert selection.estimate.estimated and selection.estimate.latency_ms == pytest.approx(120 - 40 + 800 * (0.01 - 0.05))
    assert "estimated for this link" in selection.reason


@pytest.mark.parametrize("conditions, message", [
    ({"latency_ms": 10}, r"no plan of the bundle meets latency <= 10 ms: the closest is C \(plan C\), which needs "
                         r"15\.000 ms; loosen the conditions"),
    ({"memory_mb": 1, "network": "off"}, r"meets memory <= 1 MB, network off: the closest is D \(plan D\), which "
                                         r"needs 2\.00 MB of weights"),
])
def test_no_plan_meeting_the_conditions_names_the_closest(conditions, message):
    with pytest.raises(ExplorerError, match=message):
        choose(_entries(), Conditions(**conditions), None)


@pytest.mark.parametrize("kwargs, message", [
    ({"latency_ms": -250}, r"--latency-ms -250: give a positive number"),
    ({"memory_mb": 0}, r"--memory-mb 0: give a positive number"),
    ({"network": "fast"}, r"--network 'fast': give off, or the round trip in ms and the bandwidth in Mbit/s"),
    ({"network": "50,0"}, r"bandwidth above 0 Mbit/s"),
])
def test_bad_conditions_are_refused(kwargs, message):
    with pytest.raises(ExplorerError, match=message):
        Conditions(**kwargs)


def test_the_bundle_selects_for_conditions_and_keeps_shared_sessions(setup, tmp_path):
    problem, evaluations, path = setup
    ids = _ids(path)
    bundle = _quiet_load(path)
    local = {name: e for name, e in evaluations.items() if "cloud" not in name}
    selection = bundle.select(network="off")
    assert selection.plan_id == ids[min(local, key=lambda n: local[n].energy_mj)]
    small = {name: e for name, e in local.items() if e.memory_mb < 0.5}
    selection = bundle.select(memory_mb=0.5, network="off")
    assert selection.plan_id == ids[min(small, key=lambda n: small[n].energy_mj)] and bundle.current["id"] == selection.plan_id
    with pytest.raises(ExplorerError, match=r"no plan of the bundle meets latency <= 0\.01 ms: the closest is p\d"):
        bundle.select(latency_ms=0.01)
    bundle.use(ids["cpu then cloud"])
    switch = bundle.adapt(Conditions(network="off", latency_ms=evaluations["cpu then gpu"].latency_ms * 1.01,
                                     memory_mb=evaluations["cpu then gpu"].memory_mb * 1.01))
    candidates = [n for n, e in local.items() if e.latency_ms <= evaluations["cpu then gpu"].latency_ms * 1.01
                  and e.memory_mb <= evaluations["cpu then gpu"].memory_mb * 1.01]
    assert switch.after == ids[min(candidates, key=lambda n: local[n].energy_mj)]
    two = export_bundle(problem, PLANS["cpu then cloud"], tmp_path / "two", evaluation=evaluations["cpu then cloud"],
                        plan_set=[SetMember(PLANS[n], evaluations[n], None, [n]) for n in ("cpu then cloud", "cpu then gpu")])
    bundle = _quiet_load(two)
    switch = bundle.adapt(Conditions(network="off"))
    assert (switch.before, switch.after, switch.opened, switch.kept, switch.closed) == ("p0", "p1", 1, 1, 1)
    assert switch.seconds > 0 and "the lowest energy of the 1 of 2 plans that meet network off" in switch.reason
    assert bundle.adapt(Conditions(network="off")) is None  # already there


def test_auto_adaptation_switches_under_memory_pressure_and_back_without_flapping(setup, tmp_path, caplog):
    problem, evaluations, _ = setup
    names = ("fp32 cpu", "int8 lpc", "int8 cpu")  # fp32 on the cpu: least energy; the int8 plans: a quarter of the memory
    assert min(names, key=lambda n: evaluations[n].energy_mj) == "fp32 cpu"
    path = export_bundle(problem, PLANS["fp32 cpu"], tmp_path / "auto", evaluation=evaluations["fp32 cpu"],
                         plan_set=[SetMember(PLANS[n], evaluations[n], None, [n]) for n in names])
    big, squeezed = 5.0, 0.5  # MB the bundle may use: fp32 needs ~0.98 MB, int8 ~0.25 MB
    budgets = iter([big, big, squeezed, squeezed, big, big, big, big])
    x = problem.scorer.dataset.x[:8]
    expected = {plan_id: _quiet_load(path, plan=plan_id).run(x) for plan_id in ("p0", "p1", "p2")}
    bundle = _quiet_load(path, adapt="auto", memory_probe=lambda: next(budgets))
    smaller = min(names[1:], key=lambda n: evaluations[n].energy_mj)
    with caplog.at_level("INFO", logger="explorer.runtime"):
        ran = []
        for _ in range(8):
            out = bundle.run(x)
            ran.append((bundle.current["id"], out))  # the plan that ran it
    low = _ids(path)[smaller]
    assert [plan_id for plan_id, _ in ran] == ["p0", "p0", low, low, low, low, "p0", "p0"]
    for plan_id, out in ran:  # every inference returns its plan's outputs
        np.testing.assert_array_equal(out, expected[plan_id])
    moves = [(s.before, s.after, s.inference) for s in bundle.switches[1:]]
    assert moves == [("p0", low, 2), (low, "p0", 6)]  # down at once; up after 3 checks in a row with room to spare
    assert "memory <= 0.5 MB" in bundle.switches[1].reason and "margin" in bundle.switches[2].reason
    assert all(s.seconds > 0 for s in bundle.switches)
    assert sum("switched plan" in r.message for r in caplog.records) == 2
    flapping = iter([big, squeezed, big, squeezed, big, squeezed, big, squeezed])
    bundle = _quiet_load(path, adapt="auto", memory_probe=lambda: next(flapping))
    for _ in range(8):
        bundle.run(x)
    assert [(s.before, s.after) for s in bundle.switches[1:]] == [("p0", low)]  # it never flaps back and forth


def test_a_tampered_shared_block_is_refused_for_every_plan_that_uses_it(setup, tmp_path):
    _, _, path = setup
    copy = shutil.copytree(path, tmp_path / "copy")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    ids = _ids(copy)
    bundle = _quiet_load(copy)  # loaded intact: the shared block's sessions are not open yet
    shared = next(e for e in manifest["plans"] if e["id"] == ids["cpu then cloud"])["blocks"][0]["file"]
    data = bytearray((copy / shared).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / shared).write_bytes(bytes(data))
    users = ", ".join(ids[n] for n in ("cpu then cloud", "cpu then gpu"))
    with pytest.raises(ExplorerError, match=rf"{shared} \(a block of plans {users}\) does not match its checksum"):
        _quiet_load(copy)
    for name in ("cpu then cloud", "cpu then gpu"):
        with pytest.raises(ExplorerError, match=rf"{shared} does not match its checksum in plan\.json"):
            bundle.use(ids[name])
    bundle.use(ids["int8 cpu"])  # a plan that does not use it still runs
    assert bundle.current["id"] == ids["int8 cpu"]


def test_run_command_selects_a_plan_and_refuses_bad_conditions(setup, tmp_path, capsys):
    problem, _, path = setup
    np.save(tmp_path / "x.npy", problem.scorer.dataset.x[:3])
    assert main(["run", str(path), "--input", str(tmp_path / "x.npy"), "--network", "off", "--memory-mb", "0.5"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "plan p" in out and "that meet memory <= 0.5 MB, network off" in out and "switched from p0" in out
    for bad, message in ((["--latency-ms", "-5"], "--latency-ms -5.0: give a positive number"),
                         (["--network", "wifi"], "--network 'wifi': give off"),
                         (["--latency-ms", "0.001"], "no plan of the bundle meets latency <= 0.001 ms")):
        assert main(["run", str(path), "--input", str(tmp_path / "x.npy"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err and err.startswith("explorer: error:")


def test_plan_set_from_a_tracked_search_keeps_the_must_haves(setup):
    problem, evaluations, _ = setup
    result = SearchResult("random")
    tracker = SearchTracker(default_tracking_uri(), "vgg @ tegra-k1-cloud", "plan set", {"agent": "random"})
    for number, (name, plan) in enumerate(PLANS.items()):
        trial = Trial(number, plan, evaluations[name], "random", "random", 0.01)
        result.trials.append(trial)
        result.best_so_far.append(1.0)
        tracker.log_trial(trial, result)
    tracker.close()
    search = read_search(None, tracker.run_id)
    best = min(PLANS, key=lambda n: evaluations[n].objective)
    members = search_plan_set(problem, search, PLANS[best], None, 8)
    names = {m.plan.digest(): n for n, p in PLANS.items() for m in members if m.plan == p}
    assert members[0].plan == PLANS[best] and ROLE_BEST in members[0].roles
    local = [n for n in PLANS if "cloud" not in n]
    roles = {names[m.plan.digest()]: m.roles for m in members}
    assert ROLE_LOCAL in roles[min(local, key=lambda n: evaluations[n].objective)]
    assert ROLE_SMALLEST_LOCAL in roles[min(local, key=lambda n: (evaluations[n].memory_mb, evaluations[n].objective))]
    assert len(members) <= 8 and len({m.plan.digest() for m in members}) == len(members)
    few = search_plan_set(problem, search, PLANS[best], None, 2)
    assert len(few) == 2 and few[0].plan == PLANS[best] and ROLE_LOCAL in few[0].roles + few[1].roles


def test_plans_option():
    assert parse_plans_option("best") is None and parse_plans_option("pareto") == 8 and parse_plans_option("3") == 3
    with pytest.raises(ExplorerError, match="--plans 'all': give best"):
        parse_plans_option("all")
    with pytest.raises(ExplorerError, match="--plans '0'"):
        parse_plans_option("0")


def test_a_schema_1_bundle_still_loads(setup, tmp_path):
    """A bundle as explorer wrote them before plan sets: block_<i>.onnx files, no plans, no digest of plan.json."""
    problem, evaluations, _ = setup
    path = export_bundle(problem, PLANS["cpu then gpu"], tmp_path / "old", evaluation=evaluations["cpu then gpu"])
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    for i, block in enumerate(manifest["blocks"]):
        (path / block["file"]).rename(path / f"block_{i}.onnx")
        manifest["files"][f"block_{i}.onnx"] = manifest["files"].pop(block["file"])
        block["file"] = f"block_{i}.onnx"
        del block["remote"]
    (path / "blocks").rmdir()
    for key in ("plans", "digest", "objective"):
        del manifest[key]
    manifest["schema_version"] = 1
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    bundle = _quiet_load(path)
    assert bundle.plan_ids == ["p0"] and "schema 1" in bundle.warnings[0]
    x = problem.scorer.dataset.x[:5]
    assert bundle.run(x).shape == (5, 10)
    assert bundle.select(latency_ms=5000).plan_id == "p0"
    assert explorer.export.BUNDLE_SCHEMA_VERSION == 2


# ---- remote blocks on a real `explorer serve` agent (loopback) ----------------------------------------
TOKEN = "offload-test-token"


def _start_agent(port: int = 0):
    from explorer.serve import MeasurementServer, make_server

    agent = MeasurementServer(TOKEN, 64 << 20, 5.0, 30.0, 256 << 20)
    server = make_server("127.0.0.1", port, agent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, agent


def _kill(server) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def offload_bundle(setup, tmp_path):
    """A bundle whose best plan runs all of vgg on the cloud, with the fp32 cpu plan as its local one; the
    outputs of the local plan; a running agent."""
    problem, evaluations, _ = setup
    path = export_bundle(problem, PLANS["cloud"], tmp_path / "offload", evaluation=evaluations["cloud"],
                         plan_set=[SetMember(PLANS[n], evaluations[n], None, [n]) for n in ("cloud", "fp32 cpu")])
    x = problem.scorer.dataset.x[:8]
    server, agent = _start_agent()
    yield path, x, _quiet_load(path, plan="p1").run(x), server
    _kill(server)


@pytest.mark.parametrize("adapt", [None, "auto"])
def test_a_killed_agent_mid_sequence_loses_no_inference(offload_bundle, adapt):
    path, x, local, server = offload_bundle
    port = server.server_address[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)  # the cloud block is not opened here
        bundle = Bundle.load(path, remote=f"http://127.0.0.1:{port}", token=TOKEN, adapt=adapt, probe_every_s=0.0,
                             memory_probe=lambda: 0.1)  # only the cloud plan fits in 0.1 MB on the board
    ran = []
    for i in range(9):
        if i == 3:
            _kill(server)  # the agent dies between inferences 2 and 3
        if i == 6:
            server, agent = _start_agent(port)  # a fresh agent: it has to get the block uploaded again
        out = bundle.run(x)  # never raises
        ran.append(bundle.current["id"])
        np.testing.assert_allclose(out, local, rtol=1e-5, atol=1e-5)  # the same model as the local plan
    assert ran == ["p0"] * 3 + ["p1"] * 3 + ["p0"] * 3
    assert bundle.fallbacks_to_local == 1 and bundle.link_down is None
    assert "remote block failed: the server at http://127.0.0.1" in bundle.switches[1].reason
    assert "p1" in bundle.switches[1].reason and bundle.switches[1].after == "p1" and bundle.switches[2].after == "p0"
    assert agent.offload_runs > 0 and bundle.client.calls  # the new agent ran it
    assert not bundle.fallbacks  # no block fell back to the local CPU
    _kill(server)


def test_a_round_trip_beyond_the_plans_assumption_moves_to_the_local_plan_and_back(offload_bundle):
    from explorer.adapt import Link

    path, x, local, server = offload_bundle
    bundle = Bundle.load(path, remote=f"http://127.0.0.1:{server.server_address[1]}", token=TOKEN, probe_every_s=0.0,
                         throttle=Link(200.0, 100.0))  # the plan assumed 50 ms (simulated throttle)
    np.testing.assert_allclose(bundle.run(x), local, rtol=1e-5, atol=1e-5)  # slow, but answered
    assert bundle.current["id"] == "p1" and "measured round trip" in bundle.switches[-1].reason
    bundle.run(x)
    assert bundle.current["id"] == "p1"  # the probe also sees 200 ms: still down
    bundle.client.throttle = None  # the link recovers
    bundle.run(x)
    assert bundle.current["id"] == "p0" and "is back" in bundle.switches[-1].reason
    assert bundle.fallbacks_to_local == 0  # no inference had to be run again


def test_offload_endpoint_refuses_bad_requests(offload_bundle):
    from explorer.offload import OffloadClient, OffloadFailed

    path, x, _, server = offload_bundle
    client = OffloadClient(f"http://127.0.0.1:{server.server_address[1]}", "wrong", 2.0)
    with pytest.raises(OffloadFailed, match="answered 401"):
        client.run("0" * 64, lambda: b"", {"input": x}, "CPUExecutionProvider", 1)
    client = OffloadClient(f"http://127.0.0.1:{server.server_address[1]}", TOKEN, 2.0)
    block = json.loads((path / MANIFEST_FILE).read_text())["plans"][1]["blocks"][0]
    sha = block["file"][len("blocks/"):-len(".onnx")]
    with pytest.raises(OffloadFailed, match="the block takes \\['input'\\], the body has \\['wrong'\\]"):
        client.run(sha, lambda: (path / block["file"]).read_bytes(), {"wrong": x}, "CPUExecutionProvider", 1)
    with pytest.raises(OffloadFailed, match="does not match its digest here"):
        client.run("1" * 64, lambda: b"not that block", {"input": x}, "CPUExecutionProvider", 1)


def test_run_command_offloads_and_falls_back(offload_bundle, tmp_path, capsys, monkeypatch):
    path, x, local, server = offload_bundle
    monkeypatch.setenv("EXPLORER_AGENT_TOKEN", TOKEN)
    np.save(tmp_path / "x.npy", x)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    assert main(["run", str(path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--remote", url]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"block 0: cloud on remote {url}" in out and "finished on a local plan" not in out
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), local, rtol=1e-5, atol=1e-5)
    _kill(server)
    assert main(["run", str(path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--remote", url]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the measurement server failed: finished on a local plan (remote block failed" in out and "block 0: cpu" in out
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), local, rtol=1e-5, atol=1e-5)


def test_the_scenario_benchmark_meets_more_budgets_at_no_more_energy(tmp_path):
    """benchmarks/adaptation.py, simulated replay: the adaptive runtime against the single best static plan."""
    from benchmarks.adaptation import _wait_energy_mj, make_bundle, phases, replay_sim

    path, problem = make_bundle(tmp_path)
    bundle = _quiet_load(path)
    assert bundle.plans[0]["needs"]["network"] is not None  # offloading is the best plan when the link is good
    scenario, requests = phases(bundle, 3)
    static, adaptive = (replay_sim(bundle.plans, bundle.objective, scenario, requests, mode, _wait_energy_mj(problem.board))
                        for mode in (False, True))
    assert sum(r["met"] for r in adaptive) > sum(r["met"] for r in static)
    assert sum(r["energy_mj"] for r in adaptive) <= sum(r["energy_mj"] for r in static)
    assert static[0] == {**adaptive[0], "switches": 0}  # link good: the same plan, the same figures
    assert all(r["served"] == r["requests"] for r in adaptive)


def test_export_refuses_a_plan_set_without_a_search(tmp_path, capsys):
    for args, message in ((["--plan", str(tmp_path / "p.json"), "--plans", "pareto"],
                           "--plans pareto|N reads the plan set from a search's trials: give --run RUN_ID"),
                          (["--run", "0123abcd", "--plans", "many"], "--plans 'many': give best")):
        assert main(["export", *args, "--out", str(tmp_path / "bundle")]) == 2
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "bundle").exists()


def test_the_agent_only_install_runs_offloaded_blocks(offload_bundle):
    """The offload endpoint on an agent started as `explorer[server]` installs it (no search or training stack)."""
    from test_serve import TOKEN as SERVE_TOKEN
    from test_serve import ServerProcess

    from explorer.offload import OffloadClient

    path, x, local, _ = offload_bundle
    agent = ServerProcess()
    try:
        bundle = Bundle.load(path, remote=f"http://{agent.address}", token=SERVE_TOKEN, fall_back=False)
        np.testing.assert_allclose(bundle.run(x), local, rtol=1e-5, atol=1e-5)
        assert isinstance(bundle.client, OffloadClient) and bundle.client.uploads == 1 and len(bundle.client.calls) == 1
        status, info = agent.request("GET", "/info")
        assert status == 200 and "run-block" in info["features"]
    finally:
        agent.stop()
