"""Reusable work arrays for the CPU engine.

Why: a large NumPy array is fresh memory from the operating system, and every
page of it faults the first time it is written (the kernel zeroes it first).
A training step of the EmotionClassifier at batch 64 allocates some 100 MB of
activations, gradients and im2col matrices; fresh each step, that was about
1,100 page faults and some 15% of the step's time on the 2-core test machine.

How: :func:`empty` hands out an array from a pool of flat buffers keyed by
size. A buffer is handed out again only when nothing outside the pool refers
to it any more -- no array, no view of it (the reference count tells) -- so
reuse can never change an array someone still holds: it behaves exactly like
``np.empty``, minus the page faults. Small arrays (under ``MIN_BYTES``) come
from ``np.empty`` as usual. The pool forgets its least recently used buffers
beyond ``limit()`` bytes (default: a quarter of the machine's memory, at least 1 GiB;
``MINICNN_WORKSPACE_MB``). A training step must fit: at batch 1024 the EmotionClassifier's
CPU engine pools 1.5 GB, and under a 1 GiB cap that step ran 1.2-1.5x slower (fresh memory every
step; 1.66-1.74 s against 1.39-1.43 s on 2 cores).

    from minicnn.engines.cpu import workspace
    out = workspace.empty((64, 24, 24, 32), np.float32)
    workspace.clear()            # drop every pooled buffer
"""
import os
import sys
import threading

import numpy as np

__all__ = ["empty", "empty_like", "clear", "limit", "set_limit", "default_limit", "stats"]

MIN_BYTES = 1 << 20

_lock = threading.Lock()
_pool = {}          # nbytes -> list of [buffer, last_use]
_clock = 0


def default_limit():
    """A quarter of the machine's physical memory, but at least 1 GiB (1 GiB where it is unknown)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = 0
    return max(1 << 30, physical // 4)


_limit = (int(float(os.environ["MINICNN_WORKSPACE_MB"]) * (1 << 20)) if os.environ.get("MINICNN_WORKSPACE_MB")
          else default_limit())


def _refs_when_free():
    """The reference count a pooled buffer shows in :func:`_take` when nothing else holds it."""
    entry = [np.empty(8, np.uint8), 0]
    for e in [entry]:
        buf = e[0]
        return sys.getrefcount(buf)


_FREE = _refs_when_free()


def _take(nbytes):
    global _clock
    _clock += 1
    for e in _pool.get(nbytes, ()):
        buf = e[0]
        if sys.getrefcount(buf) == _FREE:
            e[1] = _clock
            return buf
    buf = np.empty(nbytes, dtype=np.uint8)
    _pool.setdefault(nbytes, []).append([buf, _clock])
    _trim()
    return buf


def _trim():
    """Forget least recently used buffers while the pool is over its limit (holders keep theirs)."""
    total = sum(e[0].nbytes for entries in _pool.values() for e in entries)
    if total <= _limit:
        return
    for nbytes, e in sorted(((n, e) for n, es in _pool.items() for e in es), key=lambda t: t[1][1]):
        if total <= _limit:
            break
        _pool[nbytes] = [x for x in _pool[nbytes] if x is not e]   # by identity: == would compare arrays
        total -= nbytes
    for nbytes in [n for n, es in _pool.items() if not es]:
        del _pool[nbytes]


def empty(shape, dtype):
    """Like ``np.empty(shape, dtype)`` (C order), but reusing a pooled buffer nobody holds."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape)) if not isinstance(shape, int) else (shape,)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    with _lock:
        buf = _take(nbytes)
    return buf.view(dtype).reshape(shape)


def empty_like(a):
    """``empty(a.shape, a.dtype)``."""
    return empty(a.shape, a.dtype)


def clear():
    """Drop every pooled buffer (arrays still in use stay valid; they are simply no longer pooled)."""
    with _lock:
        _pool.clear()


def limit():
    """The most bytes the pool keeps (it may briefly hold more while all of them are in use)."""
    return _limit


def set_limit(nbytes):
    """Set :func:`limit` (0 turns pooling off: every request gets fresh memory); returns the old one."""
    global _limit
    if nbytes < 0:
        raise ValueError(f"workspace limit must be >= 0 bytes, got {nbytes}")
    with _lock:
        old, _limit = _limit, int(nbytes)
        _trim()
    return old


def stats():
    """{'buffers': how many are pooled, 'bytes': their total size, 'free': how many nobody holds}."""
    with _lock:
        entries = [e for es in _pool.values() for e in es]
        free = 0
        for e in entries:
            buf = e[0]
            free += sys.getrefcount(buf) == _FREE
        return {"buffers": len(entries), "bytes": sum(e[0].nbytes for e in entries), "free": free}
