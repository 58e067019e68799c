"""Benchmark kit for issue 4: `python -m bench.run [--quick]` (see bench/README.md)."""
