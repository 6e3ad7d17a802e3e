"""Data-parallel training on many processes and machines: MPI on CPUs, NCCL on GPUs.

    pip install 'minicnn[distributed]'                 # mpi4py and MPICH (with mpiexec)
    mpiexec -n 4 minicnn train --distributed --batch-size 256 --data fer2013/
    mpiexec -n 8 minicnn train --distributed --device gpu --bn sync ...     # one process per GPU

In Python (every rank runs the same script under mpiexec)::

    from minicnn.distributed import DistributedTrainer, init
    comm = init()                                      # MPI (and NCCL with device="gpu")
    trainer = DistributedTrainer(data, recipe, comm=comm, bn="sync", out_dir="runs/dp")
    trainer.fit()

The pieces, one idea each: :mod:`.comm` (communicators: MPI, NCCL, and threads for tests),
:mod:`.gradients` (one flat buffer of all gradients, one all-reduce per step), :mod:`.batchnorm`
(BatchNorm over the global batch), :mod:`.trainer` (the Trainer, data-parallel). The design is
ChainerMN's; the README's "Many processes, many machines" says when it pays.
"""
import os
import sys
import traceback

from .batchnorm import SyncBatchNorm2d, convert_sync_batchnorm
from .comm import (MPICommunicator, NCCLCommunicator, SingleProcess, ThreadGroup, launched_by_mpi, select_gpu,
                   world_size_from_environment)
from .gradients import FlatGradients
from .trainer import BN_MODES, DistributedTrainer, distributed_train_step

__all__ = ["init", "DistributedTrainer", "distributed_train_step", "FlatGradients", "SyncBatchNorm2d",
           "convert_sync_batchnorm", "MPICommunicator", "NCCLCommunicator", "SingleProcess", "ThreadGroup",
           "launched_by_mpi", "world_size_from_environment", "abort_on_exception", "BN_MODES"]


def init(device="cpu", abort_on_error=True):
    """The communicator of this rank, for a job started by mpiexec (every rank calls it first).

    CPU: MPI, and the machine's cores shared among the ranks on it (unless NUMBA_NUM_THREADS or
    OMP_NUM_THREADS says otherwise). GPU: one GPU per process, chosen by the rank's index on its
    machine, and NCCL for the device buffers. With ``abort_on_error``, an unhandled exception on any
    rank ends the whole job (:func:`abort_on_exception`) instead of leaving the others waiting."""
    from ..backend import normalize_device
    from ..extras import require
    require("mpi4py", "data-parallel training (--distributed)")
    comm = MPICommunicator()
    if abort_on_error:
        abort_on_exception(comm)
    if normalize_device(device) == "gpu":
        require("cupy", "data-parallel training on GPUs")
        select_gpu(comm.local_rank)
        return NCCLCommunicator(comm)
    share_cores(comm.local_size)
    return comm


def share_cores(ranks_here):
    """Give each of the ``ranks_here`` processes on this machine its share of the cores (numba's
    threads and BLAS's), unless the user set a thread count."""
    if ranks_here <= 1 or os.environ.get("NUMBA_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // ranks_here)
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    from threadpoolctl import threadpool_limits
    global _limits
    _limits = threadpool_limits(threads, user_api="blas")
    return threads


_limits = None


def abort_on_exception(comm):
    """An unhandled exception on this rank prints its traceback and ends every rank of the job
    (MPI_Abort), as ``python -m mpi4py`` does: never a job hanging in a collective."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            sys.stderr.write(f"minicnn: rank {comm.rank} of {comm.size} failed; ending the job\n")
            traceback.print_exception(kind, value, tb)
            sys.stderr.flush()
        finally:
            if comm.size > 1:
                comm.abort(1)
            previous(kind, value, tb)
    sys.excepthook = hook
    return hook
