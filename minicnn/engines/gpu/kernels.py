"""The GPU engine's CUDA kernels (through CuPy), where the textbook array code is slow on a GPU.

On a GPU the textbook layers are correct but spend their time launching small operations: im2col
is nine slice copies, a pad and a transpose; max-pooling stacks its windows; the loss and every
optimizer update are a dozen element-wise operations each. Each function here does one of those
jobs in one kernel launch (source: ``kernels.cu`` beside this file), with the same inputs and
outputs as the textbook code it replaces, shown in its docstring. The GPU engine's steps
(:mod:`.layers`, :mod:`.blocks`) call them; ``minicnn.engine("textbook")`` runs the textbook
layers on the GPU instead.

Matrix products stay with CuPy (cuBLAS), except inside a CUDA-graph capture, where CuPy refuses
them and :mod:`minicnn.engines.gpu.cublas` calls cuBLAS itself (:func:`matmul`). Whether cuBLAS may
use TF32 for float32 products is CuPy's setting (``CUPY_TF32=1``; off by default), reported by
:func:`tf32_enabled` and followed by both.
"""
import contextlib
import os
from pathlib import Path

import numpy as np

from ...backend import gpu_module
from ...nn.im2col import conv_output_size

__all__ = ["im2col", "col2im", "maxpool_forward", "maxpool_backward", "batchnorm_statistics",
           "batchnorm_forward", "batchnorm_grad_sums", "batchnorm_backward", "im2col_nhwc", "col2im_nhwc",
           "batchnorm_affine", "bn_relu_pool_forward", "bn_relu_pool_grad_sums", "batchnorm_backward_affine",
           "bn_relu_pool_backward", "dropout", "softmax_cross_entropy",
           "sgd_update", "adam_update", "DeviceValues", "capturing", "capture_scope", "cupy_captures_cublas",
           "cublas_capturable", "matmul", "tf32_enabled", "grey_conv3x3_pool_bias_relu", "winograd_input",
           "winograd_output_pool_bias_relu", "bias_relu_rows", "SOURCE"]

SOURCE = Path(__file__).with_name("kernels.cu")
THREADS = 256            # threads per block
MAX_BLOCKS = 65535 * 8   # the grid-stride loops cover any size with at most this many blocks

INT32_LIMIT = 2 ** 31 - 1 - MAX_BLOCKS * THREADS   # past this many elements, 64-bit index arithmetic

_modules = {}            # (id of the cupy module, dtype, 64-bit indices) -> compiled RawModule
_functions = {}          # (name, id of the cupy module, dtype, 64-bit indices) -> kernel


def _kernel(name, dtype, wide):
    cp = gpu_module()
    fkey = (name, id(cp), dtype, wide)
    if fkey not in _functions:              # (looked up once: launches are the GPU path's hot loop)
        dtype = np.dtype(dtype)
        key = (id(cp), dtype, wide)
        if key not in _modules:
            real = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[dtype]
            options = (f"-Dreal={real}",) + (("-DWIDE_INDEX",) if wide else ())
            _modules[key] = cp.RawModule(code=SOURCE.read_text(), options=options)
        _functions[fkey] = _modules[key].get_function(name)
    return _functions[fkey]


