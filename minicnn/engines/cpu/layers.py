"""CPU engine steps for single layers: the textbook math on channels-last memory, numba kernels.

Each step replaces one textbook layer (named in its docstring), reads that layer's parameters and
buffers through their public attributes, and keeps what its backward needs in a small dataclass of
its own. Activations are handed between steps as (N, C, H, W) *views* of (N, H, W, C) memory
(:func:`.kernels.from_nhwc`), so the shapes a user sees never change. Work arrays come from
:mod:`.workspace` (reused memory, no page faults).
"""
from dataclasses import dataclass

import numpy as np

from ..common import (LinearStepBase, Step, StepWithInputGrad, TextbookRun, batchnorm_buffers,
                      before_forward as _before_forward, restore_batchnorm_buffers, weight_columns)
from . import kernels as cpu
from . import workspace

__all__ = ["Conv2dStep", "BatchNorm2dStep", "ReLUStep", "MaxPool2dStep", "LinearStep",
           "accumulate_weight_columns", "batch_affine", "batch_affine_from_parts", "eval_affine",
           "backward_affine"]

# --- Conv2d ---------------------------------------------------------------------------------
def accumulate_weight_columns(conv, dw_columns):
    """Add dL/dW given in :func:`weight_columns`' layout to ``conv.weight.grad`` (OC, C, K, K)."""
    k = conv.kernel_size
    grad = workspace.empty(conv.weight.shape, dw_columns.dtype)
    grad[...] = dw_columns.reshape(k, k, conv.in_channels, conv.out_channels).transpose(3, 2, 0, 1)
    conv.weight.accumulate_grad(grad)


@dataclass
class ConvSaved:
    x_nhwc_shape: tuple
    col: np.ndarray          # (N*OH*OW, K*K*C) channels-last im2col rows
    w_col: np.ndarray        # (K*K*C, OC)
    out_shape: tuple         # (N, OC, OH, OW)


class Conv2dStep(StepWithInputGrad):
    """Replaces :class:`minicnn.nn.Conv2d`: numba im2col on NHWC memory, one GEMM whose result is the
    NHWC output (no transpose), col2im as a gather (each pixel sums the windows that saw it)."""

    def __init__(self, conv):
        self.conv = conv
        self.saved = None

    def forward(self, x, add_bias=True):
        """``add_bias=False`` leaves the bias out (a BatchNorm that follows takes it into account)."""
        conv = self.conv
        n, oc, oh, ow = conv.check(x)
        k, s, p, c = conv.kernel_size, conv.stride, conv.padding, conv.in_channels
        self.saved = None                            # let the last step's col go back to the workspace
        x_nhwc = cpu.nhwc(x)                                          # (N, H, W, C)
        col = cpu.im2col_nhwc(x_nhwc, k, s, p, oh, ow, workspace.empty((n * oh * ow, k * k * c), x.dtype))
        w_col = weight_columns(conv)
        out = np.matmul(col, w_col, out=workspace.empty((n * oh * ow, oc), x.dtype))   # = NHWC output
        if conv.bias is not None and add_bias:
            cpu.add_row(out, conv.bias.data)
        self.saved = ConvSaved(x_nhwc.shape, col, w_col, (n, oc, oh, ow))
        return cpu.from_nhwc(out.reshape(n, oh, ow, oc))

    def backward(self, dout, input_grad=True, bias_grad=None):
        """``bias_grad``: dL/db when the caller knows it already (the column sums of ``dout``)."""
        conv, sv = self.conv, self.saved
        if sv is None:
            raise _before_forward(conv)
        conv.check_grad(dout, sv.out_shape)
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        _, oc, oh, ow = sv.out_shape
        d = cpu.nhwc(dout).reshape(-1, oc)                            # (N*OH*OW, OC)
        if conv.bias is not None:
            conv.bias.accumulate_grad((cpu.column_sums(d) if bias_grad is None else bias_grad).astype(d.dtype))
        accumulate_weight_columns(conv, np.matmul(sv.col.T, d, out=workspace.empty(sv.w_col.shape, d.dtype)))
        if not input_grad:
            return None
        dcol = np.matmul(d, sv.w_col.T, out=workspace.empty(sv.col.shape, sv.col.dtype))
        dx = cpu.col2im_nhwc(dcol, k, s, p, oh, ow, workspace.empty(sv.x_nhwc_shape, dout.dtype))
        return cpu.from_nhwc(dx)



