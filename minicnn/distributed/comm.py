"""Communicators: what the ranks of a data-parallel run say to each other.

A communicator is a small object with the handful of collective operations that data-parallel
training needs (ChainerMN's design: MPI starts the processes and moves host buffers; on GPUs NCCL
moves device buffers, and MPI only hands NCCL its id)::

    comm.rank, comm.size, comm.local_rank      # this process, how many, its index on this machine
    comm.allreduce(a)                          # a := sum of every rank's a, in place
    comm.bcast(a, root=0)                      # a := root's a, in place
    comm.allgather_object(obj)                 # [rank 0's obj, rank 1's, ...] on every rank
    comm.bcast_object(obj, root=0)             # root's obj on every rank
    comm.barrier()
    comm.abort(code)                           # end every rank of the job now

Four kinds:

* :class:`SingleProcess` -- one rank; every operation does nothing (a run with no MPI);
* :class:`MPICommunicator` -- mpi4py over MPI_COMM_WORLD, NumPy buffers in place;
* :class:`NCCLCommunicator` -- CuPy device buffers through NCCL on the current stream (no host
  synchronisation), host buffers and objects through MPI;
* :class:`ThreadGroup` -- N ranks as N threads of one process (the tests' fake communicator: it
  sums in rank order, so its results are exact and repeatable).

Objects travel pickled between the job's own processes only (never read from a file).
"""
import os
import threading

import numpy as np

__all__ = ["SingleProcess", "MPICommunicator", "NCCLCommunicator", "ThreadGroup", "launched_by_mpi",
           "world_size_from_environment"]

# Set by the launchers in every process they start: MPICH/Hydra and Intel MPI (PMI_SIZE), Open MPI
# (OMPI_COMM_WORLD_SIZE), MVAPICH (MV2_COMM_WORLD_SIZE) and Slurm's srun (SLURM_NTASKS within a
# job step).
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size_from_environment(environ=None):
    """How many processes the MPI launcher (mpiexec, mpirun, srun) started, read from the variables
    it sets; 1 when none is set."""
    env = os.environ if environ is None else environ
    for name in _SIZE_VARIABLES:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    if env.get("SLURM_PROCID", "") != "" and env.get("SLURM_NTASKS", "").isdigit() and \
            env.get("SLURM_STEP_ID", "") != "":
        return int(env["SLURM_NTASKS"])
    return 1


def launched_by_mpi(environ=None):
    """True when this process is one of several started by an MPI launcher."""
    return world_size_from_environment(environ) > 1


