"""[Conv2d ->] BatchNorm2d -> ReLU -> MaxPool2d as one step on the fast CPU path;
Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d, and BatchNorm2d -> ReLU, as one step on the GPU.

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

With a Conv2d in front, the block runs in chunks of images on several threads
(see :class:`ConvBatchNormReLUPool` and :mod:`minicnn.kernels.threads`).
"""
import numpy as np

from ..backend import get_array_module
from ..kernels import cpu_kernels, gpu_kernels, threads, winograd, workspace
from .module import is_grad_enabled

__all__ = ["BatchNormReLUPool", "ConvBatchNormReLUPool", "ConvBatchNormReLUPoolGPU", "BatchNormReLU", "fusable",
           "fusable_with_conv", "fusable_bn_relu"]


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


def fusable_bn_relu(layers):
    """True for [BatchNorm2d, ReLU] (fused on the GPU kernels)."""
    from .activation import ReLU
    from .batchnorm import BatchNorm2d
    return len(layers) == 2 and type(layers[0]) is BatchNorm2d and type(layers[1]) is ReLU


class BatchNormReLU:
    """BatchNorm2d -> ReLU as one step on the GPU (minicnn's CUDA kernels): the ReLU is applied in
    the BatchNorm's output pass, and its mask (output > 0) inside the BatchNorm's backward passes,
    so the ReLU's own passes over the activation (three launches, two each way) disappear."""

    def __init__(self, bn, relu):
        self.bn, self.relu = bn, relu

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        self.bn._check_batch(x)
        return self.bn._forward_gpu(x, relu=True)

    def backward(self, dout):
        return self.bn._backward_gpu(dout)

    def backward_params(self, dout):
        self.backward(dout)


def _pooled_size(h, w, k):
    """The k x k pool's output size (floor mode), or a clear error when the input is smaller."""
    if h // k < 1 or w // k < 1:
        raise ValueError(f"MaxPool2d input of spatial size {(h, w)} is smaller than the kernel ({k}x{k})")
    return h // k, w // k


def _in_order(by_start):
    """The chunks' results in chunk order (the threads finish in any order; sums stay deterministic)."""
    return [by_start[lo] for lo in sorted(by_start)]


def _check_bn_and_pool(bn, pool, conv_shape, dtype):
    """The BatchNorm's and the pool's input checks on the conv's output shape, before any work."""
    bn._check_batch(np.broadcast_to(np.zeros((), dtype), conv_shape))
    _pooled_size(conv_shape[2], conv_shape[3], pool.kernel_size)


def _check_backward(step):
    """The error for a backward through a conv block that has nothing kept for it."""
    if step._kept_nothing:
        raise RuntimeError("backward() through a forward pass that ran under minicnn.no_grad(): "
                           "nothing was kept for it; run the forward pass outside no_grad()")


def _no_forward_yet():
    return RuntimeError("BatchNorm2d.backward() was called before forward(): run a forward pass first")


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
        oh, ow = _pooled_size(h, w, k)
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
            raise _no_forward_yet()
        bn, cpu = self.bn, cpu_kernels()
        x_nhwc, mean, inv_std, scale, shift, arg, training, x_shape = self._cache
        c = x_shape[1]
        self.pool._check_dout(dout, cpu.from_nhwc(arg).shape)      # (as MaxPool2d.backward would)
        g = cpu.nhwc(dout)
        k = self.pool.kernel_size
        sum_g, sum_g_xc = cpu.bn_relu_pool_grad_sums(g, arg, x_nhwc, scale, shift, mean, k)
        a, b, c0, sum_dx = bn._fast_backward_affine(sum_g, sum_g_xc, mean, inv_std, x_nhwc.size // c,
                                                    training, x_nhwc.dtype)
        dx = workspace.empty_like(x_nhwc)
        cpu.bn_relu_pool_backward(g, arg, x_nhwc, scale, shift, k, a, b, c0, dx)
        return cpu.from_nhwc(dx), sum_dx


