"""Where a GPU training step's time goes: each step of the EmotionClassifier's plan, forward and
backward, and the kernels inside, timed with a synchronisation around each (so the sum exceeds the
step: the GPU no longer overlaps them); the CUDA-graph step; and PyTorch CUDA's top kernels for
the same step, from its profiler.

    python -m minicnn.benchmarks.gpu_profile                    # batch 256 and 1024
    python -m minicnn.benchmarks.gpu_profile --batch-sizes 64

Needs CuPy and an NVIDIA GPU (PyTorch with CUDA for its part). ``sh benchmarks/gpu_check.sh``
runs it last and writes its output to gpu-profile.txt.
"""
import argparse
import sys
import time
import traceback
from collections import defaultdict

import minicnn  # noqa: F401
import numpy as np

from minicnn.backend import synchronize, to_device
from minicnn.engines import using as _using
from minicnn.engines.gpu import kernels as _gpu_kernels


def fast_kernels(on):
    return _using("auto" if on else "textbook")


def gpu_kernels():
    return _gpu_kernels
from minicnn.models import EmotionClassifier
from minicnn.training import train_step

KERNELS = ("im2col_nhwc", "col2im_nhwc", "batchnorm_affine", "bn_relu_pool_forward", "bn_relu_pool_grad_sums",
           "batchnorm_backward_affine", "bn_relu_pool_backward", "matmul")


def _setup(batch):
    minicnn.manual_seed(0)
    model = EmotionClassifier().to("gpu")
    crit = minicnn.nn.CrossEntropyLoss()
    opt = minicnn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = to_device(np.random.default_rng(0).standard_normal((batch, 1, 48, 48)).astype(np.float32), "gpu")
    return model, crit, opt, x, to_device(np.arange(batch) % 7, "gpu")


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        synchronize()
        t = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def stages(batch, repeats=5):
    """Print the step's median time, then each plan step's and kernel's (synchronised) median."""
    model, crit, opt, x, y = _setup(batch)
    timings, restore = defaultdict(list), []

    def timed(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            synchronize()
            t = time.perf_counter()
            result = original(*args, **kwargs)
            synchronize()
            timings[label].append(time.perf_counter() - t)
            return result
        setattr(owner, name, wrapper)
        restore.append((owner, name, original))

    with fast_kernels(True):
        for _ in range(3):
            train_step(model, crit, opt, x, y)
        step_ms = _median_ms(lambda: train_step(model, crit, opt, x, y), 2 * repeats)
        for i, seq in enumerate((model.features, model.classifier)):
            for j, layer in enumerate(seq._last_plan):
                label = f"{('features', 'classifier')[i]}.{j} {type(layer).__name__}"
                timed(layer, "forward", label + " forward")
                timed(layer, "backward", label + " backward")
        timed(opt, "step", "optimizer step")
        gpu = gpu_kernels()
        for name in KERNELS:
            timed(gpu, name, "  kernel " + name)
        try:
            synced_ms = _median_ms(lambda: train_step(model, crit, opt, x, y), repeats)
        finally:
            for owner, name, original in reversed(restore):
                setattr(owner, name, original)
    print(f"== batch {batch}: training step {step_ms:.2f} ms (median; {synced_ms:.2f} ms with a sync around "
          f"every stage below)")
    for label, ts in timings.items():
        print(f"  {label:<52} {1e3 * float(np.median(ts)):8.3f} ms  x{len(ts) // repeats}")


def graph_step(batch, repeats=20):
    from minicnn.engines.gpu.graph import CudaGraphStep
    gpu = gpu_kernels()
    print(f"== CUDA graph, batch {batch}: CuPy captures cuBLAS: {gpu.cupy_captures_cublas()}; "
          f"products capturable (CuPy or cuBLAS called directly): {gpu.cublas_capturable()}")
    if not gpu.cublas_capturable():
        return
    model, crit, opt, x, y = _setup(batch)
    step = CudaGraphStep(model, crit, opt)
    for _ in range(4):
        step(x, y)
    eager = _median_ms(lambda: step.eager(x, y), repeats)
    replay = _median_ms(lambda: step(x, y), repeats)
    print(f"  eager step {eager:.2f} ms, graph replay {replay:.2f} ms ({step.replays} replays)")


def torch_kernels(batch, rows=25):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from minicnn.benchmarks.run import TorchBackend
    backend = TorchBackend("torch-cuda", "cuda", channels_last=False)     # (the benchmark's PyTorch step)
    backend.setup()
    step, _ = backend.prepare(batch)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"== PyTorch CUDA, batch {batch}, 5 training steps (cuDNN TF32: {torch.backends.cudnn.allow_tf32})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minicnn.benchmarks.gpu_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    args = p.parse_args(argv)
    if not minicnn.gpu_available():
        print("gpu_profile: no GPU (CuPy with an NVIDIA GPU is needed)", file=sys.stderr)
        return 2
    failed = False
    for part, batch in ([(stages, b) for b in args.batch_sizes] + [(graph_step, b) for b in (64, 256)]
                        + [(torch_kernels, args.batch_sizes[0])]):
        try:                          # (each part on its own: one failing does not hide the others)
            part(batch)
        except Exception:
            traceback.print_exc()
            failed = True
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
