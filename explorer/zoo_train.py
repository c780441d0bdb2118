"""Training of the zoo networks on Fashion-MNIST with torch (the `train` extra), and their ONNX export with
BatchNorm folded into the convolutions. On one machine the same recipe gives the same bytes: seeded RNGs,
deterministic algorithms and a fixed number of threads."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

# Training threads that sleep instead of spinning while they wait: on a machine whose cores other work shares,
# spinning threads made 2-thread training 3-4x slower. Read once by OpenMP when torch loads it (so only if torch
# is not imported yet); it changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from explorer.data import load_fashion_mnist, load_fashion_mnist_raw, preprocess_fashion_mnist
from explorer.errors import ExplorerError
from explorer.zoo import (
    RESNET18_BLOCKS,
    VAL_FILE,
    VAL_SEED,
    VAL_SIZE,
    VGG16_STAGES,
    VGG_FILE,
    Recipe,
    ResidualBlock,
    _stratified_subset,
    onnx_top1,
    resnet_onnx,
    vgg_onnx,
)

Pair = tuple[np.ndarray, np.ndarray]


@contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Fixed threads and deterministic algorithms inside the block; the caller's settings afterwards."""
    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    # fill_uninitialized_memory is set on the module at run time; torch's stubs do not declare it
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]  # ~30 % of a CPU step
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


def train_recipe(recipe: Recipe, data_dir: Path | None = None, progress: bool = True,
                 console: Any = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Train `recipe` on the Fashion-MNIST training set and export it; return the ONNX model and its metrics
    (top-1 in points on the 10,000 test images and on the shipped 2,000-image subset, parameters, MFLOPs per
    image, training seconds)."""
    from rich.console import Console

    from explorer.graph import LayerGraph

    if recipe.arch not in _ARCHS:
        raise ExplorerError(f"unknown zoo architecture {recipe.arch!r}: use one of {', '.join(_ARCHS)}")
    console = console if console is not None else Console(quiet=not progress)
    x_train, y_train = load_fashion_mnist("train", data_dir)
    if recipe.train_images is not None:
        chosen = _stratified_subset(y_train, recipe.train_images, recipe.seed)
        x_train, y_train = x_train[chosen], y_train[chosen]
    test_images, y_test = load_fashion_mnist_raw("test", data_dir)
    x_test = preprocess_fashion_mnist(test_images)

    build, export = _ARCHS[recipe.arch]
    with _deterministic(recipe.threads):
        torch.manual_seed(recipe.seed)
        net = build(recipe)
        train_seconds = _fit(net, recipe, x_train, y_train, console, progress)
        net.eval()
        model = export(net, recipe)
    onnx.checker.check_model(model, full_check=True)

    subset = _stratified_subset(y_test, VAL_SIZE, VAL_SEED)
    # LayerGraph rewrites the model it is given (names, shapes): count FLOPs on a copy.
    graph = LayerGraph(onnx.ModelProto.FromString(model.SerializeToString()))
    metrics = {
        "model": recipe.arch,
        "epochs": recipe.epochs,
        "seed": recipe.seed,
        "torch": torch.__version__,
        "train_seconds": round(train_seconds, 1),
        "test_top1_points": round(100 * onnx_top1(model, x_test, y_test), 2),
        "subset_top1_points": round(100 * onnx_top1(model, x_test[subset], y_test[subset]), 2),
        "parameters": graph.total_params,
        "decision_layers": len(graph.layers),
        "mflops": round(graph.total_flops / 1e6, 2),
    }
    console.print(
        f"{recipe.arch}: top-1 {metrics['test_top1_points']:.2f} % on {len(y_test):,} test images "
        f"({metrics['subset_top1_points']:.2f} % on the {len(subset):,}-image subset), trained in {train_seconds:.0f} s"
    )
    return model, metrics


def train_vgg(out_dir: Path, recipe: Recipe, data_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the zoo `vgg` and write `vgg.onnx` (BatchNorm folded) and the shipped validation subset to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, metrics = train_recipe(recipe, data_dir=data_dir, progress=progress)
    onnx_path = out_dir / VGG_FILE
    onnx.save(model, str(onnx_path))
    test_images, y_test = load_fashion_mnist_raw("test", data_dir)
    subset = _stratified_subset(y_test, VAL_SIZE, VAL_SEED)
    val_path = out_dir / VAL_FILE
    np.savez_compressed(val_path, x=preprocess_fashion_mnist(test_images[subset]), y=y_test[subset])
    metrics["onnx_bytes"] = onnx_path.stat().st_size
    metrics["val_bytes"] = val_path.stat().st_size
    return metrics


def _fit(net: nn.Module, recipe: Recipe, x: np.ndarray, y: np.ndarray, console: Any, progress: bool) -> float:
    """Train `net` in place (SGD, Nesterov momentum, one-cycle learning rate, random horizontal flips); the
    seconds it took."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = (len(xt) + recipe.batch - 1) // recipe.batch
    optimizer = torch.optim.SGD(
        net.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(recipe.seed)
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not progress,
    )
    started = time.perf_counter()
    with bar:
        task = bar.add_task(f"training {recipe.arch}", total=recipe.epochs * steps)
        for epoch in range(1, recipe.epochs + 1):
            net.train()
            order = torch.randperm(len(xt), generator=generator)
            total_loss, correct = 0.0, 0
            for step in range(steps):
                index = order[step * recipe.batch:(step + 1) * recipe.batch]
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
                f"epoch {epoch}/{recipe.epochs}: loss {total_loss / len(xt):.4f}, "
                f"train accuracy {100 * correct / len(xt):.2f} %, {time.perf_counter() - started:.0f} s"
            )
    return time.perf_counter() - started


