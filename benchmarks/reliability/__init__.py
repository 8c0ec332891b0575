"""Reliability measurements against a self-launched `epd serve`: `python -m benchmarks.reliability MODE`.

Modes (each in its own module, registered in `MODES`): `fuzz` (generated and hostile input), `faults`
(SIGKILL of each instance kind under load), `overload` (far more requests and context than the KV
pool holds), `soak` (mixed traffic over time: memory, segments, pages, fds). Each writes JSON.
"""
