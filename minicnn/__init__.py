"""minicnn: deep learning from scratch, with every forward and backward pass in plain array code.

    import minicnn
    from minicnn.models import EmotionClassifier

    model = EmotionClassifier()
    logits = model(x)                                  # x: (N, 1, 48, 48) float32
    criterion = minicnn.nn.CrossEntropyLoss()
    loss = criterion(logits, labels)
    model.backward(criterion.backward())
    opt = minicnn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.step(); opt.zero_grad()
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

# OpenBLAS's idle threads spin for about 0.1 s after each matrix product and steal the
# cores from the numba kernel that follows (1.5-2x a training step's time on 2 cores).
# A short spin fixes it. OpenBLAS reads this when NumPy loads it; if NumPy was imported
# first, the CPU engine has OpenBLAS read it again (minicnn/engines/cpu/__init__.py).
_openblas_spins = "numpy" in _sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in _os.environ
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import backend, nn, engines, optim, models, gradcheck  # noqa: E402
from .backend import DeviceError, get_array_module, gpu_available  # noqa: E402
from .engines import engine  # noqa: E402
from .nn import is_grad_enabled, no_grad  # noqa: E402
from .rng import manual_seed  # noqa: E402
from .inference_session import InferenceSession  # noqa: E402

__all__ = ["nn", "engines", "engine", "optim", "models", "gradcheck", "backend", "get_array_module", "gpu_available",
           "DeviceError", "manual_seed", "no_grad", "is_grad_enabled", "InferenceSession", "__version__"]
