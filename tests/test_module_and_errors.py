"""The Module machinery, devices, seeding, and clear errors for bad input."""
import io

import numpy as np
import pytest

import minicnn
from minicnn import nn, optim
from minicnn.backend import DeviceError, get_array_module, normalize_device
from minicnn.models import EmotionClassifier


def x48(n=2, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, 48, 48)).astype(dtype)


# --- the public API contract --------------------------------------------------------

def test_public_api_contract_runs_a_training_step():
    model = EmotionClassifier(num_classes=7, dropout=0.5)
    model.train()
    logits = model(x48(4))
    assert logits.shape == (4, 7) and logits.dtype == np.float32
    criterion = minicnn.nn.CrossEntropyLoss()
    loss = criterion(logits, np.array([0, 1, 2, 6]))
    assert isinstance(loss, float) and np.isfinite(loss)
    dlogits = criterion.backward()
    assert dlogits.shape == (4, 7)
    model.backward(dlogits)
    params = model.parameters()
    assert all(p.grad is not None and p.grad.shape == p.data.shape for p in params)
    before = [p.data.copy() for p in params]
    opt = minicnn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    assert any(not np.array_equal(b, p.data) for b, p in zip(before, params))
    sd = model.state_dict()
    model.load_state_dict(sd)


def test_parameter_count_and_names():
    model = EmotionClassifier()
    assert model.num_parameters() == 1_572_551
    names = [n for n, _ in model.named_parameters()]
    assert names[:4] == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"]
    assert names[-2:] == ["classifier.4.weight", "classifier.4.bias"]
    assert EmotionClassifier(num_classes=3)(x48(1)).shape == (1, 3)


def test_summary_lists_every_layer_and_the_total():
    buf = io.StringIO()
    text = EmotionClassifier().summary(file=buf)
    assert text == buf.getvalue().rstrip("\n")
    assert "features.0 (Conv2d)" in text and "(N, 32, 48, 48)" in text and "320" in text
    assert "features.15 (MaxPool2d)" in text and "(N, 256, 3, 3)" in text
    assert "classifier.1 (Linear)" in text and "1,180,160" in text
    assert "Total params: 1,572,551" in text


def test_summary_does_not_change_the_model():
    model = EmotionClassifier().train()
    before = model.state_dict()
    model.summary(file=io.StringIO())
    assert model.training
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_gradients_accumulate_until_zero_grad():
    lin = nn.Linear(3, 2, seed=0)
    x = np.ones((1, 3), dtype=np.float32)
    lin(x)
    lin.backward(np.ones((1, 2), dtype=np.float32))
    g1 = lin.weight.grad.copy()
    lin(x)
    lin.backward(np.ones((1, 2), dtype=np.float32))
    np.testing.assert_allclose(lin.weight.grad, 2 * g1)
    lin.zero_grad()
    assert lin.weight.grad is None


def test_train_and_eval_propagate_to_every_layer():
    model = EmotionClassifier().eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_eval_mode_is_deterministic_and_uses_running_statistics():
    model = EmotionClassifier().eval()
    x = x48(3)
    np.testing.assert_array_equal(model(x), model(x))
    # Per-sample independence in eval mode: a sample's logits do not depend on the rest of the batch.
    np.testing.assert_allclose(model(x)[:1], model(x[:1]), rtol=1e-5, atol=1e-6)


def test_float64_everywhere():
    model = EmotionClassifier().double()
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert all(b.dtype == np.float64 for n, b in model.named_buffers() if "num_batches" not in n)
    assert model(x48(2, np.float64)).dtype == np.float64


# --- seeding --------------------------------------------------------------------------

def test_manual_seed_makes_weights_and_dropout_repeatable():
    def run():
        minicnn.manual_seed(123)
        model = EmotionClassifier().train()
        return model.state_dict(), model(x48(2))

    (sd1, out1), (sd2, out2) = run(), run()
    for k in sd1:
        np.testing.assert_array_equal(sd1[k], sd2[k])
    np.testing.assert_array_equal(out1, out2)
    minicnn.manual_seed(124)
    assert not np.array_equal(EmotionClassifier().state_dict()["features.0.weight"], sd1["features.0.weight"])


def test_dropout_rng_state_round_trips():
    d = nn.Dropout(0.5, seed=1)
    x = np.ones((4, 8))
    state = d.get_rng_state()
    a = d(x)
    d.set_rng_state(state)
    np.testing.assert_array_equal(d(x), a)