class SingleProcess:
    """The communicator of a run with one process: rank 0 of 1, and every collective is a no-op."""
    rank, size, local_rank, local_size = 0, 1, 0, 1
    name = "single process"

    def allreduce(self, a):
        return a

    def bcast(self, a, root=0):
        return a

    def allgather_object(self, obj):
        return [obj]

    def bcast_object(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def abort(self, code=1):
        os._exit(code)


class MPICommunicator:
    """MPI_COMM_WORLD through mpi4py: NumPy buffers reduced in place with one call each.

    ``local_rank`` is this process's index among the ranks on its own machine (from an
    MPI_COMM_TYPE_SHARED split): what chooses a GPU."""

    def __init__(self, mpi_comm=None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.name = f"MPI ({MPI.Get_library_version().splitlines()[0].strip()})"

    def allreduce(self, a):
        if type(a).__module__.startswith("cupy"):
            raise TypeError("MPICommunicator moves host (NumPy) arrays; a GPU run uses NCCLCommunicator")
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return a

    def bcast(self, a, root=0):
        self.comm.Bcast(a, root=root)
        return a

    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


class NCCLCommunicator:
    """One process per GPU: device (CuPy) buffers all-reduced by NCCL on the current CUDA stream, so
    the host never waits for the GPU; host arrays and objects go through MPI, which also hands every
    rank rank 0's NCCL id. Choose the GPU (``select_gpu``) before making one."""

    def __init__(self, host=None):
        try:
            from cupy.cuda import nccl
            if not getattr(nccl, "available", True):
                raise ImportError("CuPy cannot load NCCL")
        except ImportError as exc:
            raise RuntimeError(f"data-parallel training on GPUs needs NCCL ({exc}): pip install nvidia-nccl-cu12 "
                               "(or -cu13, to match CuPy)") from None
        self.host = host or MPICommunicator()
        self.rank, self.size = self.host.rank, self.host.size
        self.local_rank, self.local_size = self.host.local_rank, self.host.local_size
        self._nccl = nccl
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.host.bcast_object(uid)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int32): nccl.NCCL_INT32,
                       np.dtype(np.int64): nccl.NCCL_INT64}
        self.name = f"NCCL {nccl.get_version()} (ids through {self.host.name})"

    def _args(self, a):
        import cupy
        if not a.flags.c_contiguous:
            raise ValueError("NCCL needs a contiguous buffer")
        if a.dtype not in self._types:
            raise TypeError(f"NCCL cannot reduce {a.dtype} arrays")
        return a.data.ptr, a.size, self._types[a.dtype], cupy.cuda.get_current_stream().ptr

    def allreduce(self, a):
        if not type(a).__module__.startswith("cupy"):
            return self.host.allreduce(a)
        ptr, n, dtype, stream = self._args(a)
        self.comm.allReduce(ptr, ptr, n, dtype, self._nccl.NCCL_SUM, stream)
        return a

    def bcast(self, a, root=0):
        if not type(a).__module__.startswith("cupy"):
            return self.host.bcast(a, root)
        ptr, n, dtype, stream = self._args(a)
        self.comm.bcast(ptr, n, dtype, root, stream)
        return a

    def allgather_object(self, obj):
        return self.host.allgather_object(obj)

    def bcast_object(self, obj, root=0):
        return self.host.bcast_object(obj, root)

    def barrier(self):
        self.host.barrier()

    def abort(self, code=1):
        self.host.abort(code)


def select_gpu(local_rank):
    """Make GPU ``local_rank`` (modulo the GPUs this process sees) the current device; returns its index."""
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    if n == 0:
        raise RuntimeError("no CUDA device is visible to this process")
    index = local_rank % n
    cupy.cuda.Device(index).use()
    return index


class ThreadGroup:
    """``size`` ranks as threads of this process, for tests: ``ThreadGroup(2).run(fn)`` calls
    ``fn(comm)`` in two threads, each with its own communicator, and returns their results in rank
    order (re-raising the first exception). Reductions add the ranks' arrays in rank order (rank 0 +
    rank 1 + ...), so every rank gets the same, repeatable sum."""

    def __init__(self, size):
        if size < 1:
            raise ValueError(f"a group needs at least one rank, got {size}")
        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots = [None] * size

    def communicator(self, rank):
        return _ThreadCommunicator(self, rank)

    def _exchange(self, rank, value):
        """Every rank's ``value``, in rank order, on every rank."""
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()            # (nobody writes a slot again before all have read)
        return values

    def run(self, fn, timeout=600):
        results, errors = [None] * self.size, []

        def target(rank):
            try:
                results[rank] = fn(self.communicator(rank))
            except BaseException as exc:     # noqa: B036 (handed to the caller)
                errors.append((rank, exc))
                self._barrier.abort()        # the other ranks stop waiting: BrokenBarrierError
        threads = [threading.Thread(target=target, args=(r,), name=f"rank-{r}") for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"a rank of the thread group did not finish within {timeout} s")
        if errors:
            errors.sort(key=lambda e: isinstance(e[1], threading.BrokenBarrierError))
            raise errors[0][1]
        return results


class _ThreadCommunicator:
    """One thread's view of a :class:`ThreadGroup`: the same operations as the MPI communicator."""
    name = "threads"

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size
        self.local_rank, self.local_size = rank, group.size

    def allreduce(self, a):
        parts = self.group._exchange(self.rank, a.copy())
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        a[...] = total
        return a

    def bcast(self, a, root=0):
        parts = self.group._exchange(self.rank, a.copy())
        a[...] = parts[root]
        return a

    def allgather_object(self, obj):
        return self.group._exchange(self.rank, obj)

    def bcast_object(self, obj, root=0):
        return self.group._exchange(self.rank, obj)[root]

    def barrier(self):
        self.group._exchange(self.rank, None)

    def abort(self, code=1):
        self.group._barrier.abort()
        raise SystemExit(code)
