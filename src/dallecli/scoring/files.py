"""Score image files against a text or against the prompt each stores (``dalle score``), and write a scored copy
of a batch folder's manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dallecli.errors import UsageError
from dallecli.scoring.clip import ClipScorer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SCORED_MANIFEST = "manifest.scores.jsonl"  # beside manifest.jsonl, which is never rewritten


@dataclass(frozen=True)
class FileScore:
    """One file's result.

    Attributes:
        path: the image file.
        prompt: the text it was scored against, or None when there was none (see ``problem``).
        clip_score: 100 × cosine similarity floored at 0 (range [0, 100]), or None when not scored.
        cosine: the raw cosine similarity in [-1, 1], or None.
        problem: why it was not scored (no prompt stored, unreadable file), else None.
    """

    path: Path
    prompt: str | None
    clip_score: float | None = None
    cosine: float | None = None
    problem: str | None = None

    def as_dict(self) -> dict:
        return {"path": str(self.path), "prompt": self.prompt, "clip_score": self.clip_score, "cosine": self.cosine,
                **({"problem": self.problem} if self.problem else {})}


def collect_images(paths: list[Path]) -> list[Path]:
    """The image files named: files as given, folders expanded to their images (PNG, JPEG, WebP; not recursive,
    sorted by name; a ``candidates/`` subfolder is not entered).

    Raises:
        UsageError: a path that does not exist, or nothing to score.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"IMAGE {path} does not exist")
    if not found:
        raise UsageError(f"no images (PNG, JPEG or WebP) in {', '.join(str(p) for p in paths)}")
    return found


def score_files(scorer: ClipScorer, paths: list[Path], prompt: str | None = None) -> list[FileScore]:
    """Score each image against ``prompt``, or when it is None against the prompt stored in the image's metadata
    (dalle's, AUTOMATIC1111's or ComfyUI's). Files that cannot be read or hold no prompt get a ``problem``.

    Returns:
        One :class:`FileScore` per path, in order.
    """
    from dallecli.engine.inputs import load_init_image
    from dallecli.images import read_metadata

    images, texts, results = [], [], []
    for path in paths:
        try:
            image = load_init_image(path, "IMAGE").rgb
        except UsageError as exc:
            results.append(FileScore(path, prompt, problem=str(exc)))
            continue
        text = prompt
        if text is None:
            try:
                text = read_metadata(path).get("prompt")
            except UsageError:
                text = None
            if not isinstance(text, str) or not text:
                results.append(FileScore(path, None, problem="stores no prompt; give --prompt"))
                continue
        images.append(image)
        texts.append(text)
        results.append(FileScore(path, text))
    scores = iter(scorer.score(images, texts) if images else [])
    return [r if r.problem else FileScore(r.path, r.prompt, (s := next(scores)).clip_score, s.cosine) for r in results]


def write_scored_manifest(folder: Path, scores: list[FileScore], scorer: ClipScorer) -> Path | None:
    """Write a copy of ``folder``'s ``manifest.jsonl`` as :data:`SCORED_MANIFEST`, each done image record with
    ``clip_score``, ``cosine`` and ``scorer`` added (None where the image was not scored); the original is never
    rewritten. Returns the copy's path, or None when ``folder`` has no manifest.

    Raises:
        DiskFullError: no space left; nothing is left half-written.
    """
    from dallecli.atomic import write_file
    from dallecli.batch.manifest import manifest_path, read_records

    if not manifest_path(folder).is_file():
        return None
    by_name = {s.path.name: s for s in scores if s.path.parent.resolve() == Path(folder).resolve()}
    lines = []
    for record in read_records(folder):
        if record.get("type") == "image" and record.get("status") == "done":
            found = by_name.get(record.get("path")) if isinstance(record.get("path"), str) else None
            record = {**record, "clip_score": found.clip_score if found else None,
                      "cosine": found.cosine if found else None, "scorer": scorer.name}
        lines.append(json.dumps(record, ensure_ascii=False))
    target = Path(folder) / SCORED_MANIFEST
    write_file(target, "\n".join(lines) + "\n", what=f"the scored manifest {target}")
    return target


def rank_captions(scorer: ClipScorer, examples) -> list[FileScore]:
    """Score every captioned training image against its own caption, lowest first: captions that do not
    describe their image are the commonest silent fault in fine-tuning data.

    Args:
        examples: :class:`dallecli.training.dataset.Example` items (path and caption); uncaptioned ones are
            given a ``problem``.

    Returns:
        One :class:`FileScore` per example, unscored ones last, the scored ones by ascending cosine.
    """
    captioned = [e for e in examples if e.caption]
    scored = _score_pairs(scorer, captioned)
    missing = [FileScore(e.path, None, problem="no caption") for e in examples if not e.caption]
    done = sorted((r for r in scored if r.problem is None), key=lambda r: r.cosine)
    return done + [r for r in scored if r.problem] + missing


def _score_pairs(scorer: ClipScorer, examples) -> list[FileScore]:
    from dallecli.engine.inputs import load_init_image

    images, kept, results = [], [], []
    for example in examples:
        try:
            images.append(load_init_image(example.path, "image").rgb)
            kept.append(example)
        except UsageError as exc:
            results.append(FileScore(example.path, example.caption, problem=str(exc)))
    scores = scorer.score(images, [e.caption for e in kept]) if kept else []
    return [FileScore(e.path, e.caption, s.clip_score, s.cosine) for e, s in zip(kept, scores)] + results
