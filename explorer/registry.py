"""Things made by name: a name maps to a "module:Attr" entry point, imported on first use (as Gymnasium's registry).

One mechanism for the search agents (explorer.searching's `AGENT_REGISTRY`, `make_agent`), the measurers
(explorer.measure's `MEASURER_REGISTRY`, `make_measurer`) and the model zoo (explorer.zoo's `ZOO`). An entry point names its
target by string, so a registry never imports what it lists until it is asked for: naming the core's
registries costs nothing, the core does not import agents/ (which build on it), and asking for "random"
does not load torch. An unknown name is one ExplorerError with the closest known name ("did you mean").

    from explorer.searching import AGENT_REGISTRY
    AGENT_REGISTRY.register("my-agent", "mypackage.agents:MyAgent")   # then --agent my-agent
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Generic, TypeVar

from explorer.errors import ExplorerError

T = TypeVar("T")


def load_entry_point(entry_point: str) -> Any:
    """The object an entry point names: "package.module:Attr" (or "package.module:Class.attr")."""
    module_name, sep, attribute = entry_point.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"entry point {entry_point!r} is not of the form 'module:Attr'")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """'did you mean 'X'? ' for the known name closest to `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.4)
    return f"did you mean {close[0]!r}? " if close else ""


class Registry(MutableMapping[str, T], Generic[T]):
    """Names -> objects, each given as a "module:Attr" entry point (imported when first asked for) or as
    the object itself. A Mapping of the loaded objects, in registration order (as Gymnasium's registry is
    a dict); `lookup` is the one-line-error form of `[name]`; `register` adds a name that is not taken,
    `registry[name] = target` sets or replaces one.

    `kind` names what it holds in errors ("agent"); `hint` says how to choose ("`explorer models` lists
    them"; default: the known names)."""

    def __init__(self, kind: str, entries: Mapping[str, str | T] | None = None, hint: str | None = None):
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, str | T] = {}
        self._loaded: dict[str, T] = {}
        for name, target in (entries or {}).items():
            self.register(name, target)

    def register(self, name: str, target: str | T) -> None:
        """Add `name` (ValueError if it is taken): `target` is an entry point "module:Attr" or the object."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self[name] = target

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entry_point(self, name: str) -> str | None:
        """The entry point `name` was registered with (None: registered as an object)."""
        target = self._entries[name]
        return target if isinstance(target, str) else None

    def lookup(self, name: str) -> T:
        """The object called `name`, imported now if it was not yet; ExplorerError for an unknown name."""
        if name not in self._entries:
            raise self.unknown(name)
        return self[name]

    def unknown(self, name: str) -> ExplorerError:
        """The error for an unknown name: what it is not, the closest name, how to choose."""
        return ExplorerError(f"unknown {self.kind} {name!r}: {did_you_mean(name, self.names())}"
                             f"{self.hint or 'choose one of ' + ', '.join(self._entries)}")

    def __getitem__(self, name: str) -> T:
        if name not in self._loaded:
            target = self._entries[name]  # KeyError for an unknown name, as a Mapping does
            self._loaded[name] = load_entry_point(target) if isinstance(target, str) else target
        return self._loaded[name]

    def __setitem__(self, name: str, target: str | T) -> None:
        self._entries[name] = target
        self._loaded.pop(name, None)
        if not isinstance(target, str):
            self._loaded[name] = target

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._loaded.pop(name, None)

    def __contains__(self, name: object) -> bool:  # without importing the entry point
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
