"""benchmarks/search_quality.py --from-json: results of separate processes merged into one table that
says which reference searches the best known comes from."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"model": "vgg", "measurer": "sim", "objective": "energy", "budgets": [10, 30], "max_accuracy_drop": 0.01,
            "latency_factor": 1.25, "latency_ms": None}
BASELINE = {"processor": "cpu", "latency_ms": 1.0, "energy_mj": 3.0, "memory_mb": 1.0}


def _summary(agent: str, budget: int, objective: float | None) -> dict:
    return {"agent": agent, "budget": budget, "objective": objective, "latency_ms": objective and 0.9,
            "energy_mj": objective, "accuracy_drop": objective and 0.005, "plan": None}


def _board(reference: dict | None, searched: dict, runs: list[dict], binds: dict | None = None) -> dict:
    return {"latency_budget_ms": 1.25, "baseline": BASELINE, "reference": reference, "latency_budget_binds": binds,
            "median_ratio": None, "feasible_seeds": None, "reference_searches": searched, "runs": runs}


def _run(agent: str, seed: int, curve: list[float | None]) -> dict:
    return {"agent": agent, "seed": seed, "budget": len(curve), "evaluations": len(curve), "feasible": 1, "seconds": 1.0,
            "best_at": {}, "best_so_far": curve, "best_plan_digest": None}


def _merged(tmp_path: Path, files: dict[str, dict]) -> str:
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_quality.py"), "--from-json", *files],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_merge_lists_the_reference_searches_and_rechecks_the_latency_evidence(tmp_path):
    seeds = {"settings": {**SETTINGS, "seeds": [0, 1], "agents": ["ppo", "random"], "reference_budget": 30},
             "boards": {"tegra-k1": _board(_summary("ppo", 30, 2.6), {"30": {"ppo": _summary("ppo", 30, 2.6),
                                                                              "random": _summary("random", 30, None)}},
                                           [_run("ppo", 0, [None] + [2.6] * 29), _run("ppo", 1, [2.8] * 30),
                                            _run("random", 0, [None] * 30), _run("random", 1, [None] * 30)])}}
    # a reference-only run whose best is worse than the merged best: its latency evidence (2.55 < its own
    # best 2.7) does not beat the merged best of 2.5 below, so the merged table must not claim the budget binds
    ppo_10x = {"settings": {**SETTINGS, "seeds": [], "agents": ["ppo"], "reference_budget": 300},
               "boards": {"tegra-k1": _board(_summary("ppo", 300, 2.7), {"300": {"ppo": _summary("ppo", 300, 2.7)}}, [],
                                             binds={"objective": 2.55, "latency_ms": 1.4})}}
    random_10x = {"settings": {**SETTINGS, "seeds": [], "agents": ["random"], "reference_budget": 300},
                  "boards": {"tegra-k1": _board(_summary("random", 300, 2.5),
                                                {"300": {"random": {**_summary("random", 300, 2.5), "found_at": 120}}},
                                                [])}}
    out = _merged(tmp_path, {"seeds.json": seeds, "ppo-10x.json": ppo_10x, "random-10x.json": random_10x})
    assert "Best known: 2.5 (random, budget 300" in out
    # files from before `found_at` was kept (ppo's here) still merge
    assert "Reference searches at 300 evaluations (seed 0): ppo 2.7, random 2.5 (found at evaluation 120)." in out
    assert "Latency budget: not shown to bind" in out
    assert "| ppo | not run | 1.080 |" in out  # median of 2.6 and 2.8 relative to 2.5 (ppo runs serve their budget only)


def test_the_merge_names_the_agents_without_a_reference_search(tmp_path):
    seeds = {"settings": {**SETTINGS, "seeds": [0], "agents": ["ppo", "random"], "reference_budget": 30},
             "boards": {"tegra-k1": _board(_summary("ppo", 30, 2.6), {"30": {"ppo": _summary("ppo", 30, 2.6),
                                                                              "random": _summary("random", 30, None)}},
                                           [_run("ppo", 0, [2.6] * 30), _run("random", 0, [None] * 30)])}}
    random_10x = {"settings": {**SETTINGS, "seeds": [], "agents": ["random"], "reference_budget": 300},
                  "boards": {"tegra-k1": _board(None, {"300": {"random": _summary("random", 300, None)}}, [])}}
    out = _merged(tmp_path, {"seeds.json": seeds, "random-10x.json": random_10x})
    assert "Reference searches at 300 evaluations (seed 0): random none feasible; not run: ppo." in out


def test_the_merge_counts_a_search_stopped_early_for_the_best_known_and_says_so(tmp_path):
    seeds = {"settings": {**SETTINGS, "seeds": [0], "agents": ["ppo"], "reference_budget": 30},
             "boards": {"tegra-k1": _board(_summary("ppo", 30, 2.6), {"30": {"ppo": _summary("ppo", 30, 2.6)}},
                                           [_run("ppo", 0, [2.6] * 30)])}}
    stopped_at = {"agent": "ppo", "seed": 0, "budget": 300, "evaluations": 250, "found_at": 240, "partial": True}
    earlier = {**_summary("ppo", 300, 2.55), **stopped_at, "evaluations": 200, "found_at": 150}
    later = {**_summary("ppo", 300, 2.5), **stopped_at}
    partial = [{"settings": {**SETTINGS, "seeds": [], "agents": ["ppo"], "reference_budget": 300},
                "boards": {"tegra-k1": {**_board(found, {"300": {}}, []), "partial_searches": [found]}}}
               for found in (earlier, later)]
    out = _merged(tmp_path, {"seeds.json": seeds, "ppo-10x-a.json": partial[0], "ppo-10x-b.json": partial[1]})
    assert "Best known: 2.5 (ppo seed 0, stopped at 250 of 300 evaluations, 0.900 ms" in out
    # the same search stopped twice is listed once, as it was when stopped the later time
    assert out.count("Stopped early") == 1
    assert ("Stopped early (a known plan, not a reference): ppo seed 0, 250 of 300 evaluations, best 2.5 (found at "
            "evaluation 240).") in out
    assert "| ppo | not run | 1.040 |" in out
