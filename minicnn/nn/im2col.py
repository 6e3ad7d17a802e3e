"""im2col and col2im: turn a convolution into one matrix product.

For an input ``x`` of shape (N, C, H, W) and a KH×KW kernel, ``im2col`` copies
every receptive field into one row::

    col[(n, oh, ow), (c, i, j)] = x_pad[n, c, oh*stride + i, ow*stride + j]

so the convolution is ``col @ W.reshape(OC, C*KH*KW).T``. ``col2im`` is its
adjoint: it adds each row back onto the pixels it came from (pixels shared by
overlapping windows receive the sum), which is exactly what the backward pass
needs for dL/dx.

Both loop over the KH×KW kernel offsets only (9 iterations for 3×3); each
iteration moves a whole strided slice of the batch, so there is no Python loop
over pixels or images, and no ``np.add.at``. The same code runs on any array
module (``xp``). (After "Deep Learning from Scratch", common/util.py.)
"""
from ..backend import get_array_module

__all__ = ["conv_output_size", "im2col", "col2im"]


def conv_output_size(size, kernel, stride, padding):
    """Output length along one axis: floor((size + 2*padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x, kh, kw, stride=1, padding=0):
    """(N, C, H, W) -> (N*OH*OW, C*KH*KW); rows ordered (n, oh, ow), columns (c, i, j)."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    if padding:
        x = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    col = xp.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # kernel offset (i, j) sees pixel (oh*stride + i, ow*stride + j) for every output position
            col[:, :, i, j] = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw)


def col2im(col, x_shape, kh, kw, stride=1, padding=0):
    """Adjoint of :func:`im2col`: (N*OH*OW, C*KH*KW) -> (N, C, H, W), summing overlaps."""
    xp = get_array_module(col)
    n, c, h, w = x_shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    col = col.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    img = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            img[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += col[:, :, i, j]
    return img[:, :, padding:padding + h, padding:padding + w]
