"""No data, no false promises: accuracy estimated on seeded synthetic inputs, labelled so everywhere."""
import json
import re

import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient
from netbuild import lenet5, mlp, random_inputs, small_cnn

from explorer.accuracy import SYNTHETIC_LABEL, UNLABELLED_LABEL, AccuracyScorer
from explorer.boards import load_board
from explorer.cli import main
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.measure import SimMeasurer
from explorer.plan import Plan
from explorer.problem import Constraints, Problem
from explorer.synthetic import SyntheticInputs, synthetic_dataset
from explorer.tracking import read_search

# a drop shown as zero: "+0.00", "-0.00", "drop 0.00" (an unmeasured figure must never read so)
ZERO_DROP = re.compile(r"(?<![\d.])[+-]0\.00(?!\d)|drop 0\.00(?!\d)")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


def test_synthetic_inputs_parse_and_refuse_what_is_not_a_distribution():
    assert SyntheticInputs.parse(None) == SyntheticInputs.parse("normal") == SyntheticInputs("normal", 0.0, 1.0)
    assert SyntheticInputs.parse("uniform:0,255") == SyntheticInputs("uniform", 0.0, 255.0)
    assert SyntheticInputs.parse("normal:0.5,0.2").describe() == "normal (mean 0.5, std 0.2)"
    for bad, message in (("gauss", "not a distribution"), ("uniform:1", "not a distribution"),
                         ("uniform:3,1", "LO must be below HI"), ("normal:0,0", "above 0"), ("normal:nan,1", "not a")):
        with pytest.raises(ExplorerError, match=message):
            SyntheticInputs.parse(bad)


def test_synthetic_data_is_seeded_typed_and_shaped():
    graph = LayerGraph(small_cnn())
    first, again, other = synthetic_dataset(graph), synthetic_dataset(graph), synthetic_dataset(graph, seed=1)
    assert first.synthetic and first.y is None and first.x.dtype == np.float32
    assert first.x.shape == (256, *graph.feed_shape()[1:])
    np.testing.assert_array_equal(first.x, again.x)
    assert not np.array_equal(first.x, other.x)
    assert "synthetic standard normal" in first.source
    uniform = synthetic_dataset(graph, SyntheticInputs.parse("uniform:0,255"))
    assert uniform.x.min() >= 0 and uniform.x.max() <= 255 and uniform.x.std() > 50
    fixed = synthetic_dataset(LayerGraph(lenet5(batch=10)))  # whole batches of a fixed batch
    assert len(fixed.x) % 10 == 0 and fixed.x.shape[1:] == (1, 28, 28)
    # integer inputs take whole numbers in the range, and need one
    assert SyntheticInputs.parse("uniform:0,9").draw((50,), np.dtype(np.int64), np.random.default_rng(0)).max() <= 9
    with pytest.raises(ExplorerError, match="uniform:LO,HI"):
        SyntheticInputs().draw((5,), np.dtype(np.int64), np.random.default_rng(0))


def test_scores_on_synthetic_inputs_are_labelled_estimates_and_digested():
    graph = LayerGraph(small_cnn())
    data = synthetic_dataset(graph)
    scorer = AccuracyScorer(graph.model, data)
    assert scorer.synthetic and scorer.metric == "agreement" and scorer.basis == SYNTHETIC_LABEL
    assert SYNTHETIC_LABEL in scorer.label and "classes" in scorer.label
    assert SYNTHETIC_LABEL in scorer.baseline.describe()
    real = AccuracyScorer(graph.model, Dataset(data.x, None, "same bytes, real"))
    assert real.basis == UNLABELLED_LABEL and real.data_digest() != scorer.data_digest()  # cache keys keep them apart
    assert AccuracyScorer(graph.model, synthetic_dataset(graph, seed=2)).data_digest() != scorer.data_digest()


def test_similarity_is_one_minus_relative_error_so_a_wrong_scale_counts():
    regressor = mlp(sizes=(64, 32, 16, 1))
    scorer = AccuracyScorer(regressor, Dataset(random_inputs(regressor, 50), None, "x only"))
    assert scorer.metric == "similarity" and scorer.baseline.value == pytest.approx(1.0)
    doubled = scorer.score_outputs(2 * scorer.reference_outputs)  # same direction, twice the size
    assert doubled.value == pytest.approx(0.0) and "cosine 1.000" in doubled.detail and "relative error 1.000" in doubled.detail


def _problem(constraints: Constraints, seed: int = 0) -> Problem:
    graph = LayerGraph(small_cnn())
    return Problem(graph, load_board("tegra-k1"), SimMeasurer(seed=seed),
                   AccuracyScorer(graph.model, synthetic_dataset(graph)), constraints)


