"""Gradient checks: the textbook layers against finite differences, the engines against the textbook.

For a module f and a fixed random upstream gradient g, the scalar
``L(x, params) = sum(f(x) * g)`` has dL/dx = f.backward(g) and dL/dparam =
param.grad. We estimate the same numbers with float64 central differences::

    dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / 2h                 mode="full"
    <dL/dx, d> ~ (L(x + h d) - L(x - h d)) / 2h                   mode="directional"

"full" perturbs every element (cost grows with the input: for small inputs);
"directional" checks the gradient along one random direction per tensor
(two forward passes per tensor, whatever its size; Chainer's idea). Both need
float64: in float32 the rounding error of L swamps the difference.

    from minicnn.gradcheck import check_module, format_report
    results = check_module(layer.double(), x.astype("float64"))
    print(format_report(results))

A layer called on its own runs its textbook code, so ``check_module(layer, x)`` checks what a
learner reads. The engines (minicnn/engines) are checked against those layers instead:
:func:`compare_engine` runs a Sequential of textbook layers once as written and once through an
engine, and compares output, dL/dx, every parameter gradient and every buffer (BatchNorm's
running statistics). :func:`check_all` (``minicnn gradcheck``) does both, for every layer and
every engine available here.
"""
import time
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module

__all__ = ["CheckResult", "GradcheckError", "numerical_gradient", "check_module", "check_loss",
           "assert_gradients", "format_report", "check_all", "compare_engine", "available_paths", "PATHS", "off_kink",
           "distinct_values"]

PATHS = ("textbook", "cpu", "gpu")


@dataclass
class CheckResult:
    """One tensor's check: where the analytic and numeric gradients differ most, and by how much."""
    layer: str
    tensor: str
    mode: str
    max_rel_error: float
    tolerance: float
    worst_index: tuple       # element with the largest difference (() for directional)
    analytic: float          # analytic value there (the directional derivative in that mode)
    numeric: float            # (for an engine row: the textbook's value)
    seconds: float
    path: str = "textbook"    # what was checked: the textbook layers, or the "cpu" / "gpu" engine

    @property
    def passed(self):
        return bool(self.max_rel_error <= self.tolerance)

    def __str__(self):
        where = f" at {self.worst_index}" if self.worst_index else ""
        return (f"[{self.path}] {self.layer} {self.tensor} [{self.mode}]: max rel error {self.max_rel_error:.2e} "
                f"(tol {self.tolerance:.0e}){where}: {'analytic' if self.path == 'textbook' else self.path} "
                f"{self.analytic:.6g} vs {'numeric' if self.path == 'textbook' else 'textbook'} {self.numeric:.6g} "
                f"-> {'ok' if self.passed else 'FAIL'}")


class GradcheckError(AssertionError):
    """Raised by :func:`assert_gradients`; the message lists every failing tensor."""


def _require_float64(a, what):
    if a.dtype != np.float64:
        raise ValueError(f"gradient checks need float64 ({what} is {a.dtype}): finite differences "
                         "in float32 are dominated by rounding; use module.double() and x.astype('float64')")


def numerical_gradient(f, x, h=1e-6):
    """Central differences of the scalar function ``f()`` w.r.t. every element of ``x`` (in place, restored)."""
    xp = get_array_module(x)
    grad = xp.zeros_like(x)
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient perturbs x in place: pass a C-contiguous array")
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(x.size):
        old = flat[i].item()
        flat[i] = old + h
        plus = f()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def _compare_full(analytic, numeric, floor):
    xp = get_array_module(analytic)
    if not numeric.size:
        return 0.0, (), 0.0, 0.0
    diff = xp.abs(analytic - numeric)
    # Relative to the largest gradient entry: robust where single entries are near zero.
    scale = max(float(xp.abs(numeric).max()), float(xp.abs(analytic).max()), floor)
    worst = int(diff.argmax())
    idx = tuple(int(i) for i in np.unravel_index(worst, analytic.shape))
    return float(diff.reshape(-1)[worst]) / scale, idx, float(analytic[idx]), float(numeric[idx])


