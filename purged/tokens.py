"""Config layer: ``tokens.yaml`` -> :class:`~purged.core.auth.TokenTable`, with dotted-path errors.

```yaml
tokens:
  - name: changeprop
    sha256: "<hex SHA-256 of the token>"   # purgectl token new NAME --scope ... prints the line
    scopes: [purge]                        # purge | purge:high | read | admin
    rate: 5000                             # optional: URLs/s for this token (429 + Retry-After past it)
    rate_high: 100                         # optional: URLs/s on the high lane (default 100; 0: unlimited)
```
Every problem is a :class:`~purged.config.ConfigError` naming its path (``tokens[2].sha256: ...``); the daemon
refuses to start on one, and on SIGHUP keeps the tokens it has.
"""

from __future__ import annotations

import re
from typing import Any

from .config import ConfigError, read_yaml
from .core.auth import DEFAULT_RATE_HIGH, SCOPES, Token, TokenTable
from .validate import Errors, join, list_of, mapping, positive, show, string

_HEX64 = re.compile(r"[0-9a-fA-F]{64}\Z")


def _token(value: Any, path: str, errs: Errors) -> Token | None:
    m = mapping(value, path, errs, {"name", "sha256", "scopes", "rate", "rate_high"})
    if m is None:
        return None
    before = len(errs.items)
    for key in ("name", "sha256", "scopes"):
        if key not in m:
            errs.add(join(path, key), "required")
    name = string(m["name"], join(path, "name"), errs) if "name" in m else None
    if name is not None and not name.isprintable():
        errs.add(join(path, "name"), f"must be printable (it is logged), got {show(name)}")
    digest = None
    if "sha256" in m:
        text = m["sha256"]
        if not isinstance(text, str) or not _HEX64.match(text):
            errs.add(join(path, "sha256"), "expected the 64 hex digits of the token's SHA-256 "
                     f"(purgectl token new prints it), got {show(text, 20)}")
        else:
            digest = bytes.fromhex(text)
    scopes: list[str] = []
    if "scopes" in m:
        items = list_of(m["scopes"], join(path, "scopes"), errs) or []
        if not items and isinstance(m["scopes"], list):
            errs.add(join(path, "scopes"), f"must list at least one of {', '.join(SCOPES)}")
        for i, scope in enumerate(items):
            if scope not in SCOPES:
                errs.add(f"{path}.scopes[{i}]", f"expected one of {', '.join(SCOPES)}, got {show(scope)}")
            else:
                scopes.append(scope)
    rates = {}
    for key in ("rate", "rate_high"):
        if key in m:
            parsed = positive()(m[key], join(path, key), errs)
            if parsed is not None:
                rates[key] = float(parsed)
    if len(errs.items) != before or name is None or digest is None:
        return None
    return Token(name, digest, frozenset(scopes), rates.get("rate", 0.0), rates.get("rate_high", DEFAULT_RATE_HIGH))


def parse_tokens(data: Any) -> TokenTable:
    """Validate the mapping loaded from tokens.yaml, or raise :class:`ConfigError` listing every problem."""
    errs = Errors()
    m = mapping(data, "", errs, {"tokens"})
    tokens: list[Token] = []
    if m is not None:
        if "tokens" not in m:
            errs.add("tokens", "required")
        else:
            items = list_of(m["tokens"], "tokens", errs) or []
            tokens = [t for i, v in enumerate(items) if (t := _token(v, f"tokens[{i}]", errs))]
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token.name in seen:
            errs.add(f"tokens[{i}].name", f"{token.name!r} is used twice (the audit log must tell them apart)")
        seen.setdefault(token.name, i)
    digests = [t.digest for t in tokens]
    if len(set(digests)) != len(digests):
        errs.add("tokens", "two entries have the same sha256")
    if errs.items:
        raise ConfigError(errs.items)
    return TokenTable(tokens)


def load_tokens(path: str) -> TokenTable:
    """Read and parse tokens.yaml; every problem is a :class:`ConfigError` whose lines start with ``path``."""
    try:
        return parse_tokens(read_yaml(path))
    except ConfigError as exc:
        raise ConfigError([line if line.startswith(path) else f"{path}: {line}" for line in exc.errors]) from None
