"""``python -m benchmarks`` in a source checkout: minicnn.benchmarks, writing to benchmarks/results.

The code is in minicnn/benchmarks (so an installed minicnn has it too: ``minicnn bench``); this
folder keeps the committed results and the GPU machine's script, gpu_check.sh.
"""
