"""Training steps captured as a CUDA graph compute exactly what eager steps compute (on a GPU when
there is one, and on the CuPy emulator, which follows CUDA's capture rules, everywhere else)."""
import numpy as np
import pytest

import cupy_emulator
import minicnn
from minicnn import nn
from minicnn.backend import to_device
from minicnn.engines import using
from minicnn.models import EmotionClassifier
from minicnn.optim import SGD, Adam, AdamW
from minicnn.engines.gpu.graph import CudaGraphStep


OPTIMIZERS = {"sgd": lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
              "adam": lambda ps: Adam(ps, lr=1e-3, weight_decay=1e-4),
              "adamw": lambda ps: AdamW(ps, lr=1e-3)}


def _setup(seed=0, optimizer="sgd"):
    minicnn.rng.manual_seed(seed)
    model = EmotionClassifier(num_classes=7).to("gpu")
    model.features[5].momentum = None                 # a cumulative average: reads the batch count
    return model, OPTIMIZERS[optimizer](model.parameters()), nn.CrossEntropyLoss(label_smoothing=0.1)


def _batches(n_steps, batch=6, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 1, 48, 48)).astype(np.float32), rng.integers(0, 7, batch))
            for _ in range(n_steps)]


def assert_same(got, want, what=""):
    """Bit for bit on the emulator. On a GPU, to float32 rounding: cuBLAS promises the same bits only
    for the same stream and workspace, and a graph is captured on a stream of its own."""
    if minicnn.backend.gpu_module() is cupy_emulator:
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=what)


def _state(model):
    return {k: v for k, v in model.state_dict().items()}


def _train(batches, graph, reload_at=None, optimizer="sgd"):
    model, opt, crit = _setup(optimizer=optimizer)
    step = CudaGraphStep(model, crit, opt, clip_grad_norm=1.0, warmup=2)
    losses = []
    for i, (x, y) in enumerate(batches):
        opt.lr = 0.05 / (1 + i) if optimizer == "sgd" else 1e-3 / (1 + i)   # a schedule: each new rate counts
        if reload_at == i:                          # arrays replaced: the graph must be captured again
            model.load_state_dict(model.state_dict())
        loss, _ = step(to_device(x, "gpu"), y) if graph else step.eager(to_device(x, "gpu"), to_device(y, "gpu"))
        losses.append(float(loss))
    return _state(model), losses, step, opt


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_replayed_steps_equal_eager_steps(gpu, capturable_cublas, optimizer):
    batches = _batches(7)
    want_state, want_losses, _, want_opt = _train(batches, graph=False, optimizer=optimizer)
    got_state, got_losses, step, got_opt = _train(batches, graph=True, optimizer=optimizer)
    assert step.replays == 5 and step.eager_steps == 2
    for k, v in want_opt.state_dict().items():      # momentum buffers, Adam's moments and step counts
        assert_same(got_opt.state_dict()[k], v, k)
    assert_same(got_losses, want_losses, "losses")
    for k, v in want_state.items():                 # weights, running statistics, batch counts
        assert_same(got_state[k], v, k)


def test_a_capture_multiplies_with_cuda_directly_only_where_cupy_refuses(monkeypatch):
    """Every product of a captured step goes through minicnn.engines.gpu.kernels.matmul: by cuBLAS called directly
    where CuPy refuses (the emulator fails any other product during the capture), and by CuPy's own
    product where it can capture it."""
    import minicnn.backend as backend
    from minicnn.engines.gpu import cublas, kernels as gpu_kernels_module
    monkeypatch.setattr(backend, "_cupy", cupy_emulator)
    monkeypatch.setattr(cublas, "gemm", cupy_emulator.direct_gemm)
    monkeypatch.setattr(cublas, "_available", {cupy_emulator.__version__: True})
    direct = {}
    for cupy_captures in (False, True):
        monkeypatch.setattr(cupy_emulator, "CUBLAS_IN_CAPTURE", cupy_captures)
        monkeypatch.setattr(gpu_kernels_module, "_cupy_captures_cublas", {})
        cupy_emulator.by_name.clear()
        state, losses, step, _ = _train(_batches(4), graph=True)
        assert step.replays == 2 and np.isfinite(losses).all()
        direct[cupy_captures] = cupy_emulator.by_name["cublas-direct"]
    assert direct == {False: 4 * 3 + 2 * 3 - 1, True: 0}   # 4 blocks, 2 linear layers: 3 products each, less dL/dx


def test_other_batch_sizes_run_eagerly_and_new_arrays_are_captured_again(gpu, capturable_cublas):
    batches = _batches(6)
    batches[3] = _batches(1, batch=4, seed=9)[0]    # a short batch in the middle
    want_state, want_losses, _, _ = _train(batches, graph=False, reload_at=4)
    got_state, got_losses, step, _ = _train(batches, graph=True, reload_at=4)
    assert step.eager_steps == 3 and step.replays == 3
    assert_same(got_losses, want_losses, "losses")
    for k, v in want_state.items():
        assert_same(got_state[k], v, k)


