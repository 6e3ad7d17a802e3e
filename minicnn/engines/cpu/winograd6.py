"""3x3 convolution (stride 1) by Winograd's F(6x6, 3x3): 64 multiplications for 36 outputs.

The third of the family (:mod:`.winograd`: F(2x2, 3x3), :mod:`.winograd4`: F(4x4, 3x3)). Each
8x8 input tile gives a 6x6 block of outputs with 64 products instead of 324 (5.06x fewer), with
the interpolation points 0, +-1, +-2, +-1/2 and infinity (Lavin & Gray; NNPACK's choice)::

    Y = A^T [ (G g G^T) * (B^T d B) ] A

          | 1   0   -21/4  0     21/4   0    -1  0 |         | 1      0      0    |
          | 0   1    1    -17/4 -17/4   1     1  0 |         | -2/9  -2/9   -2/9  |
          | 0  -1    1     17/4 -17/4  -1     1  0 |         | -2/9   2/9   -2/9  |
    B^T = | 0   1/2  1/4  -5/2  -5/4    2     1  0 |     G = | 1/90   1/45   2/45 |
          | 0  -1/2  1/4   5/2  -5/4   -2     1  0 |         | 1/90  -1/45   2/45 |
          | 0   2    4    -5/2  -5      1/2   1  0 |         | 32/45  16/45  8/45 |
          | 0  -2    4     5/2  -5     -1/2   1  0 |         | 32/45 -16/45  8/45 |
          | 0  -1    0     21/4  0    -21/4   0  1 |         | 0      0      1    |

          | 1  1  1  1   1   1     1     0 |
          | 0  1 -1  2  -2   1/2  -1/2   0 |
    A^T = | 0  1  1  4   4   1/4   1/4   0 |
          | 0  1 -1  8  -8   1/8  -1/8   0 |
          | 0  1  1  16  16  1/16  1/16  0 |
          | 0  1 -1  32 -32  1/32 -1/32  1 |

Where it pays: a 6x6 output map with padding 1 (the EmotionClassifier's last block) is one tile,
the whole padded 8x8 image: 64 products per output channel and input channel, against 144 for
F(2x2, 3x3)'s nine 4x4 tiles and for F(4x4, 3x3)'s four (their 64 outputs would be mostly
padding). On the 24x24 and 12x12 maps it needs 1.27x fewer products than F(4x4, 3x3) and writes
fewer transformed values, and the inference session (:mod:`.inference`) takes it wherever the map
divides into 6x6 tiles. The price is accuracy: constants up to 32 and 21/4 make float32 results
differ from im2col's by some 1e-5 relative (1e-6 for F(4x4, 3x3); the tests bound both), below
what an eval-mode prediction can notice. The inference session uses it forward; training uses it
backward only (:class:`~.blocks.ConvBatchNormReLUPool`: dL/dx as a conv with the turned filters, and
dL/dW by the transposed algorithm below), where an error this size cannot move a pooling winner or
a ReLU gate. Serial kernels for worker threads; the obviously-correct version is im2col + GEMM,
and the tests tie them.
"""
import numpy as np
from numba import njit

from .winograd import _pad_into

__all__ = ["applies", "filter_transform", "tiles", "conv3x3", "weight_grad_sums", "weight_grad_columns"]

_opts = dict(parallel=False, cache=True, fastmath=False, nogil=True)
_G = np.array([[1, 0, 0], [-2 / 9, -2 / 9, -2 / 9], [-2 / 9, 2 / 9, -2 / 9],
               [1 / 90, 1 / 45, 2 / 45], [1 / 90, -1 / 45, 2 / 45],
               [32 / 45, 16 / 45, 8 / 45], [32 / 45, -16 / 45, 8 / 45], [0, 0, 1]])
_GG = np.kron(_G, _G)          # (64, 9): row 8a + b, column 3i + j: G[a, i] G[b, j]
# B^T and A^T as matrices (the kernels below hard-code their rows; the GPU engine's inference
# kernels take them as arrays).
BT = np.array([[1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0], [0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0],
               [0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0], [0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0],
               [0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0], [0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0],
               [0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0], [0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1]])
