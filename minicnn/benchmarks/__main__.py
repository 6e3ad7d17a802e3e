import os
import sys

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # before NumPy loads: see minicnn/benchmarks/run.py

from minicnn.benchmarks.run import main  # noqa: E402

sys.exit(main())
