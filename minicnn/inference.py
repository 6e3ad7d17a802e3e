"""Prediction on any face photo: grayscale, centre square crop, 48x48, the weights' own normalisation.

    from minicnn.inference import EmotionPredictor, load_face
    predictor = EmotionPredictor()                      # the shipped FER2013 weights
    probs = predictor.predict(load_face("face.jpg"))    # (1, 7), FER2013's class order
"""
import numpy as np

from .data import normalize
from .data.images import decode_face, face_from_image
from .training.trainer import load_model, predict_proba

__all__ = ["load_face", "prepare_face", "EmotionPredictor"]


def prepare_face(image):
    """A PIL image of any size or mode -> uint8 (48, 48) (see :mod:`minicnn.data.images`)."""
    return face_from_image(image)


def load_face(path):
    """Read an image file and prepare it (an error names the file if it cannot be decoded)."""
    return decode_face(path)


class EmotionPredictor:
    """Weights plus the exact preprocessing they were trained with, compiled for prediction
    (:class:`~minicnn.InferenceSession`: BatchNorm folded, memory kept between calls)."""

    def __init__(self, weights=None, device="cpu"):
        if weights is None:
            from .weights import default_weights_path
            weights = default_weights_path()
        self.model, self.meta = load_model(weights, device)
        self.device = device
        self.classes = tuple(self.meta.get("classes") or ())
        norm = self.meta["normalization"]
        self.mean, self.std = float(norm["mean"]), float(norm["std"])
        self.session = self.model.compile_inference()

    def predict(self, faces, tta=False):
        """uint8 faces (48, 48) or (N, 48, 48) -> probabilities (N, num_classes)."""
        faces = np.asarray(faces)
        if faces.ndim == 2:
            faces = faces[None]
        if faces.ndim != 3 or faces.shape[1:] != (48, 48):
            raise ValueError(f"expected faces of shape (48, 48) or (N, 48, 48), got {faces.shape}")
        return predict_proba(self.model, faces, self.mean, self.std, tta=tta, device=self.device, session=self.session)

    def input_tensor(self, faces):
        """The float32 (N, 1, 48, 48) array the model sees for these faces."""
        return normalize(np.asarray(faces).reshape(-1, 48, 48), self.mean, self.std)
