"""The GPU path's CUDA kernels against the plain path and the naive loops, on a real GPU (when
there is one) and on the CuPy emulator (tests/cupy_emulator.py) everywhere else."""
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, strategies as st

import cupy_emulator
import minicnn
from minicnn import nn
from minicnn.backend import to_device, to_numpy
from minicnn.engines import using
from minicnn.engines.gpu import kernels as gpu_kernels
from minicnn.nn import reference
from minicnn.nn.im2col import col2im, im2col
from minicnn.optim import SGD, Adam, AdamW

conv_shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9),
                        st.integers(1, 4), st.integers(1, 3), st.integers(0, 2)).filter(
    lambda t: t[2] + 2 * t[6] >= t[4] and t[3] + 2 * t[6] >= t[4])


@pytest.mark.parametrize("index", [[], ["-DWIDE_INDEX"]], ids=["int", "long-long"])
@pytest.mark.parametrize("dtype", ["float", "double"])
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA compiler) is not installed")
def test_kernels_compile_for_the_gpu_without_warnings(dtype, index, tmp_path):
    """The source CuPy compiles on a GPU, compiled here by nvcc for an H100/H200 (sm_90)."""
    from minicnn.engines.gpu.kernels import SOURCE
    result = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", f"-Dreal={dtype}", *index, "-x", "cu",
                             "-Werror", "all-warnings", str(SOURCE), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_64_bit_index_kernels_give_the_same_step(gpu, monkeypatch):
    """Past 2**31 elements the kernels do their index arithmetic in 64 bits: the same numbers."""
    from minicnn.engines.gpu import kernels as gpu_module
    from minicnn.models import EmotionClassifier

    def step():
        minicnn.manual_seed(0)
        model = EmotionClassifier().to("gpu")
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        crit = nn.CrossEntropyLoss()
        x = to_device(np.random.default_rng(0).standard_normal((3, 1, 48, 48)).astype(np.float32), "gpu")
        loss = float(crit.forward(model(x), np.array([0, 3, 6])))
        model.backward(crit.backward(), input_grad=False)
        opt.step()
        return loss, model.state_dict()
    narrow = step()
    monkeypatch.setattr(gpu_module, "INT32_LIMIT", 0)
    wide = step()
    assert narrow[0] == wide[0]
    for k, v in narrow[1].items():
        np.testing.assert_array_equal(wide[1][k], v, err_msg=k)


@given(conv_shapes, st.sampled_from([np.float32, np.float64]))
def test_im2col_and_col2im_kernels_match_the_plain_path(gpu, shape, dtype):
    n, c, h, w, k, s, p = shape
    x = np.random.default_rng(0).standard_normal((n, c, h, w)).astype(dtype)
    col = gpu_kernels.im2col(to_device(x, gpu), k, k, s, p)
    np.testing.assert_array_equal(to_numpy(col), im2col(x, k, k, s, p))
    dcol = np.random.default_rng(1).standard_normal(col.shape).astype(dtype)
    dx = gpu_kernels.col2im(to_device(dcol, gpu), x.shape, k, k, s, p)
    np.testing.assert_allclose(to_numpy(dx), col2im(dcol, x.shape, k, k, s, p), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("values_per_slice, max_slices, slices", [(512, 4096, 1), (3, 10**6, 35), (1, 10**6, 105),
                                                                   (1, 8, 8)])
def test_batchnorm_sums_are_the_same_however_many_slices(gpu, values_per_slice, max_slices, slices, monkeypatch):
    """The statistics and the backward's two sums, split over 1 to ~N*H*W/3 partial sums per channel
    (the slice count grows with the batch: a few values per thread is how a GPU fills up)."""
    from minicnn.engines.gpu import kernels as gpu_module
    monkeypatch.setattr(gpu_module, "MIN_SLICES", 1)
    monkeypatch.setattr(gpu_module, "VALUES_PER_SLICE", values_per_slice)
    monkeypatch.setattr(gpu_module, "MAX_SLICES", max_slices)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 2, 5, 7)) * 3 + 10).astype(np.float64)
    g = rng.standard_normal(x.shape)
    cp = minicnn.backend.gpu_module()
    rm, rv, nbt = cp.zeros(2), cp.ones(2), to_device(np.array([1], np.int64), gpu)
    mean, inv_std = gpu_kernels.batchnorm_statistics(to_device(x, gpu), rm, rv, nbt, 0.1, 1e-5)
    np.testing.assert_allclose(to_numpy(mean), x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(inv_std), 1 / np.sqrt(x.var(axis=(0, 2, 3)) + 1e-5), rtol=1e-10)
    xhat = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)
    s1, s2 = gpu_kernels.batchnorm_grad_sums(to_device(g, gpu), to_device(xhat, gpu))
    np.testing.assert_allclose(to_numpy(s1), g.sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(s2), (g * xhat).sum(axis=(0, 2, 3)), rtol=1e-12)
    assert gpu_module._slices(x) == slices


