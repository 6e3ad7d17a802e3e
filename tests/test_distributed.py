"""Data-parallel training (minicnn.distributed): in-process with ranks as threads (ThreadGroup, the
fake communicator), then for real under ``mpiexec -n 2`` (skipped where MPI is absent; CI installs
the [distributed] extra, so it runs there)."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from minicnn import engines
from minicnn.distributed import (DistributedTrainer, FlatGradients, SingleProcess, SyncBatchNorm2d, ThreadGroup,
                                 convert_sync_batchnorm, world_size_from_environment)
from minicnn.gradcheck import assert_gradients, check_module
from minicnn.models import EmotionClassifier
from minicnn.nn import BatchNorm2d, Parameter
from minicnn.training import Recipe, Trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def small_data(seed=0, n_train=26):
    rng = np.random.default_rng(seed)

    def split(n):
        return rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), rng.integers(0, 7, n)
    return {"train": split(n_train), "val": split(7), "test": split(5)}


def assert_same_weights(a, b, rtol=1e-10):
    """Every float array equal to rtol (with a floor of 1e-12 of the tensor's largest value, for the
    few elements that are nearly zero)."""
    for k, v in a.items():
        if v.dtype.kind == "f":
            np.testing.assert_allclose(b[k], v, rtol=rtol, atol=1e-12 * float(np.max(np.abs(v))), err_msg=k)


# --- communicators and the flat buffer ---------------------------------------------------------
def test_thread_group_collectives():
    def rank(comm):
        a = np.full(3, comm.rank + 1.0)
        comm.allreduce(a)
        b = np.arange(3.0) * (comm.rank + 1)
        comm.bcast(b, root=1)
        return a, b, comm.allgather_object(comm.rank * 10), comm.bcast_object(f"r{comm.rank}", root=2)
    for a, b, gathered, obj in ThreadGroup(3).run(rank):
        np.testing.assert_array_equal(a, [6.0, 6.0, 6.0])
        np.testing.assert_array_equal(b, np.arange(3.0) * 2)
        assert gathered == [0, 10, 20] and obj == "r2"


def test_thread_group_failure_ends_every_rank():
    def rank(comm):
        if comm.rank == 1:
            raise ValueError("rank 1 broke")
        comm.allreduce(np.zeros(2))          # would wait forever for rank 1
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="rank 1 broke"):
        ThreadGroup(2).run(rank, timeout=30)
    assert time.perf_counter() - t0 < 10


def test_flat_gradients_one_buffer_summed_over_ranks():
    shapes = [(3, 2), (4,), (2, 2, 2)]

    def rank(comm):
        params = [Parameter(np.zeros(s)) for s in shapes]
        for i, p in enumerate(params[:2]):                 # the last one has no gradient on this step
            p.grad = np.full(p.shape, (comm.rank + 1) * (i + 1.0))
        grads = FlatGradients(params, comm, extras=2)
        grads.extras[:] = (comm.rank, 1.0)
        calls = []
        comm_allreduce = comm.allreduce
        comm.allreduce = lambda a: calls.append(a.size) or comm_allreduce(a)
        grads.allreduce()
        assert calls == [6 + 4 + 8 + 2]                    # one call, one buffer
        for p, view in zip(params, grads.views):
            assert p.grad is view and np.shares_memory(p.grad, grads.buffer)
        return [p.grad.copy() for p in params], grads.extras.copy()
    for grads, extras in ThreadGroup(2).run(rank):
        np.testing.assert_array_equal(grads[0], np.full((3, 2), 1.0 + 2.0))
        np.testing.assert_array_equal(grads[1], np.full((4,), 2.0 + 4.0))
        np.testing.assert_array_equal(grads[2], np.zeros((2, 2, 2)))
        np.testing.assert_array_equal(extras, [1.0, 2.0])


def test_flat_gradients_refuses_mixed_dtypes():
    with pytest.raises(TypeError, match="several dtypes"):
        FlatGradients([Parameter(np.zeros(2, np.float32)), Parameter(np.zeros(2))], SingleProcess())


@pytest.mark.parametrize("env, size", [({}, 1), ({"PMI_SIZE": "4"}, 4), ({"OMPI_COMM_WORLD_SIZE": "2"}, 2),
                                       ({"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0"}, 8),
                                       ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, 1)])   # (sbatch's script)
def test_world_size_from_the_launchers_variables(env, size):
    assert world_size_from_environment(env) == size


# --- SyncBatchNorm2d ------------------------------------------------------------------------------
def _sync_bn_on_ranks(x, dout, sizes, momentum=0.1):
    """SyncBatchNorm2d on len(sizes) thread ranks, rank r holding sizes[r] images of x."""
    cuts = np.cumsum([0] + list(sizes))
    c = x.shape[1]
    gamma, beta = np.linspace(0.5, 1.5, c), np.linspace(-0.2, 0.3, c)

    def rank(comm):
        bn = SyncBatchNorm2d(c, comm, momentum=momentum).double()
        bn.weight.data[...], bn.bias.data[...] = gamma, beta
        part = slice(cuts[comm.rank], cuts[comm.rank + 1])
        out = bn(x[part])
        dx = bn.backward(dout[part])
        return out, dx, bn.weight.grad, bn.bias.grad, bn.running_mean.copy(), bn.running_var.copy()
    results = ThreadGroup(len(sizes)).run(rank)
    ref = BatchNorm2d(c, momentum=momentum).double()
    ref.weight.data[...], ref.bias.data[...] = gamma, beta
    return results, ref, ref(x), ref.backward(dout)


def test_sync_batchnorm_equals_batchnorm_on_the_whole_batch_uneven_ranks():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (7, 4, 3, 5))
    dout = rng.normal(size=x.shape)
    results, ref, out, dx = _sync_bn_on_ranks(x, dout, sizes=(3, 2, 2))
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), dx, rtol=1e-10, atol=1e-12)
    # The parameter gradients are each rank's share; the flat all-reduce adds them up.
    np.testing.assert_allclose(sum(r[2] for r in results), ref.weight.grad, rtol=1e-12)
    np.testing.assert_allclose(sum(r[3] for r in results), ref.bias.grad, rtol=1e-12)
    for r in results:          # the global batch's statistics, the unbiased variance, on every rank
        np.testing.assert_allclose(r[4], ref.running_mean, rtol=1e-12)
        np.testing.assert_allclose(r[5], ref.running_var, rtol=1e-12)


def test_sync_batchnorm_matches_pytorch_on_the_concatenated_batch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 3, 4, 4))
    dout = rng.normal(size=x.shape)
    results, _, _, _ = _sync_bn_on_ranks(x, dout, sizes=(4, 2))
    t = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(np.linspace(0.5, 1.5, 3)))
        t.bias.copy_(torch.from_numpy(np.linspace(-0.2, 0.3, 3)))
    xt = torch.from_numpy(x).requires_grad_()
    yt = t(xt)
    yt.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), xt.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(sum(r[2] for r in results), t.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(results[0][4], t.running_mean.numpy(), rtol=1e-10)
    np.testing.assert_allclose(results[1][5], t.running_var.numpy(), rtol=1e-10)


def test_sync_batchnorm_gradient_check():
    rng = np.random.default_rng(3)
    bn = SyncBatchNorm2d(3, SingleProcess()).double()
    bn.weight.data[...] = rng.uniform(0.5, 1.5, 3)
    assert_gradients(check_module(bn, rng.normal(size=(4, 3, 3, 3))))
    bn.eval()
    assert_gradients(check_module(bn, rng.normal(size=(2, 3, 3, 3))))


def test_sync_batchnorm_errors_and_eval_mode_needs_no_peers():
    bn = SyncBatchNorm2d(3, SingleProcess())
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, H, W\), got \(2, 4, 3, 3\)"):
        bn(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(np.zeros((1, 3, 1, 1), np.float32))

    def rank(comm):                           # eval on rank 0 only: no collective, so no hang
        sync = SyncBatchNorm2d(3, comm).eval()
        return sync(np.ones((2, 3, 2, 2), np.float32)) if comm.rank == 0 else None
    out = ThreadGroup(2).run(rank, timeout=30)[0]
    np.testing.assert_allclose(out, np.ones((2, 3, 2, 2)) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_convert_sync_batchnorm_keeps_names_arrays_and_engines_off_it():
    model = EmotionClassifier()
    before = model.state_dict()
    bn_weight = model.features[1].weight
    convert_sync_batchnorm(model, SingleProcess())
    assert type(model.features[1]) is SyncBatchNorm2d and model.features[1].weight is bn_weight
    assert list(model.state_dict()) == list(before)
    x = np.random.default_rng(0).normal(size=(2, 1, 48, 48)).astype(np.float32)
    model(x)
    kinds = {type(s).__name__ for s in engines.plan(model.features, x)}
    assert "SyncBatchNorm2d" in kinds and not any("BatchNorm" in k and "Step" in k for k in kinds)


# --- the trainer on thread ranks ----------------------------------------------------------------
def _run_ranks(ranks, data, recipe, out, bn="sync", before_fit=None, resume=False, logs=None):
    def rank(comm):
        log = (lambda m: logs.append(m)) if logs is not None and comm.rank == 0 else (lambda m: None)
        tr = DistributedTrainer(data, recipe, comm=comm, bn=bn, out_dir=str(out), progress=False,
                                dtype="float64", log=log)
        if before_fit:
            before_fit(tr)
        try:
            tr.fit(resume=resume)
        except KeyboardInterrupt:
            pass
        return tr
    with engines.using("textbook"):           # (numba's parallel kernels are not for two Python threads at once)
        return ThreadGroup(ranks).run(rank)


def _single(data, recipe, out):
    with engines.using("textbook"):
        one = Trainer(data, recipe, out_dir=str(out), progress=False, dtype="float64", log=lambda m: None)
        one.fit()
    return one


def test_ranks_with_sync_batchnorm_equal_one_process_uneven_split(tmp_path):
    data = small_data()
    recipe = Recipe(epochs=2, batch_size=10, dropout=0.0, augment=None, lr=0.05)      # 10 = 4 + 3 + 3
    one = _single(data, recipe, tmp_path / "one")
    trainers = _run_ranks(3, data, recipe, tmp_path / "dp")
    for tr in trainers:
        assert_same_weights(one.model.state_dict(), tr.model.state_dict())
    for a, b in zip(one.history, trainers[0].history):    # the logged global loss, accuracy, validation
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-10), key
    # Evaluation shards the test split without duplicates: the same report as one process.
    with engines.using("textbook"):
        reports = ThreadGroup(3).run(lambda comm: trainers[comm.rank].evaluate("test", weights="current"))
        single = one.evaluate("test", weights="current")
    assert reports[0]["confusion_matrix"] == single["confusion_matrix"]
    np.testing.assert_allclose(reports[2]["probs"], single["probs"], rtol=1e-9)
    # Rank 0 alone wrote the run folder; its checkpoint loads into a plain model.
    assert sorted(os.listdir(tmp_path / "dp")) == sorted(os.listdir(tmp_path / "one"))
    meta = json.load(open(tmp_path / "dp" / "last.json"))
    assert meta["world_size"] == 3 and meta["bn"] == "sync"


@pytest.mark.parametrize("bn", ["sync", "local"])
def test_a_weight_average_is_the_same_on_every_rank(tmp_path, bn):
    """recipe.ema: with sync BatchNorm the ranks' average equals one process's; with local
    BatchNorm each rank's averaged statistics are made the ranks' mean, as the live ones are."""
    data = small_data()
    recipe = Recipe(epochs=2, batch_size=10, dropout=0.0, augment=None, lr=0.05, ema=0.9)
    trainers = _run_ranks(2, data, recipe, tmp_path / "dp", bn=bn)
    for tr in trainers[1:]:
        assert_same_weights(trainers[0].average.state_dict(), tr.average.state_dict())
    if bn == "sync":
        one = _single(data, recipe, tmp_path / "one")
        assert_same_weights(one.average.state_dict(), trainers[0].average.state_dict())
        assert [h["val_acc"] for h in one.history] == [h["val_acc"] for h in trainers[0].history]


def test_local_batchnorm_averages_running_statistics_over_ranks(tmp_path):
    data = small_data()
    recipe = Recipe(epochs=1, batch_size=8, dropout=0.0, augment=None)
    seen = {}

    def record(tr):              # each rank's own statistics just before the first average
        original = tr._average_batchnorm_statistics

        def average():
            if "done" not in seen.setdefault(tr.rank, {}):
                seen[tr.rank] = {k: b.copy() for k, b in tr.model.named_buffers() if k.endswith("running_mean")}
                seen[tr.rank]["done"] = True
            original()
        tr._average_batchnorm_statistics = average
    trainers = _run_ranks(2, data, recipe, tmp_path, bn="local", before_fit=record)
    key = "features.1.running_mean"
    assert not np.allclose(seen[0][key], seen[1][key])              # each rank's own slice...
    for tr in trainers:                                              # ...then their mean everywhere
        np.testing.assert_allclose(dict(tr.model.named_buffers())[key], (seen[0][key] + seen[1][key]) / 2,
                                   rtol=1e-12)


def test_stop_on_one_rank_is_agreed_and_resume_is_exact(tmp_path):
    data = small_data(n_train=40)
    recipe = Recipe(epochs=2, batch_size=8, dropout=0.5, augment=dict(Recipe().augment), lr=0.05)
    full = _run_ranks(2, data, recipe, tmp_path / "full", bn="local")

    def stop_rank1_at_step_3(tr):
        if tr.rank == 1:
            step = tr._step_function()

            def counting(x, y, n=[0]):
                n[0] += 1
                if n[0] == 3:
                    tr.request_stop()                # Ctrl-C seen by rank 1 alone
                return step(x, y)
            tr._step_function = lambda: counting
    stopped = _run_ranks(2, data, recipe, tmp_path / "cut", bn="local", before_fit=stop_rank1_at_step_3)
    assert [t.batch for t in stopped] == [3, 3] and stopped[0].epoch == 0      # both stopped after step 3
    resumed = _run_ranks(2, data, recipe, tmp_path / "cut", bn="local", resume=True)
    for a, b in zip(full, resumed):
        assert_same_weights(a.model.state_dict(), b.model.state_dict(), rtol=1e-12)
    assert [h["train_loss"] for h in full[0].history] == pytest.approx([h["train_loss"] for h in resumed[0].history])


def test_resume_on_another_number_of_ranks_says_what_it_does(tmp_path):
    data = small_data()
    recipe = Recipe(epochs=2, batch_size=8, dropout=0.0, augment=None)

    def stop_after_2(tr):
        step = tr._step_function()

        def counting(x, y, n=[0]):
            n[0] += 1
            if n[0] == 2:
                tr.request_stop()
            return step(x, y)
        tr._step_function = lambda: counting
    _run_ranks(2, data, recipe, tmp_path, bn="local", before_fit=stop_after_2)
    logs = []
    trainers = _run_ranks(3, data, recipe, tmp_path, bn="local", resume=True, logs=logs)
    assert any("a run of 2 rank(s) on 3" in m and "not bit-identical" in m for m in logs), logs
    assert trainers[0].epoch == 2 and len(trainers[0].history) == 2


def test_ranks_with_different_data_refuse_to_start(tmp_path):
    def rank(comm):
        DistributedTrainer(small_data(seed=comm.rank), Recipe(epochs=1, batch_size=8), comm=comm,
                           out_dir=str(tmp_path), progress=False)
    with pytest.raises(Exception, match="different data"):
        ThreadGroup(2).run(rank, timeout=60)


def test_global_batch_smaller_than_the_ranks_is_refused(tmp_path):
    def rank(comm):
        DistributedTrainer(small_data(), Recipe(epochs=1, batch_size=2), comm=comm, out_dir=str(tmp_path),
                           progress=False)
    with pytest.raises(ValueError, match="batch size of at least 3"):
        ThreadGroup(3).run(rank, timeout=60)


# --- the command line -----------------------------------------------------------------------------
def test_cli_under_mpiexec_without_distributed_refuses(monkeypatch, tmp_path, capsys):
    from minicnn.cli import main
    monkeypatch.setenv("PMI_SIZE", "2")
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "one of 2 processes started by mpiexec" in err and "--distributed" in err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_cuda_graph_with_distributed(capsys):
    from minicnn.cli import main
    assert main(["train", "--distributed", "--device", "gpu", "--cuda-graph"]) == 2
    assert "--cuda-graph with --distributed is not supported" in capsys.readouterr().err


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # (import mpi4py now raises ImportError)
    from minicnn.distributed import init
    from minicnn.extras import MissingExtra
    with pytest.raises(MissingExtra, match=r"minicnn\[distributed\]"):
        init()


# --- for real: mpiexec -n 2 -----------------------------------------------------------------------
def _mpiexec():
    exe = shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        exe = None
    return exe


needs_mpi = pytest.mark.skipif(_mpiexec() is None, reason="MPI is not installed: pip install 'minicnn[distributed]'")


def _launch(n, *args, timeout=240, env=None):
    environment = dict(os.environ, **(env or {}))
    environment.pop("PMI_SIZE", None)
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=HERE)


@needs_mpi
def test_mpiexec_two_ranks_sync_batchnorm_float64_equal_one_process(tmp_path):
    run = _launch(2, os.path.join(HERE, "mpi_worker.py"), "equivalence", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.load(open(tmp_path / "result.json"))
    assert result["ranks"] == 2
    assert result["outside_rtol"] and not any(result["outside_rtol"].values()), result["outside_rtol"]
    assert [h["train_loss"] for h in result["history_dp"]] == pytest.approx(
        [h["train_loss"] for h in result["history_one"]], rel=1e-10)


@needs_mpi
def test_mpiexec_a_failing_rank_ends_the_job(tmp_path):
    t0 = time.perf_counter()
    run = _launch(2, os.path.join(HERE, "mpi_worker.py"), "fail", str(tmp_path), timeout=120)
    assert run.returncode != 0
    assert "rank 1 fails on purpose" in run.stderr
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "result.json").exists()


@needs_mpi
def test_mpiexec_cli_train_distributed(tmp_path):
    out = tmp_path / "run"
    run = _launch(2, "-m", "minicnn", "train", "--distributed", "--epochs", "1", "--out", str(out), "--no-progress",
                  env={"MINICNN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("epoch 1/1:") == 1                  # rank 0 alone speaks
    assert "data-parallel: 2 ranks" in run.stderr
    assert {"best.npz", "last.npz", "log.jsonl", "test_report.json"} <= set(os.listdir(out))
    assert json.load(open(out / "last.json"))["world_size"] == 2
    report = json.load(open(out / "test_report.json"))
    assert report["accuracy"] > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(_mpiexec() is None, reason="MPI is not installed")
def test_mpiexec_two_gpus_nccl(tmp_path):
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("NCCL data parallelism needs two GPUs")
    run = _launch(2, os.path.join(HERE, "mpi_worker.py"), "equivalence", str(tmp_path), "sync", "gpu")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.load(open(tmp_path / "result.json"))
    assert not any(result["outside_rtol"].values()), result["outside_rtol"]


@needs_mpi
def test_benchmark_scaling_rows(tmp_path):
    from minicnn.benchmarks.distributed import format_table, run
    result = run(ranks=(1, 2), batch_size=16, steps=2)
    assert [r["ranks"] for r in result["rows"]] == [1, 2]
    two = result["rows"][1]
    assert two["buffer_mb"] == pytest.approx(1572551 * 4 / 1e6 + 8 / 1e6)
    assert two["allreduce_ms"] > 0 and two["ms_per_step"] > two["allreduce_ms"]
    assert "| 2 x 1 |" in format_table(result)


def test_ranks_on_the_gpu_path_equal_one_process(gpu, tmp_path):
    """The same equality with device arrays (CuPy, or the emulator): the flat buffer, SyncBatchNorm2d,
    the sharded loader and evaluation on the GPU. Ranks are threads here, so the layers run as the
    textbook: the GPU engine keeps per-process state (one cuBLAS handle and workspace per device) and
    is meant for one process per GPU, which the two-GPU mpiexec test below runs."""
    data = small_data()
    recipe = Recipe(epochs=1, batch_size=10, dropout=0.0, augment=None, lr=0.05)

    def rank(comm):
        tr = DistributedTrainer(data, recipe, comm=comm, bn="sync", out_dir=str(tmp_path / "dp"), progress=False,
                                dtype="float64", device="gpu", log=lambda m: None)
        tr.fit()
        return tr
    with engines.using("textbook"):
        trainers = ThreadGroup(2).run(rank)
        one = Trainer(data, recipe, out_dir=str(tmp_path / "one"), progress=False, dtype="float64", device="gpu",
                      log=lambda m: None)
        one.fit()
    for tr in trainers:
        assert_same_weights(one.model.state_dict(), tr.model.state_dict(), rtol=1e-9)


@needs_mpi
def test_mpiexec_cli_error_on_one_rank_ends_the_job(tmp_path):
    """MPMD launch: rank 1 is given a data folder that does not exist; rank 0 would wait for it in
    the first collective, and must be ended instead."""
    common = ["-m", "minicnn", "train", "--distributed", "--epochs", "1", "--out", str(tmp_path / "run"),
              "--no-progress"]
    t0 = time.perf_counter()
    run = subprocess.run([_mpiexec(), "-n", "1", sys.executable, *common, ":", "-n", "1", sys.executable, *common,
                          "--data", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PMI_SIZE"}, cwd=HERE)
    assert run.returncode != 0
    assert "error (rank 1 of 2)" in run.stderr and "missing" in run.stderr
    assert time.perf_counter() - t0 < 60


def test_a_replica_that_drifted_is_reported_and_replaced_by_rank_0s(tmp_path):
    logs = []

    def rank(comm):
        tr = DistributedTrainer(small_data(), Recipe(epochs=1, batch_size=8), comm=comm, out_dir=str(tmp_path),
                                progress=False, log=logs.append)
        agreed = tr.check_replicas()
        if comm.rank == 1:
            tr.model.features[0].weight.data[0, 0, 0, 0] += 1e-3
        drifted = tr.check_replicas()
        return agreed, drifted, tr.model.features[0].weight.data.copy()
    (a0, d0, w0), (a1, d1, w1) = ThreadGroup(2).run(rank)
    assert a0 and a1 and not d0 and not d1
    np.testing.assert_array_equal(w0, w1)
    assert any("replicas differ" in m for m in logs)
