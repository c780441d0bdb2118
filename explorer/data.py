"""Validation data: Fashion-MNIST from the Debian package, and user-supplied `.npz` files."""
from __future__ import annotations

import gzip
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from explorer.errors import ExplorerError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Normalisation of the 28x28 images zero-padded to 32x32 and scaled to [0, 1]:
# mean and standard deviation over the 60,000 training images (0.21900, 0.33181).
FASHION_MNIST_MEAN = 0.2190
FASHION_MNIST_STD = 0.3318
_SAVE_HINT = "save it with numpy.savez(path, x=inputs, y=labels)"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass
class Dataset:
    """Model inputs `x`, optional integer labels `y`, a one-line description of where they came from, and
    whether they are synthetic (drawn by explorer.synthetic: figures on them are estimates, not measurements)."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # a multi-input model's other inputs, by name
    synthetic: bool = False  # drawn by explorer.synthetic (no data given): figures on it are estimates

    def feeds(self, first_input: str) -> dict[str, np.ndarray]:
        """Every model input's array by input name (x under the first input's name)."""
        return {first_input: self.x, **self.extra}

    def first(self, count: int) -> Dataset:
        """The first `count` samples, every input and the labels."""
        return Dataset(self.x[:count], self.y[:count] if self.y is not None else None,
                       f"{self.source}, first {count} samples", {k: v[:count] for k, v in self.extra.items()},
                       self.synthetic)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist_raw(split: str, data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The raw split: uint8 images (N, 28, 28) and int64 labels (N,)."""
    if split not in _FILES:
        raise ExplorerError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    image_path, label_path = (directory / name for name in _FILES[split])
    if not (image_path.is_file() and label_path.is_file()):
        raise ExplorerError(
            f"Fashion-MNIST not found in {directory}: install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or pass --data-dir DIR with the idx files"
        )
    try:
        images = _read_idx(image_path, 16).reshape(-1, 28, 28)
        labels = _read_idx(label_path, 8).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise ExplorerError(f"cannot read Fashion-MNIST idx files in {directory}: {exc}") from None
    if len(images) != len(labels):
        raise ExplorerError(
            f"Fashion-MNIST files in {directory} disagree: {len(images)} images but {len(labels)} labels"
        )
    return images, labels


def preprocess_fashion_mnist(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32): zero-pad to 32x32, scale to [0, 1], normalise."""
    x = np.zeros((len(images), 1, 32, 32), dtype=np.float32)
    x[:, 0, 2:30, 2:30] = images
    x /= 255.0
    x -= FASHION_MNIST_MEAN
    x /= FASHION_MNIST_STD
    return x


def load_fashion_mnist(split: str, data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed split ('train' or 'test'): x float32 (N, 1, 32, 32) and y int64 (N,)."""
    images, labels = load_fashion_mnist_raw(split, data_dir)
    return preprocess_fashion_mnist(images), labels


def load_npz_dataset(path: Path | str, input_shape: tuple | list | None,
                     other_inputs: Mapping[str, Sequence | None] | None = None) -> Dataset:
    """User validation data: an `.npz` with array `x` (model inputs) and optional integer labels `y`.

    `input_shape` is the model's input shape; its first (batch) dimension is ignored and any
    non-integer dimension (dynamic: None or a name) matches anything. A model with several inputs
    takes `x` for its first and one array per other input, named after it (`other_inputs`: name ->
    declared shape); every input has the same number of samples.
    """
    path = Path(path)
    if path.is_dir():
        raise ExplorerError(f"{path} is a folder, not an .npz file: give the .npz (arrays x and optional y) itself")
    if not path.is_file():
        raise ExplorerError(f"data file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ExplorerError(f"{path} is not a readable .npz file ({exc}): {_SAVE_HINT}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ExplorerError(f"{path} is a single array, not an .npz: {_SAVE_HINT}")
    try:
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ExplorerError(f"{path}: cannot read its arrays ({exc}); store plain numeric arrays x and y") from None
    if "x" not in arrays:
        found = ", ".join(sorted(arrays)) or "none"
        raise ExplorerError(f"{path} has no array named 'x' (arrays found: {found}): save inputs as x=...")
    x = _input_array(path, "x", arrays["x"], input_shape)
    extra = {}
    others = other_inputs or {}
    for name, shape in others.items():
        if name not in arrays:
            listed = ", ".join(["x=..."] + [f"{n}=..." for n in others])
            raise ExplorerError(f"{path} has no array named {name!r} for the model's input {name!r}: the model takes "
                                f"{len(others) + 1} inputs; save them with numpy.savez(path, {listed}, y=labels)")
        extra[name] = _input_array(path, name, arrays[name], shape)
        if len(extra[name]) != len(x):
            raise ExplorerError(f"{path}: {name} has {len(extra[name])} samples but x has {len(x)}; give every input "
                                "the same samples")
    y = arrays.get("y")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise ExplorerError(f"{path}: y has dtype {y.dtype}; class labels must be integers")
        if y.ndim != 1 or len(y) != len(x):
            raise ExplorerError(
                f"{path}: y has shape {y.shape} but x has {len(x)} samples; need one label per sample"
            )
        y = y.astype(np.int64, copy=False)
    source = f"{path.name} ({len(x)} samples, {'labelled' if y is not None else 'unlabelled'})"
    return Dataset(x=x, y=y, source=source, extra=extra)


def _input_array(path: Path, name: str, x: np.ndarray, input_shape) -> np.ndarray:
    """One input's array, checked against the input's declared shape, as float32."""
    if x.ndim == 0:
        raise ExplorerError(f"{path}: {name} is a scalar; it must hold a batch of inputs, shape (N, ...)")
    if len(x) == 0:
        raise ExplorerError(f"{path}: {name} holds 0 samples (shape {x.shape}); give at least one input, shape (N, ...) "
                            "with N >= 1")
    if input_shape is not None:
        expected = tuple(input_shape)[1:]
        got = x.shape[1:]
        fixed = [isinstance(e, (int, np.integer)) and e > 0 for e in expected]
        matches = len(expected) == len(got) and all(not f or e == g for f, e, g in zip(fixed, expected, got))
        if not matches:
            shown = ", ".join(str(e) if f else "?" for f, e in zip(fixed, expected))
            raise ExplorerError(
                f"{path}: {name} has shape {x.shape}, which does not match the model input: "
                f"expected (N, {shown}), got per-sample shape {got}"
            )
    try:
        x = x.astype(np.float32, copy=False)
    except (TypeError, ValueError):
        raise ExplorerError(f"{path}: {name} has dtype {x.dtype}, which cannot be converted to float32") from None
    finite = np.isfinite(x)
    if not finite.all():  # NaN inputs give NaN outputs, whose argmax agrees everywhere: a 100 % that means nothing
        raise ExplorerError(f"{path}: {name} has {int(x.size - finite.sum())} of {x.size} values that are NaN or infinite; "
                            "give finite inputs (replace or drop those samples)")
    return x
