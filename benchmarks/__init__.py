"""Benchmarks: minicnn against PyTorch on the same machine (``python -m benchmarks``)."""
