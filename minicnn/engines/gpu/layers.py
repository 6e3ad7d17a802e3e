"""GPU engine steps for single layers: the textbook math with minicnn's CUDA kernels (:mod:`.kernels`).

Each step replaces one textbook layer (named in its docstring), reads that layer's parameters and
buffers through their public attributes, and keeps its own state. Matrix products go through
:func:`.kernels.matmul` (cuBLAS called directly while a CUDA graph is captured).
"""
from dataclasses import dataclass

import numpy as np

from ...backend import get_array_module, to_device
from ...nn.module import check_input
from ..common import LinearStepBase, Step, StepWithInputGrad, before_forward as _before_forward
from . import kernels as gpu

__all__ = ["Conv2dStep", "BatchNorm2dStep", "BatchNormReLU", "MaxPool2dStep", "DropoutStep", "LinearStep",
           "CrossEntropyStep", "image_groups", "column_sums_by_image_groups",
           "accumulate_weight_columns"]


def image_groups(n, q):
    """How many groups of whole images (a divisor of n, at most 128) to split a column sum of an
    (N*OH*OW, Q) array into: about 256 blocks of 64 columns in all."""
    want = max(1, min(n, 128, -(-256 // -(-q // 64))))
    return max(g for g in range(1, want + 1) if n % g == 0)


def column_sums_by_image_groups(d, n):
    """d.sum(axis=0) for d (N*OH*OW, Q), summed within groups of images first: as one reduction,
    millions of rows go into Q sums, one per block, and few of the GPU's multiprocessors work
    (conv1's bias gradient at batch 1024 on an H200)."""
    return d.reshape(image_groups(n, d.shape[1]), -1, d.shape[1]).sum(axis=1).sum(axis=0)


def accumulate_weight_columns(conv, dw_columns):
    """Add dL/dW given in :func:`weight_columns`' layout to ``conv.weight.grad`` (OC, C, K, K)."""
    k = conv.kernel_size
    as_weight = dw_columns.reshape(k, k, conv.in_channels, conv.out_channels).transpose(3, 2, 0, 1)
    conv.weight.accumulate_grad(get_array_module(dw_columns).ascontiguousarray(as_weight))


@dataclass
class ConvSaved:
    x_shape: tuple
    col: object              # (N*OH*OW, C*K*K) im2col rows, as the textbook's
    out_shape: tuple


class Conv2dStep(StepWithInputGrad):
    """Replaces :class:`minicnn.nn.Conv2d`: im2col and col2im one launch each; dL/dW as col^T d, not
    d^T col (cuBLAS gave conv1's (32 x 2.4M) by (2.4M x 9) product at batch 1024 on an H200 a handful
    of tiles and 56 ms; (9 x 2.4M) by (2.4M x 32) took 0.3 ms), the bias gradient by image groups."""

    def __init__(self, conv):
        self.conv = conv
        self.saved = None

    def forward(self, x):
        conv = self.conv
        n, oc, oh, ow = conv.check(x)
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        xp = get_array_module(x)
        col = gpu.im2col(x, k, k, s, p)                                  # (N*OH*OW, C*K*K)
        out = gpu.matmul(col, conv.weight.data.reshape(oc, -1).T)       # (N*OH*OW, OC)
        if conv.bias is not None:
            out += conv.bias.data
        self.saved = ConvSaved(x.shape, col, (n, oc, oh, ow))
        return xp.ascontiguousarray(out.reshape(n, oh, ow, oc).transpose(0, 3, 1, 2))

    def backward(self, dout, input_grad=True):
        conv, sv = self.conv, self.saved
        if sv is None:
            raise _before_forward(conv)
        conv.check_grad(dout, sv.out_shape)
        k, s, p, oc = conv.kernel_size, conv.stride, conv.padding, conv.out_channels
        d = dout.transpose(0, 2, 3, 1).reshape(-1, oc)                  # (N*OH*OW, OC)
        if conv.bias is not None:
            conv.bias.accumulate_grad(column_sums_by_image_groups(d, sv.x_shape[0]))
        conv.weight.accumulate_grad(gpu.matmul(sv.col.T, d).T.reshape(conv.weight.shape))
        if not input_grad:
            return None
        dcol = gpu.matmul(d, conv.weight.data.reshape(oc, -1))
        return gpu.col2im(dcol, sv.x_shape, k, k, s, p)



@dataclass
class BatchNormSaved:
    xhat: object
    inv_std: object
    training: bool
    relu_out: object         # the output when the ReLU was applied too (its mask: > 0), else None


class BatchNorm2dStep(Step):
    """Replaces :class:`minicnn.nn.BatchNorm2d`: statistics in three launches (float64 partial sums
    per channel, their sum, one thread per channel that also updates the running statistics, the
    batch count in place: no read back), the normalisation in one, backward the same again."""

    relu = False

    def __init__(self, bn):
        self.bn = bn
        self.saved = None

    def forward(self, x):
        bn = self.bn
        bn.check(x)
        if bn.training:
            nbt = bn.num_batches_tracked
            nbt += 1                                   # (in place, on the device: no read back)
            mean, inv_std = gpu.batchnorm_statistics(x, bn.running_mean, bn.running_var, nbt, bn.momentum, bn.eps)
        else:
            mean, inv_std = bn.running_mean, 1.0 / get_array_module(x).sqrt(bn.running_var + bn.eps)
        xhat, out = gpu.batchnorm_forward(x, mean, inv_std, bn.weight.data, bn.bias.data, self.relu)
        self.saved = BatchNormSaved(xhat, inv_std, bn.training, out if self.relu else None)
        return out

    def backward(self, dout):
        bn, sv = self.bn, self.saved
        if sv is None:
            raise _before_forward(bn)
        bn.check_grad(dout, sv.xhat.shape)
        sum_g, sum_g_xhat = gpu.batchnorm_grad_sums(dout, sv.xhat, sv.relu_out)
        bn.bias.accumulate_grad(sum_g.astype(dout.dtype))
        bn.weight.accumulate_grad(sum_g_xhat.astype(dout.dtype))
        return gpu.batchnorm_backward(dout, sv.xhat, bn.weight.data, sv.inv_std, sum_g, sum_g_xhat, sv.training,
                                      sv.relu_out)



class BatchNormReLU(BatchNorm2dStep):
    """Replaces :class:`minicnn.nn.BatchNorm2d` -> :class:`minicnn.nn.ReLU`: the ReLU is applied in
    the BatchNorm's output pass, and its mask (output > 0) inside the BatchNorm's backward passes,
    so the ReLU's own passes over the activation (three launches, two each way) disappear."""

    relu = True

    def __init__(self, bn, relu):
        super().__init__(bn)
        self.relu_layer = relu


class MaxPool2dStep(Step):
    """Replaces :class:`minicnn.nn.MaxPool2d` (kernel <= 16): one launch each way, the backward a
    gather (each pixel sums the windows it won)."""

    def __init__(self, pool):
        self.pool = pool
        self.saved = None        # (input shape, argmax)

    def forward(self, x):
        self.pool.check(x)
        out, arg = gpu.maxpool_forward(x, self.pool.kernel_size, self.pool.stride)
        self.saved = (x.shape, arg)
        return out

    def backward(self, dout):
        if self.saved is None:
            raise _before_forward(self.pool)
        x_shape, arg = self.saved
        self.pool.check_grad(dout, arg.shape)
        return gpu.maxpool_backward(dout, arg, x_shape, self.pool.kernel_size, self.pool.stride)



class DropoutStep(Step):
    """Replaces :class:`minicnn.nn.Dropout`: the mask made on the device by hashing (seed, index) in
    one launch; the backward makes it again from the seed instead of storing it. The seed is one draw
    from the layer's generator per forward pass (as the textbook layer draws on a device), kept in
    device memory so that a replayed CUDA graph reads a new one (:meth:`before_graph_replay`)."""

    def __init__(self, dropout):
        self.dropout = dropout
        self.seed = None         # DeviceValues holding this step's seed
        self.saved = None        # (seed array or None for the identity, dtype, shape)

    def forward(self, x):
        d = self.dropout
        check_input(d, x, None)
        if not d.training or d.p == 0.0:
            self.saved = (None, x.dtype, x.shape)
            return x
        if self.seed is None:
            self.seed = gpu.DeviceValues(np.uint64)
        if not gpu.capturing():                  # (a CUDA graph's replays draw in before_graph_replay)
            self.seed.set([d.draw_seed()])
        self.saved = (self.seed.array, x.dtype, x.shape)
        return gpu.dropout(x, d.p, self.seed.array)

    def before_graph_replay(self):
        """A replayed CUDA graph of a training step does not call forward(): draw its seed here."""
        if self.dropout.training and self.dropout.p > 0.0 and self.seed is not None:
            self.seed.set([self.dropout.draw_seed()])

    def last_mask(self):
        """The mask of the last forward pass (scale included), or None for the identity."""
        if self.saved is None:
            raise _before_forward(self.dropout)
        seed, dtype, shape = self.saved
        return None if seed is None else gpu.dropout(to_device(np.ones(shape, dtype), "gpu"), self.dropout.p, seed)

    def backward(self, dout):
        if self.saved is None:
            raise _before_forward(self.dropout)
        seed, _, shape = self.saved
        self.dropout.check_grad(dout, shape)
        return dout if seed is None else gpu.dropout(dout, self.dropout.p, seed)



class LinearStep(LinearStepBase):
    """Replaces :class:`minicnn.nn.Linear`: the same products through :func:`.kernels.matmul`, so a
    CUDA graph can capture them."""

    def matmul(self, a, b):
        return gpu.matmul(a, b)


class CrossEntropyStep:
    """Replaces :class:`minicnn.nn.CrossEntropyLoss` on the GPU: one launch computes each row's loss,
    weight and gradient at once (:func:`.kernels.softmax_cross_entropy`)."""

    def __init__(self, criterion):
        self.criterion = criterion
        self.saved = None        # (unscaled gradient, total weight)

    def __call__(self, logits, labels):
        return float(self.forward(logits, labels))

    def forward(self, logits, labels):
        crit = self.criterion
        labels = crit.check(logits, labels)
        n, c = logits.shape
        labels = to_device(labels, "gpu").astype(np.int64, copy=False)
        w = crit.class_weights(c, logits)
        row_loss, row_w, grad = gpu.softmax_cross_entropy(logits, labels, w, crit.label_smoothing)
        total_w = row_w.sum() if crit.reduction == "mean" else logits.dtype.type(1.0)
        self.saved = (grad, total_w)
        return row_loss.sum() / total_w

    def backward(self, dloss=1.0):
        if self.saved is None:
            raise RuntimeError("CrossEntropyLoss.backward() was called before the loss was computed")
        grad, total_w = self.saved
        grad = grad / total_w
        return grad * dloss if dloss != 1.0 else grad
