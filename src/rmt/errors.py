"""Errors the pipeline raises for bad input: the message names the problem and how to fix it."""


class RMTError(Exception):
    """Base class: the CLI prints the message without a traceback."""


class DataError(RMTError):
    """A corpus that cannot be read or prepared (missing, empty, undecodable, malformed)."""


class ModelError(RMTError):
    """A model or tokenizer that cannot be used (mismatch, missing markers, bad checkpoint)."""


class CheckpointError(RMTError):
    """A checkpoint or run directory that is corrupt, partial or from another config."""


class TrainingError(RMTError, FloatingPointError):
    """A run that cannot go on (repeated non-finite losses); its last checkpoint is kept."""


class Interrupted(RMTError):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint; the command exits with 128 + the signal number
    (130, 143) so that `rmt train && rmt eval` does not go on with an unfinished model."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
