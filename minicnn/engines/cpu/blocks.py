"""CPU engine steps for whole conv blocks: [Conv2d ->] BatchNorm2d -> ReLU -> MaxPool2d.

:class:`BatchNormReLUPool` replaces BatchNorm2d -> ReLU -> MaxPool2d (non-overlapping windows) and
:class:`ConvBatchNormReLUPool` replaces Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d. They read the
layers' own parameters and buffers and compute what the textbook layers compute one after the
other (see the kernels' comment in :mod:`.kernels`), in fewer passes over memory.

With a Conv2d in front, its bias is never added: a per-channel constant added before a BatchNorm
in training mode moves the batch mean by the same amount and cancels (it only enters the running
mean), and in eval mode it folds into the BatchNorm's shift. Its gradient, the per-channel sum of
dL/d(conv output), comes from the BatchNorm's sums for free: exactly 0 in training, up to rounding.

With a Conv2d in front, the block runs in chunks of images on several threads (see
:class:`ConvBatchNormReLUPool` and :mod:`.threads`).
"""
from dataclasses import dataclass

import numpy as np

from ...nn.module import is_grad_enabled
from ..common import (NOTHING_KEPT, Step, StepWithInputGrad, TextbookRun, batchnorm_buffers, check_bn_and_pool,
                      fusable, fusable_with_conv, no_forward_yet, pooled_size, restore_batchnorm_buffers,
                      weight_columns)
from . import kernels as cpu
from . import grey_block, threads, winograd, winograd6, workspace
from .layers import (Conv2dStep, accumulate_weight_columns, backward_affine, batch_affine,
                     batch_affine_from_parts, eval_affine)

__all__ = ["BatchNormReLUPool", "ConvBatchNormReLUPool", "fusable", "fusable_with_conv"]


def _in_order(by_start):
    """The chunks' results in chunk order (the threads finish in any order; sums stay deterministic)."""
    return [by_start[lo] for lo in sorted(by_start)]


@dataclass
class PoolBlockSaved:
    x_nhwc: np.ndarray       # the block's input, (N, H, W, C)
    mean: np.ndarray         # float64 batch (or running) statistics
    inv_std: np.ndarray
    scale: np.ndarray        # out = max over the window of relu(x * scale + shift)
    shift: np.ndarray
    arg: np.ndarray          # (N, OH, OW, C) uint8: which offset of each window won
    training: bool
    x_shape: tuple


class BatchNormReLUPool(Step):
    """Replaces BatchNorm2d -> ReLU -> MaxPool2d (stride == kernel): statistics in one pass, then
    normalise, ReLU and pool in one pass writing only the pooled output and a one-byte argmax;
    backward: the BatchNorm's two sums over each window's winner only, then dL/dx in one pass."""

    def __init__(self, bn, relu, pool):
        self.bn, self.relu, self.pool = bn, relu, pool
        self.saved = None
        self.fallback = None          # the textbook layers, when the output was not finite

    def forward(self, x, offset=None):
        """``offset``: the true input is x + offset per channel (a conv bias left out; the conv block
        then checks the output itself)."""
        bn = self.bn
        bn.check(x)
        self.fallback = None
        before = batchnorm_buffers(bn) if offset is None else None
        n, c, h, w = x.shape
        k = self.pool.kernel_size
        oh, ow = pooled_size(h, w, k)
        x_nhwc = cpu.nhwc(x)
        x2 = x_nhwc.reshape(-1, c)
        mean, inv_std, scale, shift = (batch_affine(bn, x2, offset) if bn.training
                                       else eval_affine(bn, x2.dtype, offset))
        out = workspace.empty((n, oh, ow, c), x.dtype)
        arg = workspace.empty((n, oh, ow, c), np.uint8)
        cpu.bn_relu_pool_forward(x_nhwc, scale, shift, k, out, arg)
        self.saved = PoolBlockSaved(x_nhwc, mean, inv_std, scale, shift, arg, bn.training, x.shape)
        if offset is None and not np.isfinite(out).all():      # NaN or inf: PyTorch's, by the textbook
            restore_batchnorm_buffers(bn, before)
            self.saved, self.fallback = None, TextbookRun([bn, self.relu, self.pool])
            return self.fallback.forward(x)
        return cpu.from_nhwc(out)

    def backward(self, dout):
        if self.fallback is not None:
            return self.fallback.backward(dout)
        return self._backward(dout)[0]

    def _backward(self, dout):
        """(dL/dx, per-channel float64 sum of dL/dx)."""
        sv = self.saved
        if sv is None:
            raise no_forward_yet()
        c = sv.x_shape[1]
        self.pool.check_grad(dout, cpu.from_nhwc(sv.arg).shape)      # (as MaxPool2d.backward would)
        g = cpu.nhwc(dout)
        k = self.pool.kernel_size
        sum_g, sum_g_xc = cpu.bn_relu_pool_grad_sums(g, sv.arg, sv.x_nhwc, sv.scale, sv.shift, sv.mean, k)
        a, b, c0, sum_dx = backward_affine(self.bn, sum_g, sum_g_xc, sv.mean, sv.inv_std, sv.x_nhwc.size // c,
                                           sv.training, sv.x_nhwc.dtype)
        dx = workspace.empty_like(sv.x_nhwc)
        cpu.bn_relu_pool_backward(g, sv.arg, sv.x_nhwc, sv.scale, sv.shift, k, a, b, c0, dx)
        return cpu.from_nhwc(dx), sum_dx


