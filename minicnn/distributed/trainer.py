"""DistributedTrainer: the Trainer on N ranks, data-parallel, equal to one process on the global batch.

Every rank holds a whole replica of the model. Each step (:func:`distributed_train_step`)::

    rank r: its slice of the global batch (n_r of n images, the same seeded order everywhere)
            forward, loss L_r = mean over its n_r images
            dL/dlogits scaled by n_r / n        # its share of the global mean's gradient
            backward                            # (--bn sync: BatchNorm's sums all-reduced inside)
    all ranks: one all-reduce of one flat buffer of every gradient (+ the loss and the count of
               right answers), then the same clipping and optimizer step on every replica

so the sum over ranks is exactly the gradient of the mean loss over the global batch, however
unevenly it divides. BatchNorm, ``bn="local"``: each rank normalises with its own slice's
statistics (no communication; the running statistics are averaged over the ranks before every
evaluation and save -- the update is linear, so averaging then updating equals updating then
averaging); ``bn="sync"``: the global batch's statistics (:class:`SyncBatchNorm2d`), so N ranks
compute what one process computes.

Rank 0 alone logs, shows progress and writes the run folder (atomically, then a barrier); resume
reads rank 0's checkpoint and hands it to every rank. A stop (Ctrl-C on any rank) is agreed on
between steps, so all ranks stop after the same step and the checkpoint resumes exactly.
"""
import contextlib
import os
import tempfile
import threading

import numpy as np

from ..data import Augment, BatchLoader
from ..nn import CrossEntropyLoss, DistillationLoss
from ..training.checkpoint import CheckpointError
from ..training.metrics import classification_report
from ..training.trainer import Trainer, clip_grad_norm, load_model, predict_proba
from .. import engines
from ..backend import device_of, to_device, to_numpy
from .batchnorm import convert_sync_batchnorm
from .comm import SingleProcess
from .gradients import FlatGradients, flat_copy

__all__ = ["DistributedTrainer", "distributed_train_step", "BN_MODES"]

BN_MODES = ("local", "sync")
_building = threading.Lock()


def distributed_train_step(model, criterion, optimizer, grads, x, y, global_n, clip=0.0, soft=None):
    """One data-parallel step on this rank's slice (x, y) of a global batch of ``global_n`` images
    (``soft``: a teacher's probabilities for x, for a DistillationLoss). Returns the global batch's
    mean loss and number of right answers (0-d arrays on x's device)."""
    logits = model(x)
    loss_fn = engines.loss_step(criterion, logits)
    loss = loss_fn.forward(logits, y) if soft is None else loss_fn.forward(logits, y, soft)  # mean of n_r images
    correct = (logits.argmax(axis=1) == to_device(y, device_of(logits))).sum()
    share = len(y) / global_n                               # n_r / n
    model.backward(loss_fn.backward() * logits.dtype.type(share), input_grad=False)
    grads.extras[0] = loss * share                          # summed: the global mean loss
    grads.extras[1] = correct                               # summed: the global count
    grads.allreduce()                                       # one call: every gradient, summed
    if clip:
        clip_grad_norm(optimizer.params, clip)
    optimizer.step()
    optimizer.zero_grad()
    return grads.extras[0].copy(), grads.extras[1].copy()


