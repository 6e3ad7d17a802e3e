"""The docs cannot rot: every ```python block on every docs page runs, and the summary table is current."""
import glob
import io
import os
import re

import pytest

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
PAGES = sorted(glob.glob(os.path.join(DOCS, "*.md")))


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", open(path).read(), flags=re.S)


def test_every_layer_has_a_page_with_code():
    names = {os.path.basename(p) for p in PAGES}
    for page in ("conv2d.md", "batchnorm2d.md", "relu.md", "maxpool2d.md", "dropout.md", "linear.md",
                 "cross_entropy.md", "emotion_classifier.md", "engines.md"):
        assert page in names
        assert python_blocks(os.path.join(DOCS, page)), f"{page} has no runnable snippet"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=os.path.basename)
def test_snippets_run(page, capsys):
    namespace = {"__name__": "__docs__"}
    for block in python_blocks(page):
        exec(compile(block, page, "exec"), namespace)


def test_summary_table_in_the_docs_is_current():
    from minicnn.models import EmotionClassifier
    text = EmotionClassifier().summary(file=io.StringIO())
    assert text in open(os.path.join(DOCS, "emotion_classifier.md")).read()


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", open(page).read()):
            assert os.path.exists(os.path.join(DOCS, target)), f"{page} links to missing {target}"
