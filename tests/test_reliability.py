"""Bad input gets a clear error and loses nothing: the run folder, checkpoints under SIGKILL, values
that make no sense, hostile files. Tables a reviewer can extend: add a row, not a test."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from minicnn.data import make_faces
from minicnn.training import (CheckpointError, Recipe, RunFolderError, Trainer, TrainingDiverged, load_checkpoint,
                              save_checkpoint)

QUIET = dict(progress=False, log=lambda m: None)


def tiny_data(n_train=32, seed=0):
    return {"train": make_faces(n_train, seed), "val": make_faces(16, seed + 1), "test": make_faces(16, seed + 2)}


def tiny_recipe(**kw):
    base = dict(epochs=1, batch_size=16, lr=0.02, warmup_epochs=0.5, seed=3, augment=None)
    base.update(kw)
    return Recipe(**base)


# --- one run, one folder ---------------------------------------------------------------------------
def test_a_new_run_refuses_a_folder_holding_another_unless_told(tmp_path):
    Trainer(tiny_data(), tiny_recipe(), out_dir=str(tmp_path), **QUIET).fit()
    before = {f: os.path.getmtime(tmp_path / f) for f in ("last.npz", "best.npz", "log.jsonl")}
    with pytest.raises(RunFolderError, match="holds another run.*--resume.*--overwrite"):
        Trainer(tiny_data(), tiny_recipe(), out_dir=str(tmp_path), **QUIET).fit()
    assert {f: os.path.getmtime(tmp_path / f) for f in before} == before          # nothing touched
    Trainer(tiny_data(), tiny_recipe(lr=0.01), out_dir=str(tmp_path), overwrite=True, **QUIET).fit()
    _, _, meta = load_checkpoint(str(tmp_path / "last.npz"))
    assert meta["recipe"]["lr"] == 0.01 and len(open(tmp_path / "log.jsonl").readlines()) == 1


def test_two_runs_cannot_share_a_folder(tmp_path):
    """A second process that tries the folder while the first trains stops at once, naming the holder."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, time
        f = open({str(tmp_path / '.minicnn.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)
        f.write('pid 4242'); f.flush(); print('locked', flush=True); time.sleep(60)""")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match="in use by another minicnn run \\(pid 4242\\)"):
            Trainer(tiny_data(), tiny_recipe(), out_dir=str(tmp_path), **QUIET).fit()
        assert not (tmp_path / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    Trainer(tiny_data(), tiny_recipe(), out_dir=str(tmp_path), **QUIET).fit()      # free again once it died


def test_resume_checks_the_data_and_the_recipe(tmp_path):
    Trainer(tiny_data(), tiny_recipe(epochs=2), out_dir=str(tmp_path), **QUIET).fit()
    with pytest.raises(CheckpointError, match="other data"):
        Trainer(tiny_data(seed=5), tiny_recipe(epochs=2), out_dir=str(tmp_path), **QUIET).fit(resume=True)
    with pytest.raises(CheckpointError, match="recipe"):
        Trainer(tiny_data(), tiny_recipe(epochs=2, lr=0.5), out_dir=str(tmp_path), **QUIET).fit(resume=True)


def test_an_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        Trainer(tiny_data(), tiny_recipe(), out_dir=str(f), **QUIET).fit()
    assert f.read_text() == "x"


def test_a_diverged_model_saves_nothing(tmp_path):
    """The guard checks what it saves: a NaN weight stops the run before any checkpoint is written."""
    tr = Trainer(tiny_data(), tiny_recipe(epochs=2), out_dir=str(tmp_path), **QUIET)
    tr.fit()                                        # epochs 1-2 saved
    before = open(tmp_path / "last.npz", "rb").read()
    tr2 = Trainer(tiny_data(), tiny_recipe(epochs=3), out_dir=str(tmp_path / "b"), **QUIET)
    tr2.model.features[4].weight.data[0, 0, 0, 0] = np.nan
    with pytest.raises(TrainingDiverged):
        tr2.fit()
    assert not (tmp_path / "b" / "last.npz").exists() and not (tmp_path / "b" / "best.npz").exists()
    tr.model.classifier[1].weight.data[0, 0] = np.inf
    with pytest.raises(TrainingDiverged, match="NaN or inf.*classifier.1.weight.*nothing was saved"):
        tr.save("last.npz")
    assert open(tmp_path / "last.npz", "rb").read() == before


# --- SIGKILL at random instants of saving -------------------------------------------------------------
KILLED_RUN = """
import os, sys
from minicnn.data import make_faces
from minicnn.training import Recipe, Trainer
data = {"train": make_faces(32, 0), "val": make_faces(16, 1), "test": make_faces(16, 2)}
recipe = Recipe(epochs=int(sys.argv[3]), batch_size=16, lr=0.02, warmup_epochs=0.5, seed=3, augment=None)
tr = Trainer(data, recipe, out_dir=sys.argv[1], progress=False, log=lambda m: None)
if os.environ.get("STOP_AFTER_AN_EPOCH"):       # stop as Ctrl-C does, after one more epoch
    tr.log = lambda m: tr.request_stop() if m.startswith("epoch") else None
try:
    tr.fit(resume=sys.argv[2] == "resume")
except KeyboardInterrupt:
    pass
"""


def _check_folder(out, final=False):
    """Whatever the instant of the kill: the checkpoints load and agree with each other."""
    last = os.path.join(out, "last.npz")
    if not os.path.exists(last):
        return None
    _, _, meta = load_checkpoint(last)                      # loads (never half-written)
    if os.path.exists(os.path.join(out, "best.npz")):
        _, _, best = load_checkpoint(os.path.join(out, "best.npz"))
        assert best["best_val_acc"] <= meta["best_val_acc"] or best["epoch"] == meta["epoch"] + 1
        assert best["epoch"] <= meta["epoch"] + 1           # best is last's epoch or the one being saved
    if final:                                               # after a start: repaired and cleaned
        assert json.load(open(os.path.join(out, "last.json"))) == meta
        rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        assert [r["epoch"] for r in rows] == list(range(1, meta["epoch"] + 1))
        assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    return meta["epoch"]


def test_sigkill_at_any_instant_leaves_a_consistent_run_folder(tmp_path):
    out = str(tmp_path / "run")
    rng = random.Random(0)
    epochs_seen = []
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, out, "resume" if attempt else "new", "100000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ,
                                                                                           MINICNN_QUIET="1"))
        time.sleep(rng.uniform(2.0, 5.0))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        epochs_seen.append(_check_folder(out))
    assert any(e for e in epochs_seen), "no kill came after the first save: slow machine?"
    # One more start, stopped cleanly by a short run: the folder is repaired, the log has each epoch once.
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, out, "resume", "100000"], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, STOP_AFTER_AN_EPOCH="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_folder(out, final=True)


# --- values that make no sense: a clear one-line error, before any work, nothing written --------------
BAD_TRAIN_ARGS = [
    (["--clip-grad-norm", "-5"], "clip_grad_norm must be"),
    (["--val-fraction", "-0.1"], "val_fraction must be in \\[0, 1\\)"),
    (["--val-fraction", "1"], "val_fraction must be in \\[0, 1\\)"),
    (["--epochs", "0"], "epochs must be a whole number >= 1"),
    (["--erase", "2"], "erase must be a probability"),
    (["--lr", "nan"], "lr must be a finite number > 0"),
    (["--lr", "-1"], "lr must be a finite number > 0"),
    (["--batch-size", "0"], "batch_size must be"),
    (["--weight-decay", "inf"], "weight_decay must be"),
    (["--label-smoothing", "1.5"], "label_smoothing must be"),
]


@pytest.mark.parametrize("args, message", BAD_TRAIN_ARGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_ARGS])
def test_bad_training_values_are_refused_before_any_work(args, message, tmp_path, capsys):
    from minicnn.cli import main
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minicnn: error: ") and __import__("re").search(message, err[-1]), err
    assert not out.exists()


def test_an_out_that_is_a_file_and_data_that_is_an_image_are_one_line_errors(tmp_path, capsys):
    from PIL import Image
    from minicnn.cli import main
    (tmp_path / "f").write_text("x")
    assert main(["train", "--out", str(tmp_path / "f"), "--no-progress", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("minicnn: error: ")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "face.png")
    assert main(["evaluate", "--data", str(tmp_path / "face.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minicnn: error: ") and "face.png" in err[-1]


# --- hostile and broken checkpoints ---------------------------------------------------------------
def _shipped_state():
    from minicnn.weights import default_weights_path
    state, _, meta = load_checkpoint(default_weights_path())
    return dict(state), dict(meta)


def _checkpoint_cases(tmp_path):
    state, meta = _shipped_state()
    cases = {}

    def write(name, state=state, meta=meta):
        path = str(tmp_path / name)
        save_checkpoint(path, state, meta=meta)
        return path
    cases["huge num_classes in the metadata"] = (write("huge.npz", meta=dict(meta, num_classes=10 ** 11)),
                                                 "num_classes")
    cases["num_classes not a number"] = (write("str.npz", meta=dict(meta, num_classes="7")), "num_classes")
    cases["another model"] = (write("other.npz", meta=dict(meta, model="ResNet")), "not an EmotionClassifier")
    cases["a missing tensor"] = (write("missing.npz", state={k: v for k, v in state.items()
                                                            if k != "features.0.bias"}), "features.0.bias")
    cases["a wrong shape"] = (write("shape.npz", state=dict(state, **{"features.0.weight": np.zeros((3, 3))})),
                              "features.0.weight")
    random_bytes = tmp_path / "random.npz"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(5000))
    cases["random bytes"] = (str(random_bytes), "random.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(write("whole.npz"), "rb").read()[:100000])
    cases["truncated"] = (str(truncated), "truncated.npz")
    return cases


def test_every_broken_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    from minicnn.cli import main
    from PIL import Image
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "face.png")
    for what, (path, message) in _checkpoint_cases(tmp_path).items():
        assert main(["predict", str(tmp_path / "face.png"), "--weights", path]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("minicnn: error: ") and message in err[0], (what, err)
        assert "pickle" not in err[0], (what, err)


def test_export_of_the_shipped_weights_works(tmp_path):
    from minicnn.cli import main
    from minicnn.weights import default_weights_path
    assert main(["export", default_weights_path(), "--out", str(tmp_path / "again")]) == 0
    a, _, _ = load_checkpoint(default_weights_path())
    b, _, _ = load_checkpoint(str(tmp_path / "again.npz"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- load_state_dict: all or nothing ------------------------------------------------------------------
BAD_STATE = [
    ("an object array", lambda sd: sd.update({"classifier.4.bias": np.array([None] * 7, dtype=object)}), "dtype object"),
    ("a value that overflows float32", lambda sd: sd.update({"classifier.4.bias": np.full(7, 1e300)}), "overflow"),
    ("a string", lambda sd: sd.update({"classifier.4.bias": "seven"}), "classifier.4.bias"),
    ("a count that does not fit", lambda sd: sd.update({"features.1.num_batches_tracked": np.array(2.5)}),
     "do not fit"),
    ("a wrong shape, last", lambda sd: sd.update({"classifier.4.weight": np.zeros((3, 512), np.float32)}),
     "classifier.4.weight"),
]


@pytest.mark.parametrize("what, spoil, message", BAD_STATE, ids=[b[0] for b in BAD_STATE])
def test_load_state_dict_is_all_or_nothing(what, spoil, message):
    import minicnn
    minicnn.manual_seed(0)
    model = minicnn.models.EmotionClassifier()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    minicnn.manual_seed(1)
    other = minicnn.models.EmotionClassifier().state_dict()
    spoil(other)
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(other)
    after = model.state_dict()
    assert all(np.array_equal(after[k], before[k]) for k in before), f"{what}: something was overwritten"


# --- images: every mode Pillow opens, decoded the same way everywhere -------------------------------------
def _gradient(h=60, w=60):
    return np.add.outer(np.arange(h), np.arange(w)) / (h + w - 2)          # 0..1, dark top-left


def _image_cases(tmp_path):
    """(name, path, what the decoded face's mean brightness should be near, or an error message)."""
    from PIL import Image
    g = _gradient()
    cases = []

    def save(name, im, **kw):
        path = tmp_path / name
        im.save(path, **kw)
        return str(path)
    cases.append(("8-bit gray PNG", save("g8.png", Image.fromarray((g * 255).astype(np.uint8))), 127))
    cases.append(("16-bit PNG", save("g16.png", Image.fromarray((g * 65535).astype(np.uint16))), 127))
    cases.append(("float TIFF in 0..1", save("gf.tif", Image.fromarray(g.astype(np.float32), "F")), 127))
    cases.append(("float TIFF in 0..255", save("gf255.tif", Image.fromarray((g * 255).astype(np.float32), "F")), 127))
    cases.append(("RGB JPEG", save("rgb.jpg", Image.fromarray((np.stack([g] * 3, -1) * 255).astype(np.uint8))), 127))
    rgba = np.zeros((60, 60, 4), np.uint8)
    rgba[..., 3] = 0                                  # fully transparent: composited on white
    cases.append(("transparent RGBA PNG", save("rgba.png", Image.fromarray(rgba, "RGBA")), 255))
    cases.append(("palette GIF", save("p.gif", Image.fromarray((g * 255).astype(np.uint8)).convert("P")), 127))
    cases.append(("1-bit BMP", save("b.bmp", Image.fromarray(g > 0.5)), 127))
    cases.append(("WebP", save("w.webp", Image.fromarray((g * 255).astype(np.uint8)), lossless=True), 127))
    cases.append(("CMYK JPEG", save("c.jpg", Image.fromarray((np.stack([g] * 3, -1) * 255).astype(np.uint8))
                                     .convert("CMYK")), 127))
    broken = tmp_path / "truncated.png"
    broken.write_bytes(open(cases[0][1], "rb").read()[:60])
    cases.append(("truncated PNG", str(broken), "truncated.png"))
    (tmp_path / "text.jpg").write_text("not an image")
    cases.append(("text named .jpg", str(tmp_path / "text.jpg"), "text.jpg"))
    return cases


def test_every_image_mode_decodes_to_the_right_brightness_or_a_clear_error(tmp_path):
    from minicnn.data.images import ImageError, decode_face
    for name, path, want in _image_cases(tmp_path):
        if isinstance(want, str):
            with pytest.raises(ImageError, match=want):
                decode_face(path)
            continue
        face = decode_face(path)
        assert face.shape == (48, 48) and face.dtype == np.uint8, name
        assert abs(float(face.mean()) - want) < 20, (name, face.mean())


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an EXIF orientation comes out upright."""
    from PIL import Image
    from minicnn.data.images import decode_face
    g = (_gradient(60, 60) * 255).astype(np.uint8)
    g[:, :30] = 0                                    # upright: the left half dark
    upright = Image.fromarray(g)
    stored = upright.transpose(Image.Transpose.ROTATE_90)          # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6                                 # "rotate 90 CW to display"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    face = decode_face(tmp_path / "phone.jpg")
    assert face[:, :20].mean() < 40 and face[:, 28:].mean() > 100


def test_a_decompression_bomb_is_refused_with_a_clear_error(tmp_path):
    from PIL import Image
    from minicnn.data.images import ImageError, decode_face
    Image.new("L", (9000, 9000)).save(tmp_path / "bomb.png", optimize=True)     # 81 Mpixels, a small file
    with pytest.raises(ImageError, match="bomb.png.*(decompression bomb|more than)"):
        decode_face(tmp_path / "bomb.png")


def test_datasets_and_predict_crop_the_same_way(tmp_path):
    """A non-square dataset image is centre-cropped as predict does, not squashed."""
    from PIL import Image
    from minicnn.data import load_fer2013
    from minicnn.data.images import decode_face
    wide = np.zeros((48, 96), np.uint8)
    wide[:, 24:72] = 200                              # a bright square in the middle of a wide image
    for split in ("train", "test"):
        for emotion in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"):
            d = tmp_path / "fer" / split / emotion
            d.mkdir(parents=True)
            Image.fromarray(wide).save(d / "a.png")
    (tmp_path / "fer" / "train" / "happy" / "._a.png").write_bytes(b"\x00\x05\x16\x07")   # macOS metadata
    (tmp_path / "fer" / "train" / ".ipynb_checkpoints").mkdir()
    data = load_fer2013(str(tmp_path / "fer"), use_cache=False, progress=False)
    face = decode_face(tmp_path / "fer" / "train" / "angry" / "a.png")
    assert face.min() > 150                           # the central square only: no dark sides squashed in
    np.testing.assert_array_equal(data["train"][0][0], face)


def test_predict_reports_a_bad_file_and_goes_on(tmp_path, capsys):
    from PIL import Image
    from minicnn.cli import main
    Image.fromarray(np.full((48, 48), 100, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    Image.fromarray(np.full((48, 48), 200, np.uint8)).save(tmp_path / "c.png")
    assert main(["predict", str(tmp_path / "a.png"), str(tmp_path / "bad.jpg"), str(tmp_path / "c.png")]) == 1
    out, err = capsys.readouterr()
    assert "a.png:" in out and "c.png:" in out and "bad.jpg" in err and "1 of 3" in err


# --- CSVs with each defect ------------------------------------------------------------------------------
def _csv(rows, bom=False):
    text = "emotion,pixels,Usage\n" + "".join(rows)
    return ("\ufeff" if bom else "") + text


GOOD_ROW = "3," + " ".join(["7"] * 2304) + ",Training\n"
CSV_CASES = [
    ("a UTF-8 byte-order mark", _csv([GOOD_ROW, GOOD_ROW.replace("Training", "PrivateTest")], bom=True), None),
    ("a pixel of 300", _csv([GOOD_ROW, "3," + " ".join(["300"] + ["7"] * 2303) + ",Training\n"]),
     "line 3: pixel values must be in 0..255, got 300"),
    ("too few pixels", _csv(["3,1 2 3,Training\n"]), "line 2: expected 2304 pixel values"),
    ("a stray quote", _csv([GOOD_ROW, '3,"1 2 3\n']), "line 3"),
    ("an unknown usage", _csv([GOOD_ROW.replace("Training", "Validation")]), "unknown Usage"),
    ("an emotion of 9", _csv([GOOD_ROW.replace("3,", "9,", 1)]), "emotion 9"),
]


@pytest.mark.parametrize("what, text, error", CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_csv_defects(what, text, error, tmp_path):
    from minicnn.data import DatasetError, load_fer2013
    path = tmp_path / "fer2013.csv"
    path.write_text(text, encoding="utf-8")
    if error is None:
        data = load_fer2013(str(path), use_cache=False, progress=False)
        assert data["train"][0].shape == (1, 48, 48)
    else:
        with pytest.raises(DatasetError, match=error):
            load_fer2013(str(path), use_cache=False, progress=False)


def test_a_non_utf8_csv_and_an_image_as_data_are_clear_errors(tmp_path):
    from PIL import Image
    from minicnn.data import DatasetError, load_fer2013
    path = tmp_path / "fer2013.csv"
    path.write_bytes(_csv([GOOD_ROW]).encode() + b"3,\xff\xfe,Training\n")
    with pytest.raises(DatasetError, match="fer2013.csv: not UTF-8"):
        load_fer2013(str(path), use_cache=False, progress=False)
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "face.png")
    with pytest.raises(DatasetError, match="face.png is an image"):
        load_fer2013(str(tmp_path / "face.png"), use_cache=False, progress=False)


# --- the dataset cache: keyed by content, rebuilt when damaged --------------------------------------------
def test_the_cache_is_keyed_by_content_and_rebuilds_itself(tmp_path, monkeypatch):
    from minicnn.data import cache_dir, load_fer2013
    monkeypatch.setenv("MINICNN_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "fer2013.csv", tmp_path / "b" / "fer2013.csv"
    a.parent.mkdir(), b.parent.mkdir()
    a.write_text(_csv([GOOD_ROW]))
    b.write_text(_csv([GOOD_ROW.replace(" 7", " 8")]))          # same name and size, other pixels
    os.utime(b, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns))
    assert load_fer2013(str(a), progress=False)["train"][0].max() == 7
    assert load_fer2013(str(b), progress=False)["train"][0].max() == 8       # not a's cached data
    for f in os.listdir(cache_dir()):
        with open(os.path.join(cache_dir(), f), "r+b") as fh:
            fh.truncate(50)                                       # damage every cache file
    assert load_fer2013(str(a), progress=False)["train"][0].max() == 7       # rebuilt, no error
    assert load_fer2013(str(a), progress=False)["train"][0].max() == 7       # and good again


def test_a_second_backward_for_one_forward_is_refused(device):
    """It would add every gradient twice; PyTorch refuses it too. A new forward allows a new backward."""
    import minicnn
    from minicnn import nn
    from minicnn.backend import to_device
    x = to_device(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32), device)
    for make in (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: nn.Linear(192, 5),
                 lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))):
        layer = make().to(device)
        inp = x.reshape(2, -1) if isinstance(layer, nn.Linear) else x
        out = layer(inp)
        g = out * 0 + 1
        layer.backward(g)
        with pytest.raises(RuntimeError, match="twice for one forward pass"):
            layer.backward(g)
        layer(inp)
        layer.backward(g)                            # a new forward: fine
    model = minicnn.models.EmotionClassifier().to(device)
    out = model(to_device(np.zeros((2, 1, 48, 48), np.float32), device))
    model.backward(out * 0 + 1)
    with pytest.raises(RuntimeError, match="twice"):
        model.backward(out * 0 + 1)
