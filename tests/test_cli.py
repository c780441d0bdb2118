"""The command line: each command runs, and bad input gets one line and exit status 2."""
import json

import numpy as np
import pytest

from explorer.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_inspect_boards(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "vgg16-imagenet" in out and "untrained" in out
    code, out, _ = run(capsys, "inspect", "--model", "vgg")
    assert code == 0 and "conv5_3" in out and "fc3" in out and "spatial:" in out
    code, out, _ = run(capsys, "boards")
    assert code == 0 and "tegra-k1" in out and "snapdragon-800" in out
    code, out, _ = run(capsys, "boards", "tegra-k1")
    assert code == 0 and "CUDA" in out and "gpu" in out


def test_measure_and_solve_on_the_simulated_board(capsys, tmp_path):
    code, out, _ = run(capsys, "measure", "--board", "tegra-k1", "--model", "vgg")
    assert code == 0 and "simulated" in out and "feasible" in out
    plan_path = tmp_path / "plan.json"
    code, out, _ = run(capsys, "solve", "--board", "tegra-k1", "--model", "vgg", "--latency-ms", "250",
                       "--max-accuracy-drop", "1", "--out", str(plan_path))
    assert code == 0 and "baseline" in out and "solver round 1" in out
    plan = json.loads(plan_path.read_text())
    assert len(plan["decisions"]) == 16
    code, out, _ = run(capsys, "measure", "--board", "tegra-k1", "--model", "vgg", "--plan", str(plan_path))
    assert code == 0 and "block" in out


def test_rewrite_writes_a_model_and_scores_it(capsys, tmp_path):
    from explorer.compress import Compressor, decision_for, full_rank_plan
    from explorer.zoo import load_graph

    graph = load_graph("vgg")
    compressor = Compressor(graph)
    plan = full_rank_plan(graph).with_decision("fc2", decision_for(compressor.ladder("fc2")[1], "int8"))
    plan.save(tmp_path / "plan.json")
    code, out, _ = run(capsys, "rewrite", "--model", "vgg", "--plan", str(tmp_path / "plan.json"),
                       "--out", str(tmp_path / "m.onnx"))
    assert code == 0 and (tmp_path / "m.onnx").exists() and "top1" in out and "int8 calibrated on 128 validation samples" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--model", "nothere.onnx"], "not found"),
    (["inspect", "--model", "vgg17"], "did you mean 'vgg'"),
    (["measure", "--board", "tegra-k2"], "did you mean 'tegra-k1'"),
    (["measure", "--model", "vgg", "--objective", "speed"], "unknown objective"),
    (["measure", "--model", "vgg", "--plan", "missing.json"], "plan file not found"),
    (["solve", "--model", "vgg", "--latency-ms", "0.001"], "the fastest plan takes"),
    (["measure", "--model", "vgg", "--measure", "gpu"], "unknown measurer"),
    (["measure", "--model", "vgg", "--measure", "host"], "needs CUDAExecutionProvider"),
])
def test_bad_input_gets_one_line_and_status_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3  # rich may wrap one long line


def test_data_with_the_wrong_shape_is_refused(capsys, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 32, 32), np.float32))
    code, _, err = run(capsys, "inspect", "--model", "vgg", "--data", str(tmp_path / "bad.npz"))
    assert code == 2 and "does not match the model input" in err


def test_sensitivity_resumes_after_ctrl_c(capsys, tmp_path, monkeypatch):
    import onnx
    from netbuild import mlp, random_inputs

    from explorer.accuracy import AccuracyScorer

    model = mlp()
    onnx.save(model, tmp_path / "mlp.onnx")
    np.savez(tmp_path / "val.npz", x=random_inputs(model, 64))
    argv = ("sensitivity", "--model", str(tmp_path / "mlp.onnx"), "--data", str(tmp_path / "val.npz"))
    real_score, calls = AccuracyScorer.score_outputs, []

    def interrupting(self, outputs):
        calls.append(1)
        if len(calls) == 4 + 1:  # the baseline, then 3 entries, then Ctrl-C
            raise KeyboardInterrupt
        return real_score(self, outputs)

    monkeypatch.setattr(AccuracyScorer, "score_outputs", interrupting)
    code, _, err = run(capsys, *argv)
    assert code == 130 and "3 of" in err and "run the same command again" in err
    monkeypatch.setattr(AccuracyScorer, "score_outputs", real_score)
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "measured now" in out


def test_json_output_is_one_object_in_points(capsys, tmp_path):
    """--json: stdout is one JSON object (the tables went to stderr), accuracy in percent and drops in points."""
    code, out, err = run(capsys, "measure", "--board", "tegra-k1", "--model", "vgg", "--json")
    assert code == 0 and "block" in err and "┃" not in out
    data = json.loads(out)
    e = data["evaluation"]
    assert data["command"] == "measure" and e["feasible"] and e["accuracy_percent"] == pytest.approx(92.5)
    assert e["accuracy_drop_points"] == 0 and data["constraints"]["max_accuracy_drop_points"] == 5
    assert len(data["plan"]["decisions"]) == 16 and data["blocks"]
    code, out, err = run(capsys, "solve", "--board", "tegra-k1", "--model", "vgg", "--max-accuracy-drop", "1", "--json")
    assert code == 0 and "solver round 1" in err
    data = json.loads(out)
    assert data["command"] == "solve" and data["constraints"]["max_accuracy_drop_points"] == 1
    baseline = data["rows"][0]
    assert baseline["change_vs_baseline_percent"] == {"latency_ms": 0.0, "energy_mj": 0.0, "memory_mb": 0.0}
    chosen = data["evaluation"]
    assert chosen["accuracy_drop_points"] <= 1 and chosen["change_vs_baseline_percent"]["energy_mj"] == pytest.approx(
        100 * (chosen["energy_mj"] / baseline["energy_mj"] - 1))
    assert "processors:" in err and "lpc: Low-power companion" in err  # what each processor id is
    code, out, _ = run(capsys, "measure", "--board", "tegra-k1", "--model", "vgg")  # without --json: tables on stdout
    assert code == 0 and "block" in out
