"""Cost-model fidelity on this machine: predicted against measured latency of held-out random plans, per unit block
and per whole plan, for the roofline model, the measured kernel table and the predictor on a model it never saw.

    PYTHONPATH=. .venv/bin/python benchmarks/cost_model_fidelity.py [--models vgg,dnn,cnn] [--plans 24] [--design-seeds 0,1]
        [--json F]

Needs the `host` board (`explorer calibrate`). For each model: its kernel table is profiled on this machine
(`explorer profile`: designed plans, resumed from the store when they were measured before; the profiling time is
what this run spent), then `--plans` random plans (seeded, never part of the fit) are measured and compared with
* the roofline model (the board profile's peaks, bandwidths and launch overheads; additive over layers),
* the kernel table (explorer.kernels: layer, merge, pair and edge terms),
* the predictor (explorer.predictor) fitted only to the tables of the other models (train on two, test on the
  third),
and measured a second time, the repeatability floor: the share of blocks and plans whose second measurement lies
within +/-10 % of the first (no model can be surer than the device is repeatable). Every plan is measured as the
table's plans are (explorer.kernels.measure_paired): interleaved with the model's reference plan, its blocks' times
over the reference's in the same rounds, at the reference's typical time; the absolute times' repeatability is
reported beside it. Reported: the share of blocks and of plans within +/-10 % and +/-25 %, and the median of
predicted/measured.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.common import error_shares, markdown_table, write_json, zoo_problem
from explorer.cost import CostModel
from explorer.kernels import KernelCostModel, KernelStore, Paired, check, measure_paired, profile, warm_up
from explorer.predictor import KernelPredictor
from explorer.problem import Problem


def roofline_errors(problem: Problem, plans, measurements: list, typical: dict[str, float]) -> tuple[list[float], list[float]]:
    """Roofline predictions (blocks: the sum of their layers and of the transfers into them) against the paired
    measurements at the device's typical speed (`typical`: the reference plan's typical seconds per processor)."""
    model = CostModel(problem.board, problem.graph, problem.compressor)
    blocks, whole = [], []
    for plan, measured in zip(plans, measurements):
        if not isinstance(measured, Paired):
            continue
        predicted_total = model.plan_cost(plan).latency_s
        index = 0
        at_typical = measured.blocks_at(typical)
        for block, measured_s in zip(measured.measurement.blocks, at_typical):
            seconds = 0.0
            for name in block.layers:
                decision = plan[name]
                rung = problem.compressor.rung(name, decision.method, decision.rank)
                seconds += model.layer_cost(problem.graph.layer_by_name[name], rung, decision.precision,
                                            decision.placed_processor).latency_s
                if index:
                    seconds += model.boundary(index - 1, plan.decisions[index - 1][1], decision)[0]
                index += 1
            blocks.append(seconds / measured_s - 1)
        whole.append(predicted_total / sum(at_typical) - 1)
    return blocks, whole


def evaluate(models: list[str], plans_count: int, seed: int, design_seeds: list[int]) -> list[dict]:
    problems = {name: zoo_problem(name, "host", measure="host", latency_ms=None, max_accuracy_drop_points=None)
                for name in models}
    fingerprints = {name: problem.graph.fingerprint() for name, problem in problems.items()}
    profiled = {}
    for name, problem in problems.items():
        print(f"{name}: profiling (designed plans)", file=sys.stderr)
        started = time.monotonic()
        results = [profile(problem, seed=design_seed) for design_seed in design_seeds]
        profiled[name] = (results, time.monotonic() - started)
    records = []
    for name, problem in problems.items():
        results, profile_s = profiled[name]
        store = KernelStore(problem.measurer.device(problem.board))  # read again: every model's profile is in it now
        table = store.table()
        rng = np.random.default_rng(seed + 1000)
        plans = [problem.random_plan(rng) for _ in range(plans_count)]
        print(f"{name}: {plans_count} held-out random plans, the kernel table", file=sys.stderr)
        table_model = KernelCostModel(problem.board, problem.graph, problem.compressor, table)
        table_check = check(problem, table_model, plans)
        others = {fingerprints[m] for m in models if m != name}
        unseen = store.table(models=others)
        unseen.references[fingerprints[name]] = table.references[fingerprints[name]]  # the device's speed, not kernels
        predictor = KernelPredictor.from_table(unseen)
        predicted_model = KernelCostModel(problem.board, problem.graph, problem.compressor, unseen, predictor)
        print(f"{name}: the predictor trained on {', '.join(m for m in models if m != name)}", file=sys.stderr)
        predictor_check = check(problem, predicted_model, plans)
        print(f"{name}: measuring the plans twice (repeatability, roofline)", file=sys.stderr)
        warm_up(problem)
        first, second = measure_paired(problem, plans), measure_paired(problem, plans)
        both = [(m, n) for m, n in zip(first, second) if isinstance(m, Paired) and isinstance(n, Paired)]
        repeat_blocks = [a / b - 1 for m, n in both for a, b in zip(m.block_ratios, n.block_ratios)]
        typical = table.references[fingerprints[name]]
        repeat_plans = [sum(m.blocks_at(typical)) / sum(n.blocks_at(typical)) - 1 for m, n in both]
        raw_blocks = [a.latency_ms / b.latency_ms - 1 for m, n in both
                      for a, b in zip(m.measurement.blocks, n.measurement.blocks)]
        raw_plans = [m.measurement.latency_ms / n.measurement.latency_ms - 1 for m, n in both]
        roof_blocks, roof_plans = roofline_errors(problem, plans, first, typical)
        counts = table.counts()
        records.append({
            "model": name, "plans": plans_count, "profile_seconds": profile_s, "design_seeds": design_seeds,
            "plans_profiled": sum(r.measured for r in results), "plans_recalled": sum(r.recalled for r in results),
            "terms": counts, "fallback_terms_predictor": predictor_check.fallback_terms,
            "speeds": table_check.speeds,
            "roofline": {"blocks": error_shares(roof_blocks), "plans": error_shares(roof_plans)},
            "table": {"blocks": error_shares(table_check.block_errors), "plans": error_shares(table_check.plan_errors)},
            "predictor": {"blocks": error_shares(predictor_check.block_errors),
                          "plans": error_shares(predictor_check.plan_errors), "trained_on": [m for m in models if m != name]},
            "repeat": {"blocks": error_shares(repeat_blocks), "plans": error_shares(repeat_plans)},
            "repeat_absolute": {"blocks": error_shares(raw_blocks), "plans": error_shares(raw_plans)},
        })
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg,dnn,cnn", help="zoo models (the predictor of each is trained on the others)")
    parser.add_argument("--plans", type=int, default=24, help="held-out random plans per model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out plans (+1000)")
    parser.add_argument("--design-seeds", default="0",
                        help="profile each model with these design seeds (explorer profile --seed): more observations per term")
    parser.add_argument("--json")
    args = parser.parse_args()
    records = evaluate(args.models.split(","), args.plans, args.seed, [int(s) for s in args.design_seeds.split(",")])

    def cell(r: dict, what: str, level: str, key: str) -> str:
        return f"{100 * r[what][level][key]:.0f}%"

    rows = []
    for r in records:
        for what in ("roofline", "table", "predictor", "repeat", "repeat_absolute"):
            trained_on = "+".join(r["predictor"]["trained_on"])
            label = {"repeat": "measured again (floor)", "predictor": f"predictor (trained on {trained_on})",
                     "repeat_absolute": "measured again, absolute times"}.get(what, what)
            rows.append([r["model"], label, r["table"]["blocks"]["n"], cell(r, what, "blocks", "within_10"),
                         cell(r, what, "blocks", "within_25"), cell(r, what, "plans", "within_10"),
                         cell(r, what, "plans", "within_25"), f"{r[what]['plans']['median_ratio']:.2f}"])
    print(markdown_table(["model", "prediction", "blocks", "blocks within 10%", "blocks within 25%", "plans within 10%",
                          "plans within 25%", "median predicted/measured (plans)"], rows))
    print()
    print(markdown_table(["model", "profiling time", "designed plans measured (before)", "terms (layer/merge/pair/edge)"],
                         [[r["model"], f"{r['profile_seconds']:.0f} s", f"{r['plans_profiled']} ({r['plans_recalled']})",
                           "/".join(str(r["terms"][k]) for k in ("layer", "merge", "pair", "edge"))] for r in records]))
    write_json(args.json, records)


if __name__ == "__main__":
    main()
