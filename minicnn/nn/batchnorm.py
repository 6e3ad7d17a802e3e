"""BatchNorm2d: normalise each channel over the batch and the pixels (docs/batchnorm2d.md).

Forward (training), per channel over the M = N*H*W values of that channel::

    mu = mean(x),  var = mean((x - mu)^2),  xhat = (x - mu) / sqrt(var + eps)
    out = gamma * xhat + beta

Backward, with g = dL/d(out)::

    dL/dbeta  = sum(g)
    dL/dgamma = sum(g * xhat)
    dL/dx     = gamma / sqrt(var + eps) * (g - (sum(g) + xhat * sum(g * xhat)) / M)

The last line is the full chain rule through mu and var, collapsed; the staged version, one node
of the graph at a time, is :func:`minicnn.nn.reference.batchnorm2d_backward_staged`, and the docs
page derives one from the other. In eval mode mu and var are the running statistics, constants,
so dL/dx = g * gamma / sqrt(running_var + eps). Running statistics follow PyTorch:
running = (1 - momentum) * running + momentum * batch, with the *unbiased* batch variance
(divided by M - 1).
"""
import numpy as np

from ..backend import get_array_module
from .module import Module, Parameter, check_input

__all__ = ["BatchNorm2d"]


class BatchNorm2d(Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        self.momentum = momentum          # None: cumulative average, as in PyTorch
        c = self.num_features
        self.weight = Parameter(np.ones(c, dtype=np.float32))    # gamma
        self.bias = Parameter(np.zeros(c, dtype=np.float32))     # beta
        self.register_buffer("running_mean", np.zeros(c, dtype=np.float32))
        self.register_buffer("running_var", np.ones(c, dtype=np.float32))
        self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        self._cache = None

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def check(self, x):
        """A clear error for a wrong input; returns M = N*H*W, the values per channel."""
        check_input(self, x, ("N", self.num_features, "H", "W"), self.weight.dtype)
        m = x.shape[0] * x.shape[2] * x.shape[3]
        if self.training and m < 2:
            raise ValueError(f"BatchNorm2d needs more than one value per channel in training, "
                             f"got input of shape {tuple(x.shape)}")
        return m

    def update_running_stats(self, mean, unbiased_var):
        """running = (1 - f) * running + f * batch, f = momentum (or 1 / batches seen, momentum None).
        In place: the buffers stay the same arrays."""
        nbt = self._buffers["num_batches_tracked"]
        nbt += 1
        f = self.momentum if self.momentum is not None else 1.0 / float(nbt)
        for name, batch_value in (("running_mean", mean), ("running_var", unbiased_var)):
            running = self._buffers[name]
            running *= 1 - f
            running += f * batch_value

    def forward(self, x):
        m = self.check(x)
        xp = get_array_module(x)
        c = self.num_features
        if self.training:
            mu = x.mean(axis=(0, 2, 3))                                      # mu = mean(x)
            var = ((x - mu.reshape(1, c, 1, 1)) ** 2).mean(axis=(0, 2, 3))  # var = mean((x - mu)^2)
            self.update_running_stats(mu, var * (m / (m - 1)))
        else:
            mu, var = self.running_mean, self.running_var
        inv_std = 1.0 / xp.sqrt(var + self.eps)                             # 1 / sqrt(var + eps)
        xhat = (x - mu.reshape(1, c, 1, 1)) * inv_std.reshape(1, c, 1, 1)   # xhat = (x - mu) / sqrt(var + eps)
        out = xhat * self.weight.data.reshape(1, c, 1, 1) + self.bias.data.reshape(1, c, 1, 1)
        self._cache = (xhat, inv_std, self.training)                       # out = gamma * xhat + beta
        return out

    def backward(self, dout):
        xhat, inv_std, training = self._saved()
        self.check_grad(dout, xhat.shape)
        c = self.num_features
        m = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]                   # M = N*H*W
        sum_g = dout.sum(axis=(0, 2, 3))                                    # sum(g)
        sum_g_xhat = (dout * xhat).sum(axis=(0, 2, 3))                      # sum(g * xhat)
        self.bias.accumulate_grad(sum_g)                                    # dL/dbeta = sum(g)
        self.weight.accumulate_grad(sum_g_xhat)                             # dL/dgamma = sum(g * xhat)
        scale = (self.weight.data * inv_std).reshape(1, c, 1, 1)            # gamma / sqrt(var + eps)
        if not training:
            return dout * scale                                             # eval: mu, var are constants
        return scale * (dout - (sum_g.reshape(1, c, 1, 1) + xhat * sum_g_xhat.reshape(1, c, 1, 1)) / m)
