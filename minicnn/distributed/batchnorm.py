"""SyncBatchNorm2d: BatchNorm2d whose statistics are those of the global batch, across all ranks.

Each rank holds M_r = N_r*H*W values of a channel; the global batch holds M = sum_r M_r. Forward
(training), with sum_r meaning "all-reduced over the ranks"::

    M   = sum_r M_r                                # (a tiny all-reduce on the host)
    mu  = sum_r sum(x) / M                         # one all-reduce of sum(x)
    var = sum_r sum((x - mu)^2) / M                # a second one: the stable two-pass variance
    xhat = (x - mu) / sqrt(var + eps),  out = gamma * xhat + beta

Backward, with g = dL/d(out) on this rank's values::

    dL/dbeta  = sum(g),  dL/dgamma = sum(g * xhat)     # this rank's share: the gradient all-reduce adds them
    dL/dx = gamma / sqrt(var + eps) * (g - (sum_r sum(g) + xhat * sum_r sum(g * xhat)) / M)
                                                   # one all-reduce of (sum(g), sum(g * xhat))

These are BatchNorm2d's equations (``minicnn/nn/batchnorm.py``) with every sum taken over the
global batch, so N ranks compute exactly what one process computes on their concatenated batch
(when each rank's g is its share of the global loss's gradient). The parameter gradients stay
per-rank: the flat gradient all-reduce sums them with the others. Eval mode uses the running
statistics and says nothing to the other ranks.
"""
import numpy as np

from ..backend import get_array_module
from ..nn import BatchNorm2d

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm"]


class SyncBatchNorm2d(BatchNorm2d):
    def __init__(self, num_features, comm, eps=1e-5, momentum=0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.comm = comm

    @classmethod
    def replacing(cls, bn, comm):
        """A SyncBatchNorm2d sharing ``bn``'s parameters and buffers (the same arrays)."""
        sync = cls(bn.num_features, comm, eps=bn.eps, momentum=bn.momentum)
        sync.weight, sync.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            sync._buffers[name] = bn._buffers[name]
        sync.train(bn.training)
        return sync

    def extra_repr(self):
        return super().extra_repr() + f", ranks={self.comm.size}"

    def check(self, x):
        """A clear error for a wrong input (an empty shard is allowed: the other ranks have values)."""
        from ..nn.module import check_input
        check_input(self, x, ("N", self.num_features, "H", "W"), self.weight.dtype)
        return x.shape[0] * x.shape[2] * x.shape[3]

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        m_local = self.check(x)
        xp = get_array_module(x)
        c = self.num_features
        m = int(self.comm.allreduce(np.array([m_local], dtype=np.int64))[0])  # M = sum_r M_r (on the host)
        if m < 2:
            raise ValueError(f"SyncBatchNorm2d needs more than one value per channel in training over all "
                             f"ranks, got {m} (input of shape {tuple(x.shape)} on this rank)")
        mu = self.comm.allreduce(x.sum(axis=(0, 2, 3))) / m                 # mu = sum_r sum(x) / M
        sq = ((x - mu.reshape(1, c, 1, 1)) ** 2).sum(axis=(0, 2, 3))
        var = self.comm.allreduce(sq) / m                                   # var = sum_r sum((x - mu)^2) / M
        self.update_running_stats(mu, var * (m / (m - 1)))
        inv_std = 1.0 / xp.sqrt(var + self.eps)                             # 1 / sqrt(var + eps)
        xhat = (x - mu.reshape(1, c, 1, 1)) * inv_std.reshape(1, c, 1, 1)   # xhat = (x - mu) / sqrt(var + eps)
        out = xhat * self.weight.data.reshape(1, c, 1, 1) + self.bias.data.reshape(1, c, 1, 1)
        self._cache = (xhat, inv_std, m)                                    # out = gamma * xhat + beta
        return out

    def backward(self, dout):
        cache = self.__dict__.get("_cache")
        if cache is not None and cache[2] is False:     # eval mode: BatchNorm2d's constants, no communication
            return super().backward(dout)
        xhat, inv_std, m = self._saved()
        self.check_grad(dout, xhat.shape)
        xp = get_array_module(dout)
        c = self.num_features
        sum_g = dout.sum(axis=(0, 2, 3))                                    # sum(g), this rank
        sum_g_xhat = (dout * xhat).sum(axis=(0, 2, 3))                      # sum(g * xhat), this rank
        self.bias.accumulate_grad(sum_g.copy())                             # dL/dbeta: this rank's share
        self.weight.accumulate_grad(sum_g_xhat.copy())                      # dL/dgamma: this rank's share
        both = self.comm.allreduce(xp.concatenate([sum_g, sum_g_xhat]))      # sum_r of both sums
        scale = (self.weight.data * inv_std).reshape(1, c, 1, 1)            # gamma / sqrt(var + eps)
        return scale * (dout - (both[:c].reshape(1, c, 1, 1) + xhat * both[c:].reshape(1, c, 1, 1)) / m)


def convert_sync_batchnorm(model, comm):
    """Replace every BatchNorm2d of ``model`` (in place, same names, same arrays) by a
    SyncBatchNorm2d on ``comm``; returns the model."""
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if type(child) is BatchNorm2d:
                module._modules[name] = SyncBatchNorm2d.replacing(child, comm)
    return model
