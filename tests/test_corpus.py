"""Any ONNX model as exported in the wild: every model of the corpus (tests/corpus.py) inspects, solves,
searches, exports and runs through the command line, with every shape known, and its bundles compute
what model.onnx computes: the full-rank fp32 bundle the original model's outputs, a compressed bundle
the compressed model that Problem scores."""
import json

import numpy as np
import onnx
import pytest
from corpus import CASES, Case, recogniser, transformer_block

from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.cli import main
from explorer.compress import Compressor, full_rank_plan
from explorer.errors import ExplorerError
from explorer.export import export_bundle
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.plan import Decision, Plan
from explorer.problem import Constraints, Objective, Problem
from explorer.runtime import Bundle
from explorer.sessions import run_batched, scoring_session
from explorer.zoo import load_graph_and_data

SAMPLES = 24
# blocks placed on the board's GPU run on this machine's CPU (no CUDA here): expected, and said once per block
pytestmark = pytest.mark.filterwarnings("ignore::explorer.runtime.ProviderFallbackWarning")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def all_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = scoring_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, run_batched(session, feeds, names)))


def write_case(case: Case, folder) -> tuple:
    """model.onnx and data.npz of a case: inputs drawn with seed 0 (the first input as x, the others by
    name), labels the model's own top-1 for classifiers."""
    model = case.build()
    path = folder / f"{case.name}.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((SAMPLES, *shape)).astype(np.float32) for name, shape in case.sample_shapes.items()}
    arrays = dict(feeds)
    first = next(iter(case.sample_shapes))
    arrays["x"] = arrays.pop(first)
    if case.classifier:
        graph = LayerGraph(case.build(), data_shape={n: v.shape for n, v in feeds.items()})
        arrays["y"] = next(iter(all_outputs(graph.model, feeds).values())).argmax(1)
    data = folder / f"{case.name}.npz"
    np.savez(data, **arrays)
    return path, data, feeds


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One MLflow store for every case (its schema is created once)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_corpus_inspects_solves_searches_exports_and_runs(capsys, tmp_path, tracking, case):
    model, data, feeds = write_case(case, tmp_path)
    shape_options = [a for spec in case.input_shapes for a in ("--input-shape", spec)]
    graph, dataset = load_graph_and_data(str(model), data)
    for layer in graph.layers:  # shapes everywhere: every decision layer is sized, every tensor too
        assert layer.input_shape and layer.output_shape, layer.name
    assert all(o in graph.shapes for n in graph.nodes for o in n.output), "a tensor without a shape"
    compressor = Compressor(graph)
    assert all(compressor.methods(layer) == ["svd"] for layer in graph.layers if layer.op_type != "Conv"), \
        "every Gemm and every MatMul with a constant 2-D weight is compressible (rungs where a rank saves)"

    code, out, err = run(capsys, "inspect", "--model", model, "--data", data, *shape_options)
    assert code == 0, err
    assert all(layer.name in out for layer in graph.layers)
    code, out, err = run(capsys, "solve", "--model", model, "--data", data, *shape_options, "--out", tmp_path / "solved.json")
    assert code == 0, err
    code, out, err = run(capsys, "search", "--model", model, "--data", data, *shape_options, "--budget", 4,
                         "--agent", "random", "--tracking-uri", tracking)
    assert code == 0, err
    run_id = out.split("MLflow run: ")[1].split()[0]
    searched = tmp_path / "searched"
    code, out, err = run(capsys, "export", "--run", run_id, "--out", searched, "--tracking-uri", tracking)
    assert code == 0, err
    bundle = Bundle.load(searched)
    assert bundle.input_names == graph.input_names and bundle.output_names == graph.output_names
    expected = all_outputs(onnx.load(searched / "model.onnx"), feeds)
    got = bundle.run_all(feeds)
    for name in graph.output_names:  # as scored: the bundle's blocks compute what its model.onnx computes
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5)

    # the full-rank fp32 plan, cut into blocks on two processors: the original model's outputs
    processors = list(load_board("tegra-k1").processors)
    plan = full_rank_plan(graph)
    for i, layer in enumerate(graph.layers):
        plan = plan.with_decision(layer.name, Decision(processor=processors[i * 2 // len(graph.layers)]))
    plan.save(tmp_path / "full.json")
    code, out, err = run(capsys, "export", "--model", model, "--data", data, *shape_options, "--plan", tmp_path / "full.json",
                         "--out", tmp_path / "full")
    assert code == 0, err
    original = all_outputs(onnx.load(model), feeds)
    got = Bundle.load(tmp_path / "full").run_all(feeds)
    for name in graph.output_names:
        np.testing.assert_allclose(got[name], original[name], rtol=1e-4, atol=1e-5)
    x_file = tmp_path / "inputs.npz"
    np.savez(x_file, **feeds)
    code, out, err = run(capsys, "run", tmp_path / "full", "--input", x_file, "--output", tmp_path / "y.npy")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), original[graph.output_names[0]], rtol=1e-4, atol=1e-5)
    code, out, err = run(capsys, "run", tmp_path / "full", "--input", x_file, "--output", tmp_path / "y.npz")
    assert code == 0, err
    with np.load(tmp_path / "y.npz") as saved:
        assert sorted(saved.files) == sorted(graph.output_names)
        for name in graph.output_names:
            np.testing.assert_allclose(saved[name], original[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_compressed_bundle_equals_the_compressed_model(tmp_path, case):
    _, data, feeds = write_case(case, tmp_path)
    graph, dataset = load_graph_and_data(str(tmp_path / f"{case.name}.onnx"), data)
    problem = Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=0), AccuracyScorer(graph.model, dataset),
                      Constraints(), Objective.parse("energy"))
    processors = list(problem.board.processors)
    decisions = {}
    for i, layer in enumerate(graph.layers):  # the lowest rung everywhere, int8 and fp16 mixed in, three processors
        rung = problem.compressor.ladder(layer.name)[-1]
        decisions[layer.name] = Decision(rung.method, rung.rank, ("fp32", "int8", "fp16")[i % 3], processors[i % 3])
    plan = Plan.from_dict(decisions)
    assert any(d.method != "full" for _, d in plan.decisions)
    export_bundle(problem, plan, tmp_path / "bundle")
    compressed = problem.compressor.rewrite(plan, problem.calibration_inputs)
    expected = all_outputs(compressed, feeds)
    got = Bundle.load(tmp_path / "bundle").run_all(feeds)
    for name in graph.output_names:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4)
    accuracy = problem.evaluate(plan).accuracy
    assert accuracy is not None and 0 <= accuracy <= 1


