"""The textbook side: minicnn/nn is plain array code, runs without numba, matches the naive loops,
and every one-line break of a backward pass makes the default ``minicnn gradcheck`` fail."""
import ast
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import minicnn
from minicnn import nn
from minicnn.nn import reference as ref

from conftest import distinct_values, off_kink

PACKAGE = os.path.dirname(minicnn.__file__)
NN = os.path.join(PACKAGE, "nn")


# --- nothing but the textbook in minicnn/nn -----------------------------------------------------------
def test_the_textbook_files_hold_no_engine_words():
    words = re.compile(r"numba|cupy|cuda|fast[ _-]?path|_fast\b|fast_kernels|gpu_kernels|cpu_kernels|workspace",
                       re.IGNORECASE)
    for path in sorted(glob.glob(os.path.join(NN, "*.py"))):
        for number, line in enumerate(open(path), 1):
            assert not words.search(line), f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}"


def test_the_textbook_imports_no_engine():
    for path in sorted(glob.glob(os.path.join(NN, "*.py"))):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert "engines" not in module and "numba" not in module, f"{path} imports {module}"
            elif isinstance(node, ast.Import):
                assert not any("numba" in a.name or "engines" in a.name for a in node.names), path


BLOCK_NUMBA = """
import sys
class _NoNumba:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numba", "llvmlite"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _NoNumba())
"""


def _run_python(code, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def test_the_textbook_runs_without_numba(tmp_path):
    """Train a step, predict a face with the shipped weights and gradcheck, with numba's import blocked."""
    from PIL import Image
    face = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60), dtype=np.uint8)).save(face)
    code = BLOCK_NUMBA + f"""
import numpy as np, minicnn
from minicnn.models import EmotionClassifier
from minicnn.cli import main
m = EmotionClassifier()
c = minicnn.nn.CrossEntropyLoss()
loss = c.forward(m(np.random.rand(4, 1, 48, 48).astype('float32')), [0, 1, 2, 3])
m.backward(c.backward())
minicnn.optim.SGD(m.parameters(), lr=0.1, momentum=0.9).step()
assert main(["predict", {str(face)!r}]) == 0
assert main(["gradcheck", "--layers-only"]) == 0
assert 'numba' not in sys.modules
print("textbook ok")
"""
    out = _run_python(code, env={"MINICNN_ENGINE": "textbook"})
    assert out.returncode == 0, out.stderr
    assert "textbook ok" in out.stdout and "not checked: cpu" in out.stdout


def test_without_numba_auto_falls_back_to_the_textbook_and_says_so_once():
    code = BLOCK_NUMBA + """
import warnings, numpy as np, minicnn
from minicnn.models import EmotionClassifier
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    m = EmotionClassifier().eval()
    y = m(np.zeros((2, 1, 48, 48), np.float32)); m(np.zeros((2, 1, 48, 48), np.float32))
said = [str(w.message) for w in caught if issubclass(w.category, minicnn.engines.PerformanceWarning)]
assert len(said) == 1 and "numba" in said[0], said
print(y.shape)
"""
    out = _run_python(code, env={"MINICNN_ENGINE": "auto"})
    assert out.returncode == 0, out.stderr
    assert "(2, 7)" in out.stdout


def test_the_engine_switch():
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with minicnn.engines.using("textbook"):
        net(x)
        assert [type(s).__name__ for s in net._last_plan] == ["Conv2d", "ReLU"]
    with minicnn.engines.using("auto"):
        net(x)
        assert [type(s).__name__ for s in net._last_plan] == ["Conv2dStep", "ReLUStep"]
        assert net._last_plan[0].replaces == (net[0],)
        assert type(net[0](x)) is np.ndarray and net[0]._cache is not None    # alone: the textbook layer
    with pytest.raises(ValueError, match="unknown engine"):
        minicnn.engine("fast")
    out = _run_python("import minicnn; print(minicnn.engine())", env={"MINICNN_ENGINE": "textbook"})
    assert out.stdout.strip() == "textbook"
    out = _run_python("import minicnn; print(minicnn.engine())", env={"MINICNN_FAST": "0", "MINICNN_ENGINE": ""})
    assert out.stdout.strip() == "textbook"


def test_a_subclass_of_a_textbook_layer_is_never_replaced():
    """A learner's changed layer runs as written, whatever the engine."""
    class MyReLU(nn.ReLU):
        pass
    net = nn.Sequential(MyReLU())
    net(np.ones((2, 3), np.float32))
    assert type(net._last_plan[0]) is MyReLU


