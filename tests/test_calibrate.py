"""Tests for explorer.calibrate: the host profile it writes loads, is complete and commented, and an
interrupted or failed calibration leaves the previous profile untouched."""
from __future__ import annotations

import os
import platform
import re
import time

import pytest

from explorer import calibrate, hostprofile
from explorer.boards import PRECISIONS, load_board
from explorer.errors import ExplorerError


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    """One quick calibration for the module: (path, progress messages, other processes' load before it)."""
    background = calibrate.busy_cores(0.3)
    messages: list[str] = []
    path = calibrate.calibrate_host(tmp_path_factory.mktemp("host") / "host.toml", quick=True,
                                    progress=messages.append)
    return path, messages, background


def test_quick_calibration_writes_a_profile_that_loads(quick_profile):
    path, messages, _ = quick_profile
    board = load_board(path)
    assert board.name == "host"
    expected = ("cpu", "cpu1", "gpu") if "CUDAExecutionProvider" in calibrate.ort.get_available_providers() else (
        "cpu", "cpu1")
    assert board.processor_ids == expected
    assert board.memory.shared == (expected == ("cpu", "cpu1"))
    cores = len(os.sched_getaffinity(0))
    for pid, threads in (("cpu", cores), ("cpu1", 1)):
        proc = board.processor(pid)
        assert proc.kind == "cpu" and proc.provider == "CPUExecutionProvider"
        assert proc.threads == threads and proc.cores == threads
        assert proc.precisions == PRECISIONS
        assert set(proc.ops) == {"Conv", "Gemm", "MatMul"}
        assert all(proc.peak_gflops[p] > 0 for p in PRECISIONS)
        assert all(0 < proc.efficiency[k] <= 1 for k in ("conv", "fc"))
        assert 0 < proc.bandwidth_gbps <= board.memory.bandwidth_gbps
        assert 0 <= proc.idle_power_w <= proc.active_power_w
        assert proc.launch_overhead_us >= 0 and proc.cache_kb > 0 and proc.clock_ghz > 0
    assert board.link("cpu", "cpu1").via == ("memory" if board.memory.shared else "link")
    assert path.stat().st_mode & 0o777 == 0o644  # not the temporary file's private mode
    assert messages and any("GEMM" in m for m in messages) and messages[-1].startswith("writing")


def test_every_number_in_the_profile_has_a_comment(quick_profile):
    path, _, _ = quick_profile
    text = path.read_text()
    _assert_every_number_is_commented(text)
    assert "ONNX Runtime" in text.splitlines()[2]


def _assert_every_number_is_commented(text: str) -> None:
    assert text.startswith("# Board profile of this machine")
    missing = []
    for number, line in enumerate(text.splitlines(), 1):
        code, _, comment = re.sub(r'"[^"]*"', '""', line).partition("#")
        if re.search(r"\d", code) and len(comment.strip()) < 3:
            missing.append(f"{number}: {line}")
        if re.search(r"\d", code) and "=" in code:  # a value: says where it comes from
            assert re.match(r"\s*(measured|read|estimate|one |ONNX Runtime)", comment), line
    assert not missing, "numbers without a comment:\n" + "\n".join(missing)


def test_all_cores_are_faster_than_one(quick_profile):
    path, _, background = quick_profile
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: nothing to compare")
    if background > 0.5 or "# WARNING: other processes" in path.read_text():
        pytest.skip("other processes used the cores while calibrating: multi-thread throughput is not comparable")
    board = load_board(path)
    assert board.processor("cpu").peak_gflops["fp32"] > 1.2 * board.processor("cpu1").peak_gflops["fp32"]


def test_interrupted_calibration_keeps_the_previous_profile(quick_profile, tmp_path, monkeypatch):
    target = tmp_path / "host.toml"
    target.write_bytes(quick_profile[0].read_bytes())
    before = target.read_bytes()
    calls = []
    real = calibrate._time_model

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # mid-way through the throughput measurements
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "_time_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate.calibrate_host(target, quick=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.toml"]