def test_dropout_p_one_and_zero():
    x = np.ones((3, 3), dtype=np.float32)
    np.testing.assert_array_equal(nn.Dropout(1.0)(x), 0)
    np.testing.assert_array_equal(nn.Dropout(0.0)(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nn.Dropout(1.5)


# --- devices ---------------------------------------------------------------------------

def test_array_module_is_numpy_for_numpy_arrays():
    assert get_array_module(np.ones(2)) is np
    assert get_array_module() is np


def test_device_names():
    assert normalize_device("CPU") == "cpu"
    assert normalize_device("cuda:0") == "gpu"
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        normalize_device("tpu")


@pytest.mark.skipif(minicnn.gpu_available(), reason="checks the error when no GPU is present")
def test_asking_for_the_gpu_without_one_is_one_clear_error():
    model = EmotionClassifier()
    with pytest.raises(DeviceError, match="(CuPy|GPU)"):
        model.to("gpu")
    assert model.device == "cpu"          # nothing moved


def test_to_cpu_is_a_no_op_on_cpu():
    model = EmotionClassifier()
    w = model.features[0].weight.data
    model.to("cpu")
    assert model.features[0].weight.data is w and model.device == "cpu"


# --- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 48, 48), (2, 1, 32, 32), (1, 48, 48), (2, 1, 48, 48, 1)])
def test_model_names_expected_and_actual_shape(shape):
    with pytest.raises(ValueError) as err:
        EmotionClassifier()(np.zeros(shape, dtype=np.float32))
    msg = str(err.value)
    assert "(N, 1, 48, 48)" in msg and str(shape) in msg


def test_model_rejects_integer_and_mismatched_dtypes():
    with pytest.raises(ValueError, match="float32 or float64.*uint8"):
        EmotionClassifier()(np.zeros((1, 1, 48, 48), dtype=np.uint8))
    with pytest.raises(ValueError, match="float32 parameters but got a float64 input"):
        EmotionClassifier()(np.zeros((1, 1, 48, 48)))
    with pytest.raises(ValueError, match="expects an array"):
        EmotionClassifier()([[0.0]])


@pytest.mark.parametrize("layer, shape, expected", [
    (nn.Conv2d(3, 4, 3), (2, 5, 8, 8), "(N, 3, H, W)"),
    (nn.Conv2d(3, 4, 3), (2, 3, 8), "(N, 3, H, W)"),
    (nn.BatchNorm2d(4), (2, 3, 5, 5), "(N, 4, H, W)"),
    (nn.Linear(10, 2), (2, 11), "(N, 10)"),
    (nn.MaxPool2d(2), (2, 3, 4), "(N, C, H, W)"),
])
def test_layers_name_expected_and_actual_shape(layer, shape, expected):
    with pytest.raises(ValueError) as err:
        layer(np.zeros(shape, dtype=np.float32))
    assert expected in str(err.value) and str(shape) in str(err.value)


def test_too_small_spatial_input():
    with pytest.raises(ValueError, match="smaller than the kernel"):
        nn.Conv2d(1, 1, 5)(np.zeros((1, 1, 3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        nn.MaxPool2d(4)(np.zeros((1, 1, 3, 3), dtype=np.float32))


def test_batchnorm_needs_more_than_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than one value per channel"):
        nn.BatchNorm2d(2)(np.zeros((1, 2, 1, 1), dtype=np.float32))
    nn.BatchNorm2d(2).eval()(np.zeros((1, 2, 1, 1), dtype=np.float32))    # fine in eval


@pytest.mark.parametrize("layer", [nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Dropout(), nn.Flatten(), nn.Linear(2, 2), EmotionClassifier()])
def test_backward_before_forward_says_so(layer):
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 1), dtype=np.float32))


def test_backward_with_a_wrongly_shaped_gradient():
    lin = nn.Linear(3, 2)
    lin(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(4, 2\), got \(4, 3\)"):
        lin.backward(np.zeros((4, 3), dtype=np.float32))


def test_loss_bad_labels():
    crit = nn.CrossEntropyLoss()
    logits = np.zeros((3, 7), dtype=np.float32)
    with pytest.raises(ValueError, match=r"labels of shape \(3,\)"):
        crit(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 7\)"):
        crit(logits, np.array([0, 1, 7]))
    with pytest.raises(ValueError, match="integer class labels"):
        crit(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="7 classes"):
        nn.CrossEntropyLoss(weight=np.ones(5))(logits, np.array([0, 1, 2]))
    with pytest.raises(RuntimeError, match="before the loss"):
        nn.CrossEntropyLoss().backward()


def test_load_state_dict_names_every_problem_and_changes_nothing():
    model = EmotionClassifier()
    before = model.state_dict()
    bad = dict(before)
    del bad["features.0.bias"]
    bad["features.99.weight"] = np.zeros(3)
    bad["classifier.4.weight"] = np.zeros((5, 512), dtype=np.float32)
    bad["features.1.weight"] = np.zeros(31, dtype=np.float32)
    with pytest.raises(ValueError) as err:
        model.load_state_dict(bad)
    msg = str(err.value)
    for part in ["missing keys: features.0.bias", "unexpected keys: features.99.weight",
                 "classifier.4.weight: expected (7, 512), got (5, 512)", "features.1.weight",
                 "nothing was changed"]:
        assert part in msg
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_accepts_missing_num_batches_tracked_and_copies():
    model = EmotionClassifier()
    sd = {k: v for k, v in EmotionClassifier().state_dict().items() if "num_batches_tracked" not in k}
    model.load_state_dict(sd)
    sd["features.0.weight"][...] = 0      # the model holds its own copy
    assert np.abs(model.features[0].weight.data).sum() > 0


def test_optimizer_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="Parameters"):
        optim.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(nn.Linear(2, 2).parameters(), betas=(1.0, 0.9))


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.Adam(ps, lr=0.01), lambda ps: optim.AdamW(ps)])
def test_optimizer_state_round_trips(make):
    """Saving and loading optimizer state mid-run continues exactly as if never stopped."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((3, 2)) for _ in range(6)]

    def run(split):
        p = nn.Parameter(np.ones((3, 2)))
        opt = make([p])
        for i, g in enumerate(grads):
            if i == split:
                state = {k: np.array(v) for k, v in opt.state_dict().items()}
                opt = make([p])
                opt.load_state_dict(state)
            p.grad = g.copy()
            opt.step()
        return p.data

    np.testing.assert_array_equal(run(split=None), run(split=3))


def test_optimizer_rejects_foreign_state():
    opt = optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="unexpected optimizer state entry"):
        opt.load_state_dict({"bogus": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({"state.0.momentum_buffer": np.zeros((5, 5))})
