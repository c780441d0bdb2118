"""Accuracy scoring (top-1, agreement, similarity), the cached sensitivity table, the no-data mode."""
import os

import numpy as np
import pytest
from netbuild import mlp, random_inputs, small_cnn

from explorer.accuracy import NOT_MEASURED, AccuracyScorer, rungs_within_bound, sensitivity_table
from explorer.compress import Compressor, decision_for, full_rank_plan
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.sessions import run_model, scoring_threads, worker_environment


def _labelled(model, count=200, seed=1):
    """Inputs labelled by the model itself, with 10% of the labels flipped (so top-1 is 0.9)."""
    x = random_inputs(model, count, seed)
    y = run_model(model, x).argmax(1)
    flip = np.arange(0, count, 10)
    y[flip] = (y[flip] + 1) % 10
    return Dataset(x, y, "test data")


def test_top1_agreement_and_similarity_metrics():
    model = small_cnn()
    labelled = _labelled(model)
    scorer = AccuracyScorer(model, labelled)
    assert scorer.metric == "top1" and scorer.baseline.value == pytest.approx(0.9)
    unlabelled = AccuracyScorer(model, Dataset(labelled.x, None, "x only"))
    assert unlabelled.metric == "agreement" and unlabelled.baseline.value == 1.0
    regressor = mlp(sizes=(64, 32, 16, 1))
    similarity = AccuracyScorer(regressor, Dataset(random_inputs(regressor, 50), None, "x only"))
    assert similarity.metric == "similarity" and similarity.baseline.value == pytest.approx(1.0)


def test_compression_lowers_measured_accuracy():
    model = small_cnn()
    graph = LayerGraph(model)
    compressor = Compressor(graph)
    scorer = AccuracyScorer(graph.model, _labelled(graph.model))
    layer = graph.layers[4]  # the large fully connected layer
    lowest = compressor.ladder(layer.name)[1]
    compressed = compressor.rewrite(full_rank_plan(graph).with_decision(layer.name, decision_for(lowest)))
    result = scorer.score(compressed)
    assert result.measured and scorer.drop(result) > 0.05
    assert "top1" in result.describe()


def test_no_data_mode_says_accuracy_was_not_measured():
    graph = LayerGraph(small_cnn())
    scorer = AccuracyScorer(graph.model, None)
    result = scorer.score(graph.model)
    assert not result.measured and result.describe() == NOT_MEASURED and scorer.drop(result) is None
    compressor = Compressor(graph)
    with pytest.raises(ExplorerError, match="needs validation data"):
        sensitivity_table(graph, compressor, scorer)
    layer = graph.layers[4].name
    allowed = rungs_within_bound(compressor, layer, bound=0.7)
    assert allowed[0].method == "full"
    assert all(r.rel_error <= 0.7 for r in allowed)
    assert len(allowed) < len(compressor.ladder(layer))


def test_run_model_respects_a_fixed_batch_size():
    model = small_cnn()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    x = random_inputs(model, 10)
    out = run_model(model, x)
    assert out.shape == (10, 10)
    np.testing.assert_allclose(out[:4], run_model(model, x[:4]), rtol=1e-5)


def test_sensitivity_table_is_cached_and_keyed_by_data():
    graph = LayerGraph(mlp())
    compressor = Compressor(graph)
    data = _labelled(graph.model, 300)
    scorer = AccuracyScorer(graph.model, data)
    calls = []
    table = sensitivity_table(graph, compressor, scorer, progress=lambda done, total: calls.append((done, total)))
    expected = sum(len(compressor.ladder(layer.name)) * 3 - 1 for layer in graph.layers)
    assert not table.from_cache and len(table.drops) == expected and calls[-1] == (expected, expected)
    layer = graph.layers[0]
    lowest = compressor.ladder(layer.name)[1]
    assert table.drop(layer.name, lowest.method, lowest.rank, "fp32") > 0.0
    assert table.drop(layer.name, "full", None, "fp32") == 0.0
    again = sensitivity_table(graph, compressor, scorer)
    assert again.from_cache and again.drops == table.drops
    other = AccuracyScorer(graph.model, _labelled(graph.model, 300, seed=7))
    assert not sensitivity_table(graph, compressor, other).from_cache


