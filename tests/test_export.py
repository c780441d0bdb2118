"""Export bundle and runtime: files and checksums, outputs equal the compressed model's, CPU fallback,
tampering and paths outside the bundle refused, atomic (re-)export, the `explorer run` function."""
import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import onnxruntime
import pytest

import explorer.export
import explorer.partition
import explorer.runtime
from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.export import MANIFEST_FILE, MODEL_FILE, export_bundle
from explorer.measure import SimMeasurer
from explorer.plan import Decision, Plan
from explorer.problem import Constraints, Objective, Problem
from explorer.runtime import Bundle, ProviderFallbackWarning, format_run_summary, run_bundle_cli
from explorer.sessions import run_model
from explorer.zoo import load_graph, zoo_validation_data

SAMPLES = 300

# 6 unit blocks on cpu, gpu (CUDA on tegra-k1), cpu, lpc, gpu, cpu; compressed layers; fp16 and int8
MIXED = {
    "conv1_1": ("full", None, "fp32", "cpu"), "conv1_2": ("full", None, "int8", "cpu"),
    "conv2_1": ("full", None, "fp16", "gpu"), "conv2_2": ("spatial", 16, "fp16", "gpu"),
    "conv3_1": ("spatial", 24, "fp32", "gpu"), "conv3_2": ("spatial", 32, "fp16", "gpu"),
    "conv3_3": ("full", None, "fp32", "gpu"), "conv4_1": ("full", None, "int8", "cpu"),
    "conv4_2": ("spatial", 72, "int8", "cpu"), "conv4_3": ("full", None, "fp16", "lpc"),
    "conv5_1": ("spatial", 72, "fp32", "lpc"), "conv5_2": ("channel", 40, "int8", "lpc"),
    "conv5_3": ("full", None, "fp32", "gpu"), "fc1": ("svd", 32, "fp32", "gpu"),
    "fc2": ("svd", 48, "int8", "cpu"), "fc3": ("full", None, "fp32", "cpu"),
}
# 3 unit blocks (cpu, gpu, lpc), all fp32, the same layers factorised
FP32 = {name: (method, rank, "fp32", "cpu" if i < 4 else "gpu" if i < 9 else "lpc")
        for i, (name, (method, rank, _, _)) in enumerate(MIXED.items())}