# --- BatchNorm2d: the statistics as one affine map per channel --------------------------------
def batch_affine(bn, x2, offset=None):
    """Training: statistics of the (M, C) channels-last input -> (mean, inv_std, scale, shift) with
    out = x * scale + shift, and the running statistics updated.

    ``offset``: the true input is ``x2 + offset`` (a conv bias not added yet). It cancels in the
    normalisation (the mean moves with it) and only enters the running mean; ``mean`` and
    ``shift`` are returned for ``x2`` itself."""
    m = x2.shape[0]
    shift0 = x2[0].astype(np.float64)
    s1, s2 = cpu.channel_moments(x2, shift0)              # shifted float64 sums: one pass
    mean = shift0 + s1 / m
    var = np.maximum(s2 / m - (s1 / m) ** 2, 0.0)
    return _train_affine(bn, mean, var, m, x2.dtype, offset)


def batch_affine_from_parts(bn, parts, dtype, offset=None):
    """:func:`batch_affine` from per-chunk moments [(count, shift, sum(x - shift), sum((x - shift)^2)), ...],
    combined exactly (Chan et al.'s pairwise update, in float64)."""
    counts = np.array([p[0] for p in parts], dtype=np.float64)[:, None]
    shifts, s1, s2 = (np.array([p[i] for p in parts], dtype=np.float64) for i in (1, 2, 3))
    means = shifts + s1 / counts                       # each chunk's mean ...
    m2 = np.maximum(s2 - s1 * s1 / counts, 0.0)       # ... and its sum of squared deviations
    m = counts.sum()
    mean = (counts * means).sum(axis=0) / m
    var = (m2 + counts * (means - mean) ** 2).sum(axis=0) / m
    return _train_affine(bn, mean, var, int(m), dtype, offset)


def _train_affine(bn, mean, var, m, dtype, offset):
    true_mean = mean if offset is None else mean + offset    # the running mean is of x2 + offset
    bn.update_running_stats(true_mean.astype(dtype), (var * (m / (m - 1))).astype(dtype))
    return _affine(bn, mean, var, dtype)


def eval_affine(bn, dtype, offset=None):
    """:func:`batch_affine` in eval mode: the running statistics, nothing to compute from x."""
    mean = bn.running_mean.astype(np.float64)
    if offset is not None:
        mean = mean - offset.astype(np.float64)
    return _affine(bn, mean, bn.running_var.astype(np.float64), dtype)


def _affine(bn, mean, var, dtype):
    inv_std = 1.0 / np.sqrt(var + bn.eps)
    scale = bn.weight.data * inv_std
    shift = bn.bias.data - mean * scale
    return mean, inv_std, scale.astype(dtype), shift.astype(dtype)


def backward_affine(bn, sum_g, sum_g_xc, mean, inv_std, m, training, dtype):
    """Accumulate dgamma, dbeta from sum(g), sum(g * (x - mean)); return (a, b, c0, sum_dx) such that
    dL/dx = a*g + b*x + c0 per channel (BatchNorm2d.backward's formula, rearranged), and the float64
    sum of dL/dx over each channel's M values: a*sum(g) + b*M*mean + c0*M, which is 0 in training (a
    shift of the input does not change the output) and a*sum(g) in eval."""
    sum_g_xhat = sum_g_xc * inv_std
    bn.bias.accumulate_grad(sum_g.astype(dtype))
    bn.weight.accumulate_grad(sum_g_xhat.astype(dtype))
    a = bn.weight.data * inv_std
    if training:   # a * (g - (sum_g + xhat * sum_g_xhat) / M), xhat = (x - mean) * inv_std
        b = -a * inv_std * sum_g_xhat / m
        c0 = -a * sum_g / m - b * mean
    else:          # a * g
        b = np.zeros_like(a)
        c0 = np.zeros_like(a)
    sum_dx = a * sum_g + b * m * mean + c0 * m
    return a.astype(dtype), b.astype(dtype), c0.astype(dtype), sum_dx


@dataclass
class BatchNormSaved:
    x2: np.ndarray           # (M, C) channels-last input
    mean: np.ndarray
    inv_std: np.ndarray
    training: bool
    x_shape: tuple
    nhwc_shape: tuple


