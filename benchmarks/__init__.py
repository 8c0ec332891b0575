"""Benchmarks for epdlang (not an installed package; `epd bench` puts the repo root on sys.path)."""
