"""Benchmarks for pgexecutor (not part of the installed package)."""
