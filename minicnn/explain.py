"""Pictures of what the network sees: saliency maps, Grad-CAM, filters and feature maps.

All gradients come from the model's own hand-written backward pass:

* **saliency**: d(score of the predicted class) / d(input pixel) -- the same
  ``model.backward`` that trains the network, started from a one-hot gradient
  on the logits instead of the loss gradient;
* **Grad-CAM** (Selvaraju et al. 2017): the last conv block's activations A_k
  (after its ReLU, 256 maps of 6x6), weighted by the mean gradient of the class
  score over each map, alpha_k = mean(dscore/dA_k); cam = ReLU(sum_k alpha_k A_k),
  upsampled to 48x48.
"""
import numpy as np

from .backend import to_device, to_numpy
from .models.emotion import leaf_layers

__all__ = ["saliency_and_gradcam", "saliency", "feature_maps", "first_layer_filters", "plot_explanation",
           "plot_filters_and_maps"]


def _upsample(cam, size=48):
    """Bilinear upsampling of a (h, w) map to (size, size), corners aligned."""
    h, w = cam.shape
    ys = np.linspace(0, h - 1, size)
    xs = np.linspace(0, w - 1, size)
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 2) if h > 1 else np.zeros(size, int)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 2) if w > 1 else np.zeros(size, int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    top = cam[y0][:, x0] * (1 - fx) + cam[y0][:, x1] * fx
    bottom = cam[y1][:, x0] * (1 - fx) + cam[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def saliency_and_gradcam(model, x, target=None, cam_layer="features.14"):
    """For one input x (1, 1, 48, 48): (probabilities, target class, d score / d x, Grad-CAM 48x48).

    The model runs in eval mode; ``target`` defaults to the predicted class.
    """
    if x.shape[0] != 1:
        raise ValueError(f"explain one image at a time: expected (1, 1, 48, 48), got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        layers = list(leaf_layers(model))
        names = [n for n, _ in layers]
        if cam_layer not in names:
            raise ValueError(f"no layer {cam_layer!r}; layers are {', '.join(names)}")
        h = to_device(x, model.device)
        acts = {}
        for name, layer in layers:
            h = layer(h)
            acts[name] = h
        logits = to_numpy(h)[0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        target = int(np.argmax(probs)) if target is None else int(target)
        g = np.zeros((1, logits.size), dtype=x.dtype)
        g[0, target] = 1.0                        # d score / d logits
        g = to_device(g, model.device)
        cam_grad = None
        for name, layer in reversed(layers):
            if name == cam_layer:
                cam_grad = to_numpy(g)[0]         # d score / d (output of cam_layer)
            g = layer.backward(g)
        a = to_numpy(acts[cam_layer])[0].astype(np.float64)
        alpha = cam_grad.mean(axis=(1, 2))
        cam = np.maximum((alpha[:, None, None] * a).sum(axis=0), 0)
        cam = _upsample(cam)
        if cam.max() > 0:
            cam = cam / cam.max()
        return probs, target, to_numpy(g)[0, 0], cam
    finally:
        model.train(was_training)


def saliency(model, x, target=None):
    """d(score of ``target``) / d(input) for one image: (48, 48)."""
    return saliency_and_gradcam(model, x, target)[2]


def feature_maps(model, x):
    """{block name: (C, H, W) activations after each conv block's pooling} for one image."""
    was_training = model.training
    model.eval()
    try:
        out, h = {}, to_device(x, model.device)
        for name, layer in leaf_layers(model):
            h = layer(h)
            if name in ("features.3", "features.7", "features.11", "features.15"):
                out[f"block {len(out) + 1} ({name})"] = to_numpy(h)[0]
        return out
    finally:
        model.train(was_training)


def first_layer_filters(model):
    """The first conv layer's kernels, (32, 3, 3)."""
    return to_numpy(model.features[0].weight.data)[:, 0]


def _figure(**kw):
    """A matplotlib Figure made with the object API: no pyplot, no global backend switch, so the same
    call works headless, in a script and in a notebook (which shows the returned figure)."""
    from .extras import require
    return require("matplotlib.figure", "pictures").Figure(**kw)


def _save(fig, out_path):
    if out_path is not None:
        fig.savefig(out_path, dpi=100)
    return fig


def plot_explanation(face, probs, target, sal, cam, classes, out_path=None, cam_size=(6, 6)):
    """Face | saliency overlaid | Grad-CAM overlaid | class probabilities, with colour bars and a
    caption saying what each panel is. Returns the Figure; also saves it to ``out_path`` if given."""
    fig = _figure(figsize=(14, 4.2))
    axes = fig.subplots(1, 4, gridspec_kw=dict(width_ratios=[1, 1.15, 1.15, 1.3]))
    mag = np.abs(sal)
    mag = mag / mag.max() if mag.max() > 0 else mag
    h, w = np.shape(face)
    axes[0].imshow(face, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"input ({h}x{w}, grayscale)")
    axes[1].imshow(face, cmap="gray", vmin=0, vmax=255)
    im = axes[1].imshow(mag, cmap="hot", alpha=0.6, vmin=0, vmax=1)
    axes[1].set_title("saliency |d score / d pixel|")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02, label="relative to the largest pixel")
    axes[2].imshow(face, cmap="gray", vmin=0, vmax=255)
    im = axes[2].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[2].set_title("Grad-CAM (last conv block)")
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.02, label="relative to the largest cell")
    for ax in axes[:3]:
        ax.set_xticks([]), ax.set_yticks([])
    order = np.argsort(probs)
    axes[3].barh([classes[i] for i in order], probs[order],
                 color=["tab:red" if i == target else "tab:gray" for i in order])
    axes[3].set_xlim(0, 1)
    axes[3].set_xlabel("probability")
    axes[3].set_title(f"prediction: {classes[target]} ({probs[target]:.0%})")
    ch, cw = cam_size
    fig.text(0.01, 0.01, f"Saliency: gradient of the {classes[target]} score with respect to each input pixel "
             f"(absolute value), from the model's own backward pass. Grad-CAM: the last conv block's "
             f"{ch}x{cw} activation maps weighted by their mean gradient, summed, ReLU'd, then upsampled "
             f"bilinearly to {h}x{w}: its resolution is {ch}x{cw}.", fontsize=8, wrap=True)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.88, bottom=0.2, wspace=0.7)
    return _save(fig, out_path)


def plot_filters_and_maps(filters, maps, face, out_path=None, per_row=16):
    """Row 0: the face; rows 1-2: the first layer's 3x3 filters (one shared colour scale, with its
    bar); then per block, the first ``per_row`` feature maps, each scaled on its own. Returns the
    Figure; also saves it to ``out_path`` if given."""
    filter_rows = -(-len(filters) // per_row)
    rows = 1 + filter_rows + len(maps)
    fig = _figure(figsize=(per_row * 0.85 + 1.2, rows * 1.05 + 0.9))
    axes = fig.subplots(rows, per_row, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(face, cmap="gray", vmin=0, vmax=255)
    axes[0, 0].set_title("face", fontsize=7, loc="left")
    lim = float(np.abs(filters).max()) or 1.0
    im = None
    for i, f in enumerate(filters):
        ax = axes[1 + i // per_row, i % per_row]
        im = ax.imshow(f, cmap="RdBu_r", vmin=-lim, vmax=lim)
        if i == 0:
            ax.set_title(f"conv1: all {len(filters)} filters (3x3), one colour scale", fontsize=7, loc="left")
    if im is not None:
        fig.colorbar(im, ax=axes[1:1 + filter_rows, :].ravel().tolist(), fraction=0.015, pad=0.01,
                     label="weight")
    for r, (name, m) in enumerate(maps.items()):
        shown = min(per_row, len(m))
        for i in range(shown):
            ax = axes[1 + filter_rows + r, i]
            ax.imshow(m[i], cmap="viridis")
            if i == 0:
                ax.set_title(f"{name}: channels 0-{shown - 1} of {len(m)}, {m.shape[1]}x{m.shape[2]}",
                             fontsize=7, loc="left")
    fig.text(0.01, 0.005, "Feature maps: the activations after each block's max-pooling for this face; each "
             "map is scaled to its own minimum (dark) and maximum (bright), so brightness compares pixels "
             "within a map, not across maps.", fontsize=8)
    return _save(fig, out_path)