AT = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0], [0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0],
               [0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0], [0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0],
               [0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1]])


def applies(kernel_size, stride, padding, oh, ow):
    """True for a 3x3 stride-1 conv whose (oh, ow) output divides into 6x6 tiles."""
    return kernel_size == 3 and stride == 1 and padding <= 2 and oh % 6 == 0 and ow % 6 == 0


def tiles(oh, ow):
    return oh // 6, ow // 6


def filter_transform(weight):
    """U = G g G^T for every filter: (OC, C, 3, 3) -> (64, C, OC), row 8a + b: one float64 matrix
    product (64, 9) x (9, C OC), returned in the weight's dtype."""
    oc, c = weight.shape[:2]
    u = _GG @ np.asarray(weight, dtype=np.float64).transpose(1, 0, 2, 3).reshape(c * oc, 9).T
    return np.ascontiguousarray(u.reshape(64, c, oc), dtype=weight.dtype)


@njit(inline="always")
def _bt(d0, d1, d2, d3, d4, d5, d6, d7):
    """The eight rows of B^T applied to (d0 .. d7), in pairs that share their even and odd parts.
    The constants take the data's type, f(4.25): a bare 4.25 would make float32 arithmetic float64."""
    f = type(d0)
    e1, o1 = d2 + d6 - f(4.25) * d4, d1 + d5 - f(4.25) * d3
    e3, o3 = f(0.25) * d2 + d6 - f(1.25) * d4, f(0.5) * d1 - f(2.5) * d3 + f(2) * d5
    e5, o5 = f(4) * d2 + d6 - f(5) * d4, f(2) * d1 - f(2.5) * d3 + f(0.5) * d5
    return (d0 - d6 + f(5.25) * (d4 - d2), e1 + o1, e1 - o1, e3 + o3, e3 - o3, e5 + o5, e5 - o5,
            d7 - d1 + f(5.25) * (d3 - d5))


@njit(inline="always")
def _at(m0, m1, m2, m3, m4, m5, m6, m7):
    """The six rows of A^T applied to (m0 .. m7); constants in the data's type, as in :func:`_bt`."""
    f = type(m0)
    s1, d1, s2, d2, s3, d3 = m1 + m2, m1 - m2, m3 + m4, m3 - m4, m5 + m6, m5 - m6
    return (m0 + s1 + s2 + s3, d1 + f(2) * d2 + f(0.5) * d3, s1 + f(4) * s2 + f(0.25) * s3,
            d1 + f(8) * d2 + f(0.125) * d3, s1 + f(16) * s2 + f(0.0625) * s3, d1 + f(32) * d2 + f(0.03125) * d3 + m7)


@njit(**_opts)
def input_transform(xp, th, tw, v):
    """v[8a + b, tile, c] = (B^T d B)[a, b] for the 8x8 tile d (stride 6) of every image of the
    padded channels-last xp (N, 6 th + 2, 6 tw + 2, C): B^T combines eight whole input rows into
    the tile row's e[a], then eight columns of each e[a] into v; each inner loop is one contiguous
    run."""
    n, hp, wp, c = xp.shape
    e = np.empty((8, wp * c), xp.dtype)
    for ni in range(n):
        for ty in range(th):
            d0, d1 = xp[ni, 6 * ty].reshape(-1), xp[ni, 6 * ty + 1].reshape(-1)
            d2, d3 = xp[ni, 6 * ty + 2].reshape(-1), xp[ni, 6 * ty + 3].reshape(-1)
            d4, d5 = xp[ni, 6 * ty + 4].reshape(-1), xp[ni, 6 * ty + 5].reshape(-1)
            d6, d7 = xp[ni, 6 * ty + 6].reshape(-1), xp[ni, 6 * ty + 7].reshape(-1)
            for k in range(wp * c):
                e[0, k], e[1, k], e[2, k], e[3, k], e[4, k], e[5, k], e[6, k], e[7, k] = _bt(
                    d0[k], d1[k], d2[k], d3[k], d4[k], d5[k], d6[k], d7[k])
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                q = 6 * tx * c                              # column 6tx of the tile row
                for a in range(8):
                    r = e[a]
                    v0, v1, v2, v3 = v[8 * a, t], v[8 * a + 1, t], v[8 * a + 2, t], v[8 * a + 3, t]
                    v4, v5, v6, v7 = v[8 * a + 4, t], v[8 * a + 5, t], v[8 * a + 6, t], v[8 * a + 7, t]
                    for ci in range(c):
                        v0[ci], v1[ci], v2[ci], v3[ci], v4[ci], v5[ci], v6[ci], v7[ci] = _bt(
                            r[q + ci], r[q + c + ci], r[q + 2 * c + ci], r[q + 3 * c + ci], r[q + 4 * c + ci],
                            r[q + 5 * c + ci], r[q + 6 * c + ci], r[q + 7 * c + ci])
    return v


