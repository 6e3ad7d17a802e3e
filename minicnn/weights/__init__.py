"""Weights shipped with minicnn.

``emotion_fer2013.npz`` holds an EmotionClassifier trained on FER2013 (float32,
PyTorch-compatible names), with its metadata inside; ``emotion_fer2013.json``
is its card: recipe, data, input normalisation, accuracy per class, commit.
"""
import os

__all__ = ["default_weights_path", "WEIGHTS_DIR"]

WEIGHTS_DIR = os.path.dirname(os.path.abspath(__file__))


def default_weights_path():
    """The shipped FER2013 weights (a clear error if this copy of minicnn has none)."""
    path = os.path.join(WEIGHTS_DIR, "emotion_fer2013.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no shipped weights at {path}: train some with `minicnn train --data ...` "
                                "and pass --weights runs/emotion/best.npz")
    return path
