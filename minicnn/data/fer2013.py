"""FER2013: 48x48 grayscale faces, 7 emotions, in either form users have.

* the image-folder layout: ``train/<emotion>/*.jpg`` and ``test/<emotion>/*.jpg``
  (Training and PublicTest);
* Kaggle's ``fer2013.csv``: columns ``emotion,pixels,Usage`` with Usage in
  Training / PublicTest / PrivateTest, pixels as 2304 space-separated integers.

Class order is FER2013's: 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad,
5 surprise, 6 neutral. Decoded arrays are cached, compressed, in the user cache
directory (``$MINICNN_CACHE`` or ``~/.cache/minicnn``), keyed by a fingerprint
of the source (names, sizes, modification times), so a changed source is read
again and the data folder itself is never written to.

Get FER2013 from Kaggle ("Challenges in Representation Learning: Facial
Expression Recognition Challenge", ``fer2013.csv``) or as the image-folder layout.
"""
import csv
import hashlib
import io
import os
import sys

import numpy as np

from .errors import DatasetError
from .images import decode_face, image_extensions

__all__ = ["EMOTIONS", "DatasetError", "load_fer2013", "folder_classes", "cache_dir"]

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
_CACHE_VERSION = 2          # 2: keyed by content; images decoded by minicnn/data/images.py




def cache_dir():
    """Where decoded datasets are cached: $MINICNN_CACHE, else $XDG_CACHE_HOME/minicnn, else ~/.cache/minicnn."""
    root = os.environ.get("MINICNN_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minicnn")
    return root


# --- the folder layout ------------------------------------------------------------------

def _class_dirs(d):
    """The class folders in ``d``, sorted (hidden ones, like .ipynb_checkpoints, left out)."""
    return sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)) and not e.startswith("."))


def folder_classes(root):
    """The class names of a ``train/<class>/`` layout: FER2013's seven emotions in FER2013's order when
    those are the folders, else the folder names sorted (any labels, for fine-tuning)."""
    d = os.path.join(root, "train")
    if not os.path.isdir(d):
        raise DatasetError(f"{root}: missing the 'train/' folder (expected train/<class>/*.jpg and "
                           "test/<class>/*.jpg)")
    found = _class_dirs(d)
    if not found:
        raise DatasetError(f"{d}: no class folders (expected train/<class>/*.jpg)")
    if {f.lower() for f in found} == set(EMOTIONS):
        return EMOTIONS
    if len(found) < 2:
        raise DatasetError(f"{d}: one class folder ({found[0]}): a classifier needs at least two")
    return tuple(found)


def _folder_files(root, classes=EMOTIONS):
    """{split: [(path, label)]} for train/ and test/, after checking the layout."""
    splits = {}
    lower = [c.lower() for c in classes]
    for split in ("train", "test"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise DatasetError(f"{root}: missing the '{split}/' folder (expected train/<class>/*.jpg and "
                               f"test/<class>/*.jpg with classes {', '.join(classes)})")
        found = _class_dirs(d)
        unknown = [e for e in found if e.lower() not in lower]
        if unknown:
            raise DatasetError(f"{d}: unknown class folder(s) {', '.join(unknown)}; expected "
                               f"{', '.join(classes)} (the classes of train/)")
        missing = [c for c in classes if c.lower() not in {f.lower() for f in found}]
        if missing:
            raise DatasetError(f"{d}: missing class folder(s) {', '.join(missing)}")
        files, skipped, empty = [], [], []
        extensions = image_extensions()
        for e in found:
            label = lower.index(e.lower())
            entries = sorted(n for n in os.listdir(os.path.join(d, e)) if not n.startswith("."))  # (._*, .DS_Store)
            names = [n for n in entries if n.lower().endswith(extensions)
                     and os.path.isfile(os.path.join(d, e, n))]
            skipped += [os.path.join(e, n) for n in entries if n not in names]
            if not names:
                empty.append(e)
            files += [(os.path.join(d, e, n), label) for n in names]
        if skipped:
            print(f"minicnn: {d}: skipped {len(skipped)} entries that are not images Pillow opens "
                  f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})", file=sys.stderr)
        if empty and len(empty) < len(found):
            print(f"minicnn: {d}: no images in {', '.join(empty)}: the model will never see "
                  f"{'that class' if len(empty) == 1 else 'those classes'} in {split}", file=sys.stderr)
        if not files:
            raise DatasetError(f"{d}: no images found (expected {split}/<class>/*.jpg)")
        splits[split] = files
    return splits


def _decode(path):
    """The same decoding as predict's (minicnn/data/images.py): upright, grayscale, central square, 48x48."""
    return decode_face(path)


def _folder_fingerprint(root, splits):
    """A hash of every image's place, label and bytes: two sources share a cache entry only if they
    hold the same images (reading 30,000 small JPEGs takes about a second; decoding them, a minute)."""
    h = hashlib.blake2b(f"v{_CACHE_VERSION}".encode(), digest_size=12)
    for split, files in splits.items():
        for path, label in files:
            h.update(f"{split}/{os.path.relpath(path, root)}:{label}:".encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _file_fingerprint(path):
    h = hashlib.blake2b(f"v{_CACHE_VERSION}".encode(), digest_size=12)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_folder(splits, progress):
    out = {}
    for split, files in splits.items():
        it = files
        if progress:
            from tqdm import tqdm
            it = tqdm(files, desc=f"decoding {split}", unit="img", leave=False, file=sys.stderr)
        images = np.stack([_decode(p) for p, _ in it])
        out[split] = (images, np.array([lab for _, lab in files], dtype=np.int64))
    return {"train": out["train"], "test": out["test"]}


# --- the CSV ---------------------------------------------------------------------------------

def _refuse_binary(path):
    """A clear error for a file that is not a CSV at all (an image or an archive given as --data)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"PK\x03\x04", b"II*\x00", b"MM\x00*", b"RIFF")):
        raise DatasetError(f"{path} is an image or an archive, not a dataset: give the FER2013 folder (with "
                           "train/ and test/) or Kaggle's fer2013.csv")


def _read_csv(path):
    """Kaggle's fer2013.csv (checked by :func:`_refuse_binary` first)."""
    usage_to_split = {"training": "train", "publictest": "val", "privatetest": "test"}
    data = {s: ([], []) for s in ("train", "val", "test")}
    try:
        return _read_csv_rows(path, data, usage_to_split)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                           f"{exc.start} of a read block): is it fer2013.csv?") from None


