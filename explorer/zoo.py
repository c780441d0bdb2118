"""The built-in model zoo: networks the project trains on Fashion-MNIST (`vgg`, `dnn`, `cnn`) and the
full-size, untrained VGG-16; and where a `--model` value becomes a model (`load_model`, `load_graph`,
`load_graph_and_data`): a zoo name through the registry `ZOO`, a path through explorer.graph.load_onnx.

`vgg` ships in zoo_data/. `dnn` and `cnn` are too large to commit: the first use trains each one from its
recipe (seeded, deterministic, minutes on 2 CPU cores) and caches the ONNX file under `cache_dir("zoo")`,
keyed by a digest of the recipe and the torch version. Training itself lives in explorer.zoo_train (torch).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from explorer.cache import atomic_write_bytes, atomic_write_json, digest, read_json
from explorer.data import Dataset, load_npz_dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph, declared_input_shapes, is_model_path, load_onnx
from explorer.paths import ZOO_DATA_DIR, cache_dir
from explorer.registry import Registry, load_entry_point

OPSET = 17
IR_VERSION = 9  # onnxruntime 1.31 refuses the newer IR version that onnx 1.23 writes by default

VGG16_STAGES = (2, 2, 3, 3, 3)  # convolutions per stage; a 2x2 max-pool ends each stage
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_FC = (4096, 4096)
RESNET18_BLOCKS = 2  # residual blocks per stage, as in ResNet-18

# The shipped `vgg`: the VGG-16 layer structure at reduced width, for 1x32x32 Fashion-MNIST images.
VGG_WIDTHS = (8, 16, 32, 64, 64)
VGG_FC = (128, 128)
VGG_EPOCHS = 10
VGG_SEED = 0
VAL_SIZE = 2000
VAL_SEED = 0  # the shipped validation subset is drawn with this seed, whatever seed a model trains with
VGG_FILE = "vgg.onnx"
VAL_FILE = "fashion_mnist_val.npz"
# Bump when the training or export code changes what a recipe produces: cached builds are then retrained.
TRAIN_REVISION = 1


@dataclass(frozen=True)
class Recipe:
    """How the project trains one zoo network on Fashion-MNIST; every field enters the cache key.

    SGD with Nesterov momentum 0.9 and a one-cycle learning rate up to `lr`, random horizontal flips,
    BatchNorm after every convolution (folded into it at export), `threads` CPU threads, deterministic
    algorithms: on one machine the same recipe gives the same bytes.
    """

    arch: str  # vgg | dnn | cnn (the zoo name it builds)
    widths: tuple[int, ...]  # vgg: conv stage widths; dnn: hidden FC widths; cnn: residual stage widths
    epochs: int
    fc: tuple[int, ...] = ()  # vgg: hidden FC widths after the convolutions
    stem_stride: int = 1  # cnn: stride of the first convolution
    seed: int = 0
    batch: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    dropout: float = 0.0  # after every hidden FC layer
    train_images: int | None = None  # None: all 60,000 training images; else a stratified subset of this size
    threads: int = 2

    def with_changes(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (e.g. epochs, seed)."""
        return dataclasses.replace(self, **changes)


RECIPES: dict[str, Recipe] = {
    "vgg": Recipe("vgg", VGG_WIDTHS, VGG_EPOCHS, fc=VGG_FC, seed=VGG_SEED, dropout=0.3),
    # DeepX-style fully connected network: 3 hidden layers of 2048 (42 MB of fp32 weights).
    "dnn": Recipe("dnn", (2048, 2048, 2048), 10, dropout=0.2),
    # ResNet-18 layout (stem, 4 stages of 2 basic blocks, global average pool, FC) at a quarter of the width.
    "cnn": Recipe("cnn", (32, 64, 128, 256), 5, stem_stride=2),
}

