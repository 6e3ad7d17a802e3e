"""Conv2d as im2col + one matrix product.

Forward, with ``col = im2col(x)`` of shape (N*OH*OW, C*KH*KW) and the weight
flattened to ``Wm`` of shape (OC, C*KH*KW)::

    out = col @ Wm.T + b                 (N*OH*OW, OC) -> reshaped to (N, OC, OH, OW)

Backward, with ``d`` = dL/d(out) laid out as (N*OH*OW, OC)::

    dL/db   = sum of d over rows
    dL/dWm  = d.T @ col                  (each weight sees every window it touched)
    dL/dcol = d @ Wm                     -> dL/dx = col2im(dL/dcol)

The slow loop version is :func:`minicnn.kernels.reference.conv2d_forward`.
On the GPU, im2col and col2im are one CUDA kernel each (:mod:`minicnn.kernels.gpu`);
``_forward_fast``/``_backward_fast`` are the same equations on channels-last
memory with numba's im2col (see :mod:`minicnn.kernels.cpu`).
"""
import math

import numpy as np

from ..backend import get_array_module
from .. import rng as _rng
from ..kernels import cpu_kernels, fast_path, gpu_kernels, gpu_path, matmul, workspace
from ..kernels.im2col import col2im, conv_output_size, im2col
from .module import Module, Parameter, check_input, uniform_init

__all__ = ["Conv2d"]


def _pair_int(v, name):
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name} must be an int or a square pair, got {v!r}")
        v = v[0]
    if int(v) != v:
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return int(v)


