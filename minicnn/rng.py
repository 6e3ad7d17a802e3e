"""Seeding: one call makes weight initialisation and dropout masks repeatable.

    minicnn.manual_seed(0)
    model = EmotionClassifier()      # same weights, same dropout masks, every run

Every module that needs randomness takes its own ``numpy.random.Generator``
from :func:`spawn`, which draws from a process-wide seed sequence. After
``manual_seed(s)`` the sequence of generators handed out is fixed, so building
the same model in the same order gives the same numbers.
"""
import numpy as np

__all__ = ["manual_seed", "spawn"]

_root = np.random.SeedSequence()


def manual_seed(seed):
    """Seed minicnn's random numbers (weight init, dropout)."""
    global _root
    _root = np.random.SeedSequence(int(seed))


def spawn(seed=None):
    """A new Generator: from ``seed`` if given, else the next child of the global seed."""
    if seed is not None:
        return np.random.default_rng(int(seed))
    return np.random.default_rng(_root.spawn(1)[0])
