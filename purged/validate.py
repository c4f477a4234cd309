"""Config layer: generic checks of YAML-loaded values, each problem recorded with its dotted key path
(``datacenters.eqiad.tiers[1].nodes[0]``) rather than raised, so that every problem is reported at once."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any


class Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)


# Past this, a number is a typo (in seconds: 30 million years) and integers stop being exact as floats; it also keeps
# huge integers (YAML reads 1000 digits happily) away from float(), which raises OverflowError past 1.8e308.
MAX_NUMBER = 10**15


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` safe for error messages: short, one line, and never raising (``repr`` of an integer past
    4300 digits raises ValueError)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"{'-' if value < 0 else ''}an integer of {len(format(abs(value), 'x'))} hex digits"
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ (not from YAML, but parse_config takes any mapping)
        text = f"<{type_name(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def join(path: str, key: Any) -> str:
    """``path.key``; a key that is not a plain printable string is shown as its repr (no newline in a message)."""
    if not isinstance(key, str) or not key.isprintable():
        key = show(key)
    return f"{path}.{key}" if path else key


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def mapping(value: Any, path: str, errs: Errors, allowed: set[str]) -> Mapping[str, Any] | None:
    if not isinstance(value, Mapping):
        errs.add(path, f"expected a mapping, got {type_name(value)}")
        return None
    for key in value:
        if not isinstance(key, str):
            errs.add(path, f"keys must be strings, got {show(key)}")
        elif key not in allowed:
            errs.add(join(path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value


_NUMERIC_STRING = re.compile(r"[-+]?(?:[0-9][0-9_]*)?\.?[0-9_]*[eE][-+]?[0-9]+\Z")


def number(
    value: Any, path: str, errs: Errors, *, minimum: float = 0.0, maximum: float = MAX_NUMBER, integer: bool = False
) -> Any:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        hint = ""
        if isinstance(value, str) and _NUMERIC_STRING.match(value):  # YAML 1.1 reads 1e5 (no dot) as a string
            hint = f" {show(value)} (YAML reads an exponent as a number only with a dot and a sign: 1.0e+5)"
        errs.add(path, f"expected {'an integer' if integer else 'a number'}, got {type_name(value)}{hint}")
        return None
    if isinstance(value, float) and not math.isfinite(value):  # .nan, .inf, 1.0e+400 (not isfinite(int): overflows)
        errs.add(path, f"expected a finite number, got {value}")
        return None
    if value < minimum:
        errs.add(path, f"must be >= {minimum:g}, got {show(value)}")
        return None
    if value > maximum:
        errs.add(path, f"must be <= {maximum:g}, got {show(value)}")
        return None
    return value


def string(value: Any, path: str, errs: Errors) -> str | None:
    if not isinstance(value, str) or not value:
        errs.add(path, f"expected a non-empty string, got {type_name(value)}")
        return None
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # YAML's "\ud800" escape: a lone surrogate, not a character
            errs.add(path, f"contains a lone surrogate, got {show(value)}")
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
