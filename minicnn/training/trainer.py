"""The training loop: a recipe, a Trainer, checkpoints that resume exactly, and evaluation.

    from minicnn.data import load_dataset
    from minicnn.training import Recipe, Trainer

    data, description = load_dataset()                 # built-in faces, or FER2013 with a path
    trainer = Trainer(data, Recipe(epochs=5), out_dir="runs/demo")
    trainer.fit()                                      # progress bars, log, checkpoints
    print(trainer.evaluate("test")["accuracy"])

One step is the whole of backprop by hand: forward, loss, ``model.backward``,
optional gradient clipping, ``optimizer.step``. Every epoch ends with a
validation pass, a line in ``log.jsonl``, ``last.npz`` and, when validation
accuracy improves, ``best.npz``. ``fit(resume=True)`` continues from
``last.npz`` -- even mid-epoch after Ctrl-C -- and ends with exactly the
weights an uninterrupted run would have.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .. import __version__, engines, rng as _rng
from ..backend import device_of, get_array_module, normalize_device, to_device, to_numpy
from ..data import EMOTIONS, Augment, BatchLoader, normalize
from ..models import EmotionClassifier
from ..nn import CrossEntropyLoss, DistillationLoss, no_grad
from ..optim import SGD, Adam, AdamW
from .checkpoint import (CheckpointError, atomic_write_bytes, load_checkpoint, remove_stale_temporaries,
                         repair_sidecar, save_checkpoint)
from .averaging import WeightAverage
from .distill import Teacher
from .metrics import classification_report
from .schedules import SCHEDULES, make_schedule

__all__ = ["Recipe", "PRESETS", "Trainer", "TrainingDiverged", "RecentRate", "predict_proba", "load_model", "clip_grad_norm", "train_step"]


class RecentRate:
    """Images per second over the last ``window`` steps of this epoch, for the progress bar.

    The first step a process runs is left out (it compiles kernels and fills caches: seconds, where
    a step takes milliseconds), so is the time between epochs (validation, saving), and nothing is
    shown until two steps have been timed."""

    def __init__(self, window=50):
        from collections import deque
        self.marks = deque(maxlen=window + 1)      # (time, images trained so far)
        self.images, self.warm = 0, False

    def start(self, now=None):
        """The epoch's steps begin now."""
        self.marks.clear()
        if self.warm:
            self.marks.append((time.perf_counter() if now is None else now, self.images))

    def step_done(self, images, now=None):
        self.images += images
        self.marks.append((time.perf_counter() if now is None else now, self.images))
        if not self.warm:                          # the warm-up step: timing starts at its end
            self.warm = True
            self.marks.clear()
            self.marks.append((time.perf_counter() if now is None else now, self.images))

    def rate(self):
        """Images per second, or None until two steps have been timed."""
        if len(self.marks) < 3:
            return None
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Recipe:
    """Everything that decides a training run (saved in every checkpoint and weights card)."""
    epochs: int = 50
    batch_size: int = 64
    optimizer: str = "sgd"              # sgd (Nesterov momentum) | adam | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"            # cosine (with warm-up) | step | plateau | plateau-cosine | constant
    warmup_epochs: float = 1.0
    plateau_factor: float = 0.5         # plateau schedules: the rate times this after
    plateau_patience: int = 3           # ... this many epochs without a better validation accuracy
    final_epochs: int = 0               # plateau-cosine: the last epochs decay to 0 (0: a tenth of them)
    label_smoothing: float = 0.1
    clip_grad_norm: float = 5.0         # 0: off
    dropout: float = 0.5
    augment: dict = field(default_factory=lambda: dataclasses.asdict(Augment(erase=0.0)))
    seed: int = 0
    # Fine-tuning: start from these weights (a checkpoint or weights file; None: from scratch), train
    # the features at this fraction of the rate, or freeze them ("features": the classifier only).
    init: str = None
    features_lr_scale: float = 1.0
    freeze: str = "none"
    # Validate, keep and ship a moving average of the weights with this decay per step (0: off;
    # 0.999 remembers about 1,000 steps): see minicnn/training/averaging.py.
    ema: float = 0.0
    # Distillation: also learn from these trained networks' mean probabilities at this temperature,
    # with this weight on their part (1 - it on the labels'): see minicnn/nn/distillation.py.
    teachers: list = None
    distill_weight: float = 0.5
    distill_temperature: float = 2.0

    def __post_init__(self):
        """Every value checked before any work: a clear ValueError naming the setting."""
        def number(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        def whole(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        checks = [
            ("epochs", whole(self.epochs) and self.epochs >= 1, "a whole number >= 1"),
            ("batch_size", whole(self.batch_size) and self.batch_size >= 1, "a whole number >= 1"),
            ("optimizer", self.optimizer in ("sgd", "adam", "adamw"), "sgd, adam or adamw"),
            ("lr", number(self.lr) and self.lr > 0, "a finite number > 0"),
            ("momentum", number(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", number(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("schedule", self.schedule in SCHEDULES, ", ".join(SCHEDULES)),
            ("plateau_factor", number(self.plateau_factor) and 0 < self.plateau_factor <= 1, "in (0, 1]"),
            ("plateau_patience", whole(self.plateau_patience) and self.plateau_patience >= 0, "a whole number >= 0"),
            ("final_epochs", whole(self.final_epochs) and self.final_epochs >= 0,
             "a whole number >= 0 (more than epochs: the whole run decays)"),
            ("warmup_epochs", number(self.warmup_epochs) and self.warmup_epochs >= 0, "a finite number >= 0"),
            ("label_smoothing", number(self.label_smoothing) and 0 <= self.label_smoothing <= 1, "in [0, 1]"),
            ("clip_grad_norm", number(self.clip_grad_norm) and self.clip_grad_norm >= 0,
             "a finite number >= 0 (0 turns clipping off)"),
            ("dropout", number(self.dropout) and 0 <= self.dropout < 1, "in [0, 1)"),
            ("seed", whole(self.seed) and self.seed >= 0, "a whole number >= 0"),
            ("init", self.init is None or isinstance(self.init, str), "a weights file or None"),
            ("features_lr_scale", number(self.features_lr_scale) and self.features_lr_scale >= 0,
             "a finite number >= 0"),
            ("freeze", self.freeze in ("none", "features"), "none or features"),
            ("ema", number(self.ema) and 0 <= self.ema < 1, "in [0, 1) (0 turns the average off)"),
            ("teachers", self.teachers is None or (isinstance(self.teachers, (list, tuple)) and len(self.teachers) > 0
                                                   and all(isinstance(t, str) and t for t in self.teachers)),
             "a non-empty list of weights files, or None"),
            ("distill_weight", number(self.distill_weight) and 0 <= self.distill_weight <= 1, "in [0, 1]"),
            ("distill_temperature", number(self.distill_temperature) and self.distill_temperature > 0,
             "a finite number > 0"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"recipe: {name} must be {what}, got {getattr(self, name)!r}")
        if self.augment is not None:
            if not isinstance(self.augment, dict):
                raise ValueError(f"recipe: augment must be a dict of Augment settings or None, got {self.augment!r}")
            Augment(**self.augment)          # (its own checks)

    @classmethod
    def preset(cls, name, **changes):
        """A named recipe (:data:`PRESETS`), with ``changes`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(PRESETS)}")
        return cls(**dict(PRESETS[name], **changes))

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Named recipes (``minicnn train --recipe NAME``; every value still changeable by its own option).
PRESETS = {
    # What the shipped weights were trained with: 50 epochs, cosine, light augmentation.
    "default": {},
    # Longer, with the published FER2013 ablations' choices (Khaireddin & Chen 2021): SGD with
    # Nesterov momentum at 0.01, reduce-on-plateau on validation accuracy (x0.75 after 5 epochs
    # without gain) ending in a cosine decay to 0 over the last 12 epochs, and stronger
    # augmentation: shifts up to 10 px (about 20%), zoom 0.8-1.2, rotation +-10 degrees, flips,
    # random erasing with p = 0.5. About 120 CPU-minutes on 2 cores.
    "fer2013-long": dict(epochs=120, lr=0.01, schedule="plateau-cosine", plateau_factor=0.75, plateau_patience=5,
                         final_epochs=12, augment=dict(crop=10, flip=True, rotate=10.0, scale=0.2, erase=0.5)),
}


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most ``max_norm`` (PyTorch's rule); returns the norm.

    On the GPU it reads nothing back: the norm, the factor min(1, max_norm / (norm + 1e-6)) and the
    scaling stay on the device (multiplying by exactly 1 changes nothing), and the norm is returned
    as a 0-d device array (``float()`` of it waits for the GPU)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = get_array_module(*grads)
    sq = sum((g.astype(np.float64) ** 2).sum() for g in grads)
    if xp is not np:
        total = xp.sqrt(sq)
        coef = xp.minimum(max_norm / (total + 1e-6), 1.0)
        for g in grads:
            g *= coef.astype(g.dtype)
        return total
    total = math.sqrt(float(sq))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


def train_step(model, criterion, optimizer, x, y, clip=0.0, soft=None):
    """One training step: forward, loss, backward, gradient clipping (``clip`` > 0), update.
    ``soft``: a teacher's probabilities for x, for a :class:`~minicnn.nn.DistillationLoss`.
    Returns the batch's loss and number of right answers as 0-d arrays on x's device (on a GPU,
    nothing is read back)."""
    logits = model(x)
    loss_fn = engines.loss_step(criterion, logits)     # (on a GPU, the engine's one-launch loss)
    loss = loss_fn.forward(logits, y) if soft is None else loss_fn.forward(logits, y, soft)
    correct = (logits.argmax(axis=1) == to_device(y, device_of(logits))).sum()
    model.backward(loss_fn.backward(), input_grad=False)
    if clip:
        clip_grad_norm(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad()
    return loss, correct


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(model, images, mean, std, batch_size=256, tta=False, device="cpu", session=None):
    """Class probabilities for uint8 images (N, 48, 48), in eval mode.

    With ``tta``, averages the probabilities over the image, its mirror, and
    the image shifted by 2 pixels in each direction (6 views). ``session``: an
    :class:`~minicnn.InferenceSession` of ``model`` to run instead of it (the predictor's).
    """
    forward = model if session is None else session.run
    was_training = model.training
    model.eval()
    out = []
    try:
        with no_grad():        # nothing is kept for backward: the engines' leaner inference
            for i in range(0, len(images), batch_size):
                x = normalize(images[i:i + batch_size], mean, std, dtype=model.dtype.type)
                views = [x]
                if tta:
                    views.append(x[..., ::-1])
                    for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)):
                        views.append(np.roll(x, (dy, dx), axis=(2, 3)))
                probs = np.mean([_softmax(to_numpy(forward(to_device(np.ascontiguousarray(v), device)))
                                          .astype(np.float64)) for v in views], axis=0)
                out.append(probs)
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, getattr(model, "num_classes", 7)))


def load_model(path, device="cpu"):
    """An EmotionClassifier and its metadata from a checkpoint or weights file (clear errors)."""
    state, _, meta = load_checkpoint(path)
    if not isinstance(meta, dict) or meta.get("model") != "EmotionClassifier":
        what = meta.get("model", "unknown") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} holds a {what!r} model, not an EmotionClassifier")
    # The number of classes comes from the weights' own shape, checked against the metadata, before
    # anything is allocated (a file's metadata alone must not choose the size of an allocation).
    head = state.get("classifier.4.weight")
    if head is None or getattr(head, "ndim", 0) != 2 or head.shape[1] != 512 or not 1 <= head.shape[0] <= 100000:
        raise CheckpointError(f"{path}: no valid classifier.4.weight of shape (classes, 512) "
                              f"(got {getattr(head, 'shape', None)})")
    num_classes = meta.get("num_classes", head.shape[0])
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes != head.shape[0]:
        raise CheckpointError(f"{path}: its metadata says num_classes={num_classes!r} but classifier.4.weight has "
                              f"shape {tuple(head.shape)}: {head.shape[0]} classes")
    model = EmotionClassifier(num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return model.to(device).eval(), meta


class RunFolderError(CheckpointError):
    """The output folder cannot be used for this run: another run holds it, or it is not a folder."""


def data_fingerprint(data):
    """A short hash of the training and validation images and labels: what --resume checks."""
    import hashlib
    h = hashlib.blake2b(digest_size=12)
    for split in ("train", "val"):
        for a in data[split]:
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


class _FolderLock:
    """An exclusive lock on OUT/.minicnn.lock for the length of a run (fcntl.flock: released by the
    operating system when the process ends, however it ends)."""

    def __init__(self, folder):
        self.path = os.path.join(folder, ".minicnn.lock")
        self.file = None

    def __enter__(self):
        import fcntl
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunFolderError(f"{os.path.dirname(self.path)} is in use by another minicnn run ({holder}); "
                                 "wait for it, or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        import fcntl
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


RUN_FILES = ("last.npz", "last.json", "best.npz", "best.json", "log.jsonl")


class Trainer:
    def __init__(self, data, recipe=None, out_dir="runs/minicnn", device="cpu", data_description="",
                 progress=True, log=None, cuda_graph=False, overwrite=False, dtype="float32"):
        """``cuda_graph``: on the GPU, replay each training step as a CUDA graph (see
        :mod:`minicnn.engines.gpu.graph`; SGD with momentum, Adam, AdamW); the results are those of
        eager steps. ``overwrite``: a new run may replace the run already in ``out_dir`` (else
        :meth:`fit` refuses, and ``fit(resume=True)`` continues it). ``dtype``: float32, or float64
        for exact comparisons (the tests')."""
        if cuda_graph and recipe is not None and recipe.teachers:
            raise ValueError("--cuda-graph with --teacher is not supported (the graph would have to capture "
                             "the teachers too): train without --cuda-graph")
        if cuda_graph and normalize_device(device) != "gpu":
            raise ValueError("cuda_graph=True needs device='gpu'")
        if cuda_graph:
            from ..engines.gpu.graph import check_cuda_graphs_possible
            check_cuda_graphs_possible()             # (before any work, where no product can be captured)
        self.recipe = recipe or Recipe()
        self.data, self.out_dir, self.device = data, out_dir, device
        self.cuda_graph = bool(cuda_graph)
        self.overwrite = bool(overwrite)
        self.data_description = data_description
        self.data_fingerprint = data_fingerprint(data)
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        r = self.recipe
        train_x, train_y = data["train"]
        # Mean and standard deviation of the training pixels (in 0..1), from their histogram.
        counts = np.bincount(np.asarray(train_x, dtype=np.uint8).reshape(-1), minlength=256)
        levels = np.arange(256) / 255.0
        self.mean = float((counts * levels).sum() / counts.sum())
        self.std = float(np.sqrt((counts * (levels - self.mean) ** 2).sum() / counts.sum()))
        _rng.manual_seed(r.seed)
        self.classes = tuple(data.get("classes") or EMOTIONS)
        if r.init:
            self.model = EmotionClassifier.from_pretrained(len(self.classes), r.init, dropout=r.dropout)
        else:
            self.model = EmotionClassifier(num_classes=len(self.classes), dropout=r.dropout)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.model.freeze_features(r.freeze == "features").to(device, dtype=self.dtype)
        if r.freeze == "features":
            if cuda_graph:
                raise ValueError("--cuda-graph with frozen features is not supported: train without it")
            params = self.model.classifier.parameters()
        else:
            params = self.model.parameters()
        if r.optimizer == "sgd":
            self.optimizer = SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.momentum > 0,
                                 weight_decay=r.weight_decay)
        elif r.optimizer == "adam":
            self.optimizer = Adam(params, lr=r.lr, weight_decay=r.weight_decay)
        elif r.optimizer == "adamw":
            self.optimizer = AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {r.optimizer!r}: use sgd, adam or adamw")
        if r.features_lr_scale != 1.0 and r.freeze == "none":
            if cuda_graph:
                raise ValueError("--cuda-graph with a separate rate for the features is not supported")
            self.optimizer.set_lr_scale(self.model.features.parameters(), r.features_lr_scale)
        self.criterion = CrossEntropyLoss(label_smoothing=r.label_smoothing)
        self.teacher = None
        if r.teachers:
            self.teacher = Teacher(r.teachers, r.distill_temperature, self.classes, self.mean, self.std, device,
                                   self.dtype)
            self.criterion = DistillationLoss(r.distill_temperature, r.distill_weight, r.label_smoothing)
        self.average = WeightAverage(self.model, r.ema) if r.ema else None
        augment = Augment(**r.augment) if r.augment else None
        self.train_loader = BatchLoader(train_x, train_y, r.batch_size, shuffle=True, augment=augment,
                                        mean=self.mean, std=self.std, seed=r.seed, drop_last=True, device=device,
                                        dtype=self.dtype)
        if len(self.train_loader) == 0:
            raise ValueError(f"{len(train_x)} training images make no full batch of {r.batch_size}")
        self.validating = len(data["val"][1]) > 0
        if not self.validating and r.schedule in ("plateau", "plateau-cosine"):
            raise ValueError(f"the {r.schedule} schedule follows the validation accuracy, and there is no validation "
                             "split (--val-fraction 0): choose another --schedule, or keep a validation split")
        self.schedule = make_schedule(r.schedule, r.lr, len(self.train_loader), r.epochs, r.warmup_epochs,
                                      r.plateau_factor, r.plateau_patience, r.final_epochs)
        self.history = []
        self.best_val_acc = -1.0
        self.epoch, self.batch = 0, 0                 # where training continues from
        self._partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self._stop_requested = False

    def request_stop(self):
        """Finish the current step, save ``last.npz`` and stop (what Ctrl-C does)."""
        self._stop_requested = True

    def _on_sigint(self, signum, frame):
        if self._stop_requested:                  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.log("\nCtrl-C: finishing this step, then saving (press again to stop at once)")
        self.request_stop()

    # --- checkpoints ---------------------------------------------------------------------
    def _meta(self, **extra):
        return dict(model="EmotionClassifier", num_classes=len(self.classes), classes=list(self.classes),
                    minicnn_version=__version__, recipe=dataclasses.asdict(self.recipe),
                    normalization={"mean": self.mean, "std": self.std, "input": "grayscale 48x48, x/255"},
                    data=self.data_description, epoch=self.epoch, batch=self.batch,
                    schedule=self.schedule.state_dict(), rng=self.model.rng_states(),
                    history=self.history, best_val_acc=self.best_val_acc, partial=self._partial,
                    data_fingerprint=self.data_fingerprint,
                    teacher_fingerprints=None if self.teacher is None else self.teacher.fingerprints,
                    average_steps=None if self.average is None else self.average.steps, **extra)

    def save(self, name, averaged=False):
        """Save a checkpoint, after checking that every array in it is finite (a diverged run saves
        nothing, so the last good checkpoint stays). With a weight average (``recipe.ema``) its arrays
        go beside the optimizer's (``ema/<name>``); ``averaged``: the model arrays are the average's
        (best.npz: what was validated, and what ships)."""
        state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.average is not None:
            ema = self.average.state_dict()
            optim_state.update({f"ema/{k}": v for k, v in ema.items()})
            if averaged:
                state = ema
        bad = [k for k, v in list(state.items()) + [(f"optimizer {k}", v) for k, v in optim_state.items()]
               if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            raise TrainingDiverged(f"{len(bad)} arrays hold NaN or inf at epoch {self.epoch}, batch {self.batch} "
                                   f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); nothing was saved, so "
                                   f"the last good checkpoint in {self.out_dir} is intact. Try a lower --lr.")
        path = os.path.join(self.out_dir, name)
        save_checkpoint(path, state, optim_state, self._meta())
        return path

    def resume(self, path=None):
        path = path or os.path.join(self.out_dir, "last.npz")
        state, optim_state, meta = load_checkpoint(path)
        if meta.get("model") != "EmotionClassifier":
            raise CheckpointError(f"{path} is not an EmotionClassifier checkpoint")
        if meta.get("recipe") and Recipe.from_dict(meta["recipe"]) != self.recipe:
            raise CheckpointError(f"{path} was trained with recipe {meta['recipe']}, not "
                                  f"{dataclasses.asdict(self.recipe)}: resume with the same settings")
        if meta.get("data_fingerprint") not in (None, self.data_fingerprint):
            raise CheckpointError(f"{path} was trained on other data ({meta.get('data') or 'unknown'}; fingerprint "
                                  f"{meta['data_fingerprint']}, this data's is {self.data_fingerprint}): resume with "
                                  "the same --data, --val-fraction and --seed")
        if self.teacher is not None and meta.get("teacher_fingerprints") != self.teacher.fingerprints:
            raise CheckpointError(f"{path} was trained with teachers whose files had other contents (fingerprints "
                                  f"{meta.get('teacher_fingerprints')}, now {self.teacher.fingerprints}): resume "
                                  "with the same teacher files")
        ema = {k[4:]: optim_state.pop(k) for k in list(optim_state) if k.startswith("ema/")}
        try:
            self.model.load_state_dict(state)
            self.optimizer.load_state_dict(optim_state)
            if self.average is not None:
                self.average.load_state_dict(ema, meta.get("average_steps") or 0)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        self.model.set_rng_states(meta["rng"])
        self.schedule.load_state_dict(meta["schedule"])
        self.epoch, self.batch = int(meta["epoch"]), int(meta["batch"])
        self.history, self.best_val_acc = meta["history"], float(meta["best_val_acc"])
        self._partial = meta["partial"]
        self.mean, self.std = meta["normalization"]["mean"], meta["normalization"]["std"]
        self.train_loader.mean, self.train_loader.std = self.mean, self.std
        if self.teacher is not None:
            self.teacher.mean, self.teacher.std = self.mean, self.std
        self.log(f"resumed from {path}: epoch {self.epoch + 1}, batch {self.batch}")
        return meta

    # --- one epoch -----------------------------------------------------------------------------
    # On the GPU the loop reads the losses (and accuracy counts) of this many steps at a time: each
    # read waits for the GPU, so reading every step would stop it from running ahead of Python.
    # A diverged loss is still caught, named by its batch, before anything is saved.
    GPU_READ_EVERY = 20

    def _train_epoch(self):
        r, model, opt = self.recipe, self.model, self.optimizer
        model.train()
        n_batches = len(self.train_loader)
        read_every = self.GPU_READ_EVERY if normalize_device(self.device) == "gpu" else 1
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=n_batches, initial=self.batch, desc=f"epoch {self.epoch + 1}/{r.epochs}",
                       unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True)
        p = self._partial
        pending = []          # (batch, lr, loss, number correct, batch size): still on the device
        step = self._step_function()

        def read_pending():
            for batch, lr, loss, correct, n in pending:
                loss = float(loss)
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss} at epoch {self.epoch + 1}, batch {batch + 1} "
                        f"(learning rate {lr:.3g}); stopped without saving, so the last good checkpoint "
                        f"in {self.out_dir} is intact. Try a lower --lr.")
                p["loss"] += loss * n
                p["correct"] += int(correct)
                p["seen"] += n
            if bar is not None and pending:
                bar.update(len(pending))
                images_per_s = rate.rate()
                bar.set_postfix(loss=f"{p['loss'] / p['seen']:.3f}", acc=f"{p['correct'] / p['seen']:.3f}",
                                lr=f"{opt.lr:.2g}", img_s="..." if images_per_s is None else f"{images_per_s:.0f}")
            pending.clear()

        t_last = time.perf_counter()
        rate = self.__dict__.setdefault("_rate", RecentRate())     # (kept across epochs: warm only once)
        rate.start(t_last)
        try:
            for x, y in self.train_loader.epoch(self.epoch, start_batch=self.batch):
                opt.lr = self.schedule.lr(self.epoch, self.batch)
                loss, correct = step(x, y)            # eager, or replayed as a CUDA graph
                if self.average is not None:
                    self.average.update(self.model)
                images = self._images_in(y)
                pending.append((self.batch, opt.lr, loss, correct, images))
                if len(pending) >= read_every:
                    read_pending()
                self.batch += 1
                now = time.perf_counter()
                p["seconds"] += now - t_last
                t_last = now
                rate.step_done(images, now)
                if self._stop_agreed():           # Ctrl-C: stop between steps, never inside one
                    read_pending()
                    raise KeyboardInterrupt
            read_pending()
        finally:
            if bar is not None:
                bar.close()

    def _step_function(self):
        """(x, y) -> (loss, number right): one eager training step, or one replay of a CUDA graph."""
        if not self.cuda_graph:
            r, teacher = self.recipe, self.teacher
            return lambda x, y: train_step(self.model, self.criterion, self.optimizer, x, y, r.clip_grad_norm,
                                           soft=None if teacher is None else teacher(x))
        if getattr(self, "_cuda_graph_step", None) is None:
            from ..engines.gpu.graph import CudaGraphStep
            self._cuda_graph_step = CudaGraphStep(self.model, self.criterion, self.optimizer,
                                                  clip_grad_norm=self.recipe.clip_grad_norm)
        return self._cuda_graph_step

    # (What a data-parallel run changes: minicnn.distributed.DistributedTrainer.)
    def _images_in(self, y):
        """How many images a step's loss and count of right answers stand for."""
        return len(y)

    def _stop_agreed(self):
        """Stop after this step? (Ctrl-C or request_stop.)"""
        return self._stop_requested

    def _validate(self, split="val"):
        x, y = self.data[split]
        probs = predict_proba(self.model, x, self.mean, self.std, device=self.device)
        loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())
        return loss, float((probs.argmax(1) == y).mean())

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, resume=False):
        """Train to ``recipe.epochs``; returns the history (one dict per epoch).

        The run folder belongs to this run while it trains (a lock: a second run into it stops at
        once). A new run refuses a folder that holds another run unless ``overwrite``; ``resume``
        continues the run in it (same recipe and data, or a clear error). Each epoch saves best.npz
        (when validation improved) before last.npz, then appends its log row, so a kill at any
        instant leaves checkpoints that load; on the next start the JSON beside each checkpoint is
        brought in line with it, the log is rewritten from the checkpoint's history, and stale
        temporary files are removed."""
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise RunFolderError(f"--out {self.out_dir} is a file, not a folder")
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create the run folder {self.out_dir}: {exc.strerror or exc}") from None
        with _FolderLock(self.out_dir):
            remove_stale_temporaries(self.out_dir)
            log_path = os.path.join(self.out_dir, "log.jsonl")
            if resume:
                for name in ("best.npz", "last.npz"):
                    repair_sidecar(os.path.join(self.out_dir, name))
                self.resume()
                atomic_write_bytes(log_path, "".join(json.dumps(row) + "\n" for row in self.history).encode())
            else:
                held = [f for f in RUN_FILES if os.path.exists(os.path.join(self.out_dir, f))]
                if held and not self.overwrite:
                    raise RunFolderError(f"{self.out_dir} holds another run ({', '.join(held)}): continue it with "
                                         "--resume, choose another --out, or replace it with --overwrite")
                for f in held:
                    os.remove(os.path.join(self.out_dir, f))
                atomic_write_bytes(log_path, b"")
                if self.teacher is not None:
                    self._describe_teacher()
            return self._fit_epochs_with_ctrl_c(log_path)

    def _describe_teacher(self):
        """Log the teachers, and their mean's validation accuracy: what the student may approach."""
        t = self.teacher
        what = f"distillation from {len(t)} teacher{'s' if len(t) > 1 else ''} ({', '.join(t.paths)}), " \
               f"temperature {t.temperature:g}, weight {self.recipe.distill_weight:g} on their part"
        if self.validating:
            x, y = self.data["val"]
            right = 0
            for i in range(0, len(y), 256):
                xb = to_device(normalize(x[i:i + 256], self.mean, self.std, dtype=self.dtype.type), self.device)
                right += int((to_numpy(t(xb)).argmax(1) == y[i:i + 256]).sum())
            what += f"; their mean's validation accuracy {right / len(y):.3f}"
        self.log(what)

    def _fit_epochs_with_ctrl_c(self, log_path):
        """:meth:`_fit_epochs` with Ctrl-C finishing the current step (:meth:`request_stop`)."""
        self._stop_requested = False
        handler = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            return self._fit_epochs(log_path)
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)

    def _fit_epochs(self, log_path):
        while self.epoch < self.recipe.epochs:
            try:
                self._train_epoch()
            except KeyboardInterrupt:
                if self._stop_requested:       # stopped cleanly between two steps: resumable exactly
                    path = self.save("last.npz")
                    self.log(f"interrupted: saved {path} at epoch {self.epoch + 1}, batch {self.batch}; "
                             f"continue with --resume")
                else:
                    self.log("interrupted inside a step: kept the last checkpoint as it was")
                raise
            p = self._partial
            val_loss = val_acc = None             # (no validation split: no selection, the last epoch is kept)
            live = {}
            if self.validating:
                with self.averaged_weights():
                    val_loss, val_acc = self._validate()
                if self.average is not None:      # the live weights too: what the average gains
                    live_loss, live_acc = self._validate()
                    live = dict(val_loss_live=live_loss, val_acc_live=live_acc)
            if val_loss is not None and not math.isfinite(val_loss):
                raise TrainingDiverged(f"the validation loss became {val_loss} after epoch {self.epoch + 1}; "
                                       f"nothing was saved, so the last good checkpoint in {self.out_dir} is intact. "
                                       "Try a lower --lr.")
            self.schedule.end_epoch(val_acc)
            row = dict(epoch=self.epoch + 1, train_loss=p["loss"] / max(p["seen"], 1),
                       train_acc=p["correct"] / max(p["seen"], 1), val_loss=val_loss, val_acc=val_acc,
                       lr=self.optimizer.lr, seconds=p["seconds"], images_per_s=p["seen"] / max(p["seconds"], 1e-9),
                       **live)
            self.history.append(row)
            improved = val_acc is None or val_acc > self.best_val_acc
            self.best_val_acc = self.best_val_acc if val_acc is None else max(self.best_val_acc, val_acc)
            self.epoch, self.batch = self.epoch + 1, 0
            self._partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            if improved:                       # best first: last.npz, written next, already says it is best
                self.save("best.npz", averaged=True)
            self.save("last.npz")
            if log_path is not None:           # (rewritten from last.npz's history on --resume)
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            validation = ("no validation" if val_acc is None else
                          f"val loss {val_loss:.3f} acc {val_acc:.3f}{' (best)' if improved else ''}"
                          + (f" (live weights: {live['val_acc_live']:.3f})" if live else ""))
            self.log(f"epoch {row['epoch']}/{self.recipe.epochs}: train loss {row['train_loss']:.3f} "
                     f"acc {row['train_acc']:.3f} | {validation} | lr {row['lr']:.3g} | {row['images_per_s']:.0f} img/s")
        return self.history

    def averaged_weights(self):
        """A context in which the model holds the weight average (``recipe.ema``; else its own)."""
        return contextlib.nullcontext() if self.average is None else self.average.swapped_in(self.model)

    def evaluate(self, split="test", tta=False, weights="best"):
        """Metrics on a split with the best (or current: with ``recipe.ema``, averaged) weights."""
        model = self.model
        if weights == "best" and os.path.exists(os.path.join(self.out_dir, "best.npz")):
            model, _ = load_model(os.path.join(self.out_dir, "best.npz"), self.device)
        x, y = self.data[split]
        with contextlib.nullcontext() if model is not self.model else self.averaged_weights():
            probs = predict_proba(model, x, self.mean, self.std, tta=tta, device=self.device)
        report = classification_report(y, probs.argmax(1), self.classes)
        report["probs"] = probs
        return report
