"""One array module for NumPy and CuPy.

Layers never import numpy or cupy for their math. They ask their input which
module it belongs to::

    xp = get_array_module(x)      # numpy for NumPy arrays, cupy for CuPy arrays
    y = xp.maximum(x, 0)

so one body of code runs on the CPU and on an NVIDIA GPU (the idea comes from
Chainer). CuPy is imported lazily: minicnn works without it, and asking for the
GPU without CuPy or without a GPU raises one clear :class:`DeviceError`.
"""
import numpy as np

__all__ = [
    "DeviceError", "get_array_module", "gpu_available", "gpu_module", "synchronize", "to_device", "to_numpy",
    "device_of", "normalize_device", "float_dtype",
]

_cupy = None          # the cupy module once imported successfully
_cupy_error = None    # why it could not be used, if it was tried and failed


class DeviceError(RuntimeError):
    """The requested device cannot be used (no CuPy, no GPU, unknown name)."""


def _import_cupy():
    """Import cupy once and check that a GPU answers; raise DeviceError otherwise."""
    global _cupy, _cupy_error
    if _cupy is not None:
        return _cupy
    if _cupy_error is not None:
        raise DeviceError(_cupy_error)
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        _cupy_error = (
            "device 'gpu' needs CuPy and an NVIDIA GPU, but CuPy could not be imported "
            f"({type(exc).__name__}: {exc}). Install it with: pip install 'minicnn[gpu]' "
            "(cupy-cuda12x) or pip install cupy-cuda13x to match your CUDA driver.")
        raise DeviceError(_cupy_error) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        count, why = 0, f" ({type(exc).__name__}: {exc})"
    else:
        why = ""
    if count < 1:
        _cupy_error = f"device 'gpu' needs an NVIDIA GPU, but CUDA reports none{why}."
        raise DeviceError(_cupy_error)
    _cupy = cupy
    return cupy


def gpu_available():
    """True when CuPy imports and at least one GPU answers."""
    try:
        _import_cupy()
    except DeviceError:
        return False
    return True


def gpu_module():
    """The ``cupy`` module; raises :class:`DeviceError` when CuPy or a GPU is missing."""
    return _import_cupy()


def synchronize():
    """Wait until the GPU has finished the work queued so far (GPU work runs asynchronously: time it
    only after this). Does nothing when no GPU is in use."""
    if _cupy is not None:
        _cupy.cuda.Device().synchronize()


def _is_cupy_array(a):
    # Checked by type name so that cupy is never imported just to ask.
    return type(a).__module__.startswith("cupy")


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if _is_cupy_array(a):
            return _import_cupy()
    return np


def normalize_device(device):
    """Map user spellings ('cpu', 'gpu', 'cuda', 'cuda:0') to 'cpu' or 'gpu'."""
    name = str(device).lower()
    if name == "cpu":
        return "cpu"
    if name in ("gpu", "cuda") or name.startswith("cuda:") or name.startswith("gpu:"):
        return "gpu"
    raise DeviceError(f"unknown device {device!r}: use 'cpu' or 'gpu'")


def device_of(a):
    """'gpu' for a CuPy array, 'cpu' otherwise."""
    return "gpu" if _is_cupy_array(a) else "cpu"


def to_device(a, device):
    """Return array ``a`` on ``device`` ('cpu' or 'gpu'), copying only if needed."""
    device = normalize_device(device)
    if device == "gpu":
        cp = _import_cupy()
        return a if _is_cupy_array(a) else cp.asarray(a)
    return to_numpy(a)


def to_numpy(a):
    """Return ``a`` as a NumPy array (copied from the GPU if it lives there)."""
    if _is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def float_dtype(dtype):
    """Validate a floating dtype: float32 (the default) or float64."""
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"minicnn works in float32 or float64, got dtype {dt}")
    return dt
