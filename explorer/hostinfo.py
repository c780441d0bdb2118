"""What this machine is, as read (not measured): CPU model, cores, clock, last-level cache and memory from
sysfs and /proc, and the GPU's name, cores, clock and free memory from NVML. Every figure comes with where it
came from ('read: ...', or 'estimate: ...' and why), because the board profile that `explorer calibrate`
writes (:mod:`explorer.calibrate`) carries a source for every number.
"""
from __future__ import annotations

import os
import platform
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from explorer import blockrun

CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
#: Estimates used where nothing can be read here (each is explained where it is used).
FALLBACK_CLOCK_GHZ = 2.5  # a typical server core's base clock
FALLBACK_CACHE_KB = 1024
FALLBACK_GPU_CLOCK_GHZ = 1.5  # a data-centre GPU's boost clock (V100 1.53, A100 1.41, H100 1.98 GHz)
OS_RESERVE_FRACTION = 0.9  # share of MemAvailable a model may use; the rest stays with the OS and ORT


@dataclass(frozen=True)
class HostFacts:
    """This machine's CPUs and memory, each figure with where it came from."""

    cores: int  # cores this process may use
    cpu_model: str
    hostname: str
    clock_ghz: float
    clock_source: str
    cache_kb: int  # the last-level cache
    cache_source: str
    cache_shared: str  # the CPUs that share it ("?": unknown)
    size_mb: float  # installed memory
    size_source: str
    available_mb: float  # what a model may use (OS_RESERVE_FRACTION of what is available)
    available_source: str


@dataclass(frozen=True)
class GpuFacts:
    """What NVML says of the GPU, each value with where it came from (estimates where NVML does not say)."""

    name: str
    cores: tuple[int, str]
    clock_ghz: tuple[float, str]
    memory_mb: tuple[float, str]


