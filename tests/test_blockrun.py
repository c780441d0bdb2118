"""The block runner: blocks run on the provider asked for or not at all, and energy comes only from
counters that cover every block (RAPL for CPU blocks, NVML for CUDA blocks), read over their window."""
from __future__ import annotations

import time

import numpy as np
import pytest
from onnx import TensorProto, helper

from explorer import blockrun
from explorer.blockrun import BlockRunError, BlockSpec, EnergyCounter, energy_counters, time_blocks

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
    monkeypatch.setattr(blockrun, "_rapl_uj", lambda: None)
    monkeypatch.setattr(blockrun, "_nvml_counter", lambda: FAKE_NVML)
    assert energy_counters([CUDA]) == ([FAKE_NVML], None)
    counters, why = energy_counters([CPU, CUDA])
    assert counters == [] and "no readable RAPL counter" in why and "CPU blocks" in why
    times = time_blocks([BlockSpec(_matmul_block())], INPUTS, warmup=0, repeats=2)
    assert times.energy_uj is None and "no readable RAPL counter" in times.energy_source

    monkeypatch.setattr(blockrun, "_rapl_uj", lambda: 5)
    monkeypatch.setattr(blockrun, "_nvml_counter", lambda: None)
    assert [c.source for c in energy_counters([CPU])[0]] == [blockrun.RAPL_SOURCE]
    counters, why = energy_counters([CPU, CUDA])
    assert counters == [] and "no readable NVML energy counter for the CUDA blocks" in why
    counters, why = energy_counters([CPU, "QNNExecutionProvider"])
    assert counters == [] and "no energy counter for QNNExecutionProvider" in why


def test_a_coarse_counter_is_read_over_its_window_and_scaled_back_to_the_repeats(monkeypatch):
    one_watt = EnergyCounter("a 1 W clock", lambda: time.perf_counter() * 1e6, window_s=0.3)  # microjoules at 1 W
    monkeypatch.setattr(blockrun, "energy_counters", lambda providers: ([one_watt], None))
    started = time.perf_counter()
    times = time_blocks([BlockSpec(_matmul_block())], INPUTS, warmup=1, repeats=3)
    assert time.perf_counter() - started >= 0.3  # untimed passes filled the window
    timed_uj = times.seconds.sum() * 1e6
    # energy of 3 passes, not of the whole window (which would be >= 300,000 uJ)
    assert times.energy_uj < 0.1 * 0.3e6 and 0.2 < times.energy_uj / timed_uj < 5
    assert times.energy_source == "a 1 W clock"
