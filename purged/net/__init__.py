"""Trio adapters: the thin I/O layer around the sans-IO core."""