@njit(**_opts)
def output_transform(m, th, tw, out):
    """out[n, 6ty + r, 6tx + s, o] = (A^T M A)[r, s] of tile (n, ty, tx): rows first (into f), then
    columns, each a run along the output channels."""
    n, oh, ow, oc = out.shape
    f = np.empty((6, 8, oc), m.dtype)
    for ni in range(n):
        for ty in range(th):
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                for b in range(8):
                    m0, m1, m2, m3 = m[b, t], m[8 + b, t], m[16 + b, t], m[24 + b, t]
                    m4, m5, m6, m7 = m[32 + b, t], m[40 + b, t], m[48 + b, t], m[56 + b, t]
                    f0, f1, f2, f3, f4, f5 = f[0, b], f[1, b], f[2, b], f[3, b], f[4, b], f[5, b]
                    for o in range(oc):
                        f0[o], f1[o], f2[o], f3[o], f4[o], f5[o] = _at(m0[o], m1[o], m2[o], m3[o], m4[o], m5[o],
                                                                       m6[o], m7[o])
                for r in range(6):
                    g0, g1, g2, g3 = f[r, 0], f[r, 1], f[r, 2], f[r, 3]
                    g4, g5, g6, g7 = f[r, 4], f[r, 5], f[r, 6], f[r, 7]
                    row = out[ni, 6 * ty + r]
                    y0, y1, y2 = row[6 * tx], row[6 * tx + 1], row[6 * tx + 2]
                    y3, y4, y5 = row[6 * tx + 3], row[6 * tx + 4], row[6 * tx + 5]
                    for o in range(oc):
                        y0[o], y1[o], y2[o], y3[o], y4[o], y5[o] = _at(g0[o], g1[o], g2[o], g3[o], g4[o], g5[o],
                                                                       g6[o], g7[o])
    return out


def transformed_input(x, padding, th, tw):
    """V = B^T d B of every 8x8 tile of channels-last x (N, H, W, C) padded by ``padding``, for
    th x tw tiles of 6x6 outputs: (64, N * tiles, C)."""
    n, c = x.shape[0], x.shape[3]
    xp = _pad_into(x, padding, np.empty((n, 6 * th + 2, 6 * tw + 2, c), x.dtype))
    return input_transform(xp, th, tw, np.empty((64, n * th * tw, c), x.dtype))


def conv3x3(x, u, padding, out):
    """out (N, OH, OW, OC) = the 3x3 stride-1 convolution of channels-last x (N, H, W, C) with
    ``u`` = :func:`filter_transform` (64, C, OC), no bias; OH and OW multiples of 6."""
    th, tw = tiles(out.shape[1], out.shape[2])
    v = transformed_input(x, padding, th, tw)
    m = np.matmul(v, u, out=np.empty((64, v.shape[1], out.shape[3]), x.dtype))
    return output_transform(m, th, tw, out)


# --- the weight gradient: F(3x3, 6x6), the same algorithm transposed ----------------------------
#
# As for F(2x2, 3x3) in :mod:`.winograd`: transposing the bilinear form gives, per tile, the 3x3
# correlation of the 8x8 input tile d with the 6x6 gradient tile e as
#
#     dW = G^T [ (A e A^T) * (B^T d B) ] G      (A = the transpose of A^T above: 8 x 6)
#
# summed over tiles and images as 64 matrix products V[ab]^T @ E[ab], (C, tiles) x (tiles, OC):
# 64 products per 324 multiply-adds of im2col's col^T @ dY. Its float32 error (some 5e-6 of the
# largest value) stays in the weight gradient: nothing downstream decides on it.

