"""purged: a CDN cache purge fan-out daemon."""

__version__ = "0.1.0"
