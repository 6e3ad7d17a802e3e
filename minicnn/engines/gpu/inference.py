"""The GPU engine's inference plan: what :class:`minicnn.InferenceSession` runs on CuPy arrays.

It replaces, for eval-mode prediction only, every [Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d]
block (BatchNorm folded into the conv by the session), Flatten and every Linear (+ ReLU), as the
CPU engine's plan does (:mod:`minicnn.engines.cpu.inference`), with no im2col matrix and no
buffer for a conv's full-size output:

* a conv block on one grey channel is one kernel: the 9 taps summed directly, pooled, biased and
  rectified (``grey_conv3x3_pool_bias_relu_nhwc``);
* any other 3x3 stride-1 conv block is Winograd's algorithm in three launches: the input transform
  V = B^T d B of every tile (the padding read as zeros, no padded copy), one batched cuBLAS product
  M[ab] = V[ab] U[ab] over the tile's t*t positions, and the output transform Y = A^T M A with the
  pooling, bias and ReLU in the same kernel, which writes only the pooled map. F(4x4, 3x3) where
  the map divides into 4x4 tiles (the EmotionClassifier's 24x24 and 12x12), else F(2x2, 3x3)
  (its 6x6): F(6x6, 3x3)'s 8x8 tiles would not fit a thread's registers, and its float32 error is
  ten times F(4x4, 3x3)'s. The filters U are transformed once, when the session is made;
* a Linear is one cuBLAS product and a bias (+ ReLU) kernel; Flatten is free (the first Linear's
  columns were reordered for the channels-last map).

**CUDA graph.** At batch 256 the whole forward is some 15 launches of microseconds each; issuing
them from Python costs more than running them. From the second call with a batch size, the
forward is captured once as a CUDA graph (into a memory pool of its own, the matrix products by
cuBLAS called directly: :func:`minicnn.engines.gpu.kernels.matmul`) and every later call copies
the batch into the graph's input array and replays it. Where a graph cannot be captured (CuPy's
cuBLAS refused and cuBLAS unavailable) the launches run one by one.

A plan this module cannot run (another kernel size, stride, pooling that does not divide the
tiles) makes :func:`compile_gpu` return None, and the session runs the model's own forward.
"""
import numpy as np

from ...backend import gpu_module
from ..common import walk_inference_plan
from ..cpu import winograd, winograd4
from . import kernels as gpu

__all__ = ["GpuInference", "compile_gpu"]


def _winograd_for(k, stride, padding, pool, oh, ow):
    """The CPU module whose matrices the block uses (F(4x4) or F(2x2)), or None: the kernels need
    whole tiles (no ragged edge) and pooling windows inside a tile."""
    for module, m in ((winograd4, 4), (winograd, 2)):
        if module.applies(k, stride, padding, oh, ow) and oh % m == 0 and ow % m == 0 and m % pool == 0:
            return module
    return None


class _Conv:
    def __init__(self, w, b, stride, padding, pool, in_hw, dtype):
        cp = gpu_module()
        w = np.asarray(w.get() if hasattr(w, "get") else w, dtype=np.float64)
        oc, c, k, _ = w.shape
        h, wd = in_hw
        self.c, self.oc, self.padding, self.pool = c, oc, padding, pool
        self.oh, self.ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
        self.ph, self.pw = self.oh // pool, self.ow // pool
        self.bias = cp.asarray(b, dtype=dtype)
        self.grey = c == 1 and k == 3 and stride == 1
        self.winograd = None if self.grey else _winograd_for(k, stride, padding, pool, self.oh, self.ow)
        if not self.grey and self.winograd is None:
            raise NotImplementedError("conv block")
        if self.grey:
            self.filters = cp.ascontiguousarray(cp.asarray(w.reshape(oc, 9).T, dtype=dtype))   # (9 taps, OC)
            return
        mod = self.winograd
        self.t = mod.BT.shape[0]
        self.m = self.t - 2
        self.th, self.tw = self.oh // self.m, self.ow // self.m
        u = mod.filter_transform(w)                               # (t*t, C, OC): G g G^T, in float64 (w's dtype)
        self.filters = cp.ascontiguousarray(cp.asarray(u, dtype=dtype))
        self.bt, self.at = cp.asarray(mod.BT, dtype=dtype), cp.asarray(mod.AT, dtype=dtype)

    def run(self, x):
        """The pooled output (N, PH, PW, OC) of channels-last x (N, H, W, C)."""
        cp = gpu_module()
        n = x.shape[0]
        out = cp.empty((n, self.ph, self.pw, self.oc), x.dtype)
        if self.grey:
            return gpu.grey_conv3x3_pool_bias_relu(x.reshape(x.shape[:3]), self.filters, self.bias, self.padding,
                                                   self.pool, out)
        tiles = n * self.th * self.tw
        v = gpu.winograd_input(x, self.bt, self.padding, self.th, self.tw,
                               cp.empty((self.t * self.t, tiles, self.c), x.dtype))
        mm = gpu.matmul(v, self.filters)                                        # (t*t, tiles, OC)
        return gpu.winograd_output_pool_bias_relu(mm, self.at, self.bias, self.th, self.tw, self.pool, out)