def _check_tensor(layer, name, arr, analytic, loss_fn, mode, h, tol, atol, rng):
    """Compare ``analytic`` with finite differences of ``loss_fn`` w.r.t. ``arr`` (perturbed in place).

    The error is relative to the largest gradient entry, but never to less than
    ``atol / tol``: a gradient that is zero up to rounding passes when it is
    within ``atol`` of the numeric one.
    """
    xp = get_array_module(arr)
    floor = atol / tol
    t0 = time.perf_counter()
    if analytic is None:
        analytic = xp.zeros_like(arr)        # no gradient produced: it should be zero
    if analytic.shape != arr.shape:
        raise ValueError(f"{layer} {name}: gradient has shape {analytic.shape}, tensor has {arr.shape}")
    if mode == "full":
        numeric = numerical_gradient(loss_fn, arr, h)
        err, idx, a, n = _compare_full(analytic, numeric, floor)
    elif mode == "directional":
        d = xp.asarray(rng.standard_normal(arr.shape))
        d /= max(float(xp.sqrt((d * d).sum())), 1e-12)
        saved = arr.copy()
        arr += h * d
        plus = loss_fn()
        arr[...] = saved - h * d
        minus = loss_fn()
        arr[...] = saved
        n = (plus - minus) / (2 * h)
        a = float((analytic * d).sum())
        scale = max(abs(a), abs(n), float(xp.sqrt((analytic * analytic).sum())) * 1e-3, floor)
        err, idx = abs(a - n) / scale, ()
    else:
        raise ValueError(f"mode must be 'full' or 'directional', got {mode!r}")
    return CheckResult(layer, name, mode, err, tol, idx, a, n, time.perf_counter() - t0)


def check_module(module, x, dout=None, mode="full", h=1e-6, tol=1e-6, atol=1e-8, seed=0, params=True,
                 name=None):
    """Check dL/dx and every parameter gradient of ``module`` at input ``x``.

    The module runs in whatever mode it is in (train or eval); dropout masks are
    held fixed by restoring the random state before each forward pass, and
    buffers (BatchNorm running statistics) are restored afterwards. Returns a
    list of :class:`CheckResult`. ``x`` and the module must be float64.
    """
    _require_float64(x, "the input")
    from .engines import using
    with using("textbook"):          # (a Sequential inside runs its layers as written)
        return _check_module(module, x, dout, mode, h, tol, atol, seed, params, name)


def _check_module(module, x, dout, mode, h, tol, atol, seed, params, name):
    for pname, p in module.named_parameters():
        _require_float64(p.data, f"parameter {pname}")
    xp = get_array_module(x)
    # A stream of its own, so the upstream gradient never equals a user's default_rng(0) input.
    rng = np.random.default_rng((seed, 0x67726164))
    layer = name or type(module).__name__
    rng_state = module.rng_states()
    saved_state = module.state_dict()
    x = x.copy()
    try:
        out = module(x)
        if dout is None:
            dout = xp.asarray(rng.standard_normal(out.shape))
        module.zero_grad()
        dx = module.backward(dout)
        grads = {pname: (None if p.grad is None else p.grad.copy()) for pname, p in module.named_parameters()}
        dx = dx.copy()

        def loss():
            module.set_rng_states(rng_state)
            return float((module(x) * dout).sum())

        results = [_check_tensor(layer, "input", x, dx, loss, mode, h, tol, atol, rng)]
        if params:
            for pname, p in module.named_parameters():
                results.append(_check_tensor(layer, pname, p.data, grads[pname], loss, mode, h, tol, atol, rng))
    finally:
        module.load_state_dict(saved_state)
        module.set_rng_states(rng_state)
    return results


