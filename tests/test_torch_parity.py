"""minicnn against PyTorch (the oracle): every layer, the whole model, the optimizers, state dicts."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minicnn
from minicnn import nn, optim
from minicnn.backend import to_device, to_numpy
from minicnn.engines import step_for
from minicnn.models import EmotionClassifier

from conftest import distinct_values, off_kink, torch_emotion_classifier, torch_or_skip

torch = torch_or_skip()
torch.set_num_threads(2)


def close(actual, expected, tol, scale=None):
    """Entries agree to ``tol`` relative to ``scale`` (default: the tensor's largest entry)."""
    actual, expected = to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if scale is None:
        scale = max(float(np.abs(expected).max()), 1e-6) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def t(a, dtype=torch.float32, grad=True):
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=grad)


def run_layer(layer, tlayer, x, device, tol=2e-5):
    """Forward and backward through both; compare output, input gradient and parameter gradients."""
    layer.to(device=device)
    out = layer(to_device(x, device))
    tx = t(x)
    tout = tlayer(tx)
    close(out, tout.detach().numpy(), tol)
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    dx = layer.backward(to_device(dout, device))
    tout.backward(torch.from_numpy(dout))
    close(dx, tx.grad.numpy(), tol)
    tparams = dict(tlayer.named_parameters())
    for name, p in layer.named_parameters():
        close(p.grad, tparams[name].grad.numpy(), tol)


def copy_params(layer, tlayer):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            dict(tlayer.named_parameters())[name].copy_(torch.from_numpy(to_numpy(p.data)))


@given(k=st.integers(1, 5), s=st.integers(1, 3), p=st.integers(0, 2), c=st.integers(1, 4),
       oc=st.integers(1, 6), hw=st.integers(5, 12), bias=st.booleans(), seed=st.integers(0, 999))
def test_conv2d(device, k, s, p, c, oc, hw, bias, seed):
    layer = nn.Conv2d(c, oc, k, s, p, bias=bias, seed=seed)
    tlayer = torch.nn.Conv2d(c, oc, k, s, p, bias=bias)
    copy_params(layer, tlayer)
    x = np.random.default_rng(seed).standard_normal((2, c, hw, hw + 1)).astype(np.float32)
    run_layer(layer, tlayer, x, device)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_batchnorm2d_train_then_eval(device, momentum):
    rng = np.random.default_rng(0)
    layer = nn.BatchNorm2d(5, momentum=momentum).to(device=device)
    tlayer = torch.nn.BatchNorm2d(5, momentum=momentum)
    layer.weight.data = to_device(rng.uniform(0.5, 2, 5).astype(np.float32), device)
    layer.bias.data = to_device(rng.standard_normal(5).astype(np.float32), device)
    copy_params(layer, tlayer)
    for step in range(3):       # running statistics after several steps
        x = (rng.standard_normal((4, 5, 3, 6)) * 2 + step).astype(np.float32)
        run_layer(layer, tlayer, x, device)
        for name in ("running_mean", "running_var"):
            close(getattr(layer, name), getattr(tlayer, name).numpy(), 1e-6)
        assert int(layer.num_batches_tracked) == int(tlayer.num_batches_tracked) == step + 1
    layer.eval(), tlayer.eval()
    run_layer(layer, tlayer, rng.standard_normal((3, 5, 2, 2)).astype(np.float32), device)


def test_relu(device):
    tlayer = torch.nn.ReLU()
    run_layer(nn.ReLU(), tlayer, off_kink(np.random.default_rng(0), (3, 4, 5)).astype(np.float32), device)


@given(k=st.integers(1, 4), s=st.integers(1, 4), h=st.integers(4, 11), w=st.integers(4, 11),
       ties=st.booleans(), seed=st.integers(0, 999))
def test_maxpool2d(device, k, s, h, w, ties, seed):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 3, (2, 3, h, w)) if ties else distinct_values(rng, (2, 3, h, w))).astype(np.float32)
    run_layer(nn.MaxPool2d(k, s), torch.nn.MaxPool2d(k, s), x, device, tol=1e-6)


def test_flatten_and_linear(device):
    rng = np.random.default_rng(0)
    layer = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, seed=0))
    tlayer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    copy_params(layer, tlayer)
    run_layer(layer, tlayer, rng.standard_normal((4, 3, 2, 2)).astype(np.float32), device)


