"""Learning-rate schedules: cosine with warm-up, step decay, reduce-on-plateau (optionally ending
in a cosine decay to zero).

Each has ``lr(epoch, step)`` for the learning rate of a training step (``step``
counts steps within the epoch), ``end_epoch(metric)`` called after validation,
and ``state_dict()``/``load_state_dict()`` so a resumed run continues exactly.
"""
import math

__all__ = ["Schedule", "CosineWarmup", "StepDecay", "ReduceOnPlateau", "PlateauThenCosine", "make_schedule",
           "SCHEDULES"]

SCHEDULES = ("cosine", "step", "plateau", "plateau-cosine", "constant")


class Schedule:
    def __init__(self, base_lr, steps_per_epoch):
        self.base_lr, self.steps_per_epoch = float(base_lr), int(steps_per_epoch)

    def lr(self, epoch, step):
        return self.base_lr

    def end_epoch(self, metric):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class CosineWarmup(Schedule):
    """Linear warm-up from 0 over ``warmup_epochs``, then cosine decay to ``min_lr`` at ``epochs``."""

    def __init__(self, base_lr, steps_per_epoch, epochs, warmup_epochs=1.0, min_lr=0.0):
        super().__init__(base_lr, steps_per_epoch)
        self.total = max(1, int(epochs * steps_per_epoch))
        self.warmup = int(warmup_epochs * steps_per_epoch)
        self.min_lr = float(min_lr)

    def lr(self, epoch, step):
        t = epoch * self.steps_per_epoch + step
        if t < self.warmup:
            return self.base_lr * (t + 1) / self.warmup
        frac = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


class StepDecay(Schedule):
    """Multiply by ``gamma`` every ``step_epochs`` epochs."""

    def __init__(self, base_lr, steps_per_epoch, step_epochs=10, gamma=0.1):
        super().__init__(base_lr, steps_per_epoch)
        self.step_epochs, self.gamma = int(step_epochs), float(gamma)

    def lr(self, epoch, step):
        return self.base_lr * self.gamma ** (epoch // self.step_epochs)


class ReduceOnPlateau(Schedule):
    """Multiply by ``factor`` when the validation metric (higher is better) has not improved
    for ``patience`` epochs."""

    def __init__(self, base_lr, steps_per_epoch, factor=0.5, patience=3, min_lr=1e-5):
        super().__init__(base_lr, steps_per_epoch)
        self.factor, self.patience, self.min_lr = float(factor), int(patience), float(min_lr)
        self.current, self.best, self.bad = float(base_lr), -math.inf, 0

    def lr(self, epoch, step):
        return self.current

    def end_epoch(self, metric):
        if metric > self.best:
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.current, self.bad = max(self.min_lr, self.current * self.factor), 0

    def state_dict(self):          # (no best yet: None, since JSON has no -inf)
        return {"current": self.current, "best": self.best if math.isfinite(self.best) else None, "bad": self.bad}

    def load_state_dict(self, state):
        best = state["best"]
        self.current, self.bad = float(state["current"]), int(state["bad"])
        self.best = -math.inf if best is None else float(best)


class PlateauThenCosine(ReduceOnPlateau):
    """Reduce-on-plateau until ``final_epochs`` before the end, then a cosine decay from the rate
    reached there to 0 at ``epochs`` (Khaireddin & Chen's FER2013 recipe ends this way)."""

    def __init__(self, base_lr, steps_per_epoch, epochs, final_epochs, factor=0.5, patience=3, min_lr=1e-5):
        super().__init__(base_lr, steps_per_epoch, factor, patience, min_lr)
        self.epochs, self.final_start = int(epochs), max(0, int(epochs) - int(final_epochs))
        self.seen = 0                             # epochs ended so far

    def lr(self, epoch, step):
        if epoch < self.final_start:
            return self.current
        span = max(1, (self.epochs - self.final_start) * self.steps_per_epoch)
        t = min(1.0, ((epoch - self.final_start) * self.steps_per_epoch + step) / span)
        return self.current * 0.5 * (1 + math.cos(math.pi * t))

    def end_epoch(self, metric):
        if self.seen < self.final_start:          # (the rate is frozen once the final decay starts)
            super().end_epoch(metric)
        self.seen += 1

    def state_dict(self):
        return dict(super().state_dict(), seen=self.seen)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.seen = int(state.get("seen", 0))


def make_schedule(name, base_lr, steps_per_epoch, epochs, warmup_epochs=1.0, plateau_factor=0.5,
                  plateau_patience=3, final_epochs=0):
    """'cosine' (default), 'step', 'plateau', 'plateau-cosine' (plateau, then ``final_epochs`` of
    cosine decay to 0) or 'constant'."""
    if name == "cosine":
        return CosineWarmup(base_lr, steps_per_epoch, epochs, warmup_epochs=min(warmup_epochs, epochs / 2))
    if name == "step":
        return StepDecay(base_lr, steps_per_epoch, step_epochs=max(1, epochs // 3))
    if name == "plateau":
        return ReduceOnPlateau(base_lr, steps_per_epoch, factor=plateau_factor, patience=plateau_patience)
    if name == "plateau-cosine":
        return PlateauThenCosine(base_lr, steps_per_epoch, epochs, final_epochs or max(1, epochs // 10),
                                 factor=plateau_factor, patience=plateau_patience)
    if name == "constant":
        return Schedule(base_lr, steps_per_epoch)
    raise ValueError(f"unknown schedule {name!r}: use {', '.join(SCHEDULES)}")
