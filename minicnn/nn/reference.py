"""Slow, obviously-correct references for every layer: read these first.

Plain loops straight from the definitions, on NumPy, for small inputs. The tests use them as
the oracle for the textbook layers (and, through the layers, for every engine), so they must
stay simple enough to check by eye. Each function is one layer's forward or backward; the
backward ones take the upstream gradient ``g`` = dL/d(output) and return dL/d(each input).

Convolution (really cross-correlation, as in every deep learning library)::

    out[n, o, y, x] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, y*s + i, x*s + j]

Max-pooling::

    out[n, c, y, x] = max_{i, j} x[n, c, y*s + i, x*s + j]

and its gradient goes to the first maximum of each window (row-major order, PyTorch's choice
when several inputs tie). BatchNorm is given twice: as the staged computational graph, one
node at a time forward and in reverse (as the classic courses derive it), and as the short
formula the layer uses; the tests tie the two.
"""
import math

import numpy as np

__all__ = ["conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward", "relu_forward",
           "relu_backward", "linear_forward", "linear_backward", "dropout_forward", "dropout_backward",
           "batchnorm2d_forward", "batchnorm2d_backward_staged", "batchnorm2d_backward_formula",
           "cross_entropy", "cross_entropy_backward"]


def _pad(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x


# --- Conv2d ---------------------------------------------------------------------------------
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


# --- MaxPool2d ------------------------------------------------------------------------------
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


# --- ReLU -----------------------------------------------------------------------------------
def relu_forward(x):
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        out[i] = x[i] if x[i] > 0 else 0.0
    return out


def relu_backward(dout, x):
    dx = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        dx[i] = dout[i] if x[i] > 0 else 0.0
    return dx


# --- Linear ---------------------------------------------------------------------------------
def linear_forward(x, w, b):
    """out[n, o] = b[o] + sum_i x[n, i] * w[o, i]"""
    n, fin = x.shape
    fout = w.shape[0]
    out = np.zeros((n, fout), dtype=x.dtype)
    for ni in range(n):
        for o in range(fout):
            out[ni, o] = (b[o] if b is not None else 0.0) + sum(x[ni, i] * w[o, i] for i in range(fin))
    return out


def linear_backward(dout, x, w):
    """Returns (dx, dw, db): out[n, o] depends on x[n, i] through w[o, i], and on w[o, i] through x[n, i]."""
    n, fin = x.shape
    fout = w.shape[0]
    dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros(fout, dtype=dout.dtype)
    for ni in range(n):
        for o in range(fout):
            g = dout[ni, o]
            db[o] += g
            for i in range(fin):
                dx[ni, i] += g * w[o, i]
                dw[o, i] += g * x[ni, i]
    return dx, dw, db


# --- Dropout --------------------------------------------------------------------------------
def dropout_forward(x, u, p):
    """``u``: the uniform draws, one per value; kept values are scaled by 1 / (1 - p)."""
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        if u[i] >= p:
            out[i] = x[i] / (1.0 - p)
    return out


def dropout_backward(dout, u, p):
    dx = np.zeros_like(dout)
    for i in np.ndindex(dout.shape):
        if u[i] >= p:
            dx[i] = dout[i] / (1.0 - p)
    return dx


# --- BatchNorm2d ----------------------------------------------------------------------------
def batchnorm2d_forward(x, gamma, beta, eps=1e-5):
    """Training mode, per channel over its N*H*W values. Returns (out, cache) where cache holds
    every node of the graph: mu, xc = x - mu, var, std, istd = 1/std, xhat = xc * istd."""
    n, c, h, w = x.shape
    m = n * h * w
    out = np.zeros_like(x)
    cache = []
    for ci in range(c):
        v = x[:, ci]
        mu = sum(v.flat) / m                          # node 1: the mean
        xc = v - mu                                   # node 2: centred values
        var = sum(t * t for t in xc.flat) / m         # node 3: the (biased) variance
        std = math.sqrt(var + eps)                    # node 4
        istd = 1.0 / std                              # node 5
        xhat = xc * istd                              # node 6: normalised values
        out[:, ci] = gamma[ci] * xhat + beta[ci]      # node 7: scale and shift
        cache.append((xc, var, std, istd, xhat))
    return out, cache


def batchnorm2d_backward_staged(dout, cache, gamma, eps=1e-5):
    """The chain rule node by node, in reverse (CS231n's computational-graph derivation)."""
    c = dout.shape[1]
    m = dout.shape[0] * dout.shape[2] * dout.shape[3]
    dx = np.zeros_like(dout)
    dgamma, dbeta = np.zeros(c, dtype=dout.dtype), np.zeros(c, dtype=dout.dtype)
    for ci in range(c):
        xc, var, std, istd, xhat = cache[ci]
        g = dout[:, ci]
        dbeta[ci] = g.sum()                           # node 7: out = gamma * xhat + beta
        dgamma[ci] = (g * xhat).sum()
        dxhat = g * gamma[ci]
        distd = (dxhat * xc).sum()                    # node 6: xhat = xc * istd
        dxc = dxhat * istd
        dstd = -distd / std ** 2                      # node 5: istd = 1 / std
        dvar = dstd * 0.5 / math.sqrt(var + eps)      # node 4: std = sqrt(var + eps)
        dxc = dxc + dvar * 2.0 * xc / m               # node 3: var = sum(xc^2) / M
        dmu = -dxc.sum()                              # node 2: xc = x - mu
        dx[:, ci] = dxc + dmu / m                     # node 1: mu = sum(x) / M
    return dx, dgamma, dbeta


def batchnorm2d_backward_formula(dout, cache, gamma):
    """The same gradient collapsed into one line per channel (what BatchNorm2d.backward computes)::

        dx = gamma / std * (g - (sum(g) + xhat * sum(g * xhat)) / M)
    """
    c = dout.shape[1]
    m = dout.shape[0] * dout.shape[2] * dout.shape[3]
    dx = np.zeros_like(dout)
    dgamma, dbeta = np.zeros(c, dtype=dout.dtype), np.zeros(c, dtype=dout.dtype)
    for ci in range(c):
        _, _, std, _, xhat = cache[ci]
        g = dout[:, ci]
        dbeta[ci], dgamma[ci] = g.sum(), (g * xhat).sum()
        dx[:, ci] = gamma[ci] / std * (g - (dbeta[ci] + xhat * dgamma[ci]) / m)
    return dx, dgamma, dbeta


# --- Softmax cross-entropy ------------------------------------------------------------------
def cross_entropy(logits, labels, weight=None, label_smoothing=0.0):
    """PyTorch's CrossEntropyLoss(weight, label_smoothing, reduction='mean'), one sample at a time."""
    n, c = logits.shape
    w = np.ones(c) if weight is None else weight
    total, total_w = 0.0, 0.0
    for i in range(n):
        zmax = max(logits[i])
        logsumexp = zmax + math.log(sum(math.exp(z - zmax) for z in logits[i]))
        for k in range(c):
            q = (1 - label_smoothing) * w[labels[i]] * (k == labels[i]) + label_smoothing / c * w[k]
            total += q * (logsumexp - logits[i, k])           # q * (-log p_k)
        total_w += w[labels[i]]
    return total / total_w


def cross_entropy_backward(logits, labels, weight=None, label_smoothing=0.0):
    """dL/dlogits: (sum_k q_k * softmax - q) / W per sample."""
    n, c = logits.shape
    w = np.ones(c) if weight is None else weight
    grad = np.zeros_like(logits)
    total_w = sum(w[y] for y in labels)
    for i in range(n):
        e = [math.exp(z - max(logits[i])) for z in logits[i]]
        p = [v / sum(e) for v in e]
        q = [(1 - label_smoothing) * w[labels[i]] * (k == labels[i]) + label_smoothing / c * w[k]
             for k in range(c)]
        for k in range(c):
            grad[i, k] = (sum(q) * p[k] - q[k]) / total_w
    return grad


def distillation_loss(logits, labels, teacher_probs, temperature, weight, label_smoothing=0.0):
    """(1 - a) CE(z, y) + a T^2 (1/N) sum_i KL(p_i || softmax(z_i / T)), one sample at a time."""
    n, c = logits.shape
    kl = 0.0
    for i in range(n):
        zt = [z / temperature for z in logits[i]]
        logsumexp = max(zt) + math.log(sum(math.exp(z - max(zt)) for z in zt))
        for k in range(c):
            p = teacher_probs[i, k]
            if p > 0:
                kl += p * (math.log(p) - (zt[k] - logsumexp))         # p (log p - log s)
    hard = cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return (1 - weight) * hard + weight * temperature ** 2 * kl / n


def distillation_loss_backward(logits, labels, teacher_probs, temperature, weight, label_smoothing=0.0):
    """dL/dlogits: (1 - a) dCE/dz + a T (softmax(z / T) - p) / N per sample."""
    n, c = logits.shape
    grad = (1 - weight) * cross_entropy_backward(logits, labels, label_smoothing=label_smoothing)
    for i in range(n):
        e = [math.exp((z - max(logits[i])) / temperature) for z in logits[i]]
        for k in range(c):
            grad[i, k] += weight * temperature * (e[k] / sum(e) - teacher_probs[i, k]) / n
    return grad
