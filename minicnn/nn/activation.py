"""ReLU: out = max(x, 0);  dL/dx = dL/dout where x > 0, else 0."""
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
        return x * mask

    def backward(self, dout):
        mask = self._saved()
        self._check_dout(dout, mask.shape)
        return dout * mask
