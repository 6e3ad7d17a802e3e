"""Batches: seeded shuffling, normalisation, augmentation, and prefetching in the background.

    loader = BatchLoader(images, labels, batch_size=64, shuffle=True, augment=Augment(),
                         mean=0.5, std=0.25, seed=0)
    for x, y in loader.epoch(3):          # x: float32 (N, 1, 48, 48), y: int64 (N,)
        ...

Epoch ``e`` always has the same order and the same augmentation (both drawn
from ``(seed, e, batch index)``), so a run resumed mid-epoch with
``loader.epoch(e, start_batch=k)`` sees exactly the batches it would have seen.
The next batch is prepared in a background thread while the current one trains.
"""
import queue
import threading

import numpy as np

from ..backend import to_device

__all__ = ["BatchLoader", "normalize"]


def normalize(images_uint8, mean, std, dtype=np.float32):
    """uint8 (N, H, W) or (N, 1, H, W) in 0..255 -> float (N, 1, H, W): (x/255 - mean) / std."""
    x = images_uint8.astype(dtype) * dtype(1.0 / 255.0)
    if x.ndim == 3:
        x = x[:, None]
    return (x - dtype(mean)) / dtype(std)


class BatchLoader:
    def __init__(self, images, labels, batch_size, shuffle=False, augment=None, mean=0.5, std=0.25,
                 seed=0, drop_last=False, device="cpu", prefetch=True, dtype=np.float32, shard=(0, 1)):
        """``shard=(rank, ranks)``: a data-parallel run's rank takes its slice of each global batch of
        ``batch_size`` images (the same seeded order on every rank; slices differ by at most one image)
        and loads only those; its augmentation draws from its own stream."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("no images to load")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.batch_size, self.shuffle, self.augment = int(batch_size), bool(shuffle), augment
        self.mean, self.std, self.seed = float(mean), float(std), int(seed)
        self.drop_last, self.device, self.prefetch = drop_last, device, prefetch
        self.dtype = np.dtype(dtype).type
        rank, ranks = (int(v) for v in shard)
        if not 0 <= rank < ranks:
            raise ValueError(f"shard must be (rank, ranks) with 0 <= rank < ranks, got {shard}")
        if ranks > self.batch_size:
            raise ValueError(f"a global batch of {self.batch_size} images cannot be shared by {ranks} ranks: "
                             f"use a batch size of at least {ranks}")
        self.rank, self.ranks = rank, ranks

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def global_batch_len(self, b):
        """How many images batch ``b`` has over all ranks."""
        return min(self.batch_size, len(self.images) - b * self.batch_size)

    def _batch(self, order, epoch, b):
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        if self.ranks > 1:
            idx = np.array_split(idx, self.ranks)[self.rank]          # this rank's slice
        x = to_device(normalize(self.images[idx], self.mean, self.std, dtype=self.dtype), self.device)
        if self.augment is not None:
            key = [self.seed, epoch, b, 1] + ([self.rank] if self.rank else [])   # (rank 0: a single process's)
            x = self.augment(x, np.random.default_rng(key))
        return x, self.labels[idx]

    def epoch(self, epoch=0, start_batch=0):
        """Iterate over the batches of epoch ``epoch``, starting at batch ``start_batch``."""
        order = self._order(epoch)
        batches = range(start_batch, len(self))
        if not self.prefetch:
            for b in batches:
                yield self._batch(order, epoch, b)
            return
        q, stop = queue.Queue(maxsize=2), threading.Event()

        def produce():
            try:
                for b in batches:
                    item = ("ok", self._batch(order, epoch, b))
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(("done", None))
            except BaseException as exc:         # hand any error to the consumer
                q.put(("error", exc))

        worker = threading.Thread(target=produce, daemon=True, name="minicnn-loader")
        worker.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            stop.set()
            worker.join(timeout=5)

    def __iter__(self):
        return self.epoch(0)
