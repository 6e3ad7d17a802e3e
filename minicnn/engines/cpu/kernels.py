"""The CPU engine's numba kernels, on channels-last (NHWC) memory.

The textbook layers (minicnn/nn) work on (N, C, H, W) arrays with NumPy. This module is the
same math, reorganised for speed on a CPU:

* **channels-last memory.** An activation lives in memory as (N, H, W, C) and is
  handed between layers as an (N, C, H, W) *view* of that memory
  (``a.transpose(0, 3, 1, 2)``), so the public shapes never change. With the
  channels last, im2col's rows are contiguous runs of C values and one GEMM
  ``col @ W`` gives the next layer's NHWC output with no transpose.
* **numba** (``@njit(parallel=True)``) for everything that is not a matrix
  product: im2col, col2im as a gather (each input pixel sums the window
  positions that saw it: no atomics, no ``np.add.at``), BatchNorm statistics
  and its backward, ReLU, 2x2 max-pooling with a one-byte argmax, and the
  optimizer update. Matrix products stay with NumPy's BLAS, never inside
  ``prange``.

Every kernel here is tested against the textbook layers and the naive loops in
:mod:`minicnn.nn.reference`.
"""
import os

# numba's OpenMP workers must sleep, not spin, after a parallel region, or they
# steal the cores from the BLAS threads of the matrix product that follows.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

__all__ = ["nhwc", "from_nhwc", "im2col_nhwc", "im2col_nhwc_serial", "col2im_nhwc", "col2im_nhwc_serial",
           "channel_moments", "channel_moments_serial", "channel_grad_sums", "column_sums", "add_row",
           "affine_channels", "affine_channels_2", "relu_forward", "relu_backward", "maxpool_forward",
           "maxpool_backward", "sgd_momentum_update", "sgd_momentum_update_serial", "bn_relu_pool_forward",
           "bn_relu_pool_forward_serial", "bn_relu_pool_grad_sums", "bn_relu_pool_grad_sums_serial",
           "bn_relu_pool_backward", "bn_relu_pool_backward_serial", "pool_bias_relu", "pool_bias_relu_serial"]

_opts = dict(parallel=True, cache=True, fastmath=False, nogil=True)
# Serial twins of some kernels run in several Python threads at once (see blocks.py).
# Each is a function of its own: numba's cache keys on the Python function.
_serial = dict(_opts, parallel=False)


def nhwc(a):
    """The (N, H, W, C) C-contiguous array behind an (N, C, H, W) array (copied only if needed)."""
    t = a.transpose(0, 2, 3, 1)
    return t if t.flags.c_contiguous else np.ascontiguousarray(t)


def from_nhwc(a):
    """(N, H, W, C) memory seen as (N, C, H, W): the layout layers hand to each other."""
    return a.transpose(0, 3, 1, 2)


@njit(inline="always")
def _im2col_row(x, k, s, p, oh, ow, col, r):
    """The OW rows of col for output row r = (n, y)."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    ni, y = r // oh, r % oh
    for xo in range(ow):
        row = r * ow + xo
        for i in range(k):
            yy = y * s + i - p
            for j in range(k):
                xx = xo * s + j - p
                base = (i * k + j) * c
                if 0 <= yy < h and 0 <= xx < w:
                    for ci in range(c):
                        col[row, base + ci] = x[ni, yy, xx, ci]
                else:
                    for ci in range(c):
                        col[row, base + ci] = 0


@njit(inline="always")
def _inside(n_out, s, off, size):
    """The outputs lo..hi-1 whose input position o*s + off lies in [0, size)."""
    lo = 0 if off >= 0 else (-off + s - 1) // s
    hi = min(n_out, (size - 1 - off) // s + 1) if size - 1 - off >= 0 else 0
    return lo, max(lo, hi)


@njit(inline="always")
def _im2col_row_few_channels(x, k, s, p, oh, ow, col, r):
    """:func:`_im2col_row` for inputs of 1-3 channels, column by column of col: the inner loop
    runs along the output row (no bounds test inside it), not over 1-3 channels. For the first
    layer's one channel: 0.66 ms against 2.03 ms at batch 64."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    ni, y = r // oh, r % oh
    r0 = r * ow
    for i in range(k):
        yy = y * s + i - p
        for j in range(k):
            lo, hi = _inside(ow, s, j - p, w)
            if yy < 0 or yy >= h:
                lo, hi = 0, 0
            for ci in range(c):
                q = (i * k + j) * c + ci
                for xo in range(lo):
                    col[r0 + xo, q] = 0
                for xo in range(lo, hi):
                    col[r0 + xo, q] = x[ni, yy, xo * s + j - p, ci]
                for xo in range(hi, ow):
                    col[r0 + xo, q] = 0


