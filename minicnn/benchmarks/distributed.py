"""Data-parallel scaling on this machine: 1 and 2 ranks (1 thread each), and the all-reduce's share.

    minicnn bench --distributed [--ranks 1 2] [--batch-size 64] [--steps 20]

Each rank count runs as its own ``mpiexec -n N`` job, every rank held to one thread (numba, BLAS),
training the EmotionClassifier on random faces with a fixed global batch: what a step costs, how
many images per second the job trains, and how long the one all-reduce of the flat gradient
buffer (6.3 MB in float32) takes inside a step, each the median over ``--steps`` steps after
warm-up. A bare MPI_Allreduce of the same buffer is timed too. Results go to
``distributed-latest.json`` beside the other results. Needs the [distributed] extra.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

__all__ = ["run", "main", "worker"]


def worker(batch_size, steps, warmup=3):
    """Run under mpiexec: time ``steps`` data-parallel training steps; rank 0 prints one JSON line."""
    from .. import manual_seed
    from ..distributed import FlatGradients, distributed_train_step, init
    from ..models import EmotionClassifier
    from ..nn import CrossEntropyLoss
    from ..optim import SGD
    comm = init()
    manual_seed(0)
    model = EmotionClassifier()
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = CrossEntropyLoss(label_smoothing=0.1)
    grads = FlatGradients(optimizer.params, comm, extras=2)
    rng = np.random.default_rng(comm.rank)
    share = len(np.array_split(np.arange(batch_size), comm.size)[comm.rank])
    x = rng.normal(size=(share, 1, 48, 48)).astype(np.float32)
    y = rng.integers(0, 7, share)
    reduce_times = []
    reduce = comm.allreduce

    def timed_allreduce(a):
        t = time.perf_counter()
        out = reduce(a)
        if a.size == grads.buffer.size:
            reduce_times.append(time.perf_counter() - t)
        return out
    comm.allreduce = timed_allreduce
    step_times = []
    for i in range(warmup + steps):
        comm.barrier()
        t = time.perf_counter()
        distributed_train_step(model, criterion, optimizer, grads, x, y, batch_size, clip=5.0)
        step_times.append(time.perf_counter() - t)
    bare = []
    buffer = np.ones(grads.buffer.size, np.float32)
    for i in range(steps):
        comm.barrier()
        t = time.perf_counter()
        reduce(buffer)
        bare.append(time.perf_counter() - t)
    # Every rank's medians; the job's step is as slow as its slowest rank.
    mine = dict(step=float(np.median(step_times[warmup:])), allreduce=float(np.median(reduce_times[warmup:])),
                bare=float(np.median(bare)))
    everyone = comm.allgather_object(mine)
    if comm.rank == 0:
        step = max(r["step"] for r in everyone)
        print(json.dumps(dict(ranks=comm.size, batch_size=batch_size, steps=steps, ms_per_step=1e3 * step,
                              images_per_s=batch_size / step,
                              allreduce_ms=1e3 * float(np.median([r["allreduce"] for r in everyone])),
                              bare_allreduce_ms=1e3 * float(np.median([r["bare"] for r in everyone])),
                              buffer_mb=grads.nbytes / 1e6, communicator=comm.name)), flush=True)


def run(ranks=(1, 2), batch_size=64, steps=20, timeout=600):
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        from ..extras import MissingExtra
        raise MissingExtra("the distributed benchmark needs mpiexec: pip install 'minicnn[distributed]'")
    one_thread = dict(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def job(n, threads):
        env = dict(os.environ, **(one_thread if threads == 1 else {}))
        for name in one_thread if threads != 1 else ():
            env.pop(name, None)
        cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "minicnn.benchmarks.distributed", "--worker",
               "--batch-size", str(batch_size), "--steps", str(steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return dict(json.loads(lines[-1]), threads_per_rank=threads)
    rows = [job(n, 1) for n in ranks]
    threaded = job(1, cores) if cores > 1 else None          # the same machine as one process, all its cores
    base = rows[0]["images_per_s"] / rows[0]["ranks"]
    for r in rows + ([threaded] if threaded else []):
        r["speedup"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["efficiency"] = r["images_per_s"] / (base * r["ranks"])
        r["allreduce_share"] = r["allreduce_ms"] / r["ms_per_step"]
    return {"rows": rows, "one_process_all_cores": threaded, "cpu": platform.processor() or platform.machine(),
            "cores": cores, "command": f"minicnn bench --distributed --batch-size {batch_size} "
                                              f"--steps {steps} --ranks {' '.join(map(str, ranks))}"}


def format_table(result):
    lines = ["| ranks x threads | ms per step | images/s | speedup | all-reduce in the step | "
             "share of the step | bare MPI_Allreduce |", "|---|---|---|---|---|---|---|"]
    extra = [result["one_process_all_cores"]] if result.get("one_process_all_cores") else []
    for r in result["rows"] + extra:
        lines.append(f"| {r['ranks']} x {r['threads_per_rank']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | {r['speedup']:.2f}x | "
                     f"{r['allreduce_ms']:.2f} ms | {r['allreduce_share']:.1%} | {r['bare_allreduce_ms']:.2f} ms |")
    return "\n".join(lines)


def main(argv=None):
    from .run import RESULTS
    p = argparse.ArgumentParser(prog="minicnn bench --distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=64, help="the global batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.batch_size, args.steps)
        return 0
    result = run(tuple(args.ranks), args.batch_size, args.steps)
    print(f"data-parallel training, global batch {args.batch_size}, median of {args.steps} steps "
          f"({result['rows'][0]['buffer_mb']:.1f} MB gradient buffer, {result['rows'][-1]['communicator']}):")
    print(format_table(result))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed-latest.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
