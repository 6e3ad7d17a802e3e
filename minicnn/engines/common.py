"""What both engines share: which runs of textbook layers a block step replaces, and its errors."""
import numpy as np

__all__ = ["Step", "StepWithInputGrad", "LinearStepBase", "TextbookRun", "batchnorm_buffers", "restore_batchnorm_buffers", "weight_columns", "fusable", "fusable_with_conv", "fusable_bn_relu", "check_bn_and_pool",
           "pooled_size",
           "no_forward_yet", "before_forward", "NOTHING_KEPT", "walk_inference_plan"]

NOTHING_KEPT = ("backward() through a forward pass that ran under minicnn.no_grad(): nothing was kept for it; "
                "run the forward pass outside no_grad()")


class Step:
    """An engine step: stands in for one or more textbook layers (``replaces``, set by the planner),
    with their ``forward(x)`` / ``backward(dout)``; ``saved`` holds what its backward needs."""

    saved = None
    replaces = ()

    def __call__(self, x):
        return self.forward(x)

    def backward_params(self, dout):
        """Parameter gradients only (the first step of a network needs no dL/dx)."""
        self.backward(dout)


class StepWithInputGrad(Step):
    """A step whose backward can skip dL/dx: ``backward(dout, input_grad=False)``."""

    def backward_params(self, dout):
        return self.backward(dout, input_grad=False)


class LinearStepBase(StepWithInputGrad):
    """Replaces :class:`minicnn.nn.Linear`: its three products through the engine's own ``matmul``
    (``weight_grad`` may put dL/dW in reused memory)."""

    def __init__(self, linear):
        self.linear = linear
        self.saved = None        # the input

    def matmul(self, a, b):
        return a @ b

    def weight_grad(self, dout, x):
        return self.matmul(dout.T, x)

    def forward(self, x):
        lin = self.linear
        lin.check(x)
        out = self.matmul(x, lin.weight.data.T)
        if lin.bias is not None:
            out += lin.bias.data
        self.saved = x
        return out

    def backward(self, dout, input_grad=True):
        lin, x = self.linear, self.saved
        if x is None:
            raise before_forward(lin)
        lin.check_grad(dout, (x.shape[0], lin.out_features))
        lin.weight.accumulate_grad(self.weight_grad(dout, x))
        if lin.bias is not None:
            lin.bias.accumulate_grad(dout.sum(axis=0))
        return self.matmul(dout, lin.weight.data) if input_grad else None


class TextbookRun:
    """The textbook layers themselves, one after the other: what a CPU engine step falls back to when
    its output holds a NaN or an inf. Its folded arithmetic (x * scale + shift for a BatchNorm,
    Winograd's transforms) gives the same numbers as PyTorch's for finite values, but not always the
    same non-finite ones (inf - inf is NaN); the textbook's does. Checking the output costs one pass
    over it (0.1 ms for the largest block at batch 64); the fallback runs only for bad numbers."""

    def __init__(self, layers):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dout, input_grad=True):
        for layer in reversed(self.layers[1:]):
            dout = layer.backward(dout)
        if input_grad:
            return self.layers[0].backward(dout)
        self.layers[0].backward_params(dout)
        return None


def weight_columns(conv):
    """The conv weight (OC, C, K, K) as the (K*K*C, OC) matrix that multiplies channels-last im2col rows
    (both engines' conv steps and blocks)."""
    k = conv.kernel_size
    return conv.weight.data.transpose(2, 3, 1, 0).reshape(k * k * conv.in_channels, conv.out_channels)


def batchnorm_buffers(bn):
    """A copy of a BatchNorm's running statistics and batch count (to undo an update)."""
    return [b.copy() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def restore_batchnorm_buffers(bn, saved):
    """Put back what :func:`batchnorm_buffers` copied, in place (the arrays stay the same)."""
    for buf, old in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), saved):
        buf[...] = old


def fusable(layers):
    """True for [BatchNorm2d, ReLU, MaxPool2d with stride == kernel <= 16]."""
    from ..nn import BatchNorm2d, MaxPool2d, ReLU
    return (len(layers) == 3 and type(layers[0]) is BatchNorm2d and type(layers[1]) is ReLU
            and type(layers[2]) is MaxPool2d and layers[2].stride == layers[2].kernel_size
            and layers[2].kernel_size <= 16)


def fusable_with_conv(layers):
    """True for [Conv2d, BatchNorm2d, ReLU, MaxPool2d with stride == kernel <= 16]."""
    from ..nn import Conv2d
    return len(layers) == 4 and type(layers[0]) is Conv2d and fusable(layers[1:])


def fusable_bn_relu(layers):
    """True for [BatchNorm2d, ReLU]."""
    from ..nn import BatchNorm2d, ReLU
    return len(layers) == 2 and type(layers[0]) is BatchNorm2d and type(layers[1]) is ReLU


def pooled_size(h, w, k):
    """The k x k pool's output size (floor mode), or a clear error when the input is smaller."""
    if h // k < 1 or w // k < 1:
        raise ValueError(f"MaxPool2d input of spatial size {(h, w)} is smaller than the kernel ({k}x{k})")
    return h // k, w // k


def check_bn_and_pool(bn, pool, conv_shape, dtype):
    """The BatchNorm's and the pool's input checks on the conv's output shape, before any work."""
    bn.check(np.broadcast_to(np.zeros((), dtype), conv_shape))
    pooled_size(conv_shape[2], conv_shape[3], pool.kernel_size)


def no_forward_yet():
    return RuntimeError("BatchNorm2d.backward() was called before forward(): run a forward pass first")


def before_forward(layer):
    return RuntimeError(f"{type(layer).__name__}.backward() was called before forward(): run a forward pass first")


def walk_inference_plan(plan, input_shape, make_conv, make_linear):
    """Both engines' inference plans from an :class:`~minicnn.InferenceSession` plan: conv blocks,
    then Flatten, then Linears. ``make_conv(w, b, stride, padding, pool, (h, w))`` returns a block
    with its output's ``oc``, ``ph``, ``pw``; ``make_linear(w, b, relu)`` a Linear. Both engines keep
    the feature maps channels-last, so the first Linear's columns are reordered here from NCHW
    order to NHWC order (what Flatten of the channels-last map gives). Returns (convs, linears)."""
    c, h, w = input_shape
    convs, linears, flat = [], [], None
    for op in plan:
        if op[0] == "conv":
            if linears or flat is not None:
                raise ValueError("a conv block after Flatten or Linear")
            if op[1].shape[1] != c:
                raise ValueError(f"a conv expecting {op[1].shape[1]} channels gets {c}")
            block = make_conv(*op[1:], (h, w))
            convs.append(block)
            c, h, w = block.oc, block.ph, block.pw
        elif op[0] == "flatten":
            flat = (c, h, w)
        else:
            _, weight, bias, relu = op
            first = not linears
            if first and flat is None:
                raise ValueError("a Linear before Flatten")
            if first:
                c, h, w = flat
                weight = weight.reshape(weight.shape[0], c, h, w).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)
            linears.append(make_linear(weight, bias, relu))
    if not linears:
        raise ValueError("the plan has no Linear")
    return convs, linears