# --- the textbook against the naive loops ----------------------------------------------------------
def test_relu_and_linear_equal_their_loops():
    rng = np.random.default_rng(0)
    x, g = off_kink(rng, (3, 5)), rng.standard_normal((3, 5))
    relu = nn.ReLU()
    np.testing.assert_array_equal(relu(x), ref.relu_forward(x))
    np.testing.assert_array_equal(relu.backward(g), ref.relu_backward(g, x))
    lin = nn.Linear(5, 4, seed=0).double()
    x, g = rng.standard_normal((3, 5)), rng.standard_normal((3, 4))
    np.testing.assert_allclose(lin(x), ref.linear_forward(x, lin.weight.data, lin.bias.data), rtol=1e-12)
    dx = lin.backward(g)
    rdx, rdw, rdb = ref.linear_backward(g, x, lin.weight.data)
    for a, b in ((dx, rdx), (lin.weight.grad, rdw), (lin.bias.grad, rdb)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_dropout_equals_its_loop_with_the_same_draws():
    d = nn.Dropout(0.3, seed=5)
    x = np.random.default_rng(0).standard_normal((4, 6))
    state = d.get_rng_state()
    u = np.random.Generator(np.random.PCG64()).random(1)           # (a throwaway: restore the real state)
    d.set_rng_state(state)
    u = d.rng.random(x.shape, dtype=x.dtype)
    d.set_rng_state(state)
    np.testing.assert_allclose(d(x), ref.dropout_forward(x, u, 0.3), rtol=1e-12)
    g = np.ones_like(x)
    np.testing.assert_allclose(d.backward(g), ref.dropout_backward(g, u, 0.3), rtol=1e-12)


def test_batchnorm_staged_graph_equals_the_formula_and_the_layer():
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((3, 4, 5, 5)) * 2 + 1, rng.standard_normal((3, 4, 5, 5))
    gamma, beta = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    out, cache = ref.batchnorm2d_forward(x, gamma, beta)
    staged = ref.batchnorm2d_backward_staged(g, cache, gamma)
    formula = ref.batchnorm2d_backward_formula(g, cache, gamma)
    bn = nn.BatchNorm2d(4).double()
    bn.weight.data[:], bn.bias.data[:] = gamma, beta
    np.testing.assert_allclose(bn(x), out, rtol=1e-12, atol=1e-12)
    dx = bn.backward(g)
    for a, b, c in zip(staged, formula, (dx, bn.weight.grad, bn.bias.grad)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(c, a, rtol=1e-10, atol=1e-12)


def test_cross_entropy_equals_its_loop():
    rng = np.random.default_rng(0)
    logits, labels, w = rng.standard_normal((5, 7)) * 3, rng.integers(0, 7, 5), rng.uniform(0.5, 2, 7)
    crit = nn.CrossEntropyLoss(weight=w, label_smoothing=0.2)
    assert np.isclose(crit(logits, labels), ref.cross_entropy(logits, labels, w, 0.2), rtol=1e-12)
    np.testing.assert_allclose(crit.backward(), ref.cross_entropy_backward(logits, labels, w, 0.2), rtol=1e-10)


def test_maxpool_and_conv_equal_their_loops():
    rng = np.random.default_rng(1)
    x = distinct_values(rng, (2, 3, 7, 6))
    pool = nn.MaxPool2d(3, 2)
    np.testing.assert_array_equal(pool(x), ref.maxpool2d_forward(x, 3, 2))
    g = rng.standard_normal(pool(x).shape)
    np.testing.assert_array_equal(pool.backward(g), ref.maxpool2d_backward(g, x, 3, 2))
    conv = nn.Conv2d(3, 2, 3, stride=2, padding=1, seed=0).double()
    x = rng.standard_normal((2, 3, 7, 6))
    y = conv(x)
    np.testing.assert_allclose(y, ref.conv2d_forward(x, conv.weight.data, conv.bias.data, 2, 1), rtol=1e-12)
    g = rng.standard_normal(y.shape)
    dx = conv.backward(g)
    for a, b in zip((dx, conv.weight.grad, conv.bias.grad), ref.conv2d_backward(g, x, conv.weight.data, 2, 1)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# --- every engine route the gradcheck claims, taken ---------------------------------------------------
def test_the_gradcheck_engine_cases_take_every_route():
    """The conv-block cases of ``minicnn gradcheck`` run the routes they are named after."""
    from minicnn.engines.cpu import threads
    from minicnn.gradcheck import _engine_cases, compare_engine
    if not threads.available():
        pytest.skip("the chunked routes need a BLAS whose threads threadpoolctl can limit")
    routes = {}
    for name, model, x, backward in _engine_cases("cpu", np.random.default_rng(0), 0):
        if name.startswith("conv block"):
            assert all(r.passed for r in compare_engine(model, x, "cpu", backward=backward, name=name))
            step = model._last_plan[0]
            routes[name] = (step.route, getattr(step.saved, "w_col", 0) is None)
    assert routes["conv block, 1 channel"][0] == "grey"
    assert routes["conv block, im2col"] == ("threaded", False)
    assert routes["conv block, Winograd"] == ("threaded", True)
    assert routes["conv block, Winograd dW"] == ("threaded", True)
    assert routes["conv block inference"][0] == "inference"


# --- break a textbook backward, and the default gradcheck fails ----------------------------------------
def _mutations():
    """(file, line, description, mutated source) for each returned gradient and each accumulate_grad
    argument in a backward method of a textbook layer: that expression multiplied by 1.5."""
    found = []
    for path in sorted(glob.glob(os.path.join(NN, "*.py"))):
        name = os.path.basename(path)
        if name in ("__init__.py", "module.py", "reference.py", "im2col.py"):
            continue
        source = open(path).read()
        lines = source.splitlines(keepends=True)
        starts = np.cumsum([0] + [len(line) for line in lines])
        for cls in ast.walk(ast.parse(source)):
            if not isinstance(cls, ast.ClassDef):
                continue
            for fn in cls.body:
                if not (isinstance(fn, ast.FunctionDef) and fn.name == "backward"):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Return) and node.value is not None and not (
                            isinstance(node.value, ast.Constant) and node.value.value is None):
                        target, what = node.value, "returned gradient"
                    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                          and node.func.attr == "accumulate_grad"):
                        target, what = node.args[0], f"{ast.unparse(node.func.value)}.accumulate_grad argument"
                    else:
                        continue
                    a = starts[target.lineno - 1] + target.col_offset
                    b = starts[target.end_lineno - 1] + target.end_col_offset
                    mutated = (source[:a] + "_broken(" + source[a:b] + ")" + source[b:]
                               + "\n\ndef _broken(v):\n    return None if v is None else v * 1.5\n")
                    found.append((name, target.lineno, f"{cls.name}.backward {what}", mutated))
    return found


def _copy_package(tmp, mutated_file=None, mutated_source=None):
    """minicnn copied to ``tmp`` with one file replaced; the engines directory is linked, not copied (its
    numba cache stays valid, and no engine file is broken)."""
    dest = os.path.join(tmp, "minicnn")
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "engines", "weights"))
    os.symlink(os.path.join(PACKAGE, "engines"), os.path.join(dest, "engines"))
    os.symlink(os.path.join(PACKAGE, "weights"), os.path.join(dest, "weights"))
    if mutated_file:
        with open(os.path.join(dest, "nn", mutated_file), "w") as f:
            f.write(mutated_source)
    return tmp


