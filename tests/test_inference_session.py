"""InferenceSession: BatchNorm folded, fused epilogues, kept memory -- and the same numbers as the
model's own eval-mode forward (and PyTorch's)."""
import numpy as np
import pytest

import minicnn
from minicnn import InferenceSession, engines
from minicnn.inference_session import compile_plan, fold_batchnorm
from minicnn.models import EmotionClassifier
from minicnn.nn import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential, no_grad

from conftest import torch_emotion_classifier


def trained_like(seed=0, dtype=np.float32):
    """An EmotionClassifier whose BatchNorm statistics and affine parameters are far from 0 and 1,
    so that folding them matters."""
    minicnn.manual_seed(seed)
    model = EmotionClassifier()
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            c = m.num_features
            m.running_mean[...] = rng.normal(0, 0.3, c)
            m.running_var[...] = rng.uniform(0.2, 3.0, c)
            m.weight.data[...] = rng.uniform(0.5, 1.5, c)
            m.bias.data[...] = rng.normal(0, 0.2, c)
        if isinstance(m, Conv2d):
            m.bias.data[...] = rng.normal(0, 0.1, m.bias.shape)
    return model.to(dtype=dtype).eval()


def model_logits(model, x):
    with no_grad(), engines.using("textbook"):
        return model(x)


def test_folding_is_conv_then_batchnorm_in_float64():
    rng = np.random.default_rng(1)
    conv, bn = Conv2d(3, 5, 3, padding=1).double(), BatchNorm2d(5).double().eval()
    bn.running_mean[...], bn.running_var[...] = rng.normal(size=5), rng.uniform(0.5, 2, 5)
    bn.weight.data[...], bn.bias.data[...] = rng.normal(size=5), rng.normal(size=5)
    x = rng.normal(size=(2, 3, 6, 6))
    w, b = fold_batchnorm(conv.weight.data, conv.bias.data, bn)
    folded = Conv2d(3, 5, 3, padding=1).double()
    folded.weight.data[...], folded.bias.data[...] = w, b
    np.testing.assert_allclose(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
    w0, b0 = fold_batchnorm(conv.weight.data, None, bn)                      # a conv without bias
    np.testing.assert_allclose(b0, b - conv.bias.data * bn.weight.data / np.sqrt(bn.running_var + bn.eps),
                               rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 33, 64])
def test_session_equals_the_models_eval_forward(n):
    model = trained_like()
    session = model.compile_inference()
    assert session.route == "cpu"
    x = np.random.default_rng(n).normal(size=(n, 1, 48, 48)).astype(np.float32)
    np.testing.assert_allclose(session.run(x), model_logits(model, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(session.run(x), session.run(x))         # kept memory: the same again


def test_session_in_float64_is_exact_to_rounding():
    model = trained_like(dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(5, 1, 48, 48))
    np.testing.assert_allclose(InferenceSession(model).run(x), model_logits(model, x), rtol=1e-10, atol=1e-12)


def test_session_matches_pytorch():
    torch = pytest.importorskip("torch")
    model = trained_like(3)
    twin = torch_emotion_classifier()
    twin.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in model.state_dict().items()})
    twin.eval()
    x = np.random.default_rng(3).normal(size=(4, 1, 48, 48)).astype(np.float32)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.compile_inference().run(x), expected, rtol=1e-4, atol=1e-5)


def test_both_thread_routes_are_taken_and_agree(monkeypatch):
    from minicnn.engines.cpu import inference, threads
    model = trained_like()
    session = model.compile_inference()
    x = np.random.default_rng(5).normal(size=(16, 1, 48, 48)).astype(np.float32)
    calls = []
    real = threads.run_chunks
    monkeypatch.setattr(threads, "run_chunks", lambda *a: calls.append(a[1]) or real(*a))
    monkeypatch.setattr(threads, "workers", lambda: 2)
    monkeypatch.setattr(inference.CpuInference, "CHUNKED_MIN_IMAGES_PER_THREAD", 4)
    chunked = session.run(x)
    assert calls == [16]                                                  # one parallel region for all blocks
    monkeypatch.setattr(inference.CpuInference, "CHUNKED_MIN_IMAGES_PER_THREAD", 100)
    assert session._cpu.route_for(16) == "within"
    within = session.run(x)
    assert calls == [16]
    np.testing.assert_allclose(chunked, within, rtol=1e-5, atol=1e-6)


