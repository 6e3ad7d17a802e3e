"""[Conv2d ->] BatchNorm2d -> ReLU -> MaxPool2d as one step on the fast CPU path.

Not layers of their own: :class:`~minicnn.nn.Sequential` substitutes these steps
for the layers when they follow each other, the pooling windows do not overlap
and the input takes the fast path. They use the layers' own parameters and
buffers and compute what the layers compute one after the other (see the
kernels' comment in :mod:`minicnn.kernels.cpu`), in fewer passes over memory.
The plain path, and each layer called on its own, never fuse.

With a Conv2d in front, its bias is never added: a per-channel constant added
before a BatchNorm in training mode moves the batch mean by the same amount and
cancels (it only enters the running mean), and in eval mode it folds into the
BatchNorm's shift. Its gradient, the per-channel sum of dL/d(conv output), comes
from the BatchNorm's sums for free: exactly 0 in training, up to rounding.

In eval mode under :func:`minicnn.no_grad`, the whole block runs per share of
the images in worker threads and keeps nothing for backward (see
:mod:`minicnn.kernels.threads`).
"""
import numpy as np

from ..kernels import cpu_kernels, threads, workspace
from .module import is_grad_enabled

__all__ = ["BatchNormReLUPool", "ConvBatchNormReLUPool", "fusable", "fusable_with_conv"]


def fusable(layers):
    """True for [BatchNorm2d, ReLU, MaxPool2d with stride == kernel]."""
    from .activation import ReLU
    from .batchnorm import BatchNorm2d
    from .pooling import MaxPool2d
    return (len(layers) == 3 and type(layers[0]) is BatchNorm2d and type(layers[1]) is ReLU
            and type(layers[2]) is MaxPool2d and layers[2].stride == layers[2].kernel_size
            and layers[2].kernel_size <= 16)


def fusable_with_conv(layers):
    """True for [Conv2d, BatchNorm2d, ReLU, MaxPool2d with stride == kernel]."""
    from .conv import Conv2d
    return len(layers) == 4 and type(layers[0]) is Conv2d and fusable(layers[1:])


class BatchNormReLUPool:
    def __init__(self, bn, relu, pool):
        self.bn, self.relu, self.pool = bn, relu, pool
        self._cache = None

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x, offset=None):
        """``offset``: the true input is x + offset per channel (a conv bias left out)."""
        bn, cpu = self.bn, cpu_kernels()
        bn._check_batch(x)
        n, c, h, w = x.shape
        k = self.pool.kernel_size
        oh, ow = h // k, w // k
        if oh < 1 or ow < 1:
            raise ValueError(f"MaxPool2d input of spatial size {(h, w)} is smaller than the kernel ({k}x{k})")
        x_nhwc = cpu.nhwc(x)
        x2 = x_nhwc.reshape(-1, c)
        mean, inv_std, scale, shift = bn._fast_affine(x2, bn.training, offset)
        out = workspace.empty((n, oh, ow, c), x.dtype)
        arg = workspace.empty((n, oh, ow, c), np.uint8)
        cpu.bn_relu_pool_forward(x_nhwc, scale, shift, k, out, arg)
        self._cache = (x_nhwc, mean, inv_std, scale, shift, arg, bn.training, x.shape)
        return cpu.from_nhwc(out)

    def backward_params(self, dout):
        self.backward(dout)

    def backward(self, dout):
        return self._backward(dout)[0]

    def _backward(self, dout):
        """(dL/dx, per-channel float64 sum of dL/dx)."""
        if self._cache is None:
            raise RuntimeError("BatchNorm2d.backward() was called before forward(): run a forward pass first")
        bn, cpu = self.bn, cpu_kernels()
        x_nhwc, mean, inv_std, scale, shift, arg, training, x_shape = self._cache
        n, c, _, _ = x_shape
        expected = (n, c, arg.shape[1], arg.shape[2])
        if tuple(dout.shape) != expected:
            raise ValueError(f"MaxPool2d.backward expects a gradient of the output's shape {expected}, "
                             f"got {tuple(dout.shape)}")
        g = cpu.nhwc(dout)
        k = self.pool.kernel_size
        sum_g, sum_g_xc = cpu.bn_relu_pool_grad_sums(g, arg, x_nhwc, scale, shift, mean, k)
        a, b, c0, sum_dx = bn._fast_backward_affine(sum_g, sum_g_xc, mean, inv_std, x_nhwc.size // c,
                                                    training, x_nhwc.dtype)
        dx = workspace.empty_like(x_nhwc)
        cpu.bn_relu_pool_backward(g, arg, x_nhwc, scale, shift, k, a, b, c0, dx)
        return cpu.from_nhwc(dx), sum_dx


