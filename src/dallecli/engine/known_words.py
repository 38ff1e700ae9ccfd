"""Which words of a prompt a small model never saw in training (the embedded model knows flat coloured shapes).

A model folder built by this project records the words of its training captions in ``training.json``
(``"words"``); a prompt word outside them, and outside :data:`STOP_WORDS`, is one the model cannot draw. Models
without that record (every Hub model) are never checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Function words that carry no subject; a prompt's "of", "an" or "very" is no reason to warn.
STOP_WORDS = frozenset(
    "a an the of and or with without on in at to into onto from by for is are be that this these those it its "
    "there here some any very as than then so".split()
)
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, in any script


def words_of(text: str) -> list[str]:
    """The lower-case words of ``text``, in order (letters only: digits and punctuation split words)."""
    return _WORD.findall(text.lower())


def training_vocabulary(folder: Path) -> tuple[frozenset[str], str] | None:
    """``(words of the training captions, what they describe)`` from ``training.json`` in a model folder
    (``"words"``, ``"subject"``), or None when the model carries no such record."""
    try:
        record = json.loads((Path(folder) / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    words = record.get("words") if isinstance(record, dict) else None
    if not (isinstance(words, list) and words):
        return None
    return frozenset(words), str(record.get("subject") or "a small set of captions")


def unknown_words(prompt: str, known: frozenset[str]) -> list[str]:
    """The words of ``prompt`` that are neither in ``known`` nor stop words, each once, in prompt order."""
    seen: dict[str, None] = {}
    for word in words_of(prompt):
        if word not in known and word not in STOP_WORDS:
            seen.setdefault(word)
    return list(seen)