# ---- shapes everywhere ----------------------------------------------------------------------------
def test_shapes_survive_a_reshape_to_a_computed_shape():
    """ONNX's own inference loses every shape after the recogniser's Reshape: the MatMul layers behind it
    are sized by ONNX Runtime's symbolic shape inference, offered rungs, and their FLOPs are right."""
    from onnx import shape_inference

    graph = LayerGraph(recogniser(), input_shapes={"x": (1, 3, 8, 40)})
    first = next(layer for layer in graph.layers if layer.op_type == "MatMul")
    sized = recogniser()
    sized.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8
    sized.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 40
    plain = {v.name: v for v in shape_inference.infer_shapes(sized, data_prop=True).graph.value_info}
    activation = graph.node_by_name[first.name].input[0]
    assert activation not in plain or not plain[activation].type.tensor_type.HasField("shape") or any(
        not d.dim_value for d in plain[activation].type.tensor_type.shape.dim), "ONNX alone sizes it: the case tests nothing"
    assert first.input_shape == (1, 20, 32) and first.output_shape == (1, 20, 24)
    assert first.flops == 2 * 20 * 32 * 24
    assert len(Compressor(graph).ladder(first.name)) > 1
    assert graph.input_shape == ["batch", 3, 8, 40]  # the batch stays symbolic in the model


def test_without_the_symbolic_inference_one_synthetic_run_gives_the_shapes(monkeypatch):
    import explorer.graph

    def refuse(model):
        raise RuntimeError("unsupported")

    monkeypatch.setattr(explorer.graph, "_symbolic_shapes", refuse)
    graph = LayerGraph(recogniser(), input_shapes={"x": (1, 3, 8, 40)})
    first = next(layer for layer in graph.layers if layer.op_type == "MatMul")
    assert first.input_shape == (1, 20, 32) and first.output_shape == (1, 20, 24)
    fixed = LayerGraph(recogniser(), input_shapes={"x": (4, 3, 8, 40)})  # a fixed batch runs at that batch
    assert next(layer for layer in fixed.layers if layer.op_type == "MatMul").output_shape == (4, 20, 24)


def test_a_size_the_model_does_not_run_at_is_refused_in_one_line():
    with pytest.raises(ExplorerError) as error:  # the weight takes 8 channels x 4 rows: height 8, not 32
        LayerGraph(recogniser(), "rec.onnx", input_shapes={"x": (1, 3, 32, 40)})
    message = str(error.value)
    assert "rec.onnx: the model does not run at its input shape x=1x3x32x40" in message and "\n" not in message


def test_activation_by_activation_matmuls_count_in_the_flops():
    graph = LayerGraph(transformer_block(), input_shapes={"tokens": (1, 8, 32)})
    seq, d, heads = 8, 32, 4
    attention = 2 * (2 * seq * seq * d)  # scores (seq x head x seq per head) and weighted values
    assert sum(layer.attached_flops for layer in graph.layers) == attention
    weights = sum(layer.flops for layer in graph.layers)
    assert weights == 2 * seq * (4 * d * d + 2 * d * 64) + 2 * d * 10
    assert graph.total_flops == weights + attention
    compressor = Compressor(graph)
    carrier = next(layer for layer in graph.layers if layer.attached_flops)
    assert compressor.ladder(carrier.name)[0].flops == carrier.flops + carrier.attached_flops
    assert all(r.flops > carrier.attached_flops for r in compressor.ladder(carrier.name))


