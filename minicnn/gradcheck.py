"""Gradient checks: compare a layer's backward pass with finite differences.

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
"""
import time
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module

__all__ = ["CheckResult", "GradcheckError", "numerical_gradient", "check_module", "check_loss",
           "assert_gradients", "format_report", "check_all", "off_kink", "distinct_values"]


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
    numeric: float
    seconds: float

    @property
    def passed(self):
        return bool(self.max_rel_error <= self.tolerance)

    def __str__(self):
        where = f" at {self.worst_index}" if self.worst_index else ""
        return (f"{self.layer} {self.tensor} [{self.mode}]: max rel error {self.max_rel_error:.2e} "
                f"(tol {self.tolerance:.0e}){where}: analytic {self.analytic:.6g} vs numeric "
                f"{self.numeric:.6g} -> {'ok' if self.passed else 'FAIL'}")


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


def check_loss(criterion, logits, labels, mode="full", h=1e-6, tol=1e-6, atol=1e-8, seed=0):
    """Check ``criterion.backward()`` against finite differences of ``criterion.forward``."""
    _require_float64(logits, "the logits")
    logits = logits.copy()
    criterion.forward(logits, labels)
    analytic = criterion.backward().copy()

    def loss():
        return float(criterion.forward(logits, labels))

    return [_check_tensor(type(criterion).__name__, "logits", logits, analytic, loss, mode, h, tol, atol,
                          np.random.default_rng((seed, 0x67726164)))]


def assert_gradients(results):
    """Raise :class:`GradcheckError` naming every failed tensor; return the results otherwise."""
    failed = [r for r in results if not r.passed]
    if failed:
        raise GradcheckError("gradient check failed:\n" + "\n".join(str(r) for r in failed))
    return results


def format_report(results):
    """A table: layer, tensor, mode, max relative error, tolerance, pass/fail, time."""
    head = f"{'layer':<26}{'tensor':<26}{'mode':<13}{'max rel err':>12}{'tol':>9}  {'result':<6}{'time':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.layer:<26}{r.tensor:<26}{r.mode:<13}{r.max_rel_error:>12.2e}{r.tolerance:>9.0e}  "
                     f"{'pass' if r.passed else 'FAIL':<6}{r.seconds:>8.2f}s")
    return "\n".join(lines)


def off_kink(rng, shape, margin=0.05):
    """Random normal values pushed at least ``margin`` away from zero (no ReLU kinks)."""
    v = rng.standard_normal(shape)
    return np.where(v >= 0, v + margin, v - margin)


def distinct_values(rng, shape, gap=0.05):
    """Random array whose entries are pairwise at least ``gap`` apart (no max-pool ties)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) - n / 2) * gap


def check_all(device="cpu", include_model=True, seed=0):
    """Gradient checks of every layer, the loss and the whole EmotionClassifier (float64, small shapes).

    This is what ``minicnn gradcheck`` runs. Inputs are seeded and kept off
    ReLU kinks and max-pool ties, so a failure means a wrong backward pass.
    """
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
    from .nn import CrossEntropyLoss
    crit = CrossEntropyLoss(weight=rng.uniform(0.5, 2, 7), label_smoothing=0.1)
    results += check_loss(crit, to_device(rng.standard_normal((5, 7)) * 2, device), rng.integers(0, 7, 5))
    if include_model:
        for mode in ("train", "eval"):
            manual_seed(seed)
            model = EmotionClassifier().train(mode == "train").to(device=device, dtype=np.float64)
            x = to_device(np.random.default_rng(seed).standard_normal((2, 1, 48, 48)), device)
            results += check_module(model, x, mode="directional", name=f"EmotionClassifier {mode}")
    return results
