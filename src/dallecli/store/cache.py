"""What is downloaded, and removing it: a view of the shared Hugging Face cache through ``scan_cache_dir``.

Only diffusers pipelines (snapshots with a ``model_index.json``) and the registry's other entries (VAEs, LoRAs,
CLIP scorers) are listed, so the language models other tools keep in the same cache are left out; the embedded
model is always listed first, then the embedded scorer. Removal builds a plan
(``huggingface_hub``'s ``DeleteCacheStrategy``: the snapshots, blobs and refs to delete and the bytes freed)
that the caller shows before executing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dallecli import __version__
from dallecli.errors import ModelNotFoundError, UsageError
from dallecli.store.registry import (EMBEDDED, EMBEDDED_SCORER, PIPELINE_FAMILIES, PIPELINE_KINDS, REGISTRY, ModelSpec,
                                     defaults_for, lookup)


@dataclass(frozen=True)
class CachedModel:
    """One listed model (one revision of one repo, or the embedded model).

    Attributes:
        alias: registry alias, or None for an unregistered repo.
        repo_id: Hub repo id, or None for the embedded model.
        revision: commit hash (or ``dallecli-<version>`` for the embedded model).
        refs: branch or tag names that point at this commit (e.g. ``("main",)``).
        size_bytes: bytes on disk (blobs shared between revisions are counted in each).
        family: pipeline family ("stable-diffusion", "sdxl", ...).
        path: the snapshot (or embedded) folder.
        files: file paths relative to ``path``.
        kind: "pipeline", or the registry kind of a VAE, tiny VAE, LoRA or scorer entry.
        missing: components a partly downloaded pipeline lacks (an interrupted download); empty when complete.
    """

    alias: str | None
    repo_id: str | None
    revision: str
    refs: tuple[str, ...]
    size_bytes: int
    family: str
    path: Path
    files: tuple[str, ...] = ()
    kind: str = "pipeline"
    missing: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """What to type after ``--model``."""
        return self.alias or self.repo_id or EMBEDDED

    def as_dict(self) -> dict:
        return {"name": self.name, "alias": self.alias, "repo_id": self.repo_id, "revision": self.revision,
                "refs": list(self.refs), "size_bytes": self.size_bytes, "family": self.family, "kind": self.kind,
                "missing": list(self.missing), "path": str(self.path)}


@dataclass(frozen=True)
class RemovalPlan:
    """What :func:`remove` deletes.

    Attributes:
        repo_id: the repo.
        revisions: the commits removed.
        paths: folders and files that will be deleted (snapshots, blobs, refs, or the whole repo folder).
        freed_bytes: space freed, bytes.
    """

    repo_id: str
    revisions: tuple[str, ...]
    paths: tuple[Path, ...]
    freed_bytes: int
    _strategy: object = None


def _family(folder: Path, spec: ModelSpec | None) -> str:
    if spec is not None:
        return spec.family
    from dallecli.weightfiles import pipeline_class_name

    return PIPELINE_FAMILIES.get(pipeline_class_name(folder) or "", "unknown")


def _scan(cache_dir: Path | None):
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(cache_dir)
    except CacheNotFound:
        return None


def _embedded(alias: str = EMBEDDED) -> CachedModel | None:
    """The embedded model (or, with ``alias=EMBEDDED_SCORER``, the embedded scorer) when its folder is installed."""
    from dallecli.store.resolve import embedded_model_path, embedded_scorer_path

    folder, marker = ((embedded_model_path(), "model_index.json") if alias == EMBEDDED
                      else (embedded_scorer_path(), "config.json"))
    if not (folder / marker).exists():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    spec = REGISTRY[alias]
    return CachedModel(alias, None, f"dallecli-{__version__}", (), sum(p.stat().st_size for p in files),
                       spec.family, folder, tuple(p.relative_to(folder).as_posix() for p in files), spec.kind)


def list_models(cache_dir: Path | None = None) -> list[CachedModel]:
    """The embedded model and scorer, every diffusers pipeline in the HF cache and the registry's VAE, tiny VAE,
    LoRA and scorer entries that were downloaded, one entry per cached revision.

    Args:
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``, i.e. ``$HF_HOME/hub``).

    Returns:
        Embedded model first, then the embedded scorer, then repos by id, newest revision first. A missing
        cache gives only the embedded ones (those installed). Never touches the network.
    """
    from dallecli.store.resolve import missing_components

    models = [m for m in (_embedded(), _embedded(EMBEDDED_SCORER)) if m is not None]
    info = _scan(cache_dir)
    if info is None:
        return models
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        spec = lookup(repo.repo_id)
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            folder = Path(rev.snapshot_path)
            kind = spec.kind if spec is not None else "pipeline"
            if kind in PIPELINE_KINDS and not (folder / "model_index.json").exists():
                continue  # other tools' repos in the shared cache (language models, datasets...)
            files = tuple(sorted(f.file_path.relative_to(folder).as_posix() for f in rev.files))
            missing = tuple(missing_components(folder)) if kind in PIPELINE_KINDS else ()
            models.append(CachedModel(spec.alias if spec else None, repo.repo_id, rev.commit_hash,
                                      tuple(sorted(rev.refs)), rev.size_on_disk, _family(folder, spec), folder, files,
                                      kind, missing))
    return models


def _repo_id_for(name: str) -> tuple[str | None, ModelSpec | None]:
    from dallecli.store.resolve import check_repo_id

    spec = lookup(name)  # renamed aliases and moved repos included
    if spec is not None:
        return spec.repo_id, spec
    if name in ("embedded", "default"):
        return None, REGISTRY[EMBEDDED]
    return check_repo_id(name, "model"), None


def model_details(name: str, cache_dir: Path | None = None) -> dict:
    """Everything known about a model without the network: registry data, cached revisions and files,
    and the generation defaults ``dalle generate`` would use.

    Returns:
        ``{"name", "repo_id", "registry": dict | None, "downloaded": [CachedModel.as_dict() + "files"],
        "defaults": {"steps", "guidance", "width", "height"}}`` (``defaults`` None for a VAE or LoRA entry).

    Raises:
        ModelNotFoundError: neither a registry alias nor a cached repo.
    """
    repo_id, spec = _repo_id_for(name)
    if repo_id is None:  # the embedded model or the embedded scorer
        cached = [m for m in list_models(cache_dir) if m.repo_id is None and m.alias == spec.alias]
    else:
        cached = [m for m in list_models(cache_dir) if m.repo_id and m.repo_id.lower() == repo_id.lower()]
    if spec is None and not cached:
        raise ModelNotFoundError(
            f"unknown model '{name}': not a registry alias (see `dalle models`) and not downloaded; "
            f"run `dalle download {name}` for a Hub repo"
        )
    pipeline_class = sample = None
    if cached:
        from dallecli.weightfiles import default_size, pipeline_class_name

        pipeline_class, sample = pipeline_class_name(cached[0].path), default_size(cached[0].path)
    return {
        "name": spec.alias if spec else repo_id,
        "repo_id": repo_id,
        "registry": spec.as_dict() if spec else None,
        "pipeline_class": pipeline_class,
        "downloaded": [dict(m.as_dict(), files=list(m.files)) for m in cached],
        "defaults": defaults_for(spec, pipeline_class, sample) if spec is None or spec.is_diffusers_pipeline else None,
    }


def plan_removal(name: str, cache_dir: Path | None = None, revision: str | None = None) -> RemovalPlan:
    """Work out what removing a downloaded model deletes, without deleting anything.

    Args:
        name: registry alias or repo id.
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``).
        revision: one commit (or its first characters) to remove; default: every cached revision.

    Raises:
        UsageError: the embedded model (it is part of the installation).
        ModelNotFoundError: nothing by that name in the cache.
    """
    repo_id, spec = _repo_id_for(name)
    if repo_id is None:
        raise UsageError("the embedded model is part of dalle's installation and cannot be removed")
    info = _scan(cache_dir)
    repo = None if info is None else next(
        (r for r in info.repos if r.repo_type == "model" and r.repo_id.lower() == repo_id.lower()), None)
    if repo is None:
        raise ModelNotFoundError(f"model '{name}' is not downloaded (nothing to remove); see `dalle models`")
    commits = [r.commit_hash for r in repo.revisions if revision is None or r.commit_hash.startswith(revision)]
    if not commits:
        raise ModelNotFoundError(f"model '{name}' has no cached revision '{revision}'; see `dalle models info {name}`")
    strategy = info.delete_revisions(*commits)
    paths = tuple(sorted({*strategy.repos, *strategy.snapshots, *strategy.refs, *strategy.blobs}))
    return RemovalPlan(repo.repo_id, tuple(commits), paths, strategy.expected_freed_size, strategy)


def remove(plan: RemovalPlan) -> int:
    """Delete what ``plan`` lists.

    Returns:
        Bytes freed (as planned).
    """
    plan._strategy.execute()
    return plan.freed_bytes
