"""Tests for explorer.boards: the shipped profiles, transfer paths, and validation of bad profiles."""
from __future__ import annotations

import json
import math
import re

import pytest

from explorer import boards
from explorer.boards import HOST, KINDS, board_names, load_board, shipped_dir
from explorer.errors import ExplorerError

SHIPPED = {
    "tegra-k1": {"cpu": "cpu", "lpc": "lpc", "gpu": "gpu"},
    "tegra-k1-cloud": {"cpu": "cpu", "lpc": "lpc", "gpu": "gpu", "cloud": "remote"},
    "snapdragon-800": {"cpu": "cpu", "gpu": "gpu", "dsp": "dsp"},
    "snapdragon-400": {"cpu": "cpu", "gpu": "gpu", "dsp": "dsp"},
}
PROFILE_FILES = sorted(p for p in shipped_dir().glob("*.toml") if p.stem != HOST)


# ---- shipped boards -------------------------------------------------------------------------------
def test_board_names_lists_the_shipped_boards():
    assert set(SHIPPED) <= set(board_names())
    assert board_names() == sorted(board_names())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_board_loads_with_its_processors(name):
    board = load_board(name)
    assert board.name == name
    assert {pid: board.processor(pid).kind for pid in board.processor_ids} == SHIPPED[name]
    for proc in board.processors.values():
        assert proc.kind in KINDS
        assert set(proc.peak_gflops) == set(proc.precisions)
        assert set(proc.efficiency) == {"conv", "fc"}
    assert load_board(shipped_dir() / f"{name}.toml") == board  # a path works as well as a name


@pytest.mark.parametrize("name", SHIPPED)
def test_every_pair_of_processors_has_a_transfer_path(name):
    board = load_board(name)
    for a in board.processor_ids:
        for b in board.processor_ids:
            link = board.link(a, b)
            assert set(link.between) == {a, b}
            if a == b:
                assert link.via == "none"
                assert link.transfer_time_s(1e6) == 0 and link.transfer_energy_j(1e6) == 0
            else:
                assert link.via in ("link", "memory", "network")
                assert 0 < link.bandwidth_gbps < math.inf
                assert link.transfer_time_s(1e6) > 0 and link.transfer_energy_j(1e6) > 0
                assert board.link(b, a) == link
    assert len(board.links) == len(board.processor_ids) * (len(board.processor_ids) - 1) // 2


def test_remote_processor_sits_behind_a_slow_network_link():
    board = load_board("tegra-k1-cloud")
    cloud = board.processor("cloud")
    assert cloud.is_remote and board.network is not None
    radio, dram = board.link("cpu", "cloud"), board.link("cpu", "gpu")
    assert radio.via == "network"
    assert radio.bandwidth_gbps < dram.bandwidth_gbps / 100
    assert radio.latency_us >= 1000  # a millisecond or more, one way
    assert radio.energy_nj_per_byte > 100 * dram.energy_nj_per_byte
    net = board.network
    assert radio.bandwidth_gbps == pytest.approx(net.bandwidth_mbit_s / 8000)
    assert 2 * radio.latency_us == pytest.approx(net.rtt_ms * 1000)  # there and back = one round trip
    assert radio.energy_nj_per_byte == pytest.approx(net.radio_power_w / radio.bandwidth_gbps)
    assert radio.energy_uj_per_transfer == pytest.approx(net.radio_power_w * radio.latency_us)


def test_cloud_board_is_the_tegra_k1_plus_the_cloud():
    """tegra-k1-cloud copies tegra-k1's sections: they must not drift apart."""
    base, cloud = load_board("tegra-k1"), load_board("tegra-k1-cloud")
    assert cloud.memory == base.memory
    assert {pid: p for pid, p in cloud.processors.items() if not p.is_remote} == base.processors
    assert [link for link in cloud.links if link.via != "network"] == list(base.links)


def test_default_link_is_a_copy_through_shared_dram():
    board = load_board("snapdragon-800")  # gpu <-> dsp is not declared
    link, mem = board.link("gpu", "dsp"), board.memory
    assert link.via == "memory"
    assert link.bandwidth_gbps == pytest.approx(mem.bandwidth_gbps / 2)
    assert link.latency_us == mem.transfer_latency_us
    assert link.energy_nj_per_byte == pytest.approx(2 * mem.energy_nj_per_byte)