def test_cache_survives_a_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path))
    graph = LayerGraph(mlp())
    compressor = Compressor(graph)
    scorer = AccuracyScorer(graph.model, _labelled(graph.model, 100))
    sensitivity_table(graph, compressor, scorer)
    [path] = (tmp_path / "cache" / "sensitivity").glob("*.json")
    path.write_text('{"version": 1, "metr')  # as if a writer had been killed mid-way without atomic rename
    table = sensitivity_table(graph, compressor, scorer)
    assert not table.from_cache and table.drops
    assert sensitivity_table(graph, compressor, scorer).from_cache


def test_sensitivity_entries_equal_whole_model_scores():
    """The table runs only the layers after the compressed one; that must not change any number."""
    graph = LayerGraph(small_cnn())
    compressor = Compressor(graph)
    data = _labelled(graph.model, 300)
    scorer = AccuracyScorer(graph.model, data)
    table = sensitivity_table(graph, compressor, scorer)
    from explorer.accuracy import calibration_inputs
    from explorer.precision import calibration_ranges
    x_calibration, _ = calibration_inputs(graph, data)
    for layer in graph.layers[1::2]:
        for rung in compressor.ladder(layer.name)[:2]:
            for precision in ("fp16", "int8"):
                plan = full_rank_plan(graph).with_decision(layer.name, decision_for(rung, precision))
                fp32 = compressor.rewrite(full_rank_plan(graph).with_decision(layer.name, decision_for(rung)))
                model = compressor.rewrite(plan, ranges=calibration_ranges(fp32, x_calibration))
                whole = scorer.drop(scorer.score(model))
                assert table.drop(layer.name, rung.method, rung.rank, precision) == pytest.approx(whole, abs=1e-9)


def test_scoring_threads_come_from_the_environment_and_do_not_change_outputs(monkeypatch):
    model = small_cnn()
    x = random_inputs(model, 64)
    default = run_model(model, x)
    monkeypatch.setenv("EXPLORER_SCORING_THREADS", "1")
    assert scoring_threads() == 1
    assert np.array_equal(run_model(model, x), default)
    monkeypatch.setenv("EXPLORER_SCORING_THREADS", "two")
    with pytest.raises(ExplorerError, match="EXPLORER_SCORING_THREADS='two' is not a whole number"):
        run_model(model, x)


def test_workers_share_the_cores_for_scoring_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("EXPLORER_SCORING_THREADS", raising=False)
    assert worker_environment(2, cores=8)["EXPLORER_SCORING_THREADS"] == "4"
    assert worker_environment(3, cores=8)["EXPLORER_SCORING_THREADS"] == "2"
    assert worker_environment(4, cores=2)["EXPLORER_SCORING_THREADS"] == "1"  # never 0 (0 means one per core)
    assert "EXPLORER_SCORING_THREADS" not in os.environ  # the caller's environment is left as it was
    monkeypatch.setenv("EXPLORER_SCORING_THREADS", "3")
    assert worker_environment(2, cores=8)["EXPLORER_SCORING_THREADS"] == "3"


def test_sensitivity_table_resumes_after_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C after k entries keeps them; the next run measures only the rest and gives the same table."""
    graph = LayerGraph(mlp())
    compressor = Compressor(graph)
    scorer = AccuracyScorer(graph.model, _labelled(graph.model, 100))
    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path / "uninterrupted"))
    reference = sensitivity_table(graph, compressor, scorer)
    total, stop_after = len(reference.drops), 5

    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path / "interrupted"))
    real_score = scorer.score_outputs
    calls = []

    def interrupting(outputs):
        if len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(1)
        return real_score(outputs)

    monkeypatch.setattr(scorer, "score_outputs", interrupting)
    with pytest.raises(KeyboardInterrupt):
        sensitivity_table(graph, compressor, scorer)
    assert not list((tmp_path / "interrupted" / "cache" / "sensitivity").glob("*.json"))  # no table yet
    counted = []
    monkeypatch.setattr(scorer, "score_outputs", lambda outputs: counted.append(1) or real_score(outputs))
    reports = []
    resumed = sensitivity_table(graph, compressor, scorer, progress=lambda done, total: reports.append((done, total)))
    assert len(counted) == total - stop_after  # only the remainder was measured
    assert reports[0] == (stop_after, total) and reports[-1] == (total, total)
    assert resumed.drops == reference.drops and resumed.flips == reference.flips
    assert list(resumed.drops) == list(reference.drops)  # same order, however resumed
    assert not list((tmp_path / "interrupted" / "cache" / "sensitivity").glob("*.partial.jsonl"))
    assert sensitivity_table(graph, compressor, scorer).from_cache
