"""ReLU (docs/relu.md)::

    out = max(x, 0)
    dL/dx = dL/dout where x > 0, else 0

The mask x > 0 is what the forward pass keeps for the backward pass.
"""
from ..backend import get_array_module
from .module import Module, check_input

__all__ = ["ReLU"]


class ReLU(Module):
    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        check_input(self, x, None)
        mask = x > 0
        self._cache = mask
        return get_array_module(x).maximum(x, 0)      # out = max(x, 0)

    def backward(self, dout):
        mask = self._saved()
        self.check_grad(dout, mask.shape)
        return dout * mask                            # dL/dx = dL/dout where x > 0, else 0
