"""Errors the pipeline raises for bad input: the message names the problem and how to fix it."""


class RMTError(Exception):
    """Base class: the CLI prints the message without a traceback."""


class DataError(RMTError):
    """A corpus that cannot be read or prepared (missing, empty, undecodable, malformed)."""


class ModelError(RMTError):
    """A model or tokenizer that cannot be used (mismatch, missing markers, bad checkpoint)."""


class CheckpointError(RMTError):
    """A checkpoint or run directory that is corrupt, partial or from another config."""