def test_dropout_eval_is_identity_and_train_scales_like_torch(device):
    x = np.ones((200, 100), dtype=np.float32)
    layer = nn.Dropout(0.3, seed=0).to(device=device)
    out = to_numpy(layer(to_device(x, device)))
    tout = torch.nn.Dropout(0.3)(torch.from_numpy(x)).numpy()
    # Same value set {0, 1/(1-p)} and the same keep rate (to sampling error).
    assert set(np.unique(out)) == set(np.unique(tout)) == {0.0, np.float32(1 / 0.7)}
    assert abs((out > 0).mean() - 0.7) < 0.01
    layer.eval()
    assert to_numpy(layer(to_device(x, device))) is not None
    np.testing.assert_array_equal(to_numpy(layer(to_device(x, device))), x)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy(device, smoothing, weighted, reduction):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 7)) * 4).astype(np.float32)
    labels = rng.integers(0, 7, 6)
    weight = rng.uniform(0.1, 3, 7) if weighted else None
    crit = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing, reduction=reduction)
    tcrit = torch.nn.CrossEntropyLoss(weight=None if weight is None else torch.tensor(weight, dtype=torch.float32),
                                      label_smoothing=smoothing, reduction=reduction)
    loss = crit(to_device(logits, device), labels)
    assert isinstance(loss, float)
    tl = t(logits)
    tloss = tcrit(tl, torch.from_numpy(labels))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
    close(crit.backward(), tl.grad.numpy(), 1e-5)


@pytest.mark.parametrize("temperature, weight", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.9)])
def test_distillation_loss(device, temperature, weight):
    """PyTorch's usual distillation loss: (1 - a) CE + a T^2 KL(p || softmax(z / T)), batch mean."""
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 7)) * 4).astype(np.float32)
    labels = rng.integers(0, 7, 6)
    p = rng.dirichlet(np.ones(7), 6).astype(np.float32)
    crit = nn.DistillationLoss(temperature, weight, label_smoothing=0.1)
    loss = crit(to_device(logits, device), labels, to_device(p, device))
    tl = t(logits)
    tloss = ((1 - weight) * F.cross_entropy(tl, torch.from_numpy(labels), label_smoothing=0.1)
             + weight * temperature ** 2 * F.kl_div(F.log_softmax(tl / temperature, dim=1), torch.from_numpy(p),
                                                    reduction="batchmean"))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
    close(crit.backward(), tl.grad.numpy(), 1e-5)


def test_cross_entropy_is_stable_for_huge_logits():
    crit = nn.CrossEntropyLoss()
    logits = np.array([[1000.0, 0.0, -1000.0], [-1e4, 1e4, 0.0]], dtype=np.float32)
    loss = crit(logits, np.array([0, 0]))
    tloss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.tensor([0, 0]))
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-6)
    assert np.isfinite(crit.backward()).all()


# --- the whole seed network -------------------------------------------------------

def _twin_models(seed=0):
    """A minicnn EmotionClassifier and the PyTorch one with the same weights (via state dicts)."""
    minicnn.manual_seed(seed)
    model = EmotionClassifier()
    tmodel = torch_emotion_classifier()
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return model, tmodel


class FixedMask(torch.nn.Module):
    """Replaces torch's Dropout with minicnn's mask so train-mode runs are comparable."""

    def __init__(self, dropout, model):
        super().__init__()
        self.dropout, self.model = dropout, model

    def forward(self, x):      # (the layer's mask, or the mask of the engine step that ran it)
        return x * torch.from_numpy(to_numpy(step_for(self.dropout, self.model).last_mask()))


@pytest.mark.parametrize("training", [True, False])
def test_emotion_classifier_logits_loss_and_gradients(device, training):
    model, tmodel = _twin_models()
    model.to(device=device).train(training)
    tmodel.train(training)
    if training:
        tmodel.classifier[3] = FixedMask(model.classifier[3], model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 48, 48)).astype(np.float32)
    labels = rng.integers(0, 7, 8)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    logits = model(to_device(x, device))
    loss = crit(logits, labels)
    model.backward(crit.backward())

    tlogits = tmodel(torch.from_numpy(x))
    tloss = torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(labels), label_smoothing=0.1)
    tloss.backward()
    close(logits, tlogits.detach().numpy(), 1e-5)
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
    tparams = dict(tmodel.named_parameters())
    # Relative to the largest gradient in the model: in training mode the conv biases before a
    # BatchNorm have an exactly zero gradient, so both frameworks give rounding noise there.
    scale = max(float(p.grad.abs().max()) for p in tmodel.parameters())
    for name, p in model.named_parameters():
        close(p.grad, tparams[name].grad.numpy(), 1e-4, scale)
    tstate = tmodel.state_dict()
    for name, b in model.named_buffers():
        close(b, tstate[name].numpy(), 1e-5)


