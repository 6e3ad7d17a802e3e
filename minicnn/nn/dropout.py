"""Inverted dropout (docs/dropout.md).

Training: keep each value with probability 1 - p and scale the kept ones by
1 / (1 - p), so the expected output equals the input and evaluation needs no
rescaling::

    mask = (u >= p) / (1 - p),  u ~ U[0, 1)
    out = x * mask,             dL/dx = dL/dout * mask

Evaluation: the identity. Masks come from the layer's own seeded generator
(``self.rng``, see :mod:`minicnn.rng`), so a seeded run draws the same masks every
time, and the generator's state, saved in checkpoints, says where a run is. For
arrays that do not live in host memory the generator draws one seed per forward
pass and the array module draws the mask from it, on the device.
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
        self.rng = _rng.spawn(seed)        # a NumPy Generator: the masks, or one seed per pass
        self._cache = None

    def extra_repr(self):
        return f"p={self.p}"

    def draw_seed(self):
        """One seed from the layer's generator (for a mask made on a device)."""
        return int(self.rng.integers(2 ** 63))

    def _uniform(self, xp, shape, dtype):
        if xp is np:
            return self.rng.random(shape, dtype=dtype)                     # u ~ U[0, 1)
        return xp.random.RandomState(self.draw_seed()).random_sample(shape, dtype=dtype)

    def get_rng_state(self):
        return self.rng.bit_generator.state

    def set_rng_state(self, state):
        self.rng.bit_generator.state = state

    def forward(self, x):
        check_input(self, x, None)
        if not self.training or self.p == 0.0:
            self._cache = (None, x.shape)
            return x                                                       # evaluation: the identity
        xp = get_array_module(x)
        keep = self._uniform(xp, x.shape, x.dtype) >= self.p               # u >= p
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        mask = keep.astype(x.dtype) * x.dtype.type(scale)                  # mask = (u >= p) / (1 - p)
        self._cache = (mask, x.shape)
        return x * mask                                                    # out = x * mask

    def last_mask(self):
        """The mask of the last forward pass (out = x * mask, scale included), or None when it
        was the identity (eval mode, p = 0)."""
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError("Dropout.last_mask() was called before forward(): no mask yet")
        return cache[0]

    def backward(self, dout):
        mask, shape = self._saved()
        self.check_grad(dout, shape)
        return dout if mask is None else dout * mask                       # dL/dx = dL/dout * mask