def test_int8_everywhere_is_refused_by_the_synthetic_agreement_limit():
    problem = _problem(Constraints(latency_ms=None, max_accuracy_drop=0.01))
    int8 = problem.uniform_plan("cpu", "int8")
    evaluation = problem.evaluate(int8)
    assert evaluation.accuracy_drop > 0.01 and not evaluation.feasible  # the estimate limits precisions
    assert any(SYNTHETIC_LABEL in v for v in evaluation.violations)
    assert SYNTHETIC_LABEL in evaluation.accuracy_text() and evaluation.accuracy_basis == SYNTHETIC_LABEL
    # deterministic: a fresh problem (same seed, no cache in memory) scores it the same
    assert _problem(Constraints(latency_ms=None, max_accuracy_drop=0.01)).accuracy(int8) == problem.accuracy(int8)
    baseline = problem.baseline()
    assert baseline.accuracy_drop == 0 and not ZERO_DROP.search(baseline.accuracy_text())
    assert "no change seen on 256 synthetic inputs" in baseline.accuracy_text()


def test_no_data_solve_limits_precisions_and_labels_every_figure(capsys, cnn_file, tmp_path):
    code, out, err = run(capsys, "solve", "--model", cnn_file, "--max-accuracy-drop", "1", "--out", tmp_path / "plan.json")
    assert code == 0, err
    assert SYNTHETIC_LABEL in out and "additive accuracy estimate: " in out
    assert not [line for line in out.splitlines() if ZERO_DROP.search(line)]
    int8_rows = [line for line in out.splitlines() if line.startswith("│ whole-model int8")]
    assert int8_rows and all("│ no:" in line for line in int8_rows)  # int8 everywhere breaks the 1-point limit
    plan = Plan.load(tmp_path / "plan.json")
    assert any(d.precision != "int8" for _, d in plan.decisions)
    code, out, err = run(capsys, "measure", "--model", cnn_file, "--plan", tmp_path / "plan.json")
    assert code == 0 and f"accuracy basis: {SYNTHETIC_LABEL}" in out and not ZERO_DROP.search(out)
    again = run(capsys, "solve", "--model", cnn_file, "--max-accuracy-drop", "1", "--out", tmp_path / "again.json")
    assert again[0] == 0 and Plan.load(tmp_path / "again.json") == plan  # seeded: the same plan


def test_no_data_search_labels_mlflow_and_the_bundle(capsys, cnn_file, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run(capsys, "search", "--model", cnn_file, "--agent", "random", "--budget", 6,
                         "--max-accuracy-drop", "2", "--tracking-uri", uri)
    assert code == 0, err
    assert not [line for line in out.splitlines() if ZERO_DROP.search(line)]
    run_id = out.split("MLflow run: ")[1].split()[0]
    search = read_search(uri, run_id)
    assert SYNTHETIC_LABEL in search.parent.data.params["accuracy_basis"]
    assert "synthetic" in search.parent.data.params["data_source"]
    assert search.trials and all(t.data.tags["accuracy_basis"] == SYNTHETIC_LABEL for t in search.trials)
    summary = MlflowClient(uri).download_artifacts(run_id, "summary.md", str(tmp_path))
    text = open(summary).read()
    assert f"Accuracy: {SYNTHETIC_LABEL}" in text and not ZERO_DROP.search(text)
    code, out, err = run(capsys, "export", "--run", run_id, "--out", tmp_path / "bundle", "--tracking-uri", uri)
    assert code == 0, err
    manifest = json.loads((tmp_path / "bundle" / "plan.json").read_text())
    assert manifest["accuracy"]["measured"] is False and SYNTHETIC_LABEL in manifest["accuracy"]["basis"]
    assert "synthetic" in manifest["data"]["description"] and manifest["measured"]["accuracy_basis"] == SYNTHETIC_LABEL


def test_unlabelled_data_says_agreement_not_accuracy(capsys, cnn_file, tmp_path):
    x = random_inputs(small_cnn(), 40)
    np.savez(tmp_path / "x.npz", x=x)
    code, out, err = run(capsys, "measure", "--model", cnn_file, "--data", tmp_path / "x.npz")
    assert code == 0, err
    assert "agreement" in out and "no labels" in out and SYNTHETIC_LABEL not in out


@pytest.mark.parametrize("argv, message", [
    (["measure", "--synthetic-inputs", "gauss"], "is not a distribution"),
    (["measure", "--synthetic-inputs", "uniform:0,1", "--data", "{x}"], "not both"),
])
def test_bad_synthetic_options_get_one_line_and_status_2(capsys, cnn_file, tmp_path, argv, message):
    np.savez(tmp_path / "x.npz", x=random_inputs(small_cnn(), 4))
    code, out, err = run(capsys, *[a.format(x=tmp_path / "x.npz") for a in argv], "--model", cnn_file)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_synthetic_inputs_replace_a_zoo_models_data_when_asked(capsys):
    code, out, err = run(capsys, "measure", "--model", "vgg", "--synthetic-inputs", "normal")
    assert code == 0, err
    assert f"accuracy basis: {SYNTHETIC_LABEL}" in out and "agreement" in out


def test_an_untrained_zoo_model_is_not_scored_unless_synthetic_inputs_are_asked_for():
    """vgg16-imagenet's random weights agree with themselves whatever the plan: no figure, said so."""
    import types

    from explorer.synthetic import scoring_data
    from explorer.zoo import load_graph

    untrained = types.SimpleNamespace(source="vgg16-imagenet")
    assert scoring_data(untrained, None) is None
    graph = load_graph("vgg")  # a trained zoo model without data is estimated on synthetic inputs
    data = scoring_data(graph, None)
    assert data is not None and data.synthetic
