"""Pictures of a run (matplotlib, headless): curves, confusion matrix, sample predictions."""
import json

import numpy as np

__all__ = ["plot_curves", "plot_confusion", "plot_samples"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(log_path, out_path):
    """Loss and accuracy per epoch, train and validation, from a run's JSON-lines log."""
    plt = _plt()
    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], label="train")
    a.plot(ep, [r["val_loss"] for r in rows], label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.set_title("loss")
    b.plot(ep, [r["train_acc"] for r in rows], label="train")
    b.plot(ep, [r["val_acc"] for r in rows], label="validation")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.legend(), b.set_title("accuracy")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_confusion(cm, class_names, out_path, title="confusion matrix"):
    plt = _plt()
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_samples(images, labels, probs, class_names, out_path, n=24, seed=0):
    """A grid of ``n`` faces drawn at random (seeded) with the predicted class, its probability,
    and the true class (red when wrong)."""
    plt = _plt()
    n = min(n, len(images))
    pick = np.random.default_rng(seed).permutation(len(images))[:n]
    images, labels, probs = images[pick], np.asarray(labels)[pick], probs[pick]
    cols = 8
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.65))
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
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
