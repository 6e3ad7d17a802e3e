"""Checkpoints and weights files: ``.npz`` (no pickle) plus readable JSON, written atomically.

Two layouts, both read by :func:`load_checkpoint`:

* a **training checkpoint** holds ``model/<name>`` arrays (the PyTorch-compatible state dict),
  ``optim/<key>`` arrays, and ``meta`` -- the JSON metadata as bytes (epoch, step, schedule and
  random states, recipe, normalisation, metrics); ``<file>.json`` beside it is the same metadata
  for people;
* a **weights file** (:func:`save_weights`, what ``minicnn export`` writes and minicnn ships) holds
  the state dict alone, under PyTorch's names and nothing else, so that
  ``torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(path).items()})`` works
  as it is; its metadata (classes, input normalisation, the card) is ``<file>.json`` beside it.

Files are written to a temporary name and renamed, so an interrupted save never leaves a
half-written file in place of the last good one.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "save_weights", "load_checkpoint", "atomic_write_bytes",
           "repair_sidecar", "remove_stale_temporaries"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, or from a different model."""


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, model_state, optim_state=None, meta=None):
    """Save a checkpoint atomically; ``meta`` must be JSON-serialisable."""
    import io
    meta = dict(meta or {})
    arrays = {f"model/{k}": np.asarray(v) for k, v in model_state.items()}
    for k, v in (optim_state or {}).items():
        arrays[f"optim/{k}"] = np.asarray(v)
    text = json.dumps(meta, indent=1, sort_keys=True, default=_json_default)
    arrays["meta"] = np.frombuffer(text.encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_bytes(os.path.splitext(path)[0] + ".json", text.encode())


def repair_sidecar(path):
    """Make ``<file>.json`` say what the checkpoint ``path`` holds (a kill between writing the two can
    leave the JSON one save behind). Returns True when it had to be rewritten."""
    if not os.path.exists(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                return False
            text = json.dumps(json.loads(bytes(z["meta"]).decode()), indent=1, sort_keys=True).encode()
    except Exception:
        return False
    side = os.path.splitext(path)[0] + ".json"
    try:
        with open(side, "rb") as f:
            if f.read() == text:
                return False
    except OSError:
        pass
    atomic_write_bytes(side, text)
    return True


def remove_stale_temporaries(folder):
    """Delete the ``.tmp-*`` files an interrupted save leaves (call only while no save runs there)."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(".tmp-"):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def save_weights(path, model_state, card):
    """A weights file: the state dict alone (PyTorch's names, nothing else) and ``card`` as JSON beside it."""
    import io
    text = json.dumps(card, indent=1, sort_keys=True, default=_json_default)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in model_state.items()})
    atomic_write_bytes(os.path.splitext(path)[0] + ".json", text.encode())
    atomic_write_bytes(path, buf.getvalue())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def load_checkpoint(path):
    """Return (model_state, optim_state, meta); raises CheckpointError with the file's name."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint (a run's checkpoint is OUT/best.npz)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":            # every .npz is a zip archive; anything else is refused unread
        raise CheckpointError(f"{path} is not a minicnn checkpoint or weights file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
            if "meta" in files:                                   # a training checkpoint
                meta = json.loads(bytes(z["meta"]).decode())
                model = {k[len("model/"):]: z[k] for k in files if k.startswith("model/")}
                optim = {k[len("optim/"):]: z[k] for k in files if k.startswith("optim/")}
            else:                                                 # a weights file: its card is beside it
                card = os.path.splitext(path)[0] + ".json"
                if not os.path.exists(card):
                    raise CheckpointError(f"{path} has no 'meta' entry and no card {card} beside it: not a minicnn "
                                          "checkpoint or weights file")
                with open(card) as f:
                    meta = json.load(f)
                model, optim = {k: z[k] for k in files}, {}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc} "
                              "(truncated or not a minicnn checkpoint?)") from None
    return model, optim, meta
