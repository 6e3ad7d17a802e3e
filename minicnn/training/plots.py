"""Pictures of a run: curves, confusion matrix, sample predictions.

Each function returns a matplotlib Figure, made with the object API (no pyplot, no global backend
switch: it works headless, in scripts and in notebooks), and saves it when given a path.
"""
import json

import numpy as np

__all__ = ["plot_curves", "plot_confusion", "plot_samples"]


def _figure(**kw):
    from ..extras import require
    return require("matplotlib.figure", "pictures").Figure(**kw)


def _save(fig, out_path):
    if out_path is not None:
        fig.savefig(out_path, dpi=100)
    return fig


def _series(rows, key):
    return [np.nan if r.get(key) is None else r[key] for r in rows]


def plot_curves(log_path, out_path=None):
    """Loss and accuracy per epoch, train and validation, from a run's JSON-lines log."""
    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    ep = [r["epoch"] for r in rows]
    fig = _figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    averaged = any("val_acc_live" in r for r in rows)        # (--ema: the average, and the live weights)
    a.plot(ep, [r["train_loss"] for r in rows], label="train")
    b.plot(ep, [r["train_acc"] for r in rows], label="train")
    for key, label in (("val", "validation, weight average" if averaged else "validation"),
                       ("val_live", "validation, live weights")):
        if any(r.get(f"{key}_acc") is not None for r in rows):   # (none without a validation split)
            a.plot(ep, _series(rows, f"{key}_loss"), label=label)
            b.plot(ep, _series(rows, f"{key}_acc"), label=label)
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.set_title("loss")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.legend(), b.set_title("accuracy")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_confusion(cm, class_names, out_path=None, title="confusion matrix"):
    """Counts and row shares (recall per true class), coloured by share."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = _figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class's faces")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_samples(images, labels, probs, class_names, out_path=None, n=24, seed=0):
    """A grid of ``n`` faces drawn at random (seeded) with the predicted class, its probability,
    and the true class (red when wrong)."""
    n = min(n, len(images))
    pick = np.random.default_rng(seed).permutation(len(images))[:n]
    images, labels, probs = images[pick], np.asarray(labels)[pick], probs[pick]
    cols = 8
    rows = -(-n // cols)
    fig = _figure(figsize=(cols * 1.4, rows * 1.65))
    axes = fig.subplots(rows, cols)
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        p = int(np.argmax(probs[i]))
        ok = p == int(labels[i])
        ax.set_title(f"{class_names[p]} {probs[i][p]:.0%}\n(true: {class_names[int(labels[i])]})",
                     fontsize=7, color="black" if ok else "red")
    fig.tight_layout()
    return _save(fig, out_path)
