"""3x3 convolution (stride 1) by Winograd's minimal filtering F(2x2, 3x3) in the CPU engine.

im2col + GEMM spends 9 multiplications on each output value per input channel. Winograd's
algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes a
2x2 block of outputs from the 4x4 input tile under it with 16 instead of 36::

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise; d: 4x4 input tile, g: 3x3 filter)

          | 1  0 -1  0 |         | 1    0    0  |
    B^T = | 0  1  1  0 |     G = | 1/2  1/2  1/2|     A^T = | 1  1  1  0 |
          | 0 -1  1  0 |         | 1/2 -1/2  1/2|           | 0  1 -1 -1 |
          | 0  1  0 -1 |         | 0    0    1  |

Summed over input channels, the 16 elementwise products become 16 matrix products, one per
tile position (a, b), so the BLAS still does the work::

    U[ab] = (G g G^T)[ab]  as a (C, OC) matrix             filter_transform, once per step
    V[ab] = (B^T d B)[ab]  as a (tiles, C) matrix          input_transform (numba)
    M[ab] = V[ab] @ U[ab]                                  16 GEMMs: 2.25x fewer FLOPs than im2col
    Y     = A^T M A        for every tile and channel      output_transform (numba)

The input gradient of a stride-1 convolution is itself a convolution of dL/dY with the
filters rotated by 180 degrees and in/out channels swapped, padding k - 1 - p
(``filter_transform(w, for_input_grad=True)``), so it takes the same route. The weight
gradient is the same algorithm transposed, F(3x3, 2x2) (:func:`weight_grad_sums`, below).

The transforms add a few roundings (the 1/2s are exact; the sums are not), so results differ
from im2col's in the last bits of float32, well inside the tests' tolerances. The kernels are
serial: :class:`minicnn.engines.cpu.blocks.ConvBatchNormReLUPool` calls them from its worker threads, a
chunk of images each. The obviously-correct version is im2col + GEMM (:mod:`minicnn.nn.conv`),
and the tests tie the two.
"""
import numpy as np
from numba import njit, prange

from . import workspace

__all__ = ["applies", "filter_transform", "conv3x3", "weight_grad_sums", "weight_grad_columns"]

_opts = dict(parallel=False, cache=True, fastmath=False, nogil=True)
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = np.kron(_G, _G)          # (16, 9): row 4a + b, column 3i + j: G[a, i] G[b, j]
# B^T and A^T as matrices (the kernels below hard-code their rows; the GPU engine's inference
# kernels take them as arrays).
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def applies(kernel_size, stride, padding, oh=None, ow=None):
    """True for the convolutions done here: 3x3, stride 1, padding 0, 1 or 2 (so the input
    gradient, padded by 2 - padding, takes this route too). Any output size: a ragged last tile is
    computed whole and cut (``oh``, ``ow`` are taken, as by :func:`.winograd4.applies`, and ignored)."""
    return kernel_size == 3 and stride == 1 and 0 <= padding <= 2


def filter_transform(weight, for_input_grad=False):
    """U = G g G^T for every filter: (OC, C, 3, 3) -> (16, C, OC), rows ab = 4a + b.

    ``for_input_grad``: the filters of dL/dx instead (turned by 180 degrees, in and out
    channels swapped): (16, OC, C). Computed in float64, returned in the weight's dtype."""
    oc, c = weight.shape[:2]
    u = _planes(16, (oc, c) if for_input_grad else (c, oc), weight.dtype)
    return _filter_transform(np.ascontiguousarray(weight), for_input_grad, u)