class DistributedTrainer(Trainer):
    def __init__(self, data, recipe=None, comm=None, bn="local", **kwargs):
        """``comm``: a communicator (:mod:`minicnn.distributed.comm`); ``bn``: 'local' or 'sync'.
        The other arguments are :class:`~minicnn.training.Trainer`'s; every rank passes the same."""
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
        if kwargs.get("cuda_graph"):
            raise ValueError("--cuda-graph with --distributed is not supported yet: the graph would have to "
                             "capture the NCCL all-reduce; train without --cuda-graph")
        comm = comm or SingleProcess()
        self.comm, self.bn = comm, bn
        self.rank, self.ranks = comm.rank, comm.size
        if self.rank != 0:                                   # rank 0 alone speaks
            kwargs["progress"] = False
            kwargs["log"] = lambda msg: None
        with _building:        # (ranks that are threads of one process share minicnn's seed sequence)
            super().__init__(data, recipe, **kwargs)
        r = self.recipe
        self._check_criterion()
        # The same data on every rank, or a clear error (not a silently different model).
        prints = comm.allgather_object(self.data_fingerprint)
        if len(set(prints)) != 1:
            raise CheckpointError(f"the ranks loaded different data (fingerprints {prints}): give every rank the "
                                  "same --data, --val-fraction and --seed")
        if bn == "sync":
            convert_sync_batchnorm(self.model, comm)
        self._broadcast_replica()
        self._seed_rank_streams()
        train_x, train_y = data["train"]
        augment = Augment(**r.augment) if r.augment else None
        self.train_loader = BatchLoader(train_x, train_y, r.batch_size, shuffle=True, augment=augment,
                                        mean=self.mean, std=self.std, seed=r.seed, drop_last=True,
                                        device=self.device, dtype=self.dtype, shard=(self.rank, self.ranks))
        self.grads = FlatGradients(self.optimizer.params, comm, extras=2)
        self._stop_flag = np.zeros(1, dtype=np.int64)
        self.log(f"data-parallel: {self.ranks} ranks ({comm.name}), global batch {r.batch_size} "
                 f"({-(-r.batch_size // self.ranks)} or fewer images per rank), BatchNorm {bn}, one all-reduce "
                 f"of {self.grads.nbytes / 1e6:.1f} MB per step")

    def _check_criterion(self):
        hard = self.criterion.hard if isinstance(self.criterion, DistillationLoss) else self.criterion
        if not isinstance(hard, CrossEntropyLoss) or hard.weight is not None:
            raise ValueError("data-parallel training scales an unweighted mean loss; a class-weighted loss "
                             "is not supported")

    # --- replicas --------------------------------------------------------------------------
    def _replica_arrays(self):
        """What must be the same on every rank: parameters, float buffers, optimizer state."""
        arrays = [p.data for p in self.model.parameters()]
        arrays += [b for _, b in self.model.named_buffers() if b.dtype.kind == "f"]
        if self.average is not None:
            arrays += [a for a in self.average.avg.values() if a.dtype.kind == "f"]
        arrays += [v for state in self.optimizer.state for v in state.values() if hasattr(v, "shape")]
        return arrays

    def _broadcast_replica(self):
        """Every rank built the same model from the same seed; rank 0's copy wins, to be sure."""
        flat, write_back = flat_copy(self._replica_arrays())
        write_back(self.comm.bcast(flat, root=0))

    def _seed_rank_streams(self):
        """Dropout draws from a stream of its own on every rank (rank 0 keeps the single-process one)."""
        if self.rank == 0:
            return
        for i, (name, m) in enumerate(self.model.named_modules()):
            if hasattr(m, "get_rng_state"):
                m.rng = np.random.default_rng([self.recipe.seed, self.rank, i])

    def check_replicas(self):
        """Every rank's replica should be bit-identical (the same summed gradients, the same update).
        If one is not, say so and copy rank 0's to every rank, so the run goes on as one model.
        Returns True when they agreed."""
        flat, _ = flat_copy(self._replica_arrays())
        flat = to_numpy(flat)
        seen = self.comm.allgather_object((float(flat.sum()), float(np.abs(flat).sum())))
        if all(s == seen[0] for s in seen):
            return True
        self.log(f"warning: the ranks' replicas differ (checksums {seen}); every rank now continues from rank 0's")
        self._broadcast_replica()
        return False

    def _average_batchnorm_statistics(self):
        """bn='local': every rank's running statistics := their mean over the ranks."""
        if self.bn != "local" or self.ranks == 1:
            return
        buffers = list(self.model.named_buffers())
        if self.average is not None:          # (the average of each rank's statistics: averaged alike)
            buffers += list(self.average.avg.items())
        for name, b in buffers:
            if name.endswith(("running_mean", "running_var")):
                self.comm.allreduce(b)
                b *= b.dtype.type(1.0 / self.ranks)

    # --- the step --------------------------------------------------------------------------------
    def _step_function(self):
        r, loader, teacher = self.recipe, self.train_loader, self.teacher
        return lambda x, y: distributed_train_step(self.model, self.criterion, self.optimizer, self.grads, x, y,
                                                   loader.global_batch_len(self.batch), r.clip_grad_norm,
                                                   soft=None if teacher is None else teacher(x))

    def _images_in(self, y):
        return self.train_loader.global_batch_len(self.batch)

    def _stop_agreed(self):
        self._stop_flag[0] = int(self._stop_requested)
        self.comm.allreduce(self._stop_flag)                 # (a tiny host all-reduce: no GPU wait)
        self._stop_requested = bool(self._stop_flag[0])
        return self._stop_requested

    # --- evaluation: each rank its shard, the counts all-reduced ----------------------------------
    def _shard(self, n):
        bounds = np.linspace(0, n, self.ranks + 1).astype(int)
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def _validate(self, split="val"):
        self._average_batchnorm_statistics()
        x, y = self.data[split]
        part = self._shard(len(y))
        probs = predict_proba(self.model, x[part], self.mean, self.std, device=self.device)
        picked = probs[np.arange(len(probs)), y[part]]
        sums = np.array([-np.log(np.maximum(picked, 1e-12)).sum(), (probs.argmax(1) == y[part]).sum()],
                        dtype=np.float64)
        self.comm.allreduce(sums)
        return float(sums[0] / max(len(y), 1)), float(sums[1] / max(len(y), 1))

    def evaluate(self, split="test", tta=False, weights="best"):
        """Metrics on a split (sharded over the ranks) with the best (or current) weights."""
        model = self.model
        if weights == "best":
            with self._rank0_file(os.path.join(self.out_dir, "best.npz")) as path:
                if path is not None:
                    model, _ = load_model(path, self.device)
                    model.to(dtype=self.dtype)
        else:
            self._average_batchnorm_statistics()
        x, y = self.data[split]
        part = self._shard(len(y))
        with contextlib.nullcontext() if model is not self.model else self.averaged_weights():
            probs = predict_proba(model, x[part], self.mean, self.std, tta=tta, device=self.device)
        probs = np.concatenate(self.comm.allgather_object(probs))     # (in order: the shards are contiguous)
        report = classification_report(y, probs.argmax(1), self.classes)
        report["probs"] = probs
        return report

    # --- the run folder: rank 0 writes, every rank reads what rank 0 read ---------------------------
    @contextlib.contextmanager
    def _rank0_file(self, path):
        """Rank 0's file ``path`` as a local path on every rank (rank 0 reads it and broadcasts the
        bytes; the others get a temporary copy), or None where rank 0 has no such file."""
        blob = None
        if self.rank == 0 and os.path.isfile(path):
            with open(path, "rb") as f:
                blob = f.read()
        blob = self.comm.bcast_object(blob, root=0)
        if blob is None or self.rank == 0:
            yield path if blob is not None else None
            return
        with tempfile.TemporaryDirectory(prefix="minicnn-rank") as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            with open(local, "wb") as f:
                f.write(blob)
            yield local

    def _meta(self, **extra):
        return super()._meta(world_size=self.ranks, bn=self.bn, rank_rng=getattr(self, "_rank_rng", None), **extra)

    def save(self, name, averaged=False):
        """Collective: every rank calls it; statistics averaged (bn local), every rank's random state
        gathered, rank 0 writes, then all wait for it."""
        self._average_batchnorm_statistics()
        self.check_replicas()
        self._rank_rng = self.comm.allgather_object(self.model.rng_states())
        path = None
        error = None
        if self.rank == 0:
            try:
                path = super().save(name, averaged)
            except Exception as exc:          # (every rank raises it, after the barrier)
                error = exc
        error = self.comm.bcast_object(None if error is None else (type(error), str(error)), root=0)
        if error is not None:
            raise error[0](error[1])
        return path

    def resume(self, path=None):
        """Every rank continues from rank 0's checkpoint (read there, handed to the others)."""
        path = path or os.path.join(self.out_dir, "last.npz")
        with self._rank0_file(path) as local:
            if local is None:
                raise CheckpointError(f"no checkpoint at {path} (on rank 0) to resume from")
            meta = super().resume(local)
        ranks_then = meta.get("world_size", 1)
        states = meta.get("rank_rng")
        if ranks_then == self.ranks and states:
            self.model.set_rng_states(states[self.rank])
        else:
            self._seed_rank_streams_at(self.epoch, self.batch)
            self.log(f"resuming a run of {ranks_then} rank(s) on {self.ranks}: the weights, optimizer, schedule "
                     f"and data order continue with the same global batch of {self.recipe.batch_size}, but each "
                     "rank's slice of it, its augmentation and its dropout masks are new, so the run is not "
                     f"bit-identical to one that kept {ranks_then} rank(s)")
        return meta

    def _seed_rank_streams_at(self, epoch, batch):
        for i, (name, m) in enumerate(self.model.named_modules()):
            if hasattr(m, "get_rng_state"):
                m.rng = np.random.default_rng([self.recipe.seed, self.rank, i, epoch, batch, self.ranks])

    def fit(self, resume=False):
        """Rank 0 takes the run folder (lock, checks, log) exactly as :meth:`Trainer.fit`; the other
        ranks follow it through the same collective steps without touching the folder."""
        if self.rank == 0:
            return super().fit(resume)
        if resume:
            self.resume()
        return self._fit_epochs_with_ctrl_c(None)
