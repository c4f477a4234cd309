"""Config layer: generic checks of YAML-loaded values, each problem recorded with its dotted key path
(``datacenters.eqiad.tiers[1].nodes[0]``) rather than raised, so that every problem is reported at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any


class Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def mapping(value: Any, path: str, errs: Errors, allowed: set[str]) -> Mapping[str, Any] | None:
    if not isinstance(value, Mapping):
        errs.add(path, f"expected a mapping, got {type_name(value)}")
        return None
    for key in value:
        if not isinstance(key, str):
            errs.add(path, f"keys must be strings, got {key!r}")
        elif key not in allowed:
            errs.add(join(path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value


def number(value: Any, path: str, errs: Errors, *, minimum: float = 0.0, integer: bool = False) -> Any:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not math.isfinite(value):
        errs.add(path, f"expected {'an integer' if integer else 'a number'}, got {type_name(value)}")
        return None
    if value < minimum:
        errs.add(path, f"must be >= {minimum:g}, got {value}")
        return None
    return value


def string(value: Any, path: str, errs: Errors) -> str | None:
    if not isinstance(value, str) or not value:
        errs.add(path, f"expected a non-empty string, got {type_name(value)}")
        return None
    return value


def list_of(value: Any, path: str, errs: Errors) -> list[Any] | None:
    if not isinstance(value, list):
        errs.add(path, f"expected a list, got {type_name(value)}")
        return None
    return value


def fields(value: Mapping[str, Any], path: str, errs: Errors, spec: dict[str, Callable[..., Any]]) -> dict:
    """Parse the keys present in ``value`` with the converter named for each in ``spec``."""
    out = {}
    for key, convert in spec.items():
        if key in value:
            parsed = convert(value[key], join(path, key), errs)
            if parsed is not None:
                out[key] = parsed
    return out


def positive(**kw: Any) -> Callable[[Any, str, Errors], Any]:
    return lambda v, p, e: number(v, p, e, **kw)
