"""minicnn against PyTorch, side by side, taking turns.

    minicnn bench                        # full run: batch 64 and 128, layers too (a few minutes)
    minicnn bench --quick                # under a minute
    minicnn bench --batch-sizes 64 256 1024 --repeats 20
    minicnn bench --gpu                  # the GPU comparison: batch 64, 256, 1024 (see README)

(``python -m minicnn.benchmarks`` is the same; so is ``python -m benchmarks`` in a source checkout.)

Times the EmotionClassifier's training step (forward, loss, backward, SGD
momentum update), inference (eval-mode forward) and the latency of one image at a
time (batch 1: median and 99th percentile of 300 calls) for every backend that is
available: minicnn's textbook layers (minicnn-plain), its CPU engine (minicnn-fast), its
InferenceSession (minicnn-session: inference only), onnxruntime running minicnn's ONNX export
(onnxruntime-cpu: inference only), on a GPU its
textbook layers, its GPU engine and its CUDA-graph step (each with float32 products, and with TF32 as
PyTorch's cuDNN convolutions use by default), PyTorch CPU (NCHW and channels_last)
and PyTorch CUDA (eager: its default, TF32 convolutions, and torch-cuda-fp32 without).
The GPU rows also give their ratio to both PyTorch CUDA rows and the time one
FER2013 epoch (28,709 images) would take at their rate. Each backend runs in a worker
process of its own (as its users run it: no shared thread pools), and the
workers take turns, one timed step each (after one untimed step of the same job:
a step as in training, where steps run back to back; ``--cold`` times the first
step after the wait instead), so drift in the machine's speed hits all
alike; the table quotes medians after warm-up, ratios to PyTorch, and the
fraction of the GEMM bound (the step's FLOPs at the sgemm rate measured in the same run). Writes
``benchmark-<date>.json``, ``latest.json`` and a PNG chart to benchmarks/results in a source
checkout, else to ./minicnn-benchmarks (``--out`` to choose).
"""
import os

# Before NumPy loads (see minicnn/__init__.py): keep OpenBLAS threads from spinning.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from minicnn.backend import gpu_available, gpu_module, synchronize, to_device  # noqa: E402
from minicnn.engines import using as _using  # noqa: E402


def fast_kernels(on):
    """The engines (on) or the textbook layers (off)."""
    return _using("auto" if on else "textbook")
from minicnn.models import EmotionClassifier  # noqa: E402

_CHECKOUT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "results")
RESULTS = (os.path.normpath(_CHECKOUT_RESULTS) if os.path.isdir(_CHECKOUT_RESULTS)
           else os.path.join(os.getcwd(), "minicnn-benchmarks"))
FER2013_TRAIN = 28709          # images in FER2013's Training split: one epoch
GPU_BACKENDS = ["minicnn-cupy-plain", "minicnn-cupy", "minicnn-cupy-tf32", "minicnn-cupy-graph",
                "minicnn-cupy-graph-tf32", "minicnn-cupy-session", "minicnn-cupy-session-tf32", "torch-cuda",
                "torch-cuda-fp32", "minicnn-fast", "torch-cpu-cl"]

# Multiply-accumulates per image of the forward pass, layer by layer.
_FWD_MACS = {
    "conv1": 48 * 48 * 32 * 9 * 1, "conv2": 24 * 24 * 64 * 9 * 32, "conv3": 12 * 12 * 128 * 9 * 64,
    "conv4": 6 * 6 * 256 * 9 * 128, "fc1": 2304 * 512, "fc2": 512 * 7,
}
FORWARD_FLOP = 2 * sum(_FWD_MACS.values())
# Backward: dW costs as much as the forward; dX too, except for the first layer (not needed).
TRAIN_FLOP = 3 * FORWARD_FLOP - 2 * 2 * _FWD_MACS["conv1"]


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# --- backends ----------------------------------------------------------------------------

