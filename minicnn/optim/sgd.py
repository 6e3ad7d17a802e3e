"""SGD with momentum, Nesterov momentum and L2 weight decay, PyTorch's rules.

For each parameter p with gradient g::

    g = g + weight_decay * p
    buf = g                                   (first step)
    buf = momentum * buf + (1 - dampening) * g  (later steps)
    g = g + momentum * buf   if nesterov else   buf
    p = p - lr * g
"""
from ..engines import engine_for
from .optimizer import Optimizer

__all__ = ["SGD"]


class SGD(Optimizer):
    _hyper = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)

    def _update(self, p, state):
        engine = engine_for(p.data) if self.momentum and p.data.flags.c_contiguous else None
        if engine == "cpu":                  # the same rule in one numba pass over the parameter
            from ..engines.cpu import sgd_update
            return sgd_update(self, p, state)
        if engine == "gpu":
            return self._update_gpu(p, state)
        g = p.grad
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += (1.0 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g

    def _update_gpu(self, p, state):
        """The same rule in one CUDA launch per parameter."""
        buf = state.get("momentum_buffer")
        first = buf is None
        if first:
            buf = state["momentum_buffer"] = self._xp(p).empty_like(p.data)
        from ..engines.gpu import kernels as gpu
        gpu.sgd_update(p.data, p.grad, buf, self._device_hyper(p.data.dtype), self.nesterov, first)

    def _device_hyper(self, dtype):
        """[lr, momentum, dampening, weight_decay] in device memory, where the kernel reads them."""
        return self._device_values(dtype, (self.lr, self.momentum, self.dampening, self.weight_decay))

    def _before_graph_replay(self):
        for dtype in self._on_device:
            self._device_hyper(dtype)
