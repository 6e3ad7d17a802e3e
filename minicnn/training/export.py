"""Turn a training checkpoint into shippable weights: float32 arrays plus a JSON card.

    minicnn export runs/fer2013/best.npz --report runs/fer2013/test_report.json \
        --out minicnn/weights/emotion_fer2013

writes ``emotion_fer2013.npz`` (the model's state dict in float32 under PyTorch's names, nothing
else: no optimizer state, no prefix) and ``emotion_fer2013.json``, the card that ``predict`` and
``evaluate`` read beside it: classes, input normalisation, recipe, data, accuracy per class, commit.
"""
import json
import os
import subprocess

import numpy as np

from .checkpoint import load_checkpoint, save_weights

__all__ = ["export_weights"]


def _commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _teachers(meta):
    """What a distilled model learnt from: each teacher's file name, content fingerprint and, where the
    file is still there, its recipe, data and validation accuracy (the card must not depend on
    paths that exist on one machine only)."""
    found = []
    prints = meta.get("teacher_fingerprints") or [None] * len(meta["recipe"]["teachers"])
    for path, fingerprint in zip(meta["recipe"]["teachers"], prints):
        entry = {"file": os.path.join(*path.replace("\\", "/").split("/")[-2:]), "fingerprint": fingerprint}
        try:
            _, _, theirs = load_checkpoint(path)
            entry.update(recipe=theirs.get("recipe"), data=theirs.get("data"), best_val_acc=theirs.get("best_val_acc"),
                         epochs_trained=theirs.get("epoch"))
        except Exception:                   # (gone, or not readable here: the fingerprint still names it)
            pass
        found.append(entry)
    return found


def export_weights(checkpoint, out_base, report=None, extra=None):
    """Write ``out_base.npz`` and ``out_base.json``; returns the card (a dict)."""
    state, _, meta = load_checkpoint(checkpoint)
    state = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in state.items()}
    card = {
        "model": meta["model"], "num_classes": meta["num_classes"], "classes": meta["classes"],
        "normalization": meta["normalization"], "recipe": meta["recipe"], "data": meta["data"],
        "epochs_trained": meta.get("epoch", meta.get("epochs_trained")), "best_val_acc": meta.get("best_val_acc"),
        "minicnn_version": meta.get("minicnn_version"), "commit": _commit(),
        "history": meta.get("history"), "format": "minicnn weights: state dict only; this card beside it",
    }
    if meta.get("recipe", {}).get("teachers"):
        card["teachers"] = _teachers(meta)
    if report:
        with open(report) as f:
            rep = json.load(f)
        card["test"] = {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "tta": rep.get("tta", False),
                        "per_class": rep["per_class"], "confusion_matrix": rep["confusion_matrix"],
                        "train_minutes": rep.get("train_minutes")}
    card.update(extra or {})
    save_weights(out_base + ".npz", state, card)
    return card