# Each layer of the network at its input's (channels, height and width): (channels, size, factory).
LAYERS = {
    "conv1": (1, 48, lambda m: m.Conv2d(1, 32, 3, 1, 1)),
    "bn1": (32, 48, lambda m: m.BatchNorm2d(32)),
    "relu1": (32, 48, lambda m: m.ReLU()),
    "pool1": (32, 48, lambda m: m.MaxPool2d(2)),
    "conv2": (32, 24, lambda m: m.Conv2d(32, 64, 3, 1, 1)),
    "conv3": (64, 12, lambda m: m.Conv2d(64, 128, 3, 1, 1)),
    "conv4": (128, 6, lambda m: m.Conv2d(128, 256, 3, 1, 1)),
    "fc1": (2304, None, lambda m: m.Linear(2304, 512)),
}


def _layer_input(lname, batch):
    c, hw, _ = LAYERS[lname]
    shape = (batch, c) if hw is None else (batch, c, hw, hw)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


class Backend:
    """A way to run the network, inside a benchmark worker process: ``prepare(batch)`` returns
    (train_step, infer) callables; ``layer_jobs(layer, batch)`` {job name: callable}."""
    name = "?"

    def available(self):
        return True

    def setup(self):
        pass

    def info(self):
        return {}

    def sync(self):
        pass

    def layer_jobs(self, lname, batch):
        return {}


class MinicnnBackend(Backend):
    def __init__(self, name, device, fast, graph=False, tf32=False, session=False):
        self.name, self.device, self.fast, self.graph, self.tf32 = name, device, fast, graph, tf32
        self.session = session           # inference only, through model.compile_inference()

    def available(self):
        if self.device == "cpu":
            return True
        if not gpu_available():
            return False
        from minicnn.engines.gpu import kernels as gpu
        return not self.graph or gpu.cublas_capturable()     # (products by CuPy or cuBLAS called directly)

    def setup(self):
        if self.tf32:            # CuPy reads it at its first float32 matrix product (this worker's own)
            os.environ["CUPY_TF32"] = "1"

    def info(self):
        if self.device != "gpu":
            return {}
        from minicnn.engines.gpu import kernels as gpu
        cupy = gpu_module()
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return dict(cupy=cupy.__version__, gpu_name=name.decode() if isinstance(name, bytes) else str(name),
                    cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(), **{f"tf32_{self.name}": gpu.tf32_enabled()})

    def sync(self):
        synchronize()

    def prepare(self, batch, seed=0):
        minicnn.manual_seed(seed)
        model = EmotionClassifier().to(self.device)
        crit = minicnn.nn.CrossEntropyLoss()
        opt = minicnn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        rng = np.random.default_rng(seed)
        x = to_device(rng.standard_normal((batch, 1, 48, 48)).astype(np.float32), self.device)
        y = rng.integers(0, 7, batch)
        if self.graph:
            from minicnn.engines.gpu.graph import CudaGraphStep
            step = CudaGraphStep(model, crit, opt)
            y = to_device(y, "gpu")

        def train_step():
            if self.graph:
                with fast_kernels(True):
                    model.train()
                    return step(x, y)
            with fast_kernels(self.fast):
                model.train()
                logits = model(x)
                loss_fn = minicnn.engines.loss_step(crit, logits)
                loss_fn.forward(logits, y)
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
                opt.zero_grad()

        def infer():                # as PyTorch's, under no_grad: nothing kept for backward
            with fast_kernels(self.fast), minicnn.no_grad():
                model.eval()
                return model(x)

        if self.session:
            session = model.eval().compile_inference()
            return None, lambda: session.run(x)
        return train_step, infer

    def layer_jobs(self, lname, batch):
        if self.device != "cpu":
            return {}
        from minicnn import nn
        # (in a Sequential, so that the engine's step for the layer runs)
        layer, x = nn.Sequential(LAYERS[lname][2](nn)), _layer_input(lname, batch)
        if self.fast and x.ndim == 4:             # hand the layer channels-last memory, as in the model
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        fast = self.fast

        def fwd():
            with fast_kernels(fast):
                return layer(x)
        g = np.ones_like(fwd())

        def fwd_bwd():                      # (a backward needs its own forward pass, as in PyTorch)
            with fast_kernels(fast):
                layer(x)
                layer.backward(g)
        return {"forward": fwd, "forward+backward": fwd_bwd}


