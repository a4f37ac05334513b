"""Benchmarks behind `vidlm bench ...`; each module exposes `main(argv) -> int`."""
