"""DistillationLoss: learn from a teacher's softened probabilities as well as from the labels.

Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural network". A teacher (say, an
ensemble of trained networks) gives each image a distribution ``p`` over the classes, softened at a
temperature T: ``p = softmax(teacher logits / T)``, averaged over the teachers. The student's
logits z, softened alike, give ``s = softmax(z / T)``. With weight a between the two parts::

    L = (1 - a) * CE(z, y)  +  a * T^2 * (1/N) sum_i KL(p_i || s_i)
    KL(p_i || s_i) = sum_c p_ic (log p_ic - log s_ic)

(CE is :class:`CrossEntropyLoss`, label smoothing included.) The T^2 keeps the soft part's
gradient the same size whatever T is, because d(log s_ic)/dz_ik = (1[c = k] - s_ik) / T::

    dL/dz_i = (1 - a) * dCE/dz_i  +  a * T * (s_i - p_i) / N

At T = 1 and a = 1 this is cross-entropy against the teacher's distribution instead of the label
(minus the teacher's entropy, a constant). The loop version is :func:`minicnn.nn.reference.distillation_loss`.
"""
import numpy as np

from ..backend import get_array_module
from .loss import CrossEntropyLoss

__all__ = ["DistillationLoss"]


class DistillationLoss:
    def __init__(self, temperature=2.0, weight=0.5, label_smoothing=0.0):
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight (of the teacher's part) must be in [0, 1], got {weight}")
        self.temperature, self.weight = float(temperature), float(weight)
        self.hard = CrossEntropyLoss(label_smoothing=label_smoothing)       # the labels' part
        self._cache = None

    def __repr__(self):
        return (f"DistillationLoss(temperature={self.temperature}, weight={self.weight}, "
                f"label_smoothing={self.hard.label_smoothing})")

    def __call__(self, logits, labels, teacher_probs):
        """The loss as a Python float (use :meth:`forward` to keep it on the device)."""
        return float(self.forward(logits, labels, teacher_probs))

    def check(self, logits, teacher_probs):
        """Clear errors for teacher probabilities that do not fit the logits."""
        shape = getattr(teacher_probs, "shape", None)
        if shape != logits.shape:
            raise ValueError(f"DistillationLoss expects teacher probabilities shaped like the logits "
                             f"{tuple(logits.shape)}, got {None if shape is None else tuple(shape)}")
        if get_array_module(teacher_probs) is not get_array_module(logits):
            raise ValueError("DistillationLoss: the teacher probabilities and the logits are on different devices")

    def forward(self, logits, labels, teacher_probs):
        """The loss as a 0-d array on the logits' device; caches what backward needs."""
        hard = self.hard.forward(logits, labels)                        # CE(z, y) (checks the labels)
        self.check(logits, teacher_probs)
        xp = get_array_module(logits)
        n = logits.shape[0]
        T, a = self.temperature, self.weight
        p = teacher_probs.astype(logits.dtype, copy=False)
        zt = logits / T
        zt = zt - zt.max(axis=1, keepdims=True)
        log_s = zt - xp.log(xp.exp(zt).sum(axis=1, keepdims=True))      # log s = log softmax(z / T)
        p_log_p = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1)), 0)  # (0 log 0 = 0)
        kl = (p_log_p - p * log_s).sum() / n                            # (1/N) sum KL(p || s)
        self._cache = (log_s, p, n)
        return (1 - a) * hard + a * T * T * kl                          # (1 - a) CE + a T^2 KL

    def backward(self, dloss=1.0):
        """dL/d(logits), shaped like the logits (times ``dloss``)."""
        if self._cache is None:
            raise RuntimeError("DistillationLoss.backward() was called before the loss was computed")
        log_s, p, n = self._cache
        xp = get_array_module(log_s)
        T, a = self.temperature, self.weight
        grad = (1 - a) * self.hard.backward()                           # (1 - a) dCE/dz
        grad += (a * T / n) * (xp.exp(log_s) - p)                       #   + a T (s - p) / N
        return grad * dloss if dloss != 1.0 else grad
