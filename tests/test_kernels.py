"""The vectorised kernels against the naive-loop references (the oracle)."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from minicnn.nn.im2col import col2im, im2col
from minicnn.nn import reference as ref
from minicnn.nn import Conv2d, MaxPool2d

from conftest import distinct_values


@st.composite
def conv_case(draw):
    k = draw(st.integers(1, 4))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, 2))
    h = draw(st.integers(max(1, k - 2 * p), 9))
    w = draw(st.integers(max(1, k - 2 * p), 9))
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 3)), oc=draw(st.integers(1, 4)),
                h=h, w=w, k=k, s=s, p=p, seed=draw(st.integers(0, 2**16)))


@given(conv_case())
def test_col2im_is_the_adjoint_of_im2col(case):
    """<im2col(x), c> == <x, col2im(c)> for all x, c: col2im is exactly im2col's transpose."""
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    col = im2col(x, case["k"], case["k"], case["s"], case["p"])
    c = rng.standard_normal(col.shape)
    back = col2im(c, x.shape, case["k"], case["k"], case["s"], case["p"])
    assert back.shape == x.shape
    np.testing.assert_allclose((col * c).sum(), (x * back).sum(), rtol=1e-12)


@given(conv_case(), st.integers(1, 6), st.booleans())
def test_channels_last_im2col_equals_the_plain_one(case, c, serial):
    """The fast path's im2col (rows (n, y, x), columns (i, j, c)), for 1-3 channels (its column-by-
    column loop) and more: every entry, padding zeros included, is the plain im2col's."""
    from minicnn.engines.cpu import kernels as cpu_kernels
    cpu = cpu_kernels
    k, s, p = case["k"], case["s"], case["p"]
    x = np.random.default_rng(case["seed"]).standard_normal((case["n"], c, case["h"], case["w"]))
    plain = im2col(x, k, k, s, p)                                    # columns (c, i, j)
    oh, ow = (case["h"] + 2 * p - k) // s + 1, (case["w"] + 2 * p - k) // s + 1
    expected = plain.reshape(-1, c, k, k).transpose(0, 2, 3, 1).reshape(plain.shape)
    col = np.full(plain.shape, np.nan)
    kernel = cpu.im2col_nhwc_serial if serial else cpu.im2col_nhwc
    kernel(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), k, s, p, oh, ow, col)
    np.testing.assert_array_equal(col, expected)


@given(conv_case(), st.sampled_from([np.float32, np.float64]))
def test_conv2d_matches_naive_loops(case, dtype):
    rng = np.random.default_rng(case["seed"])
    conv = Conv2d(case["c"], case["oc"], case["k"], case["s"], case["p"], seed=case["seed"]).to(dtype=dtype)
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(dtype)
    out = conv(x)
    w, b = conv.weight.data, conv.bias.data
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref.conv2d_forward(x, w, b, case["s"], case["p"]), rtol=tol, atol=tol)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = conv.backward(dout)
    rdx, rdw, rdb = ref.conv2d_backward(dout, x, w, case["s"], case["p"])
    np.testing.assert_allclose(dx, rdx, rtol=tol, atol=tol)
    np.testing.assert_allclose(conv.weight.grad, rdw, rtol=tol, atol=tol)
    np.testing.assert_allclose(conv.bias.grad, rdb, rtol=tol, atol=tol)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3),
       st.integers(2, 11), st.integers(2, 11), st.integers(0, 2**16), st.booleans())
def test_maxpool_matches_naive_loops(n, c, k, s, h, w, seed, with_ties):
    rng = np.random.default_rng(seed)
    k = min(k, h, w)
    if with_ties:   # few distinct values: many ties, gradient must go to the first maximum only
        x = rng.integers(0, 3, size=(n, c, h, w)).astype(np.float64)
    else:
        x = distinct_values(rng, (n, c, h, w))
    pool = MaxPool2d(k, s)
    out = pool(x)
    np.testing.assert_array_equal(out, ref.maxpool2d_forward(x, k, s))
    dout = rng.standard_normal(out.shape)
    dx = pool.backward(dout)
    np.testing.assert_allclose(dx, ref.maxpool2d_backward(dout, x, k, s), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx.sum(), dout.sum(), rtol=1e-10, atol=1e-10)   # gradient conserved


