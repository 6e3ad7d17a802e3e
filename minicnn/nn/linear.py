"""Flatten and Linear (docs/linear.md).

Linear: out = x @ W.T + b with W of shape (out_features, in_features), so::

    dL/dx = g @ W,   dL/dW = g.T @ x,   dL/db = sum of g over the batch

Flatten: (N, C, H, W) -> (N, C*H*W); its backward reshapes the gradient back.
"""
import math

from .. import rng as _rng
from .module import Module, Parameter, check_input, uniform_init

__all__ = ["Flatten", "Linear"]


class Flatten(Module):
    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        if getattr(x, "ndim", 0) < 2:
            raise ValueError(f"Flatten expects input of shape (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
        self._cache = x.shape
        return x.reshape(x.shape[0], int(math.prod(x.shape[1:])))     # (N, C*H*W), N = 0 included

    def backward(self, dout):
        shape = self._saved()
        self.check_grad(dout, (shape[0], int(math.prod(shape[1:]))))
        return dout.reshape(shape)


class Linear(Module):
    def __init__(self, in_features, out_features, bias=True, seed=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"invalid Linear sizes: {in_features}, {out_features}")
        bound = 1.0 / math.sqrt(self.in_features)      # PyTorch's default initialisation
        g = _rng.spawn(seed)
        self.weight = Parameter(uniform_init(g, (self.out_features, self.in_features), bound))
        self.bias = Parameter(uniform_init(g, (self.out_features,), bound)) if bias else None
        self._cache = None

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    def check(self, x):
        """A clear error for a wrong input; returns the output's shape (N, out_features)."""
        check_input(self, x, ("N", self.in_features), self.weight.dtype)
        return (x.shape[0], self.out_features)

    def forward(self, x):
        self.check(x)
        out = x @ self.weight.data.T                   # out = x W^T
        if self.bias is not None:
            out = out + self.bias.data                 #     + b
        self._cache = (x,)                             # (a new tuple each forward: backward takes it once)
        return out

    def backward(self, dout, input_grad=True):
        x, = self._saved()
        self.check_grad(dout, (x.shape[0], self.out_features))
        self.weight.accumulate_grad(dout.T @ x)        # dL/dW = g^T x
        if self.bias is not None:
            self.bias.accumulate_grad(dout.sum(axis=0))   # dL/db = sum of g over the batch
        return dout @ self.weight.data if input_grad else None   # dL/dx = g W

    def backward_params(self, dout):
        self.backward(dout, input_grad=False)
