"""cuBLAS called directly, for the matrix products inside a CUDA-graph capture.

CuPy (14.2) refuses every cuBLAS call while a stream is being captured ("calling cuBLAS API during
stream capture is currently unsupported": its ``setStream`` checks), and every convolution and
linear layer of a training step is a cuBLAS product. cuBLAS itself can be captured, given a
workspace of its own that it does not have to allocate during the capture (NVIDIA's cuBLAS guide,
"CUDA Graphs Support"); that is what PyTorch does. So while minicnn captures a step
(:func:`minicnn.engines.gpu.kernels.capture_scope`), its layers multiply with :func:`gemm`: the
``libcublas`` CuPy has loaded, called through ctypes, with a handle and a 32 MiB workspace of
minicnn's own, bound to the capturing stream. Outside a capture CuPy's ``a @ b`` does the work.

The product is ``cublasGemmStridedBatchedEx``. cuBLAS is column-major: a C-contiguous (m, n) result
C is, to cuBLAS, the (n, m) matrix C^T = B^T A^T, so the operands go in swapped. An operand whose
rows are contiguous (C order) is, to cuBLAS, its own transpose ("N", leading dimension = its row
stride); one whose columns are contiguous (a ``.T`` view) is itself ("T", leading dimension = its
column stride); anything else is copied first.
"""
import ctypes
import ctypes.util
import os

import numpy as np

from ...backend import get_array_module, gpu_module

__all__ = ["gemm", "plan", "available"]

WORKSPACE_BYTES = 32 << 20

_OP_N, _OP_T = 0, 1
_R_32F, _R_64F = 0, 1                                  # cudaDataType
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_GEMM_DEFAULT = -1

_lib = None
_handles = {}                                          # device id -> (handle, workspace array)
_available = {}


def _library_path():
    """The libcublas CuPy has loaded (one copy in the process), found in the process's memory map."""
    cp = gpu_module()
    a = cp.ones((2, 2), dtype=cp.float32)
    a @ a                                              # makes CuPy load cuBLAS
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libcublas.so"):
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("cublas")


def _library():
    global _lib
    if _lib is None:
        path = _library_path()
        if path is None:
            raise OSError("cannot find the cuBLAS library (libcublas) that CuPy uses")
        lib = ctypes.CDLL(path)
        p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
        lib.cublasSetStream_v2.argtypes = [p, p]
        lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
        lib.cublasGemmStridedBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll,
                                                   i, i, i]
        for name in ("cublasCreate_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2", "cublasGemmStridedBatchedEx"):
            getattr(lib, name).restype = ctypes.c_int
        _lib = lib
    return _lib


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} failed with status {status}")


def _handle():
    """minicnn's own cuBLAS handle for the current device, with its workspace (made outside any capture)."""
    cp = gpu_module()
    device = cp.cuda.Device().id
    if device not in _handles:
        lib, handle = _library(), ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        workspace = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)
        _check(lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(workspace.data.ptr), WORKSPACE_BYTES),
               "cublasSetWorkspace")
        _handles[device] = (handle, workspace)
    return _handles[device][0]


def _operand(x):
    """(array, op, leading dimension, batch stride) of a (batch, rows, cols) operand, in elements:
    how cuBLAS (column-major) is to read it."""
    b, r, c = x.shape
    s0, s1, s2 = (s // x.itemsize for s in x.strides)
    if (s2 == 1 or c == 1) and (s1 >= max(c, 1) or r == 1):
        return x, _OP_N, max(s1 if r > 1 else c, 1), (s0 if b > 1 else r * c)
    if (s1 == 1 or r == 1) and (s2 >= max(r, 1) or c == 1):
        return x, _OP_T, max(s2 if c > 1 else r, 1), (s0 if b > 1 else r * c)
    return _operand(get_array_module(x).ascontiguousarray(x))


def _check_shapes(a, b):
    if a.ndim != b.ndim or a.ndim not in (2, 3) or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"gemm: cannot multiply shapes {a.shape} and {b.shape} (2-D, or 3-D with equal batches)")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"gemm: float32 or float64 operands of one dtype, got {a.dtype} and {b.dtype}")


def plan(a, b):
    """The cuBLAS call for a @ b (both 3-D): (first operand, its op, ld, batch stride, second
    operand, its op, ld, batch stride, m, n, k) with cuBLAS's m, n, k. Column-major, the
    C-contiguous (batch, M, N) result is C^T (N x M) = B^T (N x K) A^T (K x M): b goes first."""
    batch, m_rows, k = a.shape
    n_cols = b.shape[2]
    b3, op_b, ld_b, stride_b = _operand(b)
    a3, op_a, ld_a, stride_a = _operand(a)
    return b3, op_b, ld_b, stride_b, a3, op_a, ld_a, stride_a, n_cols, m_rows, k


def gemm(a, b):
    """a @ b for CuPy float arrays of 2 dimensions, or 3 with equal batch sizes, by cuBLAS called
    directly on the current stream (graph-capturable); a new C-contiguous result."""
    cp = gpu_module()
    _check_shapes(a, b)
    a3, b3 = (x if x.ndim == 3 else x[None] for x in (a, b))
    batch, m, k = a3.shape
    n = b3.shape[2]
    out = cp.empty((batch, m, n), dtype=a.dtype)
    if out.size and k == 0:
        out[...] = 0
    elif out.size:
        from .kernels import tf32_enabled
        double = a.dtype == np.float64
        dtype = _R_64F if double else _R_32F
        compute = _COMPUTE_64F if double else (_COMPUTE_32F_FAST_TF32 if tf32_enabled() else _COMPUTE_32F)
        one, zero = (ctypes.c_double(1), ctypes.c_double(0)) if double else (ctypes.c_float(1), ctypes.c_float(0))
        first, op1, ld1, stride1, second, op2, ld2, stride2, cm, cn, ck = plan(a3, b3)
        lib, handle = _library(), _handle()
        _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(cp.cuda.get_current_stream().ptr)), "cublasSetStream")
        _check(lib.cublasGemmStridedBatchedEx(
            handle, op1, op2, cm, cn, ck, ctypes.byref(one),
            ctypes.c_void_p(first.data.ptr), dtype, ld1, stride1,
            ctypes.c_void_p(second.data.ptr), dtype, ld2, stride2, ctypes.byref(zero),
            ctypes.c_void_p(out.data.ptr), dtype, n, m * n, batch, compute, _GEMM_DEFAULT),
               "cublasGemmStridedBatchedEx")
    return out if a.ndim == 3 else out[0]


def available():
    """True when :func:`gemm` works inside a stream capture on this machine: tried once, a small
    product captured, replayed and checked."""
    cp = gpu_module()
    key = getattr(cp, "__version__", "?")
    if key not in _available:
        try:
            a = cp.arange(6, dtype=cp.float32).reshape(2, 3)
            b = cp.arange(12, dtype=cp.float32).reshape(3, 4)
            if not bool((gemm(a, b) == a @ b).all()):          # eagerly first: a plain error stays plain
                raise RuntimeError("the direct product differs from CuPy's")
            pool, stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
            with cp.cuda.using_allocator(pool.malloc), stream:
                stream.begin_capture()
                try:
                    c = gemm(a, b) + gemm(b.T, a.T).T
                finally:
                    graph = stream.end_capture()
                graph.launch()
                stream.synchronize()
            ok = bool((c == 2 * (a @ b)).all())
        except Exception:
            ok = False
        _available[key] = ok
    return _available[key]
