"""no_grad() and the fast path's inference pipeline (eval-mode conv blocks split across threads)."""
import threading

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import minicnn
from minicnn.engines import using
from minicnn.engines.cpu import threads
from minicnn.nn import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Sequential
from minicnn.engines.cpu.blocks import ConvBatchNormReLUPool

needs_pipeline = pytest.mark.skipif(not threads.available(),
                                    reason="threadpoolctl finds no BLAS it can limit in this process")


def block(c, oc, k, s, p, pool, bias, dtype, seed):
    net = Sequential(Conv2d(c, oc, k, s, p, bias=bias, seed=seed), BatchNorm2d(oc), ReLU(), MaxPool2d(pool))
    net = net.to(dtype=dtype).eval()
    rng = np.random.default_rng(seed)
    net[1].set_buffer("running_mean", rng.standard_normal(oc).astype(dtype))
    net[1].set_buffer("running_var", rng.uniform(0.5, 2.0, oc).astype(dtype))
    net[1].weight.data = rng.uniform(0.5, 1.5, oc).astype(dtype)
    if bias:
        net[0].bias.data = rng.standard_normal(oc).astype(dtype)
    return net


@needs_pipeline
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 5), st.integers(1, 6), st.integers(1, 3), st.integers(1, 2),
       st.integers(0, 1), st.integers(5, 11), st.sampled_from([2, 3]), st.booleans(),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**16))
def test_pipeline_equals_the_eval_forward(n, c, oc, k, s, p, hw, pool, bias, dtype, seed):
    assume((hw + 2 * p - k) // s + 1 >= pool)
    net = block(c, oc, k, s, p, pool, bias, dtype, seed)
    x = np.random.default_rng(seed + 1).standard_normal((n, c, hw, hw)).astype(dtype)
    with using("auto"):
        expected = net(x)
        old = ConvBatchNormReLUPool.CHUNK_BYTES
        ConvBatchNormReLUPool.CHUNK_BYTES = 1          # one image per chunk: many chunks, both threads
        try:
            with minicnn.no_grad():
                got = net(x)
        finally:
            ConvBatchNormReLUPool.CHUNK_BYTES = old
    step = net._last_plan[0]
    assert isinstance(step, ConvBatchNormReLUPool) and step.route == "inference"
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@needs_pipeline
def test_the_whole_model_predicts_the_same_under_no_grad():
    minicnn.manual_seed(0)
    model = minicnn.models.EmotionClassifier().eval()
    x = np.random.default_rng(0).standard_normal((37, 1, 48, 48)).astype(np.float32)
    expected = model(x)
    with minicnn.no_grad():
        got = model(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_backward_after_a_no_grad_forward_is_a_clear_error():
    net = block(2, 3, 3, 1, 1, 2, True, np.float64, 0)
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 6))
    with minicnn.no_grad():
        out = net(x)
    if threads.available():
        with pytest.raises(RuntimeError, match="no_grad"):
            net.backward(np.ones_like(out))
    out = net(x)                                  # outside no_grad: backward works again
    assert net.backward(np.ones_like(out)).shape == x.shape


def test_no_grad_in_training_mode_computes_the_usual_forward():
    net = block(2, 3, 3, 1, 1, 2, True, np.float64, 0).train()
    x = np.random.default_rng(0).standard_normal((4, 2, 6, 6))
    with minicnn.no_grad():
        out = net(x)
    assert net.backward(np.ones_like(out)).shape == x.shape     # nothing special happened
    assert int(net[1].num_batches_tracked) == 1


def test_no_grad_is_restored_after_errors_and_is_per_thread():
    assert minicnn.is_grad_enabled()
    seen = []
    with pytest.raises(ZeroDivisionError):
        with minicnn.no_grad():
            assert not minicnn.is_grad_enabled()
            t = threading.Thread(target=lambda: seen.append(minicnn.is_grad_enabled()))
            t.start()
            t.join()
            with minicnn.no_grad():
                pass
            assert not minicnn.is_grad_enabled()      # nested: still off
            1 / 0
    assert minicnn.is_grad_enabled() and seen == [True]


