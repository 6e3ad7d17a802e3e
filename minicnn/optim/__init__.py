"""Optimizers with PyTorch's update rules: SGD (momentum, Nesterov), Adam, AdamW."""
from .adam import Adam, AdamW
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]