class BatchNorm2dStep(Step):
    """Replaces :class:`minicnn.nn.BatchNorm2d`: one numba pass for the statistics (shifted float64
    moments), one for ``out = x * scale + shift``; backward one pass for the two sums, one for
    ``dL/dx = a*g + b*x + c0``."""

    def __init__(self, bn):
        self.bn = bn
        self.saved = None
        self.fallback = None      # the textbook layer, when the output was not finite

    def forward(self, x):
        bn = self.bn
        bn.check(x)
        self.fallback, before = None, batchnorm_buffers(bn)
        x_nhwc = cpu.nhwc(x)
        x2 = x_nhwc.reshape(-1, bn.num_features)                    # (M, C)
        mean, inv_std, scale, shift = batch_affine(bn, x2) if bn.training else eval_affine(bn, x2.dtype)
        out = cpu.affine_channels(x2, scale, shift, workspace.empty_like(x2))
        self.saved = BatchNormSaved(x2, mean, inv_std, bn.training, x.shape, x_nhwc.shape)
        if not np.isfinite(out).all():          # NaN or inf: PyTorch's, by the textbook layer (see TextbookRun)
            restore_batchnorm_buffers(bn, before)
            self.saved, self.fallback = None, TextbookRun([bn])
            return self.fallback.forward(x)
        return cpu.from_nhwc(out.reshape(x_nhwc.shape))

    def backward(self, dout):
        if self.fallback is not None:
            return self.fallback.backward(dout)
        bn, sv = self.bn, self.saved
        if sv is None:
            raise _before_forward(bn)
        bn.check_grad(dout, sv.x_shape)
        g2 = cpu.nhwc(dout).reshape(-1, bn.num_features)
        sum_g, sum_g_xc = cpu.channel_grad_sums(g2, sv.x2, sv.mean)      # sum(g), sum(g * (x - mean))
        a, b, c0, _ = backward_affine(bn, sum_g, sum_g_xc, sv.mean, sv.inv_std, sv.x2.shape[0], sv.training,
                                      sv.x2.dtype)
        dx = cpu.affine_channels_2(g2, sv.x2, a, b, c0, workspace.empty_like(sv.x2))
        return cpu.from_nhwc(dx.reshape(sv.nhwc_shape))



# --- ReLU, MaxPool2d, Linear ------------------------------------------------------------------
def _memory(a):
    """(contiguous array, function back to a's logical shape): NHWC for 4-D, C order otherwise."""
    if a.ndim == 4:
        return cpu.nhwc(a), cpu.from_nhwc
    return np.ascontiguousarray(a), (lambda m: m)


class ReLUStep(Step):
    """Replaces :class:`minicnn.nn.ReLU`: one numba pass each way on the activation's own memory
    layout, keeping the output (out > 0 is the mask) instead of a mask."""

    def __init__(self, relu):
        self.relu = relu
        self.saved = None        # (output, logical shape)

    def forward(self, x):
        mem, back = _memory(x)
        out = cpu.relu_forward(mem.reshape(-1), workspace.empty(mem.size, mem.dtype)).reshape(mem.shape)
        self.saved = (out, x.shape)
        return back(out)

    def backward(self, dout):
        if self.saved is None:
            raise _before_forward(self.relu)
        out, shape = self.saved
        self.relu.check_grad(dout, shape)
        g, back = _memory(dout)
        dx = cpu.relu_backward(g.reshape(-1), out.reshape(-1), workspace.empty(g.size, g.dtype))
        return back(dx.reshape(g.shape))



class MaxPool2dStep(Step):
    """Replaces :class:`minicnn.nn.MaxPool2d` with non-overlapping windows (stride == kernel <= 16):
    one numba pass each way on NHWC memory, the argmax kept as one byte per output."""

    def __init__(self, pool):
        self.pool = pool
        self.saved = None        # (NHWC input shape, argmax, output shape)

    def forward(self, x):
        n, c, oh, ow = self.pool.check(x)
        x_nhwc = cpu.nhwc(x)
        out = workspace.empty((n, oh, ow, c), x.dtype)
        arg = workspace.empty((n, oh, ow, c), np.uint8)      # i*k + j of each window's maximum
        cpu.maxpool_forward(x_nhwc, self.pool.kernel_size, out, arg)
        self.saved = (x_nhwc.shape, arg, (n, c, oh, ow))
        return cpu.from_nhwc(out)

    def backward(self, dout):
        if self.saved is None:
            raise _before_forward(self.pool)
        x_shape, arg, out_shape = self.saved
        self.pool.check_grad(dout, out_shape)
        dx = cpu.maxpool_backward(cpu.nhwc(dout), arg, self.pool.kernel_size, workspace.empty(x_shape, dout.dtype))
        return cpu.from_nhwc(dx)



class LinearStep(LinearStepBase):
    """Replaces :class:`minicnn.nn.Linear`: the same three products, dL/dW into reused memory."""

    def weight_grad(self, dout, x):
        return np.matmul(dout.T, x, out=workspace.empty(self.linear.weight.shape, x.dtype))
