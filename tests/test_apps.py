"""Using the model where people use emotion classifiers: faces in photos and video, fine-tuning to
other labels, ONNX. Faces come from the built-in face drawings (FER2013's when ../shared is there)."""
import json
import os

import numpy as np
import pytest

import minicnn
from minicnn.data import make_faces

FER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fer2013")


def _face(size=160, seed=0):
    """A face picture: a FER2013 test face when the data is here, else a built-in drawing."""
    from PIL import Image
    happy = os.path.join(FER, "test", "happy")
    if os.path.isdir(happy):
        name = sorted(os.listdir(happy))[3 + seed]
        im = Image.open(os.path.join(happy, name)).convert("L")
    else:
        im = Image.fromarray(make_faces(1, seed=seed, labels=[3])[0][0])
    return np.asarray(im.resize((size, size), Image.LANCZOS))


def _frame(x=240, y=150, size=160, seed=0):
    frame = np.full((480, 640), 90, np.uint8)
    frame[y:y + size, x:x + size] = _face(size, seed)
    return frame


cv2 = pytest.importorskip("cv2", reason="faces and video need the [apps] extra (opencv-python-headless<5)")


# --- faces in photos --------------------------------------------------------------------------------
def test_predict_finds_the_face_in_a_frame_and_walks_folders(tmp_path, capsys):
    from PIL import Image
    from minicnn.cli import main
    (tmp_path / "photos" / "more").mkdir(parents=True)
    Image.fromarray(_frame()).save(tmp_path / "photos" / "a.png")
    Image.fromarray(_frame(60, 40, seed=1)).save(tmp_path / "photos" / "more" / "b.jpg")
    Image.fromarray(_face(48)).save(tmp_path / "photos" / "crop.png")           # a crop already: whole
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"nope")
    code = main(["predict", str(tmp_path / "photos"), "--json", "--annotate", str(tmp_path / "ann")])
    out, err = capsys.readouterr()
    assert code == 1 and "broken.jpg" in err                                   # reported, the rest done
    rows = {os.path.basename(r["image"]): r for r in map(json.loads, out.strip().splitlines())}
    assert set(rows) == {"a.png", "b.jpg", "crop.png"}
    for name, (x, y) in (("a.png", (240, 150)), ("b.jpg", (60, 40))):
        faces = rows[name]["faces"]
        assert len(faces) == 1, name
        bx, by, bw, bh = faces[0]["box"]
        assert abs(bx + bw / 2 - (x + 80)) < 30 and abs(by + bh / 2 - (y + 80)) < 30, (name, faces[0]["box"])
        probs = faces[0]["probabilities"]
        assert set(probs) == set(minicnn.data.EMOTIONS) and abs(sum(probs.values()) - 1) < 1e-4
        assert faces[0]["label"] == max(probs, key=probs.get)
    assert rows["crop.png"]["faces"][0]["box"] == [0, 0, 48, 48]
    assert sorted(os.listdir(tmp_path / "ann")) == ["a_faces.png", "b_faces.png", "crop_faces.png"]


def test_no_face_is_said_not_failed(tmp_path, capsys):
    from PIL import Image
    from minicnn.cli import main
    Image.fromarray(np.full((300, 400), 128, np.uint8)).save(tmp_path / "wall.png")
    assert main(["predict", str(tmp_path / "wall.png")]) == 0
    assert "no face found" in capsys.readouterr().out


# --- video ---------------------------------------------------------------------------------------------
def _clip(path, frames=40, fps=20):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    for i in range(frames):
        writer.write(np.repeat(_frame(100 + 6 * i, 150)[..., None], 3, axis=2))
    writer.release()


