"""The measurement server's HTTP API in one place: what the server (explorer.serve) and its clients
(explorer.remote measures, explorer.offload runs a bundle's remote blocks) must agree on. The full
description, with every field and status code, is docs/http-api.md.

Standard library only: the server's small install (`explorer[server]`) imports it.
"""
from __future__ import annotations

import os
import sys
import urllib.parse
import warnings
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

# 2: energy_providers in the request, energy counters (RAPL, NVML) in the fingerprint. 3: interleaved timing warms
# each chain with an untimed pass per round (a server without it would time what a kernel table of version 5 does not
# hold). Features (below) extend a version with optional fields, so that older clients' requests work unchanged.
PROTOCOL_VERSION = 3

# ---- authentication: every request carries `Authorization: Bearer TOKEN` (401 without it or with a wrong one) ----
TOKEN_ENV = "EXPLORER_SERVER_TOKEN"
DEPRECATED_TOKEN_ENV = "EXPLORER_AGENT_TOKEN"  # read (with a warning) for one release more, then no longer
AUTHORIZATION, BEARER = "Authorization", "Bearer"

# ---- paths ----------------------------------------------------------------------------------------------------
INFO_PATH = "/info"  # GET: {"fingerprint", the server's limits, "measurements", "features"}
MODELS_PREFIX = "/models/"  # HEAD (200 held, 404 not) and PUT (201) /models/SHA256: one ONNX file by its digest
MEASURE_PATH = "/measure"  # POST: one chain of blocks timed
MEASURE_INTERLEAVED_PATH = "/measure-interleaved"  # POST: several chains timed interleaved, in rounds
RUN_PREFIX = "/run/"  # POST /run/SHA256?provider=P&threads=N: an uploaded block run on the tensors of the body

# ---- features a server lists in GET /info beyond its protocol version ---------------------------------------------
ADAPTIVE_FEATURE = "adaptive"  # /measure takes "adaptive": repeats until the interval of the median is tight
INTERLEAVED_FEATURE = "interleaved"  # POST /measure-interleaved
RUN_BLOCK_FEATURE = "run-block"  # POST /run/SHA256 (explorer.offload)
FEATURES = [ADAPTIVE_FEATURE, INTERLEAVED_FEATURE, RUN_BLOCK_FEATURE]

# ---- answers ----------------------------------------------------------------------------------------------------
# 503 with Retry-After (whole seconds): busy (the line for the device or the connections are full); the client asks
# again after that long, and does not count it as a failure. 503 without it: this server cannot run the request
# (a provider that does not start here): another server may. Other 5xx: another server may; 4xx: the request is bad.
RETRY_AFTER = "Retry-After"
MODEL_MISSING = "upload it first"  # in a 404's message: the request names a model the server does not hold
RUN_META_KEY = "__explorer__"  # in a /run answer's .npz: JSON with compute_ms, server_ms (and agent_ms), runs_on

# ---- what one request may ask for (a 400 beyond) ---------------------------------------------------------------
MAX_JSON_BYTES = 1 << 20
MAX_REPEATS = 10_000
MAX_CHAINS = 64  # chains one interleaved request may time
MAX_BLOCKS = 1024  # blocks in one chain
MAX_INPUTS = 64  # inputs one chain may describe
MAX_INPUT_ELEMENTS = 1 << 26  # elements of all of one chain's inputs together
INPUT_DTYPES = ("float32", "float16", "int64", "int32", "uint8")  # what the server draws a chain's inputs as

# ---- the fingerprint (GET /info, and every measurement's answer) ---------------------------------------------------
# Fields: protocol, hostname, machine, system, cpu_model, cpu_count, clocks, onnxruntime, providers, energy_counters,
# int8_exact. These must be equal on every server of one search (they make measurements comparable):
DEVICE_KIND_FIELDS = ("cpu_model", "cpu_count", "machine", "onnxruntime", "providers", "energy_counters")


def model_path(sha: str) -> str:
    return f"{MODELS_PREFIX}{sha}"


def run_path(sha: str, provider: str, threads: int) -> str:
    return f"{RUN_PREFIX}{sha}?" + urllib.parse.urlencode({"provider": provider, "threads": threads})


def auth_headers(token: str) -> dict[str, str]:
    return {AUTHORIZATION: f"{BEARER} {token}"}


def busy_seconds(status: int, retry_after: str | None) -> float | None:
    """How long a busy server asks the client to wait (a 503 with Retry-After), else None."""
    if status == HTTPStatus.SERVICE_UNAVAILABLE and retry_after and retry_after.strip().isdigit():
        return max(0.1, float(retry_after))
    return None


def device_kind(fingerprint: dict) -> str:
    """The DEVICE_KIND_FIELDS of a fingerprint, in words (part of the remote measurer's cache identity: keep it)."""
    fp = fingerprint
    return f"{fp.get('cpu_model')} x{fp.get('cpu_count')}, {fp.get('machine')}, ONNX Runtime {fp.get('onnxruntime')}, " \
           f"{'+'.join(fp.get('providers', []))}, energy counters: {', '.join(fp.get('energy_counters', [])) or 'none'}"


_warned_deprecated_token = False


def token_from_environment() -> str | None:
    """The token from $EXPLORER_SERVER_TOKEN, else from the deprecated $EXPLORER_AGENT_TOKEN (one line on stderr,
    once per process, says to rename it); None when neither is set."""
    global _warned_deprecated_token
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token
    token = os.environ.get(DEPRECATED_TOKEN_ENV)
    if token and not _warned_deprecated_token:
        _warned_deprecated_token = True
        print(f"explorer: warning: ${DEPRECATED_TOKEN_ENV} is deprecated and goes in the next release: "
              f"set ${TOKEN_ENV} instead", file=sys.stderr, flush=True)
    return token or None


def deprecated_names(module: str, names: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module's `__getattr__` (PEP 562) that still serves the names from before the measurement server was
    called a server (old -> new), with a DeprecationWarning, for one release more."""

    def __getattr__(name: str) -> Any:
        if name in names:
            warnings.warn(f"{module}.{name} is deprecated and goes in the next release: use {module}.{names[name]}",
                          DeprecationWarning, stacklevel=2)
            return namespace[names[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
