"""Data: FER2013 (folder or CSV), the built-in faces, augmentation and batching."""
from .augment import Augment
from .fer2013 import EMOTIONS, DatasetError, cache_dir, folder_classes, load_fer2013
from .loader import BatchLoader, normalize
from .synthetic import make_faces, synthetic_splits

__all__ = ["EMOTIONS", "DatasetError", "load_fer2013", "cache_dir", "make_faces", "synthetic_splits",
           "Augment", "BatchLoader", "normalize", "load_dataset", "folder_classes"]


def load_dataset(path=None, val_fraction=0.1, seed=0, progress=True, classes=EMOTIONS):
    """Splits {'train', 'val', 'test'} of uint8 images and labels, and a description.

    ``path``: a FER2013 folder or CSV; None means ``$MINICNN_DATA`` if set, else
    the built-in faces. Validation (for model selection) is PublicTest when the
    source has three splits (the CSV); otherwise a stratified, seeded
    ``val_fraction`` of training, or none at all with ``val_fraction=0`` (every training image is
    trained on: a fixed recipe, no selection; ``data['val']`` is then empty). Test is never used
    for selection. ``data['classes']`` names the
    labels: FER2013's emotions by default, other names in their label order, or "any" for a folder's
    own classes (fine-tuning).
    """
    import math
    import os
    import numpy as np
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1): the share of Training held out for validation (0: none), "
                         f"got {val_fraction!r}")
    if path is None:
        path = os.environ.get("MINICNN_DATA") or None
    if path is None:
        splits = dict(synthetic_splits(seed=seed), classes=EMOTIONS)
        if val_fraction == 0:                         # (their own validation split, trained on instead)
            (xt, yt), (xv, yv) = splits["train"], splits["val"]
            splits["train"], splits["val"] = (np.concatenate([xt, xv]), np.concatenate([yt, yv])), (xv[:0], yv[:0])
            return splits, "built-in synthetic faces (a stand-in, not FER2013; no validation)"
        return splits, "built-in synthetic faces (a stand-in, not FER2013)"
    data = load_fer2013(path, progress=progress, classes=classes)
    n_classes = len(data["classes"])
    if "val" not in data and val_fraction == 0:
        x, y = data["train"]
        data["val"] = (x[:0], y[:0])
        desc = (f"FER2013 from {path} (no validation: all of Training; test: PublicTest)" if data["classes"] == EMOTIONS
                else f"{', '.join(data['classes'])} from {path} (no validation: all of train/; test: test/)")
    elif "val" not in data:
        x, y = data["train"]
        rng = np.random.default_rng(seed)
        val_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:int(round(val_fraction * (y == c).sum()))]
                                  for c in range(n_classes)])
        mask = np.zeros(len(y), dtype=bool)
        mask[val_idx.astype(np.int64)] = True
        if not mask.any() or mask.all():
            raise DatasetError(f"{path}: a {val_fraction:.0%} validation split of {len(y)} training images leaves "
                               f"{'no validation' if not mask.any() else 'no training'} images; change --val-fraction")
        data["val"] = (x[mask], y[mask])
        data["train"] = (x[~mask], y[~mask])
        desc = (f"FER2013 from {path} (validation: a stratified {val_fraction:.0%} of Training; "
                f"test: PublicTest)" if data["classes"] == EMOTIONS else
                f"{', '.join(data['classes'])} from {path} (validation: a stratified {val_fraction:.0%} of "
                f"train/; test: test/)")
    else:
        desc = f"FER2013 from {path} (validation: PublicTest; test: PrivateTest)"
    if "test" not in data:
        raise DatasetError(f"{path}: no test split (PrivateTest rows or a test/ folder)")
    return data, desc