class TorchBackend(Backend):
    def __init__(self, name, device, channels_last, tf32_convs=True):
        self.name, self.device, self.channels_last = name, device, channels_last
        self.tf32_convs = tf32_convs           # PyTorch's default: cuDNN convolutions may use TF32

    def available(self):
        torch = _torch()
        return torch is not None and (self.device == "cpu" or torch.cuda.is_available())

    def sync(self):
        if self.device == "cuda":
            _torch().cuda.synchronize()

    def setup(self):
        torch = _torch()
        torch.set_num_threads(os.cpu_count() or 1)
        torch.backends.cudnn.allow_tf32 = self.tf32_convs

    def info(self):
        torch = _torch()
        info = dict(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if self.device == "cuda":
            info.update(gpu=torch.cuda.get_device_name(0), **{
                f"tf32_matmul_{self.name}": torch.backends.cuda.matmul.allow_tf32,
                f"tf32_cudnn_{self.name}": torch.backends.cudnn.allow_tf32})
        return info

    def layer_jobs(self, lname, batch):
        if self.device != "cpu":
            return {}
        torch = _torch()
        layer, x = LAYERS[lname][2](torch.nn), torch.from_numpy(_layer_input(lname, batch))
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            layer = layer.to(memory_format=torch.channels_last)
        x.requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return layer(x)

        def fwd_bwd():                        # forward with autograd, then backward
            out = layer(x)
            out.backward(torch.ones_like(out))
        return {"forward": fwd, "forward+backward": fwd_bwd}

    def prepare(self, batch, seed=0):
        torch = _torch()
        from minicnn.models.torch_twin import torch_emotion_classifier
        torch.manual_seed(seed)
        model = torch_emotion_classifier().to(self.device)
        x = torch.randn(batch, 1, 48, 48, device=self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 7, (batch,), device=self.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def train_step():
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        def infer():
            model.eval()
            with torch.no_grad():
                return model(x)

        return train_step, infer


class OnnxRuntimeBackend(Backend):
    """The same network exported by minicnn (minicnn.onnx_export), run by onnxruntime: inference only."""
    name = "onnxruntime-cpu"

    def available(self):
        from minicnn.extras import available
        return available("onnx") and available("onnxruntime")

    def info(self):
        import onnxruntime
        return {"onnxruntime": onnxruntime.__version__}

    def prepare(self, batch, seed=0):
        import onnxruntime
        from minicnn.onnx_export import to_onnx
        minicnn.manual_seed(seed)
        model = EmotionClassifier().eval()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        from minicnn.data import EMOTIONS
        graph = to_onnx(model, EMOTIONS, 0.5, 0.25)
        sess = onnxruntime.InferenceSession(graph.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        x = np.random.default_rng(seed).standard_normal((batch, 1, 48, 48)).astype(np.float32)
        name = sess.get_inputs()[0].name
        return None, lambda: sess.run(None, {name: x})


def all_backends():
    return [
        MinicnnBackend("minicnn-plain", "cpu", fast=False),
        MinicnnBackend("minicnn-fast", "cpu", fast=True),
        MinicnnBackend("minicnn-session", "cpu", fast=True, session=True),
        MinicnnBackend("minicnn-cupy-plain", "gpu", fast=False),
        MinicnnBackend("minicnn-cupy", "gpu", fast=True),
        MinicnnBackend("minicnn-cupy-tf32", "gpu", fast=True, tf32=True),
        MinicnnBackend("minicnn-cupy-graph", "gpu", fast=True, graph=True),
        MinicnnBackend("minicnn-cupy-graph-tf32", "gpu", fast=True, graph=True, tf32=True),
        MinicnnBackend("minicnn-cupy-session", "gpu", fast=True, session=True),
        MinicnnBackend("minicnn-cupy-session-tf32", "gpu", fast=True, session=True, tf32=True),
        TorchBackend("torch-cpu", "cpu", channels_last=False),
        TorchBackend("torch-cpu-cl", "cpu", channels_last=True),
        TorchBackend("torch-cuda", "cuda", channels_last=False),
        TorchBackend("torch-cuda-fp32", "cuda", channels_last=False, tf32_convs=False),
        OnnxRuntimeBackend(),
    ]


# --- measuring ---------------------------------------------------------------------------

def sgemm_rate(n=2048, repeats=5):
    """float32 GEMM rate of NumPy's BLAS on this machine, GFLOP/s (median)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(times)) / 1e9


class Workers:
    """One worker process per backend, each timing its own jobs when the parent asks.

    Each library runs in a process of its own, as its users run it: PyTorch's
    OpenMP threads and minicnn's (numba's) would otherwise share one runtime and
    its spin/sleep policy, and whichever library set it first would slow the
    other. The parent still interleaves them -- one job of each backend in turn,
    round after round -- and the others wait idle on their pipes meanwhile, so
    drift in the machine's speed hits all alike.
    """

    def __init__(self, names):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs, self.failed = {}, [], {}
        for name in names:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, name), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.conns[name] = parent
        try:
            self.available = [n for n in names if self.ask(n, "hello")]
        except BaseException:
            for proc in self.procs:
                proc.terminate()
            raise
        for n in set(names) - set(self.available):
            self.ask(n, "stop")

    # A pause before each timed turn: thread pools spin for a while after a call before they sleep
    # (onnxruntime's intra-op threads, OpenMP's), and a backend timed right after one of them would
    # share the cores with its spinning threads (EmotionClassifier batch 64 on 2 cores: the session
    # took 21 ms after onnxruntime's turn, 13 ms after minicnn's).
    SETTLE_S = 0.05

    def ask(self, name, *msg):
        conn = self.conns[name]
        if msg[0] == "run":
            time.sleep(self.SETTLE_S)
        try:
            conn.send(msg)
            if msg[0] == "stop":
                return None
            kind, value = conn.recv()
        except (EOFError, OSError):
            proc = self.procs[list(self.conns).index(name)]
            proc.join(timeout=5)
            raise RuntimeError(f"benchmark worker {name!r} died (exit code {proc.exitcode}) "
                               f"while asked {msg[0]!r}") from None
        if kind == "error":
            raise RuntimeError(f"benchmark worker {name!r} failed:\n{value}")
        return value

    def ask_or_drop(self, name, *msg):
        """:meth:`ask`, but a backend that fails (or whose worker dies) once the run is under way is
        dropped from it, its error kept in ``failed`` and reported, and None returned: one broken
        backend does not lose the others' numbers."""
        try:
            return self.ask(name, *msg)
        except RuntimeError as exc:
            self.available.remove(name)
            self.failed[name] = str(exc)
            print(f"benchmark: dropped {name}: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
            return None

    def close(self):
        for n in self.available:
            try:
                self.ask(n, "stop")
            except (OSError, EOFError):
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _worker(conn, name):
    """A worker process: prepares jobs for one backend and times them on request."""
    import traceback
    backend = next((b for b in all_backends() if b.name == name), None)
    jobs = {}
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                return
            if backend is None:
                raise ValueError(f"unknown backend {name!r}; known: {', '.join(b.name for b in all_backends())}")
            if msg[0] == "hello":
                ok = backend.available()
                if ok:
                    backend.setup()
                reply = ok
            elif msg[0] == "info":
                reply = backend.info()
            elif msg[0] == "model":
                train, infer = backend.prepare(msg[1])
                jobs = {k: v for k, v in (("train", train), ("infer", infer)) if v is not None}
                reply = list(jobs)
            elif msg[0] == "layer":
                jobs = backend.layer_jobs(msg[1], msg[2])
                reply = list(jobs)
            elif msg[0] == "run":                    # ("run", job, timed runs[, untimed runs first])
                fn, times = jobs[msg[1]], []
                for _ in range(msg[3] if len(msg) > 3 else 0):
                    fn()
                for _ in range(msg[2]):
                    backend.sync()
                    t0 = time.perf_counter()
                    fn()
                    backend.sync()
                    times.append(time.perf_counter() - t0)
                reply = times
            else:
                raise ValueError(f"unknown request {msg!r}")
            conn.send(("ok", reply))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def time_interleaved(workers, jobs, warmup, repeats, steady=True):
    """jobs: {backend: [job names]} prepared in ``workers``; each job runs ``warmup`` times, then
    once per round, backends and jobs in turn; returns {(backend, job): [seconds]}.

    ``steady``: each timed run follows one untimed run of the same job, so it is a step as in
    training, where steps run back to back. A worker has sat idle while the others ran (about a
    second per round), and on the 2-core test machine (a virtual machine: idle cores are halted,
    and waking a thread on one is slow) the first step after such a pause ran 10-40% slower, for
    both libraries: training at batch 64 after 0.5 s asleep, 118 ms against 86 back to back
    (minicnn, whose step hands work between threads a few hundred times) and 110 against 94-101
    (PyTorch). False: time that first step (``--cold``)."""
    times = {(name, job): [] for name, names in jobs.items() for job in names}
    for name, names in jobs.items():
        for job in names:
            if name in workers.available:
                workers.ask_or_drop(name, "run", job, warmup)
    for _ in range(repeats):
        for name, names in jobs.items():
            for job in names:
                if name in workers.available:
                    times[(name, job)] += workers.ask_or_drop(name, "run", job, 1, 1 if steady else 0) or []
    return {key: ts for key, ts in times.items() if key[0] in workers.available}


def _rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _number_from_fresh_process(code):
    """Run ``code`` in a new Python process at the repository root; the number it prints last, or None."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def peak_memory_mb(backend_name, batch, steps=3):
    """Peak resident memory (MB) of training at ``batch``, in a fresh process: the highest RSS
    during steady-state steps minus the RSS before the model was built (so it counts the weights,
    optimizer state, the batch, work buffers and the step's activations and gradients). Linux only."""
    code = (f"import gc, benchmarks.run as r\n"
            f"b = [b for b in r.all_backends() if b.name == {backend_name!r}][0]\n"
            f"r._torch() if b.name.startswith('torch') else __import__('minicnn.engines.cpu.kernels')\n"
            f"gc.collect(); base = r._rss_kb('VmRSS')\n"
            f"step, _ = b.prepare({batch})\n"
            f"step()\n"                                   # warm-up: compile, allocate buffers
            f"open('/proc/self/clear_refs', 'w').write('5')\n"   # reset the peak (VmHWM)
            f"for _ in range({steps}): step()\n"
            f"print((r._rss_kb('VmHWM') - base) / 1024)\n")
    return _number_from_fresh_process(code)


def cold_start_seconds():
    """Seconds for a fresh process to import minicnn and run its first fast training step (numba cache warm)."""
    code = ("import time; t = time.perf_counter()\n"
            "import minicnn.benchmarks.run as r\n"
            "step, _ = [b for b in r.all_backends() if b.name == 'minicnn-fast'][0].prepare(8)\n"
            "step(); print(time.perf_counter() - t)\n")
    return _number_from_fresh_process(code)


def layer_benchmarks(workers, batch, warmup, repeats, steady=True):
    """Forward and backward of each layer of the network at its real input shape."""
    rows = []
    for lname in LAYERS:
        jobs = {name: workers.ask_or_drop(name, "layer", lname, batch) for name in list(workers.available)}
        jobs = {name: names for name, names in jobs.items() if names}
        times = time_interleaved(workers, jobs, warmup, repeats, steady)
        for (bname, what), ts in times.items():
            rows.append(dict(layer=lname, backend=bname, what=what, batch=batch,
                             median_ms=1e3 * float(np.median(ts))))
    return rows


# --- reporting -----------------------------------------------------------------------------

def format_table(results, gemm):
    def ratio(v):
        return f"{v:.2f}x" if v else "-"

    gpu = any(r.get("ratio_torch_cuda") for r in results)
    fp32 = any(r.get("ratio_torch_cuda_fp32") for r in results)
    lines = [f"{'batch':>5}  {'what':<7} {'backend':<24}{'median ms':>10}{'p99 ms':>8}{'images/s':>10}"
             f"{'vs torch':>10}{'vs torch-cl':>12}{'GEMM bound':>11}"
             + (f"{'vs torch-cuda':>14}" if gpu else "") + (f"{'vs torch-cuda-fp32':>19}" if fp32 else "")
             + (f"{'FER epoch':>10}" if gpu else "")]
    for r in results:
        frac = f"{r['gemm_frac']:.0%}" if r.get("gemm_frac") else "-"
        epoch = f"{FER2013_TRAIN / r['images_per_s']:.1f} s" if r["what"] == "train" else "-"
        p99 = f"{r['p99_ms']:.2f}" if r.get("p99_ms") else "-"
        lines.append(f"{r['batch']:>5}  {r['what']:<7} {r['backend']:<24}{r['median_ms']:>10.2f}{p99:>8}"
                     f"{r['images_per_s']:>10.0f}{ratio(r.get('ratio_torch_cpu')):>10}"
                     f"{ratio(r.get('ratio_torch_cpu_cl')):>12}{frac:>11}"
                     + (f"{ratio(r.get('ratio_torch_cuda')):>14}" if gpu else "")
                     + (f"{ratio(r.get('ratio_torch_cuda_fp32')):>19}" if fp32 else "")
                     + (f"{epoch:>10}" if gpu else ""))
    lines.append(f"(latency = one image per call, {max([r['repeats'] for r in results if r['what'] == 'latency'] or [0])}"
                 f" calls; ratio = median time / PyTorch's median time in the same run: below 1 is faster;"
                 f" GEMM bound = time the step's FLOPs take at the sgemm rate measured in this run,"
                 f" {gemm:.0f} GFLOP/s, over the step's time"
                 + ("; FER epoch = 28,709 training images at that rate)" if gpu else ")"))
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    whats = ["train", "infer"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, what in zip(axes, whats):
        rows = [r for r in results if r["what"] == what]
        batches = sorted({r["batch"] for r in rows})
        names = list(dict.fromkeys(r["backend"] for r in rows))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            vals = [next((r["images_per_s"] for r in rows if r["backend"] == name and r["batch"] == b), 0)
                    for b in batches]
            ax.bar(np.arange(len(batches)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(batches)) + width * (len(names) - 1) / 2, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"EmotionClassifier {'training step' if what == 'train' else 'inference'}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_info(workers):
    info = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
                numpy=np.__version__, minicnn=minicnn.__version__)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    for name in list(workers.available):
        info.update(workers.ask_or_drop(name, "info") or {})
    return info


def run(batch_sizes=(64, 128), repeats=15, warmup=3, layers=True, memory=True, backends=None, out=RESULTS,
        chart=True, prefix="", steady=True, latency=True):
    """Run the suite; ``backends``: names or Backend objects (default: all that are available);
    files are written as ``<prefix>latest.json`` etc."""
    names = [getattr(b, "name", b) for b in (backends or all_backends())]
    with Workers(names) as workers:
        report = _run(workers, batch_sizes, repeats, warmup, layers, steady, latency)
        report["machine"] = machine_info(workers)
        if workers.failed:
            report["failed"] = workers.failed
    if memory:
        report["peak_memory_mb"] = {name: peak_memory_mb(name, batch_sizes[0])
                                    for name in ("minicnn-fast", "minicnn-plain", "torch-cpu", "torch-cpu-cl")
                                    if name in workers.available}
        report["peak_memory_batch"] = batch_sizes[0]
        report["cold_start_s"] = cold_start_seconds()
    if out:
        os.makedirs(out, exist_ok=True)
        stamp = datetime.date.today().isoformat()
        for name in (f"{prefix or 'benchmark-'}{stamp}.json", f"{prefix}latest.json"):
            with open(os.path.join(out, name), "w") as f:
                json.dump(report, f, indent=1)
        if chart:
            plot(report["results"], os.path.join(out, f"{prefix}latest.png"))
    return report


def add_ratios(results, gemm):
    """Each row's ratios to the PyTorch rows of the same step and batch: CPU rows to torch-cpu and
    torch-cpu-cl, GPU rows to torch-cuda (PyTorch's default: TF32 convolutions) and torch-cuda-fp32;
    and each CPU row's fraction of the GEMM bound (``gemm``: the measured sgemm rate, GFLOP/s)."""
    for r in results:
        for ref, key in (("torch-cpu", "ratio_torch_cpu"), ("torch-cpu-cl", "ratio_torch_cpu_cl")):
            other = next((o for o in results if o["backend"] == ref and o["what"] == r["what"]
                          and o["batch"] == r["batch"]), None)
            if other and "cupy" not in r["backend"] and "cuda" not in r["backend"]:
                r[key] = r["median_ms"] / other["median_ms"]
        for ref, key in (("torch-cuda", "ratio_torch_cuda"), ("torch-cuda-fp32", "ratio_torch_cuda_fp32")):
            other = next((o for o in results if o["backend"] == ref and o["what"] == r["what"]
                          and o["batch"] == r["batch"]), None)
            if other and "cupy" in r["backend"]:
                r[key] = r["median_ms"] / other["median_ms"]
        if "cupy" not in r["backend"] and "cuda" not in r["backend"]:
            r["gemm_frac"] = r["flop"] / (gemm * 1e9) / (r["median_ms"] / 1e3)


def latency_rows(workers, rounds=15, calls=20, warmup=20):
    """Batch-1 inference latency: ``rounds`` rounds in which every backend makes ``calls`` calls back
    to back (each timed on its own), backends taking turns; rows with the median and the 99th
    percentile of all calls."""
    jobs = {name: workers.ask_or_drop(name, "model", 1) for name in list(workers.available)}
    jobs = {name: ["infer"] for name, names in jobs.items() if names and "infer" in names}
    times = {name: [] for name in jobs}
    for name in jobs:
        workers.ask_or_drop(name, "run", "infer", warmup)
    for _ in range(rounds):
        for name in jobs:
            if name in workers.available:
                times[name] += workers.ask_or_drop(name, "run", "infer", calls, 1) or []
    rows = []
    for name, ts in times.items():
        if ts and name in workers.available:
            med = float(np.median(ts))
            rows.append(dict(backend=name, what="latency", batch=1, median_ms=1e3 * med,
                             p99_ms=1e3 * float(np.percentile(ts, 99)), images_per_s=1 / med, repeats=len(ts),
                             flop=FORWARD_FLOP))
    return rows


def _run(workers, batch_sizes, repeats, warmup, layers, steady=True, latency=True):
    gemm_before = sgemm_rate()
    results = []
    if latency:          # True, or (rounds, calls per round)
        results += latency_rows(workers, *(latency if isinstance(latency, tuple) else ()))
        print("batch 1 latency: done", file=sys.stderr)
    for batch in batch_sizes:
        jobs = {name: workers.ask_or_drop(name, "model", batch) for name in list(workers.available)}
        jobs = {name: names for name, names in jobs.items() if names}
        times = time_interleaved(workers, jobs, warmup, repeats, steady)
        for (name, what), ts in times.items():
            med = float(np.median(ts))
            results.append(dict(backend=name, what=what, batch=batch, median_ms=1e3 * med,
                                images_per_s=batch / med, repeats=repeats,
                                flop=(TRAIN_FLOP if what == "train" else FORWARD_FLOP) * batch))
        print(f"batch {batch}: done", file=sys.stderr)
    gemm = (gemm_before + sgemm_rate()) / 2
    add_ratios(results, gemm)
    report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                  command="python -m benchmarks " + " ".join(sys.argv[1:]),
                  sgemm_gflops=gemm, train_flop_per_image=TRAIN_FLOP, forward_flop_per_image=FORWARD_FLOP,
                  steady=steady, results=results)
    if layers:
        report["layers"] = layer_benchmarks(workers, batch_sizes[0], warmup, repeats, steady)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="minicnn bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 64 only, fewer repeats, no layers/memory")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU comparison: " + ", ".join(GPU_BACKENDS) + " at batch 64, 256 and 1024, no layers/memory")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=None,
                   help="names to run (default: all available): " + ", ".join(b.name for b in all_backends()))
    p.add_argument("--no-layers", action="store_true")
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency rows")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--cold", action="store_true",
                   help="time each backend's first step after its idle wait (default: a steady step, one "
                        "untimed step of the same job before each timed one; see time_interleaved)")
    p.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG (default: benchmarks/results in a source checkout, "
                                            "else ./minicnn-benchmarks)")
    args = p.parse_args(argv)
    batches = args.batch_sizes or ([64] if args.quick else [64, 256, 1024] if args.gpu else [64, 128])
    repeats = args.repeats or (5 if args.quick else 15)
    backends = all_backends()
    if args.gpu and not args.backends:
        args.backends = GPU_BACKENDS
    if args.backends:
        unknown = set(args.backends) - {b.name for b in backends}
        if unknown:
            p.error(f"unknown backends: {', '.join(sorted(unknown))}")
        backends = [b for b in backends if b.name in args.backends]
    light = args.quick or args.gpu
    report = run(batches, repeats, args.warmup, layers=not (light or args.no_layers),
                 memory=not (light or args.no_memory), backends=backends, out=args.out,
                 prefix="gpu-" if args.gpu else "", steady=not args.cold, latency=not args.no_latency)
    m = report["machine"]
    print(f"minicnn {m['minicnn']} | {m.get('cpu', '?')}, {m['cpus']} cores | numpy {m['numpy']}"
          f" | torch {m.get('torch', '-')} | {report['date']}")
    print(format_table(report["results"], report["sgemm_gflops"]))
    if "layers" in report:
        print(f"\nlayers at batch {batches[0]} (median ms):")
        for r in report["layers"]:
            print(f"  {r['layer']:<6} {r['backend']:<15} {r['what']:<17} {r['median_ms']:8.2f}")
    if "peak_memory_mb" in report:
        print(f"\npeak extra memory of a training step at batch {report['peak_memory_batch']} (MB): "
              + ", ".join(f"{k} {v:.0f}" for k, v in report["peak_memory_mb"].items() if v is not None))
        print(f"cold start (fresh process: import, numba cache load, first step): {report['cold_start_s']:.1f} s")
    for name, error in report.get("failed", {}).items():
        print(f"\n{name} failed during the run and was left out:\n{error}")
    if args.out:
        prefix = "gpu-" if args.gpu else ""
        print(f"\nwrote {os.path.join(args.out, prefix + 'latest.json')} and {prefix}latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
