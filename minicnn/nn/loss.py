"""CrossEntropyLoss: softmax + negative log-likelihood, with PyTorch's semantics.

With logits z (N, C), log-probabilities ``logp = z - logsumexp(z)`` (computed
after subtracting each row's max, so exp never overflows), and a target
distribution q per sample::

    q_i = (1 - eps) * w[y_i] * onehot(y_i) + (eps / C) * w      (w = class weights, 1 if none)
    loss = sum_i sum_c q_ic * (-logp_ic) / W,   W = sum_i w[y_i]  (reduction='mean')

so with no weights and no smoothing it is the plain mean of -log p[y]. Because
d(-logp_ic)/dz_i = softmax(z_i) - onehot(c)::

    dL/dz_i = (sum_c q_ic * softmax(z_i) - q_i) / W

which is the famous ``(p - onehot(y)) / N`` in the plain case. The loop version is
:func:`minicnn.nn.reference.cross_entropy`.
"""
import numpy as np

from ..backend import get_array_module, to_device, device_of
from .module import check_input

__all__ = ["CrossEntropyLoss", "check_labels"]


def check_labels(labels, n, c=None):
    """Check ``n`` integer class labels in [0, c) (c None: no upper bound known); returns them,
    as a NumPy array when they came from the host. Labels already on a device get their shape and
    type checked only: reading their values would wait for the device."""
    if device_of(labels) != "cpu":
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ValueError(f"CrossEntropyLoss expects integer labels of shape ({n},), got {labels.dtype} "
                             f"labels of shape {tuple(labels.shape)}")
        return labels
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"CrossEntropyLoss expects labels of shape ({n},)"
                         f"{'' if c is None else f' for logits of shape ({n}, {c})'}, got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"CrossEntropyLoss expects integer class labels, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or (c is not None and labels.max() >= c)):
        raise ValueError(f"labels must be in [0, {c}), got values from {labels.min()} to {labels.max()}")
    return labels


class CrossEntropyLoss:
    def __init__(self, weight=None, label_smoothing=0.0, reduction="mean"):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if weight is not None:
            weight = np.asarray(weight.get() if hasattr(weight, "get") else weight, dtype=np.float64)
            if weight.ndim != 1 or (weight < 0).any():
                raise ValueError(f"weight must be a 1-D array of non-negative class weights, "
                                 f"got shape {weight.shape}")
        self.weight = weight
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self._weights, self._weights_for = None, None
        self._cache = None

    def __repr__(self):
        return (f"CrossEntropyLoss(label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, weighted={self.weight is not None})")

    def __call__(self, logits, labels):
        """The loss as a Python float (use :meth:`forward` to keep it on the device)."""
        return float(self.forward(logits, labels))

    def check(self, logits, labels):
        """Clear errors for wrong logits or labels; returns the labels (checked)."""
        check_input(self, logits, ("N", "C"))
        n, c = logits.shape
        if self.weight is not None and self.weight.shape != (c,):
            raise ValueError(f"weight has shape {self.weight.shape} but the logits have {c} classes")
        if n == 0:
            raise ValueError("CrossEntropyLoss got an empty batch")
        return check_labels(labels, n, c)

    def class_weights(self, c, like):
        """The class weights (ones if none) on ``like``'s device and dtype, made once."""
        key = (device_of(like), like.dtype, c)
        if self._weights_for != key:
            w = np.ones(c) if self.weight is None else self.weight
            self._weights, self._weights_for = to_device(w.astype(like.dtype), key[0]), key
        return self._weights

    def forward(self, logits, labels):
        """The loss as a 0-d array on the logits' device; caches what backward needs."""
        labels = self.check(logits, labels)
        xp = get_array_module(logits)
        n, c = logits.shape
        labels = to_device(labels, device_of(logits)).astype(np.int64, copy=False)
        eps = self.label_smoothing
        w = self.class_weights(c, logits)
        z = logits - logits.max(axis=1, keepdims=True)                  # exp never overflows
        logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))         # logp = z - logsumexp(z)
        q = xp.zeros_like(logp)
        q[xp.arange(n), labels] = (1.0 - eps) * w[labels]              # q = (1 - eps) w[y] onehot(y)
        if eps:
            q += (eps / c) * w                                          #   + (eps / C) w
        total_w = w[labels].sum() if self.reduction == "mean" else logits.dtype.type(1.0)
        loss = -(q * logp).sum() / total_w                              # sum q (-logp) / W
        self._cache = (logp, q, total_w)
        return loss

    def backward(self, dloss=1.0):
        """dL/d(logits), shaped like the logits (times ``dloss``)."""
        if self._cache is None:
            raise RuntimeError("CrossEntropyLoss.backward() was called before the loss was computed")
        logp, q, total_w = self._cache
        xp = get_array_module(logp)
        p = xp.exp(logp)                                                # softmax(z)
        grad = (q.sum(axis=1, keepdims=True) * p - q) / total_w        # (sum_c q * p - q) / W
        return grad * dloss if dloss != 1.0 else grad
