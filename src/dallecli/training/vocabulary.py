"""Build a CLIP-format BPE vocabulary (``vocab.json`` + ``merges.txt``) for a small caption corpus.

The merges are learnt with the ``tokenizers`` BPE trainer; the 256 byte-level symbols are always in the
vocabulary (both plain and with the ``</w>`` end-of-word suffix), so any text, including words the corpus
never had, tokenizes without unknown tokens. The result loads with ``transformers.CLIPTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"


def build_clip_vocabulary(texts: Iterable[str], out: Path, *, extra_merges: int = 0) -> tuple[Path, Path]:
    """Learn BPE merges from ``texts`` and write ``vocab.json`` and ``merges.txt`` into ``out``.

    Args:
        texts: training captions; each distinct word of them ends up as a single token.
        out: folder to write into (created).
        extra_merges: merges to learn beyond those needed for whole words (0 is enough for a closed world).

    Returns:
        The paths of ``vocab.json`` and ``merges.txt``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words: dict[str, int] = {}
    for text in texts:
        for word in text.lower().replace(",", " , ").split():
            words[word] = words.get(word, 0) + 1
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    # Enough room for every character of every word to be merged into one token, plus extras.
    needed = len(alphabet) * 2 + sum(len(w) for w in words) + extra_merges
    trainer = trainers.BpeTrainer(
        vocab_size=needed,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join([w] * n) for w, n in sorted(words.items())], trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]

    tokens: list[str] = []
    for symbol in alphabet:  # CLIP's order: bytes, then bytes with the suffix, then merges
        tokens.append(symbol)
    for symbol in alphabet:
        tokens.append(symbol + END_OF_WORD)
    for merge in merges:
        tokens.append(merge.replace(" ", ""))
    vocab: dict[str, int] = {}
    for token in tokens + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))

    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path