@needs_pipeline
def test_run_chunks_covers_every_item_once_and_passes_errors_on():
    hits = np.zeros(23, dtype=int)

    def mark(lo, hi):
        hits[lo:hi] += 1
    threads.run_chunks(mark, 23, 4)
    assert (hits == 1).all()

    def fail(lo, hi):
        if lo >= 8:
            raise ValueError(f"chunk {lo}")
    with pytest.raises(ValueError, match="chunk"):
        threads.run_chunks(fail, 23, 4)
    from threadpoolctl import threadpool_info
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    assert all(i["num_threads"] > 1 or (__import__("os").cpu_count() or 1) == 1 for i in blas)   # restored


@pytest.mark.parametrize("n, chunk, k", [(64, 29, 2), (64, 5, 2), (23, 4, 3), (5, 1, 2), (3, 8, 4), (1, 1, 2)])
def test_chunk_bounds_cover_the_range_in_fair_shares(n, chunk, k):
    """Consecutive chunks, sizes within one of each other, as many as asked but a multiple of the
    thread count (so no thread gets an extra chunk while the other waits), never empty."""
    bounds = threads.chunk_bounds(n, chunk, k)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert len(bounds) >= -(-n // chunk) and (len(bounds) % k == 0 or len(bounds) == n)
    shares = [sum(sizes[t::k]) for t in range(k)]
    assert max(shares) - min(shares) <= -(-len(bounds) // k)
    if (n, chunk, k) == (64, 29, 2):
        assert sizes == [16, 16, 16, 16]


@pytest.mark.parametrize("first", ["numpy", "minicnn"])
def test_the_openblas_setting_holds_whatever_the_import_order(first):
    """Importing NumPy first (the usual order) used to leave OpenBLAS's threads spinning after every
    product (1.5-2x slower training on 2 cores) and warn; now OpenBLAS re-reads the setting, so either
    order gives OPENBLAS_THREAD_TIMEOUT=4 in effect, and no warning."""
    import subprocess
    import sys
    code = (f"import {first}\nimport numpy, minicnn\n"
            "from minicnn.models import EmotionClassifier\n"
            "EmotionClassifier()(numpy.zeros((2, 1, 48, 48), numpy.float32))\n"
            "import ctypes\nfrom threadpoolctl import threadpool_info\n"
            "libs = [i['filepath'] for i in threadpool_info() if i.get('internal_api') == 'openblas']\n"
            "print([ctypes.CDLL(p).openblas_thread_timeout() for p in libs])\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "PerformanceWarning" not in out.stderr
    timeouts = eval(out.stdout.strip().splitlines()[-1])
    assert all(t == 4 for t in timeouts), timeouts


@needs_pipeline
def test_overlapping_callers_leave_the_blas_thread_count_as_it_was():
    from threadpoolctl import threadpool_info

    def counts():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    before = counts()

    def work():
        for _ in range(30):
            threads.run_chunks(lambda lo, hi: np.ones((64, 64)) @ np.ones((64, 64)), 6, 1)
    callers = [threading.Thread(target=work) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert counts() == before


@needs_pipeline
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_worker_threads_of_its_own():
    import os
    threads.run_chunks(lambda lo, hi: None, 4, 1)          # the parent's pool exists
    pid = os.fork()
    if pid == 0:                                           # child: must not wait on the parent's threads
        import signal
        signal.signal(signal.SIGALRM, lambda *args: os._exit(3))
        signal.alarm(30)                                   # a hang is a failure, not a stuck test run
        try:
            hits = []
            threads.run_chunks(lambda lo, hi: hits.append(lo), 4, 1)
            os._exit(0 if sorted(hits) == [0, 1, 2, 3] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
