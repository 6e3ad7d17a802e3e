"""MaxPool2d: the largest value of each window (docs/maxpool2d.md).

Forward: out[n, c, y, x] = max over the window at (y*stride, x*stride).
Backward: each window's gradient goes to the input that was its maximum; when
several inputs tie, only the first in row-major order gets it (PyTorch's rule),
so the total gradient is conserved. Output size is floor((H - k) / stride) + 1
("floor mode"). The loop version is :func:`minicnn.nn.reference.maxpool2d_forward`.

Vectorised by gathering the k*k strided views of the input (one per window
offset), taking the argmax across them, and in backward adding the gradient
back through the same views.
"""
from ..backend import get_array_module
from .im2col import conv_output_size
from .module import Module, check_input

__all__ = ["MaxPool2d"]


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.stride = int(stride) if stride is not None else self.kernel_size
        if self.kernel_size < 1 or self.stride < 1:
            raise ValueError(f"kernel_size and stride must be positive, got {kernel_size}, {stride}")
        self._cache = None

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        k, s = self.kernel_size, self.stride
        return (n, c, conv_output_size(h, k, s, 0), conv_output_size(w, k, s, 0))

    def check(self, x):
        """A clear error for a wrong input; returns the output's shape (N, C, OH, OW)."""
        check_input(self, x, ("N", "C", "H", "W"))
        shape = self.output_shape(x.shape)
        if shape[2] < 1 or shape[3] < 1:
            raise ValueError(f"MaxPool2d input of spatial size {tuple(x.shape[2:])} is smaller than "
                             f"the kernel ({self.kernel_size}x{self.kernel_size})")
        return shape

    def _views(self, a, oh, ow):
        """The k*k strided views of ``a``: view (i, j) holds a[..., y*s + i, x*s + j]."""
        k, s = self.kernel_size, self.stride
        return [a[:, :, i:i + s * oh:s, j:j + s * ow:s] for i in range(k) for j in range(k)]

    def forward(self, x):
        _, _, oh, ow = self.check(x)
        xp = get_array_module(x)
        windows = xp.stack(self._views(x, oh, ow))           # (k*k, N, C, OH, OW)
        argmax = windows.argmax(axis=0)                      # which offset won: the first maximum
        out = xp.take_along_axis(windows, argmax[None], axis=0)[0]
        self._cache = (x.shape, argmax)
        return out

    def backward(self, dout):
        x_shape, argmax = self._saved()
        self.check_grad(dout, argmax.shape)
        xp = get_array_module(dout)
        dx = xp.zeros(x_shape, dtype=dout.dtype)
        oh, ow = argmax.shape[2:]
        for idx, view in enumerate(self._views(dx, oh, ow)):
            view += dout * (argmax == idx)                   # the winner of each window gets its gradient
        return dx
