"""Winograd's F(6x6, 3x3) convolution (minicnn/engines/cpu/winograd6.py) against the naive loops."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minicnn.engines.cpu import winograd6
from minicnn.nn.reference import conv2d_forward

BT, AT = winograd6.BT, winograd6.AT      # (checked below: they compute a correlation)


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def test_the_matrices_compute_a_6x6_correlation():
    rng = np.random.default_rng(0)
    d, g = rng.normal(size=(8, 8)), rng.normal(size=(3, 3))
    y = AT @ ((winograd6._G @ g @ winograd6._G.T) * (BT @ d @ BT.T)) @ AT.T
    np.testing.assert_allclose(y, [[(d[i:i + 3, j:j + 3] * g).sum() for j in range(6)] for i in range(6)],
                               atol=1e-12)


def test_the_kernels_rows_are_the_matrices():
    eye = np.eye(8)
    np.testing.assert_allclose(np.array([winograd6._bt(*row) for row in eye]).T, BT, atol=1e-15)
    np.testing.assert_allclose(np.array([winograd6._at(*row) for row in eye]).T, AT, atol=1e-15)


@given(n=st.integers(1, 3), c=st.integers(1, 9), oc=st.integers(1, 9), tiles_h=st.integers(1, 3),
       tiles_w=st.integers(1, 3), padding=st.integers(0, 2))
def test_conv3x3_equals_the_naive_loops_in_float64(n, c, oc, tiles_h, tiles_w, padding):
    oh, ow = 6 * tiles_h, 6 * tiles_w
    h, w = oh + 2 - 2 * padding, ow + 2 - 2 * padding
    rng = np.random.default_rng(n * 100 + c * 10 + oc)
    x, weight = rng.normal(size=(n, c, h, w)), rng.normal(size=(oc, c, 3, 3))
    assert winograd6.applies(3, 1, padding, oh, ow)
    out = np.empty((n, oh, ow, oc))
    winograd6.conv3x3(_nhwc(x), winograd6.filter_transform(weight), padding, out)
    expected = conv2d_forward(x, weight, np.zeros(oc), 1, padding)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected, rtol=1e-9, atol=1e-9)


def test_float32_error_is_small_next_to_the_values():
    """The EmotionClassifier's last block: 6x6 output, 128 -> 256 channels."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 128, 6, 6)).astype(np.float32)
    weight = rng.normal(size=(256, 128, 3, 3)).astype(np.float32)
    out = np.empty((4, 6, 6, 256), np.float32)
    winograd6.conv3x3(_nhwc(x), winograd6.filter_transform(weight), 1, out)
    expected = conv2d_forward(x.astype(np.float64), weight.astype(np.float64), np.zeros(256), 1, 1)
    assert np.abs(out.transpose(0, 3, 1, 2) - expected).max() < 4e-5 * np.abs(expected).max()


@pytest.mark.parametrize("args, ok", [((3, 1, 1, 6, 6), True), ((3, 1, 1, 12, 24), True), ((3, 1, 1, 8, 8), False),
                                      ((3, 2, 1, 6, 6), False), ((5, 1, 2, 6, 6), False), ((3, 1, 3, 6, 6), False)])
def test_applies_only_to_3x3_stride_1_on_6x6_tiles(args, ok):
    assert winograd6.applies(*args) is ok


@given(n=st.integers(1, 3), c=st.integers(1, 5), oc=st.integers(1, 4), th=st.integers(1, 3), tw=st.integers(1, 3),
       padding=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_weight_gradient_f3x3_6x6_equals_the_naive_loops(n, c, oc, th, tw, padding, seed):
    """dL/dW by F(3x3, 6x6) (the transposed algorithm) against sum over outputs of x_pad * dL/dY, float64."""
    from minicnn.engines.cpu import winograd6
    rng = np.random.default_rng(seed)
    oh, ow = 6 * th, 6 * tw
    x = rng.standard_normal((n, oh + 2 - 2 * padding, ow + 2 - 2 * padding, c))
    g = rng.standard_normal((n, oh, ow, oc))
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    want = np.zeros((3, 3, c, oc))
    for i in range(3):
        for j in range(3):
            want[i, j] = np.einsum("nyxc,nyxo->co", xp[:, i:i + oh, j:j + ow], g)
    got = winograd6.weight_grad_columns(winograd6.weight_grad_sums(x, g, padding))
    np.testing.assert_allclose(got, want.reshape(9 * c, oc), rtol=1e-10, atol=1e-10 * np.abs(want).max())


@given(n=st.integers(1, 3), c=st.integers(1, 5), oc=st.integers(1, 4), th=st.integers(1, 3), tw=st.integers(1, 3),
       padding=st.integers(0, 2), pool=st.sampled_from([1, 2, 3]), nan=st.booleans(), seed=st.integers(0, 2**16))
def test_pooling_in_the_output_transform_equals_conv_then_pool(n, c, oc, th, tw, padding, pool, nan, seed):
    """The inference session's fused F(6x6, 3x3) block: the same bits as the conv, then
    kernels.pool_bias_relu (first maximum, a NaN wins), for every pool size dividing 6."""
    from minicnn.engines.cpu import kernels
    rng = np.random.default_rng(seed)
    oh, ow = 6 * th, 6 * tw
    x = rng.standard_normal((n, oh + 2 - 2 * padding, ow + 2 - 2 * padding, c)).astype(np.float32)
    if nan:
        x[0, rng.integers(x.shape[1]), rng.integers(x.shape[2]), 0] = np.nan
    u = winograd6.filter_transform(rng.standard_normal((oc, c, 3, 3)).astype(np.float32))
    bias = rng.standard_normal(oc).astype(np.float32)
    y = winograd6.conv3x3(x, u, padding, np.empty((n, oh, ow, oc), np.float32))
    want = kernels.pool_bias_relu_serial(y, bias, pool, np.empty((n, oh // pool, ow // pool, oc), np.float32))
    got = winograd6.conv3x3_pool_bias_relu(x, u, padding, bias, pool, np.empty_like(want))
    np.testing.assert_array_equal(got, want)