class _Linear:
    def __init__(self, w, b, relu, dtype):
        cp = gpu_module()
        self.wt = cp.ascontiguousarray(cp.asarray(w.T, dtype=dtype))          # (in, out)
        self.bias = cp.zeros(w.shape[0], dtype) if b is None else cp.asarray(b, dtype=dtype)
        self.relu = relu


def compile_gpu(plan, input_shape, dtype):
    """A :class:`GpuInference` for the session's plan, or None where a block is not one it runs."""
    try:
        return GpuInference(plan, input_shape, dtype)
    except NotImplementedError:          # (a conv block the kernels do not cover)
        return None


class GpuInference:
    # Capture a CUDA graph for a batch size from its second call on (the first compiles the
    # kernels and warms cuBLAS); graphs are kept for this many batch sizes.
    GRAPHS = True
    MAX_GRAPHS = 4

    def __init__(self, plan, input_shape, dtype):
        self.dtype = np.dtype(dtype)
        self.input_shape = tuple(input_shape)
        self.convs, self.linears = walk_inference_plan(
            plan, self.input_shape, lambda *conv: _Conv(*conv, self.dtype),
            lambda w, b, relu: _Linear(w, b, relu, self.dtype))
        self._seen, self._graphs = set(), {}
        self.replays = 0

    def forward(self, x):
        """Logits (N, classes) of x (N, C, H, W), launch by launch."""
        cp = gpu_module()
        n = x.shape[0]
        h = x.reshape(n, *self.input_shape[1:], 1) if self.input_shape[0] == 1 else \
            cp.ascontiguousarray(x.transpose(0, 2, 3, 1))
        for block in self.convs:
            h = block.run(h)
        h = h.reshape(n, -1)
        for lin in self.linears:
            h = gpu.bias_relu_rows(gpu.matmul(h, lin.wt), lin.bias, lin.relu)
        return h

    def run(self, x):
        """Logits for x (N, C, H, W), a CuPy array of the session's dtype (checked by the session)."""
        cp = gpu_module()
        x = cp.ascontiguousarray(x)
        n = x.shape[0]
        if n == 0:
            return cp.empty((0, self.linears[-1].wt.shape[1]), self.dtype)
        graph = self._graphs.get(n)
        if graph is None and self.GRAPHS and n in self._seen and gpu.cublas_capturable():
            graph = self._capture(x)
        self._seen.add(n)
        if graph is None:
            return self.forward(x)
        graph_x, graph_out, g, _ = graph
        graph_x[...] = x
        g.launch()
        self.replays += 1
        return graph_out.copy()

    def _capture(self, x):
        cp = gpu_module()
        if len(self._graphs) >= self.MAX_GRAPHS:
            self._graphs.pop(next(iter(self._graphs)))
        graph_x = x.copy()
        pool = cp.cuda.MemoryPool()                  # the graph's own memory: nothing made later reuses it
        stream = cp.cuda.Stream(non_blocking=True)
        with gpu.capture_scope(), cp.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture()
            try:
                graph_out = self.forward(graph_x)
            except BaseException:
                try:
                    stream.end_capture()
                except Exception:
                    pass
                raise
            g = stream.end_capture()
        self._graphs[x.shape[0]] = graph = (graph_x, graph_out, g, pool)
        return graph
