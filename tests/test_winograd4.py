"""Winograd's F(4x4, 3x3) convolution (minicnn/engines/cpu/winograd4.py) against the naive loops."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minicnn.engines.cpu import winograd4
from minicnn.nn.reference import conv2d_forward

BT, AT = winograd4.BT, winograd4.AT      # (checked below: they compute a correlation)


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def test_the_matrices_compute_a_4x4_correlation():
    rng = np.random.default_rng(0)
    d, g = rng.normal(size=(6, 6)), rng.normal(size=(3, 3))
    y = AT @ ((winograd4._G @ g @ winograd4._G.T) * (BT @ d @ BT.T)) @ AT.T
    np.testing.assert_allclose(y, [[(d[i:i + 3, j:j + 3] * g).sum() for j in range(4)] for i in range(4)],
                               atol=1e-13)


@given(n=st.integers(1, 3), c=st.integers(1, 9), oc=st.integers(1, 9), tiles_h=st.integers(1, 3),
       tiles_w=st.integers(1, 3), padding=st.integers(0, 2))
def test_conv3x3_equals_the_naive_loops_in_float64(n, c, oc, tiles_h, tiles_w, padding):
    oh, ow = 4 * tiles_h, 4 * tiles_w
    h, w = oh + 2 - 2 * padding, ow + 2 - 2 * padding
    if h < 1 or w < 1:
        return
    rng = np.random.default_rng(n * 100 + c * 10 + oc)
    x, weight = rng.normal(size=(n, c, h, w)), rng.normal(size=(oc, c, 3, 3))
    assert winograd4.applies(3, 1, padding, oh, ow)
    out = np.empty((n, oh, ow, oc))
    winograd4.conv3x3(_nhwc(x), winograd4.filter_transform(weight), padding, out)
    expected = conv2d_forward(x, weight, np.zeros(oc), 1, padding)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected, rtol=1e-10, atol=1e-10)


def test_float32_error_is_small_next_to_the_values():
    rng = np.random.default_rng(1)
    x, weight = rng.normal(size=(2, 32, 24, 24)).astype(np.float32), rng.normal(size=(64, 32, 3, 3)).astype(np.float32)
    out = np.empty((2, 24, 24, 64), np.float32)
    winograd4.conv3x3(_nhwc(x), winograd4.filter_transform(weight), 1, out)
    expected = conv2d_forward(x.astype(np.float64), weight.astype(np.float64), np.zeros(64), 1, 1)
    assert np.abs(out.transpose(0, 3, 1, 2) - expected).max() < 2e-5 * np.abs(expected).max()


@pytest.mark.parametrize("args, ok", [((3, 1, 1, 24, 24), True), ((3, 1, 1, 6, 6), False), ((3, 2, 1, 24, 24), False),
                                      ((5, 1, 2, 24, 24), False), ((3, 1, 1, 24, 20), True), ((3, 1, 3, 24, 24), False)])
def test_applies_only_to_3x3_stride_1_on_4x4_tiles(args, ok):
    assert winograd4.applies(*args) is ok
