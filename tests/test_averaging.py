"""The moving average of the weights (minicnn/training/averaging.py) and its use in training."""
import json

import numpy as np
import pytest

from minicnn.data import make_faces
from minicnn.models import EmotionClassifier
from minicnn.training import Recipe, Trainer, load_checkpoint
from minicnn.training.averaging import WeightAverage


def test_each_update_is_the_formula_with_its_warm_up():
    model = EmotionClassifier()
    w = model.features[0].weight.data
    bn = model.features[1]
    avg = WeightAverage(model, 0.5)
    expected, expected_mean = w.astype(np.float64).copy(), bn.running_mean.astype(np.float64).copy()
    rng = np.random.default_rng(0)
    for t in range(4):
        w[...] = rng.normal(size=w.shape)
        bn.running_mean[...] = rng.normal(size=bn.running_mean.shape)
        bn.num_batches_tracked[...] = t + 7
        d = min(0.5, (1 + t) / (10 + t))               # 0.1, 0.18, 0.25, then the decay 0.5
        assert avg.rate() == pytest.approx(d)
        avg.update(model)
        expected = d * expected + (1 - d) * w
        expected_mean = d * expected_mean + (1 - d) * bn.running_mean
    np.testing.assert_allclose(avg.avg["features.0.weight"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(avg.avg["features.1.running_mean"], expected_mean, rtol=1e-5, atol=1e-6)
    assert int(avg.avg["features.1.num_batches_tracked"]) == 10          # a counter: copied
    assert avg.steps == 4


def test_swapped_in_holds_the_average_and_then_the_weights_again():
    model = EmotionClassifier()
    avg = WeightAverage(model, 0.9)
    before = model.state_dict()
    for a in avg.avg.values():
        if a.dtype.kind == "f":
            a += 1
    held = model.features[0].weight.data
    with avg.swapped_in(model):
        assert model.features[0].weight.data is held                       # (in place)
        np.testing.assert_array_equal(held, before["features.0.weight"] + 1)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_a_bad_decay_or_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="ema must be in"):
        Recipe(ema=1.0)
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(EmotionClassifier(), 0)
    avg = WeightAverage(EmotionClassifier(), 0.9)
    state = avg.state_dict()
    state["features.0.weight"] = np.zeros((1, 2))
    with pytest.raises(ValueError, match="features.0.weight has shape"):
        avg.load_state_dict(state, 3)
    del state["features.0.weight"]
    with pytest.raises(ValueError, match="lacks features.0.weight"):
        avg.load_state_dict(state, 3)


def test_training_validates_and_keeps_the_average(tmp_path):
    """Validation runs on the average, best.npz holds it (what ships), last.npz holds the live
    weights for resuming and the average beside the optimizer's state."""
    data = {"train": make_faces(96, 0), "val": make_faces(28, 1), "test": make_faces(28, 2)}
    recipe = Recipe(epochs=1, batch_size=16, lr=0.02, warmup_epochs=0.5, seed=3, ema=0.8)
    tr = Trainer(data, recipe, out_dir=str(tmp_path), progress=False, log=lambda m: None)
    tr.fit()
    assert tr.average.steps == 6
    averaged, live = tr.average.state_dict(), tr.model.state_dict()
    assert not np.array_equal(averaged["features.0.weight"], live["features.0.weight"])
    best, _, meta = load_checkpoint(str(tmp_path / "best.npz"))
    for k, v in averaged.items():
        np.testing.assert_array_equal(best[k], v, err_msg=k)
    last, optim, _ = load_checkpoint(str(tmp_path / "last.npz"))
    for k, v in live.items():
        np.testing.assert_array_equal(last[k], v, err_msg=k)
        np.testing.assert_array_equal(optim[f"ema/{k}"], averaged[k], err_msg=k)
    assert json.loads((tmp_path / "last.json").read_text())["average_steps"] == 6
    with tr.averaged_weights():
        _, val_acc = tr._validate()
    assert tr.history[-1]["val_acc"] == val_acc
    assert tr.history[-1]["val_acc_live"] == tr._validate()[1]              # and the live weights' beside it
    assert tr.evaluate("val", weights="current")["accuracy"] == pytest.approx(val_acc)
    assert tr.evaluate("val", weights="best")["accuracy"] == pytest.approx(val_acc)


def test_the_cli_sets_the_decay():
    from minicnn.cli import build_parser, recipe_from_args
    args = build_parser().parse_args(["train", "--data", "x", "--ema", "0.999"])
    assert recipe_from_args(args).ema == 0.999
    assert recipe_from_args(build_parser().parse_args(["train", "--data", "x"])).ema == 0.0