@given(conv_shapes, st.sampled_from([1, 2, 3, 4, 8]), st.sampled_from([np.float32, np.float64]))
def test_channels_last_im2col_and_col2im_kernels_match_the_cpu_kernels(gpu, shape, c, dtype):
    """The conv block's NHWC kernels (4 channels per thread when C allows) against numba's."""
    from minicnn.engines.cpu import kernels as cpu_kernels
    n, _, h, w, k, s, p = shape
    cpu, oh, ow = cpu_kernels, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    x = np.random.default_rng(0).standard_normal((n, h, w, c)).astype(dtype)
    col = gpu_kernels.im2col_nhwc(to_device(x, gpu), k, s, p, oh, ow)
    want = cpu.im2col_nhwc(x, k, s, p, oh, ow, np.empty((n * oh * ow, k * k * c), dtype))
    np.testing.assert_array_equal(to_numpy(col), want)
    dcol = np.random.default_rng(1).standard_normal(want.shape).astype(dtype)
    dx = gpu_kernels.col2im_nhwc(to_device(dcol, gpu), x.shape, k, s, p, oh, ow)
    want = cpu.col2im_nhwc(dcol, k, s, p, oh, ow, np.empty(x.shape, dtype))
    np.testing.assert_allclose(to_numpy(dx), want, rtol=1e-6, atol=1e-6)


@given(st.integers(1, 3), st.integers(1, 5), st.sampled_from([1, 3, 4, 8]), st.integers(2, 9), st.sampled_from([(3, 1, 1),
       (1, 1, 0), (3, 2, 0), (5, 1, 2), (2, 2, 1)]), st.sampled_from([2, 3]), st.booleans(), st.booleans(),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**16))
