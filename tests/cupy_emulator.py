"""A CPU stand-in for CuPy, so that minicnn's GPU path runs in tests on machines without a GPU.

What it is: a module that looks to minicnn like ``cupy``: arrays whose type lives in a module
named ``cupy...`` (so :func:`minicnn.backend.get_array_module` hands back this module), NumPy's
functions on them, and :class:`RawModule`, which compiles minicnn's CUDA C kernels with the host
C++ compiler and runs every thread of a launch one after the other.

What it checks, as CuPy would on a GPU:

* device discipline: a NumPy array where a device array is wanted is a ``TypeError`` (CuPy's
  "Unsupported type"), and so is turning a device array into NumPy implicitly (``np.asarray``,
  ``float()`` of a non-scalar): only ``.get()``/``asnumpy`` copy to the host;
* reductions return 0-d device arrays, not host scalars;
* kernel launches: argument count, each pointer's dtype and contiguity, each scalar's exact C type
  (a Python int where the kernel takes ``int`` is an error: CuPy would pass 8 bytes).

What it cannot check: speed, memory limits, races between threads (they run in turn), and
anything needing shared memory or ``__syncthreads`` (minicnn's kernels use neither). A test on a
real GPU remains the proof; this makes every line of the GPU path run on every machine.

``launches`` counts array operations and kernel launches, a proxy for a GPU's launch overhead.

Stream capture (CUDA graphs) follows CUDA's rules: between ``stream.begin_capture()`` and
``end_capture()`` nothing that writes existing memory runs (kernel launches, in-place operations,
assignments: they are recorded); new arrays are computed only so that shapes are known, then
filled with NaN (or 0xFF bytes) when the capture ends, as a GPU leaves them unwritten; every copy
between host and device raises, as it does on a GPU. ``Graph.launch()`` replays the record with
the arguments it had, into the same memory.
"""
import collections
import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import types

import numpy as _np

__version__ = "emulated"
launches = 0
by_name = collections.Counter()      # what the launches were
# Real CuPy (14.2 on an H200, and every version since stream capture came in) refuses cuBLAS calls --
# the matrix products -- while a stream is captured. The emulator does too (``CUBLAS_IN_CAPTURE =
# True`` plays a CuPy that allows them); minicnn then multiplies with cuBLAS called directly, which
# :func:`direct_gemm` plays.
CUBLAS_IN_CAPTURE = False
_CUBLAS = ("matmul", "dot", "tensordot", "inner", "vdot")


def _cublas_call(name):
    if name in _CUBLAS and _capturing() and not CUBLAS_IN_CAPTURE:
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
_recording = None                    # the operations of a stream capture in progress
_captured_arrays = None              # arrays made during the capture (poisoned when it ends)
_capturing_thread = None             # capture is per stream, and CuPy's current stream per thread


def _capturing():
    return _recording is not None and threading.get_ident() == _capturing_thread


def _no_transfer(what):
    if _capturing():
        raise RuntimeError(f"emulated CUDA: {what} is not allowed while a stream is being captured "
                           "(cudaErrorStreamCaptureUnsupported)")


def _shares(result, sources):
    return any(isinstance(s, _np.ndarray) and _np.shares_memory(result, s) for s in sources)


def _run(fn, inplace, sources=()):
    """Run an operation now, or under capture record it (in-place ones are only recorded)."""
    if not _capturing():
        return fn()
    if inplace:
        _recording.append(fn)
        return None
    compute = fn
    fn = lambda: _np.asarray(compute())          # noqa: E731  (a reduction's scalar: a 0-d array)
    with _np.errstate(all="ignore"):
        result = fn()
    if isinstance(result, _np.ndarray) and not _shares(result, sources):
        _captured_arrays.append(result)
        _recording.append(lambda: result.__setitem__(Ellipsis, fn()))
    return result


def _count(name="?"):
    global launches
    launches += 1
    by_name[name] += 1


