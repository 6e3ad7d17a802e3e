"""The CPU engine: numba kernels on channels-last memory, Winograd convolutions, threads.

* :mod:`.kernels` -- the numba kernels (im2col/col2im on NHWC memory, BatchNorm passes, ReLU,
  pooling, the fused BatchNorm + ReLU + pool passes, the SGD update);
* :mod:`.winograd` -- 3x3 stride-1 convolutions by Winograd's F(2x2, 3x3);
* :mod:`.threads` -- chunks of images through a whole conv block, one thread each;
* :mod:`.workspace` -- reusable work memory;
* :mod:`.layers` -- steps that replace one textbook layer each;
* :mod:`.blocks` -- steps that replace a Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d block.

``RULES`` tells :func:`minicnn.engines.plan` which runs of textbook layers each step replaces,
longest first. Only exact textbook classes are replaced (a subclass, e.g. a layer a learner
changed, runs as written).
"""
from ...nn import BatchNorm2d, Conv2d, Linear, MaxPool2d, ReLU
from .blocks import BatchNormReLUPool, ConvBatchNormReLUPool, fusable, fusable_with_conv
from .layers import BatchNorm2dStep, Conv2dStep, LinearStep, MaxPool2dStep, ReLUStep

__all__ = ["RULES", "sgd_update"]


def _openblas_threads_sleep_soon():
    """OpenBLAS's idle threads must stop spinning soon after a matrix product, or they take the cores
    from the numba kernels that follow (on 2 cores a training step took 1.5-2x as long). ``import
    minicnn`` sets OPENBLAS_THREAD_TIMEOUT=4, which OpenBLAS reads when it loads; if NumPy loaded it
    first, OpenBLAS is told to read its environment again (``openblas_read_env``) and to restart its
    threads (``blas_thread_shutdown_``; the next product starts them with the new setting), so the
    import order does not matter. Where OpenBLAS does not export those, say so once."""
    import sys
    if not getattr(sys.modules.get("minicnn"), "_openblas_spins", False):
        return
    try:
        import ctypes
        from threadpoolctl import threadpool_info
        libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"
                and i.get("threading_layer") == "pthreads" and i.get("num_threads", 1) > 1]
    except Exception:
        return
    for info in libs:
        try:
            lib = ctypes.CDLL(info["filepath"])
            lib.openblas_read_env()
            lib.blas_thread_shutdown_()
        except (OSError, AttributeError):
            import warnings
            from .. import PerformanceWarning
            warnings.warn("NumPy was imported before minicnn, and its OpenBLAS cannot be told to let its idle "
                          "threads sleep soon, so they spin after every matrix product and slow minicnn's CPU "
                          "engine (about 1.5x on 2 cores). Import minicnn before NumPy, or set "
                          "OPENBLAS_THREAD_TIMEOUT=4 in the environment.", PerformanceWarning, stacklevel=2)


_openblas_threads_sleep_soon()

from ..kernel_cache import announce_first_compile  # noqa: E402

announce_first_compile()


def _is(cls, test=None):
    return lambda run: type(run[0]) is cls and (test is None or test(run[0]))


def _pool_fits(pool):
    return pool.stride == pool.kernel_size and pool.kernel_size <= 16


RULES = (
    (4, fusable_with_conv, ConvBatchNormReLUPool),
    (3, fusable, BatchNormReLUPool),
    (1, _is(Conv2d), Conv2dStep),
    (1, _is(BatchNorm2d), BatchNorm2dStep),
    (1, _is(ReLU), ReLUStep),
    (1, _is(MaxPool2d, _pool_fits), MaxPool2dStep),
    (1, _is(Linear), LinearStep),
)


def sgd_update(opt, p, state):
    """:class:`minicnn.optim.SGD`'s rule with momentum, in one numba pass over the parameter."""
    import numpy as np
    from . import kernels
    buf = state.get("momentum_buffer")
    first = buf is None
    if first:
        buf = state["momentum_buffer"] = np.empty_like(p.data)
    g = np.ascontiguousarray(p.grad, dtype=p.data.dtype)
    update = kernels.sgd_momentum_update if p.data.size >= kernels.SERIAL_BELOW else kernels.sgd_momentum_update_serial
    update(p.data.reshape(-1), g.reshape(-1), buf.reshape(-1), opt.lr, opt.momentum, opt.dampening,
           opt.weight_decay, opt.nesterov, first)
