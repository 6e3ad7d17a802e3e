"""The GPU engine: minicnn's CUDA kernels through CuPy, cuBLAS called directly, CUDA graphs.

* :mod:`.kernels` (source ``kernels.cu``) -- one launch for each job the textbook does in many:
  im2col/col2im, pooling, BatchNorm, dropout, the loss, the optimizer updates;
* :mod:`.cublas` -- cuBLAS called directly (ctypes), for matrix products inside a graph capture;
* :mod:`.layers` -- steps that replace one textbook layer each (and BatchNorm2d -> ReLU);
* :mod:`.blocks` -- the step that replaces a Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d block;
* :mod:`.graph` -- a whole training step recorded once as a CUDA graph and replayed.

``RULES`` tells :func:`minicnn.engines.plan` which runs of textbook layers each step replaces,
longest first; only exact textbook classes are replaced. Importing this package imports no CuPy:
the kernels are compiled by CuPy on first use.
"""
from ...nn import BatchNorm2d, Conv2d, Dropout, Linear, MaxPool2d
from ..common import fusable_bn_relu, fusable_with_conv
from .blocks import ConvBatchNormReLUPoolGPU
from .layers import BatchNorm2dStep, BatchNormReLU, Conv2dStep, DropoutStep, LinearStep, MaxPool2dStep

__all__ = ["RULES"]


def _is(cls, test=None):
    return lambda run: type(run[0]) is cls and (test is None or test(run[0]))


RULES = (
    (4, fusable_with_conv, ConvBatchNormReLUPoolGPU),
    (2, fusable_bn_relu, BatchNormReLU),
    (1, _is(Conv2d), Conv2dStep),
    (1, _is(BatchNorm2d), BatchNorm2dStep),
    (1, _is(MaxPool2d, lambda pool: pool.kernel_size <= 16), MaxPool2dStep),
    (1, _is(Dropout), DropoutStep),
    (1, _is(Linear), LinearStep),
)
