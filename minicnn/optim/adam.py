"""Adam and AdamW, PyTorch's rules.

For each parameter p with gradient g, at step t (counted per parameter)::

    g = g + weight_decay * p                     (Adam: L2 penalty in the gradient)
    p = p * (1 - lr * weight_decay)              (AdamW: decoupled decay instead)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""
import math

from ..engines import engine_for
from .optimizer import Optimizer

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    _hyper = ("lr", "beta1", "beta2", "eps", "weight_decay")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    @property
    def betas(self):
        return (self.beta1, self.beta2)

    def _update(self, p, state):
        xp = self._xp(p)
        if engine_for(p.data) == "gpu" and p.data.flags.c_contiguous:
            return self._update_gpu(p, state, xp)
        g = p.grad
        if self.weight_decay:
            if self._decoupled:
                p.data *= 1.0 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p.data
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * g * g
        step_size = self.lr / (1.0 - self.beta1 ** t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - self.beta2 ** t) + self.eps
        p.data -= step_size * (m / denom)

    def _update_gpu(self, p, state, xp):
        """The same rule in one CUDA launch per parameter; the step's numbers go to device memory,
        where the kernel reads them (so a CUDA graph of the step sees each new step)."""
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        from ..engines.gpu import kernels as gpu
        if not gpu.capturing():                # (a replay counts its step in _before_graph_replay)
            state["step"] += 1
        gpu.adam_update(p.data, p.grad, state["exp_avg"], state["exp_avg_sq"],
                        self._device_hyper(p.data.dtype, state["step"]))

    def _device_hyper(self, dtype, t):
        """[beta1, beta2, eps, step_size, root_bc2, l2, decay] of step t in device memory."""
        wd = self.weight_decay
        return self._device_values(dtype, (self.beta1, self.beta2, self.eps, self.lr / (1.0 - self.beta1 ** t),
                                           math.sqrt(1.0 - self.beta2 ** t), 0.0 if self._decoupled else wd,
                                           self.lr * wd if self._decoupled else 0.0))

    def _before_graph_replay(self):
        """A graph replay does not call step(): count the step and copy its numbers to the device."""
        for p, state in zip(self.params, self.state):
            if "step" in state:
                state["step"] += 1
                self._device_hyper(p.data.dtype, state["step"])


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01, as in PyTorch)."""
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
