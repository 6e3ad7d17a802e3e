"""Inverted dropout.

Training: keep each value with probability 1 - p and scale the kept ones by
1 / (1 - p), so the expected output equals the input and evaluation needs no
rescaling::

    mask = (u >= p) / (1 - p),  u ~ U[0, 1)
    out = x * mask,             dL/dx = dL/dout * mask

Evaluation: the identity. Masks come from the layer's own seeded generator
(see :mod:`minicnn.rng`), so a seeded run draws the same masks every time.
"""
import numpy as np

from ..backend import get_array_module
from .. import rng as _rng
from .module import Module, check_input

__all__ = ["Dropout"]


class Dropout(Module):
    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        self._rng = _rng.spawn(seed)       # NumPy generator (CPU masks, and seeds the GPU one)
        self._gpu_rng = None
        self._cache = None

    def extra_repr(self):
        return f"p={self.p}"

    def _uniform(self, xp, shape, dtype):
        if xp is np:
            return self._rng.random(shape, dtype=dtype)
        if self._gpu_rng is None:
            self._gpu_rng = xp.random.RandomState(int(self._rng.integers(2 ** 63)))
        return self._gpu_rng.random_sample(shape, dtype=dtype)

    def _move_extra(self, device):
        self._gpu_rng = None

    def get_rng_state(self):
        return self._rng.bit_generator.state

    def set_rng_state(self, state):
        self._rng.bit_generator.state = state
        self._gpu_rng = None

    def forward(self, x):
        check_input(self, x, None)
        if not self.training or self.p == 0.0:
            self._cache = (None, x.shape)
            return x
        xp = get_array_module(x)
        keep = self._uniform(xp, x.shape, x.dtype) >= self.p
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        mask = keep.astype(x.dtype) * x.dtype.type(scale)
        self._cache = (mask, x.shape)
        return x * mask

    def backward(self, dout):
        mask, shape = self._saved()
        self._check_dout(dout, shape)
        return dout if mask is None else dout * mask