class ndarray:
    """A device array: a NumPy array that refuses to meet host arrays implicitly."""
    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a):
        self._a = a

    # --- what CuPy arrays have -------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    base = property(lambda self: None if self._a.base is None else ndarray(self._a.base))

    def get(self, stream=None, out=None):
        _no_transfer("a copy to the host")
        return self._a.copy()

    def set(self, arr, stream=None):
        _no_transfer("a copy from the host")
        if not isinstance(arr, _np.ndarray):                     # (CuPy's checks, word for word)
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        self._a[...] = arr

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _cublas_call(ufunc.__name__)
        args = _unwrap(inputs, strict=True)
        _count(ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}")
        if "out" in kwargs:
            kwargs["out"] = out = tuple(_unwrap(kwargs["out"], strict=True))
            _run(lambda: getattr(ufunc, method)(*args, **kwargs), inplace=True)
            return _wrap(out[0] if len(out) == 1 else out)
        return _wrap(_run(lambda: getattr(ufunc, method)(*args, **kwargs), False, args))

    def __array_function__(self, func, types_, args, kwargs):
        ours = getattr(sys.modules[__name__], func.__name__, None)
        if ours is None:
            return NotImplemented
        return ours(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            uargs, ukw = _unwrap(args, strict=True), _unwrap_kw(kwargs)
            if name in _INPLACE_METHODS:
                _count("." + name)
                return _run(lambda: attr(*uargs, **ukw), inplace=True)
            result = _run(lambda: attr(*uargs, **ukw), False, (self._a,))
            if not (isinstance(result, _np.ndarray) and _np.shares_memory(result, self._a)):
                _count("." + name)                # a view (reshape, transpose, ...) launches nothing
            return _wrap(result)
        return method

    def __getitem__(self, index):
        a, idx = self._a, _unwrap_index(index)
        result = _run(lambda: a[idx], False, (a,))       # a copy (fancy indexing) is an operation
        if isinstance(result, _np.ndarray) and not _np.shares_memory(result, a):
            _count("getitem")
        return _wrap(result)

    def __setitem__(self, index, value):
        _count("setitem")
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, _np.ndarray) and value.ndim > 0:
            _no_transfer("a copy from the host")    # CuPy copies host arrays in, outside a capture
        a, idx = self._a, _unwrap_index(index)
        _run(lambda: a.__setitem__(idx, value), inplace=True)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def _scalar(self, kind):
        _no_transfer(f"reading a device value ({kind})")
        if self._a.size != 1:
            raise TypeError(f"only size-1 arrays can be converted to Python scalars ({kind})")
        return self._a.reshape(()).item()

    def __float__(self):
        return float(self._scalar("float"))

    def __int__(self):
        return int(self._scalar("int"))

    def __bool__(self):
        return bool(self._scalar("bool"))

    def item(self):
        return self._scalar("item")

    def tolist(self):
        _no_transfer("a copy to the host")
        return self._a.tolist()

    def __repr__(self):
        return "emulated_" + repr(self._a)

    def __format__(self, spec):
        _no_transfer("reading a device value")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)


def _binary(ufunc, reflected=False):
    if reflected:
        return lambda self, other: ufunc(other, self)
    return lambda self, other: ufunc(self, other)


def _inplace(ufunc):
    def op(self, other):
        ufunc(self, other, out=self)
        return self
    return op


for _name, _uf in [("add", _np.add), ("sub", _np.subtract), ("mul", _np.multiply), ("truediv", _np.true_divide),
                   ("floordiv", _np.floor_divide), ("mod", _np.remainder), ("pow", _np.power),
                   ("matmul", _np.matmul), ("and", _np.bitwise_and), ("or", _np.bitwise_or),
                   ("xor", _np.bitwise_xor)]:
    setattr(ndarray, f"__{_name}__", _binary(_uf))
    setattr(ndarray, f"__r{_name}__", _binary(_uf, True))
    setattr(ndarray, f"__i{_name}__", _inplace(_uf))
for _name, _uf in [("lt", _np.less), ("le", _np.less_equal), ("gt", _np.greater), ("ge", _np.greater_equal),
                   ("eq", _np.equal), ("ne", _np.not_equal)]:
    setattr(ndarray, f"__{_name}__", _binary(_uf))
