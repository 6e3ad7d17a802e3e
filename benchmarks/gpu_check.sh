#!/bin/sh
# The GPU check, in one go, for a machine with an NVIDIA GPU and CuPy (no install needed: it runs
# from the checkout): the environment, a smoke test, every GPU test, the GPU benchmark, then where
# the step's time goes (minicnn/benchmarks/gpu_profile.py). Results go to $OUT (default benchmarks/results):
# gpu-env.txt, gpu-smoke.txt, gpu-tests.txt, gpu-benchmark.txt, gpu-latest.json, gpu-<date>.json,
# gpu-latest.png and gpu-profile.txt.
#
#     sh benchmarks/gpu_check.sh                 # or: OUT=/tmp/out PYTHON=python3.12 sh benchmarks/gpu_check.sh
#     TEST_TIMEOUT=200 BENCH_TIMEOUT=200 PROFILE_TIMEOUT=60 sh benchmarks/gpu_check.sh   # tighter limits (s)
#
# Budget: under 10 minutes in all (the tests get 4, the benchmark 4, the profile 1.5; the
# benchmark's CPU rows compile minicnn's numba kernels first, some 15 s), so that it fits one call
# of a lent machine.
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    $PY -c "import sys, numpy, numba, cupy; print('python', sys.version.split()[0], '| numpy', numpy.__version__,
'| numba', numba.__version__, '| cupy', cupy.__version__, '| CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())"
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1
    $PY -c "import minicnn; print('minicnn', minicnn.__version__, '| GPU available:', minicnn.gpu_available())"
} 2>&1 | tee "$OUT/gpu-env.txt"

# A smoke test first, so that a basic failure shows at once: one training step on each GPU path.
$PY - <<'PY' 2>&1 | tee "$OUT/gpu-smoke.txt"
import numpy as np, minicnn
from minicnn.backend import to_device, synchronize
from minicnn.engines import using
fast_kernels = lambda on: using('auto' if on else 'textbook')
from minicnn.models import EmotionClassifier
from minicnn.training import train_step
from minicnn.engines.gpu.graph import CudaGraphStep
x = to_device(np.random.default_rng(0).standard_normal((64, 1, 48, 48)).astype(np.float32), "gpu")
y = np.arange(64) % 7
from minicnn.engines.gpu import kernels as gpu
for name, fast, graph in (("plain", False, False), ("kernels", True, False), ("graph", True, True)):
    if graph and not gpu.cublas_capturable():
        print("smoke graph: not available (neither CuPy nor cuBLAS called directly can be captured here)", flush=True)
        continue
    try:
        with fast_kernels(fast):
            minicnn.manual_seed(0)
            model = EmotionClassifier().to("gpu")
            opt = minicnn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            crit = minicnn.nn.CrossEntropyLoss()
            step = CudaGraphStep(model, crit, opt) if graph else None
            for _ in range(4):
                loss, _ = step(x, y) if graph else train_step(model, crit, opt, x, y)
            synchronize()
            print(f"smoke {name}: ok, loss {float(loss):.4f}", flush=True)
    except Exception as exc:
        import traceback
        traceback.print_exc()
        print(f"smoke {name}: FAILED ({type(exc).__name__}: {exc})", flush=True)
PY

# Every test case that runs on CuPy: the backend-parametrised gradient checks and PyTorch parity
# tests (plain path and CUDA kernels), the kernels, CUDA graphs, training and the benchmark's GPU rows.
timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider -k "cupy" --maxfail=20 -rfs tests 2>&1 | tail -60 | tee "$OUT/gpu-tests.txt"

timeout ${BENCH_TIMEOUT:-240} $PY -m benchmarks --gpu --repeats 10 --out "$OUT" 2>&1 | tee "$OUT/gpu-benchmark.txt"

timeout ${PROFILE_TIMEOUT:-90} $PY -m minicnn.benchmarks.gpu_profile 2>&1 | tee "$OUT/gpu-profile.txt"
