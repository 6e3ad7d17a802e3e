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


# --- docs quote real code ---------------------------------------------------------------------------
ROOT = os.path.join(os.path.dirname(__file__), "..")
ALL_DOCS = PAGES + [os.path.join(ROOT, "README.md")]
QUOTE = re.compile(r"```python from (\S+)\n(.*?)```", flags=re.S)


def quotes(path):
    """(file, [lines]) for every block a page attributes to a file: a fence opened with
    ```python from minicnn/nn/conv.py"""
    return [(f, [l for l in body.splitlines() if l.strip()]) for f, body in QUOTE.findall(open(path).read())]


def test_the_layer_pages_quote_the_textbook_code():
    for page in ("conv2d.md", "batchnorm2d.md", "relu.md", "maxpool2d.md", "dropout.md", "linear.md",
                 "cross_entropy.md"):
        assert any(f.startswith("minicnn/nn/") for f, _ in quotes(os.path.join(DOCS, page))), page


@pytest.mark.parametrize("page", ALL_DOCS, ids=os.path.basename)
def test_every_quoted_line_is_in_the_file_it_names(page):
    """Each line of a quote, stripped, is a line of the named file (comments included): so a page
    cannot show code the file does not have."""
    for path, lines in quotes(page):
        full = os.path.join(ROOT, path)
        assert os.path.exists(full), f"{os.path.basename(page)} quotes {path}, which does not exist"
        have = {line.strip() for line in open(full)}
        missing = [line.strip() for line in lines if line.strip() not in have]
        assert not missing, f"{os.path.basename(page)} quotes lines that are not in {path}: {missing}"


CODE_PATH = re.compile(r"`((?:minicnn|tests|examples|benchmarks|docs)/[\w./-]+)`")
NAME_IN_FILE = re.compile(r"`([A-Za-z_]\w*)`(?:,? (?:and|or|/) `([A-Za-z_]\w*)`)* (?:in|from) (?:the file )?"
                          r"`((?:minicnn|tests|examples|benchmarks)/[\w/.-]+\.(?:py|cu))`")


@pytest.mark.parametrize("page", ALL_DOCS, ids=os.path.basename)
def test_named_files_exist_and_hold_what_the_page_says(page):
    """Every file a page names exists, and "`name` in `file`" names something the file defines."""
    text = open(page).read()
    for path in CODE_PATH.findall(text):
        assert os.path.exists(os.path.join(ROOT, path.rstrip("."))), f"{os.path.basename(page)} names {path}"
    for match in NAME_IN_FILE.finditer(text):
        path = match.group(match.lastindex)
        source = open(os.path.join(ROOT, path)).read()
        names = re.findall(r"`([A-Za-z_]\w*)`", match.group(0)[:match.group(0).rindex(" `")])
        for name in names:
            defined = rf"(?m)(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]|^\s*__global__.*\b{name}\("
            assert re.search(defined, source), f"{os.path.basename(page)}: `{name}` is not defined in {path}"


def test_a_wrong_quote_is_caught(tmp_path):
    """The check can fail: a line the file does not have (the old docs quoted `out = col @ w_mat.T`)."""
    page = tmp_path / "page.md"
    page.write_text("```python from minicnn/nn/conv.py\n        out = col @ w_mat.T\n```\n")
    with pytest.raises(AssertionError, match="not in minicnn/nn/conv.py"):
        test_every_quoted_line_is_in_the_file_it_names(str(page))
    page.write_text("see `off_kink` in `tests/conftest.py`\n")
    with pytest.raises(AssertionError, match="off_kink"):
        test_named_files_exist_and_hold_what_the_page_says(str(page))
