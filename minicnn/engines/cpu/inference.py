"""The CPU engine's inference plan: what :class:`minicnn.InferenceSession` runs on NumPy arrays.

It replaces, for eval-mode prediction only, every [Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d]
block (BatchNorm folded into the conv by the session), Flatten, and every Linear (+ ReLU):

* a conv block on one grey channel (3x3, stride 1) is one kernel, the conv summed directly and
  pooled, biased and rectified in registers (:func:`kernels.grey_conv3x3_pool_bias_relu`);
* any other conv block is a conv without bias into a buffer -- Winograd F(6x6, 3x3) where the output
  divides into 6x6 tiles (:mod:`.winograd6`), else F(4x4, 3x3) where it divides into 4x4 tiles
  (:mod:`.winograd4`), else F(2x2, 3x3), else (few input channels, other kernels) im2col + one
  matrix product -- then :func:`kernels.pool_bias_relu`: relu(maxpool(y) + b');
* Flatten is free: the first Linear's columns were reordered for the channels-last feature map;
* a Linear is one matrix product with the transposed weight made at compile time, then the bias
  (and ReLU) in place.

Split within an image, the work is small enough that starting threads costs more than some kernels'
whole work, so the small ones run serially (``PARALLEL_MIN_VALUES``).

Three ways to use the cores, chosen by the batch size:

* **one image or a few** (up to ``SERIAL_MAX_IMAGES``): no other thread at all -- every kernel
  serial, the BLAS held to the calling thread. Waking sleeping threads is what made small batches'
  latency jump on the 2-core VM. Calls after a 0.2 s pause, 12 rounds of 10, median (99th
  percentile) in ms: batch 1 serial 0.98 (2.3), split within the image 1.10 (5.2); batch 4 serial
  2.49 (4.8), within 2.59 (36.0), two threads of two images 3.70 (5.6); batch 6 serial 3.57 (7.6),
  within 3.64 (35.9), chunked 4.80 (7.6);
* **many images** (at least ``CHUNKED_MIN_IMAGES_PER_THREAD`` per thread): each thread takes its
  share of the batch through *every* conv block with serial kernels and a one-thread BLAS -- one
  parallel region for the whole feature extractor, no serial section between blocks. Within its
  share a thread runs each block on a few images at a time, as many as give the block's matrix
  products about ``GEMM_ROWS`` rows: four images of 16 tiles (6x6) for a 24x24 map, all of them for
  a 6x6 map of one tile (a product of 8 rows runs at half the speed of one of 32);
* **in between** (more images than the serial route takes, too few to give every thread its
  share: only with many cores): the blocks one after the other, each split *within* the images
  (numba's parallel loops over output rows, the BLAS's own threads).

On the many-images route each thread also takes its rows through the Linear layers, with a
one-thread BLAS: OpenBLAS's own threads, asleep after a moment of idleness, took milliseconds to
wake on the 2-core VM (batch 64, the second call after a 1 s pause: 19 ms this way, 27-30 ms with a
two-thread fc1 after the parallel region; 10 ms either way back to back).

The arrays between blocks are kept per batch size; a Winograd conv's work arrays (padded input,
transformed tiles, products) are made per call, and malloc hands each thread back the same
cache-warm memory.
"""
import numpy as np

from ..common import walk_inference_plan
from . import kernels as cpu
from . import threads, winograd, winograd4, winograd6

__all__ = ["CpuInference"]

# Below this many values a kernel runs serially even on the within-image route: starting numba's
# threads costs about 55 us, more than a small kernel's whole work (2 cores, batch 1: the pooling of
# conv1's 18,432 values takes 15 us serially, 57 in parallel).
PARALLEL_MIN_VALUES = 1 << 17


