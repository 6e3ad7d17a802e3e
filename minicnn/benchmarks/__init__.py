"""Benchmarks: minicnn against PyTorch on the same machine.

    minicnn bench --quick            # or: python -m minicnn.benchmarks --quick
    python -m benchmarks --quick     # the same, from a source checkout

PyTorch is the rival here, never a dependency: rows for a library that is not installed are left
out (``pip install torch`` for the PyTorch rows).
"""
