"""Run an exported bundle (see :mod:`explorer.export`) with ONNX Runtime.

:meth:`Bundle.load` reads ``plan.json``, checks its schema, refuses file names that point outside
the bundle, verifies the SHA-256 of every file, and opens one ONNX Runtime session per unit block
with the execution provider the board maps the block's processor to (its provider options and
intra-op threads, on top of :func:`explorer.precision.session_options`: ONNX Runtime's defaults,
under which int8 QDQ nodes run on integer kernels exactly as they were scored). A provider this ONNX Runtime lacks falls back to the CPU with a
:class:`ProviderFallbackWarning`, or raises with ``strict=True``. :meth:`Bundle.run` chains the
blocks: each gets the tensors it needs from the input and the blocks before it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from explorer.errors import ExplorerError
from explorer.export import BUNDLE_FORMAT, BUNDLE_SCHEMA_VERSION, MANIFEST_FILE
from explorer.precision import session_options

CPU_PROVIDER = "CPUExecutionProvider"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20
_EXPORT_AGAIN = "the bundle was modified; export it again"


class ProviderFallbackWarning(RuntimeWarning):
    """A block runs on the CPU because ONNX Runtime here lacks the provider its processor maps to."""


@dataclass
class BlockSession:
    """One unit block of a loaded bundle and the ONNX Runtime session that runs it."""

    index: int
    file: str
    processor: str
    provider: str  # the provider the board maps the processor to
    runs_on: str  # the provider ONNX Runtime actually runs it on
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    session: ort.InferenceSession


class Bundle:
    """A verified bundle with one open session per block: load once, run many inputs."""

    def __init__(self, path: Path, manifest: dict[str, Any], blocks: list[BlockSession], fallbacks: list[str]):
        self.path = path
        self.manifest = manifest
        self.blocks = blocks
        self.fallbacks = fallbacks  # one message per block that fell back to the CPU
        model = manifest["model"]
        self.input_name: str = model["input"]["name"]
        self.input_shape: list = model["input"]["shape"]  # symbolic dimensions as strings
        self.input_dtype = np.dtype(model["input"]["dtype"])
        self.inputs: list[dict[str, Any]] = model.get("inputs") or [model["input"]]  # every input: name, shape, dtype
        self.output_names: list[str] = model["outputs"]
        last_use: dict[str, int] = {}
        for block in blocks:
            for name in block.inputs:
                last_use[name] = block.index
        self._free_after = [[n for n, i in last_use.items() if i == block.index and n not in self.output_names]
                            for block in blocks]

    @classmethod
    def load(cls, path: Path | str, strict: bool = False) -> "Bundle":
        """Read, validate and verify the bundle in folder `path` and open its sessions.

        `strict`: raise instead of falling back to the CPU when a block's provider is missing.
        """
        root = Path(path).expanduser()
        manifest = _read_manifest(root)
        block_files = {b["file"] for b in manifest["blocks"]}  # hashed below, from the bytes the session reads
        for name, expected in manifest["files"].items():
            if name not in block_files:
                _check_sha256(name, _file_sha256(_bundle_file(root, name)), expected)
        blocks, fallbacks = [], []
        for entry in manifest["blocks"]:
            data = _bundle_file(root, entry["file"]).read_bytes()
            _check_sha256(entry["file"], hashlib.sha256(data).hexdigest(), manifest["files"][entry["file"]])
            session, runs_on = _open_session(entry, data, strict, fallbacks)
            del data
            block = BlockSession(entry["index"], entry["file"], entry["processor"], entry["provider"], runs_on,
                                 tuple(entry["inputs"]), tuple(entry["outputs"]), session)
            _check_block_io(block)
            blocks.append(block)
        return cls(root, manifest, blocks, fallbacks)

    @property
    def providers(self) -> list[str]:
        """The provider each block actually runs on, in block order."""
        return [block.runs_on for block in self.blocks]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model requires, or None when its batch dimension is dynamic."""
        batch = self.input_shape[0] if self.input_shape else None
        return batch if isinstance(batch, int) and batch > 0 else None

    @property
    def input_names(self) -> list[str]:
        return [entry["name"] for entry in self.inputs]

    def run(self, x: np.ndarray | Mapping[str, np.ndarray],
            timing: bool = False) -> np.ndarray | tuple[np.ndarray, list[float]]:
        """The model's first output for the batch `x` (a model with several inputs: input name -> batch);
        with `timing`, also each block's milliseconds."""
        outputs, block_ms = self.run_all(x, timing=True)
        first = outputs[self.output_names[0]]
        return (first, block_ms) if timing else first

    def run_all(self, x: np.ndarray | Mapping[str, np.ndarray],
                timing: bool = False) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], list[float]]:
        """Every model output by name for the batch `x` (a model with several inputs: input name -> batch);
        with `timing`, also each block's milliseconds.

        A model with a fixed batch size runs `x` in chunks of that size (the last chunk padded).
        """
        feeds = self._checked_inputs(x)
        count_all = len(next(iter(feeds.values())))
        step = self.fixed_batch or count_all
        block_ms = [0.0] * len(self.blocks)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for start in range(0, count_all, max(step, 1)):
            chunk = {name: value[start:start + step] for name, value in feeds.items()}
            count = len(next(iter(chunk.values())))
            if count < step:
                chunk = {name: np.concatenate([value, np.repeat(value[-1:], step - count, axis=0)])
                         for name, value in chunk.items()}
            values = self._chain(chunk, block_ms)
            for name in self.output_names:
                parts[name].append(values[name][:count])
        outputs = {name: np.concatenate(chunks) if len(chunks) > 1 else chunks[0] for name, chunks in parts.items()}
        return (outputs, block_ms) if timing else outputs

    def _chain(self, inputs: dict[str, np.ndarray], block_ms: list[float]) -> dict[str, np.ndarray]:
        """Run the blocks in order on one batch, adding each block's wall time to `block_ms`."""
        values = dict(inputs)
        for block, done_with in zip(self.blocks, self._free_after):
            feeds = {name: values[name] for name in block.inputs}
            start = time.perf_counter()
            results = block.session.run(list(block.outputs), feeds)
            block_ms[block.index] += (time.perf_counter() - start) * 1e3
            values.update(zip(block.outputs, results))
            for name in done_with:
                values.pop(name, None)
        return values

    def _checked_inputs(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every input's batch by name, checked against its declared shape and dtype."""
        names = self.input_names
        if not isinstance(x, Mapping):
            if len(names) > 1:
                raise ExplorerError(f"the model takes {len(names)} inputs ({', '.join(names)}): give one array per input "
                                    f"by name (a .npz with arrays {', '.join(names)})")
            x = {names[0]: x}
        missing = [name for name in names if name not in x]
        if missing:
            raise ExplorerError(f"no array for the model input(s) {', '.join(missing)}: give one array per input by name "
                                f"({', '.join(names)})")
        feeds = {entry["name"]: self._checked_input(x[entry["name"]], entry) for entry in self.inputs}
        if len({len(value) for value in feeds.values()}) > 1:
            raise ExplorerError("the inputs have different numbers of samples: give every input the same samples")
        return feeds

    @staticmethod
    def _checked_input(x: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
        x = np.asarray(x)
        dtype = np.dtype(entry["dtype"])
        if x.dtype != dtype:
            if not (np.issubdtype(x.dtype, np.floating) and np.issubdtype(dtype, np.floating)):
                raise ExplorerError(f"input {entry['name']!r} has dtype {x.dtype} but the model takes {dtype}: "
                                    f"convert it (x.astype('{dtype}')) after the model's preprocessing")
            x = x.astype(dtype)
        dims = entry["shape"]
        if x.ndim != len(dims) or not _fits(dims[1:], x.shape[1:]) or len(x) == 0:
            raise ExplorerError(f"input of shape {_shape_text(x.shape)} does not fit the model input "
                                f"{entry['name']!r} of shape {_shape_text(dims)} (batch first): reshape it")
        return x


# ---- reading and checking a bundle ----------------------------------------------------------------
def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise ExplorerError(f"{root}: no such bundle folder; give a folder written by `explorer export`")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ExplorerError(f"{root} holds no {MANIFEST_FILE}, so it is not a bundle: give a folder written by `explorer export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExplorerError(f"{path} is not valid JSON ({exc}): {_EXPORT_AGAIN}") from None
    _validate_manifest(manifest, path)
    return manifest


def _validate_manifest(manifest: Any, path: Path) -> None:
    """ExplorerError naming the first thing in plan.json that the runtime cannot use."""
    def fail(what: str) -> None:
        raise ExplorerError(f"{path}: {what}; {_EXPORT_AGAIN}")

    def need(table: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(table, dict) or key not in table:
            fail(f"{where}{key} is missing")
        if not isinstance(table[key], kind) or isinstance(table[key], bool) and kind is int:
            fail(f"{where}{key} has the wrong type ({type(table[key]).__name__})")
        return table[key]

    def names(table: dict, key: str, where: str) -> list[str]:
        value = need(table, key, list, where)
        if not all(isinstance(v, str) and v for v in value):
            fail(f"{where}{key} must be a list of tensor names")
        return value

    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        fail(f"not an explorer bundle manifest (format is not {BUNDLE_FORMAT!r})")
    version = need(manifest, "schema_version", int, "")
    if version > BUNDLE_SCHEMA_VERSION:
        raise ExplorerError(f"{path}: bundle schema {version} is newer than this explorer reads ({BUNDLE_SCHEMA_VERSION}): "
                            "upgrade explorer")
    if version != BUNDLE_SCHEMA_VERSION:
        fail(f"bundle schema {version} is not supported (this explorer reads {BUNDLE_SCHEMA_VERSION})")
    files = need(manifest, "files", dict, "")
    for name, checksum in files.items():
        if not (isinstance(checksum, str) and _SHA256.match(checksum)):
            fail(f"files.{name} is not a SHA-256 hex digest")
    model = need(manifest, "model", dict, "")
    if need(model, "file", str, "model.") not in files:
        fail(f"model.file {model['file']!r} has no checksum in files")
    model_inputs = [need(model, "input", dict, "model.")]
    if "inputs" in model:
        model_inputs = need(model, "inputs", list, "model.")
        if not model_inputs or model_inputs[0] != model["input"]:
            fail("model.inputs must list every input, model.input first")
    for i, model_input in enumerate(model_inputs):
        where = "model.input." if i == 0 else f"model.inputs[{i}]."
        need(model_input, "name", str, where)
        shape = need(model_input, "shape", list, where)
        if not all(isinstance(d, (int, str)) for d in shape):
            fail(f"{where}shape must list dimensions (numbers or names)")
        try:
            np.dtype(need(model_input, "dtype", str, where))
        except TypeError:
            fail(f"{where}dtype {model_input['dtype']!r} is not a numpy dtype")
    if not names(model, "outputs", "model."):
        fail("model.outputs is empty")
    blocks = need(manifest, "blocks", list, "")
    if not blocks:
        fail("blocks is empty")
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]."
        if need(block, "index", int, where) != i:
            fail(f"{where}index is {block['index']}, expected {i}")
        if need(block, "file", str, where) not in files:
            fail(f"{where}file {block['file']!r} has no checksum in files")
        need(block, "processor", str, where)
        need(block, "provider", str, where)
        options = need(block, "provider_options", dict, where)
        if not all(isinstance(v, str) for v in options.values()):
            fail(f"{where}provider_options values must be strings")
        if need(block, "threads", int, where) < 1:
            fail(f"{where}threads must be 1 or more")
        names(block, "inputs", where)
        names(block, "outputs", where)
    available = {model_input["name"] for model_input in model_inputs}
    for i, block in enumerate(blocks):
        missing = [t for t in block["inputs"] if t not in available]
        if missing:
            fail(f"block {i} needs {', '.join(missing)}, which neither the input nor an earlier block provides")
        available.update(block["outputs"])
    missing = [t for t in model["outputs"] if t not in available]
    if missing:
        fail(f"no block computes the model output(s) {', '.join(missing)}")


def _bundle_file(root: Path, name: str) -> Path:
    """The file `name` from plan.json inside `root`; ExplorerError if it points outside the bundle."""
    outside = ExplorerError(f"plan.json refers to {name!r}, which is outside the bundle folder {root}: a bundle refers "
                            f"only to files inside its folder; {_EXPORT_AGAIN}")
    windows = PureWindowsPath(name)
    if (not name or "\0" in name or "\\" in name or PurePosixPath(name).is_absolute() or windows.drive
            or ".." in PurePosixPath(name).parts):
        raise outside
    resolved = (root / name).resolve()
    if not resolved.is_relative_to(root.resolve()):  # a symlink that leads out
        raise outside
    if not resolved.is_file():
        raise ExplorerError(f"{name} is listed in plan.json but missing from the bundle {root}: {_EXPORT_AGAIN}")
    return resolved


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _check_sha256(name: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise ExplorerError(f"{name} does not match its checksum in plan.json: {_EXPORT_AGAIN}")


def _open_session(entry: dict[str, Any], data: bytes, strict: bool,
                  fallbacks: list[str]) -> tuple[ort.InferenceSession, str]:
    """A session for one block on its provider (or on the CPU, warning, when that is missing)."""
    provider = entry["provider"]
    where = f"block {entry['index']} (processor {entry['processor']})"
    options = session_options()
    options.intra_op_num_threads = entry["threads"]

    def fall_back(reason: str) -> ort.InferenceSession:
        if strict:
            raise ExplorerError(f"{where}: {reason}; install an ONNX Runtime build with {provider}, "
                                "or run without --strict to fall back to the CPU")
        message = f"{where}: {reason}; running it on {CPU_PROVIDER} instead"
        fallbacks.append(message)
        warnings.warn(message, ProviderFallbackWarning, stacklevel=4)
        return _session(entry, data, options, [CPU_PROVIDER])

    if provider == CPU_PROVIDER:
        return _session(entry, data, options, [(CPU_PROVIDER, entry["provider_options"])]), CPU_PROVIDER
    if provider not in ort.get_available_providers():
        available = ", ".join(ort.get_available_providers())
        return fall_back(f"this ONNX Runtime has no {provider} (it has {available})"), CPU_PROVIDER
    try:
        session = _session(entry, data, options, [(provider, entry["provider_options"]), CPU_PROVIDER])
    except ExplorerError as exc:
        return fall_back(f"{provider} could not open it ({exc})"), CPU_PROVIDER
    runs_on = session.get_providers()[0]
    if runs_on != provider:  # ORT gave up on the provider (e.g. missing driver libraries) on its own
        return fall_back(f"{provider} is installed but ONNX Runtime could not start it"), CPU_PROVIDER
    return session, runs_on


def _session(entry: dict[str, Any], data: bytes, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(data, options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for invalid models and options
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExplorerError(f"ONNX Runtime cannot load {entry['file']}: {first_line}") from None


def _check_block_io(block: BlockSession) -> None:
    """The session's inputs and outputs are the tensors plan.json says cross the block's edges."""
    inputs = {i.name for i in block.session.get_inputs()}
    outputs = {o.name for o in block.session.get_outputs()}
    if inputs != set(block.inputs) or not set(block.outputs) <= outputs:
        raise ExplorerError(f"{block.file} takes {sorted(inputs)} and gives {sorted(outputs)}, but plan.json says "
                            f"{list(block.inputs)} and {list(block.outputs)}: {_EXPORT_AGAIN}")


def _fits(dims: list, shape: tuple[int, ...]) -> bool:
    """Whether an array shape matches declared dimensions (named or unknown ones match any size)."""
    return len(dims) == len(shape) and all(not (isinstance(d, int) and d > 0) or d == n for d, n in zip(dims, shape))


def _shape_text(shape) -> str:
    """'batchx1x32x32': named dimensions by name, unknown ones as '?'."""
    return "x".join("?" if isinstance(d, int) and d <= 0 else str(d) for d in shape) or "scalar"


# ---- the `explorer run` command -----------------------------------------------------------------
def read_input(path: Path | str, names: list[str] | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """The input batch in a .npy file, or the array `x` of a .npz file; for a model with several inputs
    (`names`), a .npz with one array per input by name (`x` may stand for the first)."""
    path = Path(path).expanduser()
    if path.suffix not in (".npy", ".npz"):
        raise ExplorerError(f"{path}: give the input as a .npy file, or a .npz file with an array x")
    if not path.is_file():
        raise ExplorerError(f"input file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if names and len(names) > 1:
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ExplorerError(f"{path}: the model takes {len(names)} inputs ({', '.join(names)}): give a .npz with one "
                                    f"array per input (numpy.savez(path, {', '.join(f'{n}=...' for n in names)}))")
            with loaded:
                arrays = {name: loaded[name] for name in loaded.files}
            if names[0] not in arrays and "x" in arrays:
                arrays[names[0]] = arrays.pop("x")
            missing = [name for name in names if name not in arrays]
            if missing:
                raise ExplorerError(f"{path} has no array for the input(s) {', '.join(missing)} (it has: "
                                    f"{', '.join(arrays) or 'nothing'}): save one array per input by name")
            for name in names:
                if not (np.issubdtype(arrays[name].dtype, np.number) or arrays[name].dtype == np.bool_):
                    raise ExplorerError(f"{path}: input {name} has dtype {arrays[name].dtype}; give a numeric array")
            return {name: arrays[name] for name in names}
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if "x" not in loaded.files and names and names[0] in loaded.files:  # the input by its name
                    return _numeric(path, loaded[names[0]])
                if "x" not in loaded.files:
                    raise ExplorerError(f"{path} has no array x (it has: {', '.join(loaded.files) or 'nothing'}): "
                                        "save the inputs with numpy.savez(path, x=inputs)")
                x = loaded["x"]
        else:
            x = loaded
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ExplorerError(f"{path} is not a valid {path.suffix} file ({exc}): save it with numpy.save / numpy.savez") from None
    return _numeric(path, x)


def _numeric(path: Path, x: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ExplorerError(f"{path}: the input has dtype {x.dtype}; give a numeric array")
    return x


def run_bundle_cli(bundle_dir: Path | str, input_path: Path | str, output_path: Path | str | None = None,
                   strict: bool = False, timing: bool = False) -> dict[str, Any]:
    """Load a bundle, run it on the input file, optionally save the output (.npy); returns a summary.

    A single sample without the batch axis runs as a batch of one. With `timing`, one untimed
    warm-up run on the same input precedes the timed run. :func:`format_run_summary` renders the summary.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)  # reported in the summary instead
        bundle = Bundle.load(bundle_dir, strict=strict)
    x = read_input(input_path, bundle.input_names)
    if isinstance(x, dict):  # several inputs: each a batch with its batch axis
        added_batch_axis = False
        shape = list(next(iter(x.values())).shape)
    else:
        added_batch_axis = _fits(bundle.input_shape[1:], x.shape)
        if added_batch_axis:
            x = x[None]
        shape = list(x.shape)
    if timing:
        bundle.run_all(x)  # warm-up at the same shape: the first run of a shape allocates and plans
    outputs, block_ms = bundle.run_all(x, timing=True)
    output = outputs[bundle.output_names[0]]
    if output_path is not None:  # .npy: the first output; .npz: every output by name
        output_path = Path(output_path).expanduser()
        output_path = _save_npy(output_path, outputs if output_path.suffix == ".npz" else output)
    return {
        "bundle": str(bundle.path),
        "board": bundle.manifest["board"].get("name"),
        "model": bundle.manifest["model"].get("source"),
        "input_shape": shape,
        "added_batch_axis": added_batch_axis,
        "output_name": bundle.output_names[0],
        "output_shape": list(output.shape),
        "top1": output.argmax(axis=1).tolist() if output.ndim == 2 else None,
        "blocks": [{"index": b.index, "processor": b.processor, "provider": b.provider, "runs_on": b.runs_on,
                    "ms": block_ms[b.index] if timing else None} for b in bundle.blocks],
        "total_ms": sum(block_ms) if timing else None,
        "fallbacks": list(bundle.fallbacks),
        "output_path": str(output_path) if output_path is not None else None,
    }


def format_run_summary(summary: dict[str, Any], max_top1: int = 20) -> str:
    """Plain-text lines for a run_bundle_cli summary."""
    lines = [f"bundle {summary['bundle']} ({summary['model']} on {summary['board']})"]
    lines += [f"warning: {message}" for message in summary["fallbacks"]]
    batch_note = " (no batch axis given: ran as a batch of 1)" if summary["added_batch_axis"] else ""
    lines.append(f"input {_shape_text(summary['input_shape'])}{batch_note} -> {summary['output_name']} "
                 f"{_shape_text(summary['output_shape'])}")
    for block in summary["blocks"]:
        ms = f", {block['ms']:.3f} ms" if block["ms"] is not None else ""
        lines.append(f"  block {block['index']}: {block['processor']} on {block['runs_on']}{ms}")
    if summary["total_ms"] is not None:
        lines.append(f"total {summary['total_ms']:.3f} ms (after one warm-up run)")
    if summary["top1"] is not None:
        shown = summary["top1"][:max_top1]
        more = f" ... ({len(summary['top1'])} in all)" if len(summary["top1"]) > max_top1 else ""
        lines.append(f"top-1: {' '.join(map(str, shown))}{more}")
    if summary["output_path"]:
        lines.append(f"wrote {summary['output_path']}")
    return "\n".join(lines)


def _save_npy(path: Path, array: np.ndarray | dict[str, np.ndarray]) -> Path:
    """Write `array` to `path` (.npy) atomically, or arrays by name to a .npz."""
    if path.suffix != (".npz" if isinstance(array, dict) else ".npy"):
        raise ExplorerError(f"{path}: the output is written as .npy (the first output) or .npz (every output by name); "
                            "give a file name ending in .npy or .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(array, dict):
                np.savez(handle, **array)
            else:
                np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
