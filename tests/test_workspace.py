"""The fast path's pool of work arrays: reuse only what nobody holds."""
import numpy as np
import pytest

import minicnn
from minicnn.engines.cpu import workspace
from minicnn.models import EmotionClassifier

BIG = (256, 1024)          # 1 MiB of float32: pooled


@pytest.fixture(autouse=True)
def fresh_pool():
    workspace.clear()
    old = workspace.set_limit(1 << 30)
    yield
    workspace.set_limit(old)
    workspace.clear()


def test_a_released_buffer_is_reused():
    a = workspace.empty(BIG, np.float32)
    addr = a.__array_interface__["data"][0]
    del a
    b = workspace.empty(BIG, np.float32)
    assert b.__array_interface__["data"][0] == addr
    assert workspace.stats()["buffers"] == 1


def test_a_held_array_or_view_is_never_handed_out_again():
    a = workspace.empty(BIG, np.float32)
    a[:] = 1.0
    b = workspace.empty(BIG, np.float32)
    b[:] = 2.0
    assert not np.shares_memory(a, b) and (a == 1.0).all()
    view = b.T[::2]              # only a view of b survives
    del b
    c = workspace.empty(BIG, np.float32)
    c[:] = 3.0
    assert not np.shares_memory(c, view) and (view == 2.0).all()
    assert workspace.stats() == {"buffers": 3, "bytes": 3 * 4 * 256 * 1024, "free": 0}


def test_same_bytes_other_shape_and_dtype_share_a_buffer():
    a = workspace.empty(BIG, np.float32)
    addr = a.__array_interface__["data"][0]
    del a
    b = workspace.empty((1024, 128), np.float64)
    assert b.shape == (1024, 128) and b.dtype == np.float64 and b.flags.c_contiguous
    assert b.__array_interface__["data"][0] == addr


def test_small_arrays_are_not_pooled():
    a = workspace.empty((10, 10), np.float32)
    assert a.shape == (10, 10) and workspace.stats()["buffers"] == 0


def test_limit_forgets_least_recently_used_buffers():
    workspace.set_limit(2 * 4 * 256 * 1024)
    arrays = [workspace.empty(BIG, np.float32) for _ in range(3)]
    assert workspace.stats()["buffers"] == 2       # the oldest was forgotten ...
    for i, a in enumerate(arrays):
        a[:] = i
    assert [float(a[0, 0]) for a in arrays] == [0.0, 1.0, 2.0]   # ... but stays valid for its holder
    with pytest.raises(ValueError, match=">= 0"):
        workspace.set_limit(-1)
    workspace.set_limit(0)
    assert workspace.stats()["buffers"] == 0
    workspace.empty(BIG, np.float32)
    assert workspace.stats()["buffers"] == 0


def test_default_limit_is_a_quarter_of_memory_but_at_least_a_gibibyte():
    import os
    limit = workspace.default_limit()
    assert limit >= 1 << 30
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limit == max(1 << 30, physical // 4)


def test_limit_forgets_a_buffer_that_is_not_first_of_its_size():
    """The least recently used buffer can sit anywhere in its size's list (found at batch 1024)."""
    workspace.set_limit(2 * 4 * 256 * 1024)
    a, b = workspace.empty(BIG, np.float32), workspace.empty(BIG, np.float32)
    del a
    a = workspace.empty(BIG, np.float32)           # reuses the first buffer: now the second is the oldest
    c = workspace.empty(BIG, np.float32)           # a third, over the limit: the second is forgotten
    assert workspace.stats()["buffers"] == 2
    for i, arr in enumerate((a, b, c)):
        arr[:] = i
    assert [float(arr[0, 0]) for arr in (a, b, c)] == [0.0, 1.0, 2.0]


def test_training_steps_reuse_memory_and_keep_results_the_user_holds():
    minicnn.manual_seed(0)
    model = EmotionClassifier()
    crit = minicnn.nn.CrossEntropyLoss()
    x = np.random.default_rng(0).standard_normal((8, 1, 48, 48)).astype(np.float32)
    y = np.arange(8) % 7
    model.train()
    feats = model.features(x)                      # the user keeps an intermediate result
    kept = feats.copy()
    for _ in range(3):
        crit.forward(model(x), y)
        model.backward(crit.backward(), input_grad=False)
    np.testing.assert_array_equal(feats, kept)
    before = workspace.stats()["buffers"]
    crit.forward(model(x), y)
    model.backward(crit.backward(), input_grad=False)
    assert workspace.stats()["buffers"] == before  # steady state: no new buffers
