"""The benchmark suite runs and reports well-formed numbers (no test asserts a speed)."""
import json
import math

import numpy as np
import pytest

from minicnn.benchmarks import run as bench


def test_flop_counts_match_the_network():
    assert bench.FORWARD_FLOP == 2 * 33_697_280           # multiply-adds of one image's forward pass
    assert abs(bench.TRAIN_FLOP / 1e9 - 0.2) < 0.01         # about 0.2 GFLOP per image per step


def test_a_tiny_benchmark_run_is_well_formed(tmp_path):
    names = ["minicnn-plain", "minicnn-fast", "minicnn-session", "torch-cpu", "torch-cpu-cl", "onnxruntime-cpu"]
    backends = [b for b in bench.all_backends() if b.name in names]
    report = bench.run(batch_sizes=(2,), repeats=2, warmup=1, layers=True, memory=False,
                       backends=backends, out=str(tmp_path), latency=(2, 5))
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert (tmp_path / "latest.png").stat().st_size > 1000
    have_torch = bench._torch() is not None
    have_ort = bench.OnnxRuntimeBackend().available()
    expected = ({"minicnn-plain", "minicnn-fast", "minicnn-session"} | ({"torch-cpu", "torch-cpu-cl"} if have_torch
                else set()) | ({"onnxruntime-cpu"} if have_ort else set()))
    assert {r["backend"] for r in report["results"]} == expected
    inference_only = {"minicnn-session", "onnxruntime-cpu"}
    for r in report["results"]:
        if r["what"] == "latency":            # batch 1, one call at a time: median and 99th percentile
            assert r["batch"] == 1 and r["repeats"] == 10 and r["p99_ms"] >= r["median_ms"] > 0
        else:
            assert r["what"] in ("train", "infer") and r["batch"] == 2
            assert not (r["what"] == "train" and r["backend"] in inference_only)
        assert r["median_ms"] > 0 and math.isfinite(r["images_per_s"])
        # (Winograd and oneDNN do fewer multiplications than the im2col count, and the sgemm rate is
        # measured under whatever load the machine has: above 1 happens; above 10 would be a unit slip.)
        assert 0 < r["gemm_frac"] < 10
        if have_torch:
            assert r["ratio_torch_cpu"] > 0 and r["ratio_torch_cpu_cl"] > 0
    assert {r["backend"] for r in report["results"] if r["what"] == "latency"} == expected
    assert report["sgemm_gflops"] > 0
    layers = {(r["layer"], r["backend"]) for r in report["layers"]}
    assert ("conv2", "minicnn-fast") in layers and ("fc1", "minicnn-plain") in layers
    table = bench.format_table(report["results"], report["sgemm_gflops"])
    assert "minicnn-fast" in table and "images/s" in table


@pytest.mark.parametrize("steady", [True, False])
def test_each_timed_step_follows_an_untimed_one_unless_cold(steady):
    class Workers:
        def __init__(self):
            self.asked, self.available = [], ["a", "b"]

        def ask_or_drop(self, name, *msg):
            self.asked.append((name,) + msg)
            return [0.001] * msg[2]
    workers = Workers()
    times = bench.time_interleaved(workers, {"a": ["train"], "b": ["train", "infer"]}, warmup=2, repeats=3,
                                   steady=steady)
    assert all(len(ts) == 3 for ts in times.values())
    rounds = [m for m in workers.asked if m[3] == 1]
    assert len(rounds) == 9                                     # 3 rounds x 3 jobs, in turn
    assert [m[:3] for m in rounds[:3]] == [("a", "run", "train"), ("b", "run", "train"), ("b", "run", "infer")]
    assert all(m[4] == (1 if steady else 0) for m in rounds)   # untimed runs of the same job first


def test_cli_rejects_unknown_backends():
    with pytest.raises(SystemExit):
        bench.main(["--backends", "nope", "--out", ""])


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_is_measured_in_a_fresh_process():
    mb = bench.peak_memory_mb("minicnn-fast", 2, steps=1)
    assert mb is not None and 5 < mb < 2000          # at least the 6 MB of weights, nowhere near the machine


def test_a_failing_worker_is_reported_with_its_name_and_reason():
    with pytest.raises(RuntimeError, match=r"worker 'nope' failed(.|\n)*unknown backend 'nope'"):
        bench.Workers(["nope"])


def test_a_backend_that_fails_mid_run_is_dropped_and_the_others_are_timed():
    with bench.Workers(["minicnn-plain", "minicnn-fast"]) as workers:
        jobs = {name: workers.ask(name, "model", 2) for name in workers.available}
        jobs["minicnn-plain"] = ["no such job"]                  # the worker raises a KeyError
        times = bench.time_interleaved(workers, jobs, warmup=1, repeats=2)
        assert set(times) == {("minicnn-fast", "train"), ("minicnn-fast", "infer")}
        assert all(len(ts) == 2 for ts in times.values())
        assert workers.available == ["minicnn-fast"] and "KeyError" in workers.failed["minicnn-plain"]