ndarray.__neg__ = lambda self: _np.negative(self)
ndarray.__pos__ = lambda self: _np.positive(self)
ndarray.__abs__ = lambda self: _np.absolute(self)
ndarray.__invert__ = lambda self: _np.invert(self)
ndarray.__hash__ = None
_INPLACE_METHODS = ("fill", "sort", "put", "resize", "setfield", "itemset")


# --- moving between the wrapper and NumPy -----------------------------------------------------
def _unwrap(values, strict):
    out = []
    for v in values:
        if isinstance(v, ndarray):
            out.append(v._a)
        elif isinstance(v, (list, tuple)):
            out.append(type(v)(_unwrap(v, strict)))
        elif strict and isinstance(v, _np.ndarray) and v.ndim > 0:
            raise TypeError(f"Unsupported type {type(v)}: a NumPy array where a device array is wanted "
                            f"(shape {v.shape}); copy it with cupy.asarray() first")
        else:
            out.append(v)
    return out


def _unwrap_kw(kwargs):
    return {k: (_unwrap([v], strict=True)[0]) for k, v in kwargs.items()}


def _unwrap_index(index):
    if isinstance(index, tuple):
        return tuple(_unwrap(index, strict=False))
    return _unwrap([index], strict=False)[0]


def _wrap(v):
    if isinstance(v, _np.ndarray):
        return ndarray(v)
    if isinstance(v, _np.generic):          # reductions give 0-d device arrays, as in CuPy
        return ndarray(_np.asarray(v))
    if isinstance(v, tuple):
        return tuple(_wrap(x) for x in v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


# --- the module's functions ---------------------------------------------------------------------
def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        if dtype is None or _np.dtype(dtype) == a.dtype:
            return a
        _count("astype")
        src = a._a
        return ndarray(_run(lambda: src.astype(dtype), False, (src,)))
    _no_transfer("a copy from the host")
    _count("host-to-device")
    return ndarray(_np.array(a, dtype=dtype, order=order, copy=True))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if not isinstance(a, ndarray):
        _no_transfer("a copy from the host")
    _count("array" if isinstance(a, ndarray) else "host-to-device")
    src = a._a if isinstance(a, ndarray) else a
    return ndarray(_run(lambda: _np.array(src, dtype=dtype, copy=True, order=order, ndmin=ndmin), False))


def asnumpy(a, stream=None):
    return a.get() if isinstance(a, ndarray) else _np.asarray(a)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    src = a._a
    if src.flags.c_contiguous and (dtype is None or _np.dtype(dtype) == src.dtype):
        return a
    _count("ascontiguousarray")
    return ndarray(_run(lambda: _np.ascontiguousarray(src, dtype=dtype), False, (src,)))


_ALLOCATE_ONLY = ("empty", "empty_like")


def _function(name, f):
    def wrapped(*args, **kwargs):
        _cublas_call(name)
        uargs, ukw = _unwrap(args, strict=True), _unwrap_kw(kwargs)
        if name in _ALLOCATE_ONLY:                 # memory, no launch: garbage until written
            result = f(*uargs, **ukw)
            if _capturing():
                _captured_arrays.append(result)
            return _wrap(result)
        _count(name)
        if "out" in ukw and ukw["out"] is not None:
            _run(lambda: f(*uargs, **ukw), inplace=True)
            return _wrap(ukw["out"])
        return _wrap(_run(lambda: f(*uargs, **ukw), False, uargs))
    wrapped.__name__ = name
    return wrapped


_CONSTANTS = ("newaxis", "pi", "e", "inf", "nan")


def __getattr__(name):
    attr = getattr(_np, name)
    if isinstance(attr, type) or name in _CONSTANTS or isinstance(attr, types.ModuleType):
        return attr                              # dtypes and constants
    if callable(attr):
        return _function(name, attr)
    return attr


def direct_gemm(a, b):
    """Stands in for ``minicnn.engines.gpu.cublas.gemm`` (cuBLAS called through ctypes, which a capture
    may record although CuPy's own products may not): the tests' ``capturable_cublas`` fixture puts
    it there."""
    if not (isinstance(a, ndarray) and isinstance(b, ndarray)):
        raise TypeError("direct_gemm takes device arrays")
    _count("cublas-direct")
    x, y = a._a, b._a
    return ndarray(_run(lambda: _np.matmul(x, y), False, (x, y)))


# --- cupy.random, cupy.cuda -----------------------------------------------------------------------
class _RandomState:
    def __init__(self, seed=None):
        self._g = _np.random.RandomState(None if seed is None else int(seed) % (1 << 32))

    def random_sample(self, size=None, dtype=float):
        _no_random()
        _count("random")
        return ndarray(self._g.random_sample(size).astype(dtype))

    def standard_normal(self, size=None, dtype=float):
        _no_random()
        _count("random")
        return ndarray(self._g.standard_normal(size).astype(dtype))


def _no_random():
    if _capturing():
        raise RuntimeError("emulated CUDA: a random generator's draws would repeat on every replay of a graph")


random = types.SimpleNamespace(RandomState=_RandomState)


class _Device:
    def __init__(self, i=0):
        self.id = i
        self.compute_capability = "90"

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Stream:
    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.null = null

    def synchronize(self):
        _no_transfer("synchronizing")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self, mode=None):
        global _recording, _captured_arrays, _capturing_thread
        if self.null:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if _recording is not None:
            raise RuntimeError("emulated CUDA: a capture is already in progress")
        _recording, _captured_arrays, _capturing_thread = [], [], threading.get_ident()

    def end_capture(self):
        global _recording, _captured_arrays
        if _recording is None:
            raise RuntimeError("emulated CUDA: end_capture() without begin_capture()")
        graph = _Graph(_recording)
        for a in _captured_arrays:       # what a GPU would hold: nothing was computed yet
            if a.dtype.kind in "fc":
                a[...] = _np.nan
            elif a.dtype.kind == "b":
                a[...] = True
            else:
                a[...] = _np.iinfo(a.dtype).max
        _recording = _captured_arrays = None
        return graph

    def is_capturing(self):
        return _capturing()


