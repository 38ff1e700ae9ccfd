"""How a forward pass's failures become dalle's errors, one mapping for every pipeline (generation, upscaling,
loading): the device running out of memory is :class:`~dallecli.errors.OutOfMemoryError` (exit 3) whichever
allocator says so, and NaN/Inf in the output is :class:`~dallecli.errors.NonFiniteOutputError` with the fix that
fits the dtype it ran in. Imports torch only when a block runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dallecli.errors import NonFiniteOutputError, OutOfMemoryError

# what the allocators say: CUDA's "CUDA out of memory", MPS's "MPS backend out of memory", and the CPU's
# "DefaultCPUAllocator: can't allocate memory" (seen with --width 8192 --height 8192)
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (GPU, MPS or the CPU's allocator) ran out of memory."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OUT_OF_MEMORY)


@contextmanager
def out_of_memory(message: str) -> Iterator[None]:
    """Run the block; the device running out of memory in it raises :class:`OutOfMemoryError` with ``message``
    (what was asked for and what to lower), chained to the original. Any other exception passes unchanged.

    Raises:
        OutOfMemoryError: see :func:`is_out_of_memory`.
    """
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if is_out_of_memory(exc):
            raise OutOfMemoryError(message) from exc
        raise


def check_finite(values, dtype: str, what: str = "the decoded image", *, loras: bool = False) -> None:
    """Refuse output that holds NaN or Inf, which would be written as a black (or noise) image.

    Args:
        values: a torch tensor or a numpy array, any shape.
        dtype: the dtype the pipeline ran in ("float32", "float16", "bfloat16"): in a half precision the fix is
            float32; already in float32 it is the weights.
        what: how the message names the output ("the decoded image", "tile 3 of 12").
        loras: whether LoRAs can have been applied (the float32 message then names a LoRA scale too).

    Raises:
        NonFiniteOutputError: naming ``what`` and the fix.
    """
    if hasattr(values, "isfinite"):  # a torch tensor
        finite = bool(values.isfinite().all())
    else:
        import numpy as np

        finite = bool(np.isfinite(values).all())
    if finite:
        return
    if dtype == "float32":
        raise NonFiniteOutputError(f"{what} contains NaN/Inf values in float32; nothing was written. The model's "
                                   "weights may hold NaN/Inf" + (", or a LoRA scale is too large" if loras else ""))
    raise NonFiniteOutputError(f"{what} contains NaN/Inf values (in {dtype} the VAE can overflow: this is what turns "
                               "into an all-black image); nothing was written. Use --dtype float32 (or bfloat16)"
                               + (", or an fp16-safe VAE" if what == "the decoded image" else ""))