def _plan(table: dict) -> Plan:
    return Plan.from_dict({name: Decision(*choice) for name, choice in table.items()})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Problem (vgg on tegra-k1, sim), the mixed plan, its Evaluation and its bundle."""
    with pytest.MonkeyPatch.context() as patch:  # module fixtures run before conftest's per-test one
        patch.setenv("EXPLORER_RUNS", str(tmp_path_factory.getbasetemp() / "runs"))
        graph = load_graph("vgg")
        data = zoo_validation_data("vgg")
        subset = Dataset(data.x[:SAMPLES], data.y[:SAMPLES], data.source)
        problem = Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=0), AccuracyScorer(graph.model, subset),
                          Constraints(latency_ms=250, max_accuracy_drop=0.01), Objective.parse("energy"))
        plan = _plan(MIXED)
        evaluation = problem.evaluate(plan)
        path = export_bundle(problem, plan, tmp_path_factory.mktemp("bundles") / "mixed", evaluation=evaluation,
                             predicted={"latency_ms": np.float64(12.5), "energy_mj": 3.25}, run_id="0123abcd")
        yield problem, plan, evaluation, path


@pytest.fixture
def cpu_only(monkeypatch):
    """ONNX Runtime as built without CUDA (as here), whatever this machine has."""
    monkeypatch.setattr(explorer.runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def _load_quietly(path, **kwargs) -> Bundle:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)
        return Bundle.load(path, **kwargs)


def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


def _edit_manifest(path, change, reseal: bool = True) -> None:
    """Change plan.json; `reseal`: as a crafted bundle would, with its digest made to match (so that the checks
    behind the digest are what refuses it)."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    change(manifest)
    manifest["plans"][0]["blocks"] = manifest["blocks"]
    if reseal:
        manifest["digest"] = explorer.export.manifest_digest(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def _bundle_entries(path) -> list[str]:
    """The bundle's files, block files under blocks/ by name."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def _visible_entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_bundle_holds_files_with_checksums_and_describes_the_plan(exported):
    problem, plan, evaluation, path = exported
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    blocks = manifest["blocks"]
    assert [b["processor"] for b in blocks] == ["cpu", "gpu", "cpu", "lpc", "gpu", "cpu"]
    assert _bundle_entries(path) == sorted([MANIFEST_FILE, MODEL_FILE] + [b["file"] for b in blocks])
    assert set(manifest["files"]) == {MODEL_FILE} | {b["file"] for b in blocks}
    for name, checksum in manifest["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == checksum
        assert name == MODEL_FILE or name == f"blocks/{checksum}.onnx"  # blocks are addressed by their SHA-256
    assert manifest["digest"] == explorer.export.manifest_digest(manifest)
    assert [p["id"] for p in manifest["plans"]] == ["p0"] and manifest["plans"][0]["blocks"] == blocks
    assert manifest["plans"][0]["roles"] == ["best"] and manifest["plans"][0]["needs"]["network"] is None
    assert manifest["schema_version"] == explorer.export.BUNDLE_SCHEMA_VERSION and manifest["created"].endswith("Z")
    assert manifest["explorer_version"] == explorer.export.explorer_version()
    assert manifest["board"] == {"name": "tegra-k1", "digest": problem.board.digest, "description": problem.board.description}
    assert manifest["model"]["sha256"] == problem.graph.fingerprint() and manifest["model"]["source"] == "vgg"
    assert manifest["model"]["input"] == {"name": "input", "shape": ["batch", 1, 32, 32], "dtype": "float32"}
    assert manifest["data"]["samples"] == SAMPLES and manifest["data"]["sha256"] == problem.scorer.data_digest()
    assert Plan.from_json(manifest["plan"]) == plan and manifest["plan"]["digest"] == plan.digest()
    assert [name for b in blocks for name in b["layers"]] == [layer.name for layer in problem.graph.layers]
    gpu = problem.board.processor("gpu")
    assert (blocks[1]["provider"], blocks[1]["threads"]) == ("CUDAExecutionProvider", gpu.threads)
    assert blocks[0]["provider"] == "CPUExecutionProvider" and blocks[3]["threads"] == problem.board.processor("lpc").threads
    assert blocks[0]["inputs"] == ["input"] and blocks[-1]["outputs"] == ["logits"]
    assert set(blocks[2]["inputs"]) <= set(blocks[1]["outputs"])
    assert manifest["measured"] == json.loads(json.dumps(evaluation.to_json()))
    assert "simulated" in manifest["measured"]["measured_by"]
    assert manifest["accuracy"]["value"] == evaluation.accuracy and manifest["accuracy"]["metric"] == "top1"
    assert manifest["predicted"] == {"latency_ms": 12.5, "energy_mj": 3.25} and manifest["mlflow_run_id"] == "0123abcd"


def test_runtime_reproduces_the_compressed_model_and_its_accuracy(exported, cpu_only):
    problem, plan, evaluation, path = exported
    with pytest.warns(ProviderFallbackWarning, match=r"processor gpu\): this ONNX Runtime has no CUDAExecutionProvider") as caught:
        bundle = Bundle.load(path)
    assert [str(w.message).split(" (")[0] for w in caught] == ["block 1", "block 4"]  # the two gpu blocks
    assert bundle.fallbacks == [str(w.message) for w in caught]
    assert bundle.providers == ["CPUExecutionProvider"] * 6
    x, y = problem.scorer.dataset.x, problem.scorer.dataset.y
    outputs, block_ms = bundle.run(x, timing=True)
    assert len(block_ms) == 6 and all(ms > 0 for ms in block_ms)
    reference = run_model(problem.compressor.rewrite(plan, problem.calibration_inputs), x)
    assert outputs.shape == reference.shape == (SAMPLES, 10)
    assert np.mean(outputs.argmax(1) == reference.argmax(1)) >= 0.995
    assert np.mean(outputs.argmax(1) == y) == evaluation.accuracy
    assert evaluation.accuracy > 0.8  # a sensible plan, so that top-1 agreement means something
    np.testing.assert_array_equal(bundle.run(x[:7]), outputs[:7])  # another batch size, same session


def test_strict_refuses_a_missing_provider(exported, cpu_only):
    with pytest.raises(ExplorerError, match=r"block 1 \(processor gpu\): this ONNX Runtime has no CUDAExecutionProvider"):
        Bundle.load(exported[3], strict=True)


def test_fp32_bundle_equals_the_compressed_model(exported, tmp_path, cpu_only):
    problem, _, _, _ = exported
    plan = _plan(FP32)
    with pytest.raises(ExplorerError, match="JSON-ready"):
        export_bundle(problem, plan, tmp_path / "fp32", predicted={"when": object()})
    assert not (tmp_path / "fp32").exists()
    path = export_bundle(problem, plan, tmp_path / "fp32")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["measured"] is None and manifest["accuracy"] is None and manifest["mlflow_run_id"] is None
    bundle = _load_quietly(path)
    assert [b.processor for b in bundle.blocks] == ["cpu", "gpu", "lpc"]
    x = problem.scorer.dataset.x
    reference = run_model(problem.compressor.rewrite(plan), x)
    outputs = bundle.run(x)
    assert np.max(np.abs(outputs - reference)) <= 1e-5 * np.max(np.abs(reference))


def test_int8_bundle_runs_exactly_what_was_scored(exported, tmp_path, cpu_only):
    """int8 layers at every kind of block edge: the bundle's blocks, its model.onnx under plain ONNX Runtime
    defaults and the model the accuracy was scored on give the same outputs, bit for bit."""
    problem, _, _, _ = exported
    processors = ["cpu"] * 3 + ["lpc"] * 4 + ["cpu"] * 5 + ["lpc"] * 4
    table = {name: ("full", None, "int8", processor) for name, processor in zip(MIXED, processors)}
    table["conv2_1"] = ("full", None, "fp32", "cpu")  # an fp32 layer feeding an int8 one across a block edge
    table["fc1"] = ("svd", 32, "int8", "lpc")  # factorised: two int8 nodes
    plan = _plan(table)
    evaluation = problem.evaluate(plan)
    bundle = _load_quietly(export_bundle(problem, plan, tmp_path / "int8", evaluation=evaluation))
    x = problem.scorer.dataset.x
    plain = onnxruntime.InferenceSession(str(tmp_path / "int8" / MODEL_FILE)).run(None, {"input": x})[0]
    scored = run_model(problem.compressor.rewrite_shared(plan, problem.calibration_inputs), x)
    np.testing.assert_array_equal(bundle.run(x), plain)
    np.testing.assert_array_equal(scored, plain)
    assert np.mean(plain.argmax(1) == problem.scorer.dataset.y) == evaluation.accuracy
    manifest = json.loads((tmp_path / "int8" / MANIFEST_FILE).read_text())
    crossings = [t for block in manifest["blocks"][1:] for t in block["inputs"]]
    assert len(crossings) == 3 and all(t.endswith("_QuantizeLinear_Output") for t in crossings)  # uint8 crosses


def test_a_modified_block_is_refused(exported, tmp_path):
    path = _copy(exported[3], tmp_path)
    name = json.loads((path / MANIFEST_FILE).read_text())["blocks"][1]["file"]
    data = bytearray((path / name).read_bytes())
    data[-1] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(ExplorerError, match=rf"{name} \(a block of plan p0\) does not match its checksum in plan\.json: "
                                            r"the bundle was modified; export it again"):
        _load_quietly(path)


def test_an_edited_plan_json_is_refused(exported, tmp_path):
    """plan.json has a digest of its own: changed decisions (or anything else) do not load."""
    path = _copy(exported[3], tmp_path)
    _edit_manifest(path, lambda m: m["blocks"][0].update(threads=2), reseal=False)
    with pytest.raises(ExplorerError, match=r"plan\.json does not match its own digest; the bundle was modified"):
        _load_quietly(path)
    _edit_manifest(path, lambda m: m.pop("digest"), reseal=False)
    with pytest.raises(ExplorerError, match=r"digest \(the SHA-256 of plan\.json itself\) is missing"):
        _load_quietly(path)


@pytest.mark.parametrize("name", ["../x.onnx", "/etc/passwd", "sub/../../x.onnx", "escape.onnx"])
def test_plan_json_pointing_outside_the_bundle_is_refused(exported, tmp_path, name):
    path = _copy(exported[3], tmp_path)
    outside = tmp_path / "x.onnx"
    shutil.copy(path / json.loads((path / MANIFEST_FILE).read_text())["blocks"][0]["file"], outside)  # a valid block with the right checksum, outside the folder
    (path / "escape.onnx").symlink_to(outside)
    checksum = hashlib.sha256(outside.read_bytes()).hexdigest()

    def point_outside(manifest):
        manifest["files"][name] = checksum
        manifest["blocks"][0]["file"] = name

    _edit_manifest(path, point_outside)
    with pytest.raises(ExplorerError, match="outside the bundle folder"):
        _load_quietly(path)


def test_an_invalid_manifest_is_refused(exported, tmp_path):
    path = _copy(exported[3], tmp_path)
    _edit_manifest(path, lambda m: m.update(schema_version=99))
    with pytest.raises(ExplorerError, match="newer than this explorer reads"):
        Bundle.load(path)
    _edit_manifest(path, lambda m: (m.update(schema_version=1), m["blocks"][2].update(inputs=["nowhere"])))
    with pytest.raises(ExplorerError, match="block 2 needs nowhere"):
        Bundle.load(path)
    with pytest.raises(ExplorerError, match="not a bundle"):
        Bundle.load(tmp_path)


def test_reexport_refuses_without_overwrite_and_replaces_with_it(exported, tmp_path, monkeypatch):
    problem, plan, evaluation, _ = exported
    fp32_plan = _plan(FP32)
    path = export_bundle(problem, fp32_plan, tmp_path / "bundle")
    before = (path / MANIFEST_FILE).read_bytes()
    with pytest.raises(ExplorerError, match="already exists and is not empty.*--overwrite"):
        export_bundle(problem, plan, path, evaluation=evaluation)
    assert (path / MANIFEST_FILE).read_bytes() == before
    export_bundle(problem, plan, path, evaluation=evaluation, overwrite=True)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["plan"]["digest"] == plan.digest() and len(manifest["blocks"]) == 6
    assert _bundle_entries(path) == sorted([MANIFEST_FILE, MODEL_FILE] + [b["file"] for b in manifest["blocks"]])
    assert os.listdir(tmp_path) == ["bundle"]  # no temporary or parked folders left
    monkeypatch.setattr(explorer.export, "_exchange", lambda a, b: False)  # a system without atomic exchange
    export_bundle(problem, fp32_plan, path, overwrite=True)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["plan"]["digest"] == fp32_plan.digest()
    assert _bundle_entries(path) == sorted([MANIFEST_FILE, MODEL_FILE] + [b["file"] for b in manifest["blocks"]])
    assert os.listdir(tmp_path) == ["bundle"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ExplorerError, match="not a bundle"):
        export_bundle(problem, plan, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("previous", [False, True])
def test_an_interrupted_export_leaves_no_bundle_or_the_previous_one(exported, tmp_path, monkeypatch, previous):
    problem, plan, evaluation, _ = exported
    out = tmp_path / "bundle"
    if previous:
        export_bundle(problem, _plan(FP32), out)
        before = {name: (out / name).read_bytes() for name in _bundle_entries(out)}
    extract = explorer.partition.extract_submodel
    written: set[str] = set()

    def interrupt_once_a_block_is_written(*args, **kwargs):
        written.update(p.name if p.parent.name != "blocks" else "a block" for p in tmp_path.glob(".bundle.partial-*/**/*")
                       if p.is_file())
        if "a block" in written:
            raise KeyboardInterrupt
        return extract(*args, **kwargs)

    monkeypatch.setattr(explorer.partition, "extract_submodel", interrupt_once_a_block_is_written)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(problem, plan, out, evaluation=evaluation, overwrite=True)
    assert written == {MODEL_FILE, "a block"}
    assert os.listdir(tmp_path) == (["bundle"] if previous else [])
    if previous:
        assert {name: (out / name).read_bytes() for name in _bundle_entries(out)} == before
        _load_quietly(out)


def test_run_timing_is_a_median_of_warm_runs_with_its_interval(exported, tmp_path, cpu_only):
    """`explorer run --timing`: warm-up runs, then repeats; each block and the total as a median with the 95 %
    interval of the median (the total also with the runs' p10-p90), and how many runs it took."""
    import re

    _, _, _, path = exported
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 1, 32, 32), dtype=np.float32))
    summary = run_bundle_cli(path, tmp_path / "x.npy", timing=True)
    timing = summary["timing"]
    assert timing["warmup"] == explorer.runtime.TIMING_WARMUP == 3 and timing["runs"] >= explorer.runtime.TIMING_MIN_RUNS
    low, high = timing["total_ci"]
    assert low <= summary["total_ms"] <= high and timing["total_p10_p90"][0] <= summary["total_ms"] <= timing["total_p10_p90"][1]
    text = format_run_summary(summary)
    blocks = re.findall(r"block \d+: \w+ on \w+, (\d+\.\d{3}) ms \(95 % CI (\d+\.\d{3})-(\d+\.\d{3})\)", text)
    assert len(blocks) == len(summary["blocks"]) and all(float(lo) <= float(ms) <= float(hi) for ms, lo, hi in blocks)
    total = re.search(r"total (\d+\.\d{3}) ms \(95 % CI (\d+\.\d{3})-(\d+\.\d{3}); p10-p90 (\d+\.\d{3})-(\d+\.\d{3})\): "
                      r"median of (\d+) runs after 3 warm-up runs", text)
    assert total and float(total[2]) <= float(total[1]) <= float(total[3]) and int(total[6]) == timing["runs"]
    assert " ms (" not in format_run_summary(run_bundle_cli(path, tmp_path / "x.npy"))  # no timing asked: no figures


