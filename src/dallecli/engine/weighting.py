"""AUTOMATIC1111's prompt weighting ("attention/emphasis") for pipelines with CLIP text encoders.

The syntax, as A1111's ``modules/prompt_parser.py`` (``parse_prompt_attention``) reads it:

    ``(words:1.3)``  the words' weight times 1.3
    ``(words)``      times 1.1
    ``[words]``      divided by 1.1
    nesting          multiplies: ``((words))`` is 1.21, ``[(words:1.5)]`` is 1.5 / 1.1
    ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``  a literal bracket or backslash (a lone ``\\`` is dropped, as in A1111)
    unbalanced       an opening bracket never closed weights everything after it; a closing bracket with no
                     opening one is literal text

A1111's ``BREAK`` (start a new 75-token chunk) and its prompt editing ``[from:to:when]`` are not implemented:
they stay text, and diffusers keeps one window of ``model_max_length`` tokens as for any prompt.

How the weights are applied is A1111's "emphasis: Original": the chunks are tokenized one by one, each token takes
its chunk's weight, the text encoder's output (its last hidden state, or the clip-skipped layer) is multiplied
token by token by the weights, then scaled so that its mean is what it was (BOS, EOS and padding weigh 1). The
encoding itself is the pipeline's own ``encode_prompt`` (clip skip, LoRA scale and devices as for any prompt),
run on the chunks' text without the syntax; :func:`prompt_arguments` hands the pipeline ``prompt_embeds`` and
``negative_prompt_embeds`` instead of text. Two differences from A1111, both for reproducibility: the mean is
kept per prompt (A1111 takes it over the whole batch, so an image would depend on its batch), and for SDXL per
text encoder, as A1111 does for its two embedders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND = 1.1  # ``(words)``
SQUARE = 1 / 1.1  # ``[words]``
# diffusers pipeline classes whose prompt encoding this module weights, by how their ``encode_prompt`` is called;
# the others (SD 3, FLUX, PixArt: a T5 encoder reads most of the prompt) get the prompt verbatim
FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd", "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}
# A1111's token pattern (without BREAK): escapes, brackets, a ``:weight)`` close, plain text, a lone colon
_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` chunks by A1111's attention syntax (see the module docstring).

    Follows A1111's ``parse_prompt_attention`` step for step, so weights are equal to the last bit: brackets
    multiply the weights of the chunks they close over, unclosed ones are closed at the end, and neighbouring
    chunks of equal weight are merged. A ``:weight)`` that is no number (``(a:1.2.3)``) is taken as text.

    Args:
        text: the raw prompt.

    Returns:
        The chunks in order; ``[("", 1.0)]`` for an empty prompt. For example
        ``parse_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]``.
    """
    chunks: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for chunk in chunks[start:]:
            chunk[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if weight is not None:
            try:
                weight = float(weight)
            except ValueError:  # "1.2.3": A1111 fails here; the text stays text
                weight = None
        if piece.startswith("\\"):
            chunks.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(chunks))
        elif piece == "[":
            square_open.append(len(chunks))
        elif weight is not None and round_open:
            multiply(round_open.pop(), weight)
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            chunks.append([piece, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not chunks:
        return [("", 1.0)]
    merged = [chunks[0]]
    for chunk in chunks[1:]:
        if chunk[1] == merged[-1][1]:
            merged[-1][0] += chunk[0]
        else:
            merged.append(chunk)
    return [(text, weight) for text, weight in merged]


def has_weighting(text: str | None) -> bool:
    """Whether ``text`` holds any attention syntax (a bracket, an escape): parsing it changes it."""
    return bool(text) and parse_attention(text) != [(text, 1.0)]


@dataclass(frozen=True)
class WeightedPrompt:
    """What the text encoder reads for one prompt: ``text`` (the chunks' text joined by spaces, the syntax
    removed) and one weight per token of it (no BOS/EOS)."""

    text: str
    weights: tuple[float, ...]

    @property
    def plain(self) -> bool:
        """Whether every weight is 1 (only escapes: the text alone says it)."""
        return all(weight == 1.0 for weight in self.weights)


def weigh(text: str, tokenizer) -> WeightedPrompt | None:
    """Tokenize ``text``'s chunks one by one, as A1111 does, and give each token its chunk's weight.

    The chunks are joined by a space for the pipeline's own tokenizer: a CLIP tokenizer never makes a token across
    whitespace, so the joined text has exactly the tokens of the chunks in a row (checked).

    Args:
        text: the raw prompt.
        tokenizer: the pipeline's CLIP tokenizer.

    Returns:
        The :class:`WeightedPrompt`, or None when the joined text tokenizes differently (a tokenizer that is not
        CLIP's): the prompt is then passed verbatim.
    """
    chunks = [(piece, weight) for piece, weight in parse_attention(text) if piece]
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in chunks:
        found = tokenizer(piece, add_special_tokens=False, truncation=False).input_ids
        ids += found
        weights += [weight] * len(found)
    joined = " ".join(piece for piece, _ in chunks)
    if tokenizer(joined, add_special_tokens=False, truncation=False).input_ids != ids:
        return None
    return WeightedPrompt(joined, tuple(weights))


def emphasize(embeds, weights: list[tuple[float, ...]], widths: list[int] | None = None):
    """A1111's "Original" emphasis: multiply each token's embedding by its weight, then restore the mean.

    Args:
        embeds: (B, T, D) text encoder output, T = the tokenizer's ``model_max_length`` (BOS, tokens, EOS, padding).
        weights: per prompt, the weights of its tokens (without BOS/EOS); tokens past T - 2 were truncated away.
        widths: the widths of the encoders whose outputs are concatenated along D (SDXL: 768 + 1280); each part's
            mean is kept on its own. None: one part.

    Returns:
        The weighted (B, T, D) embeddings, in ``embeds``' dtype; a prompt whose weights are all 1 is untouched.
    """
    import torch

    batch, length, width = embeds.shape
    widths = widths if widths and sum(widths) == width else [width]
    rows = []
    for row, row_weights in zip(embeds, weights):
        if all(weight == 1.0 for weight in row_weights):
            rows.append(row)
            continue
        kept = list(row_weights[:length - 2])
        factors = torch.tensor([1.0] + kept + [1.0] * (length - 1 - len(kept)), dtype=torch.float32,
                               device=row.device)[:, None]  # (T, 1)
        parts, start = [], 0
        for part_width in widths:
            part = row[:, start:start + part_width].float()  # (T, d)
            mean = part.mean()
            weighted = part * factors
            new_mean = weighted.mean()
            parts.append(weighted * (mean / new_mean) if new_mean != 0 else weighted)
            start += part_width
        rows.append(torch.cat(parts, dim=-1).to(embeds.dtype))
    return torch.stack(rows)  # (B, T, D)


def family(pipe) -> str | None:
    """How ``pipe`` encodes prompts ("sd" or "sdxl"), or None when weighting is not implemented for it."""
    return FAMILIES.get(type(pipe).__name__)


def tokenizer_of(pipe):
    """The CLIP tokenizer that weights are counted with (SDXL's two share one vocabulary)."""
    return getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)


def prompt_arguments(pipe, prompts: list[WeightedPrompt], negative: WeightedPrompt | None, *, guidance_scale: float,
                     clip_skip: int | None) -> dict:
    """The ``__call__`` arguments that carry weighted prompts: ``prompt_embeds`` and ``negative_prompt_embeds``
    (SDXL: and the pooled ones), made by the pipeline's own ``encode_prompt`` and weighted by :func:`emphasize`.

    Args:
        pipe: a pipeline of a :data:`FAMILIES` class.
        prompts: one per image of the pass.
        negative: the negative prompt, or None (the pipeline's own unconditional input: "" or SDXL's zeros).
        guidance_scale: classifier-free guidance is on above 1 (and off for a model with a guidance embedding).
        clip_skip: diffusers' clip skip (A1111's minus 1), or None.

    Returns:
        Keyword arguments for ``pipe(...)`` in place of ``prompt`` and ``negative_prompt``.
    """
    guidance = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    texts = [p.text for p in prompts]
    negatives = [negative.text] * len(prompts) if negative is not None else None
    common = {"device": pipe._execution_device, "num_images_per_prompt": 1,
              "do_classifier_free_guidance": guidance, "negative_prompt": negatives, "clip_skip": clip_skip}
    negative_weights = [negative.weights if negative is not None else ()] * len(prompts)
    if family(pipe) == "sdxl":
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(prompt=texts, **common)
        widths = [e.config.hidden_size for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
        arguments = {"prompt_embeds": emphasize(embeds, [p.weights for p in prompts], widths),
                     "pooled_prompt_embeds": pooled}
        if guidance:
            arguments.update(negative_prompt_embeds=emphasize(negative_embeds, negative_weights, widths),
                             negative_pooled_prompt_embeds=negative_pooled)
        return arguments
    embeds, negative_embeds = pipe.encode_prompt(prompt=texts, **common)
    arguments = {"prompt_embeds": emphasize(embeds, [p.weights for p in prompts])}
    if guidance:
        arguments["negative_prompt_embeds"] = emphasize(negative_embeds, negative_weights)
    return arguments