def test_transfer_time_and_energy():
    link = load_board("tegra-k1").link("cpu", "gpu")
    nbytes = 7e6  # 1 ms at 7 GB/s
    expected_s = link.latency_us * 1e-6 + nbytes / (link.bandwidth_gbps * 1e9)
    assert link.transfer_time_s(nbytes) == pytest.approx(expected_s)
    assert link.transfer_energy_j(nbytes) == pytest.approx(nbytes * link.energy_nj_per_byte * 1e-9)
    assert link.transfer_time_s(0) == 0 and link.transfer_energy_j(0) == 0


@pytest.mark.parametrize("name", SHIPPED)
def test_to_dict_is_json_ready(name):
    shown = json.loads(json.dumps(load_board(name).to_dict()))
    assert shown["name"] == name and set(shown["processors"]) == set(SHIPPED[name])


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.name)
def test_every_number_in_a_shipped_profile_carries_a_source(path):
    """Each line with a number outside strings has a non-empty comment on the same line."""
    missing = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        code, _, comment = re.sub(r'"[^"]*"', '""', line).partition("#")
        if re.search(r"\d", code) and len(comment.strip()) < 3:
            missing.append(f"{path.name}:{number}: {line.strip()}")
    assert not missing, "numbers without a source comment:\n" + "\n".join(missing)


def test_unknown_processor_id_suggests_the_closest():
    with pytest.raises(ExplorerError, match="did you mean 'gpu'"):
        load_board("tegra-k1").link("cpu", "gpuu")


# ---- names and files ------------------------------------------------------------------------------
def test_unknown_board_name_suggests_the_closest():
    with pytest.raises(ExplorerError) as err:
        load_board("tegra-k2")
    message = str(err.value)
    assert "'tegra-k1'" in message and "explorer boards" in message and "tegra-k2.toml" in message


def test_absent_host_profile_says_to_calibrate(tmp_path, monkeypatch):
    monkeypatch.setattr(boards, "board_dirs", lambda: (tmp_path, tmp_path / "shipped"))
    assert board_names() == []
    with pytest.raises(ExplorerError, match="explorer calibrate"):
        load_board(HOST)


def test_a_users_targets_folder_wins_over_the_shipped_profiles_from_any_folder(tmp_path, monkeypatch):
    shipped = load_board("tegra-k1")
    assert shipped.path.parent == shipped_dir()
    monkeypatch.chdir(tmp_path)
    assert load_board("tegra-k1") == shipped  # the shipped profiles are found from another folder
    (tmp_path / "targets").mkdir()
    own = shipped.path.read_text().replace('description = "', 'description = "my copy: ', 1)
    (tmp_path / "targets" / "tegra-k1.toml").write_text(own)
    (tmp_path / "targets" / "tiny.toml").write_text(GOOD)
    board = load_board("tegra-k1")
    assert board.path == tmp_path / "targets" / "tegra-k1.toml" and board.description.startswith("my copy: ")
    assert {"tiny", *SHIPPED} <= set(board_names())
    with pytest.raises(ExplorerError, match=re.escape(str(tmp_path / "targets" / "host.toml"))):
        monkeypatch.setattr(boards, "shipped_dir", lambda: tmp_path / "none")
        load_board(HOST)  # this machine's profile is looked for (and written by calibrate) in the user's folder


def test_missing_file(tmp_path):
    with pytest.raises(ExplorerError, match="no such board profile"):
        load_board(str(tmp_path / "absent.toml"))


def test_name_must_match_the_file_when_loaded_by_name(tmp_path, monkeypatch):
    (tmp_path / "tiny.toml").write_text(GOOD.replace('name = "tiny"', 'name = "other"'))
    monkeypatch.setattr(boards, "board_dirs", lambda: (tmp_path, tmp_path / "shipped"))
    with pytest.raises(ExplorerError, match=r"board\.name"):
        load_board("tiny")
    assert load_board(str(tmp_path / "tiny.toml")).name == "other"


