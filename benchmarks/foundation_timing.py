"""Foundation timings on this machine: the vgg sensitivity table (cold and cached) and the
full-size vgg16-imagenet graph (build, inspect, rewrite at a few ranks) with its peak memory.

    .venv/bin/python benchmarks/foundation_timing.py [--json out.json]

Each case runs in a fresh subprocess so that its peak resident memory is its own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

CASES = {
    "vgg sensitivity table (cold, all rungs x fp32/fp16/int8)": """
        from explorer.accuracy import AccuracyScorer, sensitivity_table
        from explorer.compress import Compressor
        from explorer.graph import load_graph
        from explorer.zoo import zoo_validation_data
        graph = load_graph("vgg"); compressor = Compressor(graph)
        scorer = AccuracyScorer(graph.model, zoo_validation_data("vgg"))
        table = sensitivity_table(graph, compressor, scorer)
        detail = f"{len(table.drops)} entries, from cache: {table.from_cache}"
    """,
    "vgg sensitivity table (cached)": """
        from explorer.accuracy import AccuracyScorer, sensitivity_table
        from explorer.compress import Compressor
        from explorer.graph import load_graph
        from explorer.zoo import zoo_validation_data
        graph = load_graph("vgg"); compressor = Compressor(graph)
        scorer = AccuracyScorer(graph.model, zoo_validation_data("vgg"))
        table = sensitivity_table(graph, compressor, scorer)
        detail = f"{len(table.drops)} entries, from cache: {table.from_cache}"
    """,
    "vgg16-imagenet build + inspect + rewrite (3 FC and 2 conv layers at their 2nd rung)": """
        from explorer.compress import Compressor, decision_for, full_rank_plan
        from explorer.graph import load_graph
        graph = load_graph("vgg16-imagenet"); compressor = Compressor(graph)
        ladders = {layer.name: compressor.ladder(layer.name) for layer in graph.layers}
        plan = full_rank_plan(graph)
        for layer in graph.layers[-3:] + graph.layers[10:12]:
            plan = plan.with_decision(layer.name, decision_for(ladders[layer.name][2]))
        model = compressor.rewrite(plan)
        detail = f"{len(graph.layers)} layers, {sum(map(len, ladders.values()))} rungs, {len(model.graph.node)} nodes after rewrite"
    """,
}

RUNNER = """
import resource, time, json
started = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - started,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "detail": detail}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as runs:
        for name, body in CASES.items():
            code = RUNNER.format(body=textwrap.dedent(body))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={"EXPLORER_RUNS": runs, "PATH": "/usr/bin:/bin"}, check=True)
            results.append({"case": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    print("| case | seconds | peak memory (MB) | detail |\n| --- | ---: | ---: | --- |")
    for r in results:
        print(f"| {r['case']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['detail']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
