"""Foundation timings on this machine: time and peak memory of a cold `explorer solve`, an export of
its plan and the sensitivity table, for vgg16-imagenet and for a 10 MB OCR-recogniser-like model built
here; and the vgg sensitivity table (cold and cached).

    PYTHONPATH=. .venv/bin/python benchmarks/foundation_timing.py [--repeats 3] [--only TEXT] [--json out.json]

Each case runs in a fresh subprocess (so its peak resident memory is its own) with a fresh runs folder
for the cold solve; figures are medians over the repeats. CPU seconds (user + system, all threads)
say more than wall time on shared cores. Without validation data the solve limits
ranks by the reconstruction-error bound (every layer's singular values: the SVD work this measures) and
the sensitivity table is scored on synthetic standard-normal inputs (agreement with the uncompressed
model, not accuracy). The vgg16-imagenet sensitivity table (hundreds of entries, each a rewrite and a
run of the rest of the network at 224x224) is measured for its first entries and the rest projected
from their rate: the first layers have the longest suffixes, so the projection is an upper estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SENSITIVITY_ENTRIES = 6  # vgg16-imagenet: entries measured before the rest is projected
OCR_SHAPE = (3, 48, 320)


def build_ocr_recogniser(path: Path, seed: int = 0) -> int:
    """A CRNN-like text recogniser (conv stack to height 1, then two MatMul layers over 80 time steps and
    3000 classes; symbolic batch), 10.5 MB of seeded weights; writes it to `path`, returns its bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights, nodes = [], []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), name))
        return name

    x, channels = "x", 3
    for i, (width, pool) in enumerate([(32, (2, 2)), (64, (2, 2)), (128, (2, 1)), (256, (2, 1)), (256, (3, 1))]):
        w, b = weight(f"conv{i}.w", (width, channels, 3, 3), channels * 9), weight(f"conv{i}.b", (width,), 1)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        nodes.append(helper.make_node("MaxPool", [f"relu{i}"], [f"pool{i}"], name=f"pool{i}", kernel_shape=list(pool), strides=list(pool)))
        x, channels = f"pool{i}", width
    weights.append(numpy_helper.from_array(np.array([0, channels, -1], np.int64), "seq_shape"))
    nodes.append(helper.make_node("Reshape", [x, "seq_shape"], ["seq"], name="to_sequence"))  # (N, 256, 80)
    nodes.append(helper.make_node("Transpose", ["seq"], ["steps"], name="steps", perm=[0, 2, 1]))  # (N, 80, 256)
    x, features = "steps", channels
    for i, width in enumerate((512, 3000)):
        w, b = weight(f"fc{i}.w", (features, width), features), weight(f"fc{i}.b", (width,), 1)
        nodes.append(helper.make_node("MatMul", [x, w], [f"fc{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Add", [f"fc{i}", b], [f"fc{i}.add"], name=f"fc{i}.add"))
        x, features = f"fc{i}.add", width
        if i == 0:
            nodes.append(helper.make_node("Relu", [x], ["fc0.relu"], name="fc0.relu"))
            x = "fc0.relu"
    graph = helper.make_graph(nodes, "ocr_recogniser",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *OCR_SHAPE])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 80, 3000])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="foundation_timing")
    onnx.save(model, path)
    return path.stat().st_size


def _cli(argv: list[str]) -> str:
    return f"""
        from explorer.cli import main
        code = main({argv!r})
        assert code == 0, code
        detail = ""
    """


def _partial_sensitivity(model: str, data: str, entries: int) -> str:
    return f"""
        import time
        from explorer.accuracy import AccuracyScorer, sensitivity_table
        from explorer.compress import Compressor
        from explorer.zoo import load_graph_and_data
        graph, dataset = load_graph_and_data({model!r}, {data!r})
        compressor, scorer = Compressor(graph), AccuracyScorer(graph.model, dataset)
        marks = []
        def progress(done, total):
            marks.append((time.perf_counter(), done, total))
            if len(marks) > {entries}:
                raise KeyboardInterrupt
        try:
            sensitivity_table(graph, compressor, scorer, progress=progress)
        except KeyboardInterrupt:
            pass
        (t0, d0, total), (t1, d1, _) = marks[1], marks[-1]
        rate = (t1 - t0) / (d1 - d0)
        projected = time.perf_counter() - started + rate * (total - d1)
        detail = (f"{{d1}} of {{total}} entries measured at {{rate:.1f}} s each; whole table projected "
                  f"{{projected / 60:.0f}} min (estimate)")
    """


