"""Benchmarks: every part of ``fedadapt bench``, the bare Flower app, the peak-memory meter.

What each part measures and how to read it: docs/benchmarks.md.
"""