def check_loss(criterion, logits, labels, mode="full", h=1e-6, tol=1e-6, atol=1e-8, seed=0, teacher_probs=None):
    """Check ``criterion.backward()`` against finite differences of ``criterion.forward``
    (``teacher_probs``: the third argument of a :class:`~minicnn.nn.DistillationLoss`)."""
    _require_float64(logits, "the logits")
    logits = logits.copy()
    extra = () if teacher_probs is None else (teacher_probs,)
    criterion.forward(logits, labels, *extra)
    analytic = criterion.backward().copy()

    def loss():
        return float(criterion.forward(logits, labels, *extra))

    return [_check_tensor(type(criterion).__name__, "logits", logits, analytic, loss, mode, h, tol, atol,
                          np.random.default_rng((seed, 0x67726164)))]


def assert_gradients(results):
    """Raise :class:`GradcheckError` naming every failed tensor; return the results otherwise."""
    failed = [r for r in results if not r.passed]
    if failed:
        raise GradcheckError("gradient check failed:\n" + "\n".join(str(r) for r in failed))
    return results


def format_report(results):
    """A table: path, layer, tensor, mode, max relative error, tolerance, pass/fail, time."""
    head = (f"{'path':<10}{'layer':<32}{'tensor':<26}{'mode':<13}{'max rel err':>12}{'tol':>9}  {'result':<6}"
            f"{'time':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.path:<10}{r.layer:<32}{r.tensor:<26}{r.mode:<13}{r.max_rel_error:>12.2e}"
                     f"{r.tolerance:>9.0e}  {'pass' if r.passed else 'FAIL':<6}{r.seconds:>8.2f}s")
    return "\n".join(lines)


def off_kink(rng, shape, margin=0.05):
    """Random normal values pushed at least ``margin`` away from zero (no ReLU kinks)."""
    v = rng.standard_normal(shape)
    return np.where(v >= 0, v + margin, v - margin)


def distinct_values(rng, shape, gap=0.05):
    """Random array whose entries are pairwise at least ``gap`` apart (no max-pool ties)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) - n / 2) * gap




# --- the engines against the textbook ----------------------------------------------------------
def _max_rel_diff(a, b, floor):
    """max |a - b| relative to the largest entry of either (never to less than ``floor``), where."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf"), (), float("nan"), float("nan")
    if not a.size:
        return 0.0, (), 0.0, 0.0
    diff = np.abs(a - b)
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()), floor)
    worst = int(diff.argmax())
    idx = tuple(int(i) for i in np.unravel_index(worst, a.shape)) if a.ndim else ()
    return float(diff.reshape(-1)[worst]) / scale, idx, float(a.reshape(-1)[worst]), float(b.reshape(-1)[worst])


def _run(model, x, dout, backward):
    """Forward (and backward), returning every array to compare, by name, as NumPy."""
    from .backend import to_numpy
    from .nn.module import no_grad
    model.zero_grad()
    if backward:
        out = model(x)
        dx = model.backward(dout)
        got = {"output": to_numpy(out), "input": to_numpy(dx)}
        got.update({name: to_numpy(p.grad) if p.grad is not None else np.zeros(p.shape)
                    for name, p in model.named_parameters()})
    else:
        with no_grad():
            got = {"output": to_numpy(model(x))}
    got.update({name: to_numpy(b) for name, b in model.named_buffers() if name.endswith(("mean", "var"))})
    return got


