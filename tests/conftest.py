"""Shared fixtures: the array backends every test runs on, and the PyTorch oracle."""
import minicnn  # noqa: F401  (before NumPy, as users should: see minicnn/__init__.py)
import pytest

import cupy_emulator

import minicnn.backend
from minicnn.backend import gpu_available
from minicnn.gradcheck import distinct_values, off_kink  # noqa: F401  (input helpers the tests share)
from minicnn.engines import use as use_engine

try:
    from hypothesis import settings
    settings.register_profile("minicnn", deadline=None, max_examples=20, derandomize=True,
                              print_blob=True)
    settings.load_profile("minicnn")
except ImportError:  # pragma: no cover
    pass

GPU = gpu_available()
EMULATOR = cupy_emulator.compiler_available()
# numpy-fast: NumPy with the numba kernels (the default); numpy-plain: the plain array-module
# path that a learner reads; cupy: the GPU with minicnn's CUDA kernels; cupy-plain: the GPU on the
# plain path. gpu-emulated and gpu-emulated-plain: the same two GPU paths on the CPU, through
# tests/cupy_emulator.py (CuPy's rules for device arrays, the CUDA kernels compiled for the host):
# every line of the GPU path runs on machines without a GPU; only a GPU proves it on the GPU.
_need_gpu = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="CuPy with an NVIDIA GPU is not available")]
_need_gxx = [pytest.mark.skipif(not EMULATOR, reason="the CuPy emulator needs g++")]
BACKENDS = ["numpy-fast", "numpy-plain", pytest.param("cupy", marks=_need_gpu),
            pytest.param("cupy-plain", marks=_need_gpu), pytest.param("gpu-emulated", marks=_need_gxx),
            pytest.param("gpu-emulated-plain", marks=_need_gxx)]


@pytest.fixture(params=BACKENDS, scope="session")
def device(request):
    """'cpu' for the NumPy backends, 'gpu' for CuPy and its emulator."""
    return "cpu" if request.param.startswith("numpy") else "gpu"


@pytest.fixture(scope="session", autouse=True)
def _private_dataset_cache(tmp_path_factory):
    """Decoded datasets go to a temporary cache, never into the user's ~/.cache/minicnn."""
    import os
    old = os.environ.get("MINICNN_CACHE")
    os.environ["MINICNN_CACHE"] = str(tmp_path_factory.mktemp("minicnn-cache"))
    yield
    if old is None:
        os.environ.pop("MINICNN_CACHE", None)
    else:
        os.environ["MINICNN_CACHE"] = old


@pytest.fixture(params=[pytest.param("cupy", marks=_need_gpu), pytest.param("gpu-emulated", marks=_need_gxx)],
                scope="session")
def gpu(request):
    """The GPU with minicnn's CUDA kernels: real (skipped without one) and emulated."""
    return "gpu"


def _backend(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("device") or params.get("gpu")


def pytest_runtest_setup(item):
    """Each test runs on the path its backend names; tests without one use the default (fast)."""
    backend = _backend(item) or ""
    use_engine("textbook" if backend.endswith("plain") else "auto")
    if backend.startswith("gpu-emulated"):
        minicnn.backend._cupy = cupy_emulator        # get_array_module() now answers the emulator


def pytest_runtest_teardown(item):
    if (_backend(item) or "").startswith("gpu-emulated"):
        minicnn.backend._cupy = None


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    for item in items:
        if "gpu" in item.keywords and not any(m.name == "skipif" for m in item.iter_markers()):
            item.add_marker(pytest.mark.skip(reason="CuPy with an NVIDIA GPU is not available"))


def torch_or_skip():
    return pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")


def torch_emotion_classifier(num_classes=7):
    """The PyTorch module whose state dict minicnn's EmotionClassifier trades with."""
    torch_or_skip()
    from minicnn.models.torch_twin import torch_emotion_classifier as make
    return make(num_classes)


@pytest.fixture
def capturable_cublas(gpu, monkeypatch):
    """For tests of the CUDA-graph step. On the emulator, which refuses CuPy's cuBLAS calls during a
    capture as CuPy 14.2 does, minicnn's direct cuBLAS products (minicnn/engines/gpu/cublas.py) are
    played by ``cupy_emulator.direct_gemm``: a product that does not go through them fails the
    capture. On a GPU where neither can be captured, skip."""
    from minicnn.engines.gpu import cublas, kernels as gpu_module
    if minicnn.backend._cupy is cupy_emulator:
        monkeypatch.setattr(cublas, "gemm", cupy_emulator.direct_gemm)
        monkeypatch.setattr(cublas, "_available", {cupy_emulator.__version__: True})
        monkeypatch.setattr(gpu_module, "_cupy_captures_cublas", {})
        yield
    elif not gpu_module.cublas_capturable():
        pytest.skip("neither CuPy nor cuBLAS called directly can be captured here: no CUDA-graph steps")
    else:
        yield
