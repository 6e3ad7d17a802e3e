"""3x3 convolution (stride 1) by Winograd's F(4x4, 3x3): 36 multiplications for 16 outputs.

:mod:`.winograd` computes 2x2 outputs from each 4x4 input tile with 16 products instead of 36
(2.25x fewer). F(4x4, 3x3) computes 4x4 outputs from each 6x6 tile with 36 instead of 144 (4x
fewer), with Lavin & Gray's matrices (interpolation points 0, +-1, +-2 and infinity)::

    Y = A^T [ (G g G^T) * (B^T d B) ] A

          | 4  0 -5  0  1  0 |        | 1/4    0     0   |
          | 0 -4 -4  1  1  0 |        | -1/6 -1/6  -1/6  |       | 1  1  1  1  1  0 |
    B^T = | 0  4 -4 -1  1  0 |    G = | -1/6  1/6  -1/6  |  A^T = | 0  1 -1  2 -2  0 |
          | 0 -2 -1  2  1  0 |        | 1/24 1/12  1/6   |       | 0  1  1  4  4  0 |
          | 0  2 -1 -2  1  0 |        | 1/24 -1/12 1/6   |       | 0  1 -1  8 -8  1 |
          | 0  4  0 -5  0  1 |        | 0      0     1   |

As in :mod:`.winograd`, the sums over input channels become matrix products, here 36 of them
(tiles, C) x (C, OC). The larger constants cost accuracy: a float32 result differs from im2col's
by some 1e-6 relative, against 1e-7 for F(2x2, 3x3) (the tests bound both). It pays where the
output divides into 4x4 tiles (1.78x fewer products than F(2x2, 3x3)); on a 6x6 map, 2x2 tiles of
4x4 compute 64 outputs for 36, no fewer products. The inference session (:mod:`.inference`) uses
it on maps that divide into 4x4 but not 6x6 tiles (8x8, 16x16, ...), F(6x6, 3x3) (:mod:`.winograd6`)
on the rest; forward only. The kernels are serial, for
worker threads; the obviously-correct version is im2col + GEMM, and the tests tie them.
"""
import numpy as np
from numba import njit

from .winograd import _pad_into

__all__ = ["applies", "filter_transform", "tiles", "conv3x3"]

_opts = dict(parallel=False, cache=True, fastmath=False, nogil=True)
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
# B^T and A^T as matrices (the kernels below hard-code their rows; the GPU engine's inference
# kernels take them as arrays).
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64)


def applies(kernel_size, stride, padding, oh, ow):
    """True for a 3x3 stride-1 conv whose (oh, ow) output divides into 4x4 tiles."""
    return kernel_size == 3 and stride == 1 and padding <= 2 and oh % 4 == 0 and ow % 4 == 0


def tiles(oh, ow):
    return oh // 4, ow // 4


def filter_transform(weight):
    """U = G g G^T for every filter: (OC, C, 3, 3) -> (36, C, OC), row 6a + b; in float64, returned
    in the weight's dtype."""
    u = np.einsum("ai,ocij,bj->abco", _G, weight.astype(np.float64), _G)
    return np.ascontiguousarray(u.reshape(36, weight.shape[1], weight.shape[0])).astype(weight.dtype)


@njit(inline="always")
def _bt(d0, d1, d2, d3, d4, d5):
    """The six rows of B^T applied to (d0 .. d5): once on whole rows, once on a tile's columns.
    The constants take the data's type, f(4): a bare 4 would turn float32 arithmetic into float64."""
    f = type(d0)
    return (f(4) * d0 - f(5) * d2 + d4, f(-4) * (d1 + d2) + d3 + d4, f(4) * (d1 - d2) - d3 + d4,
            f(-2) * (d1 - d3) - d2 + d4, f(2) * (d1 - d3) - d2 + d4, f(4) * d1 - f(5) * d3 + d5)


@njit(inline="always")
def _at(m0, m1, m2, m3, m4, m5):
    """The four rows of A^T applied to (m0 .. m5): once on a tile's rows, once on its columns."""
    f = type(m0)
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + s12 + s34, d12 + f(2) * d34, s12 + f(4) * s34, d12 + f(8) * d34 + m5


