"""The building blocks every layer shares: Parameter, Module and Sequential.

A layer is a :class:`Module` with two methods:

* ``forward(x)`` computes the output and caches what the backward pass needs;
* ``backward(dout)`` takes dL/d(output), returns dL/d(input) and adds each
  parameter's gradient into ``param.grad``.

There is no autograd: a model's backward is its layers' backwards in reverse.
Gradients accumulate (``grad += ...``) like PyTorch's, so call ``zero_grad()``
(or the optimizer's) between steps.
"""
import contextlib
import threading
from collections import OrderedDict, namedtuple

import numpy as np

from ..backend import device_of, float_dtype, to_device, to_numpy

__all__ = ["Parameter", "Module", "Sequential", "check_input", "uniform_init", "no_grad", "is_grad_enabled"]

_grad_mode = threading.local()


def is_grad_enabled():
    """False inside ``with no_grad():`` (in this thread)."""
    return getattr(_grad_mode, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Forward passes in this block need no backward, like ``torch.no_grad()``.

    A promise, not a mode of the math: results are the same. What runs the
    layers may then skip what it would keep for backward (minicnn/engines runs
    each eval-mode Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d block as a leaner
    pipeline that keeps nothing), and a backward through such a forward raises
    an error. Evaluation and prediction use it.
    """
    previous = is_grad_enabled()
    _grad_mode.enabled = False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


class Parameter:
    """A trainable array: the values in ``.data``, dL/d(data) in ``.grad`` (None until backward)."""

    def __init__(self, data):
        self.data = data
        self.grad = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    def accumulate_grad(self, g):
        """Add ``g`` to ``.grad`` (takes ``g`` itself the first time: callers pass a fresh array)."""
        if self.grad is None:
            self.grad = g
        else:
            self.grad += g

    def __repr__(self):
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}, device={device_of(self.data)})"


def _shape_str(shape):
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_input(module, x, expected, dtype=None):
    """Raise a clear ValueError unless ``x`` is a floating array shaped like ``expected``.

    ``expected`` lists each dimension: an int must match exactly, a string
    ("N", "H", ...) matches any size; ``None`` accepts any shape. ``dtype``, when given, must match too
    (a layer's input must share its parameters' dtype).
    """
    name = module.__class__.__name__
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "dtype"):
        raise ValueError(f"{name} expects an array"
                         + (f" of shape {_shape_str(expected)}" if expected is not None else "")
                         + f", got {type(x).__name__}")
    if expected is None:
        pass
    elif len(shape) != len(expected) or any(
            isinstance(e, int) and e != s for e, s in zip(expected, shape)):
        raise ValueError(f"{name} expects input of shape {_shape_str(expected)}, "
                         f"got {_shape_str(shape)}")
    if x.dtype.kind != "f":
        raise ValueError(f"{name} expects a float32 or float64 array, got dtype {x.dtype} "
                         f"(convert with x.astype('float32'))")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} has {dtype} parameters but got a {x.dtype} input; "
                         f"convert the input or call model.to(dtype={str(x.dtype)!r})")


class LoadReport(namedtuple("LoadReport", ["missing_keys", "unexpected_keys", "mismatched_keys"])):
    """What ``load_state_dict(strict=False)`` did not load (all empty for a strict load)."""


class Module:
    """Base class: holds parameters, buffers and sub-modules, and walks them by name.

    Assigning a :class:`Parameter` or a :class:`Module` to an attribute registers
    it, so names follow attribute names (``features.0.weight``) as in PyTorch.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # --- registration ---------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"call Module.__init__() in {type(self).__name__}.__init__ "
                                 "before assigning attributes")
        for store in (self._parameters, self._buffers, self._modules):
            store.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Only called when normal lookup fails: look in the registries.
        for store in ("_parameters", "_buffers", "_modules"):
            d = self.__dict__.get(store)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_buffer(self, name, array):
        """A state array that is saved in ``state_dict`` but not trained (e.g. running_mean)."""
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    def set_buffer(self, name, array):
        """Replace a registered buffer's array."""
        if name not in self._buffers:
            raise KeyError(f"{type(self).__name__} has no buffer {name!r}")
        self._buffers[name] = array

    # --- running ----------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def backward(self, dout):
        raise NotImplementedError(f"{type(self).__name__} does not define backward()")

    def backward_params(self, dout):
        """Fill parameter gradients only; the first layer of a network needs no dL/dx.

        Layers that can skip the input gradient's work (Conv2d, Linear) override this.
        """
        self.backward(dout)

    def __call__(self, x):
        return self.forward(x)

    def _saved(self):
        """The forward cache, handed to backward once (a second backward for one forward pass would add
        every gradient twice: PyTorch refuses it too), or a clear error."""
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() was called before forward(): "
                               "run a forward pass first")
        if cache is self.__dict__.get("_spent_cache"):
            raise RuntimeError(f"{type(self).__name__}.backward() was called twice for one forward pass (the "
                               "gradients would be added twice): run a forward pass first")
        object.__setattr__(self, "_spent_cache", cache)     # (each forward makes a new cache object)
        return cache

    def check_grad(self, dout, out_shape):
        """A clear error unless the upstream gradient ``dout`` has the output's shape."""
        if tuple(dout.shape) != tuple(out_shape):
            raise ValueError(f"{type(self).__name__}.backward expects a gradient of the output's "
                             f"shape {_shape_str(out_shape)}, got {_shape_str(dout.shape)}")

    def train(self, mode=True):
        """Training mode (batch statistics, dropout on); returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        """Evaluation mode (running statistics, dropout off); returns self."""
        return self.train(False)

    # --- walking ----------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def children(self):
        return list(self._modules.values())

    def named_parameters(self, prefix=""):
        for mname, m in self.named_modules(prefix):
            for pname, p in m._parameters.items():
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for mname, m in self.named_modules(prefix):
            for bname, b in m._buffers.items():
                yield (f"{mname}.{bname}" if mname else bname), b

    def num_parameters(self):
        """Number of trainable scalars."""
        return int(sum(p.size for p in self.parameters()))

    def zero_grad(self):
        """Forget all gradients (sets ``grad`` to None, like PyTorch's default)."""
        for p in self.parameters():
            p.grad = None

    # --- device and dtype -------------------------------------------------------
    @property
    def device(self):
        params = self.parameters()
        return device_of(params[0].data) if params else "cpu"

    @property
    def dtype(self):
        params = self.parameters()
        return params[0].data.dtype if params else np.dtype(np.float32)

    def to(self, device=None, dtype=None):
        """Move parameters and buffers to ``device`` ('cpu', or another device name: see minicnn.backend)
        and/or cast to ``dtype``."""
        dt = float_dtype(dtype) if dtype is not None else None

        def move(a):
            if dt is not None and a.dtype.kind == "f":
                a = a.astype(dt)
            return to_device(a, device) if device is not None else a

        for m in self.modules():
            for p in m._parameters.values():
                p.data = move(p.data)
                if p.grad is not None:
                    p.grad = move(p.grad)
            for name, b in list(m._buffers.items()):
                m._buffers[name] = move(b)
            m._move_extra(device)
        return self

    def _move_extra(self, device):
        """Hook for modules holding other per-device state."""

    def float(self):
        return self.to(dtype=np.float32)

    def double(self):
        return self.to(dtype=np.float64)

    # --- state ------------------------------------------------------------------
    def state_dict(self):
        """Parameters and buffers as NumPy arrays, named and shaped as in PyTorch."""
        sd = OrderedDict()
        for mname, m in self.named_modules():
            for pname, p in m._parameters.items():
                sd[f"{mname}.{pname}" if mname else pname] = to_numpy(p.data).copy()
            for bname, b in m._buffers.items():
                sd[f"{mname}.{bname}" if mname else bname] = to_numpy(b).copy()
        return sd

    # Entries that may be absent from a state dict being loaded (older PyTorch files).
    _optional_state = ("num_batches_tracked",)

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays from ``state_dict`` (NumPy, or anything with ``.numpy()``).

        Everything is checked and converted before anything changes: missing,
        unexpected and mis-shaped entries, values that are not numbers (object
        arrays, None) and values that overflow the model's dtype are all named in
        one ValueError, and the model is left as it was.

        With ``strict=False`` (fine-tuning: a new head for other classes) missing
        and unexpected keys, and entries whose shape differs from the model's,
        are skipped instead; the rest is loaded. Returns what was not loaded:
        ``LoadReport(missing_keys, unexpected_keys, mismatched_keys)``.
        """
        targets = {}
        for mname, m in self.named_modules():
            for pname, p in m._parameters.items():
                targets[f"{mname}.{pname}" if mname else pname] = (m, "param", pname, p.data)
            for bname, b in m._buffers.items():
                targets[f"{mname}.{bname}" if mname else bname] = (m, "buffer", bname, b)

        def as_numpy(v):
            if hasattr(v, "detach"):     # a torch tensor, without importing torch
                v = v.detach().cpu().numpy()
            return to_numpy(v)

        given, problems = {}, []
        for k, v in state_dict.items():
            try:
                given[k] = as_numpy(v)
            except Exception as exc:                 # (anything that is not an array)
                problems.append(f"{k}: not an array ({type(exc).__name__}: {exc})")
        missing = [k for k in targets if k not in given
                   and not k.rsplit(".", 1)[-1] in self._optional_state]
        unexpected = [k for k in given if k not in targets]
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        converted, mismatched = {}, []
        for k, v in given.items():
            if k not in targets:
                continue
            old = targets[k][3]
            if tuple(v.shape) != tuple(old.shape):
                if strict:
                    problems.append(f"{k}: expected {_shape_str(old.shape)}, got {_shape_str(v.shape)}")
                else:
                    mismatched.append(f"{k}: model {_shape_str(old.shape)}, given {_shape_str(v.shape)}")
            elif v.dtype.kind not in "biuf":
                problems.append(f"{k}: expected numbers, got dtype {v.dtype}")
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    new = np.array(v, dtype=old.dtype, copy=True)
                if old.dtype.kind in "iu" and not np.array_equal(new, v):
                    problems.append(f"{k}: values do not fit {old.dtype}")
                elif old.dtype.kind == "f" and (np.isfinite(v) & ~np.isfinite(new)).any():
                    problems.append(f"{k}: values overflow {old.dtype} (largest {np.abs(v).max():.3g})")
                else:
                    converted[k] = new
        if problems:
            raise ValueError(f"cannot load state dict into {type(self).__name__}: "
                             + " | ".join(problems) + " (nothing was changed)")
        device = self.device
        for k, new in converted.items():             # everything is checked and converted: now assign
            m, kind, name, _ = targets[k]
            new = to_device(new, device)
            if kind == "param":
                m._parameters[name].data = new
                m._parameters[name].grad = None
            else:
                m._buffers[name] = new
        return LoadReport(missing if not strict else [], unexpected if not strict else [], mismatched)

    # --- random state (dropout masks) ---------------------------------------------
    def rng_states(self):
        """The state of every random generator in the model, by module name (JSON-able)."""
        return {name: m.get_rng_state() for name, m in self.named_modules()
                if hasattr(m, "get_rng_state")}

    def set_rng_states(self, states):
        """Restore what :meth:`rng_states` returned."""
        mods = dict(self.named_modules())
        for name, state in states.items():
            mods[name].set_rng_state(state)

    # --- printing -----------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        if self._modules:
            for name, m in self._modules.items():
                sub = repr(m).replace("\n", "\n  ")
                lines.append(f"  ({name}): {sub}")
            return "\n".join(lines) + "\n)"
        return lines[0] + ")"


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``Sequential.runner(seq, x)`` chooses the steps to run for input ``x``. By default it is the
    layers themselves; minicnn's engines (minicnn/engines, set when minicnn is imported) may
    replace runs of layers by steps that compute the same thing faster. The layers never know.
    """

    runner = None      # a function (sequential, x) -> the steps to run; None: the layers

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, got {type(layer).__name__} at position {i}")
            setattr(self, str(i), layer)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        layers = list(self._modules.values())
        plan = layers if Sequential.runner is None else Sequential.runner(self, x)
        object.__setattr__(self, "_last_plan", plan)
        object.__setattr__(self, "_backward_pending", True)
        for layer in plan:
            x = layer(x)
        return x

    def backward(self, dout, input_grad=True):
        """Backward through the layers in reverse; ``input_grad=False`` skips dL/dx of the first."""
        layers = self.__dict__.get("_last_plan")
        if layers is None or not self.__dict__.get("_backward_pending"):
            raise RuntimeError("Sequential.backward() was called " + ("before forward()" if layers is None else
                               "twice for one forward pass (the gradients would be added twice)")
                               + ": run a forward pass first")
        object.__setattr__(self, "_backward_pending", False)      # (one backward per forward)
        for layer in reversed(layers[1:]):
            dout = layer.backward(dout)
        if not layers:
            return dout
        if input_grad:
            return layers[0].backward(dout)
        layers[0].backward_params(dout)
        return None


def uniform_init(rng, shape, bound, dtype=np.float32):
    """U(-bound, bound) drawn on the CPU (the same numbers whatever the device)."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)

