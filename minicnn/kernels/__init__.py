"""Array kernels behind the layers.

* :mod:`.reference` -- naive loops, the oracle and the teaching text;
* :mod:`.im2col` -- vectorised im2col/col2im on the array module (NumPy or CuPy): the plain path;
* :mod:`.cpu` -- numba kernels on channels-last memory: the fast CPU path;
* :mod:`.gpu` -- CUDA kernels (CuPy) for the GPU path's slow spots (``gpu_kernels.cu``).

The fast kernels are on by default, for NumPy and CuPy arrays. Switch them off
to run (and read) the plain path, on either device::

    minicnn.kernels.use_fast_kernels(False)       # or: with fast_kernels(False): ...
    MINICNN_FAST=0 python train.py                # or from the environment
"""
import contextlib
import os

from .im2col import col2im, conv_output_size, im2col

__all__ = ["im2col", "col2im", "conv_output_size", "use_fast_kernels", "fast_kernels",
           "fast_kernels_enabled", "fast_path", "gpu_path", "cpu_kernels", "gpu_kernels", "matmul",
           "PerformanceWarning"]

_enabled = os.environ.get("MINICNN_FAST", "1").strip().lower() not in ("0", "false", "no", "off")
_cpu = None
_gpu = None


def use_fast_kernels(enabled=True):
    """Turn the fast kernels (numba on the CPU, CUDA on the GPU) on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def fast_kernels(enabled=True):
    """``with fast_kernels(False): ...`` runs the block on the plain path."""
    previous = use_fast_kernels(enabled)
    try:
        yield
    finally:
        use_fast_kernels(previous)


def fast_kernels_enabled():
    return _enabled


class PerformanceWarning(UserWarning):
    """Something in this process makes the fast path slower than it could be."""


def cpu_kernels():
    """The numba kernel module (imported, and compiled from cache, on first use)."""
    global _cpu
    if _cpu is None:
        from . import cpu
        _cpu = cpu
        _warn_if_openblas_spins()
    return _cpu


def _warn_if_openblas_spins():
    import sys
    if not getattr(sys.modules.get("minicnn"), "_openblas_spins", False):
        return
    try:
        from threadpoolctl import threadpool_info
        spinning = any(i.get("internal_api") == "openblas" and i.get("threading_layer") == "pthreads"
                       and i.get("num_threads", 1) > 1 for i in threadpool_info())
    except Exception:
        return
    if spinning:
        import warnings
        warnings.warn("NumPy was imported before minicnn, so OpenBLAS's idle threads spin for about 0.1 s "
                      "after every matrix product and slow minicnn's fast CPU path (by about 20% on 2 cores). "
                      "Import minicnn before NumPy, or set OPENBLAS_THREAD_TIMEOUT=4 in the environment.",
                      PerformanceWarning, stacklevel=3)


def fast_path(x):
    """True when ``x`` should take the fast CPU path: a NumPy float array with the fast path on."""
    return _enabled and type(x).__module__ == "numpy" and x.dtype.kind == "f"


def gpu_path(x):
    """True when ``x`` should use the CUDA kernels: a CuPy float array with the fast kernels on."""
    return _enabled and type(x).__module__.startswith("cupy") and x.dtype.kind == "f"


def gpu_kernels():
    """The CUDA kernel module (each kernel compiled by CuPy on first use)."""
    global _gpu
    if _gpu is None:
        from . import gpu
        _gpu = gpu
    return _gpu


def matmul(a, b):
    """``a @ b``, except on the GPU while a CUDA graph is being captured: CuPy refuses cuBLAS calls
    then, and :func:`minicnn.kernels.gpu.matmul` calls cuBLAS directly (minicnn/kernels/cublas.py)."""
    return a @ b if _gpu is None else _gpu.matmul(a, b)        # (gpu.matmul: a @ b unless capturing)