def test_a_constant_weight_on_the_left_of_a_matmul_is_compressible():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 40)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["w", "x"], ["y"], name="mix"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    graph_proto = helper.make_graph(nodes, "left", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 40, 6])],
                                    [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 48, 6])],
                                    [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    graph = LayerGraph(model)
    layer = graph.layers[0]
    assert layer.weight_on_left and layer.input_shape == (1, 40, 6) and layer.flops == 2 * 40 * 48 * 6
    compressor = Compressor(graph)
    rungs = compressor.ladder("mix")
    assert len(rungs) > 1
    x = rng.standard_normal((5, 40, 6)).astype(np.float32)
    full = all_outputs(compressor.rewrite(full_rank_plan(graph)), {"x": x})["z"]
    np.testing.assert_allclose(full, np.maximum(weight @ x, 0), rtol=1e-5, atol=1e-5)
    lowest = rungs[-1]
    low = compressor.rewrite(full_rank_plan(graph).with_decision("mix", Decision(lowest.method, lowest.rank)))
    onnx.checker.check_model(low, full_check=True)
    factors = compressor._svd(layer, "svd")
    approx = (factors.left[:, :lowest.rank] * factors.singular[:lowest.rank]) @ factors.right[:lowest.rank]
    np.testing.assert_allclose(all_outputs(low, {"x": x})["z"], np.maximum(approx @ x, 0), rtol=1e-4, atol=1e-4)


# ---- bad inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["inspect", "--model", "{recogniser}"], "input 'x' has symbolic dimensions batchx3xheightxwidth"),
    (["solve", "--model", "{transformer}"], "--input-shape tokens=1xsequencex32"),
    (["inspect", "--model", "{recogniser}", "--input-shape", "x=1x3x8"], "has 3 dimensions, but input 'x'"),
    (["inspect", "--model", "{recogniser}", "--input-shape", "x=1x4x8x40"], "dimension 1 of input 'x' is fixed at 3"),
    (["inspect", "--model", "{recogniser}", "--input-shape", "x=1x3x8x"], "is not a list of sizes"),
    (["inspect", "--model", "{recogniser}", "--input-shape", "x:1x3x8x40"], "has no ="),
    (["inspect", "--model", "{lenet}", "--input-shape", "input_0=1x1x28x28"], "has a fixed batch of 10"),
    (["search", "--model", "{lenet}", "--data", "{few}", "--budget", "2", "--agent", "random"],
     "7 samples, fewer than the fixed batch of 10"),
    (["inspect", "--model", "{two}", "--input-shape", "image=1x3x16x16", "--input-shape", "meta=1x9"],
     "dimension 1 of input 'meta' is fixed at 8"),
])
def test_bad_shapes_of_the_corpus_get_one_line_and_status_2(capsys, tmp_path, argv, message):
    from corpus import two_inputs
    from netbuild import lenet5

    names = {"recogniser": tmp_path / "recogniser.onnx", "transformer": tmp_path / "transformer.onnx",
             "lenet": tmp_path / "lenet.onnx", "two": tmp_path / "two.onnx", "few": tmp_path / "few.npz"}
    for key, build in (("recogniser", recogniser), ("transformer", transformer_block), ("lenet", lenet5), ("two", two_inputs)):
        onnx.save(build(), names[key])
    np.savez(names["few"], x=np.zeros((7, 1, 28, 28), np.float32))
    code, out, err = run(capsys, *[a.format(**names) for a in argv])
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def two_input_files(tmp_path):
    case = next(c for c in CASES if c.name == "two-inputs")
    model, data, feeds = write_case(case, tmp_path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "no-meta.npz", x=feeds["image"])
    np.savez(tmp_path / "short-meta.npz", x=feeds["image"], meta=rng.standard_normal((5, 8)).astype(np.float32))
    np.savez(tmp_path / "wide-meta.npz", x=feeds["image"], meta=rng.standard_normal((SAMPLES, 9)).astype(np.float32))
    return tmp_path


@pytest.mark.parametrize("npz, message", [
    ("no-meta", "has no array named 'meta' for the model's input 'meta'"),
    ("short-meta", "meta has 5 samples but x has 24"),
    ("wide-meta", "meta has shape (24, 9), which does not match the model input"),
])
def test_two_input_data_that_does_not_fit_gets_one_line(capsys, two_input_files, npz, message):
    code, out, err = run(capsys, "inspect", "--model", two_input_files / "two-inputs.onnx",
                         "--data", two_input_files / f"{npz}.npz")
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_two_input_bundle_wants_every_input(tmp_path):
    case = next(c for c in CASES if c.name == "two-inputs")
    _, data, feeds = write_case(case, tmp_path)
    graph, dataset = load_graph_and_data(str(tmp_path / "two-inputs.onnx"), data)
    problem = Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=0), AccuracyScorer(graph.model, dataset),
                      Constraints(), Objective.parse("energy"))
    export_bundle(problem, problem.baseline_plan(), tmp_path / "bundle")
    bundle = Bundle.load(tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "plan.json").read_text())
    assert [i["name"] for i in manifest["model"]["inputs"]] == ["image", "meta"]
    with pytest.raises(ExplorerError, match="takes 2 inputs"):
        bundle.run_all(feeds["image"])
    with pytest.raises(ExplorerError, match="no array for the model input"):
        bundle.run_all({"image": feeds["image"]})