# ---- validation -----------------------------------------------------------------------------------
GOOD = """
[board]
name = "tiny"
description = "test board"

[memory]
size_mb = 1024
available_mb = 800
bandwidth_gbps = 10.0
shared = true
energy_nj_per_byte = 0.16
transfer_latency_us = 20.0

[processors.cpu]
kind = "cpu"
description = "test CPU"
cores = 4
clock_ghz = 2.0
cache_kb = 1024
precisions = ["fp32", "int8"]
peak_gflops = { fp32 = 64.0, int8 = 128.0 }
efficiency = { conv = 0.3, fc = 0.2 }
memory_mb = 800
bandwidth_gbps = 5.0
active_power_w = 2.0
idle_power_w = 0.1
launch_overhead_us = 5.0
ops = ["Conv", "Gemm", "MatMul"]
provider = "CPUExecutionProvider"
threads = 4

[processors.gpu]
kind = "gpu"
description = "test GPU"
cores = 128
clock_ghz = 0.8
cache_kb = 256
precisions = ["fp32", "fp16"]
peak_gflops = { fp32 = 204.8, fp16 = 409.6 }
efficiency = { conv = 0.5, fc = 0.1 }
memory_mb = 700
bandwidth_gbps = 8.0
active_power_w = 3.0
idle_power_w = 0.2
launch_overhead_us = 20.0
ops = ["Conv", "Gemm"]
provider = "CUDAExecutionProvider"
threads = 1

[[links]]
between = ["cpu", "gpu"]
bandwidth_gbps = 4.5
latency_us = 30.0
energy_nj_per_byte = 0.32
"""

REMOTE = """
[processors.cloud]
kind = "remote"
description = "server"
cores = 1000
clock_ghz = 1.0
cache_kb = 1024
precisions = ["fp32"]
peak_gflops = { fp32 = 2000.0 }
efficiency = { conv = 0.5, fc = 0.1 }
memory_mb = 16000
bandwidth_gbps = 300.0
active_power_w = 0.3
idle_power_w = 0.0
launch_overhead_us = 10.0
ops = ["Conv", "Gemm", "MatMul"]
provider = "CUDAExecutionProvider"
threads = 1
"""
NETWORK = """
[network]
description = "wifi"
bandwidth_mbit_s = 20.0
rtt_ms = 50.0
radio_power_w = 1.0
"""

