"""Best-of-K: draw K candidates for each requested image and keep the one a CLIP scores highest against the prompt.

The recipe of the original DALL-E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", which drew 512
candidates and kept the best by CLIP). Candidate j of requested image i has seed ``S + i*K + j`` (the seeds a
run of ``n*K`` images would use), so each candidate, the winner included, replays alone from its own seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from dallecli.errors import UsageError
from dallecli.scoring.clip import ClipScorer, Score

MAX_CANDIDATES = 64


@dataclass(frozen=True)
class BestOf:
    """``--rerank K``: K candidates per image, ranked by ``scorer`` (loaded on first use); ``keep`` also writes the
    candidates that lost (``--keep-candidates``)."""

    candidates: int
    scorer: ClipScorer
    keep: bool = False


@dataclass
class RankedImage:
    """One candidate, scored.

    Attributes:
        result: the :class:`dallecli.engine.generate.GeneratedImage` (PIL image and settings).
        score: its :class:`~dallecli.scoring.clip.Score` against the prompt.
        rank: 1 for the best of its group, up to ``candidates``.
        group: which requested image (0-based) it is a candidate for.
        candidates: K, the group's size.
    """

    result: object
    score: Score
    rank: int
    group: int
    candidates: int

    def metadata(self, scorer: ClipScorer, seeds: list[int]) -> dict:
        """The ``rerank`` record an image's metadata carries: scorer, score, rank and the group's seeds."""
        return {"scorer": scorer.name, "scorer_revision": scorer.revision, "clip_score": self.score.clip_score,
                "cosine": self.score.cosine, "rank": self.rank, "candidates": self.candidates,
                "candidate_seeds": seeds}


def check_candidates(candidates: int) -> None:
    """Raises UsageError unless 2 <= ``candidates`` <= :data:`MAX_CANDIDATES`."""
    if not 2 <= candidates <= MAX_CANDIDATES:
        raise UsageError(f"--rerank must be from 2 to {MAX_CANDIDATES} candidates per image (got {candidates})")


def rank_group(results: list, scores: list[Score], group: int) -> list[RankedImage]:
    """Order one group's candidates best first (highest cosine; on a tie, the lower seed, i.e. the earlier)."""
    order = sorted(range(len(results)), key=lambda i: (-scores[i].cosine, i))
    return [RankedImage(results[i], scores[i], rank, group, len(results)) for rank, i in enumerate(order, start=1)]


def generate_reranked(engine, request, scorer: ClipScorer, candidates: int, on_step=None) -> Iterator[list[RankedImage]]:
    """Make ``request.num_images`` images, each the best of ``candidates`` by ``scorer``.

    Args:
        engine: a :class:`dallecli.engine.generate.Engine`.
        request: the :class:`~dallecli.engine.request.GenerationRequest`; its ``num_images`` is n.
        scorer: the CLIP that ranks the candidates against ``request.prompt``.
        candidates: K, from 2 to :data:`MAX_CANDIDATES`.
        on_step: progress callback ``(step, steps)`` after each denoising step of each candidate batch.

    Yields:
        For each requested image, its K :class:`RankedImage`, best first, as soon as the group is scored.

    Raises:
        UsageError: ``candidates`` out of range, or an invalid request (before anything loads).
        DalleError: see :meth:`dallecli.engine.generate.Engine.generate`.
    """
    check_candidates(candidates)
    wanted = request.num_images or 1
    group: list = []
    for result in engine.generate(replace(request, num_images=wanted * candidates), on_step=on_step):
        group.append(result)
        if len(group) == candidates:
            scores = scorer.score([r.image for r in group], [r.settings.prompt for r in group])
            yield rank_group(group, scores, result.index // candidates)
            group = []