@pytest.mark.parametrize("opt_name", ["sgd", "nesterov", "adam", "adamw"])
def test_emotion_classifier_training_steps(device, opt_name):
    """Five full training steps in float64 (dropout off so both sides see the same network)."""
    model, tmodel = _twin_models(1)
    model.classifier[3].p = 0.0
    tmodel.classifier[3].p = 0.0
    model.to(device=device, dtype=np.float64)
    tmodel.double()
    make = {
        "sgd": (lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
                lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4)),
        "nesterov": (lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
                     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
        "adam": (lambda ps: optim.Adam(ps, lr=1e-3, weight_decay=1e-4),
                 lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4)),
        "adamw": (lambda ps: optim.AdamW(ps, lr=1e-3), lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
    }[opt_name]
    opt, topt = make[0](model.parameters()), make[1](tmodel.parameters())
    crit = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.standard_normal((16, 1, 48, 48))
        y = rng.integers(0, 7, 16)
        loss = crit(model(to_device(x, device)), y)
        model.backward(crit.backward())
        opt.step(), opt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step(), topt.zero_grad()
        np.testing.assert_allclose(loss, tloss.item(), rtol=1e-10)
    tstate = tmodel.state_dict()
    # The conv biases before a BatchNorm get an exactly-zero gradient in training (the batch mean
    # cancels them): rounding noise, which Adam's normalised step turns into +-lr moves in both
    # frameworks alike. They cannot affect the loss; skip them (and their running means) for Adam.
    pre_bn = {f"features.{i}.bias" for i in (0, 4, 8, 12)} | {f"features.{i}.running_mean" for i in (1, 5, 9, 13)}
    for name, v in model.state_dict().items():
        if opt_name.startswith("adam") and name in pre_bn:
            continue
        close(v, tstate[name].numpy(), 1e-8)


@pytest.mark.parametrize("kind", ["sgd", "sgd_dampening", "nesterov_wd", "adam", "adam_wd", "adamw"])
def test_optimizer_update_rules_float64(kind):
    """Many steps on random gradients in float64: the update rules agree to rounding."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 4))
    p = nn.Parameter(p0.copy())
    tp = torch.tensor(p0, requires_grad=True)
    args = {
        "sgd": (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        "sgd_dampening": (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.3)),
        "nesterov_wd": (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        "adam": (optim.Adam, torch.optim.Adam, dict(lr=0.01)),
        "adam_wd": (optim.Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
        "adamw": (optim.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    }[kind]
    opt, topt = args[0]([p], **args[2]), args[1]([tp], **args[2])
    for _ in range(20):
        g = rng.standard_normal((3, 4))
        p.grad = g.copy()
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


# --- weights trade with PyTorch ----------------------------------------------------

def test_state_dict_from_torch_gives_torchs_logits(device):
    torch.manual_seed(0)
    tmodel = torch_emotion_classifier().eval()
    # Non-trivial running statistics, as after training.
    with torch.no_grad():
        for m in tmodel.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(123)
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    assert "features.1.num_batches_tracked" in sd
    model = EmotionClassifier().to(device=device).eval()
    model.load_state_dict(sd)
    x = np.random.default_rng(0).standard_normal((4, 1, 48, 48)).astype(np.float32)
    close(model(to_device(x, device)), tmodel(torch.from_numpy(x)).detach().numpy(), 1e-5)


def test_state_dict_to_torch_gives_minicnns_logits():
    model = EmotionClassifier().eval()
    sd = model.state_dict()
    assert list(sd)[:3] == ["features.0.weight", "features.0.bias", "features.1.weight"]
    assert "classifier.1.weight" in sd and "classifier.4.bias" in sd
    tmodel = torch_emotion_classifier().eval()
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert set(sd) == set(tmodel.state_dict())
    x = np.random.default_rng(1).standard_normal((3, 1, 48, 48)).astype(np.float32)
    close(model(x), tmodel(torch.from_numpy(x)).detach().numpy(), 1e-5)