def compare_engine(model, x, path, dout=None, backward=True, tol=1e-8, atol=1e-12, seed=0, name=None):
    """Run ``model`` (a Module made of textbook layers; float64) on ``x`` twice -- once as written, on
    NumPy, and once through engine ``path`` ('cpu': NumPy arrays, 'gpu': CuPy arrays) -- from the same
    parameters, buffers and random state, and compare the output, dL/dx, every parameter gradient and
    the BatchNorm running statistics. ``backward=False``: an inference forward under no_grad only.
    Returns a list of :class:`CheckResult` with ``path`` set and mode 'vs textbook'."""
    from .backend import to_device, to_numpy
    from .engines import using
    if path not in ("cpu", "gpu"):
        raise ValueError(f"compare_engine compares an engine ('cpu' or 'gpu'), got {path!r}")
    x = to_numpy(x)
    _require_float64(x, "the input")
    layer = name or type(model).__name__
    state, rng_state = model.state_dict(), model.rng_states()
    t0 = time.perf_counter()
    try:
        with using("textbook"):
            model.to("cpu")
            if dout is None and backward:
                out_shape = model(x).shape
                model.load_state_dict(state)
                model.set_rng_states(rng_state)
                dout = np.random.default_rng((seed, 0x656E67)).standard_normal(out_shape)
            want = _run(model, x, dout, backward)
        model.load_state_dict(state)
        model.set_rng_states(rng_state)
        device = "gpu" if path == "gpu" else "cpu"
        model.to(device)
        with using("auto"):
            got = _run(model, to_device(x, device), None if dout is None else to_device(dout, device), backward)
    finally:
        model.to("cpu")
        model.load_state_dict(state)
        model.set_rng_states(rng_state)
    seconds = (time.perf_counter() - t0) / max(1, len(want))
    results = []
    for key, ref in want.items():
        err, idx, a, b = _max_rel_diff(got[key], ref, atol / tol)
        results.append(CheckResult(layer, key, "vs textbook", err, tol, idx, a, b, seconds, path))
    return results


def _engine_cases(path, rng, seed):
    """(name, model, x, backward) for every engine step: each single-layer step, each block step on
    every route it can take (layer by layer, threads, Winograd, inference), and the whole network."""
    from . import nn
    from .models import EmotionClassifier
    from .rng import manual_seed

    def seq(*layers):
        return nn.Sequential(*layers)

    def bn_eval(c):
        bn = nn.BatchNorm2d(c).eval()
        bn.running_mean[:] = rng.uniform(-0.3, 0.3, c)
        bn.running_var[:] = rng.uniform(0.5, 2.0, c)
        return bn

    def block(c_in, c_out, training=True):
        bn = nn.BatchNorm2d(c_out) if training else bn_eval(c_out)
        return seq(nn.Conv2d(c_in, c_out, 3, 1, 1, seed=seed), bn, nn.ReLU(), nn.MaxPool2d(2)).train(training)

    cases = [
        ("Conv2d 3x3 s1 p1", seq(nn.Conv2d(3, 4, 3, 1, 1, seed=seed)), rng.standard_normal((2, 3, 6, 5)), True),
        ("Conv2d 2x2 s2 p0", seq(nn.Conv2d(2, 3, 2, 2, 0, seed=seed)), rng.standard_normal((2, 2, 6, 5)), True),
        ("BatchNorm2d train", seq(nn.BatchNorm2d(3)), rng.standard_normal((3, 3, 4, 4)) * 2 + 1, True),
        ("BatchNorm2d eval", seq(bn_eval(3)), rng.standard_normal((2, 3, 4, 4)), True),
        ("ReLU", seq(nn.ReLU()), off_kink(rng, (2, 3, 4, 5)), True),
        ("MaxPool2d 2x2", seq(nn.MaxPool2d(2)), distinct_values(rng, (2, 3, 6, 7)), True),
        ("Linear", seq(nn.Linear(6, 4, seed=seed)), rng.standard_normal((3, 6)), True),
        ("BatchNorm2d>ReLU>MaxPool2d train", seq(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)),
         rng.standard_normal((2, 3, 6, 6)), True),
        ("BatchNorm2d>ReLU>MaxPool2d eval", seq(bn_eval(3), nn.ReLU(), nn.MaxPool2d(2)).eval(),
         rng.standard_normal((2, 3, 6, 6)), True),
        ("conv block, 1 channel", block(1, 4), rng.standard_normal((3, 1, 8, 8)), True),
        ("conv block, im2col", block(4, 6), rng.standard_normal((3, 4, 8, 8)), True),
        ("conv block, Winograd", block(16, 8), rng.standard_normal((4, 16, 12, 12)), True),
        ("conv block, Winograd dW", block(64, 8), rng.standard_normal((3, 64, 12, 16)), True),
        ("conv block eval", block(16, 8, training=False), rng.standard_normal((4, 16, 12, 12)), True),
        ("conv block inference", block(16, 8, training=False), rng.standard_normal((4, 16, 12, 12)), False),
    ]
    if path == "gpu":
        cases.insert(5, ("Dropout (p=0) and BatchNorm2d>ReLU",
                         seq(nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.0)), off_kink(rng, (2, 3, 4, 4)), True))
    for training in (True, False):
        manual_seed(seed)
        model = EmotionClassifier(dropout=0.5 if path == "cpu" else 0.0).train(training)
        if not training:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean[:] = rng.standard_normal(m.num_features) * 0.1
                    m.running_var[:] = rng.uniform(0.5, 1.5, m.num_features)
        x = np.random.default_rng(seed).standard_normal((4, 1, 48, 48))
        cases.append((f"EmotionClassifier {'train' if training else 'eval'}", model, x, True))
    return [(name, model.double(), x, backward) for name, model, x, backward in cases]