def test_fused_conv_block_on_the_gpu_equals_the_four_layers_on_the_cpu(gpu, n, c, oc, hw, conv, k, training, bias,
                                                                       dtype, seed):
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d as one channels-last step on the GPU (a ragged
    floor-mode pooling edge, strides, paddings, C a multiple of 4 or not): the same output, input
    gradient, parameter gradients and running statistics as the plain layers one by one on the CPU."""
    from hypothesis import assume
    from minicnn.nn import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Sequential
    from minicnn.engines.gpu.blocks import ConvBatchNormReLUPoolGPU
    ks, stride, pad = conv
    size = (hw + 2 * pad - ks) // stride + 1
    assume(size >= k and not (training and n * size * size < 2))
    x = np.random.default_rng(seed).standard_normal((n, c, hw, hw)).astype(dtype)
    results = {}
    for device in ("cpu", gpu):
        net = Sequential(Conv2d(c, oc, ks, stride=stride, padding=pad, bias=bias, seed=seed), BatchNorm2d(oc),
                         ReLU(), MaxPool2d(k)).to(dtype=dtype)
        if bias:
            net[0].bias.data = np.linspace(-2, 2, oc).astype(dtype)       # large: it must cancel
        net[1].set_buffer("running_mean", np.linspace(-0.5, 0.5, oc).astype(dtype))
        net[1].weight.data = np.linspace(0.5, 1.5, oc).astype(dtype)
        net.train(training).to(device)
        with using("auto" if device != "cpu" else "textbook"):
            out = net(to_device(x, device))
            assert isinstance(net._last_plan[0], ConvBatchNormReLUPoolGPU) == (device != "cpu")
            g = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
            dx = net.backward(to_device(g, device))
        state = net.state_dict()
        results[device] = [out, dx] + [p.grad for p in net.parameters()] + [state[k] for k in sorted(state)]
    tol = 2e-4 if dtype == np.float32 else 1e-10
    for a, b in zip(results["cpu"], results[gpu]):
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=tol, atol=tol)


def test_fused_conv_block_on_the_gpu_in_eval_under_no_grad_keeps_nothing(gpu):
    from minicnn.nn import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Sequential
    net = Sequential(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2)).eval()
    net[1].set_buffer("running_var", np.linspace(0.5, 2, 4).astype(np.float32))
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    want = net(x)
    net.to(gpu)
    with minicnn.no_grad():
        got = net(to_device(x, gpu))
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-5, atol=1e-6)
    assert net._last_plan[0].saved is None
    with pytest.raises(RuntimeError, match="no_grad"):
        net.backward(got)


def test_fused_conv_block_on_the_gpu_refuses_bad_input_before_changing_anything(gpu):
    """Wrong input channels, an input smaller than the pool, one value per channel in training, a
    gradient of the wrong shape, a backward before any forward: clear errors, and the weights, the
    running statistics and the batch count are left as they were."""
    from minicnn.nn import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Sequential
    net = Sequential(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2)).to(gpu)
    before = {k: to_numpy(v).copy() for k, v in net.state_dict().items()}
    fresh = Sequential(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2)).to(gpu)
    fresh(to_device(np.zeros((2, 3, 4, 4), np.float32), gpu))
    fresh._last_plan[0].saved = None                      # (as if the forward had never run)
    cases = [(np.zeros((2, 5, 6, 6)), ValueError, r"expects input of shape \(N, 3, H, W\), got \(2, 5, 6, 6\)"),
             (np.zeros((2, 3, 1, 1)), ValueError, r"smaller than the kernel \(2x2\)"),
             (np.zeros((1, 3, 1, 1)), ValueError, "more than one value per channel")]
    for x, error, message in cases:
        with pytest.raises(error, match=message):
            net(to_device(x.astype(np.float32), gpu))
    out = net(to_device(np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32), gpu))
    after_forward = {k: to_numpy(v).copy() for k, v in net.state_dict().items()}
    assert after_forward["1.num_batches_tracked"] == before["1.num_batches_tracked"] + 1   # (the good one counts)
    with pytest.raises(ValueError, match=r"expects a gradient of the output's shape \(2, 4, 3, 3\), got \(2, 4, 6, 6\)"):
        net.backward(to_device(np.zeros((2, 4, 6, 6), np.float32), gpu))
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(RuntimeError, match="called before forward"):
        fresh.backward(to_device(np.zeros(out.shape, np.float32), gpu))
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(to_numpy(v), after_forward[k], err_msg=k)
    for k, v in before.items():                            # the parameters: nothing stepped them
        if "running" not in k and "num_batches" not in k:
            np.testing.assert_array_equal(after_forward[k], v, err_msg=k)


@pytest.mark.parametrize("row_values, min_threads", [(1, 1), (2, 1), (10**6, 1), (1, 10**6)])
def test_channels_last_batchnorm_sums_are_the_same_however_many_slices(gpu, row_values, min_threads, monkeypatch):
    """The conv block's statistics and backward sums, split over 1 to N*H*W slices per channel."""
    from minicnn.engines.gpu import kernels as gpu_module
    monkeypatch.setattr(gpu_module, "ROW_VALUES", row_values)
    monkeypatch.setattr(gpu_module, "MIN_THREADS", min_threads)
    rng = np.random.default_rng(0)
    y = (rng.standard_normal((3, 4, 6, 2)) * 3 + 10).astype(np.float64)          # (N, H, W, C)
    g = rng.standard_normal((3, 2, 3, 2))
    cp = minicnn.backend.gpu_module()
    rm, rv, nbt = cp.zeros(2), cp.ones(2), to_device(np.array(1, np.int64), gpu)
    gamma, beta = to_device(np.array([1.5, 0.5]), gpu), to_device(np.array([0.1, -0.2]), gpu)
    mean, inv_std, scale, shift = gpu_kernels.batchnorm_affine(to_device(y, gpu), None, gamma, beta, rm, rv, nbt,
                                                                 0.1, 1e-5, True)
    np.testing.assert_allclose(to_numpy(mean), y.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(inv_std), 1 / np.sqrt(y.var(axis=(0, 1, 2)) + 1e-5), rtol=1e-10)
    np.testing.assert_allclose(to_numpy(rv), 0.9 + 0.1 * y.var(axis=(0, 1, 2), ddof=1), rtol=1e-12)
    out, arg = gpu_kernels.bn_relu_pool_forward(to_device(y, gpu), scale, shift, 2)
    sums = to_numpy(gpu_kernels.bn_relu_pool_grad_sums(to_device(g, gpu), arg, to_device(y, gpu), scale, shift,
                                                         mean, 2))
    bn = (y - y.mean(axis=(0, 1, 2))) * to_numpy(inv_std) * [1.5, 0.5] + [0.1, -0.2]
    windows = bn.reshape(3, 2, 2, 3, 2, 2)   # (n, py, i, px, j, c) -> (n, py, px, c, window)
    windows = windows.transpose(0, 1, 3, 5, 2, 4).reshape(3, 2, 3, 2, 4)
    win = np.maximum(windows, 0).argmax(axis=-1)                 # (the first maximum after the ReLU)
    np.testing.assert_array_equal(to_numpy(arg), win // 2 * 2 + win % 2)
    g_bn = np.zeros_like(windows)
    np.put_along_axis(g_bn, win[..., None], g[..., None], axis=-1)
    g_bn *= windows > 0
    yw = y.reshape(3, 2, 2, 3, 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(3, 2, 3, 2, 4)
    np.testing.assert_allclose(sums[0], g_bn.sum(axis=(0, 1, 2, 4)), rtol=1e-12)
    want = (g_bn * (yw - y.mean(axis=(0, 1, 2))[:, None])).sum(axis=(0, 1, 2, 4))
    np.testing.assert_allclose(sums[1], want, rtol=1e-12)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4),
       st.integers(1, 3), st.booleans())
