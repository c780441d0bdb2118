"""Export a plan as a bundle: the compressed model, one ONNX file per unit block, and plan.json.

Bundle layout (a folder)::

    plan.json      what the runtime needs and what the plan is: schema version, board, model hash,
                   decisions, unit blocks (processor, ONNX Runtime provider, tensors, file),
                   predicted and measured metrics, the SHA-256 of every other file
    model.onnx     the whole model rewritten for the plan (ranks and precisions), for reference
    block_<i>.onnx unit block i; run in order, the blocks compute what model.onnx computes

The folder is written atomically: it is built in a hidden temporary sibling and renamed into place
once complete, so an interrupted export leaves either no bundle or the previous one, never a
half-written one. :mod:`explorer.runtime` loads and runs bundles.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx import helper

from explorer.errors import ExplorerError
from explorer.partition import iter_unit_blocks
from explorer.plan import Plan

BUNDLE_SCHEMA_VERSION = 1
BUNDLE_FORMAT = "explorer-bundle"
MANIFEST_FILE = "plan.json"
MODEL_FILE = "model.onnx"
_PROTOBUF_LIMIT = 2**31  # a serialised ONNX protobuf must stay below 2 GB


def block_file(index: int) -> str:
    """File name of unit block `index` in a bundle."""
    return f"block_{index}.onnx"


def explorer_version() -> str:
    """The installed explorer distribution's version ('unknown' when run from an uninstalled tree)."""
    try:
        return metadata.version("explorer")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_bundle(problem, plan: Plan, out_dir: Path | str, evaluation=None, predicted: dict | None = None,
                  run_id: str | None = None, overwrite: bool = False, confirmed: dict | None = None) -> Path:
    """Write the bundle of `plan` for `problem` (a Problem) into `out_dir`; returns its path.

    `evaluation`: the plan's Evaluation (measured metrics and accuracy), `predicted`: metrics a cost
    model predicted (any JSON-ready dict), `run_id`: the MLflow run that produced the plan, `confirmed`: its
    confirmed figures (:func:`explorer.report.confirmed_figures`).
    An existing non-empty `out_dir` is refused unless `overwrite` (then it must be a bundle, and it
    is swapped for the new one only once the new one is complete).
    """
    out_dir = Path(out_dir).expanduser().absolute()
    problem.validate(plan)
    if evaluation is not None and evaluation.plan_digest != plan.digest():
        raise ExplorerError("the evaluation given is of another plan: pass the evaluation of the plan you export")
    replacing = _check_target(out_dir, overwrite)
    manifest = _manifest(problem, plan, evaluation, predicted, run_id, confirmed)  # before any work: fails fast
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = problem.compressor.rewrite(plan, problem.calibration_inputs)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        files = {MODEL_FILE: _write_file(staging / MODEL_FILE, _serialised(model))}
        blocks = []
        for block in iter_unit_blocks(problem.graph, plan, model):
            index, boundary = block.index, block.boundary
            name = block_file(index)
            files[name] = _write_file(staging / name, _serialised(block.model))
            del block
            processor = problem.board.processor(boundary.processor)
            blocks.append({
                "index": index, "file": name, "processor": processor.id, "processor_kind": processor.kind,
                "provider": processor.provider, "provider_options": dict(processor.provider_options),
                "threads": processor.threads, "layers": list(boundary.layer_names),
                "inputs": list(boundary.inputs), "outputs": list(boundary.outputs),
            })
        del model
        manifest.update(blocks=blocks, files=files)
        text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
        _write_file(staging / MANIFEST_FILE, text.encode())
        _sync_directory(staging)
        _move_into_place(staging, out_dir, replacing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_target(out_dir: Path, overwrite: bool) -> bool:
    """Whether `out_dir` holds a bundle to replace; ExplorerError if it must not be written."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExplorerError(f"{out_dir} exists and is not a folder: choose a folder name for the bundle")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return False
    if not overwrite:
        raise ExplorerError(f"{out_dir} already exists and is not empty: choose another folder, or pass --overwrite "
                            "to replace the bundle in it")
    if not (out_dir / MANIFEST_FILE).is_file():
        raise ExplorerError(f"{out_dir} is not empty and holds no {MANIFEST_FILE}, so it is not a bundle: "
                            "explorer replaces only bundles; choose another folder")
    return True


def _manifest(problem, plan: Plan, evaluation, predicted: dict | None, run_id: str | None,
              confirmed: dict | None) -> dict[str, Any]:
    """plan.json without its blocks and files (JSON-ready)."""
    graph, board, dataset = problem.graph, problem.board, problem.scorer.dataset
    declared = {v.name: v for v in graph.model.graph.input}
    inputs = [{"name": name, "shape": [d.dim_param or d.dim_value for d in declared[name].type.tensor_type.shape.dim],
               "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(declared[name].type.tensor_type.elem_type)).name}
              for name in graph.input_names]
    accuracy = None
    if evaluation is not None and evaluation.accuracy is not None:
        accuracy = {"value": evaluation.accuracy, "metric": evaluation.accuracy_metric,
                    "drop": evaluation.accuracy_drop, "drop_points": 100 * evaluation.accuracy_drop,
                    "samples": len(dataset.x) if dataset is not None else 0,
                    "basis": problem.scorer.label, "measured": not problem.scorer.synthetic}
    return _json_ready({
        "format": BUNDLE_FORMAT,
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "explorer_version": explorer_version(),
        "exported_with": {"onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "board": {"name": board.name, "digest": board.digest, "description": board.description},
        "model": {
            "source": graph.source,
            "sha256": graph.fingerprint(),
            "file": MODEL_FILE,
            "input": inputs[0],  # the first input (what readers of one-input bundles read)
            "inputs": inputs,  # every input, in the model's order
            "outputs": list(graph.output_names),
        },
        "data": {
            "description": dataset.source if dataset is not None else "no validation data: accuracy not measured",
            "samples": len(dataset.x) if dataset is not None else 0,
            "sha256": problem.scorer.data_digest(),
            "calibration": problem.calibration_source,
        },
        "plan": {**plan.to_json(), "digest": plan.digest()},
        # how every block and model.onnx ran when scored and measured (runtime.Bundle opens them so)
        "session": {"options": "ONNX Runtime defaults (QDQ fusion on: int8 on integer kernels), intra-op threads per "
                               "block", "int8": problem.compressor.int8_scheme},
        "blocks": [],
        "predicted": predicted,
        "measured": evaluation.to_json() if evaluation is not None else None,
        "confirmed": confirmed,
        "accuracy": accuracy,
        "mlflow_run_id": run_id,
        "files": {},
    })


def _serialised(model: onnx.ModelProto) -> bytes:
    """The model's protobuf bytes; ExplorerError past protobuf's 2 GB limit."""
    too_big = ExplorerError("the compressed model is over 2 GB, the most one ONNX file holds, so it cannot be "
                            "bundled; compress it more (lower ranks, fp16 or int8)")
    try:
        data = model.SerializeToString()
    except (EncodeError, ValueError):  # protobuf refuses to serialise messages over 2 GB
        raise too_big from None
    if len(data) >= _PROTOBUF_LIMIT:
        raise too_big
    return data


def _write_file(path: Path, data: bytes) -> str:
    """Write `data` to `path` durably; returns its SHA-256."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def _sync_directory(path: Path) -> None:
    """Make the folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: Path, out_dir: Path, replacing: bool) -> None:
    """Rename the complete bundle `staging` to `out_dir`, swapping out the old bundle if `replacing`."""
    if not replacing:
        try:
            os.replace(staging, out_dir)  # out_dir is absent or an empty folder (checked before)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise ExplorerError(f"{out_dir} was written by something else during the export: export again "
                                "(with --overwrite to replace it)") from None
    elif _exchange(staging, out_dir):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old bundle
    else:  # no atomic exchange on this system: park the old bundle, move the new one, restore on failure
        parked = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rename(out_dir, parked / "bundle")
        try:
            os.rename(staging, out_dir)
        except BaseException:
            os.rename(parked / "bundle", out_dir)
            raise
        finally:
            shutil.rmtree(parked, ignore_errors=True)
    _sync_directory(out_dir.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where it is unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _json_ready(value: Any) -> Any:
    """`value` with numpy scalars and arrays as plain Python and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ExplorerError(f"cannot write {type(value).__name__} to plan.json: pass JSON-ready metrics (numbers, text)")