def test_one_image_or_a_few_run_on_the_calling_thread_alone(monkeypatch):
    """Batches of 1 to 7: serial kernels only (no numba parallel region, no run_chunks) and the BLAS held
    to one thread while it runs; the logits equal the other routes' and the model's."""
    from minicnn.engines.cpu import inference, kernels, threads
    model = trained_like()
    session = model.compile_inference()
    cpu = session._cpu
    monkeypatch.setattr(threads, "workers", lambda: 2)
    assert [cpu.route_for(n) for n in (1, 2, 7, 8, 64)] == ["serial", "serial", "serial", "chunked", "chunked"]
    monkeypatch.setattr(threads, "workers", lambda: 16)
    assert [cpu.route_for(n) for n in (1, 7, 8, 63, 64)] == ["serial", "serial", "within", "within", "chunked"]
    monkeypatch.setattr(threads, "workers", lambda: 2)
    x = np.random.default_rng(6).normal(size=(8, 1, 48, 48)).astype(np.float32)
    batched = session.run(x)
    parallel_kernels = [name for name in ("grey_conv3x3_pool_bias_relu", "pool_bias_relu", "im2col_nhwc")]
    for name in parallel_kernels:
        monkeypatch.setattr(kernels, name, lambda *a, _n=name: pytest.fail(f"{_n} (parallel) ran at batch 1"))
    monkeypatch.setattr(threads, "run_chunks", lambda *a: pytest.fail("run_chunks at batch 1"))
    seen = []
    real = threads.one_blas_thread
    monkeypatch.setattr(threads, "one_blas_thread", lambda: seen.append(1) or real())
    one = np.concatenate([session.run(x[i:i + 1]) for i in range(len(x))])
    assert len(seen) == len(x)
    np.testing.assert_allclose(one, batched, rtol=1e-5, atol=1e-6)
    few = np.concatenate([session.run(x[:5]), session.run(x[5:])])            # 5 + 3 images
    assert len(seen) == len(x) + 2
    np.testing.assert_allclose(few, batched, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one, model_logits(model, x), rtol=1e-4, atol=1e-5)


def test_each_block_takes_its_winograd_and_its_sub_chunks():
    """F(6x6, 3x3) on the 24, 12 and 6 maps, the direct kernel for the grey first conv; a worker runs the 24x24
    block two images at a time (36 tiles each, ~64 rows) and the 6x6 block all its images at once."""
    from minicnn.engines.cpu import winograd6
    convs = trained_like().compile_inference()._cpu.convs
    assert [c.winograd for c in convs] == [None, winograd6, winograd6, winograd6]
    assert [c.direct for c in convs] == [True, False, False, False]
    assert [c.images_per_product for c in convs] == [8, 4, 16, 64]


@pytest.mark.parametrize("order", ["F6", "F4", "F2"])
def test_every_winograd_choice_and_uneven_shares_equal_the_model(monkeypatch, order):
    """Each Winograd variant the session may choose, on the chunked route with shares that do not
    divide into the blocks' sub-chunks (37 images on 3 threads: 13 + 12 + 12)."""
    from minicnn.engines.cpu import inference, threads, winograd, winograd4, winograd6
    monkeypatch.setattr(inference.CpuInference, "WINOGRAD_ORDER",
                        {"F6": (winograd6,), "F4": (winograd4, winograd), "F2": (winograd,)}[order])
    monkeypatch.setattr(threads, "workers", lambda: 3)
    model = trained_like()
    session = model.compile_inference()
    x = np.random.default_rng(9).normal(size=(37, 1, 48, 48)).astype(np.float32)
    np.testing.assert_allclose(session.run(x), model_logits(model, x), rtol=1e-4, atol=1e-5)