@njit(inline="always")
def _im2col_rows(x, k, s, p, oh, ow, col, r):
    """The OW rows of col for output row r, by the loop that suits x's channel count."""
    if x.shape[3] <= 3:
        _im2col_row_few_channels(x, k, s, p, oh, ow, col, r)
    else:
        _im2col_row(x, k, s, p, oh, ow, col, r)


@njit(**_opts)
def im2col_nhwc(x, k, s, p, oh, ow, col):
    """col[(n, y, x), (i, j, c)] = x_pad[n, y*s + i, x*s + j, c] (zero outside the image)."""
    for r in prange(x.shape[0] * oh):
        _im2col_rows(x, k, s, p, oh, ow, col, r)
    return col


@njit(**_serial)
def im2col_nhwc_serial(x, k, s, p, oh, ow, col):
    """:func:`im2col_nhwc` without threads (for the inference pipeline's worker threads)."""
    for r in range(x.shape[0] * oh):
        _im2col_rows(x, k, s, p, oh, ow, col, r)
    return col


@njit(inline="always")
def _col2im_row(dcol, k, s, p, oh, ow, dx, r):
    """Input row r = (n, yy) of :func:`col2im_nhwc`."""
    h, w, c = dx.shape[1], dx.shape[2], dx.shape[3]
    ni, yy = r // h, r % h
    for xx in range(w):
        for ci in range(c):
            dx[ni, yy, xx, ci] = 0
        for i in range(k):
            t = yy + p - i
            if t < 0 or t % s != 0 or t // s >= oh:
                continue
            y = t // s
            for j in range(k):
                u = xx + p - j
                if u < 0 or u % s != 0 or u // s >= ow:
                    continue
                row = (ni * oh + y) * ow + u // s
                base = (i * k + j) * c
                for ci in range(c):
                    dx[ni, yy, xx, ci] += dcol[row, base + ci]


@njit(**_opts)
def col2im_nhwc(dcol, k, s, p, oh, ow, dx):
    """Adjoint of im2col as a gather: dx[n, y, x, c] = sum of the dcol entries that came from it."""
    for r in prange(dx.shape[0] * dx.shape[1]):
        _col2im_row(dcol, k, s, p, oh, ow, dx, r)
    return dx


@njit(**_serial)
def col2im_nhwc_serial(dcol, k, s, p, oh, ow, dx):
    """:func:`col2im_nhwc` without threads."""
    for r in range(dx.shape[0] * dx.shape[1]):
        _col2im_row(dcol, k, s, p, oh, ow, dx, r)
    return dx


@njit(inline="always")
def _moment_rows(x, shift, lo, hi, s1, s2):
    """Add rows lo..hi-1 of x into s1 += x - shift and s2 += (x - shift)^2."""
    for r in range(lo, hi):
        for ci in range(x.shape[1]):
            d = x[r, ci] - shift[ci]
            s1[ci] += d
            s2[ci] += d * d


