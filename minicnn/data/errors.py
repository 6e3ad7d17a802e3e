"""The data's error: one class, so that a command can say "minicnn: error: ..." for any bad input."""

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """The data is missing, incomplete or malformed; the message says where."""
