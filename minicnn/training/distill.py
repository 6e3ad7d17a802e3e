"""Teachers for distillation: trained networks whose softened probabilities a student learns from.

``minicnn train --teacher A.npz --teacher B.npz`` trains a student with
:class:`~minicnn.nn.DistillationLoss`: every training batch, augmented as the student sees it, also
goes through each teacher (an :class:`~minicnn.InferenceSession`: eval mode, BatchNorm folded), and
the mean of their probabilities at temperature T is the soft target. Seeing the very view the
student sees keeps the target consistent with its input (Beyer et al. 2022, "Knowledge distillation:
a good teacher is patient and consistent"); the cost is one inference per teacher per step.

A teacher normalized its inputs with its own training data's mean and standard deviation; the
student's batch is brought to each teacher's: x_t = (x * std + mean - mean_t) / std_t.
"""
import hashlib

import numpy as np

from ..backend import device_of, get_array_module, to_device
from .checkpoint import CheckpointError

__all__ = ["Teacher", "TeacherError"]


class TeacherError(CheckpointError):
    """A teacher that cannot teach this student (a missing file, other classes)."""


def file_fingerprint(path):
    """The first 24 hex digits of the file's SHA-256 (checked when a distillation run resumes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


class Teacher:
    def __init__(self, paths, temperature, classes, mean, std, device="cpu", dtype=np.float32):
        """``paths``: one or more checkpoints or weights files of trained EmotionClassifiers (an
        ensemble when several); ``classes``: the student's class names, which every teacher must
        share in the same order; ``mean``, ``std``: the student's input normalization; ``dtype``:
        what the teachers compute in (float64 for exact comparisons, the tests')."""
        from .trainer import load_model           # (trainer imports this module)
        if isinstance(paths, str) or not paths:
            raise TeacherError(f"teachers must be a non-empty list of weights files, got {paths!r}")
        self.temperature = float(temperature)
        self.mean, self.std = float(mean), float(std)
        self.paths = list(paths)
        self.sessions, self.normalizations, self.fingerprints = [], [], []
        for path in self.paths:
            try:
                model, meta = load_model(path, device)
            except CheckpointError as exc:
                raise TeacherError(f"teacher: {exc}") from None
            theirs = tuple(meta.get("classes") or ())
            if theirs != tuple(classes):
                raise TeacherError(f"teacher {path} was trained on the classes {list(theirs) or 'unknown'}, the "
                                   f"student on {list(classes)}: a teacher must know the student's classes, "
                                   "in the same order")
            norm = meta.get("normalization") or {}
            mean_t, std_t = norm.get("mean"), norm.get("std")
            if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in (mean_t, std_t)) or std_t <= 0:
                raise TeacherError(f"teacher {path}: its metadata has no valid input normalization (mean, std), "
                                   f"got {norm!r}")
            self.sessions.append(model.to(device, dtype=dtype).compile_inference())
            self.normalizations.append((float(mean_t), float(std_t)))
            self.fingerprints.append(file_fingerprint(path))

    def __len__(self):
        return len(self.sessions)

    def __call__(self, x):
        """The teachers' mean probabilities at the temperature, for the student's batch ``x``
        (normalized the student's way); on x's device, in x's dtype."""
        xp = get_array_module(x)
        total = None
        for session, (mean_t, std_t) in zip(self.sessions, self.normalizations):
            xt = x * (self.std / std_t) + (self.mean - mean_t) / std_t          # the teacher's normalization
            z = session.run(xp.ascontiguousarray(xt.astype(session.dtype, copy=False)))
            z = to_device(z, device_of(x)).astype(x.dtype, copy=False) / self.temperature
            e = xp.exp(z - z.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)                                 # softmax(z / T)
            total = p if total is None else total + p
        return total / len(self.sessions)