def _launch(name, dtype, total, *args):
    """Launch kernel ``name`` on enough blocks for ``total`` outputs (a grid-stride loop covers the rest)."""
    blocks = max(1, min(-(-int(total) // THREADS), MAX_BLOCKS))
    largest = max(int(total), *(getattr(a, "size", 0) for a in args))     # (a NumPy scalar's size is 1)
    _kernel(name, dtype, largest > INT32_LIMIT)((blocks,), (THREADS,), args)


def _i(v):
    return np.int32(v)


class DeviceValues:
    """A few host numbers kept in a small device array for kernels to read (a seed, a learning
    rate): copied to the device only when they change, and never while a CUDA graph is being
    captured (:func:`capturing`), when a copy from the host is not allowed."""

    def __init__(self, dtype):
        self.dtype, self._host, self.array = np.dtype(dtype), None, None

    def set(self, values):
        values = tuple(values)
        if values != self._host:
            if capturing():
                raise RuntimeError("a value a kernel reads changed while a CUDA graph was being captured")
            host = np.array(values, dtype=self.dtype)
            if self.array is None:
                self.array = gpu_module().asarray(host)
            else:
                self.array.set(host)             # in place: a captured graph keeps reading this array
            self._host = values
        return self.array


_capturing = False


def capturing():
    """True while minicnn captures a CUDA graph (see minicnn.engines.gpu.graph)."""
    return _capturing


@contextlib.contextmanager
def capture_scope():
    """``with capture_scope():`` the code inside is being captured into a CUDA graph: layers and
    optimizers then leave the numbers they read from device memory as they are (see DeviceValues)."""
    global _capturing
    _capturing = True
    try:
        yield
    finally:
        _capturing = False


_cupy_captures_cublas = {}


def cupy_captures_cublas():
    """True when CuPy lets a stream capture record its cuBLAS calls (``a @ b``). CuPy 14.2 does not
    ("calling cuBLAS API during stream capture is currently unsupported"). Tried once, on a 2x2
    product in a capture of its own."""
    cp = gpu_module()
    key = getattr(cp, "__version__", "?")
    if key not in _cupy_captures_cublas:
        a = cp.ones((2, 2), dtype=cp.float32)
        pool, stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
        ok = True
        with cp.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture()
            try:
                a @ a
            except NotImplementedError:
                ok = False
            finally:
                stream.end_capture()
        _cupy_captures_cublas[key] = ok
    return _cupy_captures_cublas[key]


def cublas_capturable():
    """True when a training step's matrix products can be captured in a CUDA graph: by CuPy itself,
    or else by cuBLAS called directly (:mod:`minicnn.engines.gpu.cublas`, tried once)."""
    from . import cublas
    return cupy_captures_cublas() or cublas.available()


def matmul(a, b):
    """``a @ b``; while a CUDA graph is being captured and CuPy refuses cuBLAS calls, by cuBLAS
    called directly on the capturing stream (:mod:`minicnn.engines.gpu.cublas`)."""
    if _capturing and not _cupy_captures_cublas.get(getattr(gpu_module(), "__version__", "?"), False):
        from . import cublas
        return cublas.gemm(a, b)
    return a @ b


def tf32_enabled():
    """True when CuPy lets cuBLAS use TF32 tensor cores for float32 products (CUPY_TF32=1)."""
    return os.environ.get("CUPY_TF32", "0") not in ("", "0")


def _contiguous(a, dtype=None):
    return gpu_module().ascontiguousarray(a, dtype=dtype)


# --- convolution -------------------------------------------------------------------------------
def im2col(x, kh, kw, stride=1, padding=0):
    """:func:`minicnn.nn.im2col.im2col` in one launch: (N, C, H, W) -> (N*OH*OW, C*KH*KW)."""
    cp = gpu_module()
    x = _contiguous(x)
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    col = cp.empty((n * oh * ow, c * kh * kw), dtype=x.dtype)
    _launch("im2col", x.dtype, col.size, x, col, *map(_i, (n, c, h, w, kh, kw, stride, padding, oh, ow)))
    return col


def col2im(col, x_shape, kh, kw, stride=1, padding=0):
    """:func:`minicnn.nn.im2col.col2im` in one launch, as a gather (no atomics)."""
    cp = gpu_module()
    col = _contiguous(col)
    n, c, h, w = x_shape
    oh, ow = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    x = cp.empty((n, c, h, w), dtype=col.dtype)
    _launch("col2im", col.dtype, x.size, col, x, *map(_i, (n, c, h, w, kh, kw, stride, padding, oh, ow)))
    return x


# --- max-pooling -------------------------------------------------------------------------------
def maxpool_forward(x, k, stride):
    """(out, arg): each k x k window's maximum and its offset i*k + j (uint8; k <= 16)."""
    cp = gpu_module()
    x = _contiguous(x)
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, k, stride, 0), conv_output_size(w, k, stride, 0)
    out = cp.empty((n, c, oh, ow), dtype=x.dtype)
    arg = cp.empty((n, c, oh, ow), dtype=np.uint8)
    _launch("maxpool_forward", x.dtype, out.size, x, out, arg, *map(_i, (n * c, h, w, k, stride, oh, ow)))
    return out, arg


def maxpool_backward(dout, arg, x_shape, k, stride):
    """dL/dx: each pixel gets the gradients of the windows it won."""
    cp = gpu_module()
    dout = _contiguous(dout)
    n, c, h, w = x_shape
    oh, ow = arg.shape[2:]
    dx = cp.empty(x_shape, dtype=dout.dtype)
    _launch("maxpool_backward", dout.dtype, dx.size, dout, arg, dx, *map(_i, (n * c, h, w, k, stride, oh, ow)))
    return dx


# --- BatchNorm (and the ReLU after it, fused) --------------------------------------------------
# Partial sums per channel in the per-layer BatchNorm's statistics and gradient sums: one thread
# each, about VALUES_PER_SLICE values apiece, at least MIN_SLICES and at most MAX_SLICES. A fixed 256
# gave the first block at batch 1024 (2.4M values per channel, 32 channels) 8,192 threads of 9,216
# values each, a few warps per multiprocessor of an H200: its BatchNorm backward took 8.5 ms of a
# 39 ms step. (The EmotionClassifier's BatchNorms now run in the channels-last conv block instead.)
MIN_SLICES, MAX_SLICES, VALUES_PER_SLICE = 256, 4096, 512


def _slices(x):
    m = x.shape[0] * x.shape[2] * x.shape[3]
    return max(1, min(m, MAX_SLICES, max(MIN_SLICES, -(-m // VALUES_PER_SLICE))))


def _momentum(momentum):
    return np.float64(-1.0 if momentum is None else momentum)       # (< 0: the cumulative average)


def batchnorm_statistics(x, running_mean, running_var, num_batches, momentum, eps):
    """(mean, inv_std) of each channel of x (N, C, H, W) over N*H*W values, in three launches (float64
    shifted sums in slices, CuPy's sum of the slices, then one thread per channel), updating ``running_mean`` and
    ``running_var`` in place with the unbiased variance (PyTorch's rule; ``momentum`` None: the
    cumulative average over ``num_batches``, already counting this batch)."""
    cp = gpu_module()
    x = _contiguous(x)
    n, c, h, w = x.shape
    slices = _slices(x)
    partial = cp.empty((2, c, slices), dtype=np.float64)
    _launch("channel_moments", x.dtype, c * slices, x, partial, *map(_i, (n, c, h * w, slices)))
    mean, inv_std = cp.empty(c, dtype=x.dtype), cp.empty(c, dtype=x.dtype)
    _launch("batchnorm_statistics", x.dtype, c, partial.sum(axis=2), x, running_mean, running_var, num_batches,
            mean, inv_std, *map(_i, (n, c, h * w)), _momentum(momentum), np.float64(eps))
    return mean, inv_std


def batchnorm_forward(x, mean, inv_std, gamma, beta, relu=False):
    """(xhat, out) with xhat = (x - mean) * inv_std and out = gamma * xhat + beta per channel, or
    max(out, 0) with ``relu``."""
    cp = gpu_module()
    x = _contiguous(x)
    xhat, out = cp.empty_like(x), cp.empty_like(x)
    dt = x.dtype
    _launch("batchnorm_forward", dt, x.size, x, *(_contiguous(v, dt) for v in (mean, inv_std, gamma, beta)),
            xhat, out, np.int64(x.size), _i(x.shape[1]), _i(x.shape[2] * x.shape[3]), _i(relu))
    return xhat, out


def batchnorm_grad_sums(g, xhat, y=None):
    """(sum(g), sum(g * xhat)) per channel, float64; with ``y`` (a fused ReLU's output) g is taken
    as 0 where y <= 0."""
    cp = gpu_module()
    g = _contiguous(g)
    n, c, h, w = g.shape
    slices = _slices(g)
    partial = cp.empty((2, c, slices), dtype=np.float64)
    _launch("channel_grad_sums", g.dtype, c * slices, g, xhat, xhat if y is None else y, partial,
            *map(_i, (n, c, h * w, slices, y is not None)))
    sums = partial.sum(axis=2)
    return sums[0], sums[1]


def batchnorm_backward(g, xhat, gamma, inv_std, sum_g, sum_g_xhat, training, y=None):
    """dL/dx = gamma * inv_std * (g - (sum_g + xhat * sum_g_xhat) / M) in training, gamma * inv_std * g
    in eval; with ``y`` (a fused ReLU's output) g is first masked where y <= 0."""
    cp = gpu_module()
    g = _contiguous(g)
    dx = cp.empty_like(g)
    dt = g.dtype
    m = g.shape[0] * g.shape[2] * g.shape[3]
    _launch("batchnorm_backward", dt, g.size, g, xhat, xhat if y is None else y, _contiguous(gamma, dt),
            _contiguous(inv_std, dt), _contiguous(sum_g, np.float64), _contiguous(sum_g_xhat, np.float64), dx,
            np.int64(g.size), _i(g.shape[1]), _i(g.shape[2] * g.shape[3]), np.float64(1.0 / m), _i(training),
            _i(y is not None))
    return dx


# --- the conv block on channels-last memory (minicnn/engines/gpu/blocks.py) --------------------------------
# Row-wise sums over an (M, C) array run in `slices` threads per channel, ROW_VALUES values each,
# and at least MIN_THREADS threads in all (a memory-bound pass needs many in flight).
ROW_VALUES, MIN_THREADS = 256, 32768


def _row_slices(m, c):
    return max(1, min(m, max(-(-m // ROW_VALUES), -(-MIN_THREADS // c))))


def _vector(c):
    """Channels per thread in the channels-last kernels: 4 when C is a multiple of 4 (the integer
    divisions that locate a thread's values are then done once per 4 of them)."""
    return 4 if c % 4 == 0 else 1


def im2col_nhwc(x, k, s, p, oh, ow):
    """Channels-last im2col: x (N, H, W, C) -> (N*OH*OW, K*K*C), columns (i, j, c) as in
    :func:`minicnn.engines.cpu.kernels.im2col_nhwc`."""
    cp = gpu_module()
    x = _contiguous(x)
    n, h, w, c = x.shape
    col = cp.empty((n * oh * ow, k * k * c), dtype=x.dtype)
    v = _vector(c)
    _launch("im2col_nhwc", x.dtype, col.size // v, x, col, *map(_i, (n, h, w, c, k, s, p, oh, ow, v)))
    return col


def col2im_nhwc(dcol, x_shape, k, s, p, oh, ow):
    """The adjoint of :func:`im2col_nhwc`, as a gather: (N*OH*OW, K*K*C) -> dx (N, H, W, C)."""
    cp = gpu_module()
    dcol = _contiguous(dcol)
    n, h, w, c = x_shape
    dx = cp.empty(x_shape, dtype=dcol.dtype)
    v = _vector(c)
    _launch("col2im_nhwc", dcol.dtype, dx.size // v, dcol, dx, *map(_i, (n, h, w, c, k, s, p, oh, ow, v)))
    return dx


def batchnorm_affine(y, bias, gamma, beta, running_mean, running_var, num_batches, momentum, eps, training):
    """BatchNorm of ``y + bias`` (y: the channels-last conv output (N, H, W, C), the bias not added; None:
    no bias) as ``y * scale + shift``: returns (mean, inv_std, scale, shift), the first two float64 and
    of y itself. Training: from y's batch statistics (three launches: float64 shifted sums in slices,
    CuPy's sum of the slices, one thread per channel), the running statistics updated in place; eval:
    from the running statistics."""
    cp = gpu_module()
    y = _contiguous(y)
    c = y.shape[-1]
    m = y.size // c
    if training:
        slices = _row_slices(m, c)
        partial = cp.empty((2, c, slices), dtype=np.float64)
        _launch("channel_moments_rows", y.dtype, slices * c, y, partial, np.int64(m), _i(c), _i(slices))
        sums = partial.sum(axis=2)
    else:
        sums = cp.empty((2, c), dtype=np.float64)          # (not read)
    mean, inv_std = cp.empty(c, dtype=np.float64), cp.empty(c, dtype=np.float64)
    scale, shift = cp.empty(c, dtype=y.dtype), cp.empty(c, dtype=y.dtype)
    _launch("batchnorm_affine", y.dtype, c, sums, y, gamma if bias is None else bias, gamma, beta, running_mean,
            running_var, num_batches, mean, inv_std, scale, shift, np.int64(m), _i(c), _momentum(momentum),
            np.float64(eps), _i(training), _i(bias is not None))
    return mean, inv_std, scale, shift


def bn_relu_pool_forward(y, scale, shift, k):
    """(out, arg): maxpool_k(relu(y * scale + shift)) of the channels-last y (N, H, W, C), and each
    window's first maximum's offset i*k + j (uint8), as :func:`minicnn.engines.cpu.kernels.bn_relu_pool_forward`."""
    cp = gpu_module()
    n, h, w, c = y.shape
    oh, ow = h // k, w // k
    out = cp.empty((n, oh, ow, c), dtype=y.dtype)
    arg = cp.empty((n, oh, ow, c), dtype=np.uint8)
    v = _vector(c)
    _launch("bn_relu_pool_forward_nhwc", y.dtype, out.size // v, _contiguous(y), scale, shift, out, arg,
            *map(_i, (n, h, w, c, k, oh, ow, v)))
    return out, arg


def bn_relu_pool_grad_sums(g, arg, y, scale, shift, mean, k):
    """(2, C) float64: sum(g_bn) and sum(g_bn * (y - mean)) per channel, g_bn = dL/d(BatchNorm output)
    given g = dL/d(pooled output) (N, OH, OW, C): each window's gradient at its winner if the ReLU
    let it through."""
    cp = gpu_module()
    n, h, w, c = y.shape
    oh, ow = g.shape[1:3]
    slices = _row_slices(n * oh * ow, c)
    partial = cp.empty((2, c, slices), dtype=np.float64)
    _launch("bn_relu_pool_grad_sums_nhwc", y.dtype, slices * c, _contiguous(g), arg, y, scale, shift, mean, partial,
            *map(_i, (n, h, w, c, k, oh, ow, slices)))
    return partial.sum(axis=2)


def batchnorm_backward_affine(sums, mean, inv_std, gamma, m, training):
    """(a, b, c0, dgamma, dbeta, dbias) per channel: dL/dy = a * g_bn + b * y + c0 (see
    :func:`minicnn.engines.cpu.layers.backward_affine`), the BatchNorm's parameter gradients, and
    the conv bias's, sum(dL/dy) over the M values of each channel."""
    cp = gpu_module()
    c = gamma.shape[0]
    a, b, c0, dgamma, dbeta, dbias = (cp.empty(c, dtype=gamma.dtype) for _ in range(6))
    _launch("batchnorm_backward_affine", gamma.dtype, c, sums, mean, inv_std, gamma, a, b, c0, dgamma, dbeta, dbias,
            np.int64(m), _i(c), _i(training))
    return a, b, c0, dgamma, dbeta, dbias


def bn_relu_pool_backward(g, arg, y, scale, shift, a, b, c0, k):
    """dL/dy = a * g_bn + b * y + c0 per channel, (N, H, W, C), in one pass."""
    cp = gpu_module()
    n, h, w, c = y.shape
    oh, ow = g.shape[1:3]
    dy = cp.empty_like(y)
    v = _vector(c)
    _launch("bn_relu_pool_backward_nhwc", y.dtype, y.size // v, _contiguous(g), arg, y, scale, shift, a, b, c0, dy,
            *map(_i, (n, h, w, c, k, oh, ow, v)))
    return dy


# --- dropout -----------------------------------------------------------------------------------
def dropout(x, p, seed):
    """x * mask / (1 - p) with mask_i = [hash(seed, i) >= p]: the same seed gives the same mask,
    so backward calls this on dL/dout with the forward's seed. ``seed``: a one-element uint64 device
    array (see :class:`DeviceValues`)."""
    cp = gpu_module()
    x = _contiguous(x)
    out = cp.empty_like(x)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    _launch("dropout", x.dtype, x.size, x, out, np.int64(x.size), seed, np.float64(p), x.dtype.type(scale))
    return out


# --- loss --------------------------------------------------------------------------------------
def softmax_cross_entropy(logits, labels, weight, eps):
    """(row_loss, row_weight, grad): per sample sum_c q_c * (-log p_c), w[y], and
    sum(q) * softmax(z) - q (dL/dz before dividing by the total weight); see minicnn/nn/loss.py."""
    cp = gpu_module()
    z = _contiguous(logits)
    n, c = z.shape
    row_loss, row_w = cp.empty(n, dtype=z.dtype), cp.empty(n, dtype=z.dtype)
    grad = cp.empty_like(z)
    _launch("softmax_cross_entropy", z.dtype, n, z, _contiguous(labels, np.int64), _contiguous(weight, z.dtype),
            row_loss, row_w, grad, _i(n), _i(c), z.dtype.type(eps))
    return row_loss, row_w, grad


# --- optimizer updates (in place, one launch per parameter) ------------------------------------
def sgd_update(p, g, buf, hyper, nesterov, first):
    """``hyper``: device array [lr, momentum, dampening, weight_decay] of p's dtype."""
    _launch("sgd_update", p.dtype, p.size, p, _contiguous(g, p.dtype), buf, np.int64(p.size), hyper,
            _i(nesterov), _i(first))


def adam_update(p, g, m, v, hyper):
    """``hyper``: device array [beta1, beta2, eps, step_size, root_bc2, l2, decay] of p's dtype."""
    _launch("adam_update", p.dtype, p.size, p, _contiguous(g, p.dtype), m, v, np.int64(p.size), hyper)


# --- inference (minicnn/engines/gpu/inference.py): into arrays the caller keeps ------------------
def grey_conv3x3_pool_bias_relu(x, wt, b, padding, pool, out):
    """out (N, PH, PW, OC) = relu(maxpool_pool(conv3x3(x)) + b) for one input channel x (N, H, W),
    taps wt (9, OC), as :func:`minicnn.engines.cpu.kernels.grey_conv3x3_pool_bias_relu` (which takes
    x already padded)."""
    n, h, w = x.shape
    ph, pw, oc = out.shape[1:]
    _launch("grey_conv3x3_pool_bias_relu_nhwc", x.dtype, out.size, x, wt, b, out,
            *map(_i, (n, h, w, oc, padding, pool, ph, pw)))
    return out


def winograd_input(x, bt, padding, th, tw, v):
    """v (t*t, N*th*tw, C) = B^T d B of every t x t tile (stride t - 2) of channels-last x (N, H, W, C)
    padded by ``padding``: Winograd F(t-2 x t-2, 3x3)'s input transform, ``bt`` = B^T (t, t)."""
    n, h, w, c = x.shape
    _launch("winograd_input_nhwc", x.dtype, n * th * tw * c, x, bt, v, *map(_i, (n, h, w, c, padding, th, tw,
                                                                                bt.shape[0])))
    return v


def winograd_output_pool_bias_relu(mm, at, b, th, tw, pool, out):
    """out (N, PH, PW, OC) = relu(maxpool_pool(A^T M A) + b) of the products mm (t*t, tiles, OC),
    ``at`` = A^T (t - 2, t); ``pool`` divides t - 2."""
    n, ph, pw, oc = out.shape
    _launch("winograd_output_pool_bias_relu_nhwc", mm.dtype, n * th * tw * oc, mm, at, b, out,
            *map(_i, (n, oc, th, tw, at.shape[1], pool, ph, pw)))
    return out


def bias_relu_rows(y, b, relu):
    """In place: y (rows, cols) += b, then ReLU if ``relu`` (a NaN stays NaN)."""
    rows, cols = y.shape
    _launch("bias_relu_rows", y.dtype, y.size, y, b, _i(rows), _i(cols), _i(bool(relu)))
    return y