# ---- the networks ---------------------------------------------------------------------------------
def _fc_layers(features: int, widths: tuple[int, ...], dropout: float) -> list[nn.Module]:
    """Hidden FC-ReLU(-Dropout) layers of `widths`, then the 10-class FC layer."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(features, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        features = width
    layers.append(nn.Linear(features, 10))
    return layers


def _torch_vgg(recipe: Recipe) -> nn.Module:
    """Conv-BatchNorm-ReLU blocks in the VGG-16 stages, max-pools, then FC-ReLU-Dropout layers."""
    layers: list[nn.Module] = []
    channels = 1
    for count, width in zip(VGG16_STAGES, recipe.widths):
        for _ in range(count):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    layers.append(nn.Flatten())
    # 32x32 halved five times leaves 1x1, so the first FC layer sees `channels` features.
    return nn.Sequential(*layers, *_fc_layers(channels, recipe.fc, recipe.dropout))


def _torch_dnn(recipe: Recipe) -> nn.Module:
    """Flatten the 1x32x32 image, then the hidden FC layers and the classifier."""
    return nn.Sequential(nn.Flatten(), *_fc_layers(32 * 32, recipe.widths, recipe.dropout))


class _ConvBN(nn.Sequential):
    """Conv (no bias) then BatchNorm: one ONNX Conv once folded."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class _BasicBlock(nn.Module):
    """ResNet basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), with a 1x1 projection
    shortcut where the stride or the width changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = _ConvBN(cin, cout, 3, stride)
        self.conv2 = _ConvBN(cout, cout, 3, 1)
        self.shortcut = _ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class _ResNet(nn.Module):
    """ResNet-18 layout for 1-channel images: stem, stages of basic blocks (the first stage keeps the
    resolution, each later one halves it), global average pool, FC."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.stem_stride = recipe.stem_stride
        self.stem = _ConvBN(1, recipe.widths[0], 3, recipe.stem_stride)
        stages, channels = [], recipe.widths[0]
        for stage, width in enumerate(recipe.widths):
            blocks = [_BasicBlock(channels, width, 1 if stage == 0 else 2)]
            blocks += [_BasicBlock(width, width, 1) for _ in range(RESNET18_BLOCKS - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1))


# ---- export ---------------------------------------------------------------------------------------
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Pair:
    """Numpy (weight, bias) of `conv` with the following BatchNorm folded in (eval statistics)."""
    w = conv.weight.detach().double().numpy()
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm2d without running statistics cannot be folded")
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    scale = gamma / np.sqrt(var + bn.eps)
    return (w * scale[:, None, None, None]).astype(np.float32), (beta - mean * scale).astype(np.float32)


def _linear(module: nn.Linear) -> Pair:
    return module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()


def _fold_sequential(net: nn.Sequential) -> tuple[list[Pair], list[Pair]]:
    """(weight, bias) per conv, with the following BatchNorm folded in, and per FC layer, in order."""
    modules = list(net)
    convs, fcs = [], []
    for module, following in zip(modules, modules[1:] + [None]):
        if isinstance(module, nn.Conv2d):
            if not isinstance(following, nn.BatchNorm2d):
                raise ValueError("every convolution must be followed by BatchNorm2d")
            convs.append(_fold(module, following))
        elif isinstance(module, nn.Linear):
            fcs.append(_linear(module))
    return convs, fcs


def _export_vgg(net: nn.Sequential, recipe: Recipe) -> onnx.ModelProto:
    convs, fcs = _fold_sequential(net)
    return vgg_onnx(convs, fcs, (1, 32, 32), "vgg_fashion_mnist")


def _export_dnn(net: nn.Sequential, recipe: Recipe) -> onnx.ModelProto:
    convs, fcs = _fold_sequential(net)
    return vgg_onnx(convs, fcs, (1, 32, 32), "dnn_fashion_mnist", stages=())


def _export_cnn(net: _ResNet, recipe: Recipe) -> onnx.ModelProto:
    def folded(unit: _ConvBN) -> Pair:
        return _fold(cast(nn.Conv2d, unit[0]), cast(nn.BatchNorm2d, unit[1]))

    blocks = [
        [ResidualBlock(folded(b.conv1), folded(b.conv2), folded(b.shortcut) if b.shortcut is not None else None,
                       b.stride) for b in cast(Iterable[_BasicBlock], stage)]
        for stage in net.stages
    ]
    return resnet_onnx(folded(net.stem), blocks, _linear(net.fc), (1, 32, 32), "cnn_fashion_mnist",
                       stem_stride=recipe.stem_stride)


#: Per architecture: the torch network for a recipe, and its export to ONNX.
_ARCHS: dict[str, tuple[Callable[[Recipe], nn.Module], Callable[[Any, Recipe], onnx.ModelProto]]] = {
    "vgg": (_torch_vgg, _export_vgg), "dnn": (_torch_dnn, _export_dnn), "cnn": (_ResNet, _export_cnn)}
