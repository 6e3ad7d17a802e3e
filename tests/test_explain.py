"""gradcheck, explain and visualize: commands that pass and fail correctly, pictures with the right content."""
import numpy as np
import pytest
from PIL import Image

import minicnn
from minicnn import nn
from minicnn.cli import main as cli
from minicnn.data import make_faces
from minicnn.explain import feature_maps, first_layer_filters, saliency_and_gradcam
from minicnn.models import EmotionClassifier
from minicnn.training import save_checkpoint


@pytest.fixture()
def weights(tmp_path):
    minicnn.manual_seed(0)
    model = EmotionClassifier()
    path = tmp_path / "w.npz"
    save_checkpoint(str(path), model.state_dict(), meta=dict(
        model="EmotionClassifier", num_classes=7, classes=list(minicnn.data.EMOTIONS),
        normalization={"mean": 0.5, "std": 0.25}))
    return path


@pytest.fixture()
def face_file(tmp_path):
    path = tmp_path / "face.png"
    Image.fromarray(make_faces(1, seed=2, labels=[3])[0][0]).resize((96, 80)).convert("RGB").save(path)
    return path


def test_gradcheck_command_passes(capsys):
    assert cli(["gradcheck", "--layers-only"]) == 0
    out = capsys.readouterr().out
    assert "Conv2d 3x3 s1 p1" in out and "BatchNorm2d train" in out and "0 failed" in out


def test_gradcheck_command_fails_on_a_broken_backward(monkeypatch, capsys):
    original = nn.MaxPool2d.backward
    monkeypatch.setattr(nn.MaxPool2d, "backward", lambda self, dout: original(self, dout) * 1.01)
    assert cli(["gradcheck", "--layers-only", "--path", "textbook"]) == 1
    out = capsys.readouterr().out
    assert "FAIL [textbook] MaxPool2d 2x2 input" in out and "1 failed" in out
    assert cli(["gradcheck", "--layers-only"]) == 1          # and the CPU engine now disagrees with it
    out = capsys.readouterr().out
    assert "FAIL [textbook] MaxPool2d 2x2 input" in out and "FAIL [cpu] MaxPool2d 2x2 input" in out


def test_saliency_equals_finite_differences_and_gradcam_is_a_heat_map():
    minicnn.manual_seed(0)
    model = EmotionClassifier().double()
    x = np.random.default_rng(0).standard_normal((1, 1, 48, 48))
    probs, target, sal, cam = saliency_and_gradcam(model, x)
    assert probs.shape == (7,) and np.isclose(probs.sum(), 1) and target == int(np.argmax(probs))
    assert sal.shape == (48, 48) and cam.shape == (48, 48)
    assert cam.min() >= 0 and np.isclose(cam.max(), 1)
    model.eval()
    h = 1e-6
    for (i, j) in [(10, 10), (24, 30), (40, 5)]:
        xp, xm = x.copy(), x.copy()
        xp[0, 0, i, j] += h
        xm[0, 0, i, j] -= h
        numeric = (model(xp)[0, target] - model(xm)[0, target]) / (2 * h)
        assert np.isclose(sal[i, j], numeric, rtol=1e-5, atol=1e-9), (i, j, sal[i, j], numeric)
    assert model.training is False


def test_feature_maps_and_filters():
    model = EmotionClassifier()
    maps = feature_maps(model, np.zeros((1, 1, 48, 48), np.float32))
    assert [m.shape for m in maps.values()] == [(32, 24, 24), (64, 12, 12), (128, 6, 6), (256, 3, 3)]
    assert first_layer_filters(model).shape == (32, 3, 3)


def test_explain_and_visualize_commands_write_pngs(tmp_path, weights, face_file, capsys):
    out = tmp_path / "explain.png"
    assert cli(["explain", str(face_file), "--weights", str(weights), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    im = Image.open(out)
    assert im.size[0] > 800 and im.size[1] > 250
    out2 = tmp_path / "maps.png"
    assert cli(["visualize", str(face_file), "--weights", str(weights), "--out", str(out2)]) == 0
    assert Image.open(out2).size[0] > 600
    assert cli(["explain", str(tmp_path / "missing.jpg"), "--weights", str(weights)]) == 2


def test_saliency_gradcam_and_feature_maps_on_the_gpu_equal_the_cpu(gpu):
    minicnn.manual_seed(0)
    model = EmotionClassifier()
    x = np.random.default_rng(0).standard_normal((1, 1, 48, 48)).astype(np.float32)
    want = saliency_and_gradcam(model, x)
    want_maps = feature_maps(model, x)
    model.to(gpu)
    got = saliency_and_gradcam(model, x)
    assert got[1] == want[1]                              # the same target class
    for g, w in zip((got[0], got[2], got[3]), (want[0], want[2], want[3])):   # probs, saliency, Grad-CAM
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    for name, w in want_maps.items():
        np.testing.assert_allclose(feature_maps(model, x)[name], w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_pictures_are_figures_with_captions_and_colour_bars_and_switch_no_backend(tmp_path):
    """The plot helpers return matplotlib Figures made with the object API: no pyplot, no global
    backend switch, so a notebook can show them; each panel says what it shows."""
    import subprocess
    import sys
    code = """
import sys, matplotlib
matplotlib.use("svg")                         # a user's choice, which minicnn must leave alone
import numpy as np, minicnn
from minicnn.explain import plot_explanation, plot_filters_and_maps
from minicnn.training.plots import plot_confusion
rng = np.random.default_rng(0)
face = rng.integers(0, 255, (48, 48))
fig = plot_explanation(face, np.full(7, 1 / 7), 3, rng.standard_normal((48, 48)), rng.random((48, 48)),
                       [str(i) for i in range(7)], sys.argv[1])
texts = " ".join(t.get_text() for t in fig.texts)
assert "upsampled" in texts and "6x6" in texts, texts
assert sum(1 for ax in fig.axes if ax.get_label() == "<colorbar>") == 2
maps = {"block 1 (features.3)": rng.random((32, 24, 24))}
fig = plot_filters_and_maps(rng.standard_normal((32, 3, 3)), maps, face)
titles = [ax.get_title(loc="left") for ax in fig.axes]
assert any("channels 0-15 of 32" in t for t in titles), titles
assert "each map is scaled to its own" in " ".join(t.get_text() for t in fig.texts)
assert type(plot_confusion(np.eye(3, dtype=int), list("abc"))).__name__ == "Figure"
assert matplotlib.get_backend() == "svg" and "matplotlib.pyplot" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    assert (tmp_path / "x.png").stat().st_size > 1000
