"""The trained zoo networks `vgg`, `dnn`, `cnn`: small versions of their recipes trained here reproduce the
recorded accuracy, export the zoo's ONNX format, are deterministic, and cached builds are reused."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from explorer import zoo, zoo_train
from explorer.cli import main
from explorer.data import load_fashion_mnist
from explorer.graph import LayerGraph
from explorer.paths import cache_dir
from explorer.zoo import load_graph

DECISION_LAYERS = {"vgg": 16, "dnn": 4, "cnn": 21}  # 13 conv + 3 FC; 4 FC; stem + 16 block convs + 3 shortcuts + FC
TOLERANCE_POINTS = 5.0  # another CPU rounds differently (see zoo.SMALL_RECIPES); a broken recipe falls to ~10 %


@pytest.fixture(scope="module")
def small_models() -> dict[str, tuple[onnx.ModelProto, dict]]:
    """Each small recipe trained once (seconds)."""
    return {name: zoo_train.train_recipe(recipe, progress=False) for name, (recipe, _) in zoo.SMALL_RECIPES.items()}


@pytest.mark.parametrize("name", ["vgg", "dnn", "cnn"])
def test_small_recipe_reproduces_recorded_accuracy(small_models, name: str) -> None:
    _, metrics = small_models[name]
    recorded = zoo.SMALL_RECIPES[name][1]
    assert abs(metrics["subset_top1_points"] - recorded) <= TOLERANCE_POINTS, metrics
    assert metrics["test_top1_points"] > 30  # learnt well above chance (10 %)


@pytest.mark.parametrize("name", ["vgg", "dnn", "cnn"])
def test_export_format_and_layer_graph(small_models, name: str) -> None:
    model, metrics = small_models[name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == zoo.IR_VERSION and [o.version for o in model.opset_import] == [zoo.OPSET]
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "input" and dims == ["batch", 1, 32, 32]
    assert out.name == "logits" and [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 10]
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names) and all(names)
    assert not {"BatchNormalization", "Dropout"} & {n.op_type for n in model.graph.node}
    graph = LayerGraph(onnx.ModelProto.FromString(model.SerializeToString()))
    assert len(graph.layers) == DECISION_LAYERS[name] == metrics["decision_layers"]
    assert {layer.op_type for layer in graph.layers} == ({"Gemm"} if name == "dnn" else {"Conv", "Gemm"})
    assert all(layer.weight_name in graph.initializers for layer in graph.layers)
    if name == "cnn":
        assert sum(n.op_type == "Add" for n in model.graph.node) == 8  # one residual Add per block


def test_shipped_subset_is_the_metric_subset() -> None:
    """`subset_top1_points` is measured on exactly the shipped validation file."""
    shipped = zoo.zoo_validation_data("dnn")
    assert shipped is not None and zoo.zoo_validation_data("cnn") is not None
    x_test, y_test = load_fashion_mnist("test")
    subset = zoo._stratified_subset(y_test, zoo.VAL_SIZE, zoo.VAL_SEED)
    np.testing.assert_array_equal(shipped.y, y_test[subset])
    np.testing.assert_array_equal(shipped.x, x_test[subset])


@pytest.mark.parametrize("name", ["vgg", "dnn", "cnn"])
def test_export_matches_torch(name: str) -> None:
    """BatchNorm folding and the ONNX graph compute what the torch network computes (eval mode)."""
    from explorer.sessions import run_model

    recipe = zoo.SMALL_RECIPES[name][0]
    build, export = zoo_train._ARCHS[name]
    torch.manual_seed(1)
    net = build(recipe)
    for module in net.modules():  # non-trivial BatchNorm statistics, so folding is really exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.2, 0.2)
    net.eval()
    x = np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_model(export(net, recipe), x), expected, rtol=1e-4, atol=1e-4)


def test_training_is_deterministic(small_models) -> None:
    recipe = zoo.SMALL_RECIPES["cnn"][0]
    again, _ = zoo_train.train_recipe(recipe, progress=False)
    assert again.SerializeToString() == small_models["cnn"][0].SerializeToString()
    other_seed, _ = zoo_train.train_recipe(zoo.SMALL_RECIPES["dnn"][0].with_changes(seed=1), progress=False)
    assert other_seed.SerializeToString() != small_models["dnn"][0].SerializeToString()


@pytest.mark.parametrize("name", ["dnn", "cnn"])
def test_recorded_figures_match_the_recipe(name: str) -> None:
    """The params, MB and MFLOPs recorded in the zoo entry are those of the full recipe's architecture."""
    entry = zoo.ZOO[name]
    build, export = zoo_train._ARCHS[name]
    torch.manual_seed(0)
    graph = LayerGraph(export(build(entry.recipe).eval(), entry.recipe))
    assert graph.total_params == entry.params
    assert len(graph.layers) == DECISION_LAYERS[name]
    assert graph.total_flops / 1e6 == pytest.approx(entry.mflops, abs=0.01)
    assert graph.total_params * 4 / 1e6 == pytest.approx(entry.size_mb, abs=0.05)
    assert entry.top1_test >= 88 and entry.top1_subset >= 88 and entry.train_seconds > 0