def test_gpu_backends_run_their_steps_and_the_table_shows_gpu_ratios(gpu):
    """The GPU backends' steps (plain, kernels) run in-process on the GPU or its emulator;
    the table gains the PyTorch-CUDA ratio and the FER2013 epoch time (numbers here are made up)."""
    _run_gpu_backends(("minicnn-cupy-plain", "minicnn-cupy"))
    results = [dict(backend=b, what="train", batch=256, median_ms=ms, images_per_s=256 / ms * 1e3)
               for b, ms in (("minicnn-cupy-graph", 2.0), ("torch-cuda", 2.5))]
    results[0]["ratio_torch_cuda"] = 0.8
    table = bench.format_table(results, 100.0)
    assert "vs torch-cuda" in table and "0.80x" in table and f"{28709 / 128000:.1f} s" in table


def test_gpu_rows_get_ratios_to_both_pytorch_cuda_settings_and_cpu_rows_to_the_cpu_ones():
    rows = [dict(backend=b, what="train", batch=64, median_ms=ms, images_per_s=64 / ms * 1e3, flop=1e9)
            for b, ms in (("minicnn-cupy", 3.0), ("minicnn-cupy-tf32", 2.0), ("torch-cuda", 4.0),
                          ("torch-cuda-fp32", 6.0), ("minicnn-fast", 50.0), ("torch-cpu-cl", 40.0))]
    rows.append(dict(rows[0], batch=256, median_ms=9.0))           # no PyTorch row at this batch: no ratios
    bench.add_ratios(rows, 100.0)
    by = {(r["backend"], r["batch"]): r for r in rows}
    assert by["minicnn-cupy", 64]["ratio_torch_cuda"] == 0.75
    assert by["minicnn-cupy", 64]["ratio_torch_cuda_fp32"] == 0.5
    assert by["minicnn-cupy-tf32", 64]["ratio_torch_cuda"] == 0.5
    assert by["minicnn-fast", 64]["ratio_torch_cpu_cl"] == 1.25 and "ratio_torch_cuda" not in by["minicnn-fast", 64]
    assert not any(k.startswith("ratio") for k in by["torch-cuda-fp32", 64])
    assert not any(k.startswith("ratio") for k in by["minicnn-cupy", 256])
    table = bench.format_table(rows, 100.0)
    assert "vs torch-cuda-fp32" in table and "0.50x" in table


def test_the_cuda_graph_backend_runs_its_steps(gpu, capturable_cublas):
    _run_gpu_backends(("minicnn-cupy-graph",))


def test_the_gpu_session_backend_infers_and_replays_a_graph(gpu, capturable_cublas):
    from minicnn.backend import to_numpy
    backend = next(b for b in bench.all_backends() if b.name == "minicnn-cupy-session")
    assert backend.name in bench.GPU_BACKENDS and "minicnn-cupy-session-tf32" in bench.GPU_BACKENDS
    train, infer = backend.prepare(4)
    assert train is None                                  # inference only
    for _ in range(3):                                    # eager, captured, replayed
        out = infer()
    backend.sync()
    assert to_numpy(out).shape == (4, 7) and np.isfinite(to_numpy(out)).all()


def test_the_cuda_graph_backend_is_available_where_products_can_be_captured(gpu, monkeypatch):
    import cupy_emulator
    from minicnn.engines.gpu import cublas, kernels as gpu_kernels_module
    backend = next(b for b in bench.all_backends() if b.name == "minicnn-cupy-graph")
    monkeypatch.setattr(gpu_kernels_module, "_cupy_captures_cublas", {})
    if __import__("minicnn").backend.gpu_module() is cupy_emulator:
        for possible in (False, True):
            monkeypatch.setattr(cublas, "_available", {cupy_emulator.__version__: possible})
            assert backend.available() is possible
    else:
        assert backend.available() == gpu_kernels_module.cublas_capturable()


def _run_gpu_backends(names):
    from minicnn.backend import to_numpy
    for name in names:
        backend = next(b for b in bench.all_backends() if b.name == name)
        train, infer = backend.prepare(4)
        for _ in range(4):                          # graph: 2 eager warm-up steps, capture, replay
            train()
        backend.sync()
        assert to_numpy(infer()).shape == (4, 7)
        assert backend.info()["gpu_name"]


def test_the_gpu_profile_times_each_stage_and_the_graph_step(gpu, capturable_cublas, capsys):
    from minicnn.benchmarks import gpu_profile
    from minicnn.engines.gpu import kernels as gpu_kernels
    gpu_profile.stages(4, repeats=1)
    gpu_profile.graph_step(4, repeats=1)
    out = capsys.readouterr().out
    assert "== batch 4: training step" in out
    for what in ("features.0 ConvBatchNormReLUPoolGPU backward", "classifier.1 LinearStep forward", "optimizer step",
                 "kernel bn_relu_pool_backward", "kernel matmul"):
        assert what in out
    assert "graph replay" in out
    assert not hasattr(gpu_kernels.matmul, "__wrapped__") and gpu_kernels.matmul.__name__ == "matmul"
