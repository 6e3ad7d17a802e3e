"""All gradients in one flat buffer, summed over the ranks with one call per step.

Reducing each parameter's gradient separately costs one collective per tensor (16 for the
EmotionClassifier), each paying the network's latency; one buffer of all of them pays it once.
After :meth:`FlatGradients.allreduce` every ``p.grad`` is a view of that buffer::

    grads = FlatGradients(model.parameters(), comm, extras=2)
    ...                                  # backward fills p.grad on every rank
    grads.extras[:] = (loss_sum, correct)   # optional: numbers to sum along with the gradients
    grads.allreduce()                    # one call: buffer := sum over ranks; p.grad := its views

The sum is the single-process gradient of the global batch when each rank's loss gradient was
scaled by (its images) / (the global batch's images) before backward (see
:func:`minicnn.distributed.trainer.distributed_train_step`).
"""
import numpy as np

from ..backend import get_array_module

__all__ = ["FlatGradients"]


class FlatGradients:
    def __init__(self, params, comm, extras=0):
        self.params, self.comm = list(params), comm
        if not self.params:
            raise ValueError("FlatGradients needs at least one parameter")
        dtypes = {p.data.dtype for p in self.params}
        if len(dtypes) != 1:
            raise TypeError(f"the parameters have several dtypes ({sorted(map(str, dtypes))}): one buffer needs one")
        xp = get_array_module(self.params[0].data)
        sizes = [p.data.size for p in self.params]
        self.buffer = xp.zeros(sum(sizes) + int(extras), dtype=dtypes.pop())
        self.views, offset = [], 0
        for p, n in zip(self.params, sizes):
            self.views.append(self.buffer[offset:offset + n].reshape(p.data.shape))
            offset += n
        self.extras = self.buffer[offset:]          # (summed along with the gradients)

    @property
    def nbytes(self):
        return self.buffer.nbytes

    def gather(self):
        """Copy every gradient into its place in the buffer (zeros for a parameter without one)."""
        xp = get_array_module(self.buffer)
        for p, view in zip(self.params, self.views):
            if p.grad is None:
                view.fill(0)
            elif p.grad is not view:
                if p.grad.shape != view.shape:
                    raise ValueError(f"a gradient of shape {p.grad.shape} for a parameter of shape {view.shape}")
                xp.copyto(view, p.grad)

    def allreduce(self):
        """Sum the gradients (and the extras) over all ranks in one call; every ``p.grad`` becomes a
        view of the summed buffer."""
        self.gather()
        self.comm.allreduce(self.buffer)
        for p, view in zip(self.params, self.views):
            p.grad = view
        return self.buffer


def flat_copy(arrays):
    """One float64 buffer holding every array of ``arrays`` (for broadcasting and comparing
    replicas), and a function that writes such a buffer back into them, in place."""
    arrays = list(arrays)
    xp = get_array_module(arrays[0])
    flat = xp.concatenate([a.reshape(-1).astype(np.float64) for a in arrays])

    def write_back(buffer):
        offset = 0
        for a in arrays:
            a[...] = buffer[offset:offset + a.size].reshape(a.shape).astype(a.dtype)
            offset += a.size
    return flat, write_back
