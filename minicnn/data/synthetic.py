"""Built-in faces: a stand-in dataset that needs no download.

Procedurally drawn 48x48 grayscale faces with FER2013's 7 expressions, made
from a seed in seconds, so the main job, the tests and a learner's first run
work anywhere. It is a teaching and testing stand-in, **not** FER2013: the
expressions are cartoons (brows, eyes and mouth shapes), varied in pose,
scale, lighting, contrast and noise.

    angry     brows slanted down toward the nose, narrowed eyes, tight flat mouth
    disgust   one brow down, squinting, mouth raised on one side
    fear      brows raised and drawn together, wide eyes, wide open mouth
    happy     relaxed brows, smiling mouth
    sad       inner brow ends raised, drooping mouth
    surprise  high arched brows, wide round eyes, round open mouth
    neutral   straight brows, straight mouth
"""
import numpy as np

from .fer2013 import EMOTIONS

__all__ = ["make_faces", "synthetic_splits"]

# Per expression: brow tilt (+ = inner ends down), brow height, brow asymmetry, eye openness,
# mouth curvature (+ = smile), mouth open height, mouth width, mouth tilt (asymmetry).
_SHAPES = {
    "angry":    dict(tilt=0.45, brow=-1.0, asym=0.0, eye=0.55, curve=-0.010, open=0.0, width=7, mtilt=0.0),
    "disgust":  dict(tilt=0.15, brow=-0.5, asym=2.0, eye=0.45, curve=0.000, open=0.0, width=7, mtilt=0.25),
    "fear":     dict(tilt=-0.35, brow=2.0, asym=0.0, eye=1.45, curve=-0.005, open=2.2, width=8, mtilt=0.0),
    "happy":    dict(tilt=0.0, brow=0.5, asym=0.0, eye=0.85, curve=0.070, open=0.0, width=9, mtilt=0.0),
    "sad":      dict(tilt=-0.45, brow=0.5, asym=0.0, eye=0.8, curve=-0.060, open=0.0, width=7, mtilt=0.0),
    "surprise": dict(tilt=0.0, brow=3.5, asym=0.0, eye=1.6, curve=0.000, open=4.5, width=4.5, mtilt=0.0),
    "neutral":  dict(tilt=0.0, brow=0.5, asym=0.0, eye=1.0, curve=0.000, open=0.0, width=7, mtilt=0.0),
}


def _soft(d, width):
    """1 inside distance ``width``, falling to 0 over one pixel (anti-aliased strokes)."""
    return np.clip(width + 0.5 - d, 0.0, 1.0)


def make_faces(n, seed=0, labels=None):
    """(images uint8 (n, 48, 48), labels int64 (n,)), balanced over the 7 classes unless given."""
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = rng.permutation(np.arange(n) % len(EMOTIONS))
    labels = np.asarray(labels, dtype=np.int64)
    p = {k: np.array([_SHAPES[EMOTIONS[c]][k] for c in labels], dtype=np.float32)[:, None, None]
         for k in _SHAPES["happy"]}

    def jitter(scale):
        return rng.normal(0.0, scale, (n, 1, 1)).astype(np.float32)

    # Pose: each image's pixel grid in face coordinates (rotated, scaled, shifted).
    ang = jitter(0.12)
    scale = np.exp(jitter(0.08))
    cx, cy = 24 + jitter(1.5), 24 + jitter(1.5)
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float32)
    dx, dy = (xx[None] - cx) / scale, (yy[None] - cy) / scale
    X = np.cos(ang) * dx + np.sin(ang) * dy           # face coordinates: x right, y down, origin at centre
    Y = -np.sin(ang) * dx + np.cos(ang) * dy

    face_w, face_h = 15 + jitter(1.0), 19 + jitter(1.0)
    face = _soft((np.sqrt((X / face_w) ** 2 + (Y / face_h) ** 2) - 1) * 15, 0.0)
    skin = 0.55 + jitter(0.08)
    img = 0.18 + jitter(0.05) + face * (skin - 0.18)

    dark = np.zeros_like(X)
    # Eyes: ellipses whose height is the openness.
    eye_y, eye_dx = -4 + jitter(0.6), 6 + jitter(0.4)
    eye_h = 1.6 * p["eye"] * np.exp(jitter(0.1))
    for side in (-1, 1):
        ex = side * eye_dx
        d = np.sqrt(((X - ex) / 2.4) ** 2 + ((Y - eye_y) / np.maximum(eye_h, 0.3)) ** 2)
        dark = np.maximum(dark, _soft((d - 1) * 2.0, 0.0))
    # Brows: short strokes, inner ends raised or lowered by the tilt.
    brow_y = eye_y - 4.0 - p["brow"] + jitter(0.4)
    for side in (-1, 1):
        bx = side * (eye_dx + jitter(0.3))
        u = X - bx
        inner = -side * u                               # > 0 toward the nose
        line = brow_y + (p["tilt"] + jitter(0.05)) * inner + (p["asym"] * (side > 0))
        d = np.abs(Y - line)
        dark = np.maximum(dark, _soft(d, 0.6) * (np.abs(u) < 3.5))
    # Mouth: a parabola (curve > 0 smiles), or an open ellipse.
    my = 9 + jitter(0.6)
    mw = p["width"] * np.exp(jitter(0.08))
    curve = p["curve"] + jitter(0.006)
    line = my + curve * (mw ** 2 - X ** 2) * 0.9 + p["mtilt"] * X
    stroke = _soft(np.abs(Y - line), 0.6) * (np.abs(X) < mw)
    mo = p["open"] * np.exp(jitter(0.1))
    ellipse = _soft((np.sqrt((X / np.maximum(mw, 1)) ** 2 + ((Y - my) / np.maximum(mo, 0.3)) ** 2) - 1) * 3, 0.0)
    mouth = np.where(mo > 0.5, ellipse, stroke)
    dark = np.maximum(dark, mouth)
    # Nose: a faint vertical stroke.
    dark = np.maximum(dark, 0.4 * _soft(np.abs(X), 0.4) * (Y > -2) * (Y < 4))

    img = img * (1 - 0.85 * dark * face)
    # Lighting, contrast, noise.
    grad = 1 + jitter(0.12) * (xx[None] - 24) / 24 + jitter(0.12) * (yy[None] - 24) / 24
    img = img * grad
    img = (img - img.mean(axis=(1, 2), keepdims=True)) * np.exp(jitter(0.2)) + img.mean(axis=(1, 2), keepdims=True)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.abs(jitter(0.04))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), labels


def synthetic_splits(n_train=7000, n_val=1000, n_test=1400, seed=0):
    """{'train', 'val', 'test'}: independent draws (different seeds) of the built-in faces."""
    return {"train": make_faces(n_train, seed),
            "val": make_faces(n_val, seed + 1_000_003),
            "test": make_faces(n_test, seed + 2_000_003)}
