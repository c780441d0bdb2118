"""Shapes are facts: symbolic input sizes come from --input-shape or the data, never 1; a fixed batch
is honoured by the figures, scoring, calibration, measurement, the CLI and the bundle."""
import json

import numpy as np
import onnx
import pytest
from netbuild import lenet5, ocr_cnn

from explorer.accuracy import AccuracyScorer, calibration_inputs, sensitivity_table
from explorer.boards import load_board
from explorer.cli import main
from explorer.compress import Compressor
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph, parse_input_shapes
from explorer.measure import block_specs
from explorer.plan import Decision, Plan
from explorer.sessions import run_model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- resolving input shapes -----------------------------------------------------------------------
def test_parse_input_shapes():
    assert parse_input_shapes(["x=1x3x48x320", "mask = 2X5"]) == {"x": (1, 3, 48, 320), "mask": (2, 5)}
    assert parse_input_shapes(None) == {}
    for bad, message in [("x=3x?", "not a list of sizes"), ("x", "has no ="), ("=1x2", "names no input"),
                         ("x=1x0x4", "not a list of sizes"), ("x=", "not a list of sizes")]:
        with pytest.raises(ExplorerError, match=message):
            parse_input_shapes([bad])
    with pytest.raises(ExplorerError, match="twice"):
        parse_input_shapes(["x=1x2", "x=1x3"])


def test_symbolic_sizes_without_shape_or_data_are_refused():
    with pytest.raises(ExplorerError) as error:
        LayerGraph(ocr_cnn(), "ocr.onnx")
    message = str(error.value)
    assert "'x'" in message and "batchx3xheightxwidth" in message and "--input-shape x=1x3xheightxwidth" in message
    assert "\n" not in message


def test_input_shape_gives_the_flops_of_that_size():
    dynamic = LayerGraph(ocr_cnn(), input_shapes={"x": (1, 3, 48, 192)})
    fixed = LayerGraph(ocr_cnn(48, 192))
    assert [layer.flops for layer in dynamic.layers] == [layer.flops for layer in fixed.layers]
    assert [layer.activation_bytes for layer in dynamic.layers] == [layer.activation_bytes for layer in fixed.layers]
    assert dynamic.layers[0].output_shape == (1, 16, 48, 192)
    assert dynamic.layers[0].flops == 2 * 16 * 3 * 9 * 48 * 192  # not the 1x1 image's 2 * 16 * 3 * 9
    assert dynamic.input_shape == ["batch", 3, 48, 192]  # written into the model; the batch stays symbolic
    assert dynamic.fixed_batch is None and dynamic.feed_shape() == (1, 3, 48, 192) and dynamic.feed_shape(4)[0] == 4
    x = np.random.default_rng(0).standard_normal((600, 3, 48, 192)).astype(np.float32)[:, :, :, :]
    assert run_model(dynamic.model, x).shape == (600, 10)  # scoring sends batches of 500 and a rest of 100


def test_data_gives_the_sizes_and_contradictions_are_refused():
    graph = LayerGraph(ocr_cnn(), data_shape=(30, 3, 24, 40))
    assert graph.total_flops == LayerGraph(ocr_cnn(24, 40)).total_flops
    assert LayerGraph(ocr_cnn(), input_shapes={"x": (1, 3, 24, 40)}, data_shape=(30, 3, 24, 40)).total_flops == graph.total_flops
    cases = [({"x": (1, 3, 48, 320)}, (30, 3, 24, 40), "contradicts the data"),
             ({"y": (1, 3, 8, 8)}, None, "does not take"),
             ({"x": (1, 3, 48)}, None, "has 3 dimensions"),
             ({"x": (1, 4, 48, 320)}, None, "dimension 1 of input 'x' is fixed at 3"),
             (None, (30, 3, 24), "give x as")]
    for given, data, message in cases:
        with pytest.raises(ExplorerError, match=message):
            LayerGraph(ocr_cnn(), input_shapes=given, data_shape=data)


def test_a_fixed_batch_is_kept_in_every_figure():
    fixed, symbolic = LayerGraph(lenet5(batch=10)), LayerGraph(lenet5(batch="N"))
    assert fixed.fixed_batch == 10 and fixed.feed_shape(1) == (10, 1, 28, 28) and symbolic.fixed_batch is None
    assert [layer.flops for layer in fixed.layers] == [10 * layer.flops for layer in symbolic.layers]
    fixed_rungs, symbolic_rungs = Compressor(fixed), Compressor(symbolic)
    for layer in fixed.layers:  # the factorised rungs are at the same batch as the full one
        assert [r.flops for r in fixed_rungs.ladder(layer.name)] == [10 * r.flops for r in symbolic_rungs.ladder(layer.name)]
    # old exporters list the weights as inputs too: they are constants here, not inputs to feed
    assert fixed.input_names == ["input_0"] and len(fixed.model.graph.input) == 1
    with pytest.raises(ExplorerError, match="contradicts the model: input 'input_0' has a fixed batch of 10"):
        LayerGraph(lenet5(batch=10), input_shapes={"input_0": (1, 1, 28, 28)})
    with pytest.raises(ExplorerError, match="7 samples, fewer than the fixed batch of 10"):
        LayerGraph(lenet5(batch=10), data_shape=(7, 1, 28, 28))


def test_a_batch_above_one_in_input_shape_fixes_it():
    graph = LayerGraph(ocr_cnn(), input_shapes={"x": (4, 3, 16, 32)})
    assert graph.fixed_batch == 4 and graph.input_shape == [4, 3, 16, 32]
    assert graph.total_flops == 4 * LayerGraph(ocr_cnn(16, 32)).total_flops


