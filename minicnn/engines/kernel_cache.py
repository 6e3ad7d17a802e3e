"""Where the CPU engine's compiled kernels live, and the one line said when they are compiled.

numba compiles the CPU engine's kernels for this machine the first time they run and caches the
machine code (``cache=True``) beside the sources, in ``minicnn/engines/cpu/__pycache__`` (or, where
that folder is not writable, in numba's user cache folder, ``$NUMBA_CACHE_DIR`` if set). Later
processes load it in well under a second. ``minicnn cache`` shows the folder; ``minicnn cache
--clear`` empties it.
"""
import glob
import os
import sys

__all__ = ["location", "compiled", "announce_first_compile", "clear", "folder_size"]

_said = []


def _caches():
    from .cpu import kernels, winograd
    for module in (kernels, winograd):
        for name in dir(module):
            cache = getattr(getattr(module, name), "_cache", None)
            if cache is not None and hasattr(cache, "_cache_path"):
                yield cache


def location():
    """The folder numba keeps the CPU engine's compiled kernels in."""
    for cache in _caches():
        return cache._cache_path
    return None


def compiled():
    """True when some kernel has a compiled version cached (not a fresh install; kernels a program never
    uses are never compiled, so 'all of them' would never hold)."""
    return any(os.path.exists(cache._cache_file._index_path) for cache in _caches())


def announce_first_compile(stream=None):
    """Say once per process, before any kernel compiles, that they are being compiled (only when
    nothing is cached yet)."""
    if _said or os.environ.get("MINICNN_QUIET"):
        return
    _said.append(True)
    try:
        if compiled():
            return
        where = location()
    except Exception:          # (a numba whose cache internals differ: say nothing rather than fail)
        return
    print(f"minicnn: compiling the CPU engine's kernels for this machine, once (about half a minute on 2 "
          f"cores); cached in {where} (`minicnn cache --clear` "
          "removes them)", file=stream or sys.stderr, flush=True)


def clear():
    """Delete the cached machine code (the next run compiles again)."""
    where = location()
    if where and os.path.isdir(where):
        for path in glob.glob(os.path.join(where, "*.nbi")) + glob.glob(os.path.join(where, "*.nbc")):
            os.remove(path)


def folder_size(path):
    """Bytes under ``path`` (None when it does not exist)."""
    if not path or not os.path.isdir(path):
        return None
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