def available_paths():
    """{path: None if it can be checked here, else why not}."""
    from .backend import gpu_available
    from .engines import cpu_available
    return {"textbook": None,
            "cpu": None if cpu_available() else "the CPU engine needs numba, which cannot be imported",
            "gpu": None if gpu_available() else "the GPU engine needs CuPy and an NVIDIA GPU"}


def check_all(device="cpu", include_model=True, seed=0, paths=None):
    """What ``minicnn gradcheck`` runs: the textbook layers, the loss and the whole EmotionClassifier
    against finite differences (float64, small shapes, on ``device``), then every engine in ``paths``
    (default: every one available here) against the textbook layers.

    Inputs are seeded and kept off ReLU kinks and max-pool ties, so a failure means a wrong backward
    pass. Returns the rows; :func:`format_report` prints them.
    """
    if paths is None:
        paths = [p for p, why in available_paths().items() if why is None]
    for p in paths:
        if p not in PATHS:
            raise ValueError(f"unknown path {p!r}: use {', '.join(PATHS)}")
    results = []
    if "textbook" in paths:
        results += _check_textbook(device, include_model, seed)
    for path in ("cpu", "gpu"):
        if path in paths:
            rng = np.random.default_rng((seed, 1))
            for name, model, x, backward in _engine_cases(path, rng, seed):
                if include_model or not name.startswith("EmotionClassifier"):
                    results += compare_engine(model, x, path, backward=backward, seed=seed, name=name)
            if path == "gpu":
                results += _compare_gpu_loss_and_dropout(rng, seed)
    return results


