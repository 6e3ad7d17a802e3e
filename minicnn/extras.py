"""Optional dependencies, by use: each feature that needs one says which extra installs it.

    pip install minicnn              # the core: NumPy, numba, Pillow, tqdm, threadpoolctl
    pip install 'minicnn[plots]'     # pictures: explain, visualize, training curves (matplotlib)
    pip install 'minicnn[onnx]'      # ONNX export (onnx) and running it (onnxruntime)
    pip install 'minicnn[apps]'      # faces in photos and video (OpenCV 4, whose wheels ship face detectors)
    pip install 'minicnn[distributed]'  # data-parallel training: mpi4py and MPICH's mpiexec
    pip install 'minicnn[gpu]'       # CuPy for CUDA 12 (or pip install cupy-cuda13x for CUDA 13)
    pip install 'minicnn[all]'       # every extra that needs no particular hardware
"""
import importlib
import importlib.util

__all__ = ["MissingExtra", "require", "available", "EXTRAS"]

# module -> (extra, what it is for)
EXTRAS = {"matplotlib": ("plots", "pictures"), "cupy": ("gpu", "the GPU"), "onnx": ("onnx", "ONNX export"),
          "onnxruntime": ("onnx", "running ONNX models"), "cv2": ("apps", "face detection and video"),
          "mpi4py": ("distributed", "training on several processes")}


def available(module):
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


class MissingExtra(ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""


def require(module, feature):
    """Import ``module`` for ``feature`` (e.g. "minicnn explain"), or raise a one-line MissingExtra
    saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra, _ = EXTRAS.get(module.split(".")[0], (None, None))
        how = f"pip install 'minicnn[{extra}]'" if extra else f"pip install {module}"
        pkg = {"cv2": "opencv-python-headless"}.get(module.split(".")[0], module.split(".")[0])
        raise MissingExtra(f"{feature} needs {pkg}, which is not installed: {how}") from None