@pytest.fixture
def small_zoo(monkeypatch, tmp_path: Path) -> Path:
    """The zoo with `dnn` and `cnn` on their small recipes, and a fresh cache."""
    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path))
    for name in ("dnn", "cnn"):
        monkeypatch.setitem(zoo.ZOO, name, dataclasses.replace(zoo.ZOO[name], recipe=zoo.SMALL_RECIPES[name][0]))
    return tmp_path


def test_first_use_builds_then_cache_is_used(small_zoo: Path, monkeypatch) -> None:
    recipe = zoo.ZOO["dnn"].recipe
    assert zoo.cached_metrics(recipe) is None
    graph = load_graph("dnn")  # first use: trains the small recipe into the cache
    path = zoo.cached_path(recipe)
    assert path.parent == cache_dir("zoo") and path.is_relative_to(small_zoo)
    assert len(graph.layers) == DECISION_LAYERS["dnn"]
    assert zoo.cached_metrics(recipe)["subset_top1_points"] == pytest.approx(zoo.SMALL_RECIPES["dnn"][1], abs=TOLERANCE_POINTS)
    built = path.read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(zoo_train, "train_recipe", no_training)
    assert zoo.zoo_model("dnn").SerializeToString() == built
    assert zoo.cached_path(recipe.with_changes(seed=1)) != path  # the key follows the recipe
    with pytest.raises(AssertionError, match="trained again"):
        zoo.zoo_model("cnn")  # not cached yet: would train


def test_interrupted_build_leaves_no_file(small_zoo: Path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo_train, "train_recipe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.zoo_model("cnn")
    assert not [p for p in cache_dir("zoo").iterdir() if not p.name.endswith(".lock")]


def test_cli_models_lists_new_entries(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("dnn", "cnn"):
        entry = zoo.ZOO[name]
        assert name in out and f"{entry.top1_test:.2f} / {entry.top1_subset:.2f}" in out


def test_cli_zoo_train_writes_out_dir(small_zoo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["zoo", "train", "dnn", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "dnn.onnx").is_file() and (out / "dnn.json").is_file()
    assert "% on the 10,000 Fashion-MNIST test images" in printed and "1 epochs, seed 0" in printed
    assert main(["zoo", "train", "dnn", "--epochs", "1", "--out", str(out)]) == 0
    assert "same bytes as the file it replaced" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["zoo", "train", "vgg16-imagenet"], "untrained weights by design.*trainable zoo models: vgg, dnn, cnn"),
    (["zoo", "train", "cnm"], "did you mean 'cnn'"),
    (["zoo", "train", "cnn", "--epochs", "0"], "argument --epochs: 0 must be at least 1"),
])
def test_cli_zoo_train_bad_input(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, " ".join(err.split()))
