"""Save CLIP text encoders in the key layout that every transformers version loads.

transformers 5 saves a ``CLIPTextModel`` built from scratch with keys relative to its inner ``text_model``
(``embeddings.token_embedding.weight``). transformers 4.x and early 5.x read only the Hugging Face Hub layout
(``text_model.embeddings.token_embedding.weight``); given the other layout, they initialise the whole text encoder
at random and only warn. A pipeline written by this project must load the same under every transformers in its
dependency range, so its text encoder is written in the Hub layout. transformers 5.24 loads both layouts to
identical outputs (tests/test_embedded.py checks the shipped model).
"""

from __future__ import annotations

import json
from pathlib import Path

from dallecli.atomic import default_mode, place, staged_file

HUB_PREFIX = "text_model."
WEIGHTS = "model.safetensors"


def write_hub_layout(folder: Path) -> bool:
    """Rewrite a ``CLIPTextModel`` folder's ``model.safetensors`` with every key under ``text_model.``, atomically,
    keeping the file's metadata; other architectures and files already in that layout are left alone.

    Args:
        folder: a text encoder folder (``config.json`` + ``model.safetensors``), e.g. ``pipeline/text_encoder``.

    Returns:
        Whether the file was rewritten.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("architectures") != ["CLIPTextModel"]:
        return False
    with safe_open(folder / WEIGHTS, "pt") as handle:
        metadata = handle.metadata()
        if all(key.startswith(HUB_PREFIX) for key in handle.keys()):
            return False
        tensors = {key if key.startswith(HUB_PREFIX) else HUB_PREFIX + key: handle.get_tensor(key)
                   for key in handle.keys()}
    with staged_file(folder, ".safetensors", what=str(folder / WEIGHTS)) as staging:  # safetensors writes a path
        save_file(tensors, staging, metadata=metadata)
        default_mode(staging)  # safetensors' writer makes it 0600
        place(staging, folder / WEIGHTS)
    return True
