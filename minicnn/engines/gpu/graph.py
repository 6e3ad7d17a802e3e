"""A training step as a CUDA graph: captured once, replayed every step.

On a large GPU a batch-64 step of the EmotionClassifier is some 110 small kernel launches and array
operations (``tests/test_gpu.py`` counts them), each finished in microseconds: the step's time goes
to Python and CuPy issuing them. A CUDA graph records the launches of one step once (CuPy's stream
capture) and replays all of them with one call.

A replay repeats each launch with the arguments it had when captured, so everything that changes
from step to step must reach the kernels through device memory, and the step is written for that:

* the batch is copied into fixed input arrays before each replay;
* the optimizer's learning rate (and Adam's step count) and dropout's seeds are kept in small device
  arrays that the kernels read (:class:`minicnn.engines.gpu.kernels.DeviceValues`); they are updated before
  each replay, by the optimizer's ``_before_graph_replay`` and the dropout steps' ``before_graph_replay``;
* BatchNorm updates its running statistics in place on the device (its batch count too), and
  gradient clipping reads nothing back;
* the matrix products go through :func:`minicnn.engines.gpu.kernels.matmul`, which during a capture calls cuBLAS
  directly (:mod:`minicnn.engines.gpu.cublas`): CuPy 14.2 refuses its own cuBLAS calls there;
* nothing reads from the GPU during the capture (the loss and the count of right answers stay on
  the device), and arrays made during the capture take their memory from a pool of the graph's
  own, so that nothing made later is handed memory a replay writes to.

The first ``warmup`` steps run eagerly (they compile the kernels and create the momentum buffers);
a batch of another shape runs eagerly too; if the model's or the optimizer's arrays are replaced
(``load_state_dict``, resuming) the step is captured again. Replays compute what eager steps
compute, in the same order: ``tests/test_graph.py`` checks the weights (bit for bit on the CuPy
emulator; to float32 rounding on a GPU, where cuBLAS may pick other algorithms on the graph's
stream).

    step = CudaGraphStep(model, criterion, optimizer, clip_grad_norm=5.0)
    loss, correct = step(x, y)     # device 0-d arrays: the batch's mean loss and number right
"""
import numpy as np

from ...backend import DeviceError, device_of, gpu_module, to_device
from ...nn.loss import check_labels
from ...optim import SGD, Adam, AdamW
from ... import engines
from . import kernels as gpu

__all__ = ["CudaGraphStep", "check_cuda_graphs_possible"]


def check_cuda_graphs_possible():
    """A clear error (DeviceError: the command line prints it without a traceback) where a training
    step's matrix products cannot be captured (see gpu.cublas_capturable)."""
    if not gpu.cublas_capturable():
        raise DeviceError(f"CUDA graphs are not available here: CuPy {gpu_module().__version__} refuses cuBLAS "
                          "calls (the matrix products of every convolution and linear layer) while a stream is "
                          "captured, and cuBLAS called directly (minicnn/engines/gpu/cublas.py) could not be captured "
                          "either. Train without cuda_graph / --cuda-graph: the GPU kernels run all the same, one "
                          "launch at a time.")


class CudaGraphStep:
    def __init__(self, model, criterion, optimizer, clip_grad_norm=0.0, warmup=2):
        if model.device != "gpu":
            raise ValueError("a CUDA graph step needs the model on the GPU: model.to('gpu') first")
        if engines.current() != "auto":
            raise ValueError("a CUDA graph step needs minicnn's GPU engine (minicnn.engine('auto')): the textbook "
                             "dropout draws from a generator that a replay would repeat unchanged")
        if not (type(optimizer) is SGD and optimizer.momentum or type(optimizer) in (Adam, AdamW)):
            raise ValueError(f"a CUDA graph step supports SGD with momentum, Adam and AdamW (their kernels read the "
                             f"learning rate from device memory), not {type(optimizer).__name__}"
                             f"{'' if type(optimizer) is not SGD else ' without momentum'}")
        check_cuda_graphs_possible()
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.clip_grad_norm, self.warmup = float(clip_grad_norm), int(warmup)
        self.replays = self.eager_steps = 0
        self._graph = None

    def eager(self, x, y):
        """One ordinary training step on device arrays: exactly what the graph records."""
        from ...training.trainer import train_step
        return train_step(self.model, self.criterion, self.optimizer, x, y, self.clip_grad_norm)

    def __call__(self, x, y):
        """Train on the batch (x: device images; y: integer labels, host or device); returns the
        batch's loss and number of right answers as 0-d device arrays."""
        if not self.model.training:
            raise ValueError("a CUDA graph step trains: call model.train() first")
        if device_of(x) != "gpu":
            raise ValueError("a CUDA graph step takes its images on the GPU (to_device(x, 'gpu'))")
        y = self._labels(y, len(x))
        if self._graph is not None and not (x.shape == self._x.shape and x.dtype == self._x.dtype
                                            and self._bound_arrays_unchanged()):
            if x.shape == self._x.shape:
                self._graph = None                   # arrays replaced (a state dict loaded): capture again
            else:
                self.eager_steps += 1
                return self.eager(x, y)              # another batch size: run it eagerly
        if self._graph is None:
            if self.eager_steps < self.warmup:
                self.eager_steps += 1
                return self.eager(x, y)
            self._capture(x, y)
        self._x[...] = x
        self._y[...] = y
        for step in engines.steps(self.model):
            if hasattr(step, "before_graph_replay"):
                step.before_graph_replay()
        self.optimizer._before_graph_replay()
        self._graph.launch()
        self.replays += 1
        return self._loss.copy(), self._correct.copy()

    def _labels(self, y, n):
        """Checked on the host (the loss inside the graph sees them on the device), then copied over."""
        y = check_labels(y, n, getattr(self.model, "num_classes", None))
        return to_device(y, "gpu").astype(np.int64, copy=False)

    def _bound(self):
        """The arrays the graph reads and writes in place: parameters, buffers, optimizer state."""
        arrays = [p.data for p in self.model.parameters()]
        arrays += [b for _, b in self.model.named_buffers()]
        arrays += [v for state in self.optimizer.state for v in state.values() if hasattr(v, "shape")]
        return arrays

    def _bound_arrays_unchanged(self):
        now = self._bound()
        return len(now) == len(self._bound_at_capture) and all(a is b for a, b in zip(now, self._bound_at_capture))

    def _capture(self, x, y):
        cp = gpu_module()
        self._x, self._y = x.copy(), y.copy()
        self._pool = cp.cuda.MemoryPool()            # the graph's own memory
        stream = cp.cuda.Stream(non_blocking=True)
        with gpu.capture_scope(), cp.cuda.using_allocator(self._pool.malloc), stream:
            stream.begin_capture()
            try:
                self._loss, self._correct = self.eager(self._x, self._y)
            except BaseException:
                try:
                    stream.end_capture()             # (an error in the step may have ended it already)
                except Exception:
                    pass
                raise
            graph = stream.end_capture()
        self._graph, self._bound_at_capture = graph, self._bound()
