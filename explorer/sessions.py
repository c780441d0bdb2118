"""ONNX Runtime sessions, opened and run the one way explorer does it.

Every session explorer opens - a model being scored, a measured unit block, a calibration benchmark,
an offloaded block on a measurement server, a block of an exported bundle, the shape probe - starts from
:func:`session_options`: ONNX Runtime's defaults, so that its QDQ fusion runs int8 nodes on integer
kernels (QLinearConv, MatMulInteger, ...) exactly as a plain ONNX Runtime session of a bundle's
``model.onnx`` does ("scored as deployed"). Only the threads are set, and for a board's processor no
spinning: unit blocks run as a chain of sessions, one at a time, on the same cores. :func:`open_session`
opens one on a provider (strictly: an error when that provider is missing or ONNX Runtime gives up on
it, never a silent fall-back to the CPU), errors say the first line of ONNX Runtime's message
(:func:`explorer.errors.error_line`); :func:`run_batched` runs feeds in batches (a fixed batch
honoured) and :func:`run_chain` runs unit blocks in order, each fed from the inputs and the blocks
before it.

Only NumPy and ONNX Runtime are imported here (and explorer.errors): the measurement server's install
has nothing more.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnxruntime as ort

from explorer.errors import ExplorerError, error_line

if TYPE_CHECKING:
    import onnx

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
SCORING_THREADS_VARIABLE = "EXPLORER_SCORING_THREADS"
SCORING_BATCH = 500  # samples per ONNX Runtime call when the model's batch is symbolic (at most)

Feeds = dict[str, np.ndarray]


# ---- options, threads, providers ---------------------------------------------------------------------
def session_options(threads: int = 0) -> ort.SessionOptions:
    """The ONNX Runtime options every session starts from: ORT's defaults, so that its QDQ fusion runs int8
    nodes on integer kernels, as a plain ORT session of the bundle's model.onnx does. Quantisation that
    cannot saturate those kernels is chosen when the model is rewritten
    (:func:`explorer.precision.int8_reduce_range`). `threads` > 0 (a board's processor: measured blocks and a bundle's
    blocks) sets the intra-op threads, one inter-op thread (which the default sequential execution does not use) and
    no spinning between runs; 0 keeps ORT's defaults (one thread per core, spinning).
    """
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # A block's session whose threads spin after each run (ORT's default) steals the cores from the next block's
        # session in a chain: measured on this 2-core host, the same 21-block cnn plan took 10-18 ms with spinning and
        # 1.2-2.2 ms without, a vgg chain 0.22-0.34 ms (+/-20 % run to run) against 0.27-0.28 ms.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def scoring_threads() -> int:
    """ONNX Runtime's intra-op threads for scoring models on the CPU: $EXPLORER_SCORING_THREADS, or 0 (its
    default, one per core). 1 suits several searches sharing the cores; the outputs do not depend on it."""
    value = os.environ.get(SCORING_THREADS_VARIABLE, "0").strip() or "0"
    try:
        threads = int(value)
    except ValueError:
        threads = -1
    if threads < 0:
        raise ExplorerError(f"{SCORING_THREADS_VARIABLE}={value!r} is not a whole number of threads: "
                            "set it to 1, 2, ... or unset it for ONNX Runtime's default")
    return threads


def worker_environment(workers: int, cores: int | None = None) -> dict[str, str]:
    """The environment for one of `workers` processes that share this machine's cores: the caller's, with
    $EXPLORER_SCORING_THREADS set to an equal share of the cores unless the user set it already."""
    environment = dict(os.environ)
    if not environment.get(SCORING_THREADS_VARIABLE, "").strip():
        environment[SCORING_THREADS_VARIABLE] = str(max(1, (cores or os.cpu_count() or 1) // workers))
    return environment


def session_providers(provider: str, provider_options: Mapping[str, str] | None = None) -> list:
    """The providers a session on `provider` gets: its own (with its options, if any), then the CPU provider
    for any node its own lacks, as ONNX Runtime places nodes."""
    own: Any = provider if provider_options is None else (provider, dict(provider_options))
    return [own] + ([CPU_PROVIDER] if provider != CPU_PROVIDER else [])


# ---- opening a session -------------------------------------------------------------------------------
class SessionError(ExplorerError):
    """ONNX Runtime could not open a session (`line`: the first line of its error)."""

    def __init__(self, message: str, line: str = ""):
        super().__init__(message)
        self.line = line or message


class ProviderMissing(SessionError):
    """This ONNX Runtime build lacks the provider a session was asked to run on."""

    def __init__(self, provider: str):
        self.provider, self.available = provider, ort.get_available_providers()
        super().__init__(f"this ONNX Runtime has no {provider} (it has {', '.join(self.available)})")


class ProviderNotStarted(SessionError):
    """ONNX Runtime has the provider but gave up on it (e.g. missing driver libraries) and put the session on
    another one (`runs_on`)."""

    def __init__(self, provider: str, runs_on: str):
        self.provider, self.runs_on = provider, runs_on
        super().__init__(f"{provider} is installed but ONNX Runtime could not start it (it would run on {runs_on})")


def open_session(model: bytes | onnx.ModelProto, provider: str = CPU_PROVIDER, threads: int = 0, *,
                 provider_options: Mapping[str, str] | None = None, options: ort.SessionOptions | None = None,
                 strict: bool = True, what: str = "the model") -> ort.InferenceSession:
    """A session for `model` (serialised, or an onnx.ModelProto) on `provider` (nodes it lacks on the CPU),
    under :func:`session_options` (`threads`) unless `options` are given.

    SessionError (an ExplorerError naming `what` and ONNX Runtime's first line) when ONNX Runtime cannot
    load it; with `strict`, ProviderMissing when this ONNX Runtime lacks the provider and ProviderNotStarted
    when it has it but runs the session elsewhere: a caller decides whether to fall back to the CPU.
    """
    if strict and provider not in ort.get_available_providers():
        raise ProviderMissing(provider)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        session = ort.InferenceSession(data, options if options is not None else session_options(threads),
                                       providers=session_providers(provider, provider_options))
    except Exception as error:  # ORT raises InvalidProtobuf, Fail, InvalidGraph, ... for bad models and options
        line = error_line(error)
        raise SessionError(f"ONNX Runtime cannot load {what}: {line}", line) from None
    if strict and session.get_providers()[0] != provider:
        raise ProviderNotStarted(provider, session.get_providers()[0])
    return session


def scoring_session(model: bytes | onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session for scoring or checking a model: the options every bundle runs with (int8 on integer
    kernels), with :func:`scoring_threads`."""
    return open_session(model, CPU_PROVIDER, scoring_threads())


# ---- running -----------------------------------------------------------------------------------------
def run_in_batches(run: Callable[[Feeds], Sequence[np.ndarray]], feeds: Mapping[str, np.ndarray], step: int,
                   pad: bool) -> list[np.ndarray]:
    """`run`'s outputs on feeds of N samples each, computed `step` samples at a time and joined; with `pad`, a
    last batch shorter than `step` is padded with its last sample (a model with a fixed batch) and the padding
    dropped from the outputs."""
    step = max(step, 1)
    count = len(next(iter(feeds.values())))
    parts: list[list[np.ndarray]] = []
    for start in range(0, count, step):
        chunk = {name: value[start:start + step] for name, value in feeds.items()}
        size = len(next(iter(chunk.values())))
        if pad and size < step:
            chunk = {name: np.concatenate([value, np.repeat(value[-1:], step - size, axis=0)])
                     for name, value in chunk.items()}
        parts.append([result[:size] for result in run(chunk)])
    return parts[0] if len(parts) == 1 else [np.concatenate(values) for values in zip(*parts)]


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size the session's first input requires, or None when its batch dimension is symbolic."""
    shape = session.get_inputs()[0].shape
    declared = shape[0] if shape else None
    return declared if isinstance(declared, int) and declared > 0 else None


def run_batched(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None,
                batch: int = SCORING_BATCH) -> list[np.ndarray]:
    """The session's outputs (all, or those named) on feeds of N samples each, computed in batches: of
    `batch` samples, or of the model's fixed batch size, the last batch padded with its last sample."""
    fixed = fixed_batch(session)
    return run_in_batches(lambda chunk: session.run(outputs, chunk), feeds, fixed or batch, pad=fixed is not None)


def run_model(model: onnx.ModelProto | ort.InferenceSession, x: np.ndarray, batch: int = SCORING_BATCH,
              extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """First output of the model on inputs x (the first input; `extra`: the other inputs by name),
    computed in batches (a fixed batch size is respected) on a :func:`scoring_session`."""
    session = model if isinstance(model, ort.InferenceSession) else scoring_session(model)
    feeds = {session.get_inputs()[0].name: x, **(extra or {})}
    return run_batched(session, feeds, [session.get_outputs()[0].name], batch)[0]


class ChainStep(NamedTuple):
    """One unit block of a chain: the tensors it takes, those it gives, and what runs it (feed -> outputs in
    the order of `outputs`)."""

    inputs: Sequence[str]
    outputs: Sequence[str]
    run: Callable[[Feeds], Sequence[np.ndarray]]


class MissingInput(LookupError):
    """A block of a chain needs a tensor that neither the inputs nor an earlier block gives."""

    def __init__(self, block: int, name: str):
        self.block, self.name = block, name
        super().__init__(f"block {block} needs input {name!r}, which neither the inputs nor an earlier block provides")


def run_chain(steps: Sequence[ChainStep], inputs: Mapping[str, np.ndarray],
              forget: Sequence[Collection[str]] | None = None) -> Feeds:
    """Run unit blocks in order, each fed the tensors it takes from `inputs` and the blocks before it; every
    tensor by name (inputs and outputs), less those in `forget[i]`, dropped after block i (their last use),
    so that the memory goes back during the chain. MissingInput when a block's input is nowhere."""
    values = dict(inputs)
    for index, step in enumerate(steps):
        missing = next((name for name in step.inputs if name not in values), None)
        if missing is not None:
            raise MissingInput(index, missing)
        values.update(zip(step.outputs, step.run({name: values[name] for name in step.inputs})))
        for name in forget[index] if forget else ():
            values.pop(name, None)
    return values
