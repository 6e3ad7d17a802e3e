"""Conv2d as im2col + one matrix product (docs/conv2d.md).

Forward, with ``col = im2col(x)`` of shape (N*OH*OW, C*K*K) and the weight
flattened to ``Wm`` of shape (OC, C*K*K)::

    Y = col @ Wm.T + b                   (N*OH*OW, OC) -> reshaped to (N, OC, OH, OW)

Backward, with ``d`` = dL/dY laid out as (N*OH*OW, OC)::

    dL/db   = sum of d over rows
    dL/dWm  = d.T @ col                  (each weight sees every window it touched)
    dL/dcol = d @ Wm                     -> dL/dx = col2im(dL/dcol)

The loop version is :func:`minicnn.nn.reference.conv2d_forward`; read it first.
"""
import math

from .. import rng as _rng
from .im2col import col2im, conv_output_size, im2col
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

    def check(self, x):
        """A clear error for a wrong input; returns the output's shape (N, OC, OH, OW)."""
        check_input(self, x, ("N", self.in_channels, "H", "W"), self.weight.dtype)
        shape = self.output_shape(x.shape)
        if shape[2] < 1 or shape[3] < 1:
            raise ValueError(f"Conv2d input of spatial size {tuple(x.shape[2:])} is smaller than the "
                             f"kernel ({self.kernel_size}x{self.kernel_size}) with padding {self.padding}")
        return shape

    def forward(self, x):
        n, oc, oh, ow = self.check(x)
        k, s, p = self.kernel_size, self.stride, self.padding
        col = im2col(x, k, k, s, p)                                   # (N*OH*OW, C*K*K)
        w_mat = self.weight.data.reshape(oc, -1)                      # Wm: (OC, C*K*K)
        y = col @ w_mat.T                                             # Y = col Wm^T: (N*OH*OW, OC)
        if self.bias is not None:
            y = y + self.bias.data                                    #   + b
        self._cache = (x.shape, col)
        return y.reshape(n, oh, ow, oc).transpose(0, 3, 1, 2).copy()  # (N, OC, OH, OW)

    def backward(self, dout, input_grad=True):
        """dL/dx (None when ``input_grad`` is False: the first layer of a network needs none)."""
        x_shape, col = self._saved()
        self.check_grad(dout, self.output_shape(x_shape))
        k, s, p, oc = self.kernel_size, self.stride, self.padding, self.out_channels
        d = dout.transpose(0, 2, 3, 1).reshape(-1, oc)                # dL/dY as (N*OH*OW, OC)
        if self.bias is not None:
            self.bias.accumulate_grad(d.sum(axis=0))                  # dL/db = sum of d over rows
        self.weight.accumulate_grad((d.T @ col).reshape(self.weight.shape))   # dL/dWm = d^T col
        if not input_grad:
            return None
        dcol = d @ self.weight.data.reshape(oc, -1)                   # dL/dcol = d Wm
        return col2im(dcol, x_shape, k, k, s, p)                      # dL/dx: overlaps summed

    def backward_params(self, dout):
        return self.backward(dout, input_grad=False)