def _compare_gpu_loss_and_dropout(rng, seed):
    """The GPU engine's two steps whose textbook twin draws differently or is not a layer: the
    one-launch loss (against the textbook loss) and dropout (out = x * mask, dL/dx = g * mask, with
    the mask it made from its seed: 0 or 1 / (1 - p) everywhere)."""
    from . import nn
    from .backend import to_device, to_numpy
    from .engines import loss_step
    t0 = time.perf_counter()
    logits = rng.standard_normal((5, 7)) * 2
    labels = rng.integers(0, 7, 5)
    crit = nn.CrossEntropyLoss(weight=rng.uniform(0.5, 2, 7), label_smoothing=0.1)
    want_loss = float(crit.forward(logits, labels))
    want_grad = crit.backward()
    dev = to_device(logits, "gpu")
    step = loss_step(crit, dev)
    got_loss = float(step.forward(dev, labels))
    got_grad = to_numpy(step.backward())
    rows = []
    for tensor, a, b in (("loss", got_loss, want_loss), ("logits", got_grad, want_grad)):
        err, idx, va, vb = _max_rel_diff(a, b, 1e-4)
        rows.append(CheckResult("CrossEntropyLoss", tensor, "vs textbook", err, 1e-8, idx, va, vb,
                                time.perf_counter() - t0, "gpu"))
    layer = nn.Sequential(nn.Dropout(0.4, seed=seed)).double().to("gpu")
    x = to_device(rng.standard_normal((4, 50)), "gpu")
    g = to_device(rng.standard_normal((4, 50)), "gpu")
    out, dx = layer(x), layer.backward(g)
    step = layer._last_plan[0]
    mask = to_numpy(step.last_mask())
    scale = 1 / (1 - 0.4)
    bad = float(np.abs(np.where(np.isclose(mask, 0) | np.isclose(mask, scale), 0.0, 1.0)).max())
    for tensor, a, b in (("output", to_numpy(out), to_numpy(x) * mask), ("input", to_numpy(dx), to_numpy(g) * mask),
                         ("mask values", bad, 0.0)):
        err, idx, va, vb = _max_rel_diff(a, b, 1e-4)
        rows.append(CheckResult("Dropout (its own mask)", tensor, "vs textbook", err, 1e-8, idx, va, vb,
                                time.perf_counter() - t0, "gpu"))
    return rows


def _check_textbook(device, include_model, seed):
    from . import nn
    from .backend import to_device
    from .models import EmotionClassifier
    from .rng import manual_seed

    rng = np.random.default_rng(seed)
    bn_eval = nn.BatchNorm2d(3)
    bn_eval.running_mean[:] = [0.1, -0.2, 0.3]
    bn_eval.running_var[:] = [0.5, 1.5, 2.0]
    cases = [
        ("Conv2d 3x3 s1 p1", nn.Conv2d(2, 3, 3, 1, 1, seed=seed), rng.standard_normal((2, 2, 5, 5))),
        ("Conv2d 2x2 s2 p0", nn.Conv2d(2, 3, 2, 2, 0, seed=seed), rng.standard_normal((2, 2, 6, 5))),
        ("BatchNorm2d train", nn.BatchNorm2d(3), rng.standard_normal((3, 3, 4, 4)) * 2 + 1),
        ("BatchNorm2d eval", bn_eval.eval(), rng.standard_normal((2, 3, 4, 4))),
        ("ReLU", nn.ReLU(), off_kink(rng, (3, 4, 5))),
        ("MaxPool2d 2x2", nn.MaxPool2d(2), distinct_values(rng, (2, 3, 6, 7))),
        ("Dropout train", nn.Dropout(0.4, seed=seed), rng.standard_normal((4, 6))),
        ("Flatten", nn.Flatten(), rng.standard_normal((2, 3, 2, 2))),
        ("Linear", nn.Linear(6, 4, seed=seed), rng.standard_normal((3, 6))),
    ]
    results = []
    for name, layer, x in cases:
        layer.to(device=device, dtype=np.float64)
        results += check_module(layer, to_device(x, device), name=name)
    crit = nn.CrossEntropyLoss(weight=rng.uniform(0.5, 2, 7), label_smoothing=0.1)
    results += check_loss(crit, to_device(rng.standard_normal((5, 7)) * 2, device), rng.integers(0, 7, 5))
    crit = nn.DistillationLoss(temperature=2.0, weight=0.6, label_smoothing=0.1)
    results += check_loss(crit, to_device(rng.standard_normal((5, 7)) * 2, device), rng.integers(0, 7, 5),
                          teacher_probs=to_device(rng.dirichlet(np.ones(7), 5), device))
    if include_model:
        for mode in ("train", "eval"):
            manual_seed(seed)
            model = EmotionClassifier().train(mode == "train").to(device=device, dtype=np.float64)
            x = to_device(np.random.default_rng(seed).standard_normal((2, 1, 48, 48)), device)
            results += check_module(model, x, mode="directional", name=f"EmotionClassifier {mode}")
    return results
