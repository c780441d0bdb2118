"""Board profiles written by the tests (every number commented, as the loader's tests demand of shipped ones)."""
from pathlib import Path

BOARD = """
[board]
name = "{name}"
description = "test board"
[memory]
size_mb = 1024        # test
available_mb = 1000   # test
bandwidth_gbps = {dram_gbps}  # test
shared = true         # test
energy_nj_per_byte = 0.1   # test
transfer_latency_us = 1.0  # test
"""
PROCESSOR = """
[processors.{pid}]
kind = "cpu"
description = "test core"
cores = {threads}      # test
clock_ghz = 1.0      # test
cache_kb = {cache_kb}  # test
precisions = [{precisions}]
peak_gflops = {{ {peak_entries} }}   # test
efficiency = {{ conv = 1.0, fc = 1.0 }}   # test
memory_mb = 1000     # test
bandwidth_gbps = {dram_gbps}  # test
active_power_w = {active} # test
idle_power_w = 0.1   # test
launch_overhead_us = 0.0   # test
ops = ["Conv", "Gemm", "MatMul"]
provider = "CPUExecutionProvider"
threads = {threads}  # test
"""
LINK = """
[[links]]
between = ["{a}", "{b}"]
bandwidth_gbps = {gbps}  # test
latency_us = 0.0  # test
energy_nj_per_byte = 0.0  # test
"""


def write_board(path: Path, processors: list[str], dram_gbps: float = 10.0, peak_gflops: float | list[float] = 10.0,
                cache_kb: int = 256, link_gbps: float | None = None, threads: list[int] | None = None,
                active_power_w: list[float] | None = None, precisions: str = '"fp32", "fp16", "int8"') -> Path:
    """A shared-memory board of CPU-provider processors (runnable by the host measurer)."""
    text = BOARD.format(name=Path(path).stem, dram_gbps=dram_gbps)
    peaks = peak_gflops if isinstance(peak_gflops, list) else [peak_gflops] * len(processors)
    for i, pid in enumerate(processors):
        peak_entries = ", ".join(f"{p.strip(chr(34))} = {peaks[i]}" for p in precisions.split(", "))
        text += PROCESSOR.format(pid=pid, threads=(threads or [1] * len(processors))[i], cache_kb=cache_kb,
                                 peak_entries=peak_entries, dram_gbps=dram_gbps, precisions=precisions,
                                 active=(active_power_w or [1.0] * len(processors))[i])
    if link_gbps is not None:
        for i, a in enumerate(processors):
            for b in processors[i + 1:]:
                text += LINK.format(a=a, b=b, gbps=link_gbps)
    Path(path).write_text(text)
    return Path(path)