# Small versions of the recipes for the tests (seconds: 2,000 training images, a few epochs, on one thread, which
# stays fast on a busy machine where two threads wait for each other), and the top-1 accuracy in points each
# reached on the shipped 2,000-image subset when it was recorded (torch 2.13.0 CPU, ONNX Runtime fp32). Rounding
# alone moves these short trainings by up to a few points (2 threads instead of 1 moved them by 0.0-1.9).
_SMALL = {"epochs": 2, "batch": 64, "train_images": 2000, "threads": 1}
SMALL_RECIPES: dict[str, tuple[Recipe, float]] = {
    "vgg": (RECIPES["vgg"].with_changes(**_SMALL).with_changes(
        widths=(16, 16, 32, 32, 32), fc=(32, 32), dropout=0.0, epochs=3, batch=32, lr=0.05), 74.30),
    "dnn": (RECIPES["dnn"].with_changes(widths=(128, 128, 128), **_SMALL), 70.70),
    "cnn": (RECIPES["cnn"].with_changes(widths=(8, 16, 16, 32), **_SMALL), 77.10),
}


@dataclass(frozen=True)
class ZooEntry:
    """One built-in model: what it is, its input shape (batch 1), whether its weights are trained, and the
    figures recorded for the reference build (accuracy in points, fp32 with ONNX Runtime)."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    trained: bool
    note: str
    recipe: Recipe | None = None  # how `explorer zoo train NAME` trains it
    build: str | None = None  # "module:function" that returns its ONNX model (None: its file, shipped or trained)
    shipped_file: str | None = None  # file in zoo_data/; None with a recipe: built on first use and cached
    validation_file: str | None = None  # shipped labelled validation data in zoo_data/
    params: int | None = None
    size_mb: float | None = None  # fp32 ONNX file
    mflops: float | None = None  # per image (2 x multiply-accumulates)
    top1_test: float | None = None  # points, the 10,000 Fashion-MNIST test images
    top1_subset: float | None = None  # points, the shipped 2,000-image subset
    train_seconds: float | None = None  # on 2 shared CPU cores


def _first_use_note(name: str, size_mb: float, minutes: float) -> str:
    return (f"not shipped ({size_mb:.0f} MB): the first use trains it once (about {minutes:.0f} min on 2 cores, "
            f"as `explorer zoo train {name}`) and caches it under runs/cache/zoo; "
            "scored on the shipped 2,000 labelled Fashion-MNIST test images")


#: The zoo by name (a Registry: unknown names get "did you mean"); another package adds its own models with
#: ZOO.register(name, ZooEntry(..., build="package.module:function")).
ZOO: Registry[ZooEntry] = Registry("zoo model", {entry.name: entry for entry in (
    ZooEntry(
        name="vgg",
        description=(
            f"VGG-16 layer structure (13 conv + 3 FC) at reduced width (stages {'-'.join(map(str, VGG_WIDTHS))}, "
            f"FC {'-'.join(map(str, VGG_FC))}) trained on Fashion-MNIST, 1x32x32 input, 10 classes"
        ),
        input_shape=(1, 1, 32, 32),
        trained=True,
        note=(
            "trained weights: 92.90 % top-1 on the 10,000 Fashion-MNIST test images (fp32, ONNX Runtime); "
            "ships with 2,000 of those test images (labelled) for accuracy checks"
        ),
        recipe=RECIPES["vgg"], shipped_file=VGG_FILE, validation_file=VAL_FILE,
        params=256_546, size_mb=1.03, mflops=9.93, top1_test=92.90, top1_subset=92.50, train_seconds=1147,
    ),
    ZooEntry(
        name="dnn",
        description=(
            "DeepX-style fully connected DNN: Flatten 1024, 3 hidden FC layers of 2048 (ReLU, Dropout 0.2 in "
            "training), FC 10; trained on Fashion-MNIST, 1x32x32 input; memory-bound at batch 1"
        ),
        input_shape=(1, 1, 32, 32),
        trained=True,
        note=_first_use_note("dnn", 42.05, 416 / 60),
        recipe=RECIPES["dnn"], validation_file=VAL_FILE,
        params=10_512_394, size_mb=42.05, mflops=21.01, top1_test=89.16, top1_subset=88.50, train_seconds=416,
    ),
    ZooEntry(
        name="cnn",
        description=(
            "ResNet-18-style CNN: stride-2 stem conv, 4 stages of 2 basic residual blocks (widths 32-64-128-256, "
            "1x1 projection shortcuts), global average pool, FC 10; trained on Fashion-MNIST, 1x32x32 input"
        ),
        input_shape=(1, 1, 32, 32),
        trained=True,
        note=_first_use_note("cnn", 11.19, 624 / 60),
        recipe=RECIPES["cnn"], validation_file=VAL_FILE,
        params=2_794_634, size_mb=11.19, mflops=69.36, top1_test=92.96, top1_subset=92.75, train_seconds=624,
    ),
    ZooEntry(
        name="vgg16-imagenet",
        description="full-size VGG-16 (13 conv + 3 FC, 138M parameters), 3x224x224 input, 1000 classes",
        input_shape=(1, 3, 224, 224),
        trained=False,
        note=(
            "weights are untrained (seeded random), so its accuracy cannot be measured; "
            "for accuracy bring your own trained ONNX file and data (--model PATH.onnx --data val.npz)"
        ),
        params=138_357_544, size_mb=553.4, build="explorer.zoo:build_vgg16_imagenet",
    ),
)}, hint="`explorer models` lists them")


def trainable_names() -> list[str]:
    """The zoo entries `explorer zoo train` can train."""
    return [name for name, entry in ZOO.items() if entry.recipe is not None]


def zoo_model(name: str) -> onnx.ModelProto:
    """The ONNX model of zoo entry `name`: shipped, cached (trained now if it is not yet), or built in memory."""
    entry = ZOO.lookup(name)
    if entry.build is not None:
        model: onnx.ModelProto = load_entry_point(entry.build)()
        return model
    return onnx.load(str(zoo_file(entry.name)))


def zoo_file(name: str, progress: bool = True) -> Path:
    """The ONNX file of a trained zoo entry: the shipped one, or the cached build (trained on first use)."""
    entry = ZOO.lookup(name)
    if entry.recipe is None:
        raise ExplorerError(f"zoo model {name!r} is built in memory and has no file")
    if entry.shipped_file is not None:
        path = ZOO_DATA_DIR / entry.shipped_file
        if not path.is_file():
            raise ExplorerError(f"{path} is missing: reinstall explorer or rebuild it with `explorer zoo train {name}`")
        return path
    return cached_build(entry.recipe, progress=progress)


def zoo_validation_data(name: str) -> Dataset | None:
    """Shipped labelled validation data for zoo entry `name`, or None if it has none."""
    entry = ZOO.lookup(name)
    if entry.validation_file is None:
        return None
    path = ZOO_DATA_DIR / entry.validation_file
    if not path.is_file():
        raise ExplorerError(f"{path} is missing: reinstall explorer or rebuild it with `explorer zoo train vgg`")
    with np.load(path) as archive:
        x, y = archive["x"], archive["y"]
    return Dataset(x=x, y=y, source=f"Fashion-MNIST held-out subset ({len(x)} test images)")


# ---- a --model value: a zoo name or an ONNX file ---------------------------------------------------
def load_model(name_or_path: str) -> tuple[onnx.ModelProto, str]:
    """The model a --model value names (an ONNX file by path, else a zoo model by name) and its description."""
    if is_model_path(name_or_path):
        return load_onnx(name_or_path), str(Path(name_or_path))
    return zoo_model(name_or_path), name_or_path


def load_graph(name_or_path: str, input_shapes: Mapping[str, Sequence[int]] | None = None,
               data_shape: Sequence[int] | None = None) -> LayerGraph:
    """LayerGraph of a zoo model name or ONNX file path, with its input shapes resolved (see LayerGraph)."""
    model, source = load_model(name_or_path)
    return LayerGraph(model, source, input_shapes, data_shape)


def load_graph_and_data(model: str, data: Path | str | None = None,
                        input_shapes: Mapping[str, Sequence[int]] | None = None,
                        data_samples: int | None = None) -> tuple[LayerGraph, Dataset | None]:
    """The LayerGraph of a zoo name or ONNX path and its validation data (an .npz path; default: a zoo
    model's shipped data, none for other models; `data_samples` keeps the first N). The data is read
    first: the graph's symbolic input sizes come from `input_shapes` (--input-shape) and the data."""
    onnx_model, source = load_model(model)
    declared = declared_input_shapes(onnx_model)
    dataset: Dataset | None
    if data is not None:
        first = next(iter(declared.values()), None)
        dataset = load_npz_dataset(data, first, {name: dims for name, dims in list(declared.items())[1:]})
    else:
        dataset = zoo_validation_data(model) if model in ZOO else None
    if dataset is not None and data_samples is not None:
        dataset = dataset.first(data_samples)
    data_shapes = None
    if dataset is not None:
        data_shapes = {name: value.shape for name, value in dataset.feeds(next(iter(declared), "x")).items()}
    graph = LayerGraph(onnx_model, source, input_shapes, data_shapes)
    return graph, dataset


# ---- cached builds --------------------------------------------------------------------------------
def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        raise ExplorerError("training a zoo model needs torch: run bash .ci/setup (it installs torch==2.13.0)") from None


def recipe_key(recipe: Recipe) -> str:
    """Cache key of a recipe's build: the recipe, the torch version, the export format and TRAIN_REVISION."""
    recipe_json = json.dumps(dataclasses.asdict(recipe), sort_keys=True)
    return digest(recipe_json, f"torch {_torch_version()}", f"opset {OPSET} ir {IR_VERSION}", f"revision {TRAIN_REVISION}")


def cached_path(recipe: Recipe) -> Path:
    """Where the build of `recipe` is cached (it may not exist yet); its metrics sit next to it as .json."""
    return cache_dir("zoo") / f"{recipe.arch}-{recipe_key(recipe)[:16]}.onnx"


def cached_metrics(recipe: Recipe) -> dict[str, Any] | None:
    """The metrics recorded with the cached build of `recipe`, or None if it is not built."""
    path = cached_path(recipe)
    return read_json(path.with_suffix(".json")) if path.is_file() else None


@contextmanager
def _build_lock(path: Path, console: Any) -> Iterator[None]:
    """Hold an exclusive lock for building `path`, so parallel workers train a model once, not each."""
    with open(f"{path}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for another process that is building {path.name} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_build(recipe: Recipe, progress: bool = True) -> Path:
    """The cached ONNX file of `recipe`, trained and written now (atomically) if it is not cached yet."""
    path = cached_path(recipe)
    if path.is_file():
        return path
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)  # stdout stays the command's own output
    with _build_lock(path, console):
        if path.is_file():  # another process built it while this one waited
            return path
        entry = ZOO.get(recipe.arch)
        recorded = entry.train_seconds if entry is not None and entry.recipe == recipe else None
        took = f", about {recorded / 60:.0f} min on 2 cores" if recorded else ""
        console.print(
            f"zoo model {recipe.arch!r} is not built yet: training it once from Fashion-MNIST "
            f"({recipe.epochs} epochs, seed {recipe.seed}{took}); cached in {path.parent}"
        )
        train_to(recipe, path, progress=progress, console=console)
    return path


def _trainer(function: str) -> Any:
    """A function of explorer.zoo_train (torch, which builds on this module: named by entry point)."""
    try:
        return load_entry_point(f"explorer.zoo_train:{function}")
    except ImportError:
        raise ExplorerError("training a zoo model needs torch: run bash .ci/setup (it installs torch==2.13.0)") from None


def train_to(recipe: Recipe, path: Path, data_dir: Path | None = None, progress: bool = True,
             console: Any = None) -> dict[str, Any]:
    """Train `recipe`, write its ONNX file to `path` and its metrics to `path` with suffix .json, both
    atomically (an interrupted build leaves no file). Returns the metrics."""
    model, metrics = _trainer("train_recipe")(recipe, data_dir=data_dir, progress=progress, console=console)
    data = model.SerializeToString()
    metrics["onnx_bytes"] = len(data)
    metrics["sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write_json(path.with_suffix(".json"), metrics)
    atomic_write_bytes(path, data)  # last: the ONNX file is what marks a build as done
    return metrics


def train(name: str, out_dir: Path | None = None, epochs: int | None = None, seed: int | None = None,
          data_dir: Path | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """`explorer zoo train NAME`: train a zoo entry's recipe (epochs and seed changeable) and write it.

    `vgg` goes to `out_dir` (default: the package's zoo_data, replacing the shipped files) with its validation
    subset; `dnn`/`cnn` go to `out_dir/NAME.onnx`, or by default to the cache, where `--model NAME` finds the
    default recipe's build. Returns the ONNX path and the metrics (with `same_as_before`: whether a file that
    was there had the same bytes; None if there was none).
    """
    entry = ZOO.lookup(name)
    if entry.recipe is None:
        raise ExplorerError(
            f"{name!r} has untrained weights by design and is built in memory; "
            f"trainable zoo models: {', '.join(trainable_names())}"
        )
    if epochs is not None and epochs < 1:
        raise ExplorerError(f"--epochs must be at least 1, not {epochs}")
    recipe = entry.recipe.with_changes(
        epochs=entry.recipe.epochs if epochs is None else epochs, seed=entry.recipe.seed if seed is None else seed
    )
    if name == "vgg":
        out = Path(out_dir) if out_dir is not None else ZOO_DATA_DIR
        path = out / VGG_FILE
    else:
        path = Path(out_dir) / f"{name}.onnx" if out_dir is not None else cached_path(recipe)
    before = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    if name == "vgg":
        metrics = _trainer("train_vgg")(path.parent, recipe, data_dir=data_dir, progress=progress)
        metrics["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        from rich.console import Console

        path.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(path, Console(stderr=True, quiet=not progress)):
            metrics = train_to(recipe, path, data_dir=data_dir, progress=progress)
    metrics["same_as_before"] = None if before is None else before == metrics["sha256"]
    return path, metrics


# ---- ONNX builders --------------------------------------------------------------------------------
Weights = list[tuple[str, np.ndarray]]


def _classifier_model(nodes: list[onnx.NodeProto], weights: Weights, input_shape: tuple[int, ...],
                      classes: int, name: str) -> onnx.ModelProto:
    """The model of a classifier graph: input `input` [batch, *input_shape], output `logits` [batch, classes],
    opset 17, IR version 9, fp32 initializers."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
    )
    model = helper.make_model(graph, producer_name="explorer", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    # Initializers go straight into the model: make_graph/make_model would copy every tensor twice.
    for weight_name, array in weights:
        tensor = model.graph.initializer.add()
        tensor.name = weight_name
        tensor.data_type = TensorProto.FLOAT
        tensor.dims.extend(array.shape)
        tensor.raw_data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return model


def _conv(nodes: list[onnx.NodeProto], weights: Weights, x: str, name: str, w: np.ndarray, b: np.ndarray,
          stride: int = 1) -> str:
    """Append a Conv (kernel from `w`, 'same' padding for odd kernels) named `name`; return its output."""
    k = w.shape[-1]
    weights += [(f"{name}.weight", w), (f"{name}.bias", b)]
    nodes.append(helper.make_node(
        "Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
        kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride],
    ))
    return name


def _relu(nodes: list[onnx.NodeProto], x: str) -> str:
    nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
    return f"{x}.relu"


def _fc_head(nodes: list[onnx.NodeProto], weights: Weights, x: str, fcs: list[tuple[np.ndarray, np.ndarray]],
             first: int = 1) -> None:
    """Append Flatten, then Gemm fc{first}, fc{first+1}, ... with Relu between; the last writes `logits`."""
    nodes.append(helper.make_node("Flatten", [x], ["flatten"], name="flatten", axis=1))
    x = "flatten"
    for index, (w, b) in enumerate(fcs, start=first):
        fc = f"fc{index}"
        last = index == first + len(fcs) - 1
        weights += [(f"{fc}.weight", w), (f"{fc}.bias", b)]
        out = "logits" if last else fc
        nodes.append(helper.make_node("Gemm", [x, f"{fc}.weight", f"{fc}.bias"], [out], name=fc, transB=1))
        x = out if last else _relu(nodes, fc)


def vgg_onnx(
    convs: list[tuple[np.ndarray, np.ndarray]],
    fcs: list[tuple[np.ndarray, np.ndarray]],
    input_shape: tuple[int, int, int],
    name: str,
    stages: tuple[int, ...] = VGG16_STAGES,
) -> onnx.ModelProto:
    """A VGG graph from numpy weights: Conv3x3(pad 1)+Relu per conv, MaxPool 2x2 per stage, then Gemm layers.

    `convs` holds (weight OIHW, bias) per convolution and `fcs` (weight [out, in], bias) per fully connected
    layer; Relu follows every Gemm but the last. Input `input` [batch, C, H, W], output `logits` [batch, classes].
    With no convolutions and `stages=()` it is a fully connected network: Flatten, then the Gemm layers.
    """
    if sum(stages) != len(convs):
        raise ValueError(f"{len(convs)} convolutions do not fill stages {stages}")
    nodes: list[onnx.NodeProto] = []
    weights: Weights = []
    x = "input"
    layer = 0
    for stage, count in enumerate(stages, start=1):
        for index in range(1, count + 1):
            w, b = convs[layer]
            layer += 1
            x = _relu(nodes, _conv(nodes, weights, x, f"conv{stage}_{index}", w, b))
        pool = f"pool{stage}"
        nodes.append(helper.make_node("MaxPool", [x], [pool], name=pool, kernel_shape=[2, 2], strides=[2, 2]))
        x = pool
    _fc_head(nodes, weights, x, fcs)
    return _classifier_model(nodes, weights, input_shape, fcs[-1][0].shape[0], name)


@dataclass
class ResidualBlock:
    """Weights of one basic residual block: two 3x3 convolutions and, where the shape changes, a 1x1
    projection shortcut; `stride` is that of the first convolution and of the shortcut."""

    conv1: tuple[np.ndarray, np.ndarray]
    conv2: tuple[np.ndarray, np.ndarray]
    shortcut: tuple[np.ndarray, np.ndarray] | None
    stride: int


def resnet_onnx(
    stem: tuple[np.ndarray, np.ndarray],
    blocks: list[list[ResidualBlock]],
    fc: tuple[np.ndarray, np.ndarray],
    input_shape: tuple[int, int, int],
    name: str,
    stem_stride: int = 1,
) -> onnx.ModelProto:
    """A ResNet graph from numpy weights (BatchNorm already folded): stem Conv+Relu, then per stage its
    blocks (conv1+Relu, conv2, shortcut, Add, Relu, in the order torch exports them), GlobalAveragePool,
    Flatten and one Gemm. Node names: `stem`, `stage{s}.block{b}.conv1|conv2|shortcut|add`, `pool`, `fc1`."""
    nodes: list[onnx.NodeProto] = []
    weights: Weights = []
    x = _relu(nodes, _conv(nodes, weights, "input", "stem", *stem, stride=stem_stride))
    for stage, stage_blocks in enumerate(blocks, start=1):
        for index, block in enumerate(stage_blocks, start=1):
            prefix = f"stage{stage}.block{index}"
            y = _relu(nodes, _conv(nodes, weights, x, f"{prefix}.conv1", *block.conv1, stride=block.stride))
            y = _conv(nodes, weights, y, f"{prefix}.conv2", *block.conv2)
            skip = x if block.shortcut is None else _conv(
                nodes, weights, x, f"{prefix}.shortcut", *block.shortcut, stride=block.stride)
            nodes.append(helper.make_node("Add", [y, skip], [f"{prefix}.add"], name=f"{prefix}.add"))
            x = _relu(nodes, f"{prefix}.add")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    _fc_head(nodes, weights, "pool", [fc])
    return _classifier_model(nodes, weights, input_shape, fc[0].shape[0], name)


def build_vgg16_imagenet(seed: int = 0) -> onnx.ModelProto:
    """Full-size VGG-16 (3x224x224 -> 1000 classes, 138,357,544 parameters) with seeded He-normal weights."""
    rng = np.random.default_rng(seed)

    def he_normal(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        return w

    convs = []
    channels = 3
    for count, width in zip(VGG16_STAGES, VGG16_WIDTHS):
        for _ in range(count):
            convs.append((he_normal((width, channels, 3, 3), channels * 9), np.zeros(width, np.float32)))
            channels = width
    fcs = []
    features = channels * 7 * 7
    for width in (*VGG16_FC, 1000):
        fcs.append((he_normal((width, features), features), np.zeros(width, np.float32)))
        features = width
    return vgg_onnx(convs, fcs, (3, 224, 224), "vgg16_imagenet")


# ---- evaluation ---------------------------------------------------------------------------------
def onnx_top1(model: onnx.ModelProto | str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier on (x, y) with ONNX Runtime on the CPU."""
    from explorer.sessions import run_model

    loaded = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return float(np.mean(run_model(loaded, x).argmax(axis=1) == y))


def _stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` samples, an equal share of each class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = size // len(classes)
    picked = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))
