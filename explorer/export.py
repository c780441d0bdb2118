"""Export a plan as a bundle: the compressed model, its unit blocks, and plan.json.

Bundle layout (a folder)::

    plan.json             what the runtime needs and what the plans are: schema version, board, model hash,
                          the best plan's decisions, unit blocks (processor, ONNX Runtime provider, tensors,
                          file), predicted, measured and confirmed metrics; the plan set (every plan with its
                          blocks, figures and the conditions it needs); the SHA-256 of every other file; and
                          `digest`, the SHA-256 of plan.json itself (its canonical JSON without that field),
                          so that an edited plan.json is refused like an edited block
    model.onnx            the best plan's whole model rewritten (ranks and precisions), for reference
    blocks/SHA256.onnx    one unit block, named by the SHA-256 of its bytes: a block that several plans of
                          the set share is stored once; run in order, a plan's blocks compute its model

The folder is written atomically: it is built in a hidden temporary sibling and renamed into place
once complete, so an interrupted export leaves either no bundle or the previous one, never a
half-written one. :mod:`explorer.runtime` loads and runs bundles (schema 1 bundles, one plan and
``block_<i>.onnx`` files without a manifest digest, still load).
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
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx import helper

from explorer.cache import fsync_path
from explorer.errors import ExplorerError
from explorer.partition import iter_unit_blocks
from explorer.plan import Plan

BUNDLE_SCHEMA_VERSION = 2  # 2: a plan set, content-addressed blocks, plan.json's own digest
READABLE_SCHEMA_VERSIONS = (1, 2)
BUNDLE_FORMAT = "explorer-bundle"
MANIFEST_FILE = "plan.json"
MODEL_FILE = "model.onnx"
_PROTOBUF_LIMIT = 2**31  # a serialised ONNX protobuf must stay below 2 GB


BLOCKS_FOLDER = "blocks"


def block_file(sha256: str) -> str:
    """File name (inside the bundle) of the unit block whose bytes have this SHA-256."""
    return f"{BLOCKS_FOLDER}/{sha256}.onnx"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON (sorted keys, no spaces) without its own `digest` field."""
    body = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def explorer_version() -> str:
    """The installed explorer distribution's version ('unknown' when run from an uninstalled tree)."""
    try:
        return metadata.version("explorer")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_bundle(problem, plan: Plan, out_dir: Path | str, evaluation=None, predicted: dict | None = None,
                  run_id: str | None = None, overwrite: bool = False, confirmed: dict | None = None,
                  plan_set: list | None = None) -> Path:
    """Write the bundle of `plan` for `problem` (a Problem) into `out_dir`; returns its path.

    `evaluation`: the plan's Evaluation (measured metrics and accuracy), `predicted`: metrics a cost
    model predicted (any JSON-ready dict), `run_id`: the MLflow run that produced the plan, `confirmed`: its
    confirmed figures (:func:`explorer.report.confirmed_figures`), `plan_set`: the bundle's plans
    (:func:`explorer.planset.search_plan_set`, `plan` first; default: `plan` alone).
    An existing non-empty `out_dir` is refused unless `overwrite` (then it must be a bundle, and it
    is swapped for the new one only once the new one is complete).
    """
    from explorer.planset import ROLE_BEST, SetMember, describe, network_needs, plan_figures

    out_dir = Path(out_dir).expanduser().absolute()
    problem.validate(plan)
    if evaluation is not None and evaluation.plan_digest != plan.digest():
        raise ExplorerError("the evaluation given is of another plan: pass the evaluation of the plan you export")
    members = plan_set or [SetMember(plan, evaluation, confirmed, [ROLE_BEST])]
    if members[0].plan != plan:
        raise ExplorerError("the plan set must start with the plan exported as the best")
    for member in members[1:]:
        problem.validate(member.plan)
    replacing = _check_target(out_dir, overwrite)
    manifest = _manifest(problem, plan, evaluation, predicted, run_id, confirmed)  # before any work: fails fast
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        (staging / BLOCKS_FOLDER).mkdir()
        files: dict[str, str] = {}
        plans = []
        for number, member in enumerate(members):
            model = problem.compressor.rewrite(member.plan, problem.calibration_inputs)
            if number == 0:
                files[MODEL_FILE] = _write_file(staging / MODEL_FILE, _serialised(model))
            blocks = []
            for block in iter_unit_blocks(problem.graph, member.plan, model):
                index, boundary = block.index, block.boundary
                block.model.graph.name = "unit_block"  # not its index: the same block in two plans has the same bytes
                data = _serialised(block.model)
                del block
                name = block_file(hashlib.sha256(data).hexdigest())
                if name not in files:  # a block another plan already wrote is stored once
                    files[name] = _write_file(staging / name, data)
                del data
                processor = problem.board.processor(boundary.processor)
                blocks.append({
                    "index": index, "file": name, "processor": processor.id, "processor_kind": processor.kind,
                    "remote": processor.is_remote, "provider": processor.provider,
                    "provider_options": dict(processor.provider_options), "threads": processor.threads,
                    "layers": list(boundary.layer_names), "inputs": list(boundary.inputs), "outputs": list(boundary.outputs),
                })
            del model
            figures = plan_figures(member, problem)
            plans.append(_json_ready({
                "id": f"p{number}", "description": describe(problem, member.plan), "roles": list(member.roles),
                "digest": member.plan.digest(), "decisions": member.plan.to_json()["decisions"], "blocks": blocks,
                "figures": figures,
                "needs": {"latency_ms": figures["latency_ms"] if figures else None,
                          "memory_mb": figures["local_memory_mb"] if figures else None,
                          "memory_mb_by_processor": figures["memory_mb_by_processor"] if figures else None,
                          "network": network_needs(problem, member.plan)},
            }))
        manifest.update(blocks=plans[0]["blocks"], plans=plans, files=files)
        manifest["digest"] = manifest_digest(manifest)
        text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
        _write_file(staging / MANIFEST_FILE, text.encode())
        fsync_path(staging / BLOCKS_FOLDER)
        fsync_path(staging)
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
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
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
        # what the runtime minimises when it picks a plan of the set (explorer.adapt)
        "objective": {"description": problem.objective.describe(), "weights": [list(w) for w in problem.objective.weights]},
        # how every block and model.onnx ran when scored and measured (runtime.Bundle opens them so)
        "session": {"options": "ONNX Runtime defaults (QDQ fusion on: int8 on integer kernels), intra-op threads per "
                               "block, no spinning between runs", "int8": problem.compressor.int8_scheme},
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
    fsync_path(out_dir.parent)


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
