"""The grey route of :class:`~.blocks.ConvBatchNormReLUPool`: Conv2d with one input channel ->
BatchNorm2d -> ReLU -> MaxPool2d, with no conv output in memory.

Replaces the same four textbook layers as the block's other routes, for a conv on one input channel
(the EmotionClassifier's first layer: 1 -> 32 channels, 9 taps, at 48x48). Its conv output is the
largest array of a training step (19 MB at batch 64) for the fewest multiplications (9 per value),
so storing it and reading it back costs more than computing it again. The forward computes the
conv on the fly and keeps only each pooling window's winner's conv value (a quarter of the size for
2x2 pooling); what needs a sum over every pixel comes from two small matrices of the input alone. Write t for a pixel's k*k taps (its im2col row), w for
the (k*k, OC) weight columns, so y = t w; over the M output pixels, with every tap shifted by the
batch's mean pixel value s0 (the shift cancels out of what follows; it keeps the sums accurate):

    S = sum t                   (k*k)          C = sum (t - S/M)(t - S/M)^T = G - S S^T / M
    G = sum t t^T               (k*k, k*k)     (the taps' centered scatter matrix)

Forward (training):
    mean_c = w_c . (S / M) (+ s0 sum(w_c)),  var_c = w_c^T C w_c / M        the BatchNorm statistics
    out = maxpool(relu(y * scale + shift)), y computed on the fly          one pass: + argmax, y at the winner

Backward: BatchNorm's backward is an affine map per channel, dL/dy = a g_bn + b y + c0, where
g_bn = dL/d(BatchNorm output) is nonzero only at each window's winner. So

    dL/dW = sum t^T dL/dy = a * (sum t^T g_bn) + b * (sum t^T (y - mean)) + (c0 + b mean) * (sum t)
          = a * T_g + b * (C w) + (c0 + b * mean) * S

where T_g = sum t^T g_bn is gathered with the two sums BatchNorm's backward needs, in one pass
over the windows (the only pass), and sum t^T (y - mean) = C w by the same algebra as the variance.
dL/dx, when asked for, recomputes y and dL/dy at every pixel and sends dL/dy back along the taps.

Each pass takes chunks of images on the block's threads; the float64 sums are added in chunk order
(deterministic). ``tests/test_kernels.py`` ties the route to the textbook layers.
"""
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import kernels as cpu
from . import threads, workspace
from .layers import accumulate_weight_columns, backward_affine, _train_affine, eval_affine
from ..common import weight_columns


@dataclass
class GreySaved:
    xp: np.ndarray           # the block's input, zero-padded: (N, H + 2p, W + 2p)
    x_shape: tuple           # (N, 1, H, W)
    w: np.ndarray            # the (k*k, OC) weight columns used forward
    centered: np.ndarray     # C (k*k, k*k) float64; None in eval mode
    tap_sums: np.ndarray     # S: each tap's sum over the output pixels (float64); None in eval mode
    mean: np.ndarray
    inv_std: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    arg: np.ndarray          # (N, PH, PW, OC) uint8 argmax of each pooling window
    ywin: np.ndarray         # (N, PH, PW, OC) the conv output at each window's winner
    training: bool
    count: int               # M: output pixels in the batch