@njit(**_opts)
def channel_moments(x, shift):
    """Per column of an (M, C) matrix, in float64: sum(x - shift) and sum((x - shift)^2).

    Shifting by a value near the mean (the first row) keeps the one-pass
    variance E[(x-K)^2] - E[x-K]^2 accurate; float64 sums keep it exact enough.
    """
    m, c = x.shape
    chunks = min(m, 256)
    part1 = np.zeros((chunks, c))
    part2 = np.zeros((chunks, c))
    for t in prange(chunks):
        s1 = np.zeros(c)
        s2 = np.zeros(c)
        _moment_rows(x, shift, t * m // chunks, (t + 1) * m // chunks, s1, s2)
        part1[t] = s1
        part2[t] = s2
    return part1.sum(axis=0), part2.sum(axis=0)


@njit(**_serial)
def channel_moments_serial(x, shift):
    """:func:`channel_moments` without threads."""
    s1 = np.zeros(x.shape[1])
    s2 = np.zeros(x.shape[1])
    _moment_rows(x, shift, 0, x.shape[0], s1, s2)
    return s1, s2


@njit(**_opts)
def channel_grad_sums(g, x, mean):
    """Per column of (M, C) matrices, in float64: sum(g) and sum(g * (x - mean)) (BatchNorm backward)."""
    m, c = x.shape
    chunks = min(m, 256)
    part1 = np.zeros((chunks, c))
    part2 = np.zeros((chunks, c))
    for t in prange(chunks):
        lo, hi = t * m // chunks, (t + 1) * m // chunks
        s1 = np.zeros(c)
        s2 = np.zeros(c)
        for r in range(lo, hi):
            for ci in range(c):
                gv = g[r, ci]
                s1[ci] += gv
                s2[ci] += gv * (x[r, ci] - mean[ci])
        part1[t] = s1
        part2[t] = s2
    return part1.sum(axis=0), part2.sum(axis=0)


@njit(**_opts)
def column_sums(a):
    """Sum of each column of an (M, C) matrix, accumulated in float64 (a bias gradient)."""
    m, c = a.shape
    chunks = min(m, 256)
    part = np.zeros((chunks, c))
    for t in prange(chunks):
        lo, hi = t * m // chunks, (t + 1) * m // chunks
        s = np.zeros(c)
        for r in range(lo, hi):
            for ci in range(c):
                s[ci] += a[r, ci]
        part[t] = s
    return part.sum(axis=0)


@njit(**_opts)
def add_row(a, b):
    """a[r, :] += b for every row, in place (a bias)."""
    m, c = a.shape
    for r in prange(m):
        for ci in range(c):
            a[r, ci] += b[ci]
    return a


@njit(**_opts)
def affine_channels(x, scale, shift, out):
    """out[r, c] = x[r, c] * scale[c] + shift[c] (BatchNorm's normalise-and-scale in one pass)."""
    m, c = x.shape
    for r in prange(m):
        for ci in range(c):
            out[r, ci] = x[r, ci] * scale[ci] + shift[ci]
    return out


@njit(**_opts)
def affine_channels_2(g, x, a, b, c0, out):
    """out[r, c] = a[c] * g[r, c] + b[c] * x[r, c] + c0[c] (BatchNorm's backward in one pass)."""
    m, c = x.shape
    for r in prange(m):
        for ci in range(c):
            out[r, ci] = a[ci] * g[r, ci] + b[ci] * x[r, ci] + c0[ci]
    return out


@njit(**_opts)
def relu_forward(x, out):
    """out = max(x, 0) on flat arrays."""
    for i in prange(x.size):
        v = x[i]
        out[i] = 0 if v <= 0 else v          # (a NaN stays NaN, as in PyTorch)
    return out


@njit(**_opts)
def relu_backward(g, y, out):
    """out = g where the ReLU's output y > 0, else 0 (flat arrays)."""
    for i in prange(g.size):
        out[i] = g[i] if y[i] > 0 else 0
    return out


@njit(**_opts)
def maxpool_forward(x, k, out, arg):
    """Non-overlapping k x k max-pool on NHWC; arg[n, y, x, c] = i*k + j of the first maximum.

    The loop over channels is innermost, so each comparison runs across C
    contiguous values (SIMD); strict ">" keeps the first maximum on ties, and
    a NaN wins as in PyTorch.
    """
    n, oh, ow, c = out.shape
    for r in prange(n * oh):
        ni, y = r // oh, r % oh
        for xo in range(ow):
            o = out[ni, y, xo]
            a = arg[ni, y, xo]
            src = x[ni, y * k, xo * k]
            for ci in range(c):
                o[ci] = src[ci]
                a[ci] = 0
            for i in range(k):
                for j in range(k):
                    if i == 0 and j == 0:
                        continue
                    src = x[ni, y * k + i, xo * k + j]
                    pos = i * k + j
                    for ci in range(c):
                        v = src[ci]
                        if v > o[ci] or (v != v and o[ci] == o[ci]):
                            o[ci] = v
                            a[ci] = pos
    return out


@njit(**_opts)
def maxpool_backward(g, arg, k, dx):
    """Each window's gradient to its argmax, zero elsewhere (including a ragged floor-mode edge)."""
    n, h, w, c = dx.shape
    _, oh, ow, _ = g.shape
    for r in prange(n * h):
        ni, yy = r // h, r % h
        y, i = yy // k, yy % k
        for xx in range(w):
            xo, j = xx // k, xx % k
            if y >= oh or xo >= ow:
                for ci in range(c):
                    dx[ni, yy, xx, ci] = 0
                continue
            pos = i * k + j
            for ci in range(c):
                dx[ni, yy, xx, ci] = g[ni, y, xo, ci] if arg[ni, y, xo, ci] == pos else 0
    return dx


@njit(inline="always")
def _sgd_element(p, g, buf, i, lr, momentum, dampening, weight_decay, nesterov, first):
    gi = g[i] + weight_decay * p[i]
    if first:
        b = gi
    else:
        b = momentum * buf[i] + (1 - dampening) * gi
    buf[i] = b
    p[i] -= lr * (gi + momentum * b if nesterov else b)


@njit(**_opts)
def sgd_momentum_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """PyTorch's SGD step for one flat parameter, in one pass (see minicnn.optim.sgd)."""
    for i in prange(p.size):
        _sgd_element(p, g, buf, i, lr, momentum, dampening, weight_decay, nesterov, first)


# Starting a parallel loop wakes the sleeping worker threads: about 0.1-0.3 ms on the 2-core test
# machine, more than the whole update of a bias vector. Below SERIAL_BELOW elements the same update
# runs without threads (minicnn.optim.SGD picks by size). It must be a function of its own: numba's
# cache keys on the Python function, so two jit options of one function would share one entry.
SERIAL_BELOW = 1 << 16


@njit(**_serial)
def sgd_momentum_update_serial(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """:func:`sgd_momentum_update` without threads."""
    for i in range(p.size):
        _sgd_element(p, g, buf, i, lr, momentum, dampening, weight_decay, nesterov, first)


# --- BatchNorm -> ReLU -> MaxPool fused (what every block of the EmotionClassifier does) ---------
#
# Unfused, these three layers read and write the full-size activation about six times forward and
# nine times backward. Fused: forward reads it twice (statistics, then normalise + ReLU + pool in
# one go, writing only the pooled output and a one-byte argmax); backward reads it twice (the two
# BatchNorm sums touch only each window's winner, then one pass writes dL/dx). Same arithmetic,
# same tie rule (first maximum), so the results equal the unfused layers'.

@njit(inline="always")
def _bn_relu_pool_row(x, scale, shift, k, out, arg, r):
    """Output row r = (n, y) of :func:`bn_relu_pool_forward`."""
    oh, ow, c = out.shape[1], out.shape[2], out.shape[3]
    ni, y = r // oh, r % oh
    zero = scale[0] * 0     # 0 in the arrays' own type (a float literal would make v float64); a
    #                         non-finite scale gives NaN here, and the step's output check takes over
    for xo in range(ow):
        o = out[ni, y, xo]
        a = arg[ni, y, xo]
        for i in range(k):
            for j in range(k):
                src = x[ni, y * k + i, xo * k + j]
                pos = i * k + j
                for ci in range(c):
                    v = src[ci] * scale[ci] + shift[ci]
                    v = v if v > 0 or v != v else zero  # ReLU (a NaN stays NaN, -inf gives 0)
                    if pos == 0 or v > o[ci] or (v != v and o[ci] == o[ci]):    # (a NaN wins, as in PyTorch)
                        o[ci] = v
                        a[ci] = pos


@njit(**_opts)
def bn_relu_pool_forward(x, scale, shift, k, out, arg):
    """out = maxpool_k(relu(x * scale + shift)) on NHWC, arg = i*k + j of each window's first maximum."""
    for r in prange(out.shape[0] * out.shape[1]):
        _bn_relu_pool_row(x, scale, shift, k, out, arg, r)
    return out


@njit(**_serial)
def bn_relu_pool_forward_serial(x, scale, shift, k, out, arg):
    """:func:`bn_relu_pool_forward` without threads (for the inference pipeline's worker threads)."""
    for r in range(out.shape[0] * out.shape[1]):
        _bn_relu_pool_row(x, scale, shift, k, out, arg, r)
    return out


# Inference with BatchNorm folded into the conv (minicnn/inference_session.py): what is left after
# the conv is a per-channel bias, then ReLU, then max pooling. Adding a constant and ReLU are both
# monotone, so pooling first gives the same numbers from a quarter of the additions:
#     maxpool(relu(y + b)) = relu(maxpool(y) + b)
# (a NaN in a window still wins and stays NaN, as in PyTorch).

@njit(inline="always")
def _pool_bias_relu_row(x, bias, k, out, r):
    oh, ow, c = out.shape[1], out.shape[2], out.shape[3]
    ni, y = r // oh, r % oh
    zero = bias[0] * 0
    for xo in range(ow):
        o = out[ni, y, xo]
        for ci in range(c):
            o[ci] = x[ni, y * k, xo * k, ci]
        for i in range(k):
            for j in range(k):
                if i == 0 and j == 0:
                    continue
                src = x[ni, y * k + i, xo * k + j]
                for ci in range(c):
                    v = src[ci]
                    if v > o[ci] or (v != v and o[ci] == o[ci]):
                        o[ci] = v
        for ci in range(c):
            v = o[ci] + bias[ci]
            o[ci] = v if v > 0 or v != v else zero


@njit(**_opts)
def pool_bias_relu(x, bias, k, out):
    """out = relu(maxpool_k(x) + bias) on NHWC (= maxpool_k(relu(x + bias)))."""
    for r in prange(out.shape[0] * out.shape[1]):
        _pool_bias_relu_row(x, bias, k, out, r)
    return out


@njit(**_serial)
def pool_bias_relu_serial(x, bias, k, out):
    """:func:`pool_bias_relu` without threads (for worker threads)."""
    for r in range(out.shape[0] * out.shape[1]):
        _pool_bias_relu_row(x, bias, k, out, r)
    return out


# The first conv of a grey image has one input channel: im2col would make a matrix product with
# only 9 columns (K = 9), slow for a BLAS, and the pooling would then read its whole output again.
# Computed directly, each output pixel is 9 scalar taps times 9 weight vectors (vectorised over the
# output channels), pooled, biased and rectified while still in registers; only the pooled map is
# written.

@njit(inline="always")
def _grey_conv3x3_pool_bias_relu_row(xp, w, bias, pool, out, r):
    """Pooled row r = (n, py) of relu(maxpool_pool(conv3x3(x)) + bias): xp (N, H + 2p, W + 2p) the
    zero-padded grey images, w (9, OC) the taps in row-major order."""
    ph, pw, oc = out.shape[1], out.shape[2], out.shape[3]
    ni, py = r // ph, r % ph
    zero = bias[0] * 0
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    for px in range(pw):
        o = out[ni, py, px]
        for i in range(pool):
            oy = py * pool + i
            r0, r1, r2 = xp[ni, oy], xp[ni, oy + 1], xp[ni, oy + 2]
            for j in range(pool):
                ox = px * pool + j
                t0, t1, t2 = r0[ox], r0[ox + 1], r0[ox + 2]
                t3, t4, t5 = r1[ox], r1[ox + 1], r1[ox + 2]
                t6, t7, t8 = r2[ox], r2[ox + 1], r2[ox + 2]
                first = i == 0 and j == 0
                for co in range(oc):
                    v = (t0 * w0[co] + t1 * w1[co] + t2 * w2[co] + t3 * w3[co] + t4 * w4[co]
                         + t5 * w5[co] + t6 * w6[co] + t7 * w7[co] + t8 * w8[co])
                    if first or v > o[co] or (v != v and o[co] == o[co]):     # (a NaN wins)
                        o[co] = v
        for co in range(oc):
            v = o[co] + bias[co]
            o[co] = v if v > 0 or v != v else zero


@njit(**_opts)
def grey_conv3x3_pool_bias_relu(xp, w, bias, pool, out):
    """out (N, PH, PW, OC) = relu(maxpool_pool(conv3x3(x)) + bias) for one input channel, stride 1,
    computed directly (no im2col); xp is x zero-padded. Its reference: conv, then
    :func:`pool_bias_relu`."""
    for r in prange(out.shape[0] * out.shape[1]):
        _grey_conv3x3_pool_bias_relu_row(xp, w, bias, pool, out, r)
    return out


@njit(**_serial)
def grey_conv3x3_pool_bias_relu_serial(xp, w, bias, pool, out):
    """:func:`grey_conv3x3_pool_bias_relu` without threads (for worker threads)."""
    for r in range(out.shape[0] * out.shape[1]):
        _grey_conv3x3_pool_bias_relu_row(xp, w, bias, pool, out, r)
    return out


@njit(inline="always")
def _bn_relu_pool_grad_row(g, arg, x, scale, shift, mean, k, s1, s2, r):
    """Add output row r = (n, y)'s share of :func:`bn_relu_pool_grad_sums` into s1, s2.

    Each window is scanned pixel by pixel, every channel compared with its winner: contiguous
    reads the compiler vectorises, faster than fetching each channel's winner (its own pixel,
    found by dividing by k) one by one (the first layer: 1.55 ms against 2.26 at batch 64)."""
    oh, ow, c = g.shape[1], g.shape[2], g.shape[3]
    ni, y = r // oh, r % oh
    for xo in range(ow):
        a, gw = arg[ni, y, xo], g[ni, y, xo]
        for i in range(k):
            for j in range(k):
                pos = i * k + j
                src = x[ni, y * k + i, xo * k + j]
                for ci in range(c):
                    xv = src[ci]
                    # (a select, not a branch: SIMD. A loser adds 0 * (xv - mean), which is NaN
                    # only for an infinite xv, and then the mean and both sums are NaN anyway.)
                    gv = gw[ci] if a[ci] == pos and xv * scale[ci] + shift[ci] > 0 else 0.0
                    s1[ci] += gv
                    s2[ci] += gv * (xv - mean[ci])


@njit(**_opts)
def bn_relu_pool_grad_sums(g, arg, x, scale, shift, mean, k):
    """sum(g_bn) and sum(g_bn * (x - mean)) per channel, where g_bn = dL/d(BatchNorm output):
    each window's gradient at its winner, if the ReLU let it through."""
    n, oh, ow, c = g.shape
    rows = n * oh
    chunks = min(rows, 256)
    part1 = np.zeros((chunks, c))
    part2 = np.zeros((chunks, c))
    for t in prange(chunks):
        s1 = np.zeros(c)
        s2 = np.zeros(c)
        for r in range(t * rows // chunks, (t + 1) * rows // chunks):
            _bn_relu_pool_grad_row(g, arg, x, scale, shift, mean, k, s1, s2, r)
        part1[t] = s1
        part2[t] = s2
    return part1.sum(axis=0), part2.sum(axis=0)


@njit(**_serial)
def bn_relu_pool_grad_sums_serial(g, arg, x, scale, shift, mean, k):
    """:func:`bn_relu_pool_grad_sums` without threads."""
    c = g.shape[3]
    s1 = np.zeros(c)
    s2 = np.zeros(c)
    for r in range(g.shape[0] * g.shape[1]):
        _bn_relu_pool_grad_row(g, arg, x, scale, shift, mean, k, s1, s2, r)
    return s1, s2


@njit(inline="always")
def _bn_relu_pool_backward_row(g, arg, x, scale, shift, k, a, b, c0, dx, r):
    """Input row r = (n, yy) of :func:`bn_relu_pool_backward`."""
    h, w, c = dx.shape[1], dx.shape[2], dx.shape[3]
    oh, ow = g.shape[1], g.shape[2]
    ni, yy = r // h, r % h
    y, i = yy // k, yy % k
    for xx in range(w):
        xo, j = xx // k, xx % k
        inside = y < oh and xo < ow
        pos = i * k + j
        for ci in range(c):
            xv = x[ni, yy, xx, ci]
            gv = xv * 0
            if inside:
                if arg[ni, y, xo, ci] == pos and xv * scale[ci] + shift[ci] > 0:
                    gv = g[ni, y, xo, ci]
            dx[ni, yy, xx, ci] = a[ci] * gv + b[ci] * xv + c0[ci]


@njit(**_opts)
def bn_relu_pool_backward(g, arg, x, scale, shift, k, a, b, c0, dx):
    """dx = a * g_bn + b * x + c0 per channel (BatchNorm's backward as an affine map), in one pass."""
    for r in prange(dx.shape[0] * dx.shape[1]):
        _bn_relu_pool_backward_row(g, arg, x, scale, shift, k, a, b, c0, dx, r)
    return dx


@njit(**_serial)
def bn_relu_pool_backward_serial(g, arg, x, scale, shift, k, a, b, c0, dx):
    """:func:`bn_relu_pool_backward` without threads."""
    for r in range(dx.shape[0] * dx.shape[1]):
        _bn_relu_pool_backward_row(g, arg, x, scale, shift, k, a, b, c0, dx, r)
    return dx


# --- A conv block on one input channel (grey images), with no conv output in memory -------------
#
# The first block of the EmotionClassifier convolves 1 channel into 32: 9 multiply-adds per output
# value, while its conv output (N, 48, 48, 32) is the largest array of the step. So
# blocks.ConvBatchNormReLUPool's grey route never stores it: the forward computes the conv on the
# fly from the zero-padded input xp (N, H + 2p, W + 2p) and keeps only each window's winner's conv
# value; the BatchNorm statistics and the weight gradient's dense part come from the taps' sums and
# Gram matrix (see grey_block.py).

@njit(**_serial)
def grey_patch_moments_serial(xs, k, oh, ow):
    """(sum over output pixels of each tap, the taps' Gram matrix sum t_a t_b), float64, for a
    stride-1 conv on the padded and shifted float64 images ``xs``. Each sum goes into a vector of
    per-column partial sums (SIMD without reordering any one sum), added up at the end."""
    kk = k * k
    pairs = np.zeros((kk * (kk + 1) // 2, ow))
    singles = np.zeros((kk, ow))
    for ni in range(xs.shape[0]):
        for oy in range(oh):
            q = 0
            for a in range(kk):
                ra = xs[ni, oy + a // k, a % k:a % k + ow]          # tap a along the output row
                sa = singles[a]
                for ox in range(ow):
                    sa[ox] += ra[ox]
                for b in range(a, kk):
                    rb = xs[ni, oy + b // k, b % k:b % k + ow]
                    pq = pairs[q]
                    for ox in range(ow):
                        pq[ox] += ra[ox] * rb[ox]
                    q += 1
    sx = np.zeros(kk)
    gram = np.zeros((kk, kk))
    q = 0
    for a in range(kk):
        sx[a] = singles[a].sum()
        for b in range(a, kk):
            gram[a, b] = gram[b, a] = pairs[q].sum()
            q += 1
    return sx, gram


@njit(inline="always")
def _grey_keep_max(y, scale, shift, pos, o, a, yw, zero):
    """One window position's conv values y (every channel) into the running max o, argmax a and
    the winner's conv value yw, through BatchNorm and ReLU (the first maximum wins; a NaN wins)."""
    for co in range(y.shape[0]):
        v = y[co] * scale[co] + shift[co]
        v = v if v > 0 or v != v else zero                  # ReLU (a NaN stays NaN)
        if pos == 0 or v > o[co] or (v != v and o[co] == o[co]):
            o[co] = v
            a[co] = pos
            yw[co] = y[co]


@njit(**_serial)
def grey_conv_bn_relu_pool_serial(xp, w, scale, shift, k, s, kp, out, arg, ywin):
    """out (N, PH, PW, OC) = maxpool_kp(relu(conv(x) * scale + shift)), arg = each window's first
    maximum (as :func:`bn_relu_pool_forward`), ywin = the conv (no bias) at each channel's winner;
    the conv computed on the fly from the padded input xp, w (k*k, OC)."""
    oc = out.shape[3]
    y = np.zeros(oc, xp.dtype)
    zero = y[0]
    for ni in range(out.shape[0]):
        for py in range(out.shape[1]):
            for px in range(out.shape[2]):
                o, a, yw = out[ni, py, px], arg[ni, py, px], ywin[ni, py, px]
                for i in range(kp):
                    for j in range(kp):
                        oy, ox = (py * kp + i) * s, (px * kp + j) * s
                        y[:] = zero
                        for t in range(k * k):
                            xt = xp[ni, oy + t // k, ox + t % k]
                            for co in range(oc):
                                y[co] += xt * w[t, co]
                        _grey_keep_max(y, scale, shift, i * kp + j, o, a, yw, zero)
    return out


@njit(**_serial)
def grey3_conv_bn_relu_pool_serial(xp, w, scale, shift, kp, out, arg, ywin):
    """:func:`grey_conv_bn_relu_pool_serial` for a 3x3 stride-1 conv, its 9 taps in registers."""
    oc = out.shape[3]
    y = np.zeros(oc, xp.dtype)
    zero = y[0]
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]
    for ni in range(out.shape[0]):
        for py in range(out.shape[1]):
            for px in range(out.shape[2]):
                o, a, yw = out[ni, py, px], arg[ni, py, px], ywin[ni, py, px]
                for i in range(kp):
                    oy = py * kp + i
                    r0, r1, r2 = xp[ni, oy], xp[ni, oy + 1], xp[ni, oy + 2]
                    for j in range(kp):
                        ox = px * kp + j
                        t0, t1, t2 = r0[ox], r0[ox + 1], r0[ox + 2]
                        t3, t4, t5 = r1[ox], r1[ox + 1], r1[ox + 2]
                        t6, t7, t8 = r2[ox], r2[ox + 1], r2[ox + 2]
                        for co in range(oc):          # (the same sum, in the same order, as the loop above)
                            y[co] = (zero + t0 * w0[co] + t1 * w1[co] + t2 * w2[co] + t3 * w3[co] + t4 * w4[co]
                                     + t5 * w5[co] + t6 * w6[co] + t7 * w7[co] + t8 * w8[co])
                        _grey_keep_max(y, scale, shift, i * kp + j, o, a, yw, zero)
    return out


@njit(**_serial)
def grey_block_grad_sums_serial(xp, g, arg, ywin, scale, shift, mean, k, s, kp):
    """For g = dL/d(pooled output): sum(g_bn), sum(g_bn * (y - mean)) per channel and
    T_g = sum(taps * g_bn) per (tap, channel), float64, where g_bn = dL/d(BatchNorm output) is each
    window's gradient at its winner if the ReLU let it through (y: the winner's conv value)."""
    n, ph, pw, oc = g.shape
    kk = k * k
    gb = np.zeros(oc, g.dtype)
    row = np.zeros((kk, oc), g.dtype)          # one pooled row's taps * g_bn, then added in float64
    zero = gb[0]                               # (0 in the arrays' type: a loser adds exactly 0)
    s1, s2, tg = np.zeros(oc), np.zeros(oc), np.zeros((kk, oc))
    for ni in range(n):
        for py in range(ph):
            row[:] = zero
            for px in range(pw):
                a, gw, yw = arg[ni, py, px], g[ni, py, px], ywin[ni, py, px]
                for co in range(oc):
                    yv = yw[co]
                    gv = gw[co] if yv * scale[co] + shift[co] > 0 else zero
                    s1[co] += gv
                    s2[co] += gv * (yv - mean[co])
                for i in range(kp):
                    for j in range(kp):
                        pos = i * kp + j
                        for co in range(oc):        # this position's share: the channels it won
                            gb[co] = gw[co] if a[co] == pos and yw[co] * scale[co] + shift[co] > 0 else zero
                        oy, ox = (py * kp + i) * s, (px * kp + j) * s
                        for ti in range(k):
                            xr = xp[ni, oy + ti]
                            for tj in range(k):
                                xt = xr[ox + tj]
                                t = ti * k + tj
                                for co in range(oc):
                                    row[t, co] += xt * gb[co]
            for t in range(kk):
                for co in range(oc):
                    tg[t, co] += row[t, co]
    return s1, s2, tg


@njit(**_serial)
def grey_block_input_grad_serial(xp, w, g, arg, scale, shift, a, b, c0, k, s, p, kp, dx):
    """dx (N, H, W) = dL/dx of the grey conv block: each output pixel's dL/dy = a * g_bn + b * y + c0
    (BatchNorm's backward as an affine map; y recomputed) sent back along its k*k taps."""
    n, ph, pw, oc = g.shape
    h, wd = dx.shape[1], dx.shape[2]
    oh, ow = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    y = np.zeros(oc, xp.dtype)
    dy = np.zeros(oc, xp.dtype)
    zero = y[0]
    dx[:] = zero
    for ni in range(n):
        for oy in range(oh):
            for ox in range(ow):
                y[:] = zero
                for t in range(k * k):
                    xt = xp[ni, oy * s + t // k, ox * s + t % k]
                    for co in range(oc):
                        y[co] += xt * w[t, co]
                py, px = oy // kp, ox // kp
                inside = py < ph and px < pw
                pos = (oy % kp) * kp + ox % kp
                for co in range(oc):
                    yv = y[co]
                    gv = zero
                    if inside:
                        if arg[ni, py, px, co] == pos and yv * scale[co] + shift[co] > 0:
                            gv = g[ni, py, px, co]
                    dy[co] = a[co] * gv + b[co] * yv + c0[co]
                for t in range(k * k):
                    yy, xx = oy * s - p + t // k, ox * s - p + t % k
                    if 0 <= yy < h and 0 <= xx < wd:
                        acc = zero
                        for co in range(oc):
                            acc += dy[co] * w[t, co]
                        dx[ni, yy, xx] += acc
    return dx