def test_maxpool_kernels_match_the_naive_loops(gpu, n, c, h, w, k, s, ties):
    if h < k or w < k:
        return
    rng = np.random.default_rng(h * 100 + w)
    x = rng.integers(0, 3, (n, c, h, w)).astype(np.float64) if ties else rng.standard_normal((n, c, h, w))
    out, arg = gpu_kernels.maxpool_forward(to_device(x, gpu), k, s)
    want = reference.maxpool2d_forward(x, k, s)
    np.testing.assert_array_equal(to_numpy(out), want[0] if isinstance(want, tuple) else want)
    dout = rng.standard_normal(out.shape)
    layer = nn.MaxPool2d(k, s)
    with using("textbook"):
        layer(x)
        want_dx = layer.backward(dout)                  # the plain path: first maximum wins ties
    dx = gpu_kernels.maxpool_backward(to_device(dout, gpu), arg, x.shape, k, s)
    np.testing.assert_allclose(to_numpy(dx), want_dx, rtol=0, atol=1e-12)


def _seed(value):
    return gpu_kernels.DeviceValues(np.uint64).set([value])


def test_dropout_kernel_mask_is_a_function_of_the_seed(gpu):
    x = to_device(np.ones((64, 512), np.float32), gpu)
    a = to_numpy(gpu_kernels.dropout(x, 0.3, _seed(12345)))
    b = to_numpy(gpu_kernels.dropout(x, 0.3, _seed(12345)))
    c = to_numpy(gpu_kernels.dropout(x, 0.3, _seed(12346)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert set(np.unique(a)) == {0.0, np.float32(1 / 0.7)}
    assert abs((a == 0).mean() - 0.3) < 0.01                    # 32768 draws: sd 0.0025
    assert (to_numpy(gpu_kernels.dropout(x, 0.0, _seed(1))) == 1).all()
    assert (to_numpy(gpu_kernels.dropout(x, 1.0, _seed(1))) == 0).all()


def test_dropout_layer_backward_reuses_the_forward_mask_and_follows_the_seed(gpu):
    def run():
        layer = nn.Dropout(0.5, seed=7).to(gpu)
        x = to_device(np.random.default_rng(0).standard_normal((8, 100)).astype(np.float32), gpu)
        out = to_numpy(layer(x))
        dx = to_numpy(layer.backward(to_device(np.ones((8, 100), np.float32), gpu)))
        return out, dx, to_numpy(layer.last_mask())
    out, dx, mask = run()
    np.testing.assert_array_equal(dx, mask)
    np.testing.assert_array_equal(run()[0], out)               # same seed, same masks


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: SGD(ps, lr=0.05, momentum=0.5, dampening=0.3),
    lambda ps: Adam(ps, lr=1e-2, weight_decay=1e-3),
    lambda ps: AdamW(ps, lr=1e-2)], ids=["sgd-wd", "nesterov", "dampening", "adam", "adamw"])
