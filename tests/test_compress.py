"""RLC: rank ladders, exact factorised rewrites, full rank reproduces the model, precisions compose."""
import pickle

import numpy as np
import onnx
import pytest
from netbuild import mlp, random_inputs, residual_cnn, small_cnn
from onnx import numpy_helper

from explorer.compress import Compressor, decision_for, full_rank_plan
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.plan import Decision, Plan
from explorer.sessions import run_model
from explorer.zoo import load_graph, zoo_validation_data

BUILDERS = {"mlp": mlp, "small_cnn": small_cnn, "residual_cnn": residual_cnn}


def _max_rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _reconstructed_weight(compressor: Compressor, layer, method: str, rank: int) -> np.ndarray:
    """The low-rank weight the rung stands for, in the layer's original weight layout."""
    factors = compressor._svd(layer, method)
    matrix = (factors.left[:, :rank] * factors.singular[:rank]) @ factors.right[:rank]
    if layer.op_type == "Conv":
        c_out, c_in, kh, kw = layer.weight_shape
        if method == "channel":
            return matrix.reshape(layer.weight_shape)
        return matrix.reshape(c_in, kh, c_out, kw).transpose(2, 0, 1, 3)
    original = compressor.graph.constant_array(layer.weight_name)
    return matrix if matrix.shape == original.shape else matrix.T


@pytest.mark.parametrize("name", BUILDERS)
def test_full_rank_rewrite_reproduces_outputs(name):
    model = BUILDERS[name]()
    graph = LayerGraph(model)
    x = random_inputs(model, 16)
    rewritten = Compressor(graph).rewrite(full_rank_plan(graph))
    onnx.checker.check_model(rewritten, full_check=True)
    assert _max_rel_error(run_model(rewritten, x), run_model(graph.model, x)) <= 1e-4


@pytest.mark.parametrize("name", BUILDERS)
def test_every_rung_rewrites_exactly_to_its_low_rank_weights(name):
    """The factorised ONNX layers compute what the reconstructed weight matrix computes."""
    graph = LayerGraph(BUILDERS[name]())
    compressor = Compressor(graph)
    x = random_inputs(graph.model, 8)
    checked = 0
    for layer in graph.layers:
        for rung in compressor.ladder(layer.name)[1:]:
            plan = full_rank_plan(graph).with_decision(layer.name, decision_for(rung))
            rewritten = compressor.rewrite(plan)
            onnx.checker.check_model(rewritten, full_check=True)
            reference = onnx.ModelProto()
            reference.CopyFrom(graph.model)
            weight = _reconstructed_weight(compressor, layer, rung.method, rung.rank).astype(np.float32)
            for i, init in enumerate(reference.graph.initializer):
                if init.name == layer.weight_name:
                    reference.graph.initializer[i].CopyFrom(numpy_helper.from_array(weight, init.name))
            assert _max_rel_error(run_model(rewritten, x), run_model(reference, x)) <= 1e-4, rung
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("name", BUILDERS)
def test_every_offered_rung_saves_flops_or_params_and_is_a_multiple_of_8(name):
    graph = LayerGraph(BUILDERS[name]())
    compressor = Compressor(graph)
    for layer in graph.layers:
        ladder = compressor.ladder_with_errors(layer.name)
        assert ladder[0].method == "full" and ladder[0].rel_error == 0.0
        for rung in ladder[1:]:
            assert rung.flops < layer.flops or rung.params < layer.params
            assert rung.rank % 8 == 0 and 0 < rung.rel_error < 1
        errors = {}
        for rung in ladder[1:]:
            errors.setdefault(rung.method, []).append((rung.rank, rung.rel_error))
        for pairs in errors.values():  # higher rank never reconstructs worse
            ranks, errs = zip(*sorted(pairs))
            assert list(errs) == sorted(errs, reverse=True)


def test_grouped_convolution_is_kept_as_is():
    graph = LayerGraph(small_cnn())
    depthwise = graph.layers[2]
    assert Compressor(graph).ladder(depthwise.name) == Compressor(graph).ladder(depthwise.name)[:1]


