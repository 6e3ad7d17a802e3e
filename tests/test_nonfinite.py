"""NaN and inf propagate as in PyTorch, through every layer, every engine step and the whole network:
an output is non-finite exactly where PyTorch's is, and equal to it where both are finite. (A max,
a ReLU or a reduction that silently drops a NaN turns a broken input or weight into plausible numbers.)

Which non-finite value comes out (NaN or ±inf) is not compared: PyTorch itself does not agree with
itself there (its CPU BatchNorm folds the statistics into x * alpha + beta in eval mode, giving
inf - inf = NaN, and not in training), and Winograd's transforms compute inf - inf too. For the same
reason a BatchNorm's own weight or bias is poisoned with NaN only: with an infinite gamma, PyTorch's
eval and training modes give NaN and -inf at the same place, which a following ReLU turns into NaN
and 0."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minicnn
from minicnn import nn
from minicnn.backend import to_device, to_numpy

from conftest import torch_or_skip

BAD = st.sampled_from([np.nan, np.inf, -np.inf])


def _poison(a, cells, values):
    a = a.copy()
    flat = a.reshape(-1)
    for i, v in zip(cells, values):
        flat[i % flat.size] = v
    return a


def _torch_twin(layers):
    torch = torch_or_skip()
    t = []
    for layer in layers:
        name = type(layer).__name__
        if name == "Conv2d":
            m = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                layer.padding, bias=layer.bias is not None).double()
        elif name == "BatchNorm2d":
            m = torch.nn.BatchNorm2d(layer.num_features).double()
        elif name == "ReLU":
            m = torch.nn.ReLU()
        elif name == "MaxPool2d":
            m = torch.nn.MaxPool2d(layer.kernel_size, layer.stride)
        elif name == "Linear":
            m = torch.nn.Linear(layer.in_features, layer.out_features).double()
        elif name == "Flatten":
            m = torch.nn.Flatten()
        t.append(m)
    seq = torch.nn.Sequential(*t)
    sd = nn.Sequential(*layers).state_dict()
    seq.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    return seq


def _same_nonfinite(ours, theirs, what):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, what
    np.testing.assert_array_equal(~np.isfinite(ours), ~np.isfinite(theirs), err_msg=f"{what}: non-finite pattern")
    ok = np.isfinite(theirs)
    np.testing.assert_allclose(ours[ok], theirs[ok], rtol=1e-8, atol=1e-8, err_msg=what)


def _block(kind, c):
    if kind == "conv block":
        return [nn.Conv2d(c, 16, 3, 1, 1, seed=0), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)]
    if kind == "bn-relu-pool":
        return [nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
    if kind == "conv":
        return [nn.Conv2d(c, 4, 3, 1, 1, seed=0)]
    if kind == "relu":
        return [nn.ReLU()]
    if kind == "maxpool":
        return [nn.MaxPool2d(2)]
    if kind == "bn":
        return [nn.BatchNorm2d(c)]
    if kind == "linear":
        return [nn.Flatten(), nn.Linear(c * 64, 5, seed=0)]


@pytest.mark.parametrize("kind", ["conv", "relu", "maxpool", "bn", "linear", "bn-relu-pool", "conv block"])
@pytest.mark.parametrize("training", [True, False])
@settings(max_examples=12, deadline=None)
@given(cells=st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=3), values=st.lists(BAD, min_size=3, max_size=3),
       poison_weight=st.booleans())
def test_nonfinite_inputs_and_weights_propagate_like_pytorch(device, kind, training, cells, values, poison_weight):
    torch = torch_or_skip()
    c = 16 if kind == "conv block" else 3
    layers = _block(kind, c)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, c, 8, 8))          # conv block: 8 images of 4x4 tiles = 128: Winograd
    for layer in layers:
        if type(layer).__name__ == "BatchNorm2d" and not training:
            layer.running_mean[:] = rng.uniform(-0.5, 0.5, layer.num_features)
            layer.running_var[:] = rng.uniform(0.5, 2.0, layer.num_features)
    net = nn.Sequential(*layers).double().train(training)
    if poison_weight and any(p for p in net.parameters()):
        p = net.parameters()[0]
        if type(layers[0]).__name__ == "BatchNorm2d":     # (an infinite gamma: see the module's docstring)
            values = [np.nan] * len(values)
        p.data = _poison(p.data, cells, values)
    else:
        x = _poison(x, cells, values)
    twin = _torch_twin(layers).train(training)
    with torch.no_grad():
        want = twin(torch.from_numpy(x)).numpy()
    net.to(device)
    got = to_numpy(net(to_device(x, device)))
    _same_nonfinite(got, want, f"{kind} on {device}")


def test_one_nan_weight_makes_the_whole_network_nan_on_every_engine():
    """The issue's case: one NaN conv weight gave every input the same finite logits on the CPU engine."""
    minicnn.manual_seed(0)
    model = minicnn.models.EmotionClassifier().eval()
    model.features[4].weight.data[3, 2, 1, 1] = np.nan
    x = np.random.default_rng(0).standard_normal((4, 1, 48, 48)).astype(np.float32)
    for engine in ("textbook", "auto"):
        with minicnn.engines.using(engine), minicnn.no_grad():
            assert np.isnan(model(x)).all(), engine
    x[1, 0, 10, 10] = np.nan
    model.features[4].weight.data[3, 2, 1, 1] = 0.1
    for engine in ("textbook", "auto"):
        with minicnn.engines.using(engine), minicnn.no_grad():
            out = model(x)
        assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2, 3]]).all(), engine