def test_interrupt_while_writing_keeps_the_previous_profile(tmp_path, monkeypatch):
    target = tmp_path / "host.toml"
    target.write_text("old profile\n")

    def interrupt(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(hostprofile, "load_board", interrupt)
    with pytest.raises(KeyboardInterrupt):
        hostprofile.write_profile(target, "[board]\n")
    assert target.read_text() == "old profile\n"
    assert [p.name for p in tmp_path.iterdir()] == ["host.toml"]


def test_a_profile_that_does_not_load_is_not_written(tmp_path):
    target = tmp_path / "host.toml"
    target.write_text("old profile\n")
    with pytest.raises(ExplorerError, match="does not load.*left unchanged"):
        hostprofile.write_profile(target, '[board]\nname = "host"\n')
    assert target.read_text() == "old profile\n"
    assert [p.name for p in tmp_path.iterdir()] == ["host.toml"]


class _FakePower:
    """A cumulative energy counter (microjoules) that integrates 5 W while this process sleeps and 20 W otherwise."""

    def __init__(self, monkeypatch):
        self.watts, self.uj, self.t = 5.0, 0.0, time.perf_counter()
        real_sleep = time.sleep

        def sleep(seconds):  # integrate up to each change of power
            self.read()
            self.watts = 5.0
            real_sleep(seconds)
            self.read()
            self.watts = 20.0

        monkeypatch.setattr(calibrate.time, "sleep", sleep)

    def read(self) -> float:
        now = time.perf_counter()
        self.uj += self.watts * (now - self.t) * 1e6
        self.t = now
        return self.uj


def test_power_is_measured_from_rapl_and_nvml_when_readable(monkeypatch):
    """With (simulated) energy counters, power comes from them instead of estimates: RAPL's for the CPUs
    (shared by their cores), NVML's for the gpu (the whole GPU)."""
    fake = _FakePower(monkeypatch)
    monkeypatch.setattr(calibrate.blockrun, "rapl_counter",
                        lambda: calibrate.blockrun.EnergyCounter("RAPL (fake)", fake.read))
    monkeypatch.setattr(calibrate.blockrun, "nvml_counter",
                        lambda: calibrate.blockrun.EnergyCounter("NVML (fake)", fake.read, window_s=0.1))
    ops = {"gemv": calibrate._gemm_op("gemv", 1, 64, 64, "fc", calibrate.np.random.default_rng(0))}
    units = (hostprofile.Unit("cpu", 2), hostprofile.Unit("cpu1", 1), hostprofile.Unit("gpu", 1, kind="gpu"))
    power, no_power = calibrate._measure_power(units, ops, calibrate.QUICK, lambda message: None)
    assert not no_power
    active, idle, active_how, _ = power["cpu"]
    assert "RAPL" in active_how
    assert idle == pytest.approx(5.0, rel=0.3) and active == pytest.approx(20.0, rel=0.3)
    active1, idle1, _, _ = power["cpu1"]
    assert idle1 == pytest.approx(2.5, rel=0.3) and 0 <= idle1 <= active1
    gpu_active, gpu_idle, gpu_how, _ = power["gpu"]
    assert "NVML" in gpu_how and gpu_idle == pytest.approx(5.0, rel=0.3) and gpu_active == pytest.approx(20.0, rel=0.3)


def test_without_counters_power_is_an_estimate_that_says_why(monkeypatch):
    monkeypatch.setattr(calibrate.blockrun, "rapl_counter", lambda: None)
    monkeypatch.setattr(calibrate.blockrun, "nvml_counter", lambda: None)
    ops = {"gemv": calibrate._gemm_op("gemv", 1, 64, 64, "fc", calibrate.np.random.default_rng(0))}
    units = (hostprofile.Unit("cpu", 2), hostprofile.Unit("gpu", 1, kind="gpu"))
    power, no_power = calibrate._measure_power(units, ops, calibrate.QUICK, lambda message: None)
    assert not power
    assert "RAPL" in no_power["cpu"] and "NVML" in no_power["gpu"]


def test_a_gpu_gets_a_processor_and_links(tmp_path, monkeypatch):
    """The gpu path, run on the CPU provider (this machine may have no GPU; benchmarks/results has the H200 run):
    a `gpu` processor measured on GPU_PROVIDER, links to both CPUs, every number commented."""
    monkeypatch.setattr(calibrate, "GPU_PROVIDER", "CPUExecutionProvider")
    monkeypatch.setattr(calibrate.blockrun, "nvml_device", lambda: None)
    monkeypatch.setattr(calibrate.blockrun, "nvml_counter", lambda: None)
    messages: list[str] = []
    path = calibrate.calibrate_host(tmp_path / "host.toml", quick=True, progress=messages.append)
    board = load_board(path)
    assert board.processor_ids == ("cpu", "cpu1", "gpu")
    gpu = board.processor("gpu")
    assert gpu.kind == "gpu" and gpu.provider == "CPUExecutionProvider" and gpu.precisions == PRECISIONS
    assert all(gpu.peak_gflops[p] > 0 for p in PRECISIONS) and gpu.bandwidth_gbps > 0
    for cpu in ("cpu", "cpu1"):
        link = board.link(cpu, "gpu")
        assert link.via == "link" and link.bandwidth_gbps > 0 and link.latency_us >= 0
    assert not board.memory.shared and board.link("cpu", "cpu1").via == "link"  # the gpu has its own memory
    text = path.read_text()
    assert "estimate: 250 W" in text and "no readable NVML energy counter" in text
    _assert_every_number_is_commented(text)
    assert any("the profile gets a `gpu` processor" in m for m in messages)


def test_a_gpu_provider_that_cannot_start_is_left_out_with_a_warning(monkeypatch):
    monkeypatch.setattr(calibrate, "GPU_PROVIDER", "CPUExecutionProvider")

    def cannot_start(spec, index):
        raise calibrate.blockrun.ProviderUnavailable("block 0 needs CUDAExecutionProvider, which ... could not start")

    monkeypatch.setattr(calibrate.blockrun, "open_session", cannot_start)
    messages: list[str] = []
    assert calibrate._gpu_unit(messages.append) is None
    assert "could not start" in messages[0] and "no gpu processor" in messages[0]

    class FailsWhenRunning:
        def run(self, outputs, feed):
            raise RuntimeError("CUDA failure 209: no kernel image is available for execution on the device")

    monkeypatch.setattr(calibrate.blockrun, "open_session", lambda spec, index: FailsWhenRunning())
    assert calibrate._gpu_unit(messages.append) is None
    assert "no kernel image" in messages[1] and "no gpu processor" in messages[1]
    monkeypatch.setattr(calibrate, "GPU_PROVIDER", "NoSuchExecutionProvider")
    assert calibrate._gpu_unit(messages.append) is None and len(messages) == 2  # absent: nothing to say


def test_busy_cores_is_a_fraction_of_the_machine():
    assert 0.0 <= calibrate.busy_cores(0.05) <= (os.cpu_count() or 1) + 1e-9


def test_fp16_probe_sees_what_onnx_runtime_does():
    found = calibrate._fp16_computed_in_fp32()
    assert found in (True, False, None)
    if platform.machine() in ("x86_64", "AMD64"):
        assert found is True  # ORT's CPU provider has no fp16 Gemm kernel on x86: Casts, then fp32