def test_maxpool_floor_mode_drops_the_ragged_edge():
    x = np.arange(5 * 5, dtype=np.float64).reshape(1, 1, 5, 5)
    out = MaxPool2d(2)(x)
    assert out.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(out[0, 0], [[6, 8], [16, 18]])


@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 9), st.integers(2, 9), st.sampled_from([2, 3]),
       st.booleans(), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**16))
def test_fused_batchnorm_relu_pool_equals_the_three_layers(n, c, h, w, k, training, dtype, seed):
    """Sequential fuses BatchNorm2d -> ReLU -> MaxPool2d on the fast path; results equal the plain layers'."""
    from minicnn.engines import using
    from minicnn.nn import BatchNorm2d, ReLU, Sequential
    from minicnn.engines.cpu.blocks import BatchNormReLUPool
    assume(h >= k and w >= k and not (training and n * h * w < 2))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)        # odd sizes: a ragged floor-mode edge
    results = {}
    for fast in (False, True):
        net = Sequential(BatchNorm2d(c), ReLU(), MaxPool2d(k)).to(dtype=dtype).train(training)
        net[0].weight.data = np.linspace(0.5, 1.5, c).astype(dtype)
        net[0].bias.data = np.linspace(-0.3, 0.3, c).astype(dtype)
        with using("auto" if fast else "textbook"):
            out = net(x)
            g = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
            dx = net.backward(g)
            if fast:
                assert isinstance(net._last_plan[0], BatchNormReLUPool)
        results[fast] = (out, dx, net[0].weight.grad, net[0].bias.grad, net[0].running_mean, net[0].running_var)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(results[False], results[True]):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


@given(st.integers(1, 5), st.integers(1, 3), st.integers(1, 4), st.integers(3, 9), st.sampled_from([2, 3]),
       st.booleans(), st.booleans(), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**16),
       st.sampled_from(["chunks", "chunks-im2col", "whole"]))
