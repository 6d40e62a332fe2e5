"""Benchmarks: `python -m benchmarks` runs each table in its own process and rewrites BENCHMARKS.md."""
