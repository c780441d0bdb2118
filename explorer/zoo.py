"""The built-in model zoo: a small VGG-16 trained on Fashion-MNIST and the full-size (untrained) VGG-16."""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from explorer.data import (
    Dataset,
    load_fashion_mnist,
    load_fashion_mnist_raw,
    preprocess_fashion_mnist,
)
from explorer.errors import ExplorerError
from explorer.paths import ZOO_DATA_DIR

OPSET = 17
IR_VERSION = 9  # onnxruntime 1.31 refuses the newer IR version that onnx 1.23 writes by default

VGG16_STAGES = (2, 2, 3, 3, 3)  # convolutions per stage; a 2x2 max-pool ends each stage
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_FC = (4096, 4096)

# The shipped `vgg`: the VGG-16 layer structure at reduced width, for 1x32x32 Fashion-MNIST images.
VGG_WIDTHS = (8, 16, 32, 64, 64)
VGG_FC = (128, 128)
VGG_EPOCHS = 10
VGG_SEED = 0
VGG_BATCH = 128
VGG_LR = 0.1
VGG_WEIGHT_DECAY = 5e-4
VGG_DROPOUT = 0.3
VGG_THREADS = 2
VAL_SIZE = 2000
VGG_FILE = "vgg.onnx"
VAL_FILE = "fashion_mnist_val.npz"


@dataclass(frozen=True)
class ZooEntry:
    """One built-in model: what it is, its input shape (batch 1) and whether its weights are trained."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    trained: bool
    note: str


ZOO: dict[str, ZooEntry] = {
    "vgg": ZooEntry(
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
    ),
    "vgg16-imagenet": ZooEntry(
        name="vgg16-imagenet",
        description="full-size VGG-16 (13 conv + 3 FC, 138M parameters), 3x224x224 input, 1000 classes",
        input_shape=(1, 3, 224, 224),
        trained=False,
        note=(
            "weights are untrained (seeded random), so its accuracy cannot be measured; "
            "for accuracy bring your own trained ONNX file and data (--model PATH.onnx --data val.npz)"
        ),
    ),
}


def _lookup(name: str) -> ZooEntry:
    if name in ZOO:
        return ZOO[name]
    close = difflib.get_close_matches(name, ZOO, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ExplorerError(f"unknown zoo model {name!r}: {hint}`explorer models` lists them")


def zoo_model(name: str) -> onnx.ModelProto:
    """The ONNX model of zoo entry `name` (`vgg` is loaded from the package, `vgg16-imagenet` is built)."""
    entry = _lookup(name)
    if entry.name == "vgg16-imagenet":
        return build_vgg16_imagenet()
    path = ZOO_DATA_DIR / VGG_FILE
    if not path.is_file():
        raise ExplorerError(f"{path} is missing: reinstall explorer or rebuild it with `explorer zoo train vgg`")
    return onnx.load(str(path))


def zoo_validation_data(name: str) -> Dataset | None:
    """Shipped labelled validation data for zoo entry `name`, or None if it has none."""
    entry = _lookup(name)
    if entry.name != "vgg":
        return None
    path = ZOO_DATA_DIR / VAL_FILE
    if not path.is_file():
        raise ExplorerError(f"{path} is missing: reinstall explorer or rebuild it with `explorer zoo train vgg`")
    with np.load(path) as archive:
        x, y = archive["x"], archive["y"]
    return Dataset(x=x, y=y, source=f"Fashion-MNIST held-out subset ({len(x)} test images)")


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
    """
    if sum(stages) != len(convs):
        raise ValueError(f"{len(convs)} convolutions do not fill stages {stages}")
    nodes: list[onnx.NodeProto] = []
    weights: list[tuple[str, np.ndarray]] = []
    x = "input"
    layer = 0
    for stage, count in enumerate(stages, start=1):
        for index in range(1, count + 1):
            w, b = convs[layer]
            layer += 1
            conv = f"conv{stage}_{index}"
            weights += [(f"{conv}.weight", w), (f"{conv}.bias", b)]
            nodes.append(helper.make_node(
                "Conv", [x, f"{conv}.weight", f"{conv}.bias"], [conv], name=conv,
                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
            ))
            nodes.append(helper.make_node("Relu", [conv], [f"{conv}.relu"], name=f"{conv}.relu"))
            x = f"{conv}.relu"
        pool = f"pool{stage}"
        nodes.append(helper.make_node("MaxPool", [x], [pool], name=pool, kernel_shape=[2, 2], strides=[2, 2]))
        x = pool
    nodes.append(helper.make_node("Flatten", [x], ["flatten"], name="flatten", axis=1))
    x = "flatten"
    for index, (w, b) in enumerate(fcs, start=1):
        fc = f"fc{index}"
        last = index == len(fcs)
        weights += [(f"{fc}.weight", w), (f"{fc}.bias", b)]
        out = "logits" if last else fc
        nodes.append(helper.make_node("Gemm", [x, f"{fc}.weight", f"{fc}.bias"], [out], name=fc, transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [fc], [f"{fc}.relu"], name=f"{fc}.relu"))
            out = f"{fc}.relu"
        x = out
    classes = fcs[-1][0].shape[0]
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