def test_fused_conv_block_equals_the_four_layers(n, c, oc, hw, k, training, bias, dtype, seed, route):
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d fused (the conv bias folded into the BatchNorm),
    run in chunks of one image on threads (the conv by Winograd, or by im2col) or as a whole with
    parallel kernels: same output, input gradient, parameter gradients and running statistics as
    the layers one by one."""
    from minicnn.engines.cpu import threads
    from minicnn.engines.cpu.blocks import ConvBatchNormReLUPool
    assume(hw >= k and not (training and n * hw * hw < 2))
    assume(route == "whole" or threads.available())
    chunks = route.startswith("chunks")
    knobs = dict(GREY=False, THREADED_GEMM_K=(0, 10**9) if chunks else (1, 0), CHUNK_BYTES=1, CHUNK_ROWS=1,
                 WINOGRAD=route == "chunks", WINOGRAD_MIN_CHANNELS=1, WINOGRAD_DW_MIN_CHANNELS=1, WINOGRAD_MIN_TILES=1)
    saved = {name: getattr(ConvBatchNormReLUPool, name) for name in knobs}
    for name, value in knobs.items():
        setattr(ConvBatchNormReLUPool, name, value)
    try:
        _check_fused_conv_block(n, c, oc, hw, k, training, bias, dtype, seed, route)
    finally:
        for name, value in saved.items():
            setattr(ConvBatchNormReLUPool, name, value)


def _check_fused_conv_block(n, c, oc, hw, k, training, bias, dtype, seed, route):
    from minicnn.engines import using
    from minicnn.nn import BatchNorm2d, ReLU, Sequential
    from minicnn.engines.cpu.blocks import ConvBatchNormReLUPool
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, hw, hw)).astype(dtype)
    results = {}
    for fused in (False, True):
        net = Sequential(Conv2d(c, oc, 3, padding=1, bias=bias, seed=seed), BatchNorm2d(oc), ReLU(),
                         MaxPool2d(k)).to(dtype=dtype)
        if bias:
            net[0].bias.data = np.linspace(-2, 2, oc).astype(dtype)       # large: it must cancel
        net[1].set_buffer("running_mean", np.linspace(-0.5, 0.5, oc).astype(dtype))
        net[1].weight.data = np.linspace(0.5, 1.5, oc).astype(dtype)
        net.train(training)
        with using("auto"):
            if fused:
                out = net(x)
                step = net._last_plan[0]
                assert isinstance(step, ConvBatchNormReLUPool)
                assert (step.saved is not None) == route.startswith("chunks")
                assert step._winograd(step.conv.output_shape(x.shape)) == (route == "chunks")
            else:                      # each layer on its own (the fast path, but never fused)
                out = x
                for layer in net:
                    out = layer(out)
            g = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
            if fused:
                dx = net.backward(g)
            else:
                dx = g
                for layer in reversed(list(net)):
                    dx = layer.backward(dx)
        grads = [p.grad for p in net.parameters()]
        results[fused] = [out, dx, net[1].running_mean, net[1].running_var] + grads
    tol = 2e-4 if dtype == np.float32 else 1e-10
    for a, b in zip(results[False], results[True]):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


@given(n=st.integers(1, 4), oc=st.integers(1, 5), h=st.integers(1, 11), w=st.integers(1, 11), k=st.integers(1, 5),
       s=st.integers(1, 2), p=st.integers(0, 2), pool=st.integers(1, 3), training=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), input_grad=st.booleans(), offset=st.sampled_from([0.0, 3.0]),
       seed=st.integers(0, 2**16))
def test_grey_conv_block_equals_the_four_layers(n, oc, h, w, k, s, p, pool, training, bias, dtype, input_grad,
                                                offset, seed):
    """A conv block on one input channel by the grey route (no conv output stored; the statistics and
    dL/dW's dense part from the taps' sums and Gram matrix: grey_block.py): the same output, running
    statistics, input and parameter gradients as the four textbook layers, for any kernel, stride,
    padding, pooling, ragged edges and inputs far from zero mean (``offset``)."""
    from minicnn.engines import using
    from minicnn.engines.cpu import threads
    from minicnn.nn import BatchNorm2d, ReLU, Sequential
    from minicnn.engines.cpu.blocks import ConvBatchNormReLUPool
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    assume(threads.available() and min(oh, ow) >= pool and not (training and n * oh * ow < 2))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 1, h, w)) + offset).astype(dtype)
    results = {}
    for engine in ("textbook", "auto"):
        net = Sequential(Conv2d(1, oc, k, stride=s, padding=p, bias=bias, seed=seed), BatchNorm2d(oc), ReLU(),
                         MaxPool2d(pool)).to(dtype=dtype)
        if bias:
            net[0].bias.data = np.linspace(-2, 2, oc).astype(dtype)       # large: it must cancel
        net[1].set_buffer("running_mean", np.linspace(-0.5, 0.5, oc).astype(dtype))
        net[1].weight.data = np.linspace(-1.5, 1.5, oc).astype(dtype)   # negative scales too
        net.train(training)
        with using(engine):
            out = net(x)
            g = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
            if engine == "auto":
                assert net._last_plan[0].route == "grey"
                dx = net.backward(g, input_grad=input_grad)
            else:                  # layer by layer, to see dL/dy (the conv's output gradient)
                dy = net[1].backward(net[2].backward(net[3].backward(g)))
                dx = net[0].backward(dy) if input_grad else net[0].backward_params(dy)
        results[engine] = dict(out=out, running_mean=net[1].running_mean, running_var=net[1].running_var, dx=dx,
                               **{name: q.grad for name, q in net.named_parameters()})
    tol = 3e-4 if dtype == np.float32 else 1e-9
    want, got = results["textbook"], results["auto"]
    for name, a in want.items():
        if a is None:
            assert got[name] is None
            continue
        # (in training the conv bias's gradient sum(dL/dy) is 0 up to the rounding of that sum)
        scale = max(1.0, float(np.abs(dy).sum() if name == "0.bias" and training else np.abs(a).max()))
        np.testing.assert_allclose(got[name], a, rtol=tol, atol=tol * scale, err_msg=name)


@pytest.mark.parametrize("hw", [12, 18])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_by_winograd_6x6_equals_the_four_layers(hw, training, dtype):
    """A block whose output and input gradient divide into 6x6 tiles (12 and more wide) takes
    F(6x6, 3x3) for dL/dx and F(3x3, 6x6) for dL/dW: the same gradients as the four textbook layers
    (float64 to 1e-10, float32 to 1e-4), and the forward still by F(2x2, 3x3)."""
    from minicnn.engines import using
    from minicnn.engines.cpu import threads
    from minicnn.nn import BatchNorm2d, ReLU, Sequential
    if not threads.available():
        pytest.skip("the chunked route needs a BLAS whose threads threadpoolctl can limit")
    x = np.random.default_rng(hw).standard_normal((5, 16, hw, hw)).astype(dtype)
    results = {}
    for engine in ("textbook", "auto"):
        net = Sequential(Conv2d(16, 8, 3, padding=1, seed=1), BatchNorm2d(8), ReLU(), MaxPool2d(2)).to(dtype=dtype)
        net[1].set_buffer("running_mean", np.linspace(-0.5, 0.5, 8).astype(dtype))
        net.train(training)
        with using(engine):
            out = net(x)
            if engine == "auto":
                step = net._last_plan[0]
                step.WINOGRAD_MIN_TILES = 1
                out = net(x)
                assert step.route == "threaded" and step.saved.w_col is None            # Winograd forward
                assert step._f6_input_grad(hw, hw, 1) and not step._f6_input_grad(6, 6, 1)
                assert step._f6_weight_grad(hw, hw, 1) and not step._f6_weight_grad(6, 6, 1)
            dx = net.backward(np.random.default_rng(0).standard_normal(out.shape).astype(dtype))
        results[engine] = [out, dx, net[0].weight.grad, net[1].weight.grad, net[1].bias.grad]
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for a, b in zip(results["textbook"], results["auto"]):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol * float(np.abs(a).max()))


def test_the_emotion_classifiers_first_block_takes_the_grey_route():
    import minicnn
    from minicnn.engines.cpu import threads
    from minicnn.models import EmotionClassifier
    if not threads.available():
        pytest.skip("the grey route needs a BLAS whose threads threadpoolctl can limit")
    model = EmotionClassifier()
    x = np.random.default_rng(0).standard_normal((3, 1, 48, 48)).astype(np.float32)
    model(x)
    first = model.features._last_plan[0]
    assert first.route == "grey" and first.saved.ywin.shape == (3, 24, 24, 32)
    model.eval()
    with minicnn.no_grad():
        model(x)
    assert first.route == "inference" and first.saved is None


def test_every_numba_kernel_has_a_python_function_of_its_own():
    """numba's on-disk cache keys on the Python function: two jit variants of one function
    (say parallel and serial) would share one cache entry and run the same compiled code."""
    from numba.core.registry import CPUDispatcher
    from minicnn.engines.cpu import kernels as cpu_kernels
    cpu = cpu_kernels
    kernels = [v for v in vars(cpu).values() if isinstance(v, CPUDispatcher)]
    assert len(kernels) > 10
    keys = [(k.py_func.__qualname__, k.py_func.__code__.co_firstlineno) for k in kernels]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("with_conv", [False, True])
@pytest.mark.parametrize("gemm_k, winograd", [((0, 10**9), False), ((0, 10**9), True), ((1, 0), False)],
                         ids=["chunks", "chunks-winograd", "whole"])
def test_fused_steps_reject_a_wrong_gradient_shape_and_change_nothing(with_conv, gemm_k, winograd, monkeypatch):
    from minicnn.engines import using
    from minicnn.nn import BatchNorm2d, ReLU, Sequential
    from minicnn.engines.cpu.blocks import ConvBatchNormReLUPool
    monkeypatch.setattr(ConvBatchNormReLUPool, "THREADED_GEMM_K", gemm_k)
    for knob in ("WINOGRAD_MIN_CHANNELS", "WINOGRAD_DW_MIN_CHANNELS", "WINOGRAD_MIN_TILES"):
        monkeypatch.setattr(ConvBatchNormReLUPool, knob, 1 if winograd else 10**9)
    layers = ([Conv2d(2, 3, 3, padding=1, seed=0)] if with_conv else []) + [BatchNorm2d(3), ReLU(), MaxPool2d(2)]
    net = Sequential(*layers).double()
    x = np.random.default_rng(0).standard_normal((2, 2 if with_conv else 3, 6, 6))
    with using("auto"):
        out = net(x)
        assert out.shape == (2, 3, 3, 3)
        if with_conv and gemm_k[1]:                                      # chunked: Winograd or not, as set
            assert (net._last_plan[0].saved.w_col is None) == winograd     # (no weight columns: Winograd)
        with pytest.raises(ValueError, match=r"MaxPool2d.backward expects .*\(2, 3, 3, 3\), got \(2, 3, 3, 4\)"):
            net.backward(np.ones((2, 3, 3, 4)))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("x, message", [
    (np.zeros((2, 5, 6, 6), np.float32), r"Conv2d expects input of shape \(N, 2, H, W\), got \(2, 5, 6, 6\)"),
    (np.zeros((2, 2, 6, 6), np.float64), r"float32 parameters but got a float64 input"),
    (np.zeros((2, 2, 1, 1), np.float32), r"MaxPool2d input of spatial size \(1, 1\) is smaller than the kernel"),
])
def test_a_fused_conv_block_gives_its_layers_errors(x, message, inference):
    import minicnn
    from minicnn.nn import BatchNorm2d, ReLU, Sequential
    net = Sequential(Conv2d(2, 3, 3, padding=1, seed=0), BatchNorm2d(3), ReLU(), MaxPool2d(2)).train(not inference)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        if inference:
            with minicnn.no_grad():
                net(x)
        else:
            net(x)
    for k, v in net.state_dict().items():           # nothing changed: not even the running statistics
        np.testing.assert_array_equal(v, before[k])


@given(n=st.integers(1, 3), oc=st.integers(1, 9), h=st.integers(3, 11), w=st.integers(3, 11),
       padding=st.integers(0, 2), pool=st.integers(1, 3), serial=st.booleans(), seed=st.integers(0, 99))
def test_grey_direct_conv_pool_equals_conv_then_pool(n, oc, h, w, padding, pool, serial, seed):
    """The inference session's first block on one grey channel: the direct kernel against the naive
    conv, max pooling, bias and ReLU (odd sizes, ragged pooling edges, every padding)."""
    from minicnn.engines.cpu import kernels
    rng = np.random.default_rng(seed)
    x, weight, bias = rng.normal(size=(n, 1, h, w)), rng.normal(size=(oc, 1, 3, 3)), rng.normal(size=oc)
    y = ref.conv2d_forward(x, weight, np.zeros(oc), 1, padding)
    assume(y.shape[2] >= pool and y.shape[3] >= pool)
    expected = np.maximum(ref.maxpool2d_forward(y, pool, pool) + bias[:, None, None], 0)
    xp = np.pad(x[:, 0], ((0, 0), (padding, padding), (padding, padding)))
    out = np.empty((n, y.shape[2] // pool, y.shape[3] // pool, oc))
    kernel = kernels.grey_conv3x3_pool_bias_relu_serial if serial else kernels.grey_conv3x3_pool_bias_relu
    kernel(xp, np.ascontiguousarray(weight.reshape(oc, 9).T), bias, pool, out)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected, rtol=1e-12, atol=1e-12)


def test_grey_direct_conv_pool_lets_nan_win_as_pytorch_does():
    from minicnn.engines.cpu import kernels
    x = np.ones((1, 6, 6))
    x[0, 0, 3] = np.nan                       # in conv outputs (0, 1..3): after a finite (0, 0) in window (0, 0)
    out = np.empty((1, 2, 2, 2))
    kernels.grey_conv3x3_pool_bias_relu_serial(x, np.ones((9, 2)), np.array([-100.0, 0.0]), 2, out)
    assert np.isnan(out[0, 0]).all() and not np.isnan(out[0, 1]).any()
    assert (out[0, 1] == [0, 9]).all()        # -100 + 9 rectified to 0; 0 + 9
