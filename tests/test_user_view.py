"""What a user sees at the edges of the command line: the version, the next command printed, where a
calibrated profile is used from, the exit status of an infeasible measurement."""
import re
import tomllib
from pathlib import Path

import pytest

from explorer import __version__
from explorer.cli import main
from explorer.entry import main as entry_main

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_package_version(capsys):
    assert entry_main(["--version"]) == 0
    out = capsys.readouterr().out
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.strip() == f"explorer {declared}" == f"explorer {__version__}"
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == out.strip()


def test_calibrate_to_another_path_says_to_use_that_path(capsys, monkeypatch, tmp_path):
    import explorer.calibrate

    out_path = tmp_path / "mine.toml"
    monkeypatch.setattr(explorer.calibrate, "calibrate_host", lambda path, quick, progress: path)
    assert main(["calibrate", "--quick", "--out", str(out_path)]) == 0
    assert f"use it with --board {out_path}" in capsys.readouterr().out


def test_an_infeasible_measurement_exits_1_and_names_the_limit(capsys):
    code = main(["measure", "--board", "tegra-k1", "--model", "vgg", "--latency-ms", "0.001"])
    out = capsys.readouterr().out
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("infeasible:") and re.search(r"latency .* > .*0\.001", last), last


def test_the_printed_export_command_uses_the_runs_folder(capsys, monkeypatch, tmp_path):
    import onnx
    from netbuild import small_cnn

    model = tmp_path / "small.onnx"
    onnx.save(small_cnn(), model)
    runs = tmp_path / "elsewhere"
    monkeypatch.setenv("EXPLORER_RUNS", str(runs))
    assert main(["search", "--board", "tegra-k1", "--model", str(model), "--agent", "random", "--budget", "3"]) == 0
    out, err = capsys.readouterr()
    line = next(line for line in out.splitlines() if line.startswith("export the best plan:"))
    assert f"--out {runs / 'bundles'}" in line
    # 3 evaluations are all reference plans (tegra-k1 has 8): the search says the agent got no turn
    assert "--budget 3 leaves random no plan of its own" in " ".join(err.split())


def test_a_search_says_its_changes_limits_and_processors_and_tags_its_run(capsys, monkeypatch, tmp_path):
    """The summary gives each row's change against the baseline in percent, the limits and how close the
    best plan comes, what each processor id is; the parent run has tags and the summary as its description;
    --json puts one object on stdout."""
    import json

    import onnx
    from netbuild import small_cnn

    from explorer.tracking import default_tracking_uri, read_search

    model = tmp_path / "small.onnx"
    onnx.save(small_cnn(), model)
    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path / "runs"))
    assert main(["search", "--board", "tegra-k1", "--model", str(model), "--agent", "random", "--budget", "10",
                 "--max-accuracy-drop", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert "constraints (the best plan):" in err and "accuracy drop <= 2 pts: " in err and "pts below the limit" in err
    assert "lpc: Low-power companion" in err and "(+N%): change against the fp32 baseline" in err
    assert re.search(r"\d\.\d{3} \([+-]\d+%\)", err)  # a figure with its change against the baseline
    assert data["constraints"] == {"latency_ms": 5000.0, "memory_mb": None, "max_accuracy_drop_points": 2.0}
    assert data["best"]["accuracy_drop_points"] <= 2 and data["evaluations"] == 10
    assert data["export_command"].startswith(f"explorer export --run {data['run_id']}")
    parent = read_search(default_tracking_uri(), data["run_id"]).parent
    tags = parent.data.tags
    assert {k: tags[k] for k in ("model", "board", "agent", "objective")} == {
        "model": "small", "board": "tegra-k1", "agent": "random", "objective": "energy"}
    assert tags["measured_by"].startswith("sim")
    note = tags["mlflow.note.content"]
    assert note.startswith("# random search") and "change against the fp32 baseline" in note and "- lpc:" in note
    assert "accuracy drop <= 2 pts" in note
    metrics = parent.data.metrics
    assert metrics["best_accuracy_drop_points"] == pytest.approx(data["best"]["accuracy_drop_points"])
    assert "best_accuracy_drop" not in metrics and 0 < metrics["best_accuracy_percent"] <= 100


def test_measure_takes_a_bundles_plan_json(capsys, tmp_path):
    """`explorer measure --plan BUNDLE/plan.json` measures the bundle's plan (it read 'missing decisions')."""
    plan = tmp_path / "plan.json"
    assert main(["solve", "--board", "tegra-k1", "--model", "vgg", "--max-accuracy-drop", "1", "--out", str(plan)]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", "--board", "tegra-k1", "--model", "vgg", "--plan", str(plan), "--out", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["measure", "--board", "tegra-k1", "--model", "vgg", "--plan", str(bundle / "plan.json")]) == 0
    assert "feasible" in capsys.readouterr().out