def test_rewrite_size_follows_the_rung():
    graph = LayerGraph(mlp())
    compressor = Compressor(graph)
    layer = graph.layers[0]
    rung = compressor.ladder(layer.name)[1]
    rewritten = compressor.rewrite(full_rank_plan(graph).with_decision(layer.name, decision_for(rung)))
    def stored(model):
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer)

    assert stored(rewritten) == stored(graph.model) - layer.params + rung.params


def test_bad_plans_are_refused():
    graph = LayerGraph(mlp())
    compressor = Compressor(graph)
    name = graph.layers[0].name
    with pytest.raises(ExplorerError, match="not offered"):
        compressor.rewrite(full_rank_plan(graph).with_decision(name, Decision("svd", 13)))
    with pytest.raises(ExplorerError, match="unknown precision"):
        compressor.rewrite(full_rank_plan(graph).with_decision(name, Decision(precision="int4")))
    with pytest.raises(ExplorerError, match="does not match"):
        compressor.rewrite(Plan.uniform(["nope"]))


def test_plan_json_round_trip_and_stable_digest(tmp_path):
    graph = LayerGraph(mlp())
    plan = full_rank_plan(graph).with_decision(graph.layers[1].name, Decision("svd", 24, "int8", "gpu"))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan and loaded.digest() == plan.digest()
    assert plan.digest() != full_rank_plan(graph).digest()
    assert plan[graph.layers[1].name].label() == "svd:24/int8@gpu"
    # the digest is remembered per plan: equality, hashing and pickling ignore that it was computed
    fresh = Plan.load(path)
    assert fresh == plan and hash(fresh) == hash(plan) and pickle.loads(pickle.dumps(plan)).digest() == plan.digest()
    assert plan.with_decision(graph.layers[1].name, Decision()).digest() == full_rank_plan(graph).digest()


# ---- the shipped vgg -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg():
    graph = load_graph("vgg")
    data = zoo_validation_data("vgg")
    return graph, Compressor(graph), data.x[:500]


def test_vgg_full_rank_rewrite_and_random_plans(vgg):
    graph, compressor, x = vgg
    reference = run_model(graph.model, x)
    assert _max_rel_error(run_model(compressor.rewrite(full_rank_plan(graph)), x), reference) <= 1e-4
    rng = np.random.default_rng(0)
    for _ in range(3):
        decisions = {}
        for layer in graph.layers:
            ladder = compressor.ladder(layer.name)
            rung = ladder[rng.integers(len(ladder))]
            decisions[layer.name] = decision_for(rung, str(rng.choice(["fp32", "fp16", "int8"])))
        rewritten = compressor.rewrite(Plan.from_dict(decisions), x[:128])
        onnx.checker.check_model(rewritten, full_check=True)
        assert run_model(rewritten, x).shape == reference.shape


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_vgg_precision_at_full_rank_keeps_top1_agreement(vgg, precision):
    graph, compressor, x = vgg
    plan = Plan.uniform([layer.name for layer in graph.layers], Decision(precision=precision))
    rewritten = compressor.rewrite(plan, x[:128])
    onnx.checker.check_model(rewritten, full_check=True)
    agreement = np.mean(run_model(rewritten, x).argmax(1) == run_model(graph.model, x).argmax(1))
    assert agreement >= 0.99


def test_truncated_svd_through_the_gram_matrix_matches_a_full_svd():
    from explorer.compress import singular_values, truncated_svd

    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((1100, 40)) @ rng.standard_normal((40, 1300)) + 0.1 * rng.standard_normal((1100, 1300))).astype(np.float32)
    left, singular, right = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    factors = truncated_svd(matrix, 32)  # min dimension >= 1024: the Gram path
    np.testing.assert_allclose(factors.singular, singular[:32], rtol=1e-4)
    reconstruction = (factors.left * factors.singular) @ factors.right
    expected = (left[:, :32] * singular[:32]) @ right[:32]
    assert np.max(np.abs(reconstruction - expected)) <= 1e-3 * np.max(np.abs(expected))
    # eigenvalues of the float32 Gram: sigma^2 to float32 precision of the largest, what rung errors need
    np.testing.assert_allclose(singular_values(matrix) ** 2, singular**2, atol=1e-6 * singular[0] ** 2)
    np.testing.assert_allclose(singular_values(matrix)[:40], singular[:40], rtol=1e-4)  # the signal part