def host_facts() -> HostFacts:
    """Cores, CPU model, clock, last-level cache and memory of this machine, each with where it came from."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    model = (cpuinfo_field("model name") or [platform.processor() or platform.machine() or "unknown CPU"])[0]
    clock_ghz, clock_source = cpu_clock()
    cache_kb, cache_source, cache_shared = last_level_cache()
    meminfo = {}
    for line in (read_text("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            meminfo[key] = int(rest.split()[0]) / 1024
    if "MemTotal" in meminfo:
        size_mb, size_source = meminfo["MemTotal"], "read: /proc/meminfo MemTotal"
    else:
        size_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        size_source = "read: sysconf page size x physical pages"
    available = meminfo.get("MemAvailable", size_mb * 0.5)
    available_source = (
        f"measured: {OS_RESERVE_FRACTION:.0%} of /proc/meminfo MemAvailable at calibration time "
        "(the rest stays with the OS and ONNX Runtime)" if "MemAvailable" in meminfo
        else "estimate: half of the installed memory (no MemAvailable in /proc/meminfo)")
    return HostFacts(cores=cores, cpu_model=clean(model), hostname=clean(socket.gethostname()), clock_ghz=clock_ghz,
                     clock_source=clock_source, cache_kb=cache_kb, cache_source=cache_source, cache_shared=cache_shared,
                     size_mb=size_mb, size_source=size_source,
                     available_mb=min(size_mb, available * OS_RESERVE_FRACTION), available_source=available_source)


def gpu_facts(fallback_memory_mb: float) -> GpuFacts:
    """The GPU's name, cores, clock and free memory from NVML (:func:`explorer.blockrun.nvml_device`), each an
    estimate that says so where NVML does not tell (memory: `fallback_memory_mb`, the CPUs' available memory)."""
    nvml = blockrun.nvml_device()
    name = nvml[1] if nvml else "CUDA device 0"
    cores = (1, "estimate: NVML is not readable here; the peak below is measured, not computed from cores")
    clock = (FALLBACK_GPU_CLOCK_GHZ, f"estimate: NVML is not readable here; {FALLBACK_GPU_CLOCK_GHZ} GHz, a data-centre "
                                     "GPU's boost clock (descriptive only: the peak below is measured)")
    memory = (fallback_memory_mb, "estimate: NVML is not readable here; the CPUs' available memory")
    if nvml:
        import pynvml

        handle = nvml[0]
        try:
            cores = (int(pynvml.nvmlDeviceGetNumGpuCores(handle)), "read: NVML nvmlDeviceGetNumGpuCores (CUDA cores)")
        except (pynvml.NVMLError, AttributeError):  # not supported here, or an nvidia-ml-py without the call
            pass
        try:
            mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
            clock = (mhz / 1e3, "read: NVML nvmlDeviceGetMaxClockInfo (SM clock, maximum)")
        except (pynvml.NVMLError, AttributeError):  # not supported here, or an nvidia-ml-py without the call
            pass
        try:
            free_mb = pynvml.nvmlDeviceGetMemoryInfo(handle).free / 2**20
            memory = (free_mb * OS_RESERVE_FRACTION, f"read: {OS_RESERVE_FRACTION:.0%} of the free GPU memory NVML "
                                                     "reports at calibration time (the rest for ONNX Runtime's "
                                                     "workspace)")
        except (pynvml.NVMLError, AttributeError):  # not supported here, or an nvidia-ml-py without the call
            pass
    return GpuFacts(name=clean(name), cores=cores, clock_ghz=clock, memory_mb=memory)


def read_text(path: Path | str) -> str | None:
    """A (sysfs, /proc) file's text, or None where it is absent or unreadable."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cpuinfo_field(name: str) -> list[str]:
    """Every value of a field of /proc/cpuinfo (one per CPU); empty where it is absent."""
    text = read_text("/proc/cpuinfo") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.split(":", 1)[0].strip() == name and ":" in line]


def cpu_clock() -> tuple[float, str]:
    """The CPUs' maximum clock in GHz and where it came from."""
    text = read_text(CPUFREQ_MAX)
    if text and text.strip().isdigit() and int(text) > 0:
        return int(text) / 1e6, f"read: {CPUFREQ_MAX} (maximum clock)"
    mhz = [float(v) for v in cpuinfo_field("cpu MHz") if re.fullmatch(r"[\d.]+", v)]
    if mhz and max(mhz) > 0:
        return max(mhz) / 1e3, "read: /proc/cpuinfo 'cpu MHz' (the clock the kernel reports; no cpufreq here)"
    match = re.search(r"@\s*([\d.]+)\s*GHz", " ".join(cpuinfo_field("model name")))
    if match:
        return float(match.group(1)), "read: the nominal clock in the CPU model name"
    return FALLBACK_CLOCK_GHZ, (f"estimate: {FALLBACK_CLOCK_GHZ} GHz, a typical server core's base clock "
                                "(no clock in cpufreq or /proc/cpuinfo here)")


def last_level_cache() -> tuple[int, str, str]:
    """(size in KB, where it came from, which CPUs share it) of cpu0's highest-level data/unified cache."""
    best: tuple[int, int, str] | None = None
    for index in sorted(CACHE_DIR.glob("index*")):
        level, kind, size = (read_text(index / name) for name in ("level", "type", "size"))
        if not (level and kind and size) or kind.strip() == "Instruction":
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", size.strip())
        if not match:
            continue
        kb = int(match.group(1)) * {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024**2}[match.group(2)]
        shared = (read_text(index / "shared_cpu_list") or "?").strip()
        if best is None or int(level) > best[0]:
            best = (int(level), max(1, int(kb)), shared)
    if best is None:
        return FALLBACK_CACHE_KB, "estimate: 1 MB (no cache sizes in sysfs here)", "?"
    return best[1], f"read: {CACHE_DIR}, L{best[0]} (last level), shared by CPUs {best[2]}", best[2]


def clean(text: str) -> str:
    """A one-line string safe inside a TOML basic string and a comment."""
    return re.sub(r'[^\x20-\x7e]|["\\]', "", " ".join(text.split()))[:120] or "unknown"
