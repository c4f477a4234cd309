"""Core layer: admission, the one path every purge takes into the engine, whatever its source.

HTTP batches, operators' PURGEs and multicast datagrams all go through :meth:`Admission.admit`, which applies
each rule once, in this order: the URLs (one validation function, including the size of the PURGE request each
becomes), the journal's state, the memory ceilings (``max_pending`` unique URLs, ``max_pending_bytes`` of URL bytes held in
the log), then the token buckets (per source, such as a multicast group; per API token, with a bucket of its
own for the high lane; and per client address). It answers with the accepted receipt and the per-URL rejections, or
raises :class:`Refused` with a reason, a status hint and when to retry; every refused or rejected purge is
counted on the engine by source and reason. Sans-IO: ``now`` is an argument.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from .auth import Token
from .engine import Engine, Receipt
from .errors import InvalidURL, PurgedError
from .http1 import PURGE_OVERHEAD
from .limits import TokenBucket
from .urls import DEFAULT_MAX_LENGTH, parse_url, parse_urls_fast

MAX_CLIENT_BUCKETS = 10_000  # per-address rate limit state kept, least recently used dropped first
OVERLOAD_RETRY_AFTER = 5.0  # seconds a client is told to wait when over max_pending or the journal fails


class Refused(PurgedError):
    """Nothing of the request was accepted; the client may retry after ``retry_after`` seconds (if set)."""

    reason = "refused"
    status = 429

    def __init__(self, detail: str, *, reason: str, status: int = 429, retry_after: float | None = None):
        super().__init__(detail, reason=reason, status=status)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class URLRules:
    max_length: int = DEFAULT_MAX_LENGTH
    max_request_bytes: int = 16384  # the PURGE request line + headers one URL becomes
    allow_bare_host: bool = False  # HTCP's ``test.com`` means ``http://test.com/``


@dataclass
class Validated:
    targets: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"index", "reason", "detail"}

    def reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rejected:
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
        return counts


_CHUNK = 256  # a batch the fast path declines is retried in chunks this long: one bad URL costs only its chunk


def validate_urls(urls: list[Any], rules: URLRules = URLRules()) -> Validated:
    """Validate each URL into a purge target; bad ones are rejected by index and never affect the good ones."""
    out = Validated()
    max_length, room = rules.max_length, rules.max_request_bytes - PURGE_OVERHEAD
    n = len(urls)
    fast = parse_urls_fast(urls, max_length, room) if n > 1 else None
    if fast is not None:  # every URL in the common form: the batch checked at once
        out.targets = fast
        return out
    if n <= _CHUNK:
        _one_by_one(urls, 0, rules, out)
        return out
    for start in range(0, n, _CHUNK):
        chunk = urls[start : start + _CHUNK]
        fast = parse_urls_fast(chunk, max_length, room) if len(chunk) > 1 else None
        if fast is not None:
            out.targets += fast
        else:
            _one_by_one(chunk, start, rules, out)
    return out


def _one_by_one(urls: list[Any], start: int, rules: URLRules, out: Validated) -> None:
    """:func:`validate_urls` URL by URL (``urls[0]`` is at index ``start`` of the request)."""
    max_length, room, bare = rules.max_length, rules.max_request_bytes - PURGE_OVERHEAD, rules.allow_bare_host
    targets, rejected = out.targets, out.rejected
    for i, url in enumerate(urls, start):
        try:
            target = parse_url(url, max_length=max_length, allow_bare_host=bare)
        except InvalidURL as exc:
            rejected.append({"index": i, "reason": exc.reason, "detail": exc.detail})
            continue
        if len(target) > room:  # targets are ASCII: one byte a character
            rejected.append({
                "index": i, "reason": "request_too_large",
                "detail": f"the PURGE request would be {len(target) + PURGE_OVERHEAD} bytes, "
                          f"over limits.max_request_bytes ({rules.max_request_bytes})",
            })
            continue
        targets.append(target)


@dataclass(frozen=True, slots=True)
class Admitted:
    receipt: Receipt | None  # None: no valid URL in the request (nothing reached the log)
    rejected: list[dict]


class Admission:
    def __init__(self, engine: Engine, *, client_rate: float = 0.0, client_burst: float = 0.0,
                 max_pending: int = 0, max_pending_bytes: int = 0, rules: URLRules = URLRules()):
        self.engine = engine
        self.rules, self._bare_rules = rules, replace(rules, allow_bare_host=True)
        self.client_rate, self.client_burst = client_rate, client_burst
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._sources: dict[str, TokenBucket] = {}
        self._clients: OrderedDict[str, TokenBucket] = OrderedDict()
        self._tokens: dict[tuple[str, str], TokenBucket] = {}  # (token name, "all" | "high") -> its bucket

    def configure(self, *, client_rate: float, client_burst: float, max_pending: int, rules: URLRules,
                  max_pending_bytes: int = 0) -> None:
        """New limits (a reload); the buckets of clients start afresh when their rate changed."""
        if (client_rate, client_burst) != (self.client_rate, self.client_burst):
            self._clients.clear()
        self.client_rate, self.client_burst = client_rate, client_burst
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.rules, self._bare_rules = rules, replace(rules, allow_bare_host=True)

    def pending_bytes(self) -> int:
        """URL bytes held in the logs (every lane), the measure ``max_pending_bytes`` caps."""
        return sum(lane.log.bytes for lane in self.engine.lanes)

    def limit_source(self, source: str, rate: float, burst: float, now: float) -> None:
        """Give ``source`` (a multicast group) a token bucket of its own; ``rate <= 0`` removes it."""
        if rate > 0:
            self._sources[source] = TokenBucket(rate, burst or rate, now)
        else:
            self._sources.pop(source, None)

    def admit(
        self,
        urls: list[Any],
        *,
        source: str,
        now: float,
        client: str | None = None,
        priority: str = "bulk",
        journal_error: str | None = None,
        bare_host: bool = False,
        token: Token | None = None,
    ) -> Admitted:
        """Validate ``urls`` and submit the valid ones as one batch, or raise :class:`Refused` (nothing
        accepted). ``journal_error`` is the journal's failure reason while it cannot write; ``bare_host`` reads
        a URL without a slash as a host (HTCP); ``token`` (the API token that authorised the request) applies
        its ``rate`` and, for ``priority="high"``, its ``rate_high``."""
        checked = self.screen(urls, source=source, now=now, client=client, priority=priority,
                              journal_error=journal_error, bare_host=bare_host, token=token)
        if not checked.targets:
            return Admitted(None, checked.rejected)
        return Admitted(self.engine.submit(checked.targets, now, source, priority), checked.rejected)

    def screen(
        self,
        urls: list[Any],
        *,
        source: str,
        now: float,
        client: str | None = None,
        priority: str = "bulk",
        journal_error: str | None = None,
        bare_host: bool = False,
        token: Token | None = None,
    ) -> Validated:
        """Every rule of :meth:`admit` without the submit: the valid targets to accept (a fleet publishes them
        to its stream instead), the per-URL rejections, or :class:`Refused`. Rejections are counted."""
        engine = self.engine
        checked = validate_urls(urls, self._bare_rules if bare_host else self.rules)
        for reason, count in checked.reasons().items():
            engine.reject(source, reason, count)
        count = len(checked.targets)
        if not count:
            return checked
        try:
            self._check(count, source, client, now, journal_error)
            if token is not None:
                self._check_token(token, count, priority == "high", now)
            self._check_client(client, count, now)
        except Refused as exc:
            engine.reject(source, exc.reason, count)
            raise
        return checked

    def _check(self, count: int, source: str, client: str | None, now: float, journal_error: str | None) -> None:
        if journal_error is not None:
            raise Refused("the journal cannot write; retry later", reason=journal_error, status=503,
                          retry_after=OVERLOAD_RETRY_AFTER)
        limit = self.max_pending
        if limit:
            engine = self.engine
            if engine.unique_pending() + count > limit:
                engine.trim()
                pending = engine.unique_pending()
                if pending + count > limit:
                    raise Refused(f"{pending} unique URLs pending, the ceiling is {limit}; retry later",
                                  reason="overload", retry_after=OVERLOAD_RETRY_AFTER)
        byte_limit = self.max_pending_bytes
        if byte_limit:
            held = self.pending_bytes()
            if held > byte_limit:  # one batch may cross the line (its size is known only once merged)
                self.engine.trim()
                held = self.pending_bytes()
                if held > byte_limit:
                    raise Refused(f"{held} bytes of URLs pending, the ceiling is {byte_limit} "
                                  "(limits.max_pending_bytes); retry later", reason="overload",
                                  retry_after=OVERLOAD_RETRY_AFTER)
        bucket = self._sources.get(source)
        if bucket is not None:
            when = bucket.admit(count, now)
            if when is not None:
                raise Refused(f"{source} is over its rate of {bucket.rate:g} purges/s", reason="rate_limited",
                              retry_after=when - now)

    def _check_token(self, token: Token, count: int, high: bool, now: float) -> None:
        """The token's own buckets: ``rate`` over both lanes, ``rate_high`` for the high lane. Both are
        checked before either is charged, so a refused request costs nothing."""
        checks = []
        if token.rate > 0:
            checks.append((self._token_bucket(token.name, "all", token.rate, now), token.rate, ""))
        if high and token.rate_high > 0:
            checks.append((self._token_bucket(token.name, "high", token.rate_high, now), token.rate_high,
                           " on the high lane"))
        for bucket, rate, lane in checks:
            bucket._refill(now)
            if bucket.tokens < min(count, bucket.burst):
                when = bucket.when_available(min(count, bucket.burst))
                raise Refused(f"token {token.name!r} is over its rate of {rate:g} purges/s{lane}",
                              reason="rate_limited", retry_after=max(1.0, math.ceil(when - now)))
        for bucket, _, _ in checks:
            bucket.consume(count, now)

    def _token_bucket(self, name: str, lane: str, rate: float, now: float) -> TokenBucket:
        bucket = self._tokens.get((name, lane))
        if bucket is None or bucket.rate != rate:  # new, or the token's rate changed in a reload
            bucket = self._tokens[(name, lane)] = TokenBucket(rate, rate, now)
        return bucket

    def forget_tokens(self, names: set[str]) -> None:
        """Drop the buckets of tokens no longer configured (tokens.yaml reloaded)."""
        for key in [k for k in self._tokens if k[0] not in names]:
            del self._tokens[key]

    def _check_client(self, client: str | None, count: int, now: float) -> None:
        if client is not None and self.client_rate > 0:
            bucket = self._client_bucket(client, now)
            when = bucket.admit(count, now)
            if when is not None:
                raise Refused(f"client {client} is over {self.client_rate:g} purges/s", reason="rate_limited",
                              retry_after=max(1.0, math.ceil(when - now)))

    def _client_bucket(self, client: str, now: float) -> TokenBucket:
        bucket = self._clients.pop(client, None) or TokenBucket(self.client_rate, self.client_burst or self.client_rate,
                                                                now)
        self._clients[client] = bucket
        if len(self._clients) > MAX_CLIENT_BUCKETS:
            self._clients.popitem(last=False)
        return bucket
