"""Inverted dropout.

Training: keep each value with probability 1 - p and scale the kept ones by
1 / (1 - p), so the expected output equals the input and evaluation needs no
rescaling::

    mask = (u >= p) / (1 - p),  u ~ U[0, 1)
    out = x * mask,             dL/dx = dL/dout * mask

Evaluation: the identity. Masks come from the layer's own seeded generator
(see :mod:`minicnn.rng`), so a seeded run draws the same masks every time. On the
GPU that generator draws one seed per forward pass, and the mask is made on the
device from it: with the fast kernels by hashing (seed, index) in one CUDA launch,
and the backward pass recomputes the mask from the seed instead of storing it.
Either way the generator's state, saved in checkpoints, says where a run is.
"""
import numpy as np

from ..backend import get_array_module, to_device
from .. import rng as _rng
from ..kernels import gpu_kernels, gpu_path
from .module import Module, check_input

__all__ = ["Dropout"]


class Dropout(Module):
    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        self._rng = _rng.spawn(seed)       # NumPy generator (CPU masks; a seed per step on the GPU)
        self._seed_on_device = None        # the GPU kernels' seed, in device memory
        self._cache = None

    def extra_repr(self):
        return f"p={self.p}"

    def _seed(self):
        return int(self._rng.integers(2 ** 63))

    def _uniform(self, xp, shape, dtype):
        if xp is np:
            return self._rng.random(shape, dtype=dtype)
        return xp.random.RandomState(self._seed()).random_sample(shape, dtype=dtype)

    def get_rng_state(self):
        return self._rng.bit_generator.state

    def set_rng_state(self, state):
        self._rng.bit_generator.state = state

    def forward(self, x):
        check_input(self, x, None)
        if not self.training or self.p == 0.0:
            self._cache = (None, x.shape)
            return x
        if gpu_path(x):
            if self._seed_on_device is None:
                self._seed_on_device = gpu_kernels().DeviceValues(np.uint64)
            if not gpu_kernels().capturing():      # (a CUDA graph's replays draw in _before_graph_replay)
                self._seed_on_device.set([self._seed()])
            seed = self._seed_on_device.array
            self._cache = (("gpu", seed, x.dtype), x.shape)
            return gpu_kernels().dropout(x, self.p, seed)
        xp = get_array_module(x)
        keep = self._uniform(xp, x.shape, x.dtype) >= self.p
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        mask = keep.astype(x.dtype) * x.dtype.type(scale)
        self._cache = (mask, x.shape)
        return x * mask

    def _before_graph_replay(self):
        """A replayed CUDA graph of a training step does not call forward(): draw its seed here."""
        if self.training and self.p > 0.0 and self._seed_on_device is not None:
            self._seed_on_device.set([self._seed()])

    def last_mask(self):
        """The mask of the last forward pass (out = x * mask, scale included), or None when it
        was the identity (eval mode, p = 0)."""
        mask, shape = self._saved()
        if isinstance(mask, tuple):                      # ("gpu", seed, dtype): make it from the seed
            return gpu_kernels().dropout(to_device(np.ones(shape, mask[2]), "gpu"), self.p, mask[1])
        return mask

    def backward(self, dout):
        mask, shape = self._saved()
        self._check_dout(dout, shape)
        if isinstance(mask, tuple):                      # ("gpu", seed, dtype): the same mask again
            return gpu_kernels().dropout(dout, self.p, mask[1])
        return dout if mask is None else dout * mask
