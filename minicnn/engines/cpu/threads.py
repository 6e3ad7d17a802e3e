"""Split a batch across threads, each running single-threaded kernels.

Run layer by layer, every kernel is parallel on its own: numba's threads for
the loops, OpenBLAS's for the matrix products, and the cores go back and forth
between the two pools at every stage of every layer, each time on data that
has left the cache. A conv block can be arranged differently: give each thread
chunks of a few images and let it take them through the whole block -- im2col,
the matrix product, BatchNorm + ReLU + pooling, and back -- on its own, with a
one-thread BLAS and serial numba loops, while the chunk's data is still in its
cache. On the 2-core test machine this took the EmotionClassifier's eval-mode
features from 37 to 29 ms at batch 64, and its conv2 block's training
forward + backward from 40 to 33 ms (blocks.py uses it).

:func:`run_chunks` needs to hold OpenBLAS (or any BLAS threadpoolctl can
limit) to one thread while it runs; where it cannot, :func:`available` is
False and callers keep their usual path.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["available", "chunk_bounds", "one_blas_thread", "run_chunks", "workers"]

_lock = threading.Lock()
_state = {}


def _controller():
    if "controller" not in _state:
        try:
            from threadpoolctl import ThreadpoolController
            controller = ThreadpoolController().select(user_api="blas")
            _state["controller"] = controller if controller.lib_controllers else None
        except Exception:      # no threadpoolctl, or it cannot read this process's libraries
            _state["controller"] = None
    return _state["controller"]


def workers():
    """How many threads share a batch: numba's thread count (``numba.set_num_threads``)."""
    from numba import get_num_threads
    return max(1, get_num_threads())


def available():
    """True when :func:`run_chunks` can run (a BLAS whose threads it can limit)."""
    return _controller() is not None


def _pool(n):
    """A pool of ``n`` worker threads (besides the caller), made once."""
    with _lock:
        pool = _state.get("pool")
        if pool is None or _state.get("key") != (n, os.getpid()):
            if pool is not None and _state["key"][1] == os.getpid():
                pool.shutdown(wait=False)
            # (a new one in a forked child too: the parent's worker threads do not exist there)
            pool = _state["pool"] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="minicnn")
            _state["key"] = (n, os.getpid())
    return pool


def chunk_bounds(n, chunk, k):
    """``range(n)`` cut into consecutive (lo, hi) chunks of about ``chunk`` items, shared fairly by
    ``k`` threads: the number of chunks is rounded up to a multiple of ``k`` and their sizes differ
    by at most one (64 images in chunks of 29 on 2 threads: 4 chunks of 16, not 29 + 29 + 6)."""
    count = -(-n // max(1, int(chunk)))
    count = min(n, -(-count // k) * k)
    size, extra = divmod(n, count)
    bounds, lo = [], 0
    for i in range(count):
        hi = lo + size + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def run_chunks(fn, n, chunk):
    """Call ``fn(lo, hi)`` for consecutive chunks of ``range(n)`` (about ``chunk`` items each, see
    :func:`chunk_bounds`), spread over :func:`workers` threads with BLAS held to one thread;
    exceptions propagate. Thread ``t`` takes chunks t, t + k, t + 2k, ..."""
    if n < 1:
        return
    bounds = chunk_bounds(n, chunk, workers())
    k = min(workers(), len(bounds))

    def share(t):
        for lo, hi in bounds[t::k]:
            fn(lo, hi)

    with _ONE_BLAS_THREAD:
        futures = [_pool(k - 1).submit(share, t) for t in range(1, k)] if k > 1 else []
        try:
            share(0)                       # the calling thread takes the first share itself
            error = None
        except BaseException as e:
            error = e
        errors = [error] + [f.exception() for f in futures]     # waits for every thread
    for e in errors:
        if e is not None:
            raise e


class _OneBlasThread:
    """Hold the BLAS to one thread while any caller is inside (callers may overlap, from
    several threads of the program: the first one in limits it, the last one out restores it)."""

    def __init__(self):
        self.users, self.limiter, self.lock = 0, None, threading.Lock()

    def __enter__(self):
        with self.lock:
            if self.users == 0:
                self.limiter = _controller().limit(limits=1, user_api="blas")
            self.users += 1

    def __exit__(self, *exc):
        with self.lock:
            self.users -= 1
            if self.users == 0:
                self.limiter.restore_original_limits()
                self.limiter = None


_ONE_BLAS_THREAD = _OneBlasThread()


def one_blas_thread():
    """A context in which the BLAS runs on the calling thread alone (needs :func:`available`)::

        with one_blas_thread():
            np.matmul(a, b)          # no BLAS worker thread woken
    """
    return _ONE_BLAS_THREAD