class _Graph:
    def __init__(self, operations):
        self._operations = operations

    def launch(self, stream=None):
        _no_transfer("launching a graph")
        global launches
        launches += 1
        by_name["graph"] += 1
        for op in self._operations:
            op()


class _Pool:
    def __init__(self, allocator=None):
        self.malloc = object()

    def used_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


@contextlib.contextmanager
def _using_allocator(allocator=None):
    yield


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, runtimeGetVersion=lambda: 13000,
                                  getDeviceProperties=lambda i: {"name": b"emulated GPU"}),
    Device=_Device, get_current_stream=lambda: _Stream(null=True), Stream=_Stream, Graph=_Graph,
    MemoryPool=_Pool, using_allocator=_using_allocator)


def get_default_memory_pool():
    return _Pool()


# --- RawModule: CUDA C compiled for the host -------------------------------------------------------
_SHIM = r"""
#include <cmath>
#include <cstdint>
#include <algorithm>
using std::max; using std::min; using std::exp; using std::log; using std::sqrt;
struct __emu_dim3 { unsigned int x, y, z; };
static __emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
"""

_SCALARS = {"int": _np.int32, "unsigned int": _np.uint32, "long long": _np.int64,
            "unsigned long long": _np.uint64, "float": _np.float32, "double": _np.float64,
            "unsigned char": _np.uint8, "signed char": _np.int8}