@njit(inline="always")
def _a(g0, g1, g2, g3, g4, g5):
    """A (g0 .. g5): the columns of A^T, in pairs that share their even and odd parts; constants
    in the data's type."""
    f = type(g0)
    e1, o1 = g0 + g2 + g4, g1 + g3 + g5
    e2, o2 = g0 + f(4) * g2 + f(16) * g4, f(2) * g1 + f(8) * g3 + f(32) * g5
    e3, o3 = g0 + f(0.25) * g2 + f(0.0625) * g4, f(0.5) * g1 + f(0.125) * g3 + f(0.03125) * g5
    return g0, e1 + o1, e1 - o1, e2 + o2, e2 - o2, e3 + o3, e3 - o3, g5


@njit(**_opts)
def gradient_transform(g, th, tw, e):
    """e[8a + b, tile, o] = (A g A^T)[a, b] for the 6x6 tile of dL/dY (N, 6 th, 6 tw, OC) of every
    tile: A on the tile's columns (into r), then on each row of r, runs along the channels."""
    n, oh, ow, oc = g.shape
    r = np.empty((8, 6, oc), g.dtype)
    for ni in range(n):
        for ty in range(th):
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                y0, x0 = 6 * ty, 6 * tx
                for s in range(6):                      # each column of the tile: 6 rows -> 8
                    c0, c1, c2 = g[ni, y0, x0 + s], g[ni, y0 + 1, x0 + s], g[ni, y0 + 2, x0 + s]
                    c3, c4, c5 = g[ni, y0 + 3, x0 + s], g[ni, y0 + 4, x0 + s], g[ni, y0 + 5, x0 + s]
                    q0, q1, q2, q3 = r[0, s], r[1, s], r[2, s], r[3, s]
                    q4, q5, q6, q7 = r[4, s], r[5, s], r[6, s], r[7, s]
                    for o in range(oc):
                        q0[o], q1[o], q2[o], q3[o], q4[o], q5[o], q6[o], q7[o] = _a(c0[o], c1[o], c2[o], c3[o],
                                                                                    c4[o], c5[o])
                for a in range(8):                      # ... then each of the 8 rows: 6 columns -> 8
                    p0, p1, p2, p3, p4, p5 = r[a, 0], r[a, 1], r[a, 2], r[a, 3], r[a, 4], r[a, 5]
                    q0, q1, q2, q3 = e[8 * a, t], e[8 * a + 1, t], e[8 * a + 2, t], e[8 * a + 3, t]
                    q4, q5, q6, q7 = e[8 * a + 4, t], e[8 * a + 5, t], e[8 * a + 6, t], e[8 * a + 7, t]
                    for o in range(oc):
                        q0[o], q1[o], q2[o], q3[o], q4[o], q5[o], q6[o], q7[o] = _a(p0[o], p1[o], p2[o], p3[o],
                                                                                    p4[o], p5[o])
    return e


def weight_grad_sums(x, g, padding):
    """S[ab] = V[ab]^T @ E[ab] for channels-last x (N, H, W, C) and dL/dY g (N, OH, OW, OC), OH and
    OW multiples of 6: (64, C, OC). Sums of chunks add up; :func:`weight_grad_columns` makes dW."""
    n, oh, ow, oc = g.shape
    th, tw = tiles(oh, ow)
    v = transformed_input(x, padding, th, tw)
    e = gradient_transform(g, th, tw, np.empty((64, n * th * tw, oc), g.dtype))
    return np.matmul(v.transpose(0, 2, 1), e)


def weight_grad_columns(s):
    """dW = G^T S G from :func:`weight_grad_sums`, as the (9 * C, OC) matrix of rows (i, j, c)
    (Conv2d's weight columns layout): dW[i, j] = sum over (a, b) of G[a, i] G[b, j] S[ab]."""
    c, oc = s.shape[1:]
    return (_GG.T.astype(s.dtype) @ s.reshape(64, c * oc)).reshape(9 * c, oc)


