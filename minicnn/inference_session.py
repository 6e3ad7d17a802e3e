"""InferenceSession: a trained model frozen for prediction, one image or a batch at a time.

    session = model.compile_inference()          # or minicnn.InferenceSession(model)
    logits = session.run(x)                      # float32 (N, 1, 48, 48) -> (N, classes)

What compiling does, once, so that a call does only arithmetic:

* **BatchNorm folded into the conv before it.** In eval mode BatchNorm is a per-channel affine map
  with constants, so conv then BatchNorm is one conv (:func:`fold_batchnorm`)::

      s  = gamma / sqrt(running_var + eps)
      W' = W * s            (each output channel's filter scaled)
      b' = (b - running_mean) * s + beta

* **Each block's epilogue fused.** After the folded conv come + b', ReLU and max pooling; both
  adding a constant and ReLU are monotone, so they commute with the max:
  ``maxpool(relu(y + b')) = relu(maxpool(y) + b')``, which touches a quarter of the values.
* **Filters prepared**: the (K*K*C, OC) columns of im2col, or Winograd's transformed filters, made
  once instead of at every call; the first Linear's rows reordered to read the channels-last
  feature map directly (no transpose before Flatten).
* **Memory kept** for each batch size seen, and one check of the input's shape per call.
* **The CPU's threads**: a batch of many images is split into chunks, each taken by one thread
  through *all* the conv blocks while its data is in cache (one parallel region for the whole
  feature extractor); a batch of one or a few images is split within the image instead (numba's
  parallel loops, the BLAS's threads). See :mod:`minicnn.engines.cpu.inference`.
* **On a GPU** (the GPU engine, :mod:`minicnn.engines.gpu.inference`): Winograd convolutions whose
  output kernels also pool, add the bias and rectify (no im2col matrix, no full-size conv output),
  and from the second call with a batch size the whole forward replayed as one CUDA graph.

A session is a snapshot: it reads the model's weights when it is made (make a new one after
training further). Its results equal the model's eval-mode forward to float32 rounding (the tests
compare them, and gradcheck-style, the folding itself in float64). An output holding a NaN or
inf is recomputed by the model itself, so non-finite values behave exactly as the layers do.
Models the session cannot compile (other layers than Conv2d/BatchNorm2d/ReLU/MaxPool2d blocks,
Flatten, Linear, ReLU and Dropout; on a GPU, also other convs than 3x3 stride 1, or with the
textbook engine chosen) run the model's own eval forward (``session.route``: "cpu", "gpu" or
"model").
"""
import numpy as np

from .backend import device_of, get_array_module, to_device
from .nn import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, no_grad

__all__ = ["InferenceSession", "fold_batchnorm", "compile_plan"]


def fold_batchnorm(weight, bias, bn):
    """(W', b') of the one conv equal to conv(W, b) then ``bn`` in eval mode (computed in float64,
    returned in the weight's dtype)::

        s = gamma / sqrt(running_var + eps),  W' = W * s,  b' = (b - running_mean) * s + beta
    """
    xp = get_array_module(weight)
    s = bn.weight.data.astype(np.float64) / xp.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    b = xp.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    w = weight.astype(np.float64) * s.reshape(-1, *([1] * (weight.ndim - 1)))
    b = (b - bn.running_mean.astype(np.float64)) * s + bn.bias.data.astype(np.float64)
    return w.astype(weight.dtype), b.astype(weight.dtype)


def _leaves(module):
    if not module._modules:
        return [module]
    return [leaf for child in module._modules.values() for leaf in _leaves(child)]


def compile_plan(model):
    """The model as a list of folded operations, or None where it has a layer the session does not
    know. Each is ('conv', W, b, stride, padding, pool) -- conv, bias, ReLU, max pooling -- or
    ('flatten',) or ('linear', W, b, relu)."""
    layers = [m for m in _leaves(model) if not isinstance(m, Dropout)]    # (identity in eval mode)
    plan, i = [], 0
    while i < len(layers):
        layer = layers[i]
        if type(layer) is Conv2d:
            w, b = layer.weight.data, None if layer.bias is None else layer.bias.data
            j = i + 1
            if j < len(layers) and type(layers[j]) is BatchNorm2d:
                w, b = fold_batchnorm(w, b, layers[j])
                j += 1
            if b is None:
                b = get_array_module(w).zeros(w.shape[0], w.dtype)
            if j + 1 < len(layers) and type(layers[j]) is ReLU and type(layers[j + 1]) is MaxPool2d and \
                    layers[j + 1].stride == layers[j + 1].kernel_size and not getattr(layers[j + 1], "padding", 0):
                plan.append(("conv", w, b, layer.stride, layer.padding, layers[j + 1].kernel_size))
                i = j + 2
                continue
            return None
        if type(layer) is Flatten:
            plan.append(("flatten",))
        elif type(layer) is Linear:
            relu = i + 1 < len(layers) and type(layers[i + 1]) is ReLU
            plan.append(("linear", layer.weight.data, None if layer.bias is None else layer.bias.data, relu))
            i += 1 if relu else 0
        else:
            return None
        i += 1
    return plan


class InferenceSession:
    def __init__(self, model, input_shape=None):
        """``model``: a trained model (e.g. an EmotionClassifier); ``input_shape``: (C, H, W) of one
        input (default: the model's ``input_shape``)."""
        self.model = model
        self.input_shape = tuple(input_shape or getattr(model, "input_shape", ()))
        if len(self.input_shape) != 3:
            raise ValueError("InferenceSession needs the input shape (C, H, W): pass input_shape=")
        self.dtype = model.dtype
        self.device = device_of(model.parameters()[0].data)
        self.num_classes = getattr(model, "num_classes", None)
        plan = compile_plan(model)
        self._cpu = self._gpu = None
        if plan is not None:
            from . import engines
            if self.device == "cpu" and engines.cpu_available():
                from .engines.cpu.inference import CpuInference
                self._cpu = CpuInference(plan, self.input_shape, self.dtype)
            elif self.device == "gpu" and engines.current() == "auto":
                from .engines.gpu.inference import compile_gpu
                self._gpu = compile_gpu(plan, self.input_shape, self.dtype)
        self.route = "cpu" if self._cpu is not None else "gpu" if self._gpu is not None else "model"

    def __repr__(self):
        return f"InferenceSession({type(self.model).__name__}, input {self.input_shape}, route={self.route!r})"

    def _check(self, x):
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 4 or tuple(shape[1:]) != self.input_shape:
            raise ValueError(f"InferenceSession expects input of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(shape) if shape is not None else type(x).__name__}")
        if x.dtype != self.dtype:
            raise ValueError(f"InferenceSession expects {self.dtype} input, got {x.dtype}")

    def run(self, x):
        """Logits for a batch ``x`` of shape (N, C, H, W)."""
        self._check(x)
        if self._cpu is not None and device_of(x) == "cpu":
            out = self._cpu.run(x)
            if np.isfinite(out).all():
                return out
        elif self._gpu is not None:
            out = self._gpu.run(to_device(x, "gpu"))
            if bool(get_array_module(out).isfinite(out).all()):
                return out
        return self._model_forward(x)

    __call__ = run

    def _model_forward(self, x):
        was_training = self.model.training
        self.model.eval()
        try:
            with no_grad():
                return self.model(to_device(x, self.device))
        finally:
            self.model.train(was_training)