def cases(work: Path) -> list[tuple[str, str, bool]]:
    """(name, code, fresh) of every case in the order they run; a case that is not fresh reuses the runs
    folder of the case before it (an export the cold solve's, the cached table the cold one's)."""
    import numpy as np

    ocr = work / "ocr_recogniser.onnx"
    ocr_mb = build_ocr_recogniser(ocr) / 1e6
    rng = np.random.default_rng(0)
    np.savez(work / "vgg16-synthetic.npz", x=rng.standard_normal((8, 3, 224, 224)).astype(np.float32))
    np.savez(work / "ocr-synthetic.npz", x=rng.standard_normal((32, *OCR_SHAPE)).astype(np.float32))
    result = []
    for label, model, shape, data in [
        ("vgg16-imagenet (527.8 MB)", "vgg16-imagenet", [], work / "vgg16-synthetic.npz"),
        (f"ocr recogniser ({ocr_mb:.1f} MB)", str(ocr), ["--input-shape", "x=1x3x48x320"], work / "ocr-synthetic.npz"),
    ]:
        tag = "vgg16" if model == "vgg16-imagenet" else "ocr"
        plan, bundle = str(work / f"{tag}-plan.json"), str(work / f"{tag}-bundle")
        result.append((f"{label}: cold solve", _cli(["solve", "--board", "tegra-k1", "--model", model, *shape,
                                                     "--out", plan]), True))
        result.append((f"{label}: export of the solver's plan",
                       f"import shutil; shutil.rmtree({bundle!r}, ignore_errors=True)\n"
                       + textwrap.dedent(_cli(["export", "--board", "tegra-k1", "--model", model, *shape,
                                               "--plan", plan, "--out", bundle])), False))
        if tag == "vgg16":
            result.append((f"{label}: sensitivity table, synthetic data (8 samples), first entries",
                           _partial_sensitivity(model, str(data), SENSITIVITY_ENTRIES), True))
        else:
            result.append((f"{label}: sensitivity table, cold, synthetic data (32 samples)",
                           _cli(["sensitivity", "--model", model, "--data", str(data)]), True))
    vgg = """
        from explorer.accuracy import AccuracyScorer, sensitivity_table
        from explorer.compress import Compressor
        from explorer.zoo import load_graph
        from explorer.zoo import zoo_validation_data
        graph = load_graph("vgg"); compressor = Compressor(graph)
        scorer = AccuracyScorer(graph.model, zoo_validation_data("vgg"))
        table = sensitivity_table(graph, compressor, scorer)
        detail = f"{len(table.drops)} entries, from cache: {table.from_cache}"
    """
    result.append(("vgg sensitivity table (cold, all rungs x fp32/fp16/int8)", vgg, True))
    result.append(("vgg sensitivity table (cached)", vgg, False))
    return result


RUNNER = """
import resource, time, json
started = time.perf_counter()
{body}
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"seconds": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_mb": usage.ru_maxrss / 1024, "detail": detail}}))
"""


def run_case(body: str, runs: str) -> dict:
    """One case in a fresh Python process: its seconds, peak resident memory and detail."""
    code = RUNNER.format(body=textwrap.dedent(body))
    environment = {"EXPLORER_RUNS": runs, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                   "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                         cwd=REPO, timeout=3600)
    if out.returncode:
        raise SystemExit(f"a case failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (the median is reported)")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="foundation-") as work_dir:
        work = Path(work_dir)
        selected = [c for c in cases(work) if not args.only or args.only in c[0]]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in selected}
        for _ in range(args.repeats):  # repeats interleaved; a case that reuses a runs folder follows its maker
            folder = None
            for name, body, fresh in selected:
                if fresh or folder is None:
                    folder = tempfile.mkdtemp(dir=work, prefix="runs-")
                runs[name].append(run_case(body, folder))
                last = runs[name][-1]
                print(f"{name}: {last['seconds']:.1f} s wall, {last['cpu_s']:.1f} s CPU, {last['peak_mb']:.0f} MB "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        for name, measured in runs.items():
            results.append({"case": name, "seconds": statistics.median(r["seconds"] for r in measured),
                            "cpu_s": statistics.median(r["cpu_s"] for r in measured),
                            "peak_mb": statistics.median(r["peak_mb"] for r in measured),
                            "runs": measured, "detail": measured[-1]["detail"]})
    load = os.getloadavg()
    print(f"medians of {args.repeats} runs; load average at the end {load[0]:.1f} on {os.cpu_count()} cores\n")
    print("| case | wall s | CPU s | peak memory (MB) | detail |\n| --- | ---: | ---: | ---: | --- |")
    for r in results:
        print(f"| {r['case']} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | {r['detail']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
