"""One error hierarchy for the whole tool; the CLI turns each into a one-line message and an exit code.

The engine raises these and never prints or exits; ``dallecli.cli.errors`` is the only translator.
"""

from __future__ import annotations


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an exception's message (library messages run to many lines), else
    ``default`` (the exception's class name when not given): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else (type(exc).__name__ if default is None else default)


class DalleError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(DalleError):
    """Bad input from the user (an option value, a file): exit code 2, checked before any model loads."""

    exit_code = 2


class TaskUnsupportedError(UsageError):
    """A model that cannot run a task ("MODEL cannot do edit"): diffusers has no such pipeline for its family."""


class DeviceUnavailableError(UsageError):
    """The requested ``--device`` does not exist on this machine."""


class ModelNotFoundError(DalleError):
    """A model name or path that resolves to nothing loadable."""


class UnsupportedCheckpointError(ModelNotFoundError):
    """A single-file safetensors checkpoint whose layout dalle does not load (the message names what it holds)."""


class UnsafeWeightsError(DalleError):
    """A model or LoRA whose weights are pickles (``.bin``, ``.ckpt``, ``.pt``) or not safetensors by content."""


class CorruptWeightsError(DalleError):
    """A ``.safetensors`` file that is truncated, a Git LFS pointer, or has an unreadable header."""


class DownloadError(DalleError):
    """A download from the Hugging Face Hub that cannot start or finish (network, offline mode, disk space)."""


class AuthError(DownloadError):
    """The Hub answered 401: no token, or an invalid one, for a gated or private repo."""


class GatedError(DownloadError):
    """The Hub answered 403: the token is valid but its account has not accepted the model's licence."""


class NonFiniteOutputError(DalleError):
    """The decoded image holds NaN or Inf (in half precision this becomes the all-black image)."""


class OutOfMemoryError(DalleError):
    """The device ran out of memory; the message says what was asked for and what to lower."""

    exit_code = 3


class LoraError(DalleError):
    """A LoRA file that cannot be applied, or that matches no layer of the model."""


class LoraMismatchError(LoraError):
    """A LoRA made for another model family (its cross-attention width differs): a usage error, exit code 2."""

    exit_code = 2


class CheckpointError(DalleError):
    """A training checkpoint that cannot be read or resumed from."""


class TrainingDivergedError(DalleError):
    """The training loss became NaN or Inf; nothing is saved after that step."""


class DatasetError(UsageError):
    """A training folder with no usable images, or with missing captions."""


class DiskFullError(DalleError):
    """The disk filled up while writing an image or a checkpoint; nothing half-written is left behind."""


class ServerError(DalleError):
    """A ``dalle serve`` that cannot be reached (``dalle generate --server``), or that answered with an error."""
