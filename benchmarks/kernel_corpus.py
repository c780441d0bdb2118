"""Does a corpus of sampled models teach the predictor what two models cannot? Predicted against measured latency of
each zoo model's designed plans on this machine, the predictor trained on the other zoo models' kernel tables, alone
and with a corpus of synthetic models profiled on the same device.

    PYTHONPATH=. .venv/bin/python benchmarks/kernel_corpus.py [--models vgg,dnn,cnn] [--corpus 8] [--seed 0] [--json F]

Needs the `host` board (`explorer calibrate`). The corpus: `--corpus` classifiers with random weights of three
families, deterministic from `--seed` (1 or 3 input channels at 16-32 pixels; VGG-style: 1-3 stages of 1-2 3x3
convolutions of 8-256 channels and 1-2 hidden fully connected layers of 64-2048 units; fully connected: 1-3 hidden
layers; residual: a stem and 1-4 stages of 1-2 basic blocks; written to runs/cache/corpus/), each profiled as
`explorer profile` would (designed plans of design seed 0; recalled from the device's store when measured before).
Each zoo model is profiled too (its designed plans of seed 0 are what the predictions are compared with, measured
paired at the device's typical speed) but never part of its own predictor's training. Adding the corpus to the
device's store also adds its terms to every table fitted on this device (`explorer solve`, `search`), as
`explorer profile` of any model does. Reported: the share of blocks and of plans within +/-10 % and +/-25 %,
and the median of predicted/measured.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import error_shares, markdown_table, write_json, zoo_problem
from explorer.api import load_problem
from explorer.kernels import KernelCostModel, KernelStore, design_plans, profile, seconds_at
from explorer.paths import cache_dir
from explorer.predictor import KernelPredictor
from explorer.problem import Problem
from explorer.zoo import ResidualBlock, resnet_onnx, vgg_onnx

CHANNELS = (8, 16, 32, 48, 64, 96, 128, 192, 256)
SIZES = (16, 24, 28, 32)
HIDDEN = (64, 128, 256, 512, 1024, 2048)
FAMILIES = ("vgg", "mlp", "resnet")


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)


def _fcs(rng: np.random.Generator, width: int, hidden: int) -> list[tuple[np.ndarray, np.ndarray]]:
    fcs = []
    for out in [int(rng.choice(HIDDEN)) for _ in range(hidden)] + [10]:
        fcs.append((_he(rng, (out, width), width), np.zeros(out, np.float32)))
        width = out
    return fcs


def synthetic_model(seed: int) -> onnx.ModelProto:
    """One corpus model of a random family (VGG-style, fully connected or residual), random shape and He-initialised
    random weights."""
    rng = np.random.default_rng(seed)
    family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    size, channels_in = int(rng.choice(SIZES)), int(rng.choice([1, 3]))
    name = f"synthetic-{seed}"
    if family == "mlp":  # Flatten, then 1-3 hidden Gemm layers
        return vgg_onnx([], _fcs(rng, channels_in * size * size, int(rng.integers(1, 4))), (channels_in, size, size),
                        name, stages=())
    if family == "resnet":  # stem, 1-4 stages of one or two basic blocks, global pooling, one Gemm
        stride = int(rng.choice([1, 2]))
        channels = int(rng.choice(CHANNELS[:4]))
        stem = (_he(rng, (channels, channels_in, 3, 3), 9 * channels_in), np.zeros(channels, np.float32))
        stages = []
        for stage in range(int(rng.integers(1, 5))):
            out = int(rng.choice([c for c in CHANNELS if c >= channels]))
            blocks = []
            for index in range(int(rng.integers(1, 3))):
                first = index == 0
                step = 2 if first and stage > 0 else 1
                shortcut = (_he(rng, (out, channels, 1, 1), channels), np.zeros(out, np.float32)) \
                    if first and (out != channels or step != 1) else None
                blocks.append(ResidualBlock((_he(rng, (out, channels, 3, 3), 9 * channels), np.zeros(out, np.float32)),
                                            (_he(rng, (out, out, 3, 3), 9 * out), np.zeros(out, np.float32)),
                                            shortcut, step))
                channels = out
            stages.append(blocks)
        fc = (_he(rng, (10, channels), channels), np.zeros(10, np.float32))
        return resnet_onnx(stem, stages, fc, (channels_in, size, size), name, stem_stride=stride)
    stages = tuple(int(rng.integers(1, 3)) for _ in range(int(rng.integers(1, 4))))
    convs, channels = [], channels_in
    for count in stages:
        out = int(rng.choice(CHANNELS))
        for _ in range(count):
            convs.append((_he(rng, (out, channels, 3, 3), 9 * channels), np.zeros(out, np.float32)))
            channels = out
    width = channels * (size // 2 ** len(stages)) ** 2
    return vgg_onnx(convs, _fcs(rng, width, int(rng.integers(1, 3))), (channels_in, size, size), name, stages=stages)


def corpus_problems(count: int, seed: int) -> list[Problem]:
    """The corpus models as Problems on the host, their files in runs/cache/corpus/."""
    folder = cache_dir("corpus")
    problems = []
    for k in range(count):
        path = Path(folder) / f"synthetic-{seed}-{k}.onnx"
        if not path.exists():  # written whole or not at all: an interrupted run leaves no broken model
            partial = path.with_suffix(".partial")
            onnx.save(synthetic_model(1000 * seed + k), partial)
            partial.replace(path)
        problems.append(load_problem(str(path), "host", measure="host", latency_ms=None, max_accuracy_drop_points=None))
    return problems


def errors(problem: Problem, store: KernelStore, trained_on: set[str]) -> tuple[list[float], list[float]]:
    """The predictor trained on the tables of the models `trained_on` (fingerprints) against `problem`'s designed
    plans of seed 0 as measured (paired, at its typical speed): relative errors of blocks and of plans."""
    fingerprint = problem.graph.fingerprint()
    table = store.table(models=trained_on)
    typical = store.references()[fingerprint]
    table.references[fingerprint] = typical  # the device's speed, not kernels
    model = KernelCostModel(problem.board, problem.graph, problem.compressor, table, KernelPredictor.from_table(table))
    model.prime(problem)
    plans = {plan.digest(): plan for plan in design_plans(problem, 0)}
    blocks, whole = [], []
    for entry in store.entries():
        if entry["model"] != fingerprint or entry["plan"] not in plans:
            continue
        measured = seconds_at([b[1] for b in entry["blocks"]], [b[2] for b in entry["blocks"]], typical)
        predicted = model.block_seconds(plans[entry["plan"]])
        blocks += [p / m - 1 for p, m in zip(predicted, measured)]
        whole.append(sum(predicted) / sum(measured) - 1)
    return blocks, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg,dnn,cnn", help="zoo models (each predicted from the others)")
    parser.add_argument("--corpus", type=int, default=8, help="synthetic models in the corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus")
    parser.add_argument("--json")
    args = parser.parse_args()
    zoo = {name: zoo_problem(name, "host", measure="host", latency_ms=None, max_accuracy_drop_points=None)
           for name in args.models.split(",")}
    corpus = corpus_problems(args.corpus, args.seed)
    started = time.monotonic()
    for problem in [*zoo.values(), *corpus]:
        print(f"profiling {problem.graph.source}", file=sys.stderr)
        profile(problem, seed=0)
    profile_s = time.monotonic() - started
    first = next(iter(zoo.values()))
    store = KernelStore(first.measurer.device(first.board))
    fingerprints = {name: problem.graph.fingerprint() for name, problem in zoo.items()}
    corpus_prints = {problem.graph.fingerprint() for problem in corpus}
    records = []
    for name, problem in zoo.items():
        others = {fingerprints[m] for m in zoo if m != name}
        with_corpus = f"other zoo models + {len(corpus)} synthetic"
        for label, trained_on in (("other zoo models", others), (with_corpus, others | corpus_prints)):
            print(f"{name}: the predictor trained on the {label}", file=sys.stderr)
            blocks, whole = errors(problem, store, trained_on)
            records.append({"model": name, "trained_on": label, "blocks": error_shares(blocks), "plans": error_shares(whole)})
    rows = [[r["model"], r["trained_on"], r["blocks"]["n"], f"{100 * r['blocks']['within_10']:.0f}%",
             f"{100 * r['blocks']['within_25']:.0f}%", f"{100 * r['plans']['within_10']:.0f}%",
             f"{100 * r['plans']['within_25']:.0f}%", f"{r['plans']['median_ratio']:.2f}"] for r in records]
    print(markdown_table(["model", "predictor trained on", "blocks", "blocks within 10%", "blocks within 25%",
                          "plans within 10%", "plans within 25%", "median predicted/measured (plans)"], rows))
    print(f"\nprofiling (this run, recalled plans excluded): {profile_s:.0f} s")
    write_json(args.json, {"corpus": args.corpus, "seed": args.seed, "profile_seconds": profile_s, "records": records})


if __name__ == "__main__":
    main()
