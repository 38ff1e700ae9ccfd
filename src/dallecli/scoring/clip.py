"""CLIP image–text scores: how well an image matches a text (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"; the score as Hessel et al. 2021, "CLIPScore", and torchmetrics'
``CLIPScore`` report it: 100 × the cosine similarity of the two embeddings, floored at 0).

A scorer is a ``transformers.CLIPModel`` folder (``config.json``, ``.safetensors`` weights, tokenizer and image
processor files): the embedded one (``shapes-clip``), a downloaded Hub CLIP or a local folder
(:func:`dallecli.store.resolve.resolve_scorer`). Weights load from ``.safetensors`` only; no remote code runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dallecli.errors import UnsafeWeightsError, UsageError

if TYPE_CHECKING:
    import torch

BATCH = 32  # images (or texts) per forward pass: bounded memory for any number of candidates


def projected(output):
    """The projected embedding from ``CLIPModel.get_image_features``/``get_text_features``: a (B, D) tensor in
    transformers 4.x, an output object whose ``pooler_output`` holds it in 5.x."""
    return output if hasattr(output, "norm") else output.pooler_output


@dataclass(frozen=True)
class Score:
    """One image scored against one text.

    Attributes:
        clip_score: 100 × cosine similarity, floored at 0 (range [0, 100]; the CLIP-score metric).
        cosine: the raw cosine similarity in [-1, 1] (ranks candidates even where the floored score ties at 0).
    """

    clip_score: float
    cosine: float


class ClipScorer:
    """A loaded CLIP model that scores images against texts.

    Args:
        folder: a ``CLIPModel`` folder with ``.safetensors`` weights and its processor files.
        name: how the scorer is recorded in image metadata (alias, repo id or path).
        revision: the Hub commit of the snapshot, or None.
        device: torch device string ("cpu", "cuda", "mps"); default: the engine's device policy.

    Raises:
        UnsafeWeightsError: the folder has no ``.safetensors`` weights (pickles are never loaded).
        ModelNotFoundError: from :func:`load`, a name that is not available locally.
    """

    def __init__(self, folder: Path, name: str, revision: str | None = None, device: str | None = None):
        from dallecli.engine.device import resolve_device

        self.folder = Path(folder)
        self.name = name
        self.revision = revision
        self.device = resolve_device(device)
        if not any(self.folder.glob("*.safetensors")):
            raise UnsafeWeightsError(f"scorer {name}: {self.folder} has no .safetensors weights; dalle loads "
                                     ".safetensors only")
        self._model = None
        self._processor = None

    @classmethod
    def load(cls, name: str | None = None, cache_dir: Path | None = None, device: str | None = None) -> "ClipScorer":
        """The scorer called ``name`` (None: the embedded one), found without network access.

        Raises:
            ModelNotFoundError: not downloaded (the message says how to get it).
            UsageError: a registry entry that is not a scorer.
        """
        from dallecli.store.resolve import resolve_scorer

        found = resolve_scorer(name, cache_dir)
        return cls(found.path, found.name, found.revision, device)

    @property
    def max_tokens(self) -> int:
        """The longest text the text tower reads, in tokens including BOS/EOS (77 for OpenAI's CLIPs)."""
        return int(self._loaded()[0].config.text_config.max_position_embeddings)

    def _loaded(self):
        if self._model is None:
            from transformers import CLIPModel, CLIPProcessor

            from dallecli.engine.loading import quiet_libraries

            quiet_libraries()
            self._model = CLIPModel.from_pretrained(self.folder, use_safetensors=True).to(self.device).eval()
            self._processor = CLIPProcessor.from_pretrained(self.folder)
        return self._model, self._processor

    def unload(self) -> None:
        """Free the model's memory; the next score loads it again."""
        self._model = self._processor = None

    def image_embeddings(self, images: list) -> torch.Tensor:
        """(N, D) unit-length embeddings of PIL images (any size and mode; converted to RGB and resized by the
        model's image processor), computed :data:`BATCH` at a time."""
        import torch
        import torch.nn.functional as F

        model, processor = self._loaded()
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                rgb = [image.convert("RGB") for image in images[start:start + BATCH]]
                pixels = processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)
                chunks.append(F.normalize(projected(model.get_image_features(pixel_values=pixels)).float(), dim=-1))
        return torch.cat(chunks)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(N, D) unit-length embeddings of texts, each cut to :attr:`max_tokens` tokens."""
        import torch
        import torch.nn.functional as F

        model, processor = self._loaded()
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                tokens = processor.tokenizer(texts[start:start + BATCH], padding=True, truncation=True,
                                             max_length=self.max_tokens, return_tensors="pt")
                features = model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                   attention_mask=tokens["attention_mask"].to(self.device))
                chunks.append(F.normalize(projected(features).float(), dim=-1))
        return torch.cat(chunks)

    def score(self, images: list, texts: list[str]) -> list[Score]:
        """Score image i against text i.

        Args:
            images: N PIL images.
            texts: N texts (one per image; repeat a prompt to score many candidates against it).

        Returns:
            N :class:`Score`.

        Raises:
            UsageError: the lists differ in length or are empty.
        """
        if len(images) != len(texts) or not images:
            raise UsageError(f"score needs one text per image (got {len(images)} images, {len(texts)} texts)")
        unique = sorted(set(texts))  # candidates share their prompt: embed each text once
        text = self.text_embeddings(unique)
        rows = text[[unique.index(t) for t in texts]]  # (N, D)
        cosines = (self.image_embeddings(images) * rows).sum(-1).tolist()
        return [Score(round(max(100.0 * c, 0.0), 4), round(c, 6)) for c in cosines]

    def describe(self) -> dict:
        """What image metadata records about the scorer: ``{"name", "revision"}``."""
        return {"name": self.name, "revision": self.revision}
