"""The shipped zoo artifacts, the built-in VGG-16, and the validation-data loaders."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from explorer.data import load_fashion_mnist, load_npz_dataset
from explorer.errors import ExplorerError
from explorer.paths import ZOO_DATA_DIR
from explorer.zoo import ZOO, onnx_top1, zoo_model, zoo_validation_data


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def test_shipped_vgg_structure() -> None:
    model = zoo_model("vgg")
    onnx.checker.check_model(model, full_check=True)
    ops = op_counts(model)
    assert ops["Conv"] == 13 and ops["Gemm"] == 3 and ops["MaxPool"] == 5
    assert not {"BatchNormalization", "Dropout"} & set(ops)
    assert model.ir_version == 9
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)


def test_shipped_files_are_small() -> None:
    assert (ZOO_DATA_DIR / "vgg.onnx").stat().st_size <= 5_000_000
    assert (ZOO_DATA_DIR / "fashion_mnist_val.npz").stat().st_size <= 5_000_000
    assert (ZOO_DATA_DIR / "LICENSE.fashion-mnist").is_file()


def test_shipped_vgg_accuracy_on_shipped_subset() -> None:
    data = zoo_validation_data("vgg")
    assert data is not None and data.y is not None
    assert data.x.shape == (2000, 1, 32, 32) and data.x.dtype == np.float32
    assert data.y.dtype == np.int64 and np.bincount(data.y).tolist() == [200] * 10
    # Measured 0.9250 with ONNX Runtime when the model was trained; the floor leaves a small margin.
    assert onnx_top1(zoo_model("vgg"), data.x, data.y) >= 0.915


def test_vgg16_imagenet_builds() -> None:
    model = zoo_model("vgg16-imagenet")
    ops = op_counts(model)
    assert ops["Conv"] == 13 and ops["Gemm"] == 3 and ops["MaxPool"] == 5
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert abs(params - 138.3e6) <= 0.5e6
    assert zoo_validation_data("vgg16-imagenet") is None
    assert not ZOO["vgg16-imagenet"].trained and "--model" in ZOO["vgg16-imagenet"].note


def test_unknown_zoo_name_suggests_closest() -> None:
    with pytest.raises(ExplorerError, match="vgg16-imagenet.*explorer models"):
        zoo_model("vgg16-imagent")


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_dataset_loads(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 32, 32), np.float64)
    data = load_npz_dataset(write_npz(tmp_path / "d.npz", x=x, y=np.arange(4)), ["batch", 1, 32, 32])
    assert data.x.dtype == np.float32 and data.y is not None and data.y.dtype == np.int64
    unlabelled = load_npz_dataset(write_npz(tmp_path / "u.npz", x=x), (None, 1, 32, 32))
    assert unlabelled.y is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 1, 28, 28), np.float32)}, r"expected \(N, 1, 32, 32\).*\(1, 28, 28\)"),
        ({"inputs": np.zeros((4, 1, 32, 32), np.float32)}, "no array named 'x'"),
        ({"x": np.zeros((4, 1, 32, 32), np.float32), "y": np.arange(3)}, "one label per sample"),
        ({"x": np.zeros((4, 1, 32, 32), np.float32), "y": np.zeros(4)}, "must be integers"),
    ],
)
def test_npz_dataset_errors(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ExplorerError, match=message):
        load_npz_dataset(write_npz(tmp_path / "d.npz", **arrays), ["batch", 1, 32, 32])


def test_npz_dataset_missing_or_not_npz(tmp_path: Path) -> None:
    with pytest.raises(ExplorerError, match="not found"):
        load_npz_dataset(tmp_path / "missing.npz", None)
    (tmp_path / "bad.npz").write_text("not numpy")
    with pytest.raises(ExplorerError, match="not a readable .npz"):
        load_npz_dataset(tmp_path / "bad.npz", None)
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ExplorerError, match="single array"):
        load_npz_dataset(tmp_path / "single.npy", None)


def test_fashion_mnist_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ExplorerError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist("test", tmp_path)
    assert "\n" not in str(info.value)
