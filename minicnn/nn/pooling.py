"""MaxPool2d: the largest value of each window.

Forward: out[n, c, y, x] = max over the window at (y*stride, x*stride).
Backward: each window's gradient goes to the input that was its maximum; when
several inputs tie, only the first in row-major order gets it (PyTorch's rule),
so the total gradient is conserved. Output size is floor((H - k) / stride) + 1
("floor mode"). The loop version is :func:`minicnn.kernels.reference.maxpool2d_forward`.

Vectorised by gathering the k*k strided views of the input (one per window
offset), taking the argmax across them, and in backward scattering the
gradient back through the same views. The fast CPU path (non-overlapping
windows, stride == kernel) does both in one numba pass on channels-last
memory, keeping the argmax as one byte per output. On the GPU, one CUDA kernel
each way (the backward a gather: each pixel sums the windows it won).
"""
import numpy as np

from ..backend import get_array_module
from ..kernels import cpu_kernels, fast_path, gpu_kernels, gpu_path, workspace
from ..kernels.im2col import conv_output_size
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

    def _views(self, a, oh, ow):
        """The k*k strided views of ``a``: view (i, j) holds a[..., y*s + i, x*s + j]."""
        k, s = self.kernel_size, self.stride
        return [a[:, :, i:i + s * oh:s, j:j + s * ow:s] for i in range(k) for j in range(k)]

    def forward(self, x):
        check_input(self, x, ("N", "C", "H", "W"))
        xp = get_array_module(x)
        _, _, oh, ow = self.output_shape(x.shape)
        if oh < 1 or ow < 1:
            raise ValueError(f"MaxPool2d input of spatial size {tuple(x.shape[2:])} is smaller than "
                             f"the kernel ({self.kernel_size}x{self.kernel_size})")
        if fast_path(x) and self.stride == self.kernel_size and self.kernel_size <= 16:
            return self._forward_fast(x, oh, ow)
        if gpu_path(x) and self.kernel_size <= 16:         # one CUDA launch each way
            out, arg = gpu_kernels().maxpool_forward(x, self.kernel_size, self.stride)
            self._cache = ("gpu", x.shape, arg)
            return out
        windows = xp.stack(self._views(x, oh, ow))          # (k*k, N, C, OH, OW)
        argmax = windows.argmax(axis=0)                      # first maximum wins ties
        out = xp.take_along_axis(windows, argmax[None], axis=0)[0]
        self._cache = ("plain", x.shape, argmax)
        return out

    def backward(self, dout):
        cache = self._saved()
        if cache[0] == "fast":
            return self._backward_fast(dout)
        if cache[0] == "gpu":
            _, x_shape, arg = cache
            self._check_dout(dout, arg.shape)
            return gpu_kernels().maxpool_backward(dout, arg, x_shape, self.kernel_size, self.stride)
        _, x_shape, argmax = cache
        self._check_dout(dout, argmax.shape)
        xp = get_array_module(dout)
        dx = xp.zeros(x_shape, dtype=dout.dtype)
        oh, ow = argmax.shape[2:]
        for idx, view in enumerate(self._views(dx, oh, ow)):
            view += dout * (argmax == idx)                   # writes through the view into dx
        return dx

    # --- the fast CPU path: non-overlapping windows on channels-last memory ----------------
    def _forward_fast(self, x, oh, ow):
        cpu = cpu_kernels()
        x_nhwc = cpu.nhwc(x)
        n, _, _, c = x_nhwc.shape
        out = workspace.empty((n, oh, ow, c), x.dtype)
        arg = workspace.empty((n, oh, ow, c), np.uint8)      # i*k + j of each window's maximum
        cpu.maxpool_forward(x_nhwc, self.kernel_size, out, arg)
        self._cache = ("fast", x_nhwc.shape, arg, (n, c, oh, ow))
        return cpu.from_nhwc(out)

    def _backward_fast(self, dout):
        cpu = cpu_kernels()
        _, x_shape, arg, out_shape = self._cache
        self._check_dout(dout, out_shape)
        dx = cpu.maxpool_backward(cpu.nhwc(dout), arg, self.kernel_size, workspace.empty(x_shape, dout.dtype))
        return cpu.from_nhwc(dx)
