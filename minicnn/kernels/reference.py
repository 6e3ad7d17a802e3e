"""Slow, obviously-correct references: read these first.

Plain loops straight from the definitions, on NumPy, for small inputs. The tests
use them as the oracle for the vectorised layers (and for any faster kernel),
so they must stay simple enough to check by eye.

Convolution (really cross-correlation, as in every deep learning library)::

    out[n, o, y, x] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, y*s + i, x*s + j]

Max-pooling::

    out[n, c, y, x] = max_{i, j} x[n, c, y*s + i, x*s + j]

and its gradient goes to the first maximum of each window (row-major order,
PyTorch's choice when several inputs tie).
"""
import numpy as np

__all__ = ["conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward"]


def _pad(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x


def conv2d_forward(x, w, b, stride=1, padding=0):
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    xp = _pad(x, padding)
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, oc, oh, ow), dtype=x.dtype)
    for ni in range(n):
        for o in range(oc):
            for y in range(oh):
                for xx in range(ow):
                    window = xp[ni, :, y * stride:y * stride + kh, xx * stride:xx * stride + kw]
                    out[ni, o, y, xx] = np.sum(window * w[o]) + (b[o] if b is not None else 0)
    return out


def conv2d_backward(dout, x, w, stride=1, padding=0):
    """Returns (dx, dw, db): every output pixel pushes its gradient back to its window."""
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    xp = _pad(x, padding)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    db = np.zeros(oc, dtype=dout.dtype)
    _, _, oh, ow = dout.shape
    for ni in range(n):
        for o in range(oc):
            for y in range(oh):
                for xx in range(ow):
                    g = dout[ni, o, y, xx]
                    ys, xs = y * stride, xx * stride
                    dw[o] += g * xp[ni, :, ys:ys + kh, xs:xs + kw]
                    dxp[ni, :, ys:ys + kh, xs:xs + kw] += g * w[o]
                    db[o] += g
    dx = dxp[:, :, padding:padding + h, padding:padding + wd]
    return dx, dw, db


def maxpool2d_forward(x, kernel, stride):
    n, c, h, w = x.shape
    oh = (h - kernel) // stride + 1
    ow = (w - kernel) // stride + 1
    out = np.zeros((n, c, oh, ow), dtype=x.dtype)
    for ni in range(n):
        for ci in range(c):
            for y in range(oh):
                for xx in range(ow):
                    out[ni, ci, y, xx] = x[ni, ci, y * stride:y * stride + kernel,
                                           xx * stride:xx * stride + kernel].max()
    return out


def maxpool2d_backward(dout, x, kernel, stride):
    n, c, h, w = x.shape
    _, _, oh, ow = dout.shape
    dx = np.zeros_like(x)
    for ni in range(n):
        for ci in range(c):
            for y in range(oh):
                for xx in range(ow):
                    window = x[ni, ci, y * stride:y * stride + kernel, xx * stride:xx * stride + kernel]
                    i, j = np.unravel_index(np.argmax(window), window.shape)  # first maximum
                    dx[ni, ci, y * stride + i, xx * stride + j] += dout[ni, ci, y, xx]
    return dx