class ConvBatchNormReLUPool:
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d; the conv's bias handled by the BatchNorm."""

    def __init__(self, conv, bn, relu, pool):
        self.conv, self.bn = conv, bn
        self.rest = BatchNormReLUPool(bn, relu, pool)
        self._kept_nothing = False

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        conv = self.conv
        n, oc, oh, ow = conv._check(x)
        self._kept_nothing = False
        offset = None if conv.bias is None else conv.bias.data
        if not self.bn.training and not is_grad_enabled() and threads.available():
            return self._forward_inference(x, (n, oc, oh, ow), offset)
        y = conv._forward_fast(x, oh, ow, add_bias=False)
        return self.rest.forward(y, offset=offset)

    def _forward_inference(self, x, conv_shape, offset):
        """Eval mode under no_grad(): each thread takes a share of the images through im2col, the
        GEMM and BatchNorm + ReLU + pool, a few at a time, and only the pooled output is written
        (minicnn/kernels/threads.py). Nothing is kept for backward."""
        conv, bn, cpu = self.conv, self.bn, cpu_kernels()
        n, oc, oh, ow = conv_shape
        bn._check_batch(np.broadcast_to(np.zeros((), x.dtype), conv_shape))
        k, s, p, c = conv.kernel_size, conv.stride, conv.padding, conv.in_channels
        kp = self.rest.pool.kernel_size
        ph, pw = oh // kp, ow // kp
        if ph < 1 or pw < 1:
            raise ValueError(f"MaxPool2d input of spatial size {(oh, ow)} is smaller than the kernel ({kp}x{kp})")
        _, _, scale, shift = bn._eval_affine(x.dtype, offset)
        x_nhwc = cpu.nhwc(x)
        w_col = conv.weight.data.transpose(2, 3, 1, 0).reshape(k * k * c, oc)
        out = workspace.empty((n, ph, pw, oc), x.dtype)

        def block(lo, hi):         # (plain np.empty: malloc hands each thread back its own, cache-warm memory)
            m = (hi - lo) * oh * ow
            col = cpu.im2col_nhwc_serial(x_nhwc[lo:hi], k, s, p, oh, ow, np.empty((m, k * k * c), x.dtype))
            y = np.matmul(col, w_col, out=np.empty((m, oc), x.dtype))
            arg = np.empty((hi - lo, ph, pw, oc), np.uint8)
            cpu.bn_relu_pool_forward_serial(y.reshape(hi - lo, oh, ow, oc), scale, shift, kp, out[lo:hi], arg)

        per_image = oh * ow * (k * k * c + oc) * x.itemsize   # bytes of col and conv output per image
        chunk = min(max(1, self.CHUNK_BYTES // per_image), -(-n // threads.workers()))
        threads.run_chunks(block, n, chunk)
        conv._cache = self.rest._cache = None
        self._kept_nothing = True
        return cpu.from_nhwc(out)

    # Images per chunk: about this many bytes of im2col and conv output, so they stay in a core's
    # L2 cache (2 MB on the test machine; 1-4 MB measured alike for the EmotionClassifier).
    CHUNK_BYTES = 2 << 20

    def backward(self, dout, input_grad=True):
        if self._kept_nothing:
            raise RuntimeError("backward() through a forward pass that ran under minicnn.no_grad(): "
                               "nothing was kept for it; run the forward pass outside no_grad()")
        conv = self.conv
        dy, sum_dy = self.rest._backward(dout)
        return conv._backward_fast(dy, input_grad, bias_grad=sum_dy)

    def backward_params(self, dout):
        return self.backward(dout, input_grad=False)
