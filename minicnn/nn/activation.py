"""ReLU: out = max(x, 0);  dL/dx = dL/dout where x > 0, else 0.

The fast CPU path does the same in one numba pass each way, on the layer's
memory layout (channels-last for images), caching the output instead of a mask.
"""
import numpy as np

from ..kernels import cpu_kernels, fast_path, workspace
from .module import Module, check_input

__all__ = ["ReLU"]


class ReLU(Module):
    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        check_input(self, x, None)
        if fast_path(x):
            return self._forward_fast(x)
        mask = x > 0
        self._cache = ("plain", mask)
        return x * mask

    def backward(self, dout):
        cache = self._saved()
        if cache[0] == "fast":
            return self._backward_fast(dout)
        mask = cache[1]
        self._check_dout(dout, mask.shape)
        return dout * mask

    # --- the fast CPU path -----------------------------------------------------------------
    @staticmethod
    def _memory(a):
        """(contiguous array, function back to a's logical shape): NHWC for 4-D, C order otherwise."""
        if a.ndim == 4:
            cpu = cpu_kernels()
            return cpu.nhwc(a), cpu.from_nhwc
        return np.ascontiguousarray(a), (lambda m: m)

    def _forward_fast(self, x):
        mem, back = self._memory(x)
        out = cpu_kernels().relu_forward(mem.reshape(-1), workspace.empty(mem.size, mem.dtype))
        out = out.reshape(mem.shape)
        self._cache = ("fast", out, x.shape)
        return back(out)

    def _backward_fast(self, dout):
        _, out, shape = self._cache
        self._check_dout(dout, shape)
        g, back = self._memory(dout)
        dx = cpu_kernels().relu_backward(g.reshape(-1), out.reshape(-1), workspace.empty(g.size, g.dtype))
        return back(dx.reshape(g.shape))