class ConvBatchNormReLUPool:
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d; the conv's bias handled by the BatchNorm.

    Where :mod:`minicnn.kernels.threads` can run (a BLAS whose threads it can hold to one), the
    block splits the images into chunks of a few, and threads take the chunks through every stage
    with serial kernels and a one-thread BLAS, while each chunk's im2col matrix, conv output and
    gradients are still in the core's cache:

    forward:   im2col -> GEMM -> conv output y (kept) and its per-chunk moments  | threads
               batch statistics from the chunks' moments (exact combination)     | once
               BatchNorm + ReLU + pool of y                                        | threads
    backward:  BatchNorm's two sums over each chunk's winners                      | threads
               dL/dy (the BatchNorm backward), im2col again, dW += col^T dL/dy,    | threads
               dL/dx = col2im(dL/dy W^T)
               dW = the chunks' dW in chunk order (deterministic)                  | once

    A 3x3 stride-1 conv with enough input channels runs by Winograd's F(2x2, 3x3) instead of
    im2col + GEMM in each chunk, forward and dL/dx, and from more channels dW too
    (:mod:`minicnn.kernels.winograd`; ``WINOGRAD = False`` turns it off).

    The im2col matrix is never kept: recomputing a chunk's costs less than writing the whole
    batch's out to memory and reading it back. Under :func:`minicnn.no_grad` in eval mode even y
    is not kept. Otherwise (no such BLAS) the conv and the other three layers' fused step run
    one after the other with parallel kernels.
    """

    # Images per chunk: about this many bytes of a chunk's work arrays, so they stay in a core's
    # L2 cache (2 MB on the test machine; 1-4 MB measured alike for the EmotionClassifier).
    CHUNK_BYTES = 2 << 20
    # ... but at least this many GEMM rows: a smaller product runs well below the BLAS's rate.
    CHUNK_ROWS = 1024
    # With grad, an im2col conv runs in chunks only for a GEMM inner dimension k*k*C_in in this
    # range (measured on the EmotionClassifier's blocks): at C_in = 1 the products are too thin to
    # gain, and at k*k*C_in = 1152 with 6x6 images the block is GEMM-bound and the two-thread BLAS on
    # whole matrices wins. Outside it the block runs the conv and the fused step one after the other,
    # parallel kernels. A Winograd conv always runs in chunks (conv4's block: 5 ms faster per step).
    THREADED_GEMM_K = (16, 1024)
    # 3x3 stride-1 convs by Winograd's F(2x2, 3x3) in the chunks (forward, and dL/dx), 2.25x fewer
    # multiplications than im2col's GEMM (minicnn/kernels/winograd.py). False: im2col everywhere.
    WINOGRAD = True
    # ... for inputs of at least this many channels: the 16 products are (tiles, C) x (C, OC), and
    # with few channels (the first layer's 1) the transforms cost more than the products save.
    WINOGRAD_MIN_CHANNELS = 16
    # The weight gradient by Winograd too (F(3x3, 2x2)) from this many input channels: at 32 (conv2)
    # transforming dL/dY costs what the smaller products save; at 64 and 128 it is 1.3-1.5x faster.
    WINOGRAD_DW_MIN_CHANNELS = 64
    # ... and for batches of at least this many 2x2 output tiles: each step also transforms the
    # filters (twice) and sums 16 weight-gradient planes per chunk, costs that grow with C * OC but
    # not with the batch. EmotionClassifier training step at batch 2, every 3x3 conv by Winograd:
    # 14.2 ms against 12.8 by im2col; with this threshold (conv4, 9 tiles per image, by Winograd
    # from batch 15; conv3 from 4; conv2 always) 13.6 against 13.2, and 32.0 against 34.2 at batch 16.
    WINOGRAD_MIN_TILES = 128

    def __init__(self, conv, bn, relu, pool):
        self.conv, self.bn, self.pool = conv, bn, pool
        self.rest = BatchNormReLUPool(bn, relu, pool)
        self._cache = None
        self._kept_nothing = False

    def __call__(self, x):
        return self.forward(x)

    def _chunk(self, n, per_image, rows_per_image):
        by_cache = max(1, self.CHUNK_BYTES // per_image)
        by_gemm = -(-self.CHUNK_ROWS // rows_per_image)
        return min(max(by_cache, by_gemm), -(-n // threads.workers()))

    def forward(self, x):
        conv, bn = self.conv, self.bn
        conv_shape = conv._check(x)
        self._cache, self._kept_nothing = None, False
        offset = None if conv.bias is None else conv.bias.data
        inference = not bn.training and not is_grad_enabled()
        lo, hi = self.THREADED_GEMM_K
        chunked = inference or self._winograd(conv_shape) or lo <= conv.kernel_size ** 2 * conv.in_channels <= hi
        if not threads.available() or not chunked:
            y = conv._forward_fast(x, conv_shape[2], conv_shape[3], add_bias=False)
            return self.rest.forward(y, offset=offset)
        _check_bn_and_pool(bn, self.pool, conv_shape, x.dtype)
        conv._cache = self.rest._cache = None
        if inference:
            return self._forward_inference(x, conv_shape, offset)
        return self._forward_threaded(x, conv_shape, offset)

    def _im2col(self, x_nhwc, lo, hi, oh, ow):
        """The im2col rows of images lo..hi-1 (serial: called from the worker threads)."""
        conv = self.conv
        k = conv.kernel_size
        col = np.empty(((hi - lo) * oh * ow, k * k * conv.in_channels), x_nhwc.dtype)
        return cpu_kernels().im2col_nhwc_serial(x_nhwc[lo:hi], k, conv.stride, conv.padding, oh, ow, col)

    def _winograd(self, conv_shape):
        """True when the conv, with output shape (N, OC, OH, OW), takes the Winograd route
        (minicnn/kernels/winograd.py)."""
        conv, (n, _, oh, ow) = self.conv, conv_shape
        th, tw = winograd.tiles(oh, ow)
        return (self.WINOGRAD and conv.in_channels >= self.WINOGRAD_MIN_CHANNELS
                and n * th * tw >= self.WINOGRAD_MIN_TILES
                and winograd.applies(conv.kernel_size, conv.stride, conv.padding))

    def _conv_chunk(self, x_nhwc, lo, hi, oh, ow, w, out):
        """out (hi - lo, OH, OW, OC) = the conv of images lo..hi-1, no bias; ``w``: the Winograd
        filters (16, C, OC) or the (K*K*C, OC) weight columns."""
        if w.ndim == 3:
            return winograd.conv3x3(x_nhwc[lo:hi], w, self.conv.padding, out)
        np.matmul(self._im2col(x_nhwc, lo, hi, oh, ow), w, out=out.reshape(-1, out.shape[-1]))
        return out

    def _filters(self, conv_shape):
        conv = self.conv
        return winograd.filter_transform(conv.weight.data) if self._winograd(conv_shape) else conv._weight_columns()

    def _forward_threaded(self, x, conv_shape, offset):
        cpu, bn = cpu_kernels(), self.bn
        n, oc, oh, ow = conv_shape
        x_nhwc, w = cpu.nhwc(x), self._filters(conv_shape)
        w_col = None if w.ndim == 3 else w            # (Winograd: the backward makes its own filters)
        kk, kp = self.conv.kernel_size ** 2 * self.conv.in_channels, self.pool.kernel_size
        y = workspace.empty((n, oh, ow, oc), x.dtype)
        chunk = self._chunk(n, oh * ow * (kk + oc) * x.itemsize, oh * ow)
        parts = {}                                   # chunk start -> its moments
        training = bn.training

        def conv_chunk(lo, hi):
            yk = self._conv_chunk(x_nhwc, lo, hi, oh, ow, w, y[lo:hi]).reshape(-1, oc)
            if training:
                shift = yk[0].astype(np.float64)
                parts[lo] = (yk.shape[0], shift) + cpu.channel_moments_serial(yk, shift)
        threads.run_chunks(conv_chunk, n, chunk)
        if training:
            mean, inv_std, scale, shift = bn._train_affine_from_parts(_in_order(parts), x.dtype, offset)
        else:
            mean, inv_std, scale, shift = bn._eval_affine(x.dtype, offset)
        out = workspace.empty((n, oh // kp, ow // kp, oc), x.dtype)
        arg = workspace.empty(out.shape, np.uint8)
        threads.run_chunks(lambda lo, hi: cpu.bn_relu_pool_forward_serial(y[lo:hi], scale, shift, kp, out[lo:hi],
                                                                          arg[lo:hi]), n, chunk)
        self._cache = (x_nhwc, y, w_col, mean, inv_std, scale, shift, arg, training)
        return cpu.from_nhwc(out)

    def _forward_inference(self, x, conv_shape, offset):
        """Eval mode under no_grad(): only the pooled output is written; nothing is kept."""
        cpu = cpu_kernels()
        n, oc, oh, ow = conv_shape
        x_nhwc, w = cpu.nhwc(x), self._filters(conv_shape)
        kk, kp = self.conv.kernel_size ** 2 * self.conv.in_channels, self.pool.kernel_size
        _, _, scale, shift = self.bn._eval_affine(x.dtype, offset)
        out = workspace.empty((n, oh // kp, ow // kp, oc), x.dtype)

        def block(lo, hi):         # (plain np.empty: malloc hands each thread back its own, cache-warm memory)
            yk = self._conv_chunk(x_nhwc, lo, hi, oh, ow, w, np.empty((hi - lo, oh, ow, oc), x.dtype))
            arg = np.empty((hi - lo,) + out.shape[1:], np.uint8)
            cpu.bn_relu_pool_forward_serial(yk, scale, shift, kp, out[lo:hi], arg)
        threads.run_chunks(block, n, self._chunk(n, oh * ow * (kk + oc) * x.itemsize, oh * ow))
        self._kept_nothing = True
        return cpu.from_nhwc(out)

    def backward(self, dout, input_grad=True):
        _check_backward(self)
        conv = self.conv
        if self._cache is None:
            dy, sum_dy = self.rest._backward(dout)
            return conv._backward_fast(dy, input_grad, bias_grad=sum_dy)
        return self._backward_threaded(dout, input_grad)

    def _backward_threaded(self, dout, input_grad):
        cpu, conv, bn = cpu_kernels(), self.conv, self.bn
        x_nhwc, y, w_col, mean, inv_std, scale, shift, arg, training = self._cache
        n, oh, ow, oc = y.shape
        self.pool._check_dout(dout, cpu.from_nhwc(arg).shape)
        g = cpu.nhwc(dout)
        k, s, p, kp = conv.kernel_size, conv.stride, conv.padding, self.pool.kernel_size
        kk = k * k * conv.in_channels
        chunk = self._chunk(n, oh * ow * (2 * kk + oc) * y.itemsize, oh * ow)
        sums = {}

        def sums_chunk(lo, hi):
            sums[lo] = cpu.bn_relu_pool_grad_sums_serial(g[lo:hi], arg[lo:hi], y[lo:hi], scale, shift, mean, kp)
        threads.run_chunks(sums_chunk, n, chunk)
        sums = _in_order(sums)
        a, b, c0, sum_dy = bn._fast_backward_affine(sum(t[0] for t in sums), sum(t[1] for t in sums), mean,
                                                    inv_std, n * oh * ow, training, y.dtype)
        dx = workspace.empty(x_nhwc.shape, y.dtype) if input_grad else None
        wino_fwd = w_col is None                    # (the forward's choice; the backward follows it)
        wino = input_grad and wino_fwd
        wino_dw = wino_fwd and conv.in_channels >= self.WINOGRAD_DW_MIN_CHANNELS
        w_dx = winograd.filter_transform(conv.weight.data, for_input_grad=True) if wino else None
        dws = {}

        def grad_chunk(lo, hi):
            dy = cpu.bn_relu_pool_backward_serial(g[lo:hi], arg[lo:hi], y[lo:hi], scale, shift, kp, a, b, c0,
                                                  np.empty((hi - lo, oh, ow, oc), y.dtype)).reshape(-1, oc)
            if wino_dw:           # the 16 products V^T E; G^T (sum) G once all chunks are in
                dws[lo] = winograd.weight_grad_sums(x_nhwc[lo:hi], dy.reshape(hi - lo, oh, ow, oc), p)
            else:
                dws[lo] = self._im2col(x_nhwc, lo, hi, oh, ow).T @ dy
            if wino:              # dL/dx: the conv of dL/dy with the rotated filters, padding k - 1 - p
                winograd.conv3x3(dy.reshape(hi - lo, oh, ow, oc), w_dx, k - 1 - p, dx[lo:hi])
            elif input_grad:
                cpu.col2im_nhwc_serial(dy @ w_col.T, k, s, p, oh, ow, dx[lo:hi])
        threads.run_chunks(grad_chunk, n, chunk)
        dws = _in_order(dws)
        dw = dws[0]
        for part in dws[1:]:
            dw += part
        conv._accumulate_weight_grad(winograd.weight_grad_columns(dw) if wino_dw else dw)
        if conv.bias is not None:
            conv.bias.accumulate_grad(sum_dy.astype(y.dtype))
        return cpu.from_nhwc(dx) if input_grad else None

    def backward_params(self, dout):
        return self.backward(dout, input_grad=False)


class ConvBatchNormReLUPoolGPU:
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d as one step on the GPU's CUDA kernels, on
    channels-last memory as on the fast CPU path (the kernels: the end of gpu_kernels.cu)::

        forward:   col = im2col_nhwc(x)                        (N*OH*OW, K*K*C), kept for dW
                   y = col @ Wc                                (N*OH*OW, OC): the NHWC conv output,
                                                               no transpose and no bias (see above)
                   scale, shift from y's batch statistics      (or the running ones, in eval)
                   out, arg = maxpool(relu(y*scale + shift))   one pass; y is kept, not xhat
        backward:  sum(g_bn), sum(g_bn * (y - mean))           over each window's winner only
                   dy = a * g_bn + b * y + c0                  one pass
                   dWc = col^T dy                              one product over all N*OH*OW rows
                   dx = col2im_nhwc(dy @ Wc^T)                 a gather, coalesced on NHWC

    The per-layer GPU path writes and rereads the full-size activation nine times more (bias,
    transposes to and from NCHW, xhat, the ReLU output, the pool's dL/dx) in some 20 more launches.
    Blocks hand each other NCHW views of NHWC memory, so the next block's NHWC input is no copy.
    """

    def __init__(self, conv, bn, relu, pool):
        self.conv, self.bn, self.pool = conv, bn, pool
        self._cache = None
        self._kept_nothing = False

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        conv, bn, gpu, xp = self.conv, self.bn, gpu_kernels(), get_array_module(x)
        n, oc, oh, ow = conv_shape = conv._check(x)
        _check_bn_and_pool(bn, self.pool, conv_shape, x.dtype)
        k = self.pool.kernel_size
        conv._cache = bn._cache = self.pool._cache = self._cache = None
        x_nhwc = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
        col = gpu.im2col_nhwc(x_nhwc, conv.kernel_size, conv.stride, conv.padding, oh, ow)
        w_col = conv._weight_columns()                                  # (K*K*C, OC)
        y = gpu.matmul(col, w_col).reshape(n, oh, ow, oc)
        nbt = bn._buffers["num_batches_tracked"]
        if bn.training:
            nbt += 1                                   # (in place, on the device: no read back)
        mean, inv_std, scale, shift = gpu.batchnorm_affine(
            y, None if conv.bias is None else conv.bias.data, bn.weight.data, bn.bias.data, bn.running_mean,
            bn.running_var, nbt, bn.momentum, bn.eps, bn.training)
        out, arg = gpu.bn_relu_pool_forward(y, scale, shift, k)
        self._kept_nothing = not bn.training and not is_grad_enabled()
        if not self._kept_nothing:
            self._cache = (x_nhwc.shape, col, w_col, y, mean, inv_std, scale, shift, arg, bn.training)
        return out.transpose(0, 3, 1, 2)

    def backward(self, dout, input_grad=True):
        _check_backward(self)
        if self._cache is None:
            raise _no_forward_yet()
        conv, bn, gpu, xp = self.conv, self.bn, gpu_kernels(), get_array_module(dout)
        x_shape, col, w_col, y, mean, inv_std, scale, shift, arg, training = self._cache
        n, oh, ow, oc = y.shape
        k = self.pool.kernel_size
        self.pool._check_dout(dout, (n, oc, oh // k, ow // k))
        g = xp.ascontiguousarray(dout.transpose(0, 2, 3, 1))
        sums = gpu.bn_relu_pool_grad_sums(g, arg, y, scale, shift, mean, k)
        a, b, c0, dgamma, dbeta, dbias = gpu.batchnorm_backward_affine(sums, mean, inv_std, bn.weight.data,
                                                                       n * oh * ow, training)
        bn.weight.accumulate_grad(dgamma)
        bn.bias.accumulate_grad(dbeta)
        if conv.bias is not None:
            conv.bias.accumulate_grad(dbias)
        dy = gpu.bn_relu_pool_backward(g, arg, y, scale, shift, a, b, c0, k).reshape(-1, oc)
        conv._accumulate_weight_grad(gpu.matmul(col.T, dy))      # (one product over all N*OH*OW rows)
        if not input_grad:
            return None
        dx = gpu.col2im_nhwc(gpu.matmul(dy, w_col.T), x_shape, conv.kernel_size, conv.stride, conv.padding, oh, ow)
        return dx.transpose(0, 3, 1, 2)

    def backward_params(self, dout):
        return self.backward(dout, input_grad=False)
