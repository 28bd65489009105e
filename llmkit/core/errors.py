"""The errors a user can cause. The CLI turns each into one red line and exit code 1.

Anything else that escapes is a bug and keeps its traceback.
"""


class LlmkitError(Exception):
    """Base class: a problem with the user's input, phrased for the user."""


class ConfigError(LlmkitError):
    """A configuration value, YAML file or flag is invalid."""


class DataError(LlmkitError):
    """A corpus or data file is missing, unreadable, empty or malformed."""


class TokenizerError(LlmkitError):
    """A tokenizer cannot be trained or loaded, or does not match a checkpoint."""


class CheckpointError(LlmkitError):
    """A checkpoint directory is missing, incomplete or incompatible."""


class TrainingDiverged(LlmkitError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""
