"""Every layer's backward pass against float64 central differences (minicnn.gradcheck)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minicnn
from minicnn import nn
from minicnn.backend import to_device
from minicnn.gradcheck import (GradcheckError, assert_gradients, check_loss, check_module,
                               format_report, numerical_gradient)
from minicnn.models import EmotionClassifier

from conftest import distinct_values, off_kink

MODES = ["full", "directional"]


def _check(layer, x, device, mode="full", **kw):
    layer = layer.to(device=device, dtype=np.float64)
    results = check_module(layer, to_device(x, device), mode=mode, **kw)
    assert_gradients(results)
    return results


@pytest.mark.parametrize("mode", MODES)
@given(k=st.integers(1, 3), s=st.integers(1, 2), p=st.integers(0, 1), n=st.integers(1, 2),
       c=st.integers(1, 3), oc=st.integers(1, 3), h=st.integers(3, 6), w=st.integers(3, 6),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv2d(device, mode, k, s, p, n, c, oc, h, w, bias, seed):
    rng = np.random.default_rng(seed)
    layer = nn.Conv2d(c, oc, k, stride=s, padding=p, bias=bias, seed=seed)
    results = _check(layer, rng.standard_normal((n, c, h, w)), device, mode)
    assert [r.tensor for r in results] == ["input", "weight"] + (["bias"] if bias else [])


@pytest.mark.parametrize("training", [True, False])
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(2, 4),
       seed=st.integers(0, 2**16))
def test_batchnorm2d(device, training, n, c, h, w, seed):
    rng = np.random.default_rng(seed)
    layer = nn.BatchNorm2d(c)
    layer.weight.data = rng.uniform(0.5, 1.5, c).astype(np.float32)
    layer.bias.data = rng.standard_normal(c).astype(np.float32)
    layer.running_mean[:] = rng.standard_normal(c)
    layer.running_var[:] = rng.uniform(0.5, 2, c)
    layer.train(training)
    _check(layer, rng.standard_normal((n, c, h, w)) * 3 + 1, device)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_relu(device, shape, seed):
    _check(nn.ReLU(), off_kink(np.random.default_rng(seed), shape), device)


@given(k=st.integers(1, 3), s=st.integers(1, 3), n=st.integers(1, 2), c=st.integers(1, 2),
       h=st.integers(3, 7), w=st.integers(3, 7), seed=st.integers(0, 2**16))
def test_maxpool2d(device, k, s, n, c, h, w, seed):
    # Entries at least 0.05 apart: a 1e-6 perturbation can never change a window's argmax.
    _check(nn.MaxPool2d(k, s), distinct_values(np.random.default_rng(seed), (n, c, h, w)), device)


@pytest.mark.parametrize("training", [True, False])
@given(p=st.sampled_from([0.0, 0.3, 0.5, 0.9]), seed=st.integers(0, 2**16))
def test_dropout(device, training, p, seed):
    layer = nn.Dropout(p, seed=seed).train(training)
    _check(layer, np.random.default_rng(seed).standard_normal((4, 6)), device)


def test_flatten(device):
    _check(nn.Flatten(), np.random.default_rng(0).standard_normal((2, 3, 2, 2)), device)


@pytest.mark.parametrize("mode", MODES)
@given(n=st.integers(1, 4), i=st.integers(1, 6), o=st.integers(1, 5), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_linear(device, mode, n, i, o, bias, seed):
    layer = nn.Linear(i, o, bias=bias, seed=seed)
    _check(layer, np.random.default_rng(seed).standard_normal((n, i)), device, mode)


@given(n=st.integers(1, 5), c=st.integers(2, 7), smoothing=st.sampled_from([0.0, 0.1, 0.3]),
       weighted=st.booleans(), reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2**16))
def test_cross_entropy(device, n, c, smoothing, weighted, reduction, seed):
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.2, 2.0, c) if weighted else None
    crit = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing, reduction=reduction)
    logits = to_device(rng.standard_normal((n, c)) * 3, device)
    assert_gradients(check_loss(crit, logits, rng.integers(0, c, n)))


def test_sequential_small_cnn(device):
    rng = np.random.default_rng(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, seed=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4, seed=2))
    _check(net, rng.standard_normal((3, 2, 4, 4)), device)


@pytest.mark.parametrize("training", [True, False])
def test_emotion_classifier_whole_model(device, training):
    """The whole seed network, input and all 20 parameter tensors, along random directions.

    The network is piecewise smooth (ReLU, max-pool): seeded so that no activation sits within
    the finite-difference step of a kink (about 1 seed in 30 would put one there).
    """
    minicnn.manual_seed(0)
    model = EmotionClassifier(num_classes=7).train(training)
    rng = np.random.default_rng(0)
    if not training:   # non-trivial running statistics, so eval mode is not just training mode
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean[:] = rng.standard_normal(m.num_features) * 0.1
                m.running_var[:] = rng.uniform(0.5, 1.5, m.num_features)
    results = _check(model, rng.standard_normal((2, 1, 48, 48)), device, mode="directional")
    assert len(results) == 1 + 20
    if training:  # the dropout mask was held fixed: some units are really dropped
        assert model.classifier[3].last_mask() is not None


def test_a_broken_backward_is_caught():
    class HalfGradientReLU(nn.ReLU):
        def backward(self, dout):
            return super().backward(dout) * 0.5        # the bug: a missing factor

    x = off_kink(np.random.default_rng(0), (3, 4))
    for mode in MODES:
        results = check_module(HalfGradientReLU().double(), x, mode=mode)
        assert not results[0].passed and results[0].max_rel_error > 0.1
        with pytest.raises(GradcheckError, match="HalfGradientReLU input"):
            assert_gradients(results)
    assert "FAIL" in format_report(results)


def test_a_wrong_parameter_gradient_is_caught_and_located():
    class BadBiasLinear(nn.Linear):
        def backward(self, dout):
            dx = super().backward(dout)
            self.bias.grad[1] += 1.0                   # the bug: one wrong entry
            return dx

    results = check_module(BadBiasLinear(3, 4, seed=0).double(), np.ones((2, 3)))
    bias = next(r for r in results if r.tensor == "bias")
    assert not bias.passed and bias.worst_index == (1,)
    assert all(r.passed for r in results if r.tensor != "bias")


def test_gradcheck_refuses_float32():
    with pytest.raises(ValueError, match="float64"):
        check_module(nn.ReLU(), np.ones((2, 2), dtype=np.float32))


def test_numerical_gradient_of_a_known_function():
    x = np.array([1.0, -2.0, 3.0])
    g = numerical_gradient(lambda: float((x ** 3).sum()), x)
    np.testing.assert_allclose(g, 3 * np.array([1.0, 4.0, 9.0]), rtol=1e-8)
    np.testing.assert_array_equal(x, [1.0, -2.0, 3.0])     # restored


def test_gradcheck_leaves_the_module_as_it_was():
    bn = nn.BatchNorm2d(2).double()
    before = bn.state_dict()
    check_module(bn, np.random.default_rng(0).standard_normal((2, 2, 3, 3)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