def _read_csv_rows(path, data, usage_to_split):
    # utf-8-sig: a byte-order mark, which some editors write, is not part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"{path}: the file is empty") from None
        except csv.Error as exc:
            raise DatasetError(f"{path}: line 1: {exc}") from None
        try:
            ie, ip, iu = header.index("emotion"), header.index("pixels"), header.index("usage")
        except ValueError:
            raise DatasetError(f"{path}: line 1: expected the header emotion,pixels,Usage, got "
                               f"{','.join(header)}") from None
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DatasetError(f"{path}: line {reader.line_num}: {exc} (a stray quote?)") from None
            lineno = reader.line_num
            if not row:
                continue
            try:
                label = int(row[ie])
                pixels = np.array(row[ip].split(), dtype=np.int64)
                usage = row[iu].strip().lower()
            except (ValueError, IndexError) as exc:
                raise DatasetError(f"{path}: line {lineno}: malformed row ({exc})") from None
            if not 0 <= label < 7:
                raise DatasetError(f"{path}: line {lineno}: emotion {label} is not in 0..6")
            if pixels.size != 48 * 48:
                raise DatasetError(f"{path}: line {lineno}: expected 2304 pixel values (48x48), got {pixels.size}")
            if pixels.min() < 0 or pixels.max() > 255:
                bad = pixels[(pixels < 0) | (pixels > 255)][0]
                raise DatasetError(f"{path}: line {lineno}: pixel values must be in 0..255, got {bad}")
            if usage not in usage_to_split:
                raise DatasetError(f"{path}: line {lineno}: unknown Usage {row[iu]!r} "
                                   "(expected Training, PublicTest or PrivateTest)")
            imgs, labs = data[usage_to_split[usage]]
            imgs.append(pixels.astype(np.uint8).reshape(48, 48))
            labs.append(label)
    if not data["train"][0]:
        raise DatasetError(f"{path}: no Training rows")
    out = {}
    for split, (imgs, labs) in data.items():
        if imgs:
            out[split] = (np.stack(imgs), np.array(labs, dtype=np.int64))
    return out


# --- the public loader ---------------------------------------------------------------------

def load_fer2013(path, use_cache=True, progress=True, classes=EMOTIONS):
    """Load FER2013 from a folder or a CSV: {'train': (images, labels), 'test': ..., ['val': ...],
    'classes': names}.

    ``images`` are uint8 of shape (N, 48, 48); labels int64 in the order of ``classes``. The folder
    layout gives 'train' and 'test' (PublicTest); the CSV gives 'train', 'val' (PublicTest) and
    'test' (PrivateTest) when it has them. ``classes``: the class folders expected (default FER2013's
    seven emotions; a folder missing one is an error), a tuple of other names in their label order, or
    "any" for whatever ``train/`` holds (fine-tuning; see :func:`folder_classes`).
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise DatasetError(f"no dataset at {path}: give the FER2013 folder (with train/ and test/) "
                           "or Kaggle's fer2013.csv")
    if os.path.isdir(path):
        classes = folder_classes(path) if classes == "any" else tuple(classes)
        splits = _folder_files(path, classes)
        fingerprint = _folder_fingerprint(path, splits)
        def read():
            return _read_folder(splits, progress)
    else:
        _refuse_binary(path)
        if classes != "any" and tuple(c.lower() for c in classes) != EMOTIONS:
            raise DatasetError(f"{path}: a FER2013 CSV holds the seven emotions, not {', '.join(classes)}")
        classes = EMOTIONS
        fingerprint = _file_fingerprint(path)
        def read():
            return _read_csv(path)
    cache_file = os.path.join(cache_dir(), f"fer2013-{fingerprint}.npz")
    if use_cache and os.path.exists(cache_file):
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                cached = {s: (z[f"{s}_images"], z[f"{s}_labels"])
                          for s in ("train", "val", "test") if f"{s}_images" in z}
            if "train" in cached and all(im.ndim == 3 and im.shape[1:] == (48, 48) and len(im) == len(lab)
                                         for im, lab in cached.values()):
                return dict(cached, classes=tuple(classes))
        except Exception:              # (a damaged file: zip, npy or truncation errors of any kind)
            pass
        print(f"minicnn: the dataset cache {cache_file} is damaged: decoding again", file=sys.stderr)
    data = read()
    if use_cache:
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            buf = io.BytesIO()
            np.savez_compressed(buf, **{f"{s}_{k}": v for s, (im, lab) in data.items()
                                        for k, v in (("images", im), ("labels", lab))})
            tmp = cache_file + f".tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, cache_file)
        except OSError as exc:
            print(f"minicnn: could not write the dataset cache {cache_file}: {exc}", file=sys.stderr)
    return dict(data, classes=tuple(classes))