def _parse_kernels(source, macros):
    """{name: [(c_type, is_pointer), ...]} of every extern "C" __global__ function."""
    kernels = {}
    for m in re.finditer(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', source):
        params = []
        for p in m.group(2).split(","):
            text = re.sub(r"\b(const|__restrict__)\b", " ", p).strip()
            pointer = "*" in text
            ctype = " ".join(text.replace("*", " ").split()[:-1])
            ctype = macros.get(ctype, ctype)
            if ctype not in _SCALARS:
                raise TypeError(f"emulator: kernel {m.group(1)} has a parameter of unsupported type {p.strip()!r}")
            params.append((ctype, pointer))
        kernels[m.group(1)] = params
    return kernels


def _launcher(name, params):
    args = ", ".join(f"*({c}{'*' if ptr else ''}*)a[{i}]" for i, (c, ptr) in enumerate(params))
    return f"""
extern "C" void __emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, void** a) {{
  gridDim = {{gx, gy, gz}}; blockDim = {{bx, by, bz}};
  for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {{
    blockIdx = {{x, y, z}};
    for (unsigned tz = 0; tz < bz; ++tz) for (unsigned ty = 0; ty < by; ++ty) for (unsigned tx = 0; tx < bx; ++tx) {{
      threadIdx = {{tx, ty, tz}};
      {name}({args});
    }}
  }}
}}
"""


class _Kernel:
    def __init__(self, lib, name, params):
        self.name, self.params = name, params
        self._fn = getattr(lib, f"__emu_{name}")
        self._fn.restype = None

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        keep, ptrs = [], (ctypes.c_void_p * len(args))()
        for i, (arg, (ctype, pointer)) in enumerate(zip(args, self.params)):
            want = _np.dtype(_SCALARS[ctype])
            if pointer:
                if not isinstance(arg, ndarray):
                    raise TypeError(f"kernel {self.name} argument {i}: expected a device array, got {type(arg)}")
                if arg.dtype != want:
                    raise TypeError(f"kernel {self.name} argument {i}: {ctype}* but the array is {arg.dtype}")
                if not arg._a.flags.c_contiguous:
                    raise TypeError(f"kernel {self.name} argument {i}: the array is not C-contiguous")
                value = ctypes.c_void_p(arg._a.ctypes.data)
                keep.append(arg._a)              # a replayed graph still needs the memory
            else:
                if not isinstance(arg, _np.generic) or arg.dtype != want:
                    raise TypeError(f"kernel {self.name} argument {i}: expected a NumPy {want} scalar for C "
                                    f"{ctype}, got {type(arg).__name__} (CuPy would pass the wrong bytes)")
                value = _np.ctypeslib.as_ctypes(_np.array(arg))
            keep.append(value)
            ptrs[i] = ctypes.cast(ctypes.pointer(value), ctypes.c_void_p)
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        if b[0] * b[1] * b[2] > 1024:
            raise ValueError(f"kernel {self.name}: {b} is more than 1024 threads per block")
        _count("kernel:" + self.name)
        fn, dims = self._fn, [ctypes.c_uint(v) for v in g + b]
        _run(lambda: (fn(*dims, ptrs), keep), inplace=True)


class RawModule:
    """``cupy.RawModule(code=..., options=(...))``; ``-Dname=value`` options are honoured."""
    _cache_dir = os.path.join(tempfile.gettempdir(), f"minicnn-cupy-emulator-{os.getuid()}")

    def __init__(self, code=None, options=(), name_expressions=None, backend="nvrtc"):
        macros = {}
        for option in options:
            if option.startswith("-D"):                  # -DNAME=VALUE, or -DNAME (= 1)
                name, _, value = option[2:].partition("=")
                macros[name] = value or "1"
        self._kernels = _parse_kernels(code, macros)
        source = (_SHIM + "".join(f"#define {k} {v}\n" for k, v in macros.items()) + code
                  + "".join(_launcher(n, p) for n, p in self._kernels.items()))
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        os.makedirs(self._cache_dir, exist_ok=True)
        lib = os.path.join(self._cache_dir, f"kernels-{digest}.so")
        if not os.path.exists(lib):
            src = lib[:-3] + ".cpp"
            with open(src, "w") as f:
                f.write(source)
            tmp = f"{lib}.{os.getpid()}"
            result = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unused-function",
                                     "-o", tmp, src], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"emulator: the kernels did not compile as C++:\n{result.stderr}")
            os.replace(tmp, lib)
        self._lib = ctypes.CDLL(lib)

    def get_function(self, name):
        if name not in self._kernels:
            raise KeyError(f"no kernel named {name!r}")
        return _Kernel(self._lib, name, self._kernels[name])


def ElementwiseKernel(*args, **kwargs):  # noqa: N802  (CuPy's name)
    raise NotImplementedError("the CuPy emulator runs RawModule kernels only")


ReductionKernel = ElementwiseKernel


def compiler_available():
    try:
        return subprocess.run(["g++", "--version"], capture_output=True).returncode == 0
    except OSError:
        return False