def _planes(count, shape, dtype):
    """An empty (count, *shape) array whose planes lie 64 bytes further apart than packed.

    :func:`_filter_transform` writes all 16 planes at once; packed, planes of a multiple of
    4 KiB (128 x 256 float32 filters, say) fall into the same cache sets and evict each other
    (3x slower here)."""
    size = shape[0] * shape[1]
    buf = workspace.empty((count, size + 64 // np.dtype(dtype).itemsize), dtype)
    return buf[:, :size].reshape((count,) + tuple(shape))


@njit(**dict(_opts, parallel=True))
def _filter_transform(w, turn, u):
    oc, c = w.shape[0], w.shape[1]
    outer, inner = (oc, c) if turn else (c, oc)       # (the inner loop walks along u's last axis)
    k0, k2 = (2, 0) if turn else (0, 2)               # turned: g[i, j] = w[2 - i, 2 - j]
    for pp in prange(outer):
        p = np.int64(pp)                                # (prange's index is unsigned: one type for o, ci)
        for q in range(inner):
            o = p if turn else q
            ci = q if turn else p
            g00, g01, g02 = np.float64(w[o, ci, k0, k0]), np.float64(w[o, ci, k0, 1]), np.float64(w[o, ci, k0, k2])
            g10, g11, g12 = np.float64(w[o, ci, 1, k0]), np.float64(w[o, ci, 1, 1]), np.float64(w[o, ci, 1, k2])
            g20, g21, g22 = np.float64(w[o, ci, k2, k0]), np.float64(w[o, ci, k2, 1]), np.float64(w[o, ci, k2, k2])
            # t = G g: rows (g0, (g0 + g1 + g2)/2, (g0 - g1 + g2)/2, g2)
            t00, t01, t02 = g00, g01, g02
            t10, t11, t12 = 0.5 * (g00 + g10 + g20), 0.5 * (g01 + g11 + g21), 0.5 * (g02 + g12 + g22)
            t20, t21, t22 = 0.5 * (g00 - g10 + g20), 0.5 * (g01 - g11 + g21), 0.5 * (g02 - g12 + g22)
            t30, t31, t32 = g20, g21, g22
            # U = t G^T: the same on the columns of each row a
            ua = ((t00, 0.5 * (t00 + t01 + t02), 0.5 * (t00 - t01 + t02), t02),
                  (t10, 0.5 * (t10 + t11 + t12), 0.5 * (t10 - t11 + t12), t12),
                  (t20, 0.5 * (t20 + t21 + t22), 0.5 * (t20 - t21 + t22), t22),
                  (t30, 0.5 * (t30 + t31 + t32), 0.5 * (t30 - t31 + t32), t32))
            for a in range(4):
                row = ua[a]
                if turn:
                    u[4 * a, o, ci], u[4 * a + 1, o, ci], u[4 * a + 2, o, ci], u[4 * a + 3, o, ci] = row
                else:
                    u[4 * a, ci, o], u[4 * a + 1, ci, o], u[4 * a + 2, ci, o], u[4 * a + 3, ci, o] = row
    return u


def tiles(oh, ow):
    """The 2x2 output tiles over an (oh, ow) output: (rows, columns) of tiles."""
    return -(-oh // 2), -(-ow // 2)


@njit(**_opts)
def _pad_into(x, p, xp):
    """xp = x with p zeros above/left and zeros below/right to xp's size. Only the border is
    zeroed: the copy writes the rest."""
    n, h, w, c = x.shape
    xp[:, :p] = 0
    xp[:, p + h:] = 0
    xp[:, p:p + h, :p] = 0
    xp[:, p:p + h, p + w:] = 0
    for ni in range(n):
        for yy in range(h):
            for xx in range(w):
                for ci in range(c):
                    xp[ni, yy + p, xx + p, ci] = x[ni, yy, xx, ci]
    return xp


@njit(**_opts)
def input_transform(xp, th, tw, v):
    """v[4a + b, tile, c] = (B^T d B)[a, b] for the 4x4 tile d of every image, tile and channel.

    B^T's rows are (d0 - d2, d1 + d2, d2 - d1, d1 - d3). They combine four input rows into the
    tile row's e[a] (whole rows at once), then four columns of each e[a] into v; every loop is
    one contiguous run over the channels, which the compiler turns into SIMD."""
    n, hp, wp, c = xp.shape
    e = np.empty((4, wp * c), xp.dtype)
    for ni in range(n):
        for ty in range(th):
            d0, d1, d2, d3 = (xp[ni, 2 * ty].reshape(-1), xp[ni, 2 * ty + 1].reshape(-1),
                              xp[ni, 2 * ty + 2].reshape(-1), xp[ni, 2 * ty + 3].reshape(-1))
            for k in range(wp * c):
                e[0, k] = d0[k] - d2[k]
                e[1, k] = d1[k] + d2[k]
                e[2, k] = d2[k] - d1[k]
                e[3, k] = d1[k] - d3[k]
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                q = 2 * tx * c                              # column 2tx of the tile row
                for a in range(4):
                    ea = e[a]
                    va0, va1, va2, va3 = v[4 * a, t], v[4 * a + 1, t], v[4 * a + 2, t], v[4 * a + 3, t]
                    for ci in range(c):
                        va0[ci] = ea[q + ci] - ea[q + 2 * c + ci]
                    for ci in range(c):
                        va1[ci] = ea[q + c + ci] + ea[q + 2 * c + ci]
                    for ci in range(c):
                        va2[ci] = ea[q + 2 * c + ci] - ea[q + c + ci]
                    for ci in range(c):
                        va3[ci] = ea[q + c + ci] - ea[q + 3 * c + ci]
    return v


@njit(**_opts)
def output_transform(m, th, tw, out):
    """out[n, 2ty + r, 2tx + s, o] = (A^T M A)[r, s] of tile (n, ty, tx), cut at out's edge.

    A^T's rows are (m0 + m1 + m2, m1 - m2 - m3): first on the tile's rows (into f), then on
    its columns, each a contiguous run over the output channels."""
    n, oh, ow, oc = out.shape
    f = np.empty((2, 4, oc), m.dtype)
    for ni in range(n):
        for ty in range(th):
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                for b in range(4):
                    m0, m1, m2, m3 = m[b, t], m[4 + b, t], m[8 + b, t], m[12 + b, t]
                    f0, f1 = f[0, b], f[1, b]
                    for o in range(oc):
                        f0[o] = m0[o] + m1[o] + m2[o]
                    for o in range(oc):
                        f1[o] = m1[o] - m2[o] - m3[o]
                for r in range(2):
                    y = 2 * ty + r
                    if y >= oh:
                        break
                    fr0, fr1, fr2, fr3 = f[r, 0], f[r, 1], f[r, 2], f[r, 3]
                    left = out[ni, y, 2 * tx]
                    for o in range(oc):
                        left[o] = fr0[o] + fr1[o] + fr2[o]
                    if 2 * tx + 1 < ow:
                        right = out[ni, y, 2 * tx + 1]
                        for o in range(oc):
                            right[o] = fr1[o] - fr2[o] - fr3[o]
    return out


def transformed_input(x, padding, oh, ow):
    """V = B^T d B of every 4x4 tile of channels-last x (N, H, W, C) padded by ``padding``, for an
    (OH, OW) output: (16, N * tiles, C)."""
    n, c = x.shape[0], x.shape[3]
    th, tw = tiles(oh, ow)
    xp = _pad_into(x, padding, np.empty((n, 2 * th + 2, 2 * tw + 2, c), x.dtype))   # (th x tw tiles of 4x4, stride 2)
    return input_transform(xp, th, tw, np.empty((16, n * th * tw, c), x.dtype))


def conv3x3(x, u, padding, out):
    """out (N, OH, OW, OC) = the 3x3 stride-1 convolution of channels-last x (N, H, W, C) with
    the transformed filters ``u`` = :func:`filter_transform` (16, C, OC), without bias.

    Serial kernels and one BLAS call (16 products): meant for a worker thread's chunk."""
    n, oh, ow, oc = out.shape
    v = transformed_input(x, padding, oh, ow)
    m = np.matmul(v, u, out=np.empty((16, v.shape[1], oc), x.dtype))
    return output_transform(m, *tiles(oh, ow), out)


# --- the weight gradient: F(3x3, 2x2), the same algorithm transposed ----------------------------
#
# dW[i, j] = sum over outputs (y, x) of x_pad[y + i, x + j] * dY[y, x]: per tile, the 3x3
# correlation of the 4x4 input tile d with the 2x2 gradient tile e. Transposing the forward's
# bilinear form (sum of e * Y = sum of g * dW) gives
#
#     dW = G^T [ (A e A^T) * (B^T d B) ] G,      A e = (e0, e0 + e1, e0 - e1, -e1)
#
# and summed over tiles and images, the 16 elementwise products become 16 matrix products
# V[ab]^T @ E[ab], (C, tiles) x (tiles, OC): again 2.25x fewer FLOPs than im2col's col^T @ dY.

@njit(**_opts)
def gradient_transform(g, th, tw, e):
    """e[4a + b, tile, o] = (A g A^T)[a, b] for the 2x2 tile of dL/dY (N, OH, OW, OC) under every
    tile (zero beyond OH, OW): A g's rows are (g0, g0 + g1, g0 - g1, -g1), on the tile's rows then
    its columns. Each loop is a contiguous run over the channels, as in input_transform."""
    n, oh, ow, oc = g.shape
    zero = np.zeros(oc, g.dtype)
    r = np.empty((4, 2, oc), g.dtype)
    for ni in range(n):
        for ty in range(th):
            for tx in range(tw):
                t = (ni * th + ty) * tw + tx
                y0, x0 = 2 * ty, 2 * tx
                for s in range(2):                      # the rows of each of the tile's 2 columns
                    g0 = g[ni, y0, x0 + s] if x0 + s < ow else zero
                    g1 = g[ni, y0 + 1, x0 + s] if x0 + s < ow and y0 + 1 < oh else zero
                    _times_a(g0, g1, r[0, s], r[1, s], r[2, s], r[3, s])
                for a in range(4):                      # ... then the columns of each row
                    _times_a(r[a, 0], r[a, 1], e[4 * a, t], e[4 * a + 1, t], e[4 * a + 2, t], e[4 * a + 3, t])
    return e


@njit(inline="always")
def _times_a(p0, p1, q0, q1, q2, q3):
    """(q0, q1, q2, q3) = A (p0, p1) = (p0, p0 + p1, p0 - p1, -p1), channel by channel (4 runs)."""
    for o in range(p0.shape[0]):
        q0[o] = p0[o]
    for o in range(p0.shape[0]):
        q1[o] = p0[o] + p1[o]
    for o in range(p0.shape[0]):
        q2[o] = p0[o] - p1[o]
    for o in range(p0.shape[0]):
        q3[o] = -p1[o]


def weight_grad_sums(x, g, padding):
    """S[ab] = V[ab]^T @ E[ab] for channels-last x (N, H, W, C) and dL/dY g (N, OH, OW, OC):
    (16, C, OC). Sums of chunks add up; :func:`weight_grad_columns` turns the total into dW."""
    n, oh, ow, oc = g.shape
    th, tw = tiles(oh, ow)
    v = transformed_input(x, padding, oh, ow)
    e = gradient_transform(g, th, tw, np.empty((16, n * th * tw, oc), g.dtype))
    return np.matmul(v.transpose(0, 2, 1), e)


def weight_grad_columns(s):
    """dW = G^T S G from :func:`weight_grad_sums`, as the (9 * C, OC) matrix of rows (i, j, c)
    (Conv2d's weight columns layout): dW[i, j] = sum over (a, b) of G[a, i] G[b, j] S[ab]."""
    c, oc = s.shape[1:]
    return (_GG.T.astype(s.dtype) @ s.reshape(16, c * oc)).reshape(9 * c, oc)
