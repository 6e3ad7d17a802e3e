"""A moving average of the weights over the training steps (Polyak averaging, as an EMA).

Late in training, SGD's weights bounce around a minimum rather than settle in it; their running
average sits nearer its middle and usually generalises better (Polyak & Juditsky 1992). After
step t, every parameter w and its average a::

    a <- d_t a + (1 - d_t) w,        d_t = min(decay, (1 + t) / (10 + t))

The warm-up in d_t lets the average follow the weights during the first steps instead of
remembering the random start (decay 0.999 is reached after some 9,000 steps; its memory is then
about 1 / (1 - decay) = 1,000 steps, 2.5 FER2013 epochs at batch 64). BatchNorm's running
statistics are averaged the same way, so the averaged network needs no extra pass over the data to
get statistics that fit its weights (counters such as num_batches_tracked are copied).

It is still one network of the same size: validation, ``best.npz`` and the final evaluation use the
average; the optimizer keeps stepping the live weights.
"""
import contextlib

from ..backend import get_array_module, to_numpy

__all__ = ["WeightAverage"]


class WeightAverage:
    """The moving average of ``model``'s parameters and float buffers (see the module's docstring)."""

    def __init__(self, model, decay):
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.steps = 0
        self.avg = {name: a.copy() for name, a in self._live(model)}

    @staticmethod
    def _live(model):
        """(name, array) of every parameter and buffer, named as in the state dict."""
        yield from ((name, p.data) for name, p in model.named_parameters())
        yield from model.named_buffers()

    def rate(self):
        """d_t for the next update."""
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    def update(self, model):
        """Fold the model's current weights into the average (after each optimizer step)."""
        d = self.rate()
        for name, w in self._live(model):
            a = self.avg[name]
            if a.dtype.kind == "f":
                a += (w - a) * (1 - d)              # = d a + (1 - d) w
            else:
                a[...] = w                           # (a counter)
        self.steps += 1

    @contextlib.contextmanager
    def swapped_in(self, model):
        """The model holds the averaged weights inside the block and its own ones again after it
        (copied in place: arrays other code holds, a CUDA graph's say, stay valid)."""
        live = list(self._live(model))
        saved = [w.copy() for _, w in live]
        try:
            for name, w in live:
                w[...] = self.avg[name]
            yield model
        finally:
            for (_, w), s in zip(live, saved):
                w[...] = s

    # --- checkpoints: arrays under "ema/<name>" beside the optimizer's, and the step count ---------
    def state_dict(self):
        """Host copies of the averages, named as the model's state dict."""
        return {name: to_numpy(a).copy() for name, a in self.avg.items()}

    def load_state_dict(self, state, steps):
        missing = sorted(set(self.avg) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {', '.join(missing[:5])}")
        for name, a in self.avg.items():
            value = state[name]
            if tuple(value.shape) != tuple(a.shape):
                raise ValueError(f"the checkpoint's weight average of {name} has shape {tuple(value.shape)}, "
                                 f"the model's {tuple(a.shape)}")
            xp = get_array_module(a)
            a[...] = xp.asarray(value, dtype=a.dtype)
        self.steps = int(steps)
