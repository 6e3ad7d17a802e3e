"""GPU engine step for a whole conv block: Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d.

The CPU engine's design (minicnn/engines/cpu/blocks.py) with CUDA kernels: channels-last memory, the
conv's bias folded into the BatchNorm (it cancels in training and folds into the shift in eval; its
gradient comes from the BatchNorm's sums), and BatchNorm, ReLU and pooling sharing their passes.
"""
from dataclasses import dataclass

from ...backend import get_array_module
from ...nn.module import is_grad_enabled
from ..common import (NOTHING_KEPT, StepWithInputGrad, check_bn_and_pool, fusable_with_conv, no_forward_yet,
                      weight_columns)
from . import kernels as gpu
from .layers import accumulate_weight_columns

__all__ = ["ConvBatchNormReLUPoolGPU", "fusable_with_conv"]

@dataclass
class ConvBlockSaved:
    x_shape: tuple           # the NHWC input's shape
    col: object              # (N*OH*OW, K*K*C) channels-last im2col rows, kept for dW
    w_col: object            # (K*K*C, OC)
    y: object                # (N, OH, OW, OC) conv output, no bias
    mean: object
    inv_std: object
    scale: object
    shift: object
    arg: object              # (N, OH/k, OW/k, OC) uint8 argmax of each pooling window
    training: bool


class ConvBatchNormReLUPoolGPU(StepWithInputGrad):
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d as one step on the GPU's CUDA kernels, on
    channels-last memory as in the CPU engine (the kernels: the end of kernels.cu)::

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
        self.saved = None
        self.kept_nothing = False

    def forward(self, x):
        conv, bn, xp = self.conv, self.bn, get_array_module(x)
        n, oc, oh, ow = conv_shape = conv.check(x)
        check_bn_and_pool(bn, self.pool, conv_shape, x.dtype)
        k = self.pool.kernel_size
        self.saved = None
        x_nhwc = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
        col = gpu.im2col_nhwc(x_nhwc, conv.kernel_size, conv.stride, conv.padding, oh, ow)
        w_col = weight_columns(conv)                                  # (K*K*C, OC)
        y = gpu.matmul(col, w_col).reshape(n, oh, ow, oc)
        nbt = bn.num_batches_tracked
        if bn.training:
            nbt += 1                                   # (in place, on the device: no read back)
        mean, inv_std, scale, shift = gpu.batchnorm_affine(
            y, None if conv.bias is None else conv.bias.data, bn.weight.data, bn.bias.data, bn.running_mean,
            bn.running_var, nbt, bn.momentum, bn.eps, bn.training)
        out, arg = gpu.bn_relu_pool_forward(y, scale, shift, k)
        self.kept_nothing = not bn.training and not is_grad_enabled()
        if not self.kept_nothing:
            self.saved = ConvBlockSaved(x_nhwc.shape, col, w_col, y, mean, inv_std, scale, shift, arg, bn.training)
        return out.transpose(0, 3, 1, 2)

    def backward(self, dout, input_grad=True):
        if self.kept_nothing:
            raise RuntimeError(NOTHING_KEPT)
        if self.saved is None:
            raise no_forward_yet()
        conv, bn, xp, sv = self.conv, self.bn, get_array_module(dout), self.saved
        x_shape, col, w_col, y, mean, scale, shift, arg = (sv.x_shape, sv.col, sv.w_col, sv.y, sv.mean, sv.scale,
                                                           sv.shift, sv.arg)
        n, oh, ow, oc = y.shape
        k = self.pool.kernel_size
        self.pool.check_grad(dout, (n, oc, oh // k, ow // k))
        g = xp.ascontiguousarray(dout.transpose(0, 2, 3, 1))
        sums = gpu.bn_relu_pool_grad_sums(g, arg, y, scale, shift, mean, k)
        a, b, c0, dgamma, dbeta, dbias = gpu.batchnorm_backward_affine(sums, mean, sv.inv_std, bn.weight.data,
                                                                       n * oh * ow, sv.training)
        bn.weight.accumulate_grad(dgamma)
        bn.bias.accumulate_grad(dbeta)
        if conv.bias is not None:
            conv.bias.accumulate_grad(dbias)
        dy = gpu.bn_relu_pool_backward(g, arg, y, scale, shift, a, b, c0, k).reshape(-1, oc)
        accumulate_weight_columns(conv, gpu.matmul(col.T, dy))      # (one product over all N*OH*OW rows)
        if not input_grad:
            return None
        dx = gpu.col2im_nhwc(gpu.matmul(dy, w_col.T), x_shape, conv.kernel_size, conv.stride, conv.padding, oh, ow)
        return dx.transpose(0, 3, 1, 2)

