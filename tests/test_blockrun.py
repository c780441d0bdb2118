"""The block runner: blocks run on the provider asked for or not at all, and energy comes only from
counters that cover every block (RAPL for CPU blocks, NVML for CUDA blocks), read over their window."""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
from netbuild import mlp
from onnx import TensorProto, helper

from explorer import blockrun, measure
from explorer.blockrun import BlockRunError, BlockSpec, EnergyCounter, energy_counters, time_blocks
from explorer.boards import load_board
from explorer.compress import Compressor
from explorer.graph import LayerGraph
from explorer.http_api import device_kind as _device_kind
from explorer.measure import HostMeasurer, board_providers
from explorer.plan import Decision, Plan

CPU, CUDA = blockrun.CPU_PROVIDER, blockrun.CUDA_PROVIDER


def _matmul_block(n: int = 64) -> bytes:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [n, n], np.ones(n * n, np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


INPUTS = {"x": np.ones((1, 64), np.float32)}
FAKE_NVML = EnergyCounter("fake NVML", lambda: 1.0, window_s=1.0)


def test_a_block_on_a_provider_this_runtime_lacks_is_an_error_not_a_cpu_run():
    with pytest.raises(BlockRunError, match="block 0 needs QNNExecutionProvider, which ONNX Runtime .* lacks"):
        time_blocks([BlockSpec(_matmul_block(), 1, "QNNExecutionProvider")], INPUTS, warmup=0, repeats=1)


def test_counters_must_cover_every_block_or_none_is_used(monkeypatch):
    monkeypatch.setattr(blockrun, "rapl_uj", lambda: None)
    monkeypatch.setattr(blockrun, "nvml_counter", lambda: FAKE_NVML)
    assert energy_counters([CUDA]) == ([FAKE_NVML], None)
    counters, why = energy_counters([CPU, CUDA])
    assert counters == [] and "no readable RAPL counter" in why and why.endswith(f"for {CPU}")
    times = time_blocks([BlockSpec(_matmul_block())], INPUTS, warmup=0, repeats=2)
    assert times.energy_uj is None and "no readable RAPL counter" in times.energy_source

    monkeypatch.setattr(blockrun, "rapl_uj", lambda: 5)
    monkeypatch.setattr(blockrun, "nvml_counter", lambda: None)
    assert [c.source for c in energy_counters([CPU])[0]] == [blockrun.RAPL_SOURCE]
    counters, why = energy_counters([CPU, CUDA])
    assert counters == [] and f"no readable NVML energy counter for {CUDA}" in why
    counters, why = energy_counters([CPU, "QNNExecutionProvider"])
    assert counters == [] and "no energy counter for QNNExecutionProvider" in why


def test_a_coarse_counter_is_read_over_its_window_and_scaled_back_to_the_repeats(monkeypatch):
    runs = []

    class CountingSession(ort.InferenceSession):
        def run(self, *args, **kwargs):
            runs.append(1)
            return super().run(*args, **kwargs)

    monkeypatch.setattr(blockrun.ort, "InferenceSession", CountingSession)
    one_mj_per_run = EnergyCounter("1 mJ per run", lambda: 1000.0 * len(runs), window_s=0.2)
    monkeypatch.setattr(blockrun, "energy_counters", lambda providers: ([one_mj_per_run], None))
    started = time.perf_counter()
    times = time_blocks([BlockSpec(_matmul_block())], INPUTS, warmup=1, repeats=3)
    assert time.perf_counter() - started >= 0.2  # untimed passes filled the window
    assert len(runs) > 10 and times.energy_uj == 3000.0  # the energy of the 3 repeats, not of the whole window
    assert times.energy_source == "1 mJ per run"


def test_energy_covers_the_providers_asked_for_not_only_the_plans(monkeypatch):
    monkeypatch.setattr(blockrun, "rapl_uj", lambda: 5)
    monkeypatch.setattr(blockrun, "nvml_counter", lambda: None)
    board = load_board("tegra-k1")
    assert board_providers(board) == [CPU, CUDA]
    cpu_only = time_blocks([BlockSpec(_matmul_block())], INPUTS, warmup=0, repeats=2, energy_providers=board_providers(board))
    assert cpu_only.energy_uj is None and f"no readable NVML energy counter for {CUDA}" in cpu_only.energy_source
    seen = []
    monkeypatch.setattr(measure, "time_blocks", lambda *args, **kwargs: seen.append(kwargs) or time_blocks(*args, **kwargs))
    graph = LayerGraph(mlp())
    plan = Plan.uniform([layer.name for layer in graph.layers], Decision(processor="cpu"))
    measured = HostMeasurer(warmup=0, repeats=2).measure(graph, Compressor(graph), board, plan)
    assert seen[0]["energy_providers"] == [CPU, CUDA] and "no readable NVML" in measured.energy_source


def test_a_wrapped_counter_is_unwrapped_once_or_gives_no_reading():
    rapl = EnergyCounter("rapl", lambda: 0.0, wraps_at_uj=1000.0)
    assert rapl.used(900.0, 100.0) == 200.0 and rapl.used(100.0, 300.0) == 200.0
    assert rapl.used(5.0, 5.0) is None and rapl.used(None, 5.0) is None
    assert EnergyCounter("no range", lambda: 0.0).used(900.0, 100.0) is None


def test_agents_with_different_energy_counters_are_different_devices():
    fingerprint = {"cpu_model": "x", "cpu_count": 2, "machine": "x86_64", "onnxruntime": "1.31.1",
                   "providers": [CPU, CUDA], "energy_counters": ["RAPL"]}
    assert _device_kind(fingerprint) != _device_kind({**fingerprint, "energy_counters": ["RAPL", "NVML GPU counter"]})
