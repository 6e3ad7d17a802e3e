"""BatchNorm2d: normalise each channel over the batch and the pixels.

Forward (training), per channel over the M = N*H*W values of that channel::

    mu = mean(x),  var = mean((x - mu)^2),  xhat = (x - mu) / sqrt(var + eps)
    out = gamma * xhat + beta

Backward, with g = dL/d(out)::

    dL/dbeta  = sum(g)
    dL/dgamma = sum(g * xhat)
    dL/dx     = gamma / (M * sqrt(var + eps)) * (M*g - sum(g) - xhat * sum(g * xhat))

(the last line is the full chain rule through mu and var, collapsed; see
docs or CS231n for the derivation). In eval mode mu and var are the running
statistics, constants, so dL/dx = g * gamma / sqrt(running_var + eps).
Running statistics follow PyTorch: running = (1 - momentum) * running +
momentum * batch, with the *unbiased* batch variance (divided by M - 1).

On the GPU (minicnn's CUDA kernels) the statistics take three launches (float64
partial sums per channel, their sum, then one thread per channel that also
updates the running statistics), the normalisation one (with the following ReLU
fused in, when a Sequential has one), and backward the same again. After a
Conv2d, and followed by ReLU and MaxPool2d, a Sequential runs all four as one
channels-last step instead (minicnn/nn/fused.py).

The fast CPU path computes the same thing on channels-last memory in two
numba passes each way: forward (one-pass shifted float64 moments, then
out = x * scale + shift) and backward (the two sums, then dL/dx as one
per-channel affine function of g and x).
"""
import numpy as np

