"""minicnn as a package: licence and metadata, extras that say what they are for, a README that works
off the repository, the benchmark without the tests folder, weights PyTorch loads as they are, and
the wheel and the sdist installed into fresh environments with the default dependencies only."""
import concurrent.futures
import glob
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import minicnn

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
README = open(os.path.join(ROOT, "README.md")).read()


def _python(code, env=None, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})), cwd=cwd)


def test_version_and_metadata():
    from importlib.metadata import metadata
    from minicnn.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    meta = metadata("minicnn")
    assert meta["Version"] == minicnn.__version__
    assert meta["License"] == "MIT" and "MIT License" in open(os.path.join(ROOT, "LICENSE")).read()
    assert meta["Author"] and meta.get_all("Project-URL")
    assert any("Programming Language :: Python :: 3.1" in c for c in meta.get_all("Classifier"))
    requires = " ".join(meta.get_all("Requires-Dist"))
    assert "matplotlib" in requires and 'extra == "plots"' in requires
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(re.split(r"[<>=!; ]", r)[0].lower() for r in core) == ["numba", "numpy", "pillow", "threadpoolctl",
                                                                           "tqdm"]


def test_the_readme_links_work_off_the_repository():
    """Absolute links (the package index shows the README without the repository), to files that exist."""
    targets = re.findall(r"\]\(([^)]+)\)", README)
    assert targets
    for target in targets:
        assert target.startswith(("https://", "#")), f"relative link in README.md: {target}"
        m = re.match(r"https://(?:github\.com/minicnn/minicnn/blob/main|raw\.githubusercontent\.com/minicnn/minicnn/main)/"
                     r"(.+)", target)
        if m:
            assert os.path.exists(os.path.join(ROOT, m.group(1))), target


def test_the_readme_pytorch_line_loads_the_shipped_weights_as_they_are():
    torch = pytest.importorskip("torch")
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "torch_emotion_classifier" in b)
    namespace = {}
    exec(block, namespace)                                  # exactly what the README shows
    net = namespace["net"]
    from minicnn.inference import EmotionPredictor
    predictor = EmotionPredictor()
    x = np.random.default_rng(0).standard_normal((3, 1, 48, 48)).astype(np.float32)
    with minicnn.no_grad():
        ours = predictor.model(x)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_a_command_that_needs_an_extra_names_it_in_one_line(tmp_path):
    from PIL import Image
    face = tmp_path / "face.png"
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(face)
    block = ("import sys\nclass _No:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'matplotlib':\n"
             "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
             "sys.meta_path.insert(0, _No())\nfrom minicnn.cli import main\n")
    for command in (["explain", str(face)], ["visualize", "--out", str(tmp_path / "v.png")]):
        out = _python(block + f"sys.exit(main({command!r}))", env={"MINICNN_ENGINE": "textbook"})
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "minicnn[plots]" in lines[0] and "matplotlib" in lines[0], out.stderr


def test_the_benchmark_runs_without_the_tests_folder(tmp_path):
    for args in (["-m", "minicnn", "bench", "--help"], ["-m", "minicnn.benchmarks", "--help"]):
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                             env=dict(os.environ, PYTHONPATH=""))
        assert out.returncode == 0 and "--quick" in out.stdout, out.stderr
    source = open(os.path.join(ROOT, "minicnn", "benchmarks", "run.py")).read()
    assert "conftest" not in source and "tests" not in re.findall(r"sys\.path\.insert\(0, ([^)]*)\)", source)


# --- the wheel and the sdist, each in a fresh environment ------------------------------------------------
def _build(kind, out):
    if kind == "wheel":
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, ROOT]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        return glob.glob(os.path.join(out, "minicnn-*.whl"))[0]
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({out!r}))"
    name = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                          timeout=300).stdout.strip().splitlines()[-1]
    return os.path.join(out, name)


def _install_and_use(kind, artifact, tmp, face):
    venv = os.path.join(tmp, f"venv-{kind}")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    py = os.path.join(venv, "bin", "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", artifact],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    bin_ = os.path.join(venv, "bin", "minicnn")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINICNN_ENGINE", "NUMBA_CACHE_DIR")}
    if kind == "sdist":
        env["MINICNN_ENGINE"] = "textbook"     # (the wheel's run compiles the CPU engine; this one need not)
    runs = {}
    for args in (["--version"], ["summary"], ["predict", face]):
        runs[args[0]] = subprocess.run([bin_, *args], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            timeout=120).stdout.lower()
    return runs, listed


def test_the_wheel_and_the_sdist_install_and_run_with_the_default_dependencies_only(tmp_path):
    from PIL import Image
    face = str(tmp_path / "face.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8)).save(face)
    dist = str(tmp_path / "dist")
    wheel, sdist = _build("wheel", dist), _build("sdist", dist)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    for needed in ("minicnn/weights/emotion_fer2013.npz", "minicnn/weights/emotion_fer2013.json",
                   "minicnn/engines/gpu/kernels.cu", "minicnn/benchmarks/run.py"):
        assert needed in names, needed
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    import tarfile
    with tarfile.open(sdist) as t:
        assert any(n.endswith("/LICENSE") for n in t.getnames())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip(("wheel", "sdist"), pool.map(lambda ka: _install_and_use(*ka, str(tmp_path), face),
                                                         (("wheel", wheel), ("sdist", sdist)))))
    for kind, (runs, listed) in results.items():
        for name, out in runs.items():
            assert out.returncode == 0, f"{kind}: minicnn {name}: {out.stderr[-2000:]}"
        assert runs["--version"].stdout.strip() == f"minicnn {minicnn.__version__}"
        assert "Total params: 1,572,551" in runs["summary"].stdout
        assert "face.png:" in runs["predict"].stdout and "%" in runs["predict"].stdout
        for extra in ("matplotlib", "torch", "cupy", "pytest"):
            assert f"\n{extra}==" not in "\n" + listed, f"{kind} installed {extra}"
    assert "compiling the CPU engine's kernels" in results["wheel"][0]["predict"].stderr