def onnx_top1(model: onnx.ModelProto | str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier on (x, y) with ONNX Runtime on the CPU."""
    from explorer.accuracy import run_model

    loaded = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return float(np.mean(run_model(loaded, x).argmax(axis=1) == y))


def _stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` samples, an equal share of each class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = size // len(classes)
    picked = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))


def train_vgg(
    out_dir: Path,
    epochs: int = VGG_EPOCHS,
    seed: int = VGG_SEED,
    data_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the zoo `vgg` on Fashion-MNIST, export `vgg.onnx` (BatchNorm folded) and the validation subset.

    Needs torch (the `train` extra). Runs on 2 CPU threads with deterministic algorithms, so the same seed,
    epochs and machine give the same weights. Returns test accuracy (full 10,000 test images and the
    subset, with ONNX Runtime), training time and file sizes.
    """
    try:
        import torch
        from torch import nn
    except ImportError:
        raise ExplorerError("training needs torch: run bash .ci/setup (it installs torch==2.13.0)") from None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train = load_fashion_mnist("train", data_dir)
    test_images, y_test = load_fashion_mnist_raw("test", data_dir)
    x_test = preprocess_fashion_mnist(test_images)

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(VGG_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # costs ~30 % of a CPU step, not needed here
    try:
        torch.manual_seed(seed)
        net = _torch_vgg()
        xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
        steps = (len(xt) + VGG_BATCH - 1) // VGG_BATCH
        optimizer = torch.optim.SGD(
            net.parameters(), lr=VGG_LR, momentum=0.9, nesterov=True, weight_decay=VGG_WEIGHT_DECAY
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=VGG_LR, total_steps=epochs * steps)
        loss_fn = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(seed)
        console = Console(quiet=not progress)
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=True, disable=not progress,
        )
        started = time.perf_counter()
        with bar:
            task = bar.add_task("training vgg", total=epochs * steps)
            for epoch in range(1, epochs + 1):
                net.train()
                order = torch.randperm(len(xt), generator=generator)
                total_loss, correct = 0.0, 0
                for step in range(steps):
                    index = order[step * VGG_BATCH:(step + 1) * VGG_BATCH]
                    xb, yb = xt[index], yt[index]
                    flip = torch.rand(len(xb), generator=generator) < 0.5
                    xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
                    logits = net(xb)
                    loss = loss_fn(logits, yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    total_loss += loss.item() * len(xb)
                    correct += int((logits.argmax(1) == yb).sum())
                    bar.advance(task)
                console.print(
                    f"epoch {epoch}/{epochs}: loss {total_loss / len(xt):.4f}, "
                    f"train accuracy {correct / len(xt):.4f}, {time.perf_counter() - started:.0f} s"
                )
        train_seconds = time.perf_counter() - started
        convs, fcs = _fold_vgg(net)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill

    model = vgg_onnx(convs, fcs, (1, 32, 32), "vgg_fashion_mnist")
    onnx.checker.check_model(model, full_check=True)
    onnx_path = out_dir / VGG_FILE
    onnx.save(model, str(onnx_path))

    subset = _stratified_subset(y_test, VAL_SIZE, seed)
    val_path = out_dir / VAL_FILE
    np.savez_compressed(val_path, x=x_test[subset], y=y_test[subset])
    metrics = {
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "test_accuracy": onnx_top1(model, x_test, y_test),
        "subset_accuracy": onnx_top1(model, x_test[subset], y_test[subset]),
        "parameters": sum(int(np.prod(w.shape)) + len(b) for w, b in convs + fcs),
        "onnx_bytes": onnx_path.stat().st_size,
        "val_bytes": val_path.stat().st_size,
    }
    console.print(
        f"wrote {onnx_path} ({metrics['onnx_bytes'] / 1e6:.2f} MB) and {val_path}: "
        f"test accuracy {metrics['test_accuracy']:.4f} (subset {metrics['subset_accuracy']:.4f}), "
        f"trained in {metrics['train_seconds']:.0f} s"
    )
    return metrics


def _torch_vgg() -> Any:
    """The trainable torch `vgg`: Conv-BatchNorm-ReLU blocks, max-pools, FC-ReLU-Dropout layers."""
    from torch import nn

    layers: list[nn.Module] = []
    channels = 1
    for count, width in zip(VGG16_STAGES, VGG_WIDTHS):
        for _ in range(count):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    layers.append(nn.Flatten())
    features = channels  # 32x32 halved five times leaves 1x1
    for width in VGG_FC:
        layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(VGG_DROPOUT)]
        features = width
    layers.append(nn.Linear(features, 10))
    return nn.Sequential(*layers)


def _fold_vgg(net: Any) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """Numpy (weight, bias) per conv, with the following BatchNorm folded in (eval statistics), and per FC."""
    from torch import nn

    modules = list(net)
    convs, fcs = [], []
    for module, following in zip(modules, modules[1:] + [None]):
        if isinstance(module, nn.Conv2d):
            if not isinstance(following, nn.BatchNorm2d):
                raise ValueError("every convolution must be followed by BatchNorm2d")
            w = module.weight.detach().double().numpy()
            gamma, beta = following.weight.detach().double().numpy(), following.bias.detach().double().numpy()
            mean, var = following.running_mean.double().numpy(), following.running_var.double().numpy()
            scale = gamma / np.sqrt(var + following.eps)
            folded = (w * scale[:, None, None, None]).astype(np.float32)
            convs.append((folded, (beta - mean * scale).astype(np.float32)))
        elif isinstance(module, nn.Linear):
            fcs.append((module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()))
    return convs, fcs