from ..backend import get_array_module
from ..kernels import cpu_kernels, fast_path, gpu_kernels, gpu_path, workspace
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

    def _check_batch(self, x):
        """The input checks every path shares; returns M = N*H*W, the values per channel."""
        check_input(self, x, ("N", self.num_features, "H", "W"), self.weight.dtype)
        m = x.shape[0] * x.shape[2] * x.shape[3]
        if self.training and m < 2:
            raise ValueError(f"BatchNorm2d needs more than one value per channel in training, "
                             f"got input of shape {tuple(x.shape)}")
        return m

    def forward(self, x):
        m = self._check_batch(x)
        if fast_path(x):
            return self._forward_fast(x)
        if gpu_path(x):
            return self._forward_gpu(x)
        xp = get_array_module(x)
        c = self.num_features
        if self.training:
            mu = x.mean(axis=(0, 2, 3))
            var = ((x - mu.reshape(1, c, 1, 1)) ** 2).mean(axis=(0, 2, 3))   # two-pass: stable
            self._update_running(mu, var * (m / (m - 1)))
        else:
            mu, var = self.running_mean, self.running_var
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat = (x - mu.reshape(1, c, 1, 1)) * inv_std.reshape(1, c, 1, 1)
        out = xhat * self.weight.data.reshape(1, c, 1, 1) + self.bias.data.reshape(1, c, 1, 1)
        self._cache = ("plain", xhat, inv_std, self.training)
        return out

    def _update_running(self, mu, unbiased_var):
        # In place, so the buffers stay the same arrays (a CUDA graph of the step updates them).
        nbt = self._buffers["num_batches_tracked"]
        nbt += 1
        f = self.momentum if self.momentum is not None else 1.0 / float(nbt)
        for name, batch_value in (("running_mean", mu), ("running_var", unbiased_var)):
            running = self._buffers[name]
            running *= 1 - f
            running += f * batch_value

    def backward(self, dout):
        cache = self._saved()
        if cache[0] == "fast":
            return self._backward_fast(dout)
        if cache[0] == "gpu":
            return self._backward_gpu(dout)
        _, xhat, inv_std, training = cache
        self._check_dout(dout, xhat.shape)
        c = self.num_features
        axes = (0, 2, 3)
        sum_g = dout.sum(axis=axes)
        sum_g_xhat = (dout * xhat).sum(axis=axes)
        self.bias.accumulate_grad(sum_g)
        self.weight.accumulate_grad(sum_g_xhat)
        scale = (self.weight.data * inv_std).reshape(1, c, 1, 1)
        if not training:
            return dout * scale
        m = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]
        return scale * (dout - (sum_g.reshape(1, c, 1, 1) + xhat * sum_g_xhat.reshape(1, c, 1, 1)) / m)

    # --- the fast CPU path: channels-last memory, numba passes ------------------------------
    def _fast_affine(self, x2, training, offset=None):
        """Statistics of the (M, C) channels-last input -> (mean, inv_std, scale, shift) with
        out = x * scale + shift; in training also updates the running statistics.

        ``offset``: the true input is ``x2 + offset`` (a conv bias not added yet). In training it
        cancels (the mean moves with it) and only enters the running mean; ``mean`` and ``shift``
        are returned for ``x2`` itself."""
        if not training:
            return self._eval_affine(x2.dtype, offset)
        m = x2.shape[0]
        shift0 = x2[0].astype(np.float64)
        s1, s2 = cpu_kernels().channel_moments(x2, shift0)   # shifted float64 sums: one pass
        mean = shift0 + s1 / m
        var = np.maximum(s2 / m - (s1 / m) ** 2, 0.0)
        return self._train_affine(mean, var, m, x2.dtype, offset)

    def _train_affine_from_parts(self, parts, dtype, offset=None):
        """:meth:`_fast_affine` in training from per-chunk moments [(count, shift, sum(x - shift),
        sum((x - shift)^2)), ...], combined exactly (Chan et al.'s pairwise update, in float64)."""
        counts = np.array([p[0] for p in parts], dtype=np.float64)[:, None]
        shifts, s1, s2 = (np.array([p[i] for p in parts], dtype=np.float64) for i in (1, 2, 3))
        means = shifts + s1 / counts                       # each chunk's mean ...
        m2 = np.maximum(s2 - s1 * s1 / counts, 0.0)       # ... and its sum of squared deviations
        m = counts.sum()
        mean = (counts * means).sum(axis=0) / m
        var = (m2 + counts * (means - mean) ** 2).sum(axis=0) / m
        return self._train_affine(mean, var, int(m), dtype, offset)

    def _train_affine(self, mean, var, m, dtype, offset):
        true_mean = mean if offset is None else mean + offset    # the running mean is of x2 + offset
        self._update_running(true_mean.astype(dtype), (var * (m / (m - 1))).astype(dtype))
        return self._affine(mean, var, dtype)

    def _eval_affine(self, dtype, offset=None):
        """:meth:`_fast_affine` in eval mode: the running statistics, nothing to compute from x."""
        mean = self.running_mean.astype(np.float64)
        if offset is not None:
            mean = mean - offset.astype(np.float64)
        return self._affine(mean, self.running_var.astype(np.float64), dtype)

    def _affine(self, mean, var, dtype):
        inv_std = 1.0 / np.sqrt(var + self.eps)
        scale = self.weight.data * inv_std
        shift = self.bias.data - mean * scale
        return mean, inv_std, scale.astype(dtype), shift.astype(dtype)

    def _fast_backward_affine(self, sum_g, sum_g_xc, mean, inv_std, m, training, dtype):
        """Accumulate dgamma, dbeta from sum(g), sum(g * (x - mean)); return (a, b, c0) such that
        dL/dx = a*g + b*x + c0 per channel (the short formula, rearranged), and sum(dL/dx) over
        the M values of each channel, in float64: a*sum(g) + b*M*mean + c0*M, which is 0 in
        training (a shift of the input does not change the output) and a*sum(g) in eval."""
        sum_g_xhat = sum_g_xc * inv_std
        self.bias.accumulate_grad(sum_g.astype(dtype))
        self.weight.accumulate_grad(sum_g_xhat.astype(dtype))
        a = self.weight.data * inv_std
        if training:   # a * (g - (sum_g + xhat * sum_g_xhat) / M), xhat = (x - mean) * inv_std
            b = -a * inv_std * sum_g_xhat / m
            c0 = -a * sum_g / m - b * mean
        else:          # a * g
            b = np.zeros_like(a)
            c0 = np.zeros_like(a)
        sum_dx = a * sum_g + b * m * mean + c0 * m
        return a.astype(dtype), b.astype(dtype), c0.astype(dtype), sum_dx

    def _forward_fast(self, x):
        cpu = cpu_kernels()
        x_nhwc = cpu.nhwc(x)
        x2 = x_nhwc.reshape(-1, self.num_features)                  # (M, C)
        mean, inv_std, scale, shift = self._fast_affine(x2, self.training)
        out = cpu.affine_channels(x2, scale, shift, workspace.empty_like(x2))
        self._cache = ("fast", x2, mean, inv_std, self.training, x.shape, x_nhwc.shape)
        return cpu.from_nhwc(out.reshape(x_nhwc.shape))

    def _backward_fast(self, dout):
        cpu = cpu_kernels()
        _, x2, mean, inv_std, training, x_shape, nhwc_shape = self._cache
        self._check_dout(dout, x_shape)
        g2 = cpu.nhwc(dout).reshape(-1, self.num_features)
        sum_g, sum_g_xc = cpu.channel_grad_sums(g2, x2, mean)          # sum(g), sum(g * (x - mean))
        a, b, c0, _ = self._fast_backward_affine(sum_g, sum_g_xc, mean, inv_std, x2.shape[0], training,
                                                 x2.dtype)
        dx = cpu.affine_channels_2(g2, x2, a, b, c0, workspace.empty_like(x2))
        return cpu.from_nhwc(dx.reshape(nhwc_shape))

    # --- the GPU kernels (minicnn/kernels/gpu_kernels.cu) ---------------------------------------
    def _forward_gpu(self, x, relu=False):
        """``relu``: also apply the ReLU that follows (see minicnn/nn/fused.py's BatchNormReLU)."""
        gpu = gpu_kernels()
        if self.training:
            nbt = self._buffers["num_batches_tracked"]
            nbt += 1                                   # (in place, on the device: no read back)
            mean, inv_std = gpu.batchnorm_statistics(x, self.running_mean, self.running_var, nbt, self.momentum,
                                                     self.eps)
        else:
            mean, inv_std = self.running_mean, 1.0 / get_array_module(x).sqrt(self.running_var + self.eps)
        xhat, out = gpu.batchnorm_forward(x, mean, inv_std, self.weight.data, self.bias.data, relu)
        self._cache = ("gpu", xhat, inv_std, self.training, out if relu else None)
        return out

    def _backward_gpu(self, dout):
        _, xhat, inv_std, training, relu_out = self._saved()
        self._check_dout(dout, xhat.shape)
        gpu = gpu_kernels()
        sum_g, sum_g_xhat = gpu.batchnorm_grad_sums(dout, xhat, relu_out)
        self.bias.accumulate_grad(sum_g.astype(dout.dtype))
        self.weight.accumulate_grad(sum_g_xhat.astype(dout.dtype))
        return gpu.batchnorm_backward(dout, xhat, self.weight.data, inv_std, sum_g, sum_g_xhat, training, relu_out)
