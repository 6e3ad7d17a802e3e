import os
import sys

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # before NumPy loads: see benchmarks/run.py

from benchmarks.run import main  # noqa: E402

sys.exit(main())
