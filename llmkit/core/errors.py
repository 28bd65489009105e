"""The errors a user can cause. The CLI turns each into one red line and exit code 1.

Anything else that escapes is a bug and keeps its traceback.
"""

from llmkit import __version__


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and ``timeout`` send), raised where Ctrl-C would be: a
    training run writes its checkpoint and stops, as it does on Ctrl-C, then exits 143."""


class TrainingDiverged(LlmkitError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


def check_format(found, supported: int, what: str, written_by: str | None = None) -> None:
    """Refuse a file written in a newer format than this llmkit reads, naming both versions."""
    try:
        number = int(found)
    except (TypeError, ValueError):
        raise CheckpointError(f"{what}: format {found!r} is not a format llmkit writes") from None
    if number > supported:
        by = f"llmkit {written_by}" if written_by else "a newer llmkit"
        raise CheckpointError(
            f"{what} was written by {by} (format {number}); this is llmkit {__version__}, "
            f"which reads format {supported} at most: upgrade llmkit to read it"
        )
