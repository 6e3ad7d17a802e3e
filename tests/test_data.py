"""Datasets, augmentation and batching: FER2013 in both forms, built-in faces, bad input."""
import os

import numpy as np
import pytest
from PIL import Image

from minicnn.data import (EMOTIONS, Augment, BatchLoader, DatasetError, load_dataset, load_fer2013,
                          make_faces, normalize)
from minicnn.data.augment import random_affine, random_crop, random_erase, random_flip

FER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fer2013")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICNN_CACHE", str(tmp_path / "cache"))


def make_folder(root, per_class=2, splits=("train", "test"), emotions=EMOTIONS):
    rng = np.random.default_rng(0)
    for split in splits:
        for e in emotions:
            d = root / split / e
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(d / f"{split}_{i}.jpg")
    return root


def make_csv(path, rows):
    with open(path, "w") as f:
        f.write("emotion,pixels,Usage\n")
        for label, pixels, usage in rows:
            f.write(f"{label},{' '.join(map(str, pixels))},{usage}\n")
    return path


def test_folder_layout_loads_in_class_order_and_caches(tmp_path):
    root = make_folder(tmp_path / "fer")
    data = load_fer2013(root, progress=False)
    x, y = data["train"]
    assert x.shape == (14, 48, 48) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [2] * 7
    assert sorted(data) == ["classes", "test", "train"] and data["classes"] == EMOTIONS
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].endswith(".npz")
    assert not any(n.endswith(".npz") for _, _, files in os.walk(root) for n in files)   # never in the data
    again = load_fer2013(root, progress=False)
    np.testing.assert_array_equal(again["train"][0], x)
    # A changed source is read again (new fingerprint).
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(root / "train" / "happy" / "extra.jpg")
    assert len(load_fer2013(root, progress=False)["train"][1]) == 15


def test_csv_loads_three_splits(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(i % 7, rng.integers(0, 256, 2304), usage)
            for i, usage in enumerate(["Training"] * 14 + ["PublicTest"] * 7 + ["PrivateTest"] * 7)]
    data = load_fer2013(make_csv(tmp_path / "fer2013.csv", rows), progress=False)
    assert {k: len(v[1]) for k, v in data.items() if k != "classes"} == {"train": 14, "val": 7, "test": 7}
    np.testing.assert_array_equal(data["train"][0][0].ravel(), rows[0][1])
    splits, desc = load_dataset(str(tmp_path / "fer2013.csv"))
    assert "validation: PublicTest" in desc and len(splits["val"][1]) == 7


def test_folder_validation_is_a_stratified_slice_of_training(tmp_path):
    root = make_folder(tmp_path / "fer", per_class=10)
    splits, desc = load_dataset(str(root), val_fraction=0.2, seed=0)
    assert np.bincount(splits["val"][1]).tolist() == [2] * 7
    assert len(splits["train"][1]) == 56 and len(splits["test"][1]) == 70
    assert "PublicTest" in desc


def test_no_validation_split_trains_on_all_of_training(tmp_path):
    root = make_folder(tmp_path / "fer", per_class=10)
    splits, desc = load_dataset(str(root), val_fraction=0, seed=0)
    assert len(splits["train"][1]) == 70 and len(splits["val"][1]) == 0 and splits["val"][0].shape[1:] == (48, 48)
    assert "no validation: all of Training" in desc
    builtin, desc = load_dataset(None, val_fraction=0)                 # the built-in faces: theirs trained on
    assert len(builtin["val"][1]) == 0 and "no validation" in desc
    assert len(builtin["train"][1]) == sum(len(load_dataset(None)[0][k][1]) for k in ("train", "val"))
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
            load_dataset(str(root), val_fraction=bad)


@pytest.mark.parametrize("setup, message", [
    (lambda r: None, "no dataset at"),
    (lambda r: make_folder(r, splits=("train",)), "missing the 'test/' folder"),
    (lambda r: make_folder(r, emotions=EMOTIONS[:5]), "missing class folder"),
    (lambda r: (make_folder(r), (r / "train" / "bored").mkdir()), "unknown class folder"),
])
def test_bad_folder_layouts(tmp_path, setup, message):
    root = tmp_path / "fer"
    setup(root)
    with pytest.raises(DatasetError, match=message):
        load_fer2013(root, progress=False)


def test_empty_folder_layout(tmp_path):
    root = tmp_path / "fer"
    for split in ("train", "test"):
        for e in EMOTIONS:
            (root / split / e).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        load_fer2013(root, progress=False)


