"""Core layer: API tokens and their scopes (sans-IO: no sockets, no files, no clock).

A :class:`TokenTable` holds the configured tokens by the SHA-256 of their secret (tokens.yaml never holds a
token itself). :meth:`TokenTable.authenticate` hashes what a client presented and compares the digest with
every entry in constant time (``hmac.compare_digest``; no early exit), so neither the response time nor a
dictionary lookup tells an attacker how close a guess was. :func:`authorize` turns an ``Authorization`` header
and the scopes a route needs into the :class:`Token` or an :class:`AuthError` (401: no or unknown token, with
``WWW-Authenticate: Bearer``; 403: a known token without the scope).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .errors import PurgedError

SCOPES = ("purge", "purge:high", "read", "admin")
DEFAULT_RATE_HIGH = 100.0  # URLs/s a token may put on the high lane unless its entry says ``rate_high``
MAX_TOKEN_CHARS = 4096  # a longer Authorization header is not one of our tokens (and is not hashed)


class AuthError(PurgedError):
    """401 (``unauthorized``: no token or an unknown one) or 403 (``forbidden``: the token lacks the scope)."""

    def __init__(self, detail: str, *, reason: str, status: int):
        super().__init__(detail, reason=reason, status=status)
        self.headers = [("WWW-Authenticate", 'Bearer realm="purged"')] if status == 401 else []


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    digest: bytes  # SHA-256 of the secret (32 bytes)
    scopes: frozenset[str]
    rate: float = 0.0  # URLs/s for this token over both lanes; 0: no per-token limit
    rate_high: float = DEFAULT_RATE_HIGH  # URLs/s on the high lane (``"priority": "high"``, PURGE); 0: no limit

    def allows(self, *any_of: str) -> bool:
        return not self.scopes.isdisjoint(any_of)


def token_digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token).digest()


class TokenTable:
    def __init__(self, tokens: list[Token] | tuple[Token, ...] = ()):
        self.tokens = tuple(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def authenticate(self, presented: str | bytes) -> Token | None:
        """The token whose digest matches ``presented``, else None. Every entry is compared (constant time)."""
        digest = token_digest(presented)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest) and found is None:
                found = token
        return found


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_TOKEN_CHARS:
        return None
    return value


def authorize(table: TokenTable | None, header: str | None, *any_of: str) -> Token | None:
    """The token allowed to do what needs one of ``any_of``; None when there is no table (anonymous API).
    With no scope named, any known token passes (the scope is checked later, e.g. after the body is read)."""
    if table is None:
        return None
    presented = bearer(header)
    if presented is None:
        raise AuthError("this API needs a token: send Authorization: Bearer <token>", reason="unauthorized",
                        status=401)
    token = table.authenticate(presented)
    if token is None:
        raise AuthError("unknown token", reason="unauthorized", status=401)
    require(token, *any_of)
    return token


def require(token: Token | None, *any_of: str) -> None:
    """Raise a 403 unless ``token`` (None: anonymous API, everything allowed) has one of ``any_of``."""
    if token is None or not any_of or token.allows(*any_of):
        return
    need = " or ".join(any_of)
    raise AuthError(f"token {token.name!r} lacks the scope {need}", reason="forbidden", status=403)
