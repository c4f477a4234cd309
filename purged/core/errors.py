"""Core layer: the error hierarchy. Each error carries a machine-readable ``reason`` (a metric label)."""


class PurgedError(Exception):
    """Base of every error purged raises on purpose. ``reason`` is short, stable, snake_case."""

    reason = "error"
    status = 400  # HTTP status hint for the API layer

    def __init__(self, detail: str = "", *, reason: str | None = None, status: int | None = None):
        super().__init__(detail or self.reason)
        self.detail = detail
        if reason is not None:
            self.reason = reason
        if status is not None:
            self.status = status


class InvalidURL(PurgedError):
    """A URL or host that purged refuses to purge."""

    reason = "invalid_url"


class DecodeError(PurgedError):
    """A datagram or body that does not decode (HTCP, msgpack, JSON)."""

    reason = "malformed"


class Overloaded(PurgedError):
    """The daemon is over its memory ceiling; the caller should retry later."""

    reason = "overload"
    status = 429