def test_undecodable_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "fer")
    bad = root / "train" / "sad" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_fer2013(root, progress=False)


@pytest.mark.parametrize("row, message", [
    ("3,1 2 3,Training", "line 3: expected 2304 pixel values"),
    ("9," + " ".join(["0"] * 2304) + ",Training", "line 3: emotion 9"),
    ("x," + " ".join(["0"] * 2304) + ",Training", "line 3: malformed"),
    ("1," + " ".join(["0"] * 2304) + ",Other", "line 3: unknown Usage"),
])
def test_csv_bad_row_names_the_line(tmp_path, row, message):
    path = tmp_path / "fer2013.csv"
    path.write_text("emotion,pixels,Usage\n0," + " ".join(["1"] * 2304) + ",Training\n" + row + "\n")
    with pytest.raises(DatasetError, match=message):
        load_fer2013(path, progress=False)


def test_csv_bad_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DatasetError, match="header"):
        load_fer2013(path, progress=False)


@pytest.mark.skipif(not os.path.isdir(FER), reason="FER2013 folder (../shared/data/fer2013) not present")
def test_real_fer2013_folder():
    data = load_fer2013(FER, progress=False)
    assert data["train"][0].shape == (28709, 48, 48) and data["test"][0].shape == (3589, 48, 48)
    assert np.bincount(data["train"][1]).tolist() == [3995, 436, 4097, 7215, 4830, 3171, 4965]


# --- built-in faces -----------------------------------------------------------------------

def test_builtin_faces_are_seeded_balanced_and_varied():
    x1, y1 = make_faces(70, seed=3)
    x2, y2 = make_faces(70, seed=3)
    np.testing.assert_array_equal(x1, x2)
    assert np.bincount(y1).tolist() == [10] * 7
    assert x1.dtype == np.uint8 and x1.shape == (70, 48, 48)
    assert not np.array_equal(make_faces(70, seed=4)[0], x1)
    assert x1.std() > 20


def test_default_dataset_is_builtin_and_says_so(monkeypatch):
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    data, desc = load_dataset(None)
    assert "built-in" in desc and set(data) == {"train", "val", "test", "classes"}


# --- augmentation and batches -----------------------------------------------------------------

def test_augmentations_keep_shape_dtype_and_are_seeded():
    x = normalize(make_faces(8, seed=0)[0], 0.5, 0.25)
    for fn in (random_crop, random_flip, random_affine, random_erase, Augment()):
        a = fn(x, np.random.default_rng(1))
        b = fn(x, np.random.default_rng(1))
        assert a.shape == x.shape and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_flip_and_crop_do_what_they_say():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)

    class Always:
        def random(self, n):
            return np.zeros(n)
    np.testing.assert_array_equal(random_flip(x, Always()), x[..., ::-1])
    shifted = random_crop(x, np.random.default_rng(0), pad=0)
    np.testing.assert_array_equal(shifted, x)
    # The identity affine (0 degrees, scale 1) returns the image unchanged.
    np.testing.assert_allclose(random_affine(x, np.random.default_rng(0), degrees=0, scale=0), x, atol=1e-5)


def test_loader_batches_shuffle_and_resume_mid_epoch():
    images, labels = make_faces(50, seed=0)
    loader = BatchLoader(images, labels, 16, shuffle=True, augment=Augment(), seed=5)
    batches = list(loader.epoch(2))
    assert len(batches) == len(loader) == 4
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    assert batches[0][0].shape == (16, 1, 48, 48) and batches[0][0].dtype == np.float32
    assert sorted(np.concatenate([y for _, y in batches]).tolist()) == sorted(labels.tolist())
    later = list(loader.epoch(2, start_batch=2))          # the same batches, from batch 2 on
    for (xa, ya), (xb, yb) in zip(batches[2:], later):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other = list(loader.epoch(3))
    assert not np.array_equal(other[0][1], batches[0][1])
    assert len(BatchLoader(images, labels, 16, drop_last=True)) == 3


def test_loader_reports_errors_from_the_background_thread():
    images, labels = make_faces(20, seed=0)

    def broken(x, rng):
        raise RuntimeError("augmentation exploded")
    with pytest.raises(RuntimeError, match="exploded"):
        list(BatchLoader(images, labels, 8, augment=broken).epoch(0))


def test_loader_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        BatchLoader(np.zeros((3, 48, 48), np.uint8), np.zeros(2), 2)
    with pytest.raises(ValueError, match="no images"):
        BatchLoader(np.zeros((0, 48, 48), np.uint8), np.zeros(0), 2)