def test_video_labels_every_frame_at_the_same_rate(tmp_path, capsys):
    from minicnn.cli import main
    _clip(tmp_path / "clip.mp4")
    assert main(["video", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "out.mp4")]) == 0
    err = capsys.readouterr().err
    assert "40 frames" in err and "frames/s" in err
    cap = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 40 and abs(cap.get(cv2.CAP_PROP_FPS) - 20) < 0.01
    ok, frame = cap.read()
    assert ok and frame.shape == (480, 640, 3)
    assert (np.abs(frame.astype(int) - [64, 64, 255]).sum(axis=2) < 120).sum() > 100     # the red box


def test_smoothed_labels_do_not_flicker():
    from minicnn.faces import Face, LabelSmoother
    classes = ("a", "b")
    smoother = LabelSmoother(alpha=0.3)
    labels = []
    for i in range(10):                                   # the raw label alternates every frame
        p = (0.45, 0.55) if i % 2 else (0.6, 0.4)
        labels.append(smoother([Face((10 + i, 10, 50, 50), "?", dict(zip(classes, p)))], classes)[0].label)
    assert labels[2:] == ["a"] * 8


def test_video_errors_are_clear(tmp_path, capsys):
    from minicnn.cli import main
    assert main(["video", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "no video at" in capsys.readouterr().err
    (tmp_path / "text.mp4").write_text("not a video")
    assert main(["video", str(tmp_path / "text.mp4"), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "minicnn: error:" in capsys.readouterr().err
    assert main(["video", "57", "--out", str(tmp_path / "o.mp4")]) == 2          # no such camera
    assert "camera 57" in capsys.readouterr().err


# --- fine-tuning ---------------------------------------------------------------------------------------
def _class_folders(root, names, per_class=24, test_per_class=8):
    """A small data set of other classes, from built-in faces: names[i] holds drawings of emotion i."""
    from PIL import Image
    for i, name in enumerate(names):
        faces, _ = make_faces(per_class + test_per_class, seed=10 + i, labels=[i] * (per_class + test_per_class))
        for split, chunk in (("train", faces[:per_class]), ("test", faces[per_class:])):
            d = root / split / name
            d.mkdir(parents=True)
            for j, f in enumerate(chunk):
                Image.fromarray(f).save(d / f"{j}.png")


def test_from_pretrained_keeps_the_features_and_makes_a_new_head():
    from minicnn.models import EmotionClassifier
    from minicnn.training import load_checkpoint
    from minicnn.weights import default_weights_path
    shipped, _, _ = load_checkpoint(default_weights_path())
    model = EmotionClassifier.from_pretrained(num_classes=3)
    assert [k.split(":")[0] for k in model.load_report.mismatched_keys] == ["classifier.4.weight", "classifier.4.bias"]
    state = model.state_dict()
    assert np.array_equal(state["features.0.weight"], shipped["features.0.weight"])
    assert state["classifier.4.weight"].shape == (3, 512)
    with pytest.raises(ValueError, match="classifier.4.weight"):
        EmotionClassifier(num_classes=3).load_state_dict(shipped)                  # strict: a clear error


def test_finetune_command_records_the_classes_and_predict_evaluate_use_them(tmp_path, capsys):
    from PIL import Image
    from minicnn.cli import main
    _class_folders(tmp_path / "data", ["calm", "cheerful", "grumpy"])
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(tmp_path / "data"), "--freeze", "features", "--epochs", "2",
                 "--batch-size", "16", "--out", str(out), "--no-progress", "--val-fraction", "0.25"]) == 0
    card = json.load(open(out / "best.json"))
    assert card["classes"] == ["calm", "cheerful", "grumpy"] and card["recipe"]["freeze"] == "features"
    capsys.readouterr()
    Image.fromarray(_face(48)).save(tmp_path / "f.png")
    assert main(["predict", str(tmp_path / "f.png"), "--weights", str(out / "best.npz"), "--json"]) == 0
    probs = json.loads(capsys.readouterr().out)["faces"][0]["probabilities"]
    assert set(probs) == {"calm", "cheerful", "grumpy"}
    assert main(["evaluate", "--weights", str(out / "best.npz"), "--data", str(tmp_path / "data")]) == 0
    assert "grumpy" in capsys.readouterr().out
    _class_folders(tmp_path / "bad", ["calm", "cheerful"])
    (tmp_path / "bad" / "test" / "cheerful").rename(tmp_path / "bad" / "test" / "happyish")
    assert main(["finetune", "--data", str(tmp_path / "bad"), "--epochs", "1", "--out", str(tmp_path / "r2"),
                 "--no-progress"]) == 2
    assert "happyish" in capsys.readouterr().err


def test_frozen_features_do_not_change_and_full_finetuning_moves_them_slowly(tmp_path):
    from minicnn.data import load_dataset
    from minicnn.training import Recipe, Trainer
    from minicnn.weights import default_weights_path
    _class_folders(tmp_path / "data", ["x", "y"])
    data, _ = load_dataset(str(tmp_path / "data"), val_fraction=0.25, progress=False, classes="any")
    moved = {}
    for freeze, scale in (("features", 1.0), ("none", 0.1), ("none", 1.0)):
        recipe = Recipe(epochs=1, batch_size=16, seed=0, augment=None, init=default_weights_path(), freeze=freeze,
                        features_lr_scale=scale)
        tr = Trainer(data, recipe, out_dir=str(tmp_path / f"{freeze}{scale}"), progress=False, log=lambda m: None)
        before = tr.model.state_dict()
        tr.fit()
        after = tr.model.state_dict()
        moved[(freeze, scale)] = float(np.abs(after["features.4.weight"] - before["features.4.weight"]).max())
        if freeze == "features":
            assert all(np.array_equal(after[k], before[k]) for k in before if k.startswith("features."))
            assert not np.array_equal(after["classifier.4.weight"], before["classifier.4.weight"])
    assert moved[("features", 1.0)] == 0 < moved[("none", 0.1)] < moved[("none", 1.0)]


# --- ONNX ----------------------------------------------------------------------------------------------
def test_onnx_export_runs_in_onnxruntime_with_the_same_logits(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra")
    from minicnn.cli import main
    from minicnn.inference import EmotionPredictor
    assert main(["export", "--onnx", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == list(minicnn.data.EMOTIONS)
    predictor = EmotionPredictor()
    assert float(meta["mean"]) == predictor.mean and float(meta["std"]) == predictor.std
    for n in (1, 5):                                         # a dynamic batch
        x = np.random.default_rng(n).standard_normal((n, 1, 48, 48)).astype(np.float32)
        got = session.run(None, {"input": x})[0]
        with minicnn.no_grad():
            want = predictor.model(x)
        assert got.shape == (n, 7)
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_the_readme_onnx_lines_work(tmp_path):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra")
    import re
    from minicnn.cli import main
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "InferenceSession" in b)
    assert main(["export", "--onnx", str(tmp_path / "emotion.onnx")]) == 0
    namespace = {"face48": _face(48).astype(np.float64)}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(block, namespace)
    finally:
        os.chdir(cwd)
    assert namespace["label"] in minicnn.data.EMOTIONS


def test_the_video_benchmark_reports_frames_per_second_and_stages(tmp_path, capsys):
    from minicnn.cli import main
    assert main(["bench", "--video", "--frames", "12", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.load(open(tmp_path / "video-latest.json"))
    assert result["fps_median"] > 0 and result["faces_per_frame"] >= 0.9
    assert set(result["ms_per_frame_by_stage"]) == {"decode", "detect", "classify", "draw", "encode"}
    assert "frames/s" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isdir(os.path.join(FER, "test")), reason="needs the FER2013 folder (../shared)")
def test_the_detector_comparison_runs(tmp_path, capsys):
    from minicnn.cli import main
    assert main(["bench", "--faces", "--data", FER, "--per-class", "3", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "faces-latest.json"))["rows"]
    assert len(rows) == 6 and rows["haarcascade_frontalface_default.xml"]["found"] > 0.3