# (case id, text to replace in GOOD (or "+" to append), replacement, fragment the message must hold)
BAD = [
    ("syntax", "size_mb = 1024", "size_mb = ", "TOML syntax error"),
    ("unknown-top-key", "+", "[extra]\nx = 1\n", "extra"),
    ("unknown-board-key", 'description = "test board"', 'description = "x"\nvendor = "acme"', "board.vendor"),
    ("unknown-processor-key", "clock_ghz = 2.0", "clock_mhz = 2000.0", "processors.cpu.clock_mhz"),
    ("missing-section", "[memory]", "[memoryy]", "memoryy"),
    ("missing-field", "threads = 4\n", "", "processors.cpu.threads"),
    ("missing-board-name", 'name = "tiny"\n', "", "board.name"),
    ("wrong-type-string", "cores = 4", 'cores = "four"', "processors.cpu.cores"),
    ("wrong-type-float-for-int", "cores = 4", "cores = 4.5", "processors.cpu.cores"),
    ("wrong-type-bool", "shared = true", 'shared = "yes"', "memory.shared"),
    ("wrong-type-table", "efficiency = { conv = 0.3, fc = 0.2 }", "efficiency = 0.3", "processors.cpu.efficiency"),
    ("negative-bandwidth", "bandwidth_gbps = 10.0", "bandwidth_gbps = -10.0", "memory.bandwidth_gbps"),
    ("zero-clock", "clock_ghz = 2.0", "clock_ghz = 0", "processors.cpu.clock_ghz"),
    ("zero-memory", "memory_mb = 800", "memory_mb = 0", "processors.cpu.memory_mb"),
    ("zero-peak", "fp32 = 204.8", "fp32 = 0.0", "processors.gpu.peak_gflops.fp32"),
    ("nan", "clock_ghz = 0.8", "clock_ghz = nan", "processors.gpu.clock_ghz"),
    ("available-above-size", "available_mb = 800", "available_mb = 2048", "memory.available_mb"),
    ("memory-above-shared", "memory_mb = 700", "memory_mb = 900", "processors.gpu.memory_mb"),
    ("bandwidth-above-dram", "bandwidth_gbps = 8.0", "bandwidth_gbps = 80.0", "processors.gpu.bandwidth_gbps"),
    ("efficiency-above-one", "conv = 0.5", "conv = 1.5", "processors.gpu.efficiency.conv"),
    ("unknown-op-kind", "fc = 0.1", "fc = 0.1, pool = 0.2", "processors.gpu.efficiency.pool"),
    ("idle-above-active", "idle_power_w = 0.1", "idle_power_w = 2.5", "processors.cpu.idle_power_w"),
    ("threads-above-cores", "threads = 4", "threads = 8", "processors.cpu.threads"),
    ("unknown-precision", '"fp32", "fp16"]', '"fp32", "fp64"]', "processors.gpu.precisions"),
    ("unknown-precision-in-peaks", "int8 = 128.0", "int8 = 128.0, int4 = 256.0", "processors.cpu.peak_gflops.int4"),
    ("peak-missing-for-precision", "fp32 = 64.0, int8 = 128.0", "fp32 = 64.0", "processors.cpu.peak_gflops.int8"),
    ("peak-for-unlisted-precision", '["fp32", "int8"]', '["fp32"]', "processors.cpu.peak_gflops.int8"),
    ("duplicate-precision", '["fp32", "int8"]', '["fp32", "fp32"]', "processors.cpu.precisions"),
    ("empty-precisions", '["fp32", "int8"]', "[]", "processors.cpu.precisions"),
    ("unknown-op", 'ops = ["Conv", "Gemm"]', 'ops = ["Conv", "Relu"]', "processors.gpu.ops"),
    ("unknown-kind", 'kind = "gpu"', 'kind = "tpu"', "processors.gpu.kind"),
    ("bad-provider", 'provider = "CUDAExecutionProvider"', 'provider = "CUDA"', "processors.gpu.provider"),
    ("bad-processor-id", "[processors.gpu]", "[processors.GPU]", "processors.GPU"),
    ("link-unknown-processor", 'between = ["cpu", "gpu"]', 'between = ["cpu", "npu"]', "links[0].between"),
    ("link-to-itself", 'between = ["cpu", "gpu"]', 'between = ["cpu", "cpu"]', "links[0].between"),
    ("link-one-end", 'between = ["cpu", "gpu"]', 'between = ["cpu"]', "links[0].between"),
    ("link-unknown-key", "latency_us = 30.0", "latency_us = 30.0\njitter_us = 5.0", "links[0].jitter_us"),
    ("link-zero-bandwidth", "bandwidth_gbps = 4.5", "bandwidth_gbps = 0", "links[0].bandwidth_gbps"),
    ("link-duplicate", "+", '[[links]]\nbetween = ["gpu", "cpu"]\nbandwidth_gbps = 1.0\nlatency_us = 1.0\n'
     "energy_nj_per_byte = 1.0\n", "links[1].between"),
    ("remote-without-network", "+", REMOTE, "network"),
    ("network-without-remote", "+", NETWORK, "network"),
    ("network-missing-field", "+", REMOTE + NETWORK.replace("rtt_ms = 50.0\n", ""), "network.rtt_ms"),
    ("link-to-remote", "+", REMOTE + NETWORK + '[[links]]\nbetween = ["cpu", "cloud"]\nbandwidth_gbps = 1.0\n'
     "latency_us = 1.0\nenergy_nj_per_byte = 1.0\n", "links[1].between"),
    ("provider-option-not-string", 'provider = "CUDAExecutionProvider"',
     'provider = "CUDAExecutionProvider"\nprovider_options = { device_id = 0 }',
     "processors.gpu.provider_options.device_id"),
]


def _write(tmp_path, text: str):
    path = tmp_path / "bad-board.toml"
    path.write_text(text)
    return path


def test_without_shared_memory_every_pair_needs_a_declared_link(tmp_path):
    text = GOOD.replace("shared = true", "shared = false")
    assert load_board(str(_write(tmp_path, text))).link("cpu", "gpu").via == "link"
    with pytest.raises(ExplorerError, match=r"bad-board\.toml: links: no transfer path between cpu and gpu"):
        load_board(str(_write(tmp_path, text[: text.index("[[links]]")])))


def test_the_good_profile_loads(tmp_path):
    board = load_board(str(_write(tmp_path, GOOD)))
    assert board.processor_ids == ("cpu", "gpu") and board.network is None
    remote = load_board(str(_write(tmp_path, GOOD + REMOTE + NETWORK)))
    assert remote.link("gpu", "cloud").via == "network"


@pytest.mark.parametrize(("old", "new", "fragment"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_profile_names_file_and_key_path(tmp_path, old, new, fragment):
    if old == "+":
        text = GOOD + new
    else:
        assert old in GOOD, f"test case does not apply: {old!r}"
        text = GOOD.replace(old, new, 1)
    with pytest.raises(ExplorerError) as err:
        load_board(str(_write(tmp_path, text)))
    message = str(err.value)
    assert "bad-board.toml" in message and fragment in message
    assert "\n" not in message