def test_rewrite_shared_rewrites_each_rank_and_precision_choice_once(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    compressor = Compressor(LayerGraph(small_cnn()))
    layers = [layer.name for layer in compressor.graph.layers]
    rung = compressor.ladder(layers[1])[1]
    on_cpu = Plan.uniform(layers, Decision(processor="cpu")).with_decision(
        layers[1], Decision(rung.method, rung.rank, "fp32", "cpu"))
    on_gpu = Plan.from_dict({name: Decision(d.method, d.rank, d.precision, "gpu") for name, d in on_cpu.decisions})
    calls = []
    real_rewrite = compressor.rewrite
    monkeypatch.setattr(compressor, "rewrite", lambda *a, **k: calls.append(1) or real_rewrite(*a, **k))
    with ThreadPoolExecutor(4) as pool:  # asked at once from several threads, as parallel measurement does
        models = list(pool.map(lambda plan: compressor.rewrite_shared(plan), [on_cpu, on_gpu, on_cpu, on_gpu]))
    assert len(calls) == 1 and all(m is models[0] for m in models)  # placement does not change the model
    other = on_cpu.with_decision(layers[1], Decision(rung.method, rung.rank, "int8", "cpu"))
    x = random_inputs(compressor.graph.model, 8)
    assert compressor.rewrite_shared(other, x) is not models[0] and len(calls) == 2


@pytest.mark.parametrize("shape", [(300, 500), (1100, 1300)])  # the float64 path and the float32 Gram path
def test_truncated_spectrum_gives_the_full_svds_reconstruction_error(shape):
    """Every rung's error from the top singular values + the Frobenius norm equals the full SVD's
    within 1e-4 (absolute, relative Frobenius error), on a low-rank-plus-noise matrix."""
    from explorer.compress import tail_error, top_singular_values, truncated_svd

    rng = np.random.default_rng(1)
    rows, cols = shape
    matrix = (rng.standard_normal((rows, 40)) @ rng.standard_normal((40, cols))
              + 0.5 * rng.standard_normal(shape)).astype(np.float32)
    full = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    keep = 280
    top, total = top_singular_values(matrix, keep)
    assert len(top) == keep
    for rank in (8, 40, 120, 280):  # on the Gram path, 280 of 1100 vectors: all are computed, the top kept
        exact = np.sqrt(np.sum(full[rank:] ** 2) / np.sum(full**2))
        assert abs(tail_error(top, total, rank) - exact) <= 1e-4
        factors = truncated_svd(matrix, rank)  # the factors a rewrite uses reach the same error
        approx = (factors.left * factors.singular) @ factors.right
        assert abs(np.linalg.norm(matrix - approx) / np.linalg.norm(matrix) - exact) <= 1e-4
    with pytest.raises(ValueError):
        tail_error(top, total, keep + 1)  # an error needing more values than were kept is refused


def test_compressor_rung_errors_match_a_full_svd_of_the_layer_matrix():
    graph = LayerGraph(small_cnn())
    compressor = Compressor(graph)
    for layer in graph.layers:
        for method in compressor.methods(layer):
            full = np.linalg.svd(compressor._matrix(layer, method).astype(np.float64), compute_uv=False)
            for rank in compressor.candidate_ranks(layer, method):
                exact = np.sqrt(np.sum(full[rank:] ** 2) / np.sum(full**2))
                assert abs(compressor.rel_error(layer.name, method, rank) - exact) <= 1e-5