@njit(**_opts)
def input_transform(xp, th, tw, v):
    """v[6a + b, tile, c] = (B^T d B)[a, b] for the 6x6 tile d (stride 4) of every image of the
    padded channels-last xp (N, 4 th + 2, 4 tw + 2, C). B^T first combines six whole input rows
    into the tile row's e[a], then six columns of each e[a] into v; every loop is one contiguous
    run (over a row, or over the channels), which the compiler turns into SIMD."""
    n, hp, wp, c = xp.shape
    e = np.empty((6, wp * c), xp.dtype)
    for ni in range(n):
        for ty in range(th):
            d0, d1, d2 = xp[ni, 4 * ty].reshape(-1), xp[ni, 4 * ty + 1].reshape(-1), xp[ni, 4 * ty + 2].reshape(-1)
            d3, d4, d5 = (xp[ni, 4 * ty + 3].reshape(-1), xp[ni, 4 * ty + 4].reshape(-1),
                          xp[ni, 4 * ty + 5].reshape(-1))
            for k in range(wp * c):
                e[0, k], e[1, k], e[2, k], e[3, k], e[4, k], e[5, k] = _bt(d0[k], d1[k], d2[k], d3[k], d4[k], d5[k])
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                q = 4 * tx * c                              # column 4tx of the tile row
                for a in range(6):
                    r = e[a]
                    v0, v1, v2 = v[6 * a, t], v[6 * a + 1, t], v[6 * a + 2, t]
                    v3, v4, v5 = v[6 * a + 3, t], v[6 * a + 4, t], v[6 * a + 5, t]
                    for ci in range(c):
                        v0[ci], v1[ci], v2[ci], v3[ci], v4[ci], v5[ci] = _bt(
                            r[q + ci], r[q + c + ci], r[q + 2 * c + ci], r[q + 3 * c + ci], r[q + 4 * c + ci],
                            r[q + 5 * c + ci])
    return v


@njit(**_opts)
def output_transform(m, th, tw, out):
    """out[n, 4ty + r, 4tx + s, o] = (A^T M A)[r, s] of tile (n, ty, tx): rows first (into f), then
    columns, each a run along the output channels."""
    n, oh, ow, oc = out.shape
    f = np.empty((4, 6, oc), m.dtype)
    for ni in range(n):
        for ty in range(th):
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                for b in range(6):
                    m0, m1, m2, m3, m4, m5 = m[b, t], m[6 + b, t], m[12 + b, t], m[18 + b, t], m[24 + b, t], m[30 + b, t]
                    f0, f1, f2, f3 = f[0, b], f[1, b], f[2, b], f[3, b]
                    for o in range(oc):
                        f0[o], f1[o], f2[o], f3[o] = _at(m0[o], m1[o], m2[o], m3[o], m4[o], m5[o])
                for r in range(4):
                    g0, g1, g2, g3, g4, g5 = f[r, 0], f[r, 1], f[r, 2], f[r, 3], f[r, 4], f[r, 5]
                    y0, y1 = out[ni, 4 * ty + r, 4 * tx], out[ni, 4 * ty + r, 4 * tx + 1]
                    y2, y3 = out[ni, 4 * ty + r, 4 * tx + 2], out[ni, 4 * ty + r, 4 * tx + 3]
                    for o in range(oc):
                        y0[o], y1[o], y2[o], y3[o] = _at(g0[o], g1[o], g2[o], g3[o], g4[o], g5[o])
    return out


def conv3x3(x, u, padding, out):
    """out (N, OH, OW, OC) = the 3x3 stride-1 convolution of channels-last x (N, H, W, C) with
    ``u`` = :func:`filter_transform` (36, C, OC), no bias; OH and OW multiples of 4."""
    n, oh, ow, oc = out.shape
    th, tw = tiles(oh, ow)
    c = x.shape[3]
    xp = _pad_into(x, padding, np.empty((n, 4 * th + 2, 4 * tw + 2, c), x.dtype))
    v = input_transform(xp, th, tw, np.empty((36, n * th * tw, c), x.dtype))
    m = np.matmul(v, u, out=np.empty((36, v.shape[1], oc), x.dtype))
    return output_transform(m, th, tw, out)