# --- inference: the output transform with the pooling, bias and ReLU after it ---------------------
#
# In eval mode a block is conv -> + b' -> ReLU -> max pool (BatchNorm folded), and pooling first gives
# the same numbers: relu(maxpool(y) + b') (kernels.pool_bias_relu). With a pool size that divides 6
# the windows never cross a tile, so the output transform can pool each tile's 6x6 outputs as it
# makes them: the full-size conv output is never written (the 24x24 map's is 9 MB at batch 64, 150 MB
# at 1024). At batch 64 on 2 cores the time did not change measurably (16.7-19.0 ms against
# 16.8-18.8, interleaved): the memory is what it saves.

@njit(**_opts)
def output_transform_pool_bias_relu(m, th, tw, bias, k, out):
    """out (N, 6 th / k, 6 tw / k, OC) = relu(maxpool_k(A^T M A) + bias), k dividing 6; windows
    scanned row by row as :func:`.kernels.pool_bias_relu` does (the first maximum; a NaN wins)."""
    oc = out.shape[3]
    f = np.empty((6, 8, oc), m.dtype)
    row = np.empty((6, oc), m.dtype)
    acc = np.empty((6 // k, oc), m.dtype)
    zero = bias[0] * 0
    for ni in range(out.shape[0]):
        for ty in range(th):
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                for b in range(8):
                    m0, m1, m2, m3 = m[b, t], m[8 + b, t], m[16 + b, t], m[24 + b, t]
                    m4, m5, m6, m7 = m[32 + b, t], m[40 + b, t], m[48 + b, t], m[56 + b, t]
                    f0, f1, f2, f3, f4, f5 = f[0, b], f[1, b], f[2, b], f[3, b], f[4, b], f[5, b]
                    for o in range(oc):
                        f0[o], f1[o], f2[o], f3[o], f4[o], f5[o] = _at(m0[o], m1[o], m2[o], m3[o], m4[o], m5[o],
                                                                       m6[o], m7[o])
                y0, y1, y2, y3, y4, y5 = row[0], row[1], row[2], row[3], row[4], row[5]
                for pr in range(6 // k):
                    for i in range(k):
                        r = pr * k + i
                        g0, g1, g2, g3 = f[r, 0], f[r, 1], f[r, 2], f[r, 3]
                        g4, g5, g6, g7 = f[r, 4], f[r, 5], f[r, 6], f[r, 7]
                        for o in range(oc):
                            y0[o], y1[o], y2[o], y3[o], y4[o], y5[o] = _at(g0[o], g1[o], g2[o], g3[o], g4[o],
                                                                           g5[o], g6[o], g7[o])
                        for pc in range(6 // k):
                            a = acc[pc]
                            for j in range(k):
                                v = row[pc * k + j]
                                if i == 0 and j == 0:
                                    for o in range(oc):
                                        a[o] = v[o]
                                else:
                                    for o in range(oc):
                                        if v[o] > a[o] or (v[o] != v[o] and a[o] == a[o]):
                                            a[o] = v[o]
                    for pc in range(6 // k):
                        a, dst = acc[pc], out[ni, (6 * ty) // k + pr, (6 * tx) // k + pc]
                        for o in range(oc):
                            v = a[o] + bias[o]
                            dst[o] = v if v > 0 or v != v else zero
    return out


def conv3x3_pool_bias_relu(x, u, padding, bias, k, out):
    """out = relu(maxpool_k(conv3x3(x)) + bias), channels-last, for OH and OW multiples of 6 and a
    pool size k dividing 6: :func:`conv3x3` with the pooling done in its output transform."""
    th, tw = (out.shape[1] * k) // 6, (out.shape[2] * k) // 6
    v = transformed_input(x, padding, th, tw)
    m = np.matmul(v, u, out=np.empty((64, v.shape[1], out.shape[3]), x.dtype))
    return output_transform_pool_bias_relu(m, th, tw, bias, k, out)
