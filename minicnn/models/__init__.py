"""Ready-made networks."""
from .emotion import EMOTIONS, EmotionClassifier, summary

__all__ = ["EmotionClassifier", "EMOTIONS", "summary"]
