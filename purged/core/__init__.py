"""Sans-IO core: synchronous, no sockets, no clock, no logging; time is an argument.

Nothing in this package may import trio, httpx, h11, yaml or prometheus_client (a test checks it).
"""
