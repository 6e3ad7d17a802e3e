"""``python -m benchmarks`` in a source checkout: the same as ``minicnn bench`` (minicnn/benchmarks)."""
import runpy

runpy.run_module("minicnn.benchmarks", run_name="__main__", alter_sys=True)