@dataclass
class ConvBlockSaved:
    x_nhwc: np.ndarray       # the block's input, (N, H, W, C)
    y: np.ndarray            # the conv's output without bias, (N, OH, OW, OC)
    w_col: object            # the (K*K*C, OC) weight columns, or None on the Winograd route
    mean: np.ndarray
    inv_std: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    arg: np.ndarray          # (N, OH/k, OW/k, OC) uint8 argmax of each pooling window
    training: bool


class ConvBatchNormReLUPool(StepWithInputGrad):
    """Replaces Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d; the conv's bias handled by the BatchNorm.

    Where :mod:`.threads` can run (a BLAS whose threads it can hold to one), the
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
    (:mod:`.winograd`; ``WINOGRAD = False`` turns it off).

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
    # multiplications than im2col's GEMM (winograd.py). False: im2col everywhere.
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
    # A conv on one input channel (the first layer's grey images) by the grey route (grey_block.py):
    # its conv output is never stored, the conv is recomputed where each pass needs it. False: the
    # conv and the fused step one after the other, as for other thin convs.
    GREY = True
    # dL/dx by F(6x6, 3x3) (winograd6.py: 64 products for 36 outputs, against F(2x2)'s 144) where it
    # divides into 6x6 tiles and is at least this wide (conv2's and conv3's blocks: 2-5 and 1-3 ms
    # faster per step at batch 64). Its float32 error, some 5e-6 of the largest value, reaches the
    # weight gradients as 1e-5 of theirs (1e-6 with F(2x2)). Only backward: the forward's decisions
    # (which pixel wins a pooling window, which values pass the ReLU) must not move, and in the forward
    # such an error flips a few of them among nearly equal values (see docs/engines.md). 0: off.
    WINOGRAD_F6_INPUT_GRAD_MIN_SIZE = 12
    # dL/dW by F(3x3, 6x6) (the same algorithm transposed: 64 products V^T E per tile) where the
    # conv's output divides into 6x6 tiles and is at least this wide, whatever the channels: conv2's
    # block 1-3 ms and conv3's 1-2 ms faster per step. On conv4's 6x6 map it was 5-20 ms slower (each
    # chunk's 64 planes of 128 x 256 sums, 8 MB, then G^T S G). 0: off.
    WINOGRAD_F6_WEIGHT_GRAD_MIN_SIZE = 12

    def __init__(self, conv, bn, relu, pool):
        self.conv, self.bn, self.pool = conv, bn, pool
        self.conv_step = Conv2dStep(conv)                 # the route one layer after the other
        self.rest = BatchNormReLUPool(bn, relu, pool)
        self.saved = None                                 # the threaded route's state
        self.route = None                                 # "layers", "threaded", "inference" (keeps nothing),
        self.fallback = None                              # or "textbook": these layers, for a non-finite output

    def _chunk(self, n, per_image, rows_per_image):
        by_cache = max(1, self.CHUNK_BYTES // per_image)
        by_gemm = -(-self.CHUNK_ROWS // rows_per_image)
        return min(max(by_cache, by_gemm), -(-n // threads.workers()))

    def forward(self, x):
        before = batchnorm_buffers(self.bn)
        out = self._forward(x)
        if np.isfinite(out).all():
            return out
        restore_batchnorm_buffers(self.bn, before)      # NaN or inf: PyTorch's, by the textbook layers
        self.saved = self.conv_step.saved = self.rest.saved = None
        self.route, self.fallback = "textbook", TextbookRun([self.conv, self.bn, self.rest.relu, self.pool])
        return self.fallback.forward(x)

    def _forward(self, x):
        conv, bn = self.conv, self.bn
        conv_shape = conv.check(x)
        self.saved = None
        offset = None if conv.bias is None else conv.bias.data
        inference = not bn.training and not is_grad_enabled()
        if self.GREY and conv.in_channels == 1 and threads.available():
            check_bn_and_pool(bn, self.pool, conv_shape, x.dtype)
            self.conv_step.saved = self.rest.saved = None
            self.route = "inference" if inference else "grey"
            out, self.saved = grey_block.forward(self, x, conv_shape, offset, keep=not inference)
            return out
        lo, hi = self.THREADED_GEMM_K
        chunked = inference or self._winograd(conv_shape) or lo <= conv.kernel_size ** 2 * conv.in_channels <= hi
        if not threads.available() or not chunked:
            self.route = "layers"
            y = self.conv_step.forward(x, add_bias=False)
            return self.rest.forward(y, offset=offset)
        check_bn_and_pool(bn, self.pool, conv_shape, x.dtype)
        self.conv_step.saved = self.rest.saved = None
        if inference:
            self.route = "inference"
            return self._forward_inference(x, conv_shape, offset)
        self.route = "threaded"
        return self._forward_threaded(x, conv_shape, offset)

    def _im2col(self, x_nhwc, lo, hi, oh, ow):
        """The im2col rows of images lo..hi-1 (serial: called from the worker threads)."""
        conv = self.conv
        k = conv.kernel_size
        col = np.empty(((hi - lo) * oh * ow, k * k * conv.in_channels), x_nhwc.dtype)
        return cpu.im2col_nhwc_serial(x_nhwc[lo:hi], k, conv.stride, conv.padding, oh, ow, col)

    def _winograd(self, conv_shape):
        """True when the conv, with output shape (N, OC, OH, OW), takes the Winograd route (.winograd)."""
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

    def _f6_input_grad(self, h, w, padding):
        """True when dL/dx (an h x w output) takes F(6x6, 3x3)."""
        conv, least = self.conv, self.WINOGRAD_F6_INPUT_GRAD_MIN_SIZE
        return bool(least) and min(h, w) >= least and winograd6.applies(conv.kernel_size, conv.stride, padding, h, w)

    def _f6_weight_grad(self, oh, ow, padding):
        """True when dL/dW of a conv with output (oh, ow) takes F(3x3, 6x6)."""
        conv, least = self.conv, self.WINOGRAD_F6_WEIGHT_GRAD_MIN_SIZE
        return bool(least) and min(oh, ow) >= least and winograd6.applies(conv.kernel_size, conv.stride, padding,
                                                                           oh, ow)

    def _filters(self, conv_shape):
        conv = self.conv
        return winograd.filter_transform(conv.weight.data) if self._winograd(conv_shape) else weight_columns(conv)

    def _forward_threaded(self, x, conv_shape, offset):
        bn = self.bn
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
            mean, inv_std, scale, shift = batch_affine_from_parts(bn, _in_order(parts), x.dtype, offset)
        else:
            mean, inv_std, scale, shift = eval_affine(bn, x.dtype, offset)
        out = workspace.empty((n, oh // kp, ow // kp, oc), x.dtype)
        arg = workspace.empty(out.shape, np.uint8)
        threads.run_chunks(lambda lo, hi: cpu.bn_relu_pool_forward_serial(y[lo:hi], scale, shift, kp, out[lo:hi],
                                                                          arg[lo:hi]), n, chunk)
        self.saved = ConvBlockSaved(x_nhwc, y, w_col, mean, inv_std, scale, shift, arg, training)
        return cpu.from_nhwc(out)

    def _forward_inference(self, x, conv_shape, offset):
        """Eval mode under no_grad(): only the pooled output is written; nothing is kept."""
        n, oc, oh, ow = conv_shape
        x_nhwc, w = cpu.nhwc(x), self._filters(conv_shape)
        kk, kp = self.conv.kernel_size ** 2 * self.conv.in_channels, self.pool.kernel_size
        _, _, scale, shift = eval_affine(self.bn, x.dtype, offset)
        out = workspace.empty((n, oh // kp, ow // kp, oc), x.dtype)

        def block(lo, hi):         # (plain np.empty: malloc hands each thread back its own, cache-warm memory)
            yk = self._conv_chunk(x_nhwc, lo, hi, oh, ow, w, np.empty((hi - lo, oh, ow, oc), x.dtype))
            arg = np.empty((hi - lo,) + out.shape[1:], np.uint8)
            cpu.bn_relu_pool_forward_serial(yk, scale, shift, kp, out[lo:hi], arg)
        threads.run_chunks(block, n, self._chunk(n, oh * ow * (kk + oc) * x.itemsize, oh * ow))
        return cpu.from_nhwc(out)

    def backward(self, dout, input_grad=True):
        if self.route == "inference":
            raise RuntimeError(NOTHING_KEPT)
        if self.route == "textbook":
            return self.fallback.backward(dout, input_grad)
        if self.route == "grey":
            return grey_block.backward(self, self.saved, dout, input_grad)
        if self.route != "threaded":
            dy, sum_dy = self.rest._backward(dout)
            return self.conv_step.backward(dy, input_grad, bias_grad=sum_dy)
        return self._backward_threaded(dout, input_grad)

    def _backward_threaded(self, dout, input_grad):
        conv, bn, sv = self.conv, self.bn, self.saved
        x_nhwc, y, w_col, mean, scale, shift, arg = sv.x_nhwc, sv.y, sv.w_col, sv.mean, sv.scale, sv.shift, sv.arg
        n, oh, ow, oc = y.shape
        self.pool.check_grad(dout, cpu.from_nhwc(arg).shape)
        g = cpu.nhwc(dout)
        k, s, p, kp = conv.kernel_size, conv.stride, conv.padding, self.pool.kernel_size
        kk = k * k * conv.in_channels
        chunk = self._chunk(n, oh * ow * (2 * kk + oc) * y.itemsize, oh * ow)
        sums = {}

        def sums_chunk(lo, hi):
            sums[lo] = cpu.bn_relu_pool_grad_sums_serial(g[lo:hi], arg[lo:hi], y[lo:hi], scale, shift, mean, kp)
        threads.run_chunks(sums_chunk, n, chunk)
        sums = _in_order(sums)
        a, b, c0, sum_dy = backward_affine(bn, sum(t[0] for t in sums), sum(t[1] for t in sums), mean,
                                           sv.inv_std, n * oh * ow, sv.training, y.dtype)
        dx = workspace.empty(x_nhwc.shape, y.dtype) if input_grad else None
        wino_fwd = w_col is None                    # (the forward's choice; the backward follows it)
        wino = input_grad and wino_fwd
        dw_f6 = wino_fwd and self._f6_weight_grad(oh, ow, p)
        wino_dw = dw_f6 or (wino_fwd and conv.in_channels >= self.WINOGRAD_DW_MIN_CHANNELS)
        dw_module = winograd6 if dw_f6 else winograd
        w_dx = None              # dL/dx's filters: turned by 180 degrees, in and out channels swapped
        if wino and self._f6_input_grad(x_nhwc.shape[1], x_nhwc.shape[2], k - 1 - p):
            w_dx = winograd6.filter_transform(np.ascontiguousarray(conv.weight.data.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]))
        elif wino:
            w_dx = winograd.filter_transform(conv.weight.data, for_input_grad=True)
        dws = {}

        def grad_chunk(lo, hi):
            dy = cpu.bn_relu_pool_backward_serial(g[lo:hi], arg[lo:hi], y[lo:hi], scale, shift, kp, a, b, c0,
                                                  np.empty((hi - lo, oh, ow, oc), y.dtype)).reshape(-1, oc)
            if wino_dw:           # the 16 (or 64) products V^T E, then G^T (them) G: the chunk's dW
                dws[lo] = dw_module.weight_grad_columns(dw_module.weight_grad_sums(
                    x_nhwc[lo:hi], dy.reshape(hi - lo, oh, ow, oc), p))
            else:
                dws[lo] = self._im2col(x_nhwc, lo, hi, oh, ow).T @ dy
            if wino:              # dL/dx: the conv of dL/dy with the rotated filters, padding k - 1 - p
                (winograd6 if w_dx.shape[0] == 64 else winograd).conv3x3(dy.reshape(hi - lo, oh, ow, oc), w_dx,
                                                                          k - 1 - p, dx[lo:hi])
            elif input_grad:
                cpu.col2im_nhwc_serial(dy @ w_col.T, k, s, p, oh, ow, dx[lo:hi])
        threads.run_chunks(grad_chunk, n, chunk)
        dws = _in_order(dws)
        dw = dws[0]
        for part in dws[1:]:
            dw += part
        accumulate_weight_columns(conv, dw)       # (the sum of 9 planes, not 16 or 64: less to add up in one thread)
        if conv.bias is not None:
            conv.bias.accumulate_grad(sum_dy.astype(y.dtype))
        return cpu.from_nhwc(dx) if input_grad else None



