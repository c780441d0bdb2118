"""Top-1 accuracy of the shipped zoo `vgg` with ONNX Runtime (fp32), as a Markdown table.

Usage: python benchmarks/vgg_accuracy.py [--data-dir DIR]   (DIR holds the Fashion-MNIST idx files)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from explorer.data import FASHION_MNIST_DIR, load_fashion_mnist
from explorer.paths import ZOO_DATA_DIR
from explorer.zoo import VAL_FILE, VGG_FILE, onnx_top1, zoo_validation_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST_DIR)
    args = parser.parse_args()

    model_path = ZOO_DATA_DIR / VGG_FILE
    x_test, y_test = load_fashion_mnist("test", args.data_dir)
    subset = zoo_validation_data("vgg")
    assert subset is not None and subset.y is not None
    rows = [
        (f"Fashion-MNIST full test set ({len(y_test)} images)", f"{onnx_top1(model_path, x_test, y_test):.2%}"),
        (f"shipped subset `{VAL_FILE}` ({len(subset.y)} images)", f"{onnx_top1(model_path, subset.x, subset.y):.2%}"),
        (f"`{VGG_FILE}` size", f"{model_path.stat().st_size / 1e6:.2f} MB"),
    ]
    print("| zoo `vgg`, fp32, ONNX Runtime CPU | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
