"""Training-time augmentation on whole batches, with the array module (so it runs on the GPU too).

Each transform takes a float batch (N, 1, H, W) and a NumPy Generator that
draws the per-image parameters (so a seed makes them repeatable on any device):

* random crop with padding: shift each image by up to ``pad`` pixels (edges replicated);
* horizontal flip with probability 1/2;
* affine jitter: small rotation and scale about the centre, bilinear sampling;
* random erasing: with probability ``p``, a rectangle of 2-20% of the image set to 0
  (the mean, after normalisation).
"""
from dataclasses import dataclass

import numpy as np

from ..backend import device_of, get_array_module, to_device

__all__ = ["Augment", "random_crop", "random_flip", "random_affine", "random_erase"]


def _param(a, like):
    return to_device(np.asarray(a), device_of(like))


def random_crop(x, rng, pad=4):
    """Translate each image by a random (dy, dx) in [-pad, pad], replicating the border."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    dy = _param(rng.integers(-pad, pad + 1, n), x)
    dx = _param(rng.integers(-pad, pad + 1, n), x)
    rows = xp.clip(xp.arange(h)[None, :] + dy[:, None], 0, h - 1)          # (N, H)
    cols = xp.clip(xp.arange(w)[None, :] + dx[:, None], 0, w - 1)          # (N, W)
    nidx = xp.arange(n)[:, None, None]
    out = x[nidx, :, rows[:, :, None], cols[:, None, :]]                   # (N, H, W, C)
    return xp.ascontiguousarray(out.transpose(0, 3, 1, 2))


def random_flip(x, rng):
    """Mirror each image left-right with probability 1/2."""
    xp = get_array_module(x)
    flip = _param(rng.random(x.shape[0]) < 0.5, x)[:, None, None, None]
    return xp.where(flip, x[..., ::-1], x)


def random_affine(x, rng, degrees=10.0, scale=0.1):
    """Rotate by U(-degrees, degrees) and scale by U(1-scale, 1+scale) about the centre (bilinear)."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    theta = _param(np.deg2rad(rng.uniform(-degrees, degrees, n)), x).astype(x.dtype)
    s = _param(rng.uniform(1 - scale, 1 + scale, n), x).astype(x.dtype)
    yy, xx = xp.meshgrid(xp.arange(h, dtype=x.dtype) - (h - 1) / 2, xp.arange(w, dtype=x.dtype) - (w - 1) / 2,
                         indexing="ij")
    cos, sin = (xp.cos(theta) / s)[:, None, None], (xp.sin(theta) / s)[:, None, None]
    # Output pixel (y, x) samples the input at the inverse-transformed point.
    sx = cos * xx + sin * yy + (w - 1) / 2
    sy = -sin * xx + cos * yy + (h - 1) / 2
    sx = xp.clip(sx, 0, w - 1)
    sy = xp.clip(sy, 0, h - 1)
    x0 = xp.clip(xp.floor(sx).astype(xp.int64), 0, w - 2)
    y0 = xp.clip(xp.floor(sy).astype(xp.int64), 0, h - 2)
    fx, fy = (sx - x0)[:, None], (sy - y0)[:, None]
    nidx = xp.arange(n)[:, None, None]

    def at(yi, xi):
        return x[nidx, :, yi, xi].transpose(0, 3, 1, 2)                    # (N, C, H, W)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return (top * (1 - fy) + bottom * fy).astype(x.dtype)


def random_erase(x, rng, p=0.5, area=(0.02, 0.2), ratio=(0.3, 3.3)):
    """With probability p per image, set a random rectangle to 0."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    a = rng.uniform(*area, n) * h * w
    r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), n))
    eh = np.clip(np.sqrt(a * r).round(), 1, h).astype(np.int64)
    ew = np.clip(np.sqrt(a / r).round(), 1, w).astype(np.int64)
    y0 = (rng.random(n) * (h - eh + 1)).astype(np.int64)
    x0 = (rng.random(n) * (w - ew + 1)).astype(np.int64)
    on = rng.random(n) < p
    ys, xs = xp.arange(h)[None, :, None], xp.arange(w)[None, None, :]
    y0, eh, x0, ew, on = (_param(v, x)[:, None, None] for v in (y0, eh, x0, ew, on))
    box = (ys >= y0) & (ys < y0 + eh) & (xs >= x0) & (xs < x0 + ew) & on
    return xp.where(box[:, None], xp.zeros((), dtype=x.dtype), x)


def _finite(v):
    import math
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Augment:
    """Which augmentations to apply, in this order: affine, crop, flip, erase."""
    crop: int = 4               # max shift in pixels (0: off)
    flip: bool = True
    rotate: float = 10.0        # max degrees of the affine jitter (0: off)
    scale: float = 0.1          # max relative scale of the affine jitter
    erase: float = 0.5          # probability of random erasing (0: off)

    def __post_init__(self):
        checks = [("crop", isinstance(self.crop, (int, np.integer)) and not isinstance(self.crop, bool)
                   and 0 <= self.crop <= 16, "a whole number of pixels from 0 to 16"),
                  ("rotate", _finite(self.rotate) and 0 <= self.rotate <= 180, "degrees from 0 to 180"),
                  ("scale", _finite(self.scale) and 0 <= self.scale < 1, "in [0, 1)"),
                  ("erase", _finite(self.erase) and 0 <= self.erase <= 1, "a probability in [0, 1]")]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"augmentation {name} must be {what}, got {getattr(self, name)!r}")

    def __call__(self, x, rng):
        if self.rotate or self.scale:
            x = random_affine(x, rng, self.rotate, self.scale)
        if self.crop:
            x = random_crop(x, rng, self.crop)
        if self.flip:
            x = random_flip(x, rng)
        if self.erase:
            x = random_erase(x, rng, self.erase)
        return x

    @classmethod
    def none(cls):
        return cls(crop=0, flip=False, rotate=0.0, scale=0.0, erase=0.0)
