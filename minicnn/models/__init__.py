"""Ready-made networks."""
from .emotion import EMOTIONS, EmotionClassifier, leaf_layers, summary

__all__ = ["EmotionClassifier", "EMOTIONS", "leaf_layers", "summary"]