def test_optimizer_kernels_match_the_cpu(gpu, make):
    def run(device):
        layer = nn.Linear(7, 5, seed=0).to(device=device, dtype=np.float64)
        opt = make(layer.parameters())
        rng = np.random.default_rng(0)
        for _ in range(4):
            for p in layer.parameters():
                p.grad = to_device(rng.standard_normal(p.shape), device)
            opt.step()
        return [to_numpy(p.data) for p in layer.parameters()]
    for got, want in zip(run(gpu), run("cpu")):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_cross_entropy_kernel_with_weights_and_smoothing_matches_the_cpu(gpu):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((9, 7)) * 4
    labels = rng.integers(0, 7, 9)
    for kw in ({}, {"label_smoothing": 0.1}, {"weight": rng.uniform(0.5, 2, 7)},
               {"weight": rng.uniform(0.5, 2, 7), "label_smoothing": 0.2, "reduction": "sum"}):
        cpu, dev = nn.CrossEntropyLoss(**kw), nn.CrossEntropyLoss(**kw)
        want = cpu(logits, labels)
        got = dev.forward(to_device(logits, gpu), labels)
        assert type(got).__module__.startswith("cupy")            # stays on the device
        np.testing.assert_allclose(float(got), want, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(dev.backward(2.0)), cpu.backward(2.0), rtol=1e-10, atol=1e-14)


def _what_cublas_reads(x, op, ld, stride, rows, cols, batch):
    """op(X) (batch, rows, cols) as cuBLAS reads it at x's address: column-major, leading dimension
    ``ld``, matrices ``stride`` apart (all in elements); first checked to lie inside x's memory."""
    from numpy.lib.stride_tricks import as_strided
    stored = (rows, cols) if op == 0 else (cols, rows)
    base = x if x.base is None else x.base
    start = x.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    last = start + ((batch - 1) * stride + (stored[0] - 1) + (stored[1] - 1) * ld) * x.itemsize
    assert stored[0] <= ld and 0 <= start and last < base.nbytes, "cuBLAS would read outside the operand"
    m = as_strided(x, shape=(batch,) + stored, strides=(stride * x.itemsize, x.itemsize, ld * x.itemsize))
    return m if op == 0 else m.transpose(0, 2, 1)


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5),
       st.sampled_from(["c", "t", "sliced"]), st.sampled_from(["c", "t", "sliced"]))
def test_the_direct_cublas_call_reads_the_operands_as_they_are(batch, m, k, n, a_layout, b_layout):
    """minicnn.engines.gpu.cublas.plan, replayed by NumPy as cuBLAS would read memory (column-major):
    the product it describes is a @ b, for C-ordered operands, transposed views and sliced rows."""
    from minicnn.engines.gpu import cublas
    rng = np.random.default_rng(batch * 1000 + m * 100 + k * 10 + n)

    def operand(rows, cols, layout):
        if layout == "t":
            return rng.standard_normal((batch, cols, rows)).transpose(0, 2, 1)
        if layout == "sliced":
            return rng.standard_normal((batch, rows + 2, cols * 2))[:, 1:rows + 1, ::2]
        return rng.standard_normal((batch, rows, cols))
    a, b = operand(m, k, a_layout), operand(k, n, b_layout)
    first, op1, ld1, stride1, second, op2, ld2, stride2, cm, cn, ck = cublas.plan(a, b)
    assert (cm, cn, ck) == (n, m, k)
    c_t = (_what_cublas_reads(first, op1, ld1, stride1, cm, ck, batch)
           @ _what_cublas_reads(second, op2, ld2, stride2, ck, cn, batch))      # C^T, column-major
    np.testing.assert_allclose(c_t.transpose(0, 2, 1), a @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not minicnn.backend.gpu_available(), reason="CuPy with an NVIDIA GPU is not available")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_cublas_products_equal_cupys_in_every_layout_and_in_a_capture(dtype):
    """minicnn.engines.gpu.cublas.gemm (cuBLAS through ctypes, for CUDA-graph captures) against CuPy's
    ``@``: C-ordered operands, transposed views, sliced rows, batches, an empty inner dimension."""
    from minicnn.engines.gpu import cublas
    cp = minicnn.backend.gpu_module()
    rng = np.random.default_rng(0)

    def r(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(dtype))
    big = r(9, 12)
    cases = [(r(5, 3), r(3, 4)), (r(3, 5).T, r(3, 4)), (r(5, 3), r(4, 3).T), (r(3, 5).T, r(4, 3).T),
             (big[::2, 1:4], big[1:4, ::3]), (r(1, 7), r(7, 1)), (r(6, 0), r(0, 2)),
             (r(4, 5, 3), r(4, 3, 2)), (r(4, 3, 5).transpose(0, 2, 1), r(4, 3, 2)), (r(2, 70, 9), r(2, 9, 33))]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in cases:
        got = cublas.gemm(a, b)
        assert got.shape == (a @ b).shape and got.flags.c_contiguous
        np.testing.assert_allclose(cp.asnumpy(got), cp.asnumpy(a @ b), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="cannot multiply"):
        cublas.gemm(r(2, 3), r(2, 3))
    assert cublas.available()
    a, b = r(64, 48), r(48, 32)
    pool, stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        c = cublas.gemm(a, b)
        graph = stream.end_capture()
        a[...] = 2 * a                              # the replay reads a as it is then
        graph.launch()
        stream.synchronize()
    np.testing.assert_allclose(cp.asnumpy(c), cp.asnumpy(a @ b), rtol=tol, atol=tol)


