"""The engines: the same layers, computed faster. One place decides which runs.

minicnn has two sides. ``minicnn/nn/`` is the textbook: each layer's forward and backward as
plain array code, checked against finite differences. This package is the speed:

* :mod:`.cpu` -- numba kernels on channels-last memory, Winograd 3x3 convolutions, whole conv
  blocks (Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d) run by threads in cache-sized chunks,
  reusable work memory;
* :mod:`.gpu` -- CUDA kernels (through CuPy), cuBLAS called directly, the same conv blocks on the
  GPU, and a training step replayed as a CUDA graph.

Each engine step names the textbook layers it replaces, reads their parameters and buffers
through their public attributes, keeps its own state, and is proven equal to them
(``minicnn gradcheck`` compares every engine with the textbook; so do the tests). The layers
never import this package: a :class:`~minicnn.nn.Sequential` asks its ``runner`` (set here, when
minicnn is imported) for the steps to run, and :func:`plan` answers::

    minicnn.engine("textbook")     # the textbook layers only, everywhere (what a learner reads)
    minicnn.engine("auto")         # the default: the CPU engine for NumPy arrays, the GPU engine for CuPy
    with minicnn.engines.using("textbook"): ...
    MINICNN_ENGINE=textbook python train.py

``auto`` falls back to the textbook for NumPy arrays when numba is not installed (it says so
once). A layer called on its own always runs its textbook code.
"""
import contextlib
import os
import warnings

__all__ = ["engine", "use", "using", "current", "engine_for", "plan", "steps", "step_for", "loss_step", "cpu_available",
           "ENGINES", "PerformanceWarning"]

ENGINES = ("auto", "textbook")


class PerformanceWarning(UserWarning):
    """Something in this process makes minicnn slower than it could be."""


def _from_environment():
    name = os.environ.get("MINICNN_ENGINE", "").strip().lower()
    if name:
        if name not in ENGINES:
            raise ValueError(f"MINICNN_ENGINE={name!r}: use one of {', '.join(ENGINES)}")
        return name
    # MINICNN_FAST=0 is the older spelling of MINICNN_ENGINE=textbook.
    fast = os.environ.get("MINICNN_FAST", "1").strip().lower()
    return "textbook" if fast in ("0", "false", "no", "off") else "auto"


_current = _from_environment()
_cpu_state = {}     # "available": bool, "why": str -- numba importable?


def use(name):
    """Select the engine ('auto' or 'textbook') for every Sequential from now on; returns the previous one."""
    global _current
    name = str(name).lower()
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
    previous, _current = _current, name
    return previous


def engine(name=None):
    """``minicnn.engine()``: the engine in use; ``minicnn.engine("textbook")`` selects one (see :func:`use`)."""
    return _current if name is None else use(name)


@contextlib.contextmanager
def using(name):
    """``with using("textbook"): ...`` runs the block on that engine."""
    previous = use(name)
    try:
        yield
    finally:
        use(previous)


def current():
    return _current


def cpu_available():
    """True when the CPU engine can run (numba imports); the reason is in the warning otherwise."""
    if "available" not in _cpu_state:
        try:
            import numba  # noqa: F401
        except Exception as exc:            # ImportError, or a broken llvmlite
            _cpu_state.update(available=False, why=f"{type(exc).__name__}: {exc}")
        else:
            _cpu_state.update(available=True, why="")
    return _cpu_state["available"]


def _warn_no_cpu_engine():
    if not _cpu_state.get("warned"):
        _cpu_state["warned"] = True
        warnings.warn(f"numba cannot be imported ({_cpu_state['why']}), so minicnn runs the textbook layers "
                      "on the CPU, 5-10x slower; install numba for the CPU engine", PerformanceWarning,
                      stacklevel=4)


def engine_for(x):
    """'cpu', 'gpu' or None (the textbook): the engine that takes array ``x`` now."""
    if _current == "textbook" or getattr(getattr(x, "dtype", None), "kind", "") != "f":
        return None
    module = type(x).__module__
    if module == "numpy":
        if cpu_available():
            return "cpu"
        _warn_no_cpu_engine()
        return None
    if module.startswith("cupy"):
        return "gpu"
    return None


def _rules(name):
    """The engine's (number of layers, test, step class) rules, longest first."""
    if name == "cpu":
        from .cpu import RULES
    else:
        from .gpu import RULES
    return RULES


def plan(sequential, x):
    """The steps a Sequential runs for input ``x``: each run of its layers that an engine step
    replaces, replaced; the other layers as they are. Steps are made once per run of layers and
    reused (they keep their work memory), and remembered for :func:`steps`."""
    layers = list(sequential._modules.values())
    name = engine_for(x)
    if name is None:
        return layers
    made = sequential.__dict__.setdefault("_engine_steps", {})
    out, i = [], 0
    rules = _rules(name)
    while i < len(layers):
        for size, test, make in rules:
            run = layers[i:i + size]
            if len(run) == size and test(run):
                key = (i, make)
                if key not in made or made[key][0] != run:
                    step = make(*run)
                    step.replaces = tuple(run)         # (the textbook layers it stands for)
                    made[key] = (run, step)
                out.append(made[key][1])
                i += size
                break
        else:
            out.append(layers[i])
            i += 1
    return out


def steps(model):
    """Every engine step a model's Sequentials have made so far (e.g. to find CUDA-graph hooks)."""
    found = []
    for m in model.modules():
        for _, step in m.__dict__.get("_engine_steps", {}).values():
            found.append(step)
    return found


def step_for(layer, model):
    """What ran ``layer`` in ``model``'s last forward pass: the engine step that replaced it, or the
    layer itself (e.g. to ask the GPU engine's dropout step for its mask)."""
    for m in model.modules():
        for step in m.__dict__.get("_last_plan") or ():
            if step is layer or layer in getattr(step, "replaces", ()):
                return step
    return layer


def loss_step(criterion, logits):
    """What computes ``criterion`` on ``logits``: the GPU engine's one-launch softmax cross-entropy
    for CuPy logits, the textbook criterion otherwise (and for any other loss, such as
    :class:`~minicnn.nn.DistillationLoss`, which runs its textbook code on either device)."""
    from ..nn.loss import CrossEntropyLoss
    if engine_for(logits) == "gpu" and type(criterion) is CrossEntropyLoss:
        from .gpu.layers import CrossEntropyStep
        step = criterion.__dict__.get("_engine_step")
        if step is None:
            step = criterion.__dict__["_engine_step"] = CrossEntropyStep(criterion)
        return step
    return criterion


def _install():
    from ..nn.module import Sequential
    Sequential.runner = staticmethod(plan)


_install()
