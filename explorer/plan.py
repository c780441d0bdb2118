"""Decision and Plan: what explorer chooses for every decision layer."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from explorer.errors import ExplorerError

PLAN_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Decision:
    """How one decision layer runs: its factorisation rung, precision and processor."""

    method: str = "full"  # full | svd (fully connected) | channel | spatial (convolutions)
    rank: int | None = None  # None at full rank
    precision: str = "fp32"  # fp32 | fp16 | int8
    processor: str | None = None  # a processor id of the board; None = not placed yet

    @property
    def rung(self) -> tuple[str, int | None]:
        """The compression rung (method, rank) of this decision."""
        return (self.method, self.rank)

    @property
    def placed_processor(self) -> str:
        """The processor id, for code that needs a placed decision (ExplorerError if it is not placed)."""
        if self.processor is None:
            raise ExplorerError(f"decision {self.label()} is not placed on a processor: place every layer first")
        return self.processor

    def label(self) -> str:
        """Compact readable form, e.g. 'channel:16/int8@gpu'."""
        rung = "full" if self.method == "full" else f"{self.method}:{self.rank}"
        where = f"@{self.processor}" if self.processor else ""
        return f"{rung}/{self.precision}{where}"

    @classmethod
    def from_label(cls, text: str) -> Decision:
        """The decision a :meth:`label` wrote (e.g. 'channel:16/int8@gpu'), as MLflow's trial params hold it."""
        rung, slash, rest = text.partition("/")
        precision, _, processor = rest.partition("@")
        method, colon, rank = rung.partition(":")
        if not slash or not precision or (method != "full") != bool(colon) or (colon and not rank.isdigit()):
            raise ExplorerError(f"{text!r} is not a decision label (expected e.g. 'full/fp32@cpu' or 'svd:32/int8@gpu')")
        return cls(method, int(rank) if colon else None, precision, processor or None)


@dataclass(frozen=True)
class Plan:
    """One Decision per decision layer, keyed by layer name, in layer order."""

    decisions: tuple[tuple[str, Decision], ...]

    @classmethod
    def from_dict(cls, mapping: dict[str, Decision]) -> Plan:
        return cls(tuple(mapping.items()))

    @classmethod
    def uniform(cls, layer_names, decision: Decision = Decision()) -> Plan:
        """The same decision for every layer (default: the uncompressed fp32 model)."""
        return cls(tuple((name, decision) for name in layer_names))

    def __getitem__(self, layer_name: str) -> Decision:
        return dict(self.decisions)[layer_name]

    def as_dict(self) -> dict[str, Decision]:
        return dict(self.decisions)

    def with_decision(self, layer_name: str, decision: Decision) -> Plan:
        """A copy with one layer's decision replaced."""
        return Plan(tuple((n, decision if n == layer_name else d) for n, d in self.decisions))

    def to_json(self) -> dict:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "decisions": [{"layer": name, "method": d.method, "rank": d.rank, "precision": d.precision,
                           "processor": d.processor} for name, d in self.decisions],
        }

    def digest(self) -> str:
        """Stable SHA-256 of the plan's decisions (independent of Python's hash seed); computed once per plan."""
        known = self.__dict__.get("_digest")
        if known is None:
            text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
            known = hashlib.sha256(text.encode()).hexdigest()
            object.__setattr__(self, "_digest", known)  # a cache, not a field: equality and hash ignore it
        return known

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        if not isinstance(data, dict):
            raise ExplorerError(f"plan JSON is a {type(data).__name__}, not an object: expected {{'schema_version': "
                                f"{PLAN_SCHEMA_VERSION}, 'decisions': [...]}}")
        if "format" in data and isinstance(data.get("plan"), dict):  # a bundle's plan.json: its (best) plan
            data = data["plan"]
        version = data.get("schema_version", PLAN_SCHEMA_VERSION)
        # a bundle's plan.json ("format") carries the bundle's schema version, which the runtime checks
        if "format" not in data and version != PLAN_SCHEMA_VERSION:
            raise ExplorerError(f"plan schema_version {version!r} is not one this explorer reads ({PLAN_SCHEMA_VERSION}): "
                                "write the plan with this version of explorer (explorer solve --out, or a search's export)")
        try:
            return cls(tuple(
                (entry["layer"], Decision(entry.get("method", "full"), entry.get("rank"),
                                          entry.get("precision", "fp32"), entry.get("processor")))
                for entry in data["decisions"]
            ))
        except (KeyError, TypeError) as exc:
            raise ExplorerError(f"plan JSON is malformed (missing {exc}): expected "
                                "{'decisions': [{'layer': ..., 'method': ..., 'rank': ..., 'precision': ...}]}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Plan:
        path = Path(path)
        if not path.exists():
            raise ExplorerError(f"plan file not found: {path}")
        if path.is_dir():
            raise ExplorerError(f"{path} is a folder, not a plan file: give its plan.json (e.g. {path / 'plan.json'})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ExplorerError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ExplorerError(f"cannot read the plan file {path} ({exc}): give a plan.json written by explorer") from None
        return cls.from_json(data)