def test_fixed_batch_scoring_calibration_and_measurement():
    graph = LayerGraph(lenet5(batch=10))
    x = np.random.default_rng(1).standard_normal((123, 1, 28, 28)).astype(np.float32)
    dataset = Dataset(x, None, "random")
    x_calibration, source = calibration_inputs(graph, dataset)
    assert len(x_calibration) == 120 and source == "120 validation samples"
    synthetic, _ = calibration_inputs(graph, None)
    assert synthetic.shape == (20, 1, 28, 28)
    assert calibration_inputs(LayerGraph(ocr_cnn(), input_shapes={"x": (1, 3, 8, 12)}), None)[0].shape == (16, 3, 8, 12)
    with pytest.raises(ExplorerError, match="fewer than the model's fixed batch"):
        calibration_inputs(graph, Dataset(x[:5], None, "few"))
    scorer = AccuracyScorer(graph.model, dataset)  # batches of 10, the last of 3 padded
    assert scorer.reference_outputs.shape == (123, 10) and scorer.baseline.value == 1.0
    compressor = Compressor(graph)
    table = sensitivity_table(graph, compressor, scorer)  # runs suffixes of the model in batches of 10 too
    assert len(table.drops) > 10
    board = load_board("tegra-k1")
    plan = Plan.uniform([layer.name for layer in graph.layers], Decision(processor=next(iter(board.processors))))
    _, _, inputs = block_specs(graph, compressor, board, plan, x_calibration, batch=1)
    assert inputs["input_0"].shape == (10, 1, 28, 28)
    ocr = LayerGraph(ocr_cnn(), input_shapes={"x": (1, 3, 48, 320)})
    ocr_plan = Plan.uniform([layer.name for layer in ocr.layers], Decision(processor=next(iter(board.processors))))
    _, _, inputs = block_specs(ocr, Compressor(ocr), board, ocr_plan, None, batch=1)
    assert inputs["x"].shape == (1, 3, 48, 320)  # the resolved size, not 1x3x1x1


# ---- the command line -----------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    onnx.save(ocr_cnn(), tmp_path / "ocr.onnx")
    onnx.save(lenet5(batch=10), tmp_path / "lenet.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ocr.npz", x=rng.standard_normal((20, 3, 24, 40)).astype(np.float32))
    np.savez(tmp_path / "lenet.npz", x=rng.standard_normal((64, 1, 28, 28)).astype(np.float32),
             y=rng.integers(0, 10, 64))
    np.savez(tmp_path / "few.npz", x=rng.standard_normal((7, 1, 28, 28)).astype(np.float32))
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--model", "{ocr}"], "input 'x' has symbolic dimensions batchx3xheightxwidth"),
    (["measure", "--model", "{ocr}"], "--input-shape x="),
    (["inspect", "--model", "{ocr}", "--input-shape", "x=3x?"], "is not a list of sizes"),
    (["inspect", "--model", "{ocr}", "--input-shape", "image=1x3x48x320"], "names 'image', which the model"),
    (["inspect", "--model", "{ocr}", "--input-shape", "x=3x48x320"], "has 3 dimensions, but input 'x'"),
    (["solve", "--model", "{ocr}", "--input-shape", "x=1x3x48x320", "--data", "{ocr_data}"], "contradicts the data"),
    (["sensitivity", "--model", "{lenet}", "--data", "{few}"], "7 samples, fewer than the fixed batch of 10"),
])
def test_bad_shapes_get_one_line_and_status_2(capsys, files, argv, message):
    names = {"ocr": files / "ocr.onnx", "lenet": files / "lenet.onnx", "ocr_data": files / "ocr.npz", "few": files / "few.npz"}
    code, out, err = run(capsys, *[a.format(**names) for a in argv])
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_input_shape_on_the_command_line(capsys, files):
    code, out, _ = run(capsys, "inspect", "--model", files / "ocr.onnx", "--input-shape", "x=1x3x48x192")
    assert code == 0 and "1x16x48x192" in out and "(batch 1)" in out
    code, out, _ = run(capsys, "inspect", "--model", files / "ocr.onnx", "--data", files / "ocr.npz")
    assert code == 0 and "1x16x24x40" in out


def test_fixed_batch_opset9_model_solves_searches_exports_and_runs(capsys, files, tmp_path):
    model, data = files / "lenet.onnx", files / "lenet.npz"
    code, out, err = run(capsys, "solve", "--model", model, "--data", data, "--out", tmp_path / "plan.json")
    assert code == 0, err
    code, out, err = run(capsys, "search", "--model", model, "--data", data, "--budget", 12, "--agent", "random",
                         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert code == 0, err
    run_id = out.split("MLflow run: ")[1].split()[0]
    bundle = tmp_path / "bundle"
    code, out, err = run(capsys, "export", "--run", run_id, "--out", bundle, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert code == 0, err
    manifest = json.loads((bundle / "plan.json").read_text())
    assert manifest["model"]["input"]["shape"] == [10, 1, 28, 28]  # the bundle keeps the fixed batch
    x = np.random.default_rng(5).standard_normal((13, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run(capsys, "run", bundle, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert code == 0, err
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (13, 10)
    np.testing.assert_array_equal(y, run_model(onnx.load(bundle / "model.onnx"), x))


def test_make_problem_takes_input_shapes(tmp_path):
    from explorer.envs.deploy import make_problem

    onnx.save(ocr_cnn(), tmp_path / "ocr.onnx")
    problem = make_problem(str(tmp_path / "ocr.onnx"), input_shapes={"x": (1, 3, 48, 192)})
    assert problem.graph.total_flops == LayerGraph(ocr_cnn(48, 192)).total_flops
    with pytest.raises(ExplorerError, match="symbolic dimensions"):
        make_problem(str(tmp_path / "ocr.onnx"))
