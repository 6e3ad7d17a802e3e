"""Winograd's F(2x2, 3x3) convolution (minicnn/engines/cpu/winograd.py) against the naive loops."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from minicnn.engines.cpu import winograd
from minicnn.nn.reference import conv2d_forward

G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _input_grad_by_loops(g, w, padding, x_shape):
    """dL/dx of the stride-1 conv, by its definition: each output's gradient back to the inputs
    its window saw."""
    dx = np.zeros(x_shape)
    _, _, oh, ow = g.shape
    _, _, h, wd = x_shape
    for y in range(oh):
        for x in range(ow):
            for i in range(3):
                for j in range(3):
                    yy, xx = y + i - padding, x + j - padding
                    if 0 <= yy < h and 0 <= xx < wd:
                        dx[:, :, yy, xx] += g[:, :, y, x] @ w[:, :, i, j]
    return dx


@pytest.mark.parametrize("for_input_grad", [False, True])
def test_filter_transform_is_g_times_filter_times_g_transposed(for_input_grad):
    w = np.random.default_rng(0).standard_normal((5, 3, 3, 3))
    u = winograd.filter_transform(w, for_input_grad=for_input_grad)
    for o in range(5):
        for c in range(3):
            if for_input_grad:          # turned by 180 degrees, channels swapped: U[ab][o, c]
                np.testing.assert_allclose(u[:, o, c], (G @ w[o, c, ::-1, ::-1] @ G.T).ravel(), atol=1e-15)
            else:
                np.testing.assert_allclose(u[:, c, o], (G @ w[o, c] @ G.T).ravel(), atol=1e-15)


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 9), st.integers(1, 9),
       st.integers(0, 2), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**16))
def test_conv3x3_equals_the_naive_loops(n, c, oc, h, w, padding, dtype, seed):
    """Any size, odd or even (a last tile half outside the output), padding 0-2, both dtypes."""
    assume(h + 2 * padding >= 3 and w + 2 * padding >= 3)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((oc, c, 3, 3))
    expected = conv2d_forward(x, weight, np.zeros(oc), 1, padding)
    out = np.full((n,) + expected.shape[2:] + (oc,), np.nan, dtype)
    winograd.conv3x3(_nhwc(x).astype(dtype), winograd.filter_transform(weight.astype(dtype)), padding, out)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected, rtol=tol, atol=tol)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 8), st.integers(1, 8),
       st.integers(0, 2), st.integers(0, 2**16))
def test_the_input_gradient_is_a_conv3x3_with_the_turned_filters(n, c, oc, h, w, padding, seed):
    assume(h + 2 * padding >= 3 and w + 2 * padding >= 3)
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((oc, c, 3, 3))
    g = rng.standard_normal((n, oc, h + 2 * padding - 2, w + 2 * padding - 2))
    dx = np.full((n, h, w, c), np.nan)
    winograd.conv3x3(_nhwc(g), winograd.filter_transform(weight, for_input_grad=True), 2 - padding, dx)
    np.testing.assert_allclose(dx.transpose(0, 3, 1, 2), _input_grad_by_loops(g, weight, padding, (n, c, h, w)),
                               rtol=1e-12, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 8), st.integers(1, 8),
       st.integers(0, 2), st.integers(0, 2**16))
def test_the_weight_gradient_by_winograd_equals_the_sum_over_windows(n, c, oc, h, w, padding, seed):
    """F(3x3, 2x2): dW[o, c, i, j] = sum over images and outputs of x_pad[y + i, x + j] dY[y, x],
    summed chunk by chunk (two chunks here) and transformed once."""
    assume(h + 2 * padding >= 3 and w + 2 * padding >= 3)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c))
    oh, ow = h + 2 * padding - 2, w + 2 * padding - 2
    g = rng.standard_normal((n, oh, ow, oc))
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    expected = np.zeros((3, 3, c, oc))
    for i in range(3):
        for j in range(3):
            for y in range(oh):
                for xx in range(ow):
                    expected[i, j] += xp[:, y + i, xx + j, :].T @ g[:, y, xx, :]
    half = (n + 1) // 2
    sums = winograd.weight_grad_sums(x[:half], g[:half], padding)
    if half < n:
        sums = sums + winograd.weight_grad_sums(x[half:], g[half:], padding)
    got = winograd.weight_grad_columns(sums)
    np.testing.assert_allclose(got, expected.reshape(9 * c, oc), rtol=1e-12, atol=1e-12)


def test_applies_only_to_3x3_stride_1_with_padding_up_to_2():
    assert winograd.applies(3, 1, 1) and winograd.applies(3, 1, 0) and winograd.applies(3, 1, 2)
    assert not winograd.applies(3, 2, 1) and not winograd.applies(5, 1, 2) and not winograd.applies(3, 1, 3)


def test_emotion_classifier_blocks_take_the_winograd_route_except_the_first():
    """conv1 (one input channel) takes the grey route; conv2-4 use Winograd, forward and backward,
    and the network's output and gradients match the plain path. In float64: in float32 the engine's
    other rounding can flip a max-pooling winner among nearly equal values now and then, and a flip
    sends one gradient to another pixel (a difference no tolerance for rounding covers)."""
    import minicnn
    from minicnn.engines import using
    from minicnn.engines.cpu import threads
    from minicnn.models import EmotionClassifier
    from minicnn.engines.cpu.blocks import ConvBatchNormReLUPool
    if not threads.available():
        pytest.skip("the chunked route needs a BLAS whose threads threadpoolctl can limit")
    x = np.random.default_rng(0).standard_normal((16, 1, 48, 48))
    results = {}
    for fast in (False, True):
        minicnn.manual_seed(0)
        model = EmotionClassifier(dropout=0.0).double()
        with using("auto" if fast else "textbook"):
            out = model(x)
            model.backward(np.ones_like(out) / out.size)
            if fast:
                steps = model.features._last_plan
                assert [type(s) for s in steps] == [ConvBatchNormReLUPool] * 4
                assert steps[0].route == "grey"
                assert [s.saved.w_col is None for s in steps[1:]] == [True, True, True]    # Winograd
                sizes = [(16, 1, 48, 48), (16, 32, 24, 24), (16, 64, 12, 12), (16, 128, 6, 6)]
                assert [s._winograd(s.conv.output_shape(size)) for s, size in zip(steps, sizes)] == \
                    [False, True, True, True]
                # at batch 8, conv4's 8 x 9 = 72 tiles are too few to pay for its filters' transforms
                assert not steps[3]._winograd(steps[3].conv.output_shape((8, 128, 6, 6)))
                assert steps[2]._winograd(steps[2].conv.output_shape((8, 64, 12, 12)))
        model.eval()
        with using("auto" if fast else "textbook"), minicnn.no_grad():       # inference: chunks that keep nothing
            logits = model(x)
        results[fast] = [out, logits] + [p.grad for p in model.parameters()]
    scale = max(np.abs(a).max() for a in results[False])    # (a conv bias's gradient is ~0: BatchNorm follows)
    for a, b in zip(results[False], results[True]):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-10 * scale)


def test_the_matrices_compute_a_2x2_correlation():
    """B^T and A^T as arrays (the GPU engine's inference kernels read them) with G: F(2x2, 3x3)."""
    rng = np.random.default_rng(0)
    d, g = rng.normal(size=(4, 4)), rng.normal(size=(3, 3))
    y = winograd.AT @ ((winograd._G @ g @ winograd._G.T) * (winograd.BT @ d @ winograd.BT.T)) @ winograd.AT.T
    np.testing.assert_allclose(y, [[(d[i:i + 3, j:j + 3] * g).sum() for j in range(2)] for i in range(2)],
                               atol=1e-13)
