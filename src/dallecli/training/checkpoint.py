"""Training checkpoints in safetensors only: weights, optimizer, LR scheduler, EMA and RNG state.

A checkpoint is a folder ``step-000123/`` holding ``state.safetensors`` (every tensor) and ``state.json``
(every non-tensor value). It is written to a temporary folder beside its final place and renamed, so a
crash never leaves a half-written checkpoint that ``--resume`` would pick. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dallecli.atomic import staged_folder
from dallecli.errors import CheckpointError

PREFIX = "step-"


def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested structure into ``tensors``; return the JSON-able rest."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    return value


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) as checkpoint ``step``.

    Args:
        root: the checkpoints folder (created).
        step: the number of optimisation steps completed.
        state: what to save, e.g. ``{"unet": unet.state_dict(), "optimizer": opt.state_dict()}``.
        keep: how many most recent checkpoints to keep; older ones are deleted after the write.

    Returns:
        The checkpoint folder.

    Raises:
        DiskFullError: no space left (or quota exceeded); the partial checkpoint is removed and the older
            checkpoints are kept.
    """
    final = root / f"{PREFIX}{step:07d}"
    tensors: dict[str, torch.Tensor] = {}
    meta = _flatten(state, "s", tensors)
    with staged_folder(final, what=f"checkpoint {final.name} in {root}",
                       advice="Older checkpoints are kept; free some space, then re-run with --resume") as staging:
        save_file(tensors, staging / "state.safetensors")
        (staging / "state.json").write_text(json.dumps({"step": step, "state": meta}), encoding="utf-8")
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path) -> tuple[int, dict[str, Any]]:
    """Read a checkpoint folder written by :func:`save_checkpoint`.

    Returns:
        ``(step, state)`` with tensors on the CPU.

    Raises:
        CheckpointError: the folder is incomplete or unreadable.
    """
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(path / "state.safetensors")
        return int(meta["step"]), _unflatten(meta["state"], tensors)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from an older one") from exc