def _gradcheck_in(tmp):
    env = dict(os.environ, PYTHONPATH=tmp, MINICNN_ENGINE="")
    return subprocess.run([sys.executable, "-m", "minicnn", "gradcheck"], cwd=tmp, capture_output=True, text=True,
                          env=env, timeout=600)


def test_there_is_a_mutation_for_every_textbook_backward():
    described = {m[2] for m in _mutations()}
    for cls in ("Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Linear", "Flatten", "Dropout"):
        assert any(d.startswith(f"{cls}.backward returned") for d in described), cls
    for what in ("Conv2d.backward self.weight", "Conv2d.backward self.bias", "BatchNorm2d.backward self.weight",
                 "BatchNorm2d.backward self.bias", "Linear.backward self.weight", "Linear.backward self.bias"):
        assert any(d.startswith(what) for d in described), what
    assert any(d.startswith("CrossEntropyLoss.backward returned") for d in described)


def test_every_broken_textbook_backward_fails_the_default_gradcheck(tmp_path):
    """Issue 13's proof: scale one returned gradient or one accumulate_grad argument of a textbook
    backward by 1.5, in a copy of the package, and ``minicnn gradcheck`` (no arguments) fails."""
    control = _gradcheck_in(_copy_package(str(tmp_path / "control")))
    assert control.returncode == 0, control.stdout[-3000:] + control.stderr[-3000:]
    mutations = _mutations()

    def run(i):
        name, line, what, source = mutations[i]
        out = _gradcheck_in(_copy_package(str(tmp_path / f"m{i}"), name, source))
        return name, line, what, out

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, range(len(mutations))))
    survived = [f"nn/{name}:{line} {what} (exit {out.returncode}: {out.stderr.strip()[-300:]})"
                for name, line, what, out in results if out.returncode != 1 or "FAIL" not in out.stdout]
    assert not survived, "broken backward passes the default gradcheck:\n" + "\n".join(survived)
