"""Array kernels behind the layers.

* :mod:`.reference` -- naive loops, the oracle and the teaching text;
* :mod:`.im2col` -- vectorised im2col/col2im on the array module (NumPy or CuPy).
"""
from .im2col import col2im, conv_output_size, im2col

__all__ = ["im2col", "col2im", "conv_output_size"]
