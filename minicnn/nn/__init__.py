"""Layers with hand-written forward and backward passes.

Each module's ``forward(x)`` caches what ``backward(dout)`` needs; ``backward``
returns dL/dx and adds parameter gradients into ``param.grad``.
"""
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .conv import Conv2d
from .distillation import DistillationLoss
from .dropout import Dropout
from .linear import Flatten, Linear
from .loss import CrossEntropyLoss
from .module import Module, Parameter, Sequential, is_grad_enabled, no_grad
from .pooling import MaxPool2d

__all__ = ["Module", "Parameter", "Sequential", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
           "Dropout", "Flatten", "Linear", "CrossEntropyLoss", "DistillationLoss",
           "no_grad", "is_grad_enabled"]