def test_run_bundle_cli_reads_input_writes_output_and_summarises(exported, tmp_path, cpu_only):
    problem, _, _, path = exported
    x = problem.scorer.dataset.x[:5]
    np.save(tmp_path / "x.npy", x)
    summary = run_bundle_cli(path, tmp_path / "x.npy", tmp_path / "out" / "y.npy", timing=True)
    y = np.load(tmp_path / "out" / "y.npy")
    assert y.shape == (5, 10) and summary["output_shape"] == [5, 10]
    assert summary["top1"] == y.argmax(1).tolist()
    assert len(summary["fallbacks"]) == 2 and all(b["ms"] > 0 for b in summary["blocks"])
    assert [b["runs_on"] for b in summary["blocks"]] == ["CPUExecutionProvider"] * 6
    text = format_run_summary(summary)
    assert "block 1: gpu on CPUExecutionProvider" in text and "warning: block 1 (processor gpu)" in text
    np.savez(tmp_path / "one.npz", x=x[0].astype(np.float64))  # one sample, no batch axis, float64
    single = run_bundle_cli(path, tmp_path / "one.npz")
    assert single["added_batch_axis"] and single["top1"] == summary["top1"][:1]
    with pytest.raises(ExplorerError, match="input file not found"):
        run_bundle_cli(path, tmp_path / "missing.npy")
    np.savez(tmp_path / "nox.npz", inputs=x)
    with pytest.raises(ExplorerError, match=r"has no array x \(it has: inputs\)"):
        run_bundle_cli(path, tmp_path / "nox.npz")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ExplorerError, match=r"input of shape 2x3x28x28 does not fit the model input 'input' of shape batchx1x32x32"):
        run_bundle_cli(path, tmp_path / "wrong.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ExplorerError, match="is not a valid .npy file"):
        run_bundle_cli(path, tmp_path / "junk.npy")


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
def test_export_holds_one_block_at_a_time_not_a_model_copy_per_block(tmp_path):
    """Exporting a 32 MB model in 8 unit blocks stays within 4 model sizes of extra peak memory (measured:
    about 3: the rewrite, model.onnx's bytes as protobuf serialises them, one block); a full copy of the
    model kept per block would need 8 or more."""
    from onnx import TensorProto, helper, numpy_helper

    width, depth = 1024, 8
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "input"
    for i in range(depth):
        weights.append(numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model_kb = model.ByteSize() // 1024
    from explorer.graph import LayerGraph

    layer_graph = LayerGraph(model, "deep")
    problem = Problem(layer_graph, load_board("tegra-k1"), SimMeasurer(seed=0), AccuracyScorer(model, None),
                      Constraints(), Objective.parse("energy"))
    plan = Plan.from_dict({layer.name: Decision(processor="cpu" if i % 2 else "gpu")
                           for i, layer in enumerate(layer_graph.layers)})
    with open("/proc/self/clear_refs", "w") as handle:  # the peak from here on
        handle.write("5")
    before = _memory_kb("VmRSS")
    path = export_bundle(problem, plan, tmp_path / "deep")
    extra_kb = _memory_kb("VmHWM") - before
    assert len(json.loads((path / MANIFEST_FILE).read_text())["blocks"]) == depth
    assert extra_kb < 4 * model_kb, f"export took {extra_kb / 1024:.0f} MB above {model_kb / 1024:.0f} MB of model"
