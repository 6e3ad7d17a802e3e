"""The notebooks cannot rot: each one in docs/notebooks runs, every cell, in a Jupyter kernel.

They are stored as text (jupytext's percent format: ``# %%`` starts a cell), so they diff like code;
their "break it" cells assert that the gradient check fails, and their "expected" comments are
asserted where it matters. A failing cell fails the test with the cell and its error.
"""
import glob
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "docs", "notebooks", "*.py")))
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def test_every_layer_page_has_a_notebook_and_there_is_one_end_to_end():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    for page in ("linear", "relu", "cross_entropy", "conv2d", "maxpool2d", "batchnorm2d", "dropout"):
        assert any(n.endswith(f"_{page}.py") for n in names), page
        assert "notebooks/" in open(os.path.join(DOCS, f"{page}.md")).read(), f"{page}.md does not link its notebook"
    assert any("end_to_end" in n for n in names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    jupytext = pytest.importorskip("jupytext", reason="the notebooks need the test extra (jupytext, nbclient)")
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(path)
    assert any("Break it" in c.source for c in nb.cells if c.cell_type == "markdown") or "end_to_end" in path
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert outputs and not any(o.get("output_type") == "error" for o in outputs)
    if "end_to_end" in path:          # the figures were shown
        assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
