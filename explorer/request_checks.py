"""What the measurement server checks before it runs uploaded blocks, for every endpoint that does
(explorer.serve's /measure and /measure-interleaved, explorer.offload's /run): the request's input
descriptions, the inputs against what the blocks declare, and the memory a job needs at least. A
request that fails a check is a RequestError: the HTTP status and a one-line message for the client.
"""
from __future__ import annotations

import json
from http import HTTPStatus

import numpy as np
import onnxruntime as ort

from explorer.http_api import INPUT_DTYPES, MAX_INPUT_ELEMENTS, MAX_INPUTS, MODEL_MISSING, model_path

DTYPES = {name: np.dtype(name) for name in INPUT_DTYPES}  # what a chain's inputs are drawn as
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)", "int32": "tensor(int32)",
             "uint8": "tensor(uint8)", "float64": "tensor(double)", "int8": "tensor(int8)", "int16": "tensor(int16)",
             "uint16": "tensor(uint16)", "uint32": "tensor(uint32)", "uint64": "tensor(uint64)",
             "bool": "tensor(bool)"}  # how ONNX Runtime names them in a session's declared inputs (measure draws DTYPES)
# The worker's runtime (Python, NumPy, ONNX Runtime, one small session: 84 MB resident, measured 2026-12-02 on x86-64
# with ONNX Runtime 1.31), counted in every job's memory.
WORKER_RUNTIME_BYTES = 128 << 20


class RequestError(Exception):
    """A bad request: the HTTP status and a message for the client (and, for 503, when to try again)."""

    def __init__(self, status: HTTPStatus, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


# A model's signature, as ONNX Runtime reads it: {"inputs": [[name, "tensor(float)", [dims: int | str | None]]],
# "outputs": [names]}. The server learns it the first time it opens the model (on the device, in the worker) and
# checks later requests against it before they queue.
Signature = dict


def bad_request(message: str) -> RequestError:
    """A 400 with this message."""
    return RequestError(HTTPStatus.BAD_REQUEST, message)


def model_missing(sha: str) -> RequestError:
    """A 404 for a model the server does not hold (the client uploads it and asks again)."""
    return RequestError(HTTPStatus.NOT_FOUND, f"model {sha} is not on this server: {MODEL_MISSING} (PUT {model_path(sha)})")


def integer_field(value, name: str, low: int, high: int, where: str = "") -> int:
    """`value` when it is an integer (not a bool) in low..high, else a 400 naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"{where}'{name}' must be an integer {low}..{high} (got {json.dumps(value)[:60]})")
    return value


def parse_inputs(specs, where: str = "") -> dict[str, tuple[list[int], str]]:
    """The request's input descriptions {name: (shape, dtype)}, every field checked (400), nothing drawn."""
    if not isinstance(specs, dict) or len(specs) > MAX_INPUTS:
        raise bad_request(f"{where}'inputs' must map at most {MAX_INPUTS} input names to {{\"shape\": [...], \"dtype\": ...}}")
    parsed, elements = {}, 0
    for name, spec in specs.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        dtype = spec.get("dtype", "float32") if isinstance(spec, dict) else None
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_INPUT_ELEMENTS for d in shape)
                or not isinstance(dtype, str) or dtype not in DTYPES):
            raise bad_request(f"{where}input {name!r}: give 'shape' as at most 16 positive integers and 'dtype' one of "
                              f"{', '.join(DTYPES)}")
        elements += int(np.prod(shape, dtype=np.int64))
        if elements > MAX_INPUT_ELEMENTS:
            raise bad_request(f"{where}the inputs hold more than {MAX_INPUT_ELEMENTS} (2^26) elements in all: "
                              "send smaller shapes")
        parsed[name] = (shape, dtype)
    return parsed


def session_signature(session: ort.InferenceSession) -> Signature:
    """What the server checks requests against: the declared inputs (name, type, dims) and the output names."""
    return {"inputs": [[i.name, i.type, list(i.shape or [])] for i in session.get_inputs()],
            "outputs": [o.name for o in session.get_outputs()]}


def check_inputs(inputs: dict[str, tuple[list[int], str]], signatures: list[Signature], where: str = "") -> None:
    """400 unless the inputs are exactly what the chain needs from outside (the inputs of each block that no
    earlier block produces), each with its declared element type, rank and fixed dimensions."""
    produced: set[str] = set()
    needed: dict[str, tuple[int, str, list]] = {}
    for index, signature in enumerate(signatures):
        for name, kind, dims in signature["inputs"]:
            if name not in produced and name not in needed:
                needed[name] = (index, kind, dims)
        produced.update(signature["outputs"])
    for name, (index, kind, dims) in needed.items():
        if name not in inputs:
            raise bad_request(f"{where}block {index} needs input {name!r}, which neither the request's inputs nor an earlier "
                              "block provides")
        shape, dtype = inputs[name]
        if ORT_TYPES.get(dtype) != kind:
            raise bad_request(f"{where}input {name!r} is {kind} in block {index}, not {dtype}")
        if len(shape) != len(dims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, shape)):
            raise bad_request(f"{where}input {name!r} has shape {shape}; block {index} declares {dims} (a name is any size)")
    extra = sorted(set(inputs) - set(needed))
    if extra:
        raise bad_request(f"{where}input {', '.join(map(repr, extra))} is no input of the chain (it needs "
                          f"{', '.join(map(repr, needed)) or 'none'})")


def estimate_memory_bytes(models: list[bytes], inputs: dict[str, tuple[list[int], str]]) -> int:
    """What a measurement needs at least, from what is known before anything runs: the worker's own runtime, each
    model twice (the bytes received and ONNX Runtime's initializers; prepacked weights may add more) and the
    inputs three times (the drawn arrays, and outputs of like size in ONNX Runtime's CPU arena, which grows in
    powers of two). Activations beyond that are not known without running: the worker's resident memory is
    watched while it runs."""
    input_bytes = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES.get(dtype, dtype)).itemsize
                      for shape, dtype in inputs.values())
    return WORKER_RUNTIME_BYTES + 2 * sum(map(len, models)) + 3 * input_bytes


def draw_inputs(inputs: dict[str, tuple[list[int], str]], seed: int) -> dict[str, np.ndarray]:
    """The inputs, drawn standard normal with `seed` (float32 first: no float64 copy of a large input)."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32).astype(DTYPES[dtype], copy=False)
            for name, (shape, dtype) in inputs.items()}
