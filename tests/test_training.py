"""The training loop, checkpoints, resume, guards, evaluation, prediction and the CLI."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from minicnn.cli import main as cli
from minicnn.data import make_faces
from minicnn.inference import EmotionPredictor, load_face, prepare_face
from minicnn.nn import Parameter
from minicnn.training import (CheckpointError, CosineWarmup, ReduceOnPlateau, Recipe, StepDecay, Trainer,
                              TrainingDiverged, classification_report, clip_grad_norm, load_checkpoint,
                              load_model, save_checkpoint)

from conftest import torch_or_skip


def tiny_data(n_train=96, seed=0):
    return {"train": make_faces(n_train, seed), "val": make_faces(28, seed + 1), "test": make_faces(28, seed + 2)}


def tiny_recipe(**kw):
    base = dict(epochs=2, batch_size=16, lr=0.02, warmup_epochs=0.5, seed=3,
                augment=dict(crop=2, flip=True, rotate=5.0, scale=0.05, erase=0.25))
    base.update(kw)
    return Recipe(**base)


def weights(trainer):
    return trainer.model.state_dict()


def test_fit_writes_log_checkpoints_and_learns(tmp_path):
    tr = Trainer(tiny_data(), tiny_recipe(epochs=3), out_dir=str(tmp_path), progress=False, log=lambda m: None)
    history = tr.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert rows == json.loads(json.dumps(history))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"):
        assert all(math.isfinite(r[key]) for r in rows)
    assert (tmp_path / "last.npz").exists() and (tmp_path / "best.npz").exists()
    meta = json.loads((tmp_path / "last.json").read_text())      # readable metadata beside it
    assert meta["epoch"] == 3 and meta["model"] == "EmotionClassifier"
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_same_seed_same_run(tmp_path):
    a = Trainer(tiny_data(), tiny_recipe(epochs=1), out_dir=str(tmp_path / "a"), progress=False, log=lambda m: None)
    b = Trainer(tiny_data(), tiny_recipe(epochs=1), out_dir=str(tmp_path / "b"), progress=False, log=lambda m: None)
    a.fit(), b.fit()
    for k, v in weights(a).items():
        np.testing.assert_array_equal(v, weights(b)[k])


@pytest.mark.parametrize("ema", [0.0, 0.9])           # without and with a weight average
@pytest.mark.parametrize("stop_after", [3, 6, 9])     # mid-epoch, end of an epoch, mid-epoch 2
def test_resume_ends_with_exactly_the_uninterrupted_weights(tmp_path, stop_after, ema):
    quiet = dict(progress=False, log=lambda m: None)
    straight = Trainer(tiny_data(), tiny_recipe(ema=ema), out_dir=str(tmp_path / "straight"), **quiet)
    straight.fit()

    out = str(tmp_path / "stopped")
    first = Trainer(tiny_data(), tiny_recipe(ema=ema), out_dir=out, **quiet)
    step = first.optimizer.step
    calls = []

    def step_then_ctrl_c():
        step()
        calls.append(1)
        if len(calls) == stop_after:
            first.request_stop()          # what the Ctrl-C handler does
    first.optimizer.step = step_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    meta = json.loads(open(os.path.join(out, "last.json")).read())
    assert meta["epoch"] * 6 + meta["batch"] == stop_after       # 96 images / 16 = 6 steps per epoch

    resumed = Trainer(tiny_data(), tiny_recipe(ema=ema), out_dir=out, **quiet)
    resumed.fit(resume=True)
    for k, v in weights(straight).items():
        np.testing.assert_array_equal(weights(resumed)[k], v, err_msg=k)
    assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in straight.history]
    if ema:
        assert resumed.average.steps == straight.average.steps == 12
        for k, v in straight.average.state_dict().items():
            np.testing.assert_array_equal(resumed.average.state_dict()[k], v, err_msg=f"average of {k}")


def test_resume_refuses_a_different_recipe(tmp_path):
    quiet = dict(progress=False, log=lambda m: None)
    Trainer(tiny_data(), tiny_recipe(epochs=1), out_dir=str(tmp_path), **quiet).fit()
    with pytest.raises(CheckpointError, match="recipe"):
        Trainer(tiny_data(), tiny_recipe(epochs=1, lr=0.5), out_dir=str(tmp_path), **quiet).fit(resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    quiet = dict(progress=False, log=lambda m: None)
    tr = Trainer(tiny_data(), tiny_recipe(epochs=3), out_dir=str(tmp_path), **quiet)
    forward = tr.criterion.forward
    calls = []

    def nan_in_epoch_two(logits, labels):
        calls.append(1)
        loss = forward(logits, labels)
        return loss * np.nan if len(calls) == 8 else loss
    tr.criterion.forward = nan_in_epoch_two
    with pytest.raises(TrainingDiverged, match="epoch 2, batch 2.*last good checkpoint"):
        tr.fit()
    _, _, meta = load_checkpoint(str(tmp_path / "last.npz"))
    assert meta["epoch"] == 1 and meta["batch"] == 0
    state, _, _ = load_checkpoint(str(tmp_path / "last.npz"))
    assert all(np.isfinite(v).all() for v in state.values())


def test_checkpoint_errors_name_the_file_and_lose_nothing(tmp_path):
    quiet = dict(progress=False, log=lambda m: None)
    tr = Trainer(tiny_data(), tiny_recipe(epochs=1), out_dir=str(tmp_path), **quiet)
    tr.fit()
    good = (tmp_path / "best.npz").read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.npz"):
        load_model(str(truncated))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(str(tmp_path / "missing.npz"))
    other = tmp_path / "other.npz"
    save_checkpoint(str(other), {"w": np.zeros(3)}, meta={"model": "ResNet"})
    with pytest.raises(CheckpointError, match="not an EmotionClassifier"):
        load_model(str(other))
    wrong = tmp_path / "wrong.npz"
    state, _, meta = load_checkpoint(str(tmp_path / "best.npz"))
    state["classifier.4.weight"] = np.zeros((5, 512), np.float32)
    save_checkpoint(str(wrong), state, meta=meta)
    with pytest.raises(CheckpointError, match=r"wrong.npz.*classifier.4.weight"):
        load_model(str(wrong))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled.npz"):
        load_model(str(pickled))
    assert (tmp_path / "best.npz").read_bytes() == good


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    save_checkpoint(str(path), {"a": np.ones(3)}, meta={"model": "x"})
    before = path.read_bytes()
    import minicnn.training.checkpoint as ck

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(path), {"a": np.zeros(3)}, meta={"model": "x"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_evaluate_and_tta(tmp_path):
    tr = Trainer(tiny_data(), tiny_recipe(epochs=1), out_dir=str(tmp_path), progress=False, log=lambda m: None)
    tr.fit()
    plain, tta = tr.evaluate("test"), tr.evaluate("test", tta=True)
    for r in (plain, tta):
        assert r["probs"].shape == (28, 7)
        np.testing.assert_allclose(r["probs"].sum(1), 1, rtol=1e-6)
        assert 0 <= r["accuracy"] <= 1 and len(r["per_class"]) == 7
    assert not np.allclose(plain["probs"], tta["probs"])


# --- pieces --------------------------------------------------------------------------------

def test_schedules():
    cos = CosineWarmup(0.1, steps_per_epoch=10, epochs=5, warmup_epochs=1)
    assert cos.lr(0, 0) == pytest.approx(0.01) and cos.lr(0, 9) == pytest.approx(0.1)
    assert cos.lr(4, 9) < 0.002 and cos.lr(3, 0) == pytest.approx(0.05, rel=0.01)   # halfway after warm-up
    step = StepDecay(0.1, 10, step_epochs=2, gamma=0.5)
    assert [step.lr(e, 0) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    plat = ReduceOnPlateau(0.1, 10, factor=0.5, patience=1)
    for acc in (0.5, 0.6, 0.6, 0.6):
        plat.end_epoch(acc)
    assert plat.lr(0, 0) == pytest.approx(0.05)
    again = ReduceOnPlateau(0.1, 10, factor=0.5, patience=1)
    again.load_state_dict(plat.state_dict())
    assert again.state_dict() == plat.state_dict()


def test_clip_grad_norm_matches_torch():
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    params = [Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    tparams = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for p, g in zip(tparams, grads):
        p.grad = torch.from_numpy(g.copy())
    norm = clip_grad_norm(params, 1.0)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
    assert norm == pytest.approx(float(tnorm))
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-12)


def test_classification_report():
    r = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["b"]["recall"] == pytest.approx(1.0)
    assert r["per_class"]["c"]["f1"] == 0.0
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_prepare_face_any_size_and_colour(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8), "RGB")
    face = prepare_face(rgb)
    assert face.shape == (48, 48) and face.dtype == np.uint8
    path = tmp_path / "face.png"
    rgb.save(path)
    np.testing.assert_array_equal(load_face(path), face)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    from minicnn.data import DatasetError
    with pytest.raises(DatasetError, match="bad.jpg"):
        load_face(bad)


# --- the command line --------------------------------------------------------------------------

def test_cli_train_evaluate_predict(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    import minicnn.data as data_mod
    monkeypatch.setattr(data_mod, "synthetic_splits", lambda seed=0: tiny_data(seed=seed))
    out = tmp_path / "run"
    assert cli(["train", "--epochs", "1", "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "built-in synthetic faces" in err
    for name in ("best.npz", "last.npz", "log.jsonl", "curves.png", "confusion.png", "samples.png",
                 "test_report.json"):
        assert (out / name).exists(), name
    assert cli(["evaluate", "--weights", str(out / "best.npz"), "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "confusion matrix" in text
    assert (tmp_path / "ev" / "confusion_test.png").exists()
    img = tmp_path / "face.jpg"
    Image.fromarray(make_faces(1, seed=9)[0][0]).resize((300, 260)).convert("RGB").save(img)
    assert cli(["predict", str(img), "--weights", str(out / "best.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{img}: 1 face" and lines[1].startswith("  face 1 at [") and len(lines) == 9
    assert abs(sum(float(l.split()[-1].rstrip("%")) for l in lines[2:]) - 100) < 0.5
    predictor = EmotionPredictor(str(out / "best.npz"))
    probs = predictor.predict(load_face(img))
    assert probs.shape == (1, 7)
    # Shippable weights: float32 arrays, a card, and the same predictions.
    assert cli(["export", str(out / "best.npz"), "--report", str(out / "test_report.json"),
                "--out", str(tmp_path / "shipped")]) == 0
    card = json.loads((tmp_path / "shipped.json").read_text())
    assert set(card["test"]["per_class"]) == set(predictor.classes) and card["normalization"]["std"] > 0
    state, optim_state, _ = load_checkpoint(str(tmp_path / "shipped.npz"))
    assert optim_state == {} and all(v.dtype == np.float32 for k, v in state.items() if "num_batches" not in k)
    np.testing.assert_allclose(EmotionPredictor(str(tmp_path / "shipped.npz")).predict(load_face(img)), probs)


def test_without_a_validation_split_the_last_epoch_is_kept(tmp_path):
    """--val-fraction 0 (a fixed recipe on all of Training): no validation, best.npz = each epoch's
    weights in turn, the log says so, and a schedule that follows validation is refused."""
    data = tiny_data()
    data["val"] = (data["val"][0][:0], data["val"][1][:0])
    logs = []
    tr = Trainer(data, tiny_recipe(ema=0.5), out_dir=str(tmp_path), progress=False, log=logs.append)
    history = tr.fit()
    assert [h["val_acc"] for h in history] == [None, None] and "val_acc_live" not in history[-1]
    assert "no validation" in logs[-1]
    best, _, _ = load_checkpoint(str(tmp_path / "best.npz"))
    for k, v in tr.average.state_dict().items():                       # the last epoch's (averaged) weights
        np.testing.assert_array_equal(best[k], v, err_msg=k)
    assert tr.evaluate("test")["accuracy"] >= 0
    from minicnn.training.plots import plot_curves
    plot_curves(str(tmp_path / "log.jsonl"), str(tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="follows the validation accuracy"):
        Trainer(data, tiny_recipe(schedule="plateau"), out_dir=str(tmp_path / "p"), progress=False)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "no dataset at" in capsys.readouterr().err
    assert cli(["predict", str(tmp_path / "x.jpg"), "--weights", str(tmp_path / "w.npz")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli(["train", "--cuda-graph", "--out", str(tmp_path / "r")]) == 2
    assert "--cuda-graph needs --device gpu" in capsys.readouterr().err
    assert cli(["summary"]) == 0
    assert "1,572,551" in capsys.readouterr().out


def test_shipped_weights_load_and_predict():
    from minicnn.weights import default_weights_path
    predictor = EmotionPredictor()
    assert predictor.classes == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    card = json.loads(open(default_weights_path().replace(".npz", ".json")).read())
    assert card["test"]["accuracy"] >= 0.66 and card["normalization"]["mean"] == predictor.mean
    probs = predictor.predict(make_faces(3, seed=0)[0])
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1)


FER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fer2013")


@pytest.mark.skipif(not os.path.isdir(FER), reason="FER2013 folder (../shared/data/fer2013) not present")
def test_shipped_weights_on_real_fer2013_faces():
    """The shipped network really recognises expressions: well above chance on PublicTest faces."""
    from minicnn.data import load_fer2013
    x, y = load_fer2013(FER, progress=False)["test"]
    idx = np.random.default_rng(0).permutation(len(y))[:800]
    acc = (EmotionPredictor().predict(x[idx]).argmax(1) == y[idx]).mean()
    assert acc > 0.6, acc


def test_progress_rate_leaves_out_the_warm_up_step_and_the_time_between_epochs():
    from minicnn.training.trainer import RecentRate
    rate = RecentRate(window=50)
    rate.start(0.0)
    rate.step_done(64, now=10.0)                  # the first step compiles: 10 s
    assert rate.rate() is None
    rate.step_done(64, now=10.1)
    assert rate.rate() is None                    # one timed step: not yet
    for i in range(2, 6):
        rate.step_done(64, now=10.0 + 0.1 * i)
    assert rate.rate() == pytest.approx(640)      # 64 images per 0.1 s, the 10 s left out
    rate.start(100.0)                             # the next epoch, after a long validation
    rate.step_done(64, now=100.1)
    rate.step_done(64, now=100.2)
    assert rate.rate() == pytest.approx(640)


def test_plateau_then_cosine_reduces_on_plateau_then_decays_to_zero_and_resumes():
    from minicnn.training.schedules import PlateauThenCosine
    s = PlateauThenCosine(0.1, steps_per_epoch=10, epochs=10, final_epochs=4, factor=0.5, patience=1)
    rates = []
    for epoch, metric in enumerate([0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]):
        rates.append([s.lr(epoch, step) for step in range(10)])
        s.end_epoch(metric)
        if epoch == 6:
            saved = s.state_dict()
    assert rates[0][0] == rates[3][9] == 0.1                 # two epochs without gain: patience 1 -> halve
    assert rates[4][0] == 0.05                               # (after epoch 3)
    assert rates[6][0] == pytest.approx(0.05)                # the decay starts from the rate reached
    assert rates[9][9] < 0.002 and all(a >= b for a, b in zip(sum(rates[6:], []), sum(rates[6:], [])[1:]))
    assert rates[7][0] < rates[6][0]
    again = PlateauThenCosine(0.1, 10, 10, 4, factor=0.5, patience=1)
    again.load_state_dict(saved)
    assert [again.lr(7, k) for k in range(10)] == rates[7]


def test_named_recipes_and_explicit_options_on_top():
    from minicnn.training.trainer import PRESETS
    long = Recipe.preset("fer2013-long")
    assert long.epochs == 120 and long.schedule == "plateau-cosine" and long.augment["erase"] == 0.5
    assert Recipe.preset("fer2013-long", lr=0.05).lr == 0.05
    assert Recipe.preset("default") == Recipe()
    assert set(PRESETS) >= {"default", "fer2013-long"}
    with pytest.raises(ValueError, match="unknown recipe 'fast': use one of default, fer2013-long"):
        Recipe.preset("fast")
    with pytest.raises(ValueError, match="plateau_factor must be in"):
        Recipe(plateau_factor=0.0)


@pytest.mark.parametrize("argv, expected", [
    ([], dict(schedule="cosine", lr=0.02, epochs=50, augment=dict(crop=4, flip=True, rotate=10.0, scale=0.1, erase=0.0))),
    (["--recipe", "fer2013-long"], dict(schedule="plateau-cosine", plateau_patience=5, lr=0.01, epochs=120)),
    (["--recipe", "fer2013-long", "--epochs", "1", "--lr", "0.03", "--erase", "0.2"],
     dict(schedule="plateau-cosine", lr=0.03, epochs=1, augment=dict(crop=10, flip=True, rotate=10.0, scale=0.2,
                                                                         erase=0.2))),
    (["--recipe", "fer2013-long", "--no-augment", "--schedule", "cosine"], dict(augment=None, schedule="cosine")),
])
def test_cli_recipe_option_sets_the_recipe_and_options_override_it(argv, expected):
    from minicnn.cli import build_parser, recipe_from_args
    recipe = recipe_from_args(build_parser().parse_args(["train", "--data", "x"] + argv), builtin=False)
    for key, value in expected.items():
        assert getattr(recipe, key) == value, key


def test_a_plateau_schedule_saves_strict_json_before_its_first_epoch():
    from minicnn.training.schedules import ReduceOnPlateau
    s = ReduceOnPlateau(0.1, 10)
    text = json.dumps(s.state_dict(), allow_nan=False)          # (no -Infinity)
    again = ReduceOnPlateau(0.1, 10)
    again.load_state_dict(json.loads(text))
    again.end_epoch(0.3)
    assert again.best == 0.3 and again.bad == 0
    again.load_state_dict({"current": 0.05, "best": float("-inf"), "bad": 2})    # (older checkpoints)
    assert again.best == float("-inf")