def _chunk(n):
    return -(-n // threads.workers())            # one chunk per thread: every image costs the same


def tap_statistics(xp, k, s, oh, ow):
    """(S, C, M) over every output pixel of the padded grey images xp (float64; see above)."""
    n = xp.shape[0]
    s0 = float(xp.mean(dtype=np.float64))        # (the shift: any value near the pixels' mean)
    xs = xp.astype(np.float64) - s0
    parts = {}

    def chunk(lo, hi):
        if s == 1:
            parts[lo] = cpu.grey_patch_moments_serial(xs[lo:hi], k, oh, ow)
        else:                    # (strided: the taps as im2col rows, t^T t by the BLAS)
            taps = sliding_window_view(xs[lo:hi], (k, k), axis=(1, 2))[:, ::s, ::s][:, :oh, :ow].reshape(-1, k * k)
            parts[lo] = taps.sum(axis=0), taps.T @ taps
    threads.run_chunks(chunk, n, _chunk(n))
    sums = [parts[lo] for lo in sorted(parts)]
    tap_sums = np.sum([t[0] for t in sums], axis=0)
    gram = np.sum([t[1] for t in sums], axis=0)
    m = n * oh * ow
    centered = gram - np.outer(tap_sums, tap_sums) / m
    return tap_sums + m * s0, centered, m


def forward(block, x, conv_shape, offset, keep):
    """The block's output for x (N, 1, H, W); ``keep``: save what backward needs (else inference)."""
    conv, bn, pool = block.conv, block.bn, block.pool
    n, oc, oh, ow = conv_shape
    k, s, p, kp = conv.kernel_size, conv.stride, conv.padding, pool.kernel_size
    xp = workspace.empty((n, x.shape[2] + 2 * p, x.shape[3] + 2 * p), x.dtype)
    xp[...] = 0
    xp[:, p:p + x.shape[2], p:p + x.shape[3]] = x[:, 0]
    w = np.ascontiguousarray(weight_columns(conv))                     # (k*k, OC)
    training = bn.training
    centered = tap_sums = None
    m = n * oh * ow
    if training:
        tap_sums, centered, m = tap_statistics(xp, k, s, oh, ow)
        w64 = w.astype(np.float64)
        mean = w64.T @ tap_sums / m                                    # mean_c = w_c . S / M
        var = np.maximum(np.einsum("tc,tc->c", centered @ w64, w64) / m, 0.0)   # w_c^T C w_c / M
        mean, inv_std, scale, shift = _train_affine(bn, mean, var, m, x.dtype, offset)
    else:
        mean, inv_std, scale, shift = eval_affine(bn, x.dtype, offset)
    out = workspace.empty((n, oh // kp, ow // kp, oc), x.dtype)
    arg = workspace.empty(out.shape, np.uint8) if keep else None
    ywin = workspace.empty(out.shape, x.dtype) if keep else None

    def chunk(lo, hi):
        a = arg[lo:hi] if keep else np.empty((hi - lo,) + out.shape[1:], np.uint8)
        yw = ywin[lo:hi] if keep else np.empty((hi - lo,) + out.shape[1:], x.dtype)
        if k == 3 and s == 1:
            cpu.grey3_conv_bn_relu_pool_serial(xp[lo:hi], w, scale, shift, kp, out[lo:hi], a, yw)
        else:
            cpu.grey_conv_bn_relu_pool_serial(xp[lo:hi], w, scale, shift, k, s, kp, out[lo:hi], a, yw)
    threads.run_chunks(chunk, n, _chunk(n))
    saved = (GreySaved(xp, x.shape, w, centered, tap_sums, mean, inv_std, scale, shift, arg, ywin, training, m)
             if keep else None)
    return cpu.from_nhwc(out), saved


def backward(block, sv, dout, input_grad):
    """dL/dx (or None), adding the conv's, the BatchNorm's (and a conv bias's) gradients."""
    conv, bn, pool = block.conv, block.bn, block.pool
    k, s, p, kp = conv.kernel_size, conv.stride, conv.padding, pool.kernel_size
    pool.check_grad(dout, cpu.from_nhwc(sv.arg).shape)
    g = cpu.nhwc(dout)
    n = g.shape[0]
    parts = {}

    def sums_chunk(lo, hi):
        parts[lo] = cpu.grey_block_grad_sums_serial(sv.xp[lo:hi], g[lo:hi], sv.arg[lo:hi], sv.ywin[lo:hi],
                                                    sv.scale, sv.shift, sv.mean, k, s, kp)
    threads.run_chunks(sums_chunk, n, _chunk(n))
    sums = [parts[lo] for lo in sorted(parts)]
    sum_g, sum_g_yc, taps_g = (np.sum([t[i] for t in sums], axis=0) for i in range(3))
    a, b, c0, sum_dy = backward_affine(bn, sum_g, sum_g_yc, sv.mean, sv.inv_std, sv.count, sv.training, g.dtype)
    a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c0))
    dw = a64 * taps_g                                                  # a * T_g
    if sv.training:                                                    # + b * (C w) + (c0 + b mean) * S
        dw += b64 * (sv.centered @ sv.w.astype(np.float64)) + np.outer(sv.tap_sums, c64 + b64 * sv.mean)
    accumulate_weight_columns(conv, dw.astype(g.dtype))
    if conv.bias is not None:
        conv.bias.accumulate_grad(sum_dy.astype(g.dtype))
    if not input_grad:
        return None
    _, _, h, wd = sv.x_shape
    dx = workspace.empty((n, h, wd), g.dtype)
    threads.run_chunks(lambda lo, hi: cpu.grey_block_input_grad_serial(
        sv.xp[lo:hi], sv.w, g[lo:hi], sv.arg[lo:hi], sv.scale, sv.shift, a, b, c0, k, s, p, kp, dx[lo:hi]),
        n, _chunk(n))
    return dx.reshape(sv.x_shape)