class _Conv:
    """One folded conv block: conv (no bias) -> + b' -> ReLU -> max pool k (stride k)."""

    def __init__(self, w, b, stride, padding, pool, in_hw, dtype, winograd_min_channels, winograd_order,
                 gemm_rows):
        oc, c, k, _ = w.shape
        self.c, self.oc, self.k, self.stride, self.padding, self.pool = c, oc, k, stride, padding, pool
        h, wd = in_hw
        self.oh, self.ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
        self.ph, self.pw = self.oh // pool, self.ow // pool
        self.bias = np.array(b, dtype=dtype)                  # (copies: the session is a snapshot)
        w = np.asarray(w, dtype=dtype)
        self.winograd = None
        # One grey channel, 3x3, stride 1: computed directly, pooled in registers (no conv buffer).
        self.direct = c == 1 and k == 3 and stride == 1
        if c >= winograd_min_channels:
            self.winograd = next((m for m in winograd_order if m.applies(k, stride, padding, self.oh, self.ow)), None)
        if self.winograd is not None:
            self.filters = np.array(self.winograd.filter_transform(w), copy=True)   # (tile planes, C, OC)
        elif self.direct:
            self.filters = np.array(w.reshape(oc, 9).T, order="C")                  # (9 taps, OC)
        else:
            self.filters = np.array(np.asarray(w, dtype=dtype).transpose(2, 3, 1, 0).reshape(k * k * c, oc), order="C")
        # Rows of one image in this block's matrix products: its tiles, or (im2col) its output pixels.
        # A worker thread runs the block on this many images at a time: the 24x24 map's 16 tiles of
        # 6x6 four images at a time, the 6x6 map's single tile 64 images at a time (or all it has).
        # F(6x6, 3x3) with a pool that divides 6: pooled inside the output transform (no conv buffer).
        self.pooled_transform = self.winograd is winograd6 and 6 % pool == 0
        rows = self.oh * self.ow if self.winograd is None else np.prod(self.winograd.tiles(self.oh, self.ow))
        self.images_per_product = 8 if self.direct else max(1, -(-gemm_rows // int(rows)))

    def conv(self, x, y, parallel):
        """y (N, OH, OW, OC) = conv of channels-last x (N, H, W, C), no bias."""
        if self.winograd is not None:
            return self.winograd.conv3x3(x, self.filters, self.padding, y)
        n = x.shape[0]
        col = np.empty((n * self.oh * self.ow, self.k * self.k * self.c), x.dtype)
        parallel = parallel and col.size >= PARALLEL_MIN_VALUES
        (cpu.im2col_nhwc if parallel else cpu.im2col_nhwc_serial)(x, self.k, self.stride, self.padding,
                                                                   self.oh, self.ow, col)
        np.matmul(col, self.filters, out=y.reshape(-1, self.oc))
        return y

    def run(self, x, y, out, parallel):
        if self.direct:
            n, h, wd, _ = x.shape
            p = self.padding
            xp = np.zeros((n, h + 2 * p, wd + 2 * p), x.dtype)
            xp[:, p:p + h, p:p + wd] = x[..., 0]
            parallel = parallel and out.size >= PARALLEL_MIN_VALUES
            return (cpu.grey_conv3x3_pool_bias_relu if parallel else cpu.grey_conv3x3_pool_bias_relu_serial)(
                xp, self.filters, self.bias, self.pool, out)
        if self.pooled_transform:
            return winograd6.conv3x3_pool_bias_relu(x, self.filters, self.padding, self.bias, self.pool, out)
        self.conv(x, y, parallel)
        parallel = parallel and y.size >= PARALLEL_MIN_VALUES
        (cpu.pool_bias_relu if parallel else cpu.pool_bias_relu_serial)(y, self.bias, self.pool, out)
        return out


class _Linear:
    def __init__(self, w, b, relu, dtype):
        w = np.asarray(w, dtype=dtype)
        self.wt = np.array(w.T, order="C")                  # (in, out), a copy
        self.bias = np.zeros(w.shape[0], dtype) if b is None else np.array(b, dtype=dtype)
        self.relu = relu


class CpuInference:
    # Chunk the batch over threads (a thread takes whole images through all blocks) from this many
    # images per thread; below it, split within images. EmotionClassifier, 2 cores: see the bench.
    CHUNKED_MIN_IMAGES_PER_THREAD = 4
    # Up to this many images, one thread does everything (see the module's note): on 2 cores every
    # batch is then serial or chunked.
    SERIAL_MAX_IMAGES = 2 * CHUNKED_MIN_IMAGES_PER_THREAD - 1
    # On that route each block takes a thread's images in sub-chunks that give its matrix products
    # about this many rows (tiles): enough for the BLAS to run near its peak, few enough that the
    # transformed tiles stay in cache (see _Conv.images_per_product).
    GEMM_ROWS = 64
    WINOGRAD_MIN_CHANNELS = 16
    # The first of these that applies to a conv's output size: F(6x6, 3x3) on maps of 6x6 tiles,
    # else F(4x4, 3x3) on maps of 4x4 tiles, else F(2x2, 3x3). EmotionClassifier, batch 64, 2 cores,
    # medians of 61 interleaved runs: F(6x6) on its 24, 12 and 6 maps 15.8 ms; F(4x4) on 24 and 12
    # and F(6x6) on 6: 16.4 ms; F(4x4) and F(2x2) on 6: 17.5 ms.
    WINOGRAD_ORDER = (winograd6, winograd4, winograd)

    def __init__(self, plan, input_shape, dtype):
        self.dtype = np.dtype(dtype)
        self.input_shape = tuple(input_shape)
        self.convs, self.linears = walk_inference_plan(
            plan, self.input_shape,
            lambda *conv: _Conv(*conv, self.dtype, self.WINOGRAD_MIN_CHANNELS, self.WINOGRAD_ORDER, self.GEMM_ROWS),
            lambda w, b, relu: _Linear(w, b, relu, self.dtype))
        self._buffers = {}

    def _buffers_for(self, n):
        bufs = self._buffers.get(n)
        if bufs is None:
            bufs = {"convs": [(None if b.direct or b.pooled_transform else np.empty((n, b.oh, b.ow, b.oc), self.dtype),
                               np.empty((n, b.ph, b.pw, b.oc), self.dtype)) for b in self.convs],
                    "linears": [np.empty((n, lin.wt.shape[1]), self.dtype) for lin in self.linears]}
            if len(self._buffers) >= 8:              # (a few batch sizes at most)
                self._buffers.pop(next(iter(self._buffers)))
            self._buffers[n] = bufs
        return bufs

    def _features(self, x, lo, hi, bufs, parallel):
        """Images lo..hi through every conv block: all at once (parallel kernels), or, on a worker
        thread, each block in sub-chunks of its own size (:attr:`_Conv.images_per_product`)."""
        h = x
        for block, (y, out) in zip(self.convs, bufs["convs"]):
            step = hi - lo if parallel else block.images_per_product
            for a in range(lo, hi, step):
                b = min(hi, a + step)
                block.run(h[a:b], None if y is None else y[a:b], out[a:b], parallel)
            h = out
        return h

    def _classify(self, features, lo, hi, bufs):
        """Rows lo..hi of the Linear layers, from the last block's channels-last output."""
        h = features[lo:hi].reshape(hi - lo, -1)
        for lin, out in zip(self.linears, bufs["linears"]):
            np.matmul(h, lin.wt, out=out[lo:hi])
            out[lo:hi] += lin.bias
            if lin.relu:
                np.maximum(out[lo:hi], 0, out=out[lo:hi])   # (a NaN stays NaN)
            h = out[lo:hi]

    def route_for(self, n):
        """How a batch of ``n`` images uses the cores: "serial" (the calling thread alone), "chunked"
        (each thread its share of the images through every block) or "within" (each kernel split
        within the images)."""
        if not threads.available():
            return "within"
        if n <= self.SERIAL_MAX_IMAGES:
            return "serial"
        k = threads.workers()
        return "chunked" if k > 1 and n >= self.CHUNKED_MIN_IMAGES_PER_THREAD * k else "within"

    def run(self, x):
        """Logits (N, classes) for x (N, C, H, W) of the session's dtype (checked by the session)."""
        n = x.shape[0]
        bufs = self._buffers_for(n)
        x_nhwc = x.reshape(n, *self.input_shape[1:], 1) if self.input_shape[0] == 1 else cpu.nhwc(x)
        x_nhwc = np.ascontiguousarray(x_nhwc)
        if n == 0:
            return np.empty((0, self.linears[-1].wt.shape[1]), self.dtype)
        route = self.route_for(n)
        if route == "serial":
            with threads.one_blas_thread():
                self._classify(self._features(x_nhwc, 0, n, bufs, False), 0, n, bufs)
        elif route == "chunked":
            # Each thread takes its rows through the classifier too: no BLAS threads at all, which
            # on a machine idle for a moment take milliseconds to wake (see the class's note).
            threads.run_chunks(lambda lo, hi: self._classify(self._features(x_nhwc, lo, hi, bufs, False),
                                                             lo, hi, bufs), n, -(-n // threads.workers()))
        else:
            self._classify(self._features(x_nhwc, 0, n, bufs, True), 0, n, bufs)
        h = bufs["linears"][-1]
        return h.copy()
