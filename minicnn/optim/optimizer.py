"""The optimizer base: a list of parameters, per-parameter state, and save/load."""
import math

import numpy as np

from ..backend import device_of, get_array_module, to_device, to_numpy
from ..nn.module import Parameter

__all__ = ["Optimizer"]


class Optimizer:
    """Holds ``params`` (a list of :class:`Parameter`) and their state arrays.

    Subclasses implement ``_update(p, state)`` for one parameter whose ``grad``
    is set; parameters without a gradient are skipped (as in PyTorch).
    """

    # Hyper-parameters saved in state_dict (subclasses extend).
    _hyper = ("lr",)

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"optimizer expects Parameters (model.parameters()), got "
                                f"{type(p).__name__} at position {i}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"invalid learning rate {lr!r}: a finite number >= 0")
        self.lr = float(lr)
        self.lr_scales = [1.0] * len(self.params)     # per parameter: its rate is lr * scale (fine-tuning)
        self.state = [dict() for _ in self.params]
        self._on_device = {}          # dtype -> numbers the GPU update kernels read (_device_values)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def set_lr_scale(self, params, scale):
        """Train ``params`` (a subset of this optimizer's) at ``scale`` times the learning rate, e.g. the
        pretrained features at 0.1 while a new head learns at the full rate."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"a learning-rate scale must be a finite number >= 0, got {scale!r}")
        ids = {id(p) for p in params}
        for i, p in enumerate(self.params):
            if id(p) in ids:
                self.lr_scales[i] = float(scale)

    def step(self):
        base = self.lr
        try:
            for p, state, scale in zip(self.params, self.state, self.lr_scales):
                if p.grad is None:
                    continue
                if p.grad.shape != p.data.shape:
                    raise ValueError(f"gradient of shape {p.grad.shape} for a parameter of shape {p.data.shape}")
                self.lr = base * scale
                self._update(p, state)
        finally:
            self.lr = base

    def _update(self, p, state):
        raise NotImplementedError

    def _device_values(self, dtype, values):
        """``values`` (the numbers a GPU update kernel reads: learning rate, ...) in a small device
        array of ``dtype``, copied over only when one changed, so a CUDA graph of the step sees new
        ones. While a graph is captured the array is returned as it is: each replay writes it first,
        in the subclass's ``_before_graph_replay``."""
        from ..engines.gpu import kernels as gpu
        if dtype not in self._on_device:
            self._on_device[dtype] = gpu.DeviceValues(dtype)
        if gpu.capturing():
            return self._on_device[dtype].array
        return self._on_device[dtype].set(values)

    def _before_graph_replay(self):
        """Bring what the update kernels read up to date: a replayed CUDA graph does not call step()."""

    # --- save / load: flat dicts of NumPy arrays (npz-friendly, no pickle) -------
    def state_dict(self):
        sd = {f"hyper.{k}": np.asarray(getattr(self, k)) for k in self._hyper}
        for i, state in enumerate(self.state):
            for name, v in state.items():
                sd[f"state.{i}.{name}"] = to_numpy(v).copy() if hasattr(v, "shape") else np.asarray(v)
        return sd

    def load_state_dict(self, sd):
        new_state = [dict() for _ in self.params]
        for key, v in sd.items():
            parts = key.split(".")
            if parts[0] == "state" and len(parts) == 3 and parts[1].isdigit():
                i = int(parts[1])
                if i >= len(self.params):
                    raise ValueError(f"optimizer state has entry {key!r} but there are only "
                                     f"{len(self.params)} parameters")
                p = self.params[i]
                v = np.asarray(v)
                if v.ndim:       # an array slot: must match its parameter
                    if v.shape != p.data.shape:
                        raise ValueError(f"optimizer state {key!r} has shape {v.shape}, "
                                         f"parameter has {p.data.shape}")
                    v = to_device(v.astype(p.data.dtype), device_of(p.data))
                else:
                    v = v.item()
                new_state[i][parts[2]] = v
            elif not (parts[0] == "hyper" and len(parts) == 2 and parts[1] in self._hyper):
                raise ValueError(f"unexpected optimizer state entry {key!r}")
        for k in self._hyper:
            if f"hyper.{k}" in sd:
                setattr(self, k, np.asarray(sd[f"hyper.{k}"]).item())
        self.state = new_state

    def _xp(self, p):
        return get_array_module(p.data)
