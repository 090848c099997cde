"""Error types for mistakes a user can fix (bad params, bad files, missing data).

Stage entry points catch :class:`DiffmodelsError` and print its message as one line, without a
traceback; every other exception is a bug and keeps its traceback.
"""


class DiffmodelsError(Exception):
    """A problem with the user's input, named with its culprit and the fix."""


class ParamsError(DiffmodelsError, ValueError):
    """params.yaml (or a ``-S`` override) has an unknown key, a wrong type or a bad value."""


class DataError(DiffmodelsError):
    """The dataset is missing, unreadable or too small."""


class CheckpointError(DiffmodelsError):
    """A checkpoint file is missing, truncated, malformed or from another architecture."""


class TrackingError(DiffmodelsError):
    """The MLflow tracking store cannot be reached or written."""


class TrainingError(DiffmodelsError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