def test_graph_step_refuses_what_it_cannot_replay(gpu, capturable_cublas):
    model, opt, crit = _setup()
    with pytest.raises(ValueError, match="on the GPU"):
        CudaGraphStep(EmotionClassifier(), crit, SGD(EmotionClassifier().parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="not SGD without momentum"):
        CudaGraphStep(model, crit, SGD(model.parameters(), lr=0.1))
    with using("textbook"), pytest.raises(ValueError, match="GPU engine"):
        CudaGraphStep(model, crit, opt)
    step = CudaGraphStep(model, crit, opt)
    x = np.zeros((2, 1, 48, 48), np.float32)
    with pytest.raises(ValueError, match="images on the GPU"):
        step(x, [0, 1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        step(to_device(x, "gpu"), [0, 7])
    with pytest.raises(ValueError, match=r"labels of shape \(2,\)"):
        step(to_device(x, "gpu"), [0, 1, 2])
    with pytest.raises(ValueError, match="integer class labels"):
        step(to_device(x, "gpu"), [0.0, 1.0])
    model.eval()
    with pytest.raises(ValueError, match="model.train"):
        step(to_device(x, "gpu"), [0, 1])


# --- the emulator keeps CUDA's capture rules (else the tests above would prove little) -----------
def test_emulator_capture_records_instead_of_running_and_forbids_host_copies():
    cp = cupy_emulator
    a = cp.asarray(np.arange(4.0))
    s = cp.cuda.Stream(non_blocking=True)
    s.begin_capture()
    a += 1                                          # recorded, not run
    b = a * 2                                       # computed for its shape only
    with pytest.raises(RuntimeError, match="captured"):
        float(a[0])
    with pytest.raises(RuntimeError, match="captured"):
        cp.asarray(np.ones(3))
    graph = s.end_capture()
    assert np.isnan(b.get()).all()                  # nothing computed yet, as on a GPU
    np.testing.assert_array_equal(a.get(), np.arange(4.0))
    graph.launch()
    graph.launch()
    np.testing.assert_array_equal(a.get(), np.arange(4.0) + 2)
    np.testing.assert_array_equal(b.get(), (np.arange(4.0) + 2) * 2)


def _stop_after(trainer, k):
    """Ask the trainer to stop after its k-th step (what Ctrl-C does), whatever runs the steps."""
    epoch, seen = trainer.train_loader.epoch, []

    def batches(*args, **kwargs):
        for batch in epoch(*args, **kwargs):
            seen.append(1)
            if len(seen) == k:
                trainer.request_stop()
            yield batch
    trainer.train_loader.epoch = batches


def test_trainer_with_cuda_graphs_equals_eager_training_and_resumes_exactly(gpu, capturable_cublas, tmp_path):
    from test_training import tiny_data, tiny_recipe, weights
    from minicnn.training import Trainer
    quiet = dict(progress=False, log=lambda m: None, device=gpu)
    eager = Trainer(tiny_data(), tiny_recipe(), out_dir=str(tmp_path / "eager"), **quiet)
    eager.fit()
    graphed = Trainer(tiny_data(), tiny_recipe(), out_dir=str(tmp_path / "graph"), cuda_graph=True, **quiet)
    graphed.fit()
    assert graphed._cuda_graph_step.replays == 12 - 2           # 2 epochs of 6 steps, 2 warm-up steps
    assert len(graphed.history) == len(eager.history) == 2
    for h, g in zip(eager.history, graphed.history):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert_same(g[key], h[key], key)
    for k, v in weights(eager).items():
        assert_same(weights(graphed)[k], v, k)

    out = str(tmp_path / "stopped")
    first = Trainer(tiny_data(), tiny_recipe(), out_dir=out, cuda_graph=True, **quiet)
    _stop_after(first, 8)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = Trainer(tiny_data(), tiny_recipe(), out_dir=out, cuda_graph=True, **quiet)
    resumed.fit(resume=True)
    for k, v in weights(eager).items():
        assert_same(weights(resumed)[k], v, k)


def test_trainer_refuses_cuda_graphs_on_the_cpu():
    from test_training import tiny_data
    from minicnn.training import Trainer
    with pytest.raises(ValueError, match="needs device='gpu'"):
        Trainer(tiny_data(), cuda_graph=True)


@pytest.mark.parametrize("mutation", ["frozen learning rate", "frozen dropout seed", "running statistics replaced"])
def test_the_emulator_catches_a_step_that_is_not_graph_safe(mutation, monkeypatch):
    """The replay-equals-eager test can fail: break one of the step's graph-safety measures and the
    emulated replays drift from eager steps."""
    import minicnn.backend as backend
    from minicnn.engines.gpu import kernels as gpu_kernels_module
    from minicnn.engines.gpu.layers import DropoutStep
    from minicnn.engines.gpu import cublas
    monkeypatch.setattr(backend, "_cupy", cupy_emulator)
    monkeypatch.setattr(cublas, "gemm", cupy_emulator.direct_gemm)    # (see the capturable_cublas fixture)
    monkeypatch.setattr(cublas, "_available", {cupy_emulator.__version__: True})
    monkeypatch.setattr(gpu_kernels_module, "_cupy_captures_cublas", {})
    if mutation == "frozen learning rate":         # copied to the device for the capture, never again
        copy_to_device, calls = SGD._before_graph_replay, []

        def only_once(self):
            if not calls:
                calls.append(1)
                copy_to_device(self)
        monkeypatch.setattr(SGD, "_before_graph_replay", only_once)
    elif mutation == "frozen dropout seed":
        monkeypatch.setattr(DropoutStep, "before_graph_replay", lambda self: None)
    else:                                          # a new array each step: the graph keeps updating the old one
        from minicnn.engines.gpu.blocks import ConvBatchNormReLUPoolGPU
        update = ConvBatchNormReLUPoolGPU.forward       # (the EmotionClassifier's BatchNorms are in these)

        def replace_running_stats(self, x):
            self.bn.set_buffer("running_mean", self.bn.running_mean.copy())
            return update(self, x)
        monkeypatch.setattr(ConvBatchNormReLUPoolGPU, "forward", replace_running_stats)
    batches = _batches(5)
    want_state, want_losses, _, _ = _train(batches, graph=False)
    got_state, got_losses, _, _ = _train(batches, graph=True)
    differs = got_losses != want_losses or any(not np.array_equal(got_state[k], v) for k, v in want_state.items())
    assert differs


def test_an_error_during_the_capture_propagates_and_leaves_nothing_half_done(gpu, capturable_cublas):
    from minicnn.engines.gpu import kernels as gpu_kernels
    model, opt, crit = _setup()
    step = CudaGraphStep(model, crit, opt, warmup=1)
    (x, y), = _batches(1)
    x = to_device(x, "gpu")
    step(x, y)                                      # the eager warm-up step
    from minicnn.engines import loss_step
    loss_fn = loss_step(crit, to_device(np.zeros((1, 7), np.float32), "gpu"))    # (the GPU engine's loss step)
    forward, calls = loss_fn.forward, []

    def fails_in_the_capture(logits, labels):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom inside the capture")
        return forward(logits, labels)
    loss_fn.forward = fails_in_the_capture
    with pytest.raises(RuntimeError, match="boom inside the capture"):
        step(x, y)
    assert not gpu_kernels.capturing() and step._graph is None
    loss, _ = step(x, y)                            # captured again, this time whole, and replayed
    assert step.replays == 1 and np.isfinite(float(loss))


def test_where_no_product_can_be_captured_the_step_says_so_before_anything_runs(gpu, tmp_path, capsys, monkeypatch):
    """CuPy 14.2 on an H200 refused every cuBLAS call in a capture ("calling cuBLAS API during
    stream capture is currently unsupported"); where cuBLAS called directly cannot be captured
    either, the step says so when it is made, not mid-training."""
    from minicnn.engines.gpu import cublas, kernels as gpu_kernels_module
    from minicnn.training import Trainer
    if minicnn.backend.gpu_module() is not cupy_emulator:
        if gpu_kernels_module.cublas_capturable():
            pytest.skip("this GPU can capture matrix products")
    else:
        monkeypatch.setattr(cublas, "_available", {cupy_emulator.__version__: False})
    monkeypatch.setattr(gpu_kernels_module, "_cupy_captures_cublas", {})
    model, opt, crit = _setup()
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"CUDA graphs are not available here: CuPy .*refuses cuBLAS calls"
                                           r"(.|\n)*without cuda_graph / --cuda-graph"):
        CudaGraphStep(model, crit, opt)
    assert all((p.data == b).all() for p, b in zip(model.parameters(), before))
    from test_training import tiny_data, tiny_recipe
    with pytest.raises(RuntimeError, match="CUDA graphs are not available"):
        Trainer(tiny_data(), tiny_recipe(), device=gpu, cuda_graph=True, progress=False, log=lambda m: None)
    if gpu == "gpu" and minicnn.backend.gpu_module() is cupy_emulator:
        from minicnn.cli import main as cli
        assert cli(["train", "--device", "gpu", "--cuda-graph", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
        assert "minicnn: error: CUDA graphs are not available" in capsys.readouterr().err
        assert not (tmp_path / "r" / "last.npz").exists()