def test_session_is_a_snapshot_of_the_weights():
    model = trained_like()
    session = model.compile_inference()
    x = np.random.default_rng(0).normal(size=(2, 1, 48, 48)).astype(np.float32)
    before = session.run(x)
    model.classifier[4].bias.data += 1.0
    np.testing.assert_allclose(session.run(x), before)
    np.testing.assert_allclose(model.compile_inference().run(x), before + 1.0, rtol=1e-5, atol=1e-5)


def test_non_finite_inputs_give_the_models_values():
    model = trained_like()
    x = np.random.default_rng(0).normal(size=(3, 1, 48, 48)).astype(np.float32)
    x[0, 0, 10, 10] = np.nan
    x[1, 0, 20:30, 5] = np.inf
    out, ref = model.compile_inference().run(x), model_logits(model, x)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_allclose(out[2], ref[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 1, 48, 47), np.float32), r"expects input of shape \(N, 1, 48, 48\), got \(2, 1, 48, 47\)"),
    (np.zeros((1, 48, 48), np.float32), r"expects input of shape \(N, 1, 48, 48\), got \(1, 48, 48\)"),
    (np.zeros((2, 1, 48, 48), np.float64), "expects float32 input, got float64"),
    ([[1.0]], "expects input of shape"),
])
def test_wrong_input_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        trained_like().compile_inference().run(bad)


def test_an_empty_batch():
    assert trained_like().compile_inference().run(np.zeros((0, 1, 48, 48), np.float32)).shape == (0, 7)


class Square(Module):
    """A layer the session does not know."""

    def forward(self, x):
        return x * x


def test_a_model_it_cannot_compile_runs_as_it_is():
    class Small(Sequential):
        input_shape = (1, 8, 8)
    model = Small(Conv2d(1, 4, 3, padding=1), Square(), MaxPool2d(2), Flatten(), Linear(64, 3)).eval()
    assert compile_plan(model) is None
    session = InferenceSession(model)
    assert session.route == "model"
    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run(x), model_logits(model, x), rtol=1e-6)


def test_a_conv_without_batchnorm_compiles_too():
    class Small(Sequential):
        input_shape = (1, 8, 8)
    model = Small(Conv2d(1, 4, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(), Linear(64, 3)).eval()
    session = InferenceSession(model)
    assert session.route == "cpu"
    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run(x), model_logits(model, x), rtol=1e-5, atol=1e-6)


def test_the_predictor_uses_a_session():
    from minicnn.inference import EmotionPredictor
    from minicnn.training import predict_proba
    p = EmotionPredictor()
    assert p.session.route == "cpu"
    faces = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)
    np.testing.assert_allclose(p.predict(faces), predict_proba(p.model, faces, p.mean, p.std), rtol=1e-4, atol=1e-6)