def test_column_sums_are_split_into_groups_of_whole_images():
    """A GPU column sum over N*OH*OW rows: about 256 blocks of 64 columns in all, at most 128 groups,
    always whole images."""
    from minicnn.engines.gpu.layers import image_groups
    assert image_groups(1024, 32) == 128 and image_groups(1024, 256) == 64 and image_groups(12, 32) == 12
    for n in range(1, 60):
        for q in (1, 32, 300, 5000):
            g = image_groups(n, q)
            assert n % g == 0 and 1 <= g <= min(n, 128)


def test_kernels_cut_the_launches_of_a_training_step():
    """Counted on the emulator: array operations plus kernel launches, the GPU's fixed cost."""
    from minicnn.models import EmotionClassifier
    import minicnn.backend as backend
    old, backend._cupy = backend._cupy, cupy_emulator
    try:
        counts = {}
        for fast in (False, True):
            with using("auto" if fast else "textbook"):
                model = EmotionClassifier().to("gpu")
                opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
                crit = nn.CrossEntropyLoss()
                x = to_device(np.random.default_rng(0).standard_normal((4, 1, 48, 48)).astype(np.float32), "gpu")
                y = np.arange(4) % 7
                for step in range(2):
                    start = cupy_emulator.launches
                    crit.forward(model(x), y)
                    model.backward(crit.backward(), input_grad=False)
                    opt.step()
                    opt.zero_grad()
                counts[fast] = cupy_emulator.launches - start
        print(f"launches per training step: plain {counts[False]}, kernels {counts[True]}")
        assert counts[True] < 0.3 * counts[False]
    finally:
        backend._cupy = old


def test_cpu_work_never_imports_cupy_or_the_gpu_kernels():
    """CuPy is imported only when the GPU is asked for: a CPU training step leaves it alone."""
    import sys
    code = ("import sys, numpy as np, minicnn\n"
            "from minicnn.models import EmotionClassifier\n"
            "m = EmotionClassifier(); c = minicnn.nn.CrossEntropyLoss()\n"
            "c.forward(m(np.zeros((2, 1, 48, 48), np.float32)), [0, 1]); m.backward(c.backward())\n"
            "print(sorted(k for k in sys.modules if k.startswith('cupy') or k == 'minicnn.engines.gpu.kernels'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_training_on_the_gpu_learns_and_resumes_exactly(gpu, tmp_path):
    """The Trainer on the GPU: data batches on the device, losses read 20 steps at a time, and a run
    stopped mid-epoch and resumed ends with the weights of the run never stopped."""
    import json
    import os
    from test_training import tiny_data, tiny_recipe, weights
    from minicnn.training import Trainer
    quiet = dict(progress=False, log=lambda m: None, device=gpu)
    learner = Trainer(tiny_data(), tiny_recipe(epochs=5), out_dir=str(tmp_path / "learn"), **quiet)
    history = learner.fit()
    assert learner.model.device == "gpu"
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1

    straight = Trainer(tiny_data(), tiny_recipe(epochs=2), out_dir=str(tmp_path / "a"), **quiet)
    history = straight.fit()

    out = str(tmp_path / "b")
    first = Trainer(tiny_data(), tiny_recipe(epochs=2), out_dir=out, **quiet)
    step, calls = first.optimizer.step, []

    def step_then_stop():
        step()
        calls.append(1)
        if len(calls) == 8:
            first.request_stop()
    first.optimizer.step = step_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert json.load(open(os.path.join(out, "last.json")))["batch"] == 2
    resumed = Trainer(tiny_data(), tiny_recipe(epochs=2), out_dir=out, **quiet)
    resumed.fit(resume=True)
    for k, v in weights(straight).items():
        np.testing.assert_array_equal(weights(resumed)[k], v, err_msg=k)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in history]
