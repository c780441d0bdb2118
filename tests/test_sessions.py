"""ONNX Runtime sessions (explorer.sessions), the one atomic write (explorer.cache.atomic_write) and host probing
(explorer.hostinfo): sessions start from ORT's defaults, fail in one line, run in batches and chains."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from explorer import blockrun, hostinfo
from explorer.cache import atomic_write
from explorer.errors import ExplorerError
from explorer.errors import error_line
from explorer.sessions import (
    CPU_PROVIDER,
    ChainStep,
    MissingInput,
    ProviderMissing,
    SessionError,
    open_session,
    run_batched,
    run_chain,
    run_in_batches,
    session_options,
)


def _scale_model(batch: int | str = "n", factor: float = 2.0) -> bytes:
    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "scale",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
                              [helper.make_tensor("k", TensorProto.FLOAT, [], [factor])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def test_session_options_are_onnx_runtime_defaults_but_the_threads():
    default, plain = session_options(), ort.SessionOptions()
    for name in ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "execution_mode",
                 "enable_cpu_mem_arena", "enable_mem_pattern"):
        assert getattr(default, name) == getattr(plain, name), name  # QDQ fusion on: int8 on integer kernels
    threaded = session_options(3)
    assert threaded.intra_op_num_threads == 3 and threaded.inter_op_num_threads == 1
    assert threaded.graph_optimization_level == plain.graph_optimization_level
    # a board processor's sessions run as a chain, taking turns on the same cores: no spinning between runs
    assert threaded.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError):  # ORT's default (spinning) where no threads are set: the entry is absent
        default.get_session_config_entry("session.intra_op.allow_spinning")


def test_open_session_fails_in_one_line_and_strictly_on_its_provider():
    with pytest.raises(SessionError, match=r"^ONNX Runtime cannot load block.onnx: [^\n]+$") as caught:
        open_session(b"not a model", what="block.onnx")
    assert isinstance(caught.value, ExplorerError) and "\n" not in caught.value.line
    with pytest.raises(ProviderMissing, match="has no QNNExecutionProvider") as missing:
        open_session(_scale_model(), "QNNExecutionProvider")
    assert CPU_PROVIDER in missing.value.available
    assert open_session(_scale_model(), CPU_PROVIDER, 1).get_providers() == [CPU_PROVIDER]


def test_error_line_is_the_first_line_or_the_type():
    assert error_line(RuntimeError("  first\nsecond")) == "first"
    assert error_line(RuntimeError("")) == "RuntimeError"
    assert error_line(RuntimeError("x" * 500), 300) == "x" * 300


def test_batched_runs_pad_a_fixed_batch_and_join_the_rest():
    x = np.arange(21, dtype=np.float32).reshape(7, 3)
    dynamic = open_session(_scale_model())
    np.testing.assert_array_equal(run_batched(dynamic, {"x": x}, batch=3)[0], 2 * x)
    fixed = open_session(_scale_model(batch=4))  # 7 samples: a batch of 4, then 3 padded to 4
    np.testing.assert_array_equal(run_batched(fixed, {"x": x}, batch=500)[0], 2 * x)
    sizes: list[int] = []

    def run(chunk):
        sizes.append(len(chunk["x"]))
        return [chunk["x"]]

    np.testing.assert_array_equal(run_in_batches(run, {"x": x}, 4, pad=True)[0], x)
    assert sizes == [4, 4]


def test_a_chain_feeds_each_block_and_forgets_tensors_after_their_last_use():
    double = open_session(_scale_model(factor=2.0))
    steps = [ChainStep(["x"], ["y"], lambda feed: double.run(["y"], feed)),
             ChainStep(["y"], ["z"], lambda feed: [feed["y"] + 1])]
    x = np.ones((2, 3), np.float32)
    values = run_chain(steps, {"x": x}, forget=[[], ["y"]])
    assert set(values) == {"x", "z"}
    np.testing.assert_array_equal(values["z"], 3 * x)
    with pytest.raises(MissingInput, match="block 1 needs input 'w'"):
        run_chain([steps[0], ChainStep(["w"], ["z"], lambda feed: [])], {"x": x})


def test_atomic_write_replaces_a_file_only_when_complete(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def refuse(path):
        assert path.read_bytes() == b"new" and path.parent == tmp_path
        raise ExplorerError("checked and refused")

    with pytest.raises(ExplorerError, match="refused"):
        atomic_write(target, lambda handle: handle.write(b"new"), check=refuse)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda handle: (_ for _ in ()).throw(KeyboardInterrupt))
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic_write(target, lambda handle: handle.write(b"new"), durable=True, permissions=0o644)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o644
    atomic_write(tmp_path / "deeper" / "file", lambda handle: handle.write(b"x"))
    assert (tmp_path / "deeper" / "file").stat().st_mode & 0o777 == 0o600  # private unless asked


def test_host_facts_say_where_every_figure_comes_from(monkeypatch):
    facts = hostinfo.host_facts()
    assert facts.cores >= 1 and facts.clock_ghz > 0 and facts.cache_kb > 0 and 0 < facts.available_mb <= facts.size_mb
    for source in (facts.clock_source, facts.cache_source, facts.size_source, facts.available_source):
        assert source.startswith(("read:", "measured:", "estimate:")), source
    monkeypatch.setattr(blockrun, "nvml_device", lambda: None)
    gpu = hostinfo.gpu_facts(1234.0)
    assert gpu.name == "CUDA device 0" and gpu.memory_mb[0] == 1234.0
    assert all(value[1].startswith("estimate: NVML is not readable") for value in (gpu.cores, gpu.clock_ghz, gpu.memory_mb))
    assert hostinfo.clean('a "quoted"\n\\name') == "a quoted name"