def test_sixteen_threads_on_any_machine_give_the_same_numbers(tmp_path):
    """Many threads (as on a 16-core machine, here oversubscribed): the chunked session route with 16
    workers, the within-image route, and a training step of the CPU engine all match the textbook."""
    import subprocess
    import sys
    code = """
import numpy as np, minicnn
from minicnn import engines
from minicnn.engines.cpu import threads
from minicnn.models import EmotionClassifier
from minicnn.nn import CrossEntropyLoss, no_grad
assert threads.workers() == 16, threads.workers()
minicnn.manual_seed(0)
model = EmotionClassifier().eval()
x = np.random.default_rng(0).normal(size=(64, 1, 48, 48)).astype(np.float32)
with no_grad(), engines.using("textbook"):
    ref = model(x)
session = model.compile_inference()
np.testing.assert_allclose(session.run(x), ref, rtol=1e-4, atol=1e-5)            # 64 images: chunks over 16 threads
np.testing.assert_allclose(session.run(x[:3]), ref[:3], rtol=1e-4, atol=1e-5)    # 3: within the image
model.train()
y = np.arange(64) % 7
grads = {}
for engine in ("textbook", "auto"):      # (float64: float32's other rounding may flip a pooling winner)
    minicnn.manual_seed(1)
    m = EmotionClassifier(dropout=0.0).double()
    with engines.using(engine):
        crit = CrossEntropyLoss()
        loss = crit(m(x.astype(np.float64)), y)
        m.backward(crit.backward())
    grads[engine] = [p.grad.copy() for p in m.parameters()]
scale = max(np.abs(a).max() for a in grads["textbook"])      # (a conv bias's gradient is ~0: BatchNorm follows)
for a, b in zip(grads["textbook"], grads["auto"]):
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-10 * scale)
print("ok")
"""
    env = dict(__import__("os").environ, NUMBA_NUM_THREADS="16", OPENBLAS_NUM_THREADS="16", OMP_NUM_THREADS="16")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_on_the_gpu_the_session_equals_the_model_and_replays_a_graph(gpu, capturable_cublas):
    from minicnn.backend import to_device, to_numpy
    model = trained_like().to("gpu")
    session = model.compile_inference()
    assert session.route == "gpu"
    blocks = session._gpu.convs
    assert [b.grey for b in blocks] == [True, False, False, False]
    assert [None if b.grey else b.m for b in blocks] == [None, 4, 4, 2]        # F(4x4) on 24, 12; F(2x2) on 6
    for n in (3, 1):
        x = np.random.default_rng(n).normal(size=(n, 1, 48, 48)).astype(np.float32)
        with no_grad():
            expected = to_numpy(model.eval()(to_device(x, "gpu")))
        for call in range(3):                      # eager, then captured, then replayed
            np.testing.assert_allclose(to_numpy(session.run(to_device(x, "gpu"))), expected, rtol=1e-4, atol=1e-5)
    assert session._gpu.replays == 4 and sorted(session._gpu._graphs) == [1, 3]     # 2 replays per size
    bad = np.full((2, 1, 48, 48), np.nan, np.float32)                         # non-finite: the model's own values
    with no_grad():
        np.testing.assert_array_equal(np.isnan(to_numpy(session.run(to_device(bad, "gpu")))),
                                      np.isnan(to_numpy(model(to_device(bad, "gpu")))))


def test_on_the_gpu_what_the_kernels_do_not_cover_runs_the_model(gpu):
    from minicnn.engines import using
    odd = Sequential(Conv2d(1, 4, 3, stride=2, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2), Flatten(),
                     Linear(4 * 6 * 6, 3)).to("gpu")
    assert InferenceSession(odd, input_shape=(1, 24, 24)).route == "model"           # a stride-2 conv
    with using("textbook"):
        assert trained_like().to("gpu").compile_inference().route == "model"        # the textbook chosen


@pytest.mark.parametrize("padding, pool", [(0, 1), (1, 2), (2, 1)])
def test_the_gpu_conv_kernels_equal_the_naive_loops(gpu, padding, pool):
    """The grey direct kernel and both Winograd sizes, with every padding, against conv, pool, bias
    and ReLU in float64 (odd channel counts; maps of 4x4 and of 2x2 tiles only)."""
    from minicnn.backend import to_device, to_numpy
    from minicnn.engines.gpu.inference import _Conv
    from minicnn.nn.reference import conv2d_forward, maxpool2d_forward
    rng = np.random.default_rng(padding * 10 + pool)
    for c, oc, hw in ((1, 5, 10 - 2 * padding + 2), (3, 7, 8 - 2 * padding + 2), (6, 3, 6 - 2 * padding + 2)):
        x, w, b = rng.normal(size=(2, c, hw, hw)), rng.normal(size=(oc, c, 3, 3)), rng.normal(size=oc)
        block = _Conv(w, b, 1, padding, pool, (hw, hw), np.float64)
        out = to_numpy(block.run(to_device(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), "gpu")))
        y = conv2d_forward(x, w, np.zeros(oc), 1, padding)
        expected = np.maximum(maxpool2d_forward(y, pool, pool) + b[:, None, None], 0)
        np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected, rtol=1e-10, atol=1e-10)


def test_the_tta_comparison_example_runs(capsys):
    import runpy
    example = runpy.run_path(str(__import__("pathlib").Path(__file__).parents[1] / "examples" / "compare_tta.py"))
    example["main"]([])                                     # the built-in faces' validation split
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and lines[0].startswith("none") and all("%" in line for line in lines)