def image_groups(n, q):
    """How many groups of whole images (a divisor of n, at most 128) to split a column sum of an
    (N*OH*OW, Q) array into: about 256 blocks of 64 columns in all."""
    want = max(1, min(n, 128, -(-256 // -(-q // 64))))
    return max(g for g in range(1, want + 1) if n % g == 0)


def column_sums_by_image_groups(d, n):
    """d.sum(axis=0) for d (N*OH*OW, Q) on a GPU, summed within groups of images first: as one
    reduction, millions of rows go into Q sums, one per block, and few of the GPU's multiprocessors
    work (conv1's bias gradient at batch 1024 on an H200)."""
    return d.reshape(image_groups(n, d.shape[1]), -1, d.shape[1]).sum(axis=1).sum(axis=0)


class Conv2d(Module):
    """2-D convolution (cross-correlation) over (N, C, H, W) inputs, square kernels."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 seed=None):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair_int(kernel_size, "kernel_size")
        self.stride = _pair_int(stride, "stride")
        self.padding = _pair_int(padding, "padding")
        if min(self.in_channels, self.out_channels, self.kernel_size, self.stride) < 1 or self.padding < 0:
            raise ValueError(f"invalid Conv2d arguments: {self.extra_repr()}")
        k = self.kernel_size
        # PyTorch's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1.0 / math.sqrt(self.in_channels * k * k)
        g = _rng.spawn(seed)
        self.weight = Parameter(uniform_init(g, (self.out_channels, self.in_channels, k, k), bound))
        self.bias = Parameter(uniform_init(g, (self.out_channels,), bound)) if bias else None
        self._cache = None

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        return (n, self.out_channels, conv_output_size(h, k, s, p), conv_output_size(w, k, s, p))

    def _check(self, x):
        """Check the input; return the output's (N, OC, OH, OW)."""
        check_input(self, x, ("N", self.in_channels, "H", "W"), self.weight.dtype)
        shape = self.output_shape(x.shape)
        if shape[2] < 1 or shape[3] < 1:
            raise ValueError(f"Conv2d input of spatial size {tuple(x.shape[2:])} is smaller than the "
                             f"kernel ({self.kernel_size}x{self.kernel_size}) with padding {self.padding}")
        return shape

    def forward(self, x):
        n, _, oh, ow = self._check(x)
        k, s, p = self.kernel_size, self.stride, self.padding
        if fast_path(x):
            return self._forward_fast(x, oh, ow)
        xp = get_array_module(x)
        to_columns = gpu_kernels().im2col if gpu_path(x) else im2col  # (one CUDA launch on the GPU)
        col = to_columns(x, k, k, s, p)                               # (N*OH*OW, C*K*K)
        w_mat = self.weight.data.reshape(self.out_channels, -1)       # (OC, C*K*K)
        out = matmul(col, w_mat.T)                                    # = col @ w_mat.T: (N*OH*OW, OC)
        if self.bias is not None:
            out += self.bias.data
        out = xp.ascontiguousarray(out.reshape(n, oh, ow, self.out_channels).transpose(0, 3, 1, 2))
        self._cache = ("plain", x.shape, col, out.shape)
        return out

    def backward(self, dout, input_grad=True):
        """dL/dx (None when ``input_grad`` is False: the first layer of a network needs none)."""
        cache = self._saved()
        self._check_dout(dout, cache[-1])
        if cache[0] == "fast":
            return self._backward_fast(dout, input_grad)
        _, x_shape, col, out_shape = cache
        k, s, p = self.kernel_size, self.stride, self.padding
        d = dout.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)   # (N*OH*OW, OC)
        w_mat = self.weight.data.reshape(self.out_channels, -1)
        if gpu_path(d):
            # col^T d, not d^T col: cuBLAS gave conv1's (32 x 2.4M) by (2.4M x 9) product at batch 1024
            # on an H200 a handful of tiles and 56 ms; (9 x 2.4M) by (2.4M x 32) took 0.3 ms.
            db, dw = column_sums_by_image_groups(d, x_shape[0]), matmul(col.T, d).T
        else:
            db, dw = d.sum(axis=0), d.T @ col
        if self.bias is not None:
            self.bias.accumulate_grad(db)
        self.weight.accumulate_grad(dw.reshape(self.weight.shape))
        if not input_grad:
            return None
        dcol = matmul(d, w_mat)                                        # = d @ w_mat: (N*OH*OW, C*K*K)
        from_columns = gpu_kernels().col2im if gpu_path(dcol) else col2im
        return from_columns(dcol, x_shape, k, k, s, p)

    def backward_params(self, dout):
        return self.backward(dout, input_grad=False)

    # --- the fast CPU path: channels-last memory, numba im2col/col2im --------------------
    def _weight_columns(self):
        """The weight as the (K*K*C, OC) matrix that multiplies channels-last im2col rows (i, j, c)."""
        k = self.kernel_size
        return self.weight.data.transpose(2, 3, 1, 0).reshape(k * k * self.in_channels, self.out_channels)

    def _accumulate_weight_grad(self, dw_columns):
        """Add dL/dW given in :meth:`_weight_columns`' layout to ``weight.grad`` (OC, C, K, K)."""
        k = self.kernel_size
        as_weight = dw_columns.reshape(k, k, self.in_channels, self.out_channels).transpose(3, 2, 0, 1)
        if not fast_path(dw_columns):                  # (the GPU's conv block)
            return self.weight.accumulate_grad(get_array_module(dw_columns).ascontiguousarray(as_weight))
        grad = workspace.empty(self.weight.shape, dw_columns.dtype)
        grad[...] = as_weight
        self.weight.accumulate_grad(grad)

    def _forward_fast(self, x, oh, ow, add_bias=True):
        """``add_bias=False`` leaves the bias out (a BatchNorm that follows takes it into account)."""
        cpu = cpu_kernels()
        k, s, p, c, oc = self.kernel_size, self.stride, self.padding, self.in_channels, self.out_channels
        self._cache = None                           # let the last step's col go back to the workspace
        x_nhwc = cpu.nhwc(x)                                          # (N, H, W, C)
        n = x.shape[0]
        col = cpu.im2col_nhwc(x_nhwc, k, s, p, oh, ow, workspace.empty((n * oh * ow, k * k * c), x.dtype))
        w_col = self._weight_columns()
        out = np.matmul(col, w_col, out=workspace.empty((n * oh * ow, oc), x.dtype))   # = NHWC output
        if self.bias is not None and add_bias:
            cpu.add_row(out, self.bias.data)
        out = out.reshape(n, oh, ow, oc)
        self._cache = ("fast", x_nhwc.shape, col, w_col, (n, oc, oh, ow))
        return cpu.from_nhwc(out)

    def _backward_fast(self, dout, input_grad, bias_grad=None):
        """``bias_grad``: dL/db when the caller knows it already (the column sums of ``dout``)."""
        cpu = cpu_kernels()
        _, x_shape, col, w_col, (n, oc, oh, ow) = self._cache
        k, s, p = self.kernel_size, self.stride, self.padding
        d = cpu.nhwc(dout).reshape(-1, oc)                            # (N*OH*OW, OC)
        if self.bias is not None:
            self.bias.accumulate_grad((cpu.column_sums(d) if bias_grad is None else bias_grad).astype(d.dtype))
        self._accumulate_weight_grad(np.matmul(col.T, d, out=workspace.empty(w_col.shape, d.dtype)))
        if not input_grad:
            return None
        dcol = np.matmul(d, w_col.T, out=workspace.empty(col.shape, col.dtype))
        dx = cpu.col2im_nhwc(dcol, k, s, p, oh, ow, workspace.empty(x_shape, dout.dtype))
        return cpu.from_nhwc(dx)
