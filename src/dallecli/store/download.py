"""Fetch exactly what a diffusers pipeline loads from the Hugging Face Hub into the shared HF cache.

Three steps, each usable alone:

1. :func:`plan_download` reads the repo's file listing (one ``model_info`` call, with sizes) and its
   ``model_index.json`` (fetched into a temporary folder, never into the cache), and decides the file list (for a
   CLIP scorer, a transformers model folder: :func:`select_scorer_files`):
   ``model_index.json``, each loaded component's configs and tokenizer files, and its ``.safetensors`` (the
   ``fp16`` variant when asked for). Pickle formats (``.bin``, ``.ckpt``, ``.pt``...), ONNX, Flax and the large
   single-file checkpoints in the repo root are never fetched; a component that has only pickles is refused
   here, before anything big is downloaded.
2. :func:`download` checks free disk space and runs ``huggingface_hub.snapshot_download`` with exactly those
   files, pinned to the resolved commit (``huggingface_hub`` writes to ``.incomplete`` files and moves them
   into place, and records the commit under ``refs/``).
3. It then verifies every downloaded ``.safetensors`` by content; a bad file is removed from the cache so that
   the next ``dalle download`` fetches it again.

Nothing here prints: progress goes to an optional callback, failures are :mod:`dallecli.errors`.
``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` are honoured by
``huggingface_hub`` itself; the token is passed through and never appears in a message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dallecli.atomic import write_file
from dallecli.weightfiles import PICKLE_SUFFIXES, sniff, verify_safetensors
from dallecli.errors import (
    AuthError,
    CorruptWeightsError,
    DalleError,
    DownloadError,
    GatedError,
    ModelNotFoundError,
    UnsafeWeightsError,
    UsageError,
)
from dallecli.store.registry import EMBEDDED, ModelSpec, canonical_name, lookup

# Files a component folder may need besides its weights: configs, tokenizer vocabularies, sentencepiece models.
CONFIG_SUFFIXES = (".json", ".txt", ".model")
# Weights that are never fetched (pickles, and formats diffusers does not load from a PyTorch pipeline).
NEVER_SUFFIXES = PICKLE_SUFFIXES + (".onnx", ".onnx_data", ".msgpack", ".h5", ".pb", ".gguf", ".xml")
FREE_SPACE_MARGIN = 256 * 1024 * 1024  # bytes kept free beyond the download itself
# Components dalle never loads: it runs no safety checker, so these folders are never fetched.
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_INDEX = re.compile(r"\.safetensors\.index(?:\.([^.]+))?\.json$", re.IGNORECASE)

ProgressCallback = Callable[[int, int], None]  # (bytes just written, total bytes expected)


@dataclass(frozen=True)
class PlannedFile:
    """One file to fetch: its path in the repo and its size in bytes (None when the Hub does not say)."""

    path: str
    size: int | None


@dataclass(frozen=True)
class DownloadPlan:
    """What :func:`download` will fetch.

    Attributes:
        name: what the user typed (alias or repo id).
        repo_id: the Hub repo.
        revision: the branch, tag or commit asked for ("main" by default).
        commit: the 40-hex commit that ``revision`` resolved to; every file is fetched at this commit.
        variant: the weights variant chosen ("fp16") or None.
        files: the files to fetch, sorted by path.
        skipped: repo files left out, with the reason (e.g. ``("v1-5-pruned.safetensors", "single-file
            checkpoint")``), for ``--dry-run``.
        spec: the registry entry, if the name is a registered alias or repo.
        notice: one line when the name typed was renamed or moved, else None.
        companions: plans fetched along with this one (the fp16-safe VAE a registry entry names).
    """

    name: str
    repo_id: str
    revision: str
    commit: str
    variant: str | None
    files: tuple[PlannedFile, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    spec: ModelSpec | None = field(default=None, compare=False)
    notice: str | None = None
    companions: tuple["DownloadPlan", ...] = ()

    @property
    def total_bytes(self) -> int:
        """Sum of the known file sizes of this plan and its companions, bytes."""
        return sum(f.size or 0 for f in self.files) + sum(c.total_bytes for c in self.companions)


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download` did.

    Attributes:
        folder: the snapshot folder in the HF cache (``.../models--org--name/snapshots/<commit>``).
        commit: the commit downloaded.
        fetched_bytes: bytes that were missing before this call, companions included (0 when everything was
            already cached).
        verified: the ``.safetensors`` files checked, relative to ``folder``.
        companions: the results of the plan's companions (the fp16-safe VAE of an SDXL entry).
    """

    folder: Path
    commit: str
    fetched_bytes: int
    verified: tuple[str, ...]
    companions: tuple["DownloadResult", ...] = ()

    @property
    def already_cached(self) -> bool:
        return self.fetched_bytes == 0


def repo_for(name: str) -> tuple[str, ModelSpec | None]:
    """The Hub repo id for an alias or ``org/name`` id (renamed and moved names mapped), and its registry entry.

    Raises:
        UsageError: the embedded model (nothing to download), a local path, or a name that is neither an
            alias nor a well-formed ``org/name``.
    """
    from dallecli.store.resolve import check_repo_id

    spec = lookup(name)  # renamed aliases and moved repos included
    if spec is not None and spec.repo_id is None and spec.kind == "scorer":
        raise UsageError(f"'{name}' is the embedded scorer; it ships with dalle and needs no download")
    if is_embedded(name) or (spec is not None and spec.repo_id is None):
        raise UsageError(f"'{name}' is the embedded model; it ships with dalle and needs no download")
    if spec is not None:
        return spec.repo_id, spec
    if Path(name).expanduser().exists():
        raise UsageError(f"'{name}' is a local path; `dalle download` takes a registry alias or an org/name repo id")
    return check_repo_id(name, "dalle download"), None


def variant_of(filename: str) -> str | None:
    """The variant in a weights file name: ``model.fp16.safetensors`` and
    ``diffusion_pytorch_model-00001-of-00002.fp16.safetensors`` give "fp16"; plain names give None."""
    parts = filename.split(".")
    if len(parts) < 3:
        return None
    return _SHARD.sub("", parts[-2]) or None


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def pipeline_components(model_index: dict) -> list[str]:
    """Component folders the pipeline loads: keys whose value names a library and class (not ``[null, null]``),
    less the safety checker and its feature extractor, which dalle never runs."""
    return sorted(key for key, value in model_index.items()
                  if not key.startswith("_") and key not in SKIPPED_COMPONENTS
                  and isinstance(value, list) and len(value) == 2 and value[0] and value[1])


def select_files(listing: dict[str, int | None], model_index: dict, variant: str | None,
                 repo_id: str) -> tuple[list[PlannedFile], list[tuple[str, str]]]:
    """Choose the files a pipeline loads from a repo listing (pure: no network).

    Args:
        listing: every file in the repo, path -> size in bytes (or None).
        model_index: the parsed ``model_index.json``.
        variant: weights variant to prefer ("fp16"), or None for the plain files.
        repo_id: for messages.

    Returns:
        (files to fetch, [(skipped path, reason)]).

    Raises:
        UnsafeWeightsError: a component that has weights only as pickles (or other non-safetensors formats).
    """
    components = pipeline_components(model_index)
    chosen: set[str] = {"model_index.json"}
    pickle_only: list[str] = []
    for component in components:
        direct = [p for p in listing if p.startswith(component + "/") and "/" not in p[len(component) + 1:]]
        configs = [p for p in direct if _suffix(p) in CONFIG_SUFFIXES and not p.lower().endswith((".bin.index.json",))]
        safetensors = [p for p in direct if _suffix(p) == ".safetensors"]
        other_weights = [p for p in direct if _suffix(p) in NEVER_SUFFIXES]
        if not safetensors and other_weights:
            pickle_only.append(f"{component} ({', '.join(sorted(os.path.basename(p) for p in other_weights)[:2])})")
            continue
        wanted = [p for p in safetensors if variant and variant_of(os.path.basename(p)) == variant]
        if not wanted:
            wanted = [p for p in safetensors if variant_of(os.path.basename(p)) is None]
        if not wanted:  # only other variants exist (e.g. fp16 alone): take what there is
            wanted = safetensors
        picked_variant = variant_of(os.path.basename(wanted[0])) if wanted else None
        for path in configs:
            # sharded-weights index: keep the one that matches the chosen files (".index.fp16.json" / ".index.json")
            index = _INDEX.search(os.path.basename(path))
            if index and index.group(1) != picked_variant:
                continue
            chosen.add(path)
        chosen.update(wanted)
    if pickle_only:
        raise UnsafeWeightsError(
            f"{repo_id} has pickle-only weights for {', '.join(pickle_only)}; dalle loads .safetensors only, so "
            "nothing was downloaded. Look for a repo (or a refs/pr/N revision) that provides .safetensors files"
        )
    missing = [c for c in components if not any(p.startswith(c + "/") for p in listing)]
    if missing:
        raise ModelNotFoundError(f"{repo_id}: model_index.json names {', '.join(missing)}, but the repo has no such folder")
    skipped: list[tuple[str, str]] = []
    for path in sorted(listing):
        if path in chosen:
            continue
        suffix = _suffix(path)
        if "/" not in path and suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            reason = "single-file checkpoint (not loaded by diffusers)"
        elif path.split("/")[0] in SKIPPED_COMPONENTS:
            reason = "safety checker (dalle does not run one)"
        elif suffix in NEVER_SUFFIXES:
            reason = "pickle or non-PyTorch format"
        elif suffix == ".safetensors":
            reason = "other weights variant" if path.split("/")[0] in components else "component not loaded"
        else:
            continue  # READMEs, images, .gitattributes: not worth listing
        skipped.append((path, reason))
    files = [PlannedFile(p, listing.get(p)) for p in sorted(chosen)]
    return files, skipped


def select_component_files(listing: dict[str, int | None], variant: str | None,
                           repo_id: str) -> tuple[list[PlannedFile], list[tuple[str, str]]]:
    """Choose the files of a single-component repo (a VAE such as ``madebyollin/taesd``: ``config.json`` and
    the weights in the repo root) from its listing (pure: no network).

    Raises:
        UnsafeWeightsError: the root has weights only as pickles.
        ModelNotFoundError: no ``config.json`` in the root.
    """
    if "config.json" not in listing:
        raise ModelNotFoundError(f"{repo_id} has no config.json in its root; it is not a diffusers model folder")
    root = [p for p in listing if "/" not in p]
    safetensors = [p for p in root if _suffix(p) == ".safetensors"]
    # diffusers loads diffusion_pytorch_model[.variant].safetensors; other root files are other tools' copies
    # (taesd_decoder.safetensors, sdxl_vae.safetensors) that would be fetched for nothing
    own = [p for p in safetensors if p.startswith("diffusion_pytorch_model.")]
    safetensors = own or safetensors
    if not safetensors:
        others = sorted(p for p in root if _suffix(p) in NEVER_SUFFIXES)
        raise UnsafeWeightsError(f"{repo_id} has pickle-only weights ({', '.join(others[:2]) or 'none'}); dalle "
                                 "loads .safetensors only, so nothing was downloaded")
    wanted = [p for p in safetensors if variant and variant_of(p) == variant]
    wanted = wanted or [p for p in safetensors if variant_of(p) is None] or safetensors
    chosen = {"config.json", *wanted}
    skipped = [(p, "pickle or non-PyTorch format" if _suffix(p) in NEVER_SUFFIXES else "other weights variant")
               for p in sorted(listing) if p not in chosen and (_suffix(p) in NEVER_SUFFIXES or _suffix(p) == ".safetensors")]
    return [PlannedFile(p, listing.get(p)) for p in sorted(chosen)], skipped


def _translate_hub_error(exc: Exception, repo_id: str, name: str) -> DalleError:
    """Map a huggingface_hub exception to a one-line dallecli error (never quoting headers or tokens)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled) or (isinstance(exc, LocalEntryNotFoundError) and "offline" in str(exc).lower()):
        return DownloadError(f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it to download")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return AuthError(
            f"{repo_id}: no or invalid token (set HF_TOKEN or `--token`); the repo is gated or private "
            "(or does not exist)"
        )
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return GatedError(
            f"{repo_id}: licence not accepted (accept it at the model page, "
            f"https://huggingface.co/{repo_id}, with the account of your token)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no revision by that name; check `--revision`")
    if isinstance(exc, (RepositoryNotFoundError, GatedRepoError)) or status == 404:
        return ModelNotFoundError(f"no model '{name}' on the Hub ({repo_id}); check the name (see `dalle models`)")
    kind = type(exc).__name__
    return DownloadError(f"cannot download {repo_id} ({kind}{f', HTTP {status}' if status else ''}); "
                         "check your connection (or HF_ENDPOINT) and run the command again")


def _hub_call(fn, repo_id: str, name: str):
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return fn()
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
        raise _translate_hub_error(exc, repo_id, name) from exc
    except Exception as exc:  # httpx connection errors and timeouts
        if type(exc).__module__.split(".")[0] in ("httpx", "httpcore", "httpx2"):
            raise _translate_hub_error(exc, repo_id, name) from exc
        raise


def plan_download(name: str, *, revision: str | None = None, variant: str | None = None,
                  token: str | None = None) -> DownloadPlan:
    """Decide which files of a Hub repo to fetch, without writing to the cache: a pipeline's loaded components,
    a VAE's ``config.json`` and weights, a LoRA's ``.safetensors``, or a CLIP scorer's configs, tokenizer and
    ``model.safetensors`` (:func:`select_scorer_files`); a registry entry's fp16-safe VAE
    (``ModelSpec.vae``) is planned with it as a companion.

    Network: one ``model_info`` call (file list with sizes and the resolved commit) and one small download of
    ``model_index.json`` into a temporary folder (per companion too).

    Args:
        name: registry alias or ``org/name`` repo id (renamed aliases and moved repos are mapped, with a notice).
        revision: branch, tag or commit (default: the registry entry's ``revision``, else "main").
        variant: weights variant ("fp16"); default: the registry's ``variant`` for a registered model.
        token: Hub token (default: ``HF_TOKEN`` or the saved login, as ``huggingface_hub`` decides).

    Raises:
        UsageError: the embedded model, a local path, or a malformed name.
        ModelNotFoundError: no such repo or revision, or not a diffusers pipeline (no ``model_index.json``).
        UnsafeWeightsError: a loaded component has only pickle weights.
        AuthError: 401, no or invalid token.
        GatedError: 403, licence not accepted.
        DownloadError: offline mode, network failure.
    """
    from huggingface_hub import HfApi, hf_hub_download

    name, notice = canonical_name(name)
    repo_id, spec = repo_for(name)
    asked = variant
    if variant is None and spec is not None:
        variant = spec.variant
    revision = revision or (spec.revision if spec is not None else None) or "main"
    api = HfApi(token=token)
    info = _hub_call(lambda: api.model_info(repo_id, revision=revision, files_metadata=True), repo_id, name)
    commit = info.sha
    listing = {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in (info.siblings or [])}
    companions = (plan_download(spec.vae, token=token),) if spec is not None and spec.vae else ()
    if spec is not None and spec.kind == "lora":
        files, skipped = select_lora_files(listing, repo_id)
    elif spec is not None and spec.kind == "scorer":
        files, skipped = _scorer_plan(listing, repo_id, revision, spec)
    elif spec is None and "model_index.json" not in listing and "config.json" in listing \
            and _is_clip_folder(repo_id, name, commit, token):
        files, skipped = _scorer_plan(listing, repo_id, revision, spec)
    elif "model_index.json" not in listing and spec is not None and spec.kind in ("vae", "tiny-vae"):
        files, skipped = select_component_files(listing, variant, repo_id)
    elif "model_index.json" not in listing:
        raise ModelNotFoundError(
            f"{repo_id} is not a diffusers pipeline (no model_index.json in the repo root); "
            "dalle downloads diffusers-format repos only"
        )
    else:
        with tempfile.TemporaryDirectory(prefix="dalle-plan-") as tmp:
            path = _hub_call(lambda: hf_hub_download(repo_id, "model_index.json", revision=commit, local_dir=tmp,
                                                     token=token), repo_id, name)
            try:
                model_index = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelNotFoundError(f"{repo_id}: model_index.json is not valid JSON") from exc
        files, skipped = select_files(listing, model_index, variant, repo_id)
    chosen_variant = variant if any(variant_of(os.path.basename(f.path)) == variant for f in files) else None
    if asked and chosen_variant != asked:
        present = sorted({v for p in listing if _suffix(p) == ".safetensors" and (v := variant_of(os.path.basename(p)))})
        raise UsageError(f"--variant {asked}: {repo_id} has no {asked} weights"
                         + (f" (it has: {', '.join(present)})" if present else " (only the plain files)"))
    return DownloadPlan(name, repo_id, revision, commit, chosen_variant, tuple(files), tuple(skipped), spec,
                        notice, companions)


# What transformers loads from a CLIP model folder besides the weights: the model and processor configs and the
# tokenizer (the fast tokenizer.json and the slow tokenizer's vocab.json/merges.txt, which CLIPProcessor may use).
SCORER_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json")
_OTHER_FORMATS = {".bin": "PyTorch pickle (dalle loads .safetensors only)", ".h5": "TensorFlow weights (not loaded)",
                  ".msgpack": "Flax weights (not loaded)"}


def select_scorer_files(listing: dict[str, int | None], repo_id: str, revision: str = "main",
                        advice: str | None = None) -> tuple[list[PlannedFile], list[tuple[str, str]]]:
    """Choose the files of a CLIP scorer repo (a transformers ``CLIPModel`` folder in the repo root, such as
    ``openai/clip-vit-large-patch14``) from its listing (pure: no network): the configs and tokenizer files of
    :data:`SCORER_FILES` that it has, and ``model.safetensors`` (or its shards and their index).

    Args:
        listing: every file in the repo at ``revision``, path -> size in bytes (or None).
        repo_id, revision: for messages.
        advice: the pickle-only message's last sentence (default: look for a ``refs/pr/N`` revision).

    Returns:
        (files to fetch, [(skipped path, reason)]): ``pytorch_model.bin``, ``tf_model.h5`` and
        ``flax_model.msgpack`` are skipped with their reason.

    Raises:
        ModelNotFoundError: no ``config.json`` in the root.
        UnsafeWeightsError: the root has weights only as pickles (or TensorFlow/Flax files); the message points at
            a ``refs/pr/N`` revision, where the Hub's safetensors conversions live.
    """
    if "config.json" not in listing:
        raise ModelNotFoundError(f"{repo_id} has no config.json in its root; it is not a transformers model folder")
    root = [p for p in listing if "/" not in p]
    index = "model.safetensors.index.json"
    shards = sorted(p for p in root if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p))
    if "model.safetensors" in listing:
        weights = ["model.safetensors"]
    else:
        weights = shards + [index] if shards and index in listing else []
    if not weights:
        others = sorted(p for p in root if _suffix(p) in NEVER_SUFFIXES)
        raise UnsafeWeightsError(
            f"{repo_id} at {revision} has pickle-only weights ({', '.join(others[:3]) or 'no weights at all'}); dalle "
            "loads .safetensors only, so nothing was downloaded. " + (advice or "Look for a refs/pr/N revision (the "
            "Hub's safetensors conversion) that has model.safetensors and pass it with --revision")
        )
    chosen = {p for p in SCORER_FILES if p in listing} | set(weights)
    skipped = []
    for path in sorted(listing):
        if path in chosen:
            continue
        suffix = _suffix(path)
        if suffix in _OTHER_FORMATS and "/" not in path:
            skipped.append((path, _OTHER_FORMATS[suffix]))
        elif suffix in NEVER_SUFFIXES or suffix == ".safetensors":
            skipped.append((path, "pickle or non-PyTorch format" if suffix in NEVER_SUFFIXES
                            else "not loaded by CLIPModel"))
    return [PlannedFile(p, listing.get(p)) for p in sorted(chosen)], skipped


def _scorer_plan(listing: dict[str, int | None], repo_id: str, revision: str,
                 spec: ModelSpec | None) -> tuple[list[PlannedFile], list[tuple[str, str]]]:
    """:func:`select_scorer_files`, naming the registry's revision when another one was asked for."""
    advice = None
    if spec is not None and spec.revision and spec.revision != revision:
        advice = (f"The registry's revision {spec.revision} (the Hub's safetensors conversion) has model.safetensors: "
                  f"run `dalle download {spec.alias}` without --revision")
    return select_scorer_files(listing, repo_id, revision, advice)


def _is_clip_folder(repo_id: str, name: str, commit: str, token: str | None) -> bool:
    """Whether a repo without ``model_index.json`` is a transformers CLIP model (its ``config.json``, fetched into
    a temporary folder, says ``model_type: clip``): ``dalle download org/name`` of an unregistered scorer."""
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory(prefix="dalle-plan-") as tmp:
        path = _hub_call(lambda: hf_hub_download(repo_id, "config.json", revision=commit, local_dir=tmp, token=token),
                         repo_id, name)
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
    return isinstance(config, dict) and config.get("model_type") == "clip"


def select_lora_files(listing: dict[str, int | None], repo_id: str) -> tuple[list[PlannedFile], list[tuple[str, str]]]:
    """Choose the files of a LoRA repo (e.g. ``latent-consistency/lcm-lora-sdv1-5``): the ``.safetensors`` in
    its root (pure: no network).

    Raises:
        UnsafeWeightsError: the root has LoRA weights only as pickles.
    """
    root = [p for p in listing if "/" not in p]
    wanted = sorted(p for p in root if _suffix(p) == ".safetensors")
    if not wanted:
        others = sorted(p for p in root if _suffix(p) in NEVER_SUFFIXES)
        raise UnsafeWeightsError(f"{repo_id} has no .safetensors LoRA file ({', '.join(others[:2]) or 'none'}); "
                                 "dalle loads .safetensors only, so nothing was downloaded")
    skipped = [(p, "pickle or non-PyTorch format" if _suffix(p) in NEVER_SUFFIXES else "not in the repo root")
               for p in sorted(listing) if p not in wanted and (_suffix(p) in NEVER_SUFFIXES or _suffix(p) == ".safetensors")]
    return [PlannedFile(p, listing.get(p)) for p in wanted], skipped


def _cache_root(cache_dir: Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()


def snapshot_folder(repo_id: str, commit: str, cache_dir: Path | None = None) -> Path:
    """Where a commit of a repo lives in the HF cache (it may not exist yet)."""
    from huggingface_hub.file_download import repo_folder_name

    return _cache_root(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit


def _missing_here(plan: DownloadPlan, cache_dir: Path | None) -> tuple[int, list[PlannedFile]]:
    folder = snapshot_folder(plan.repo_id, plan.commit, cache_dir)
    missing = [f for f in plan.files if not (folder / f.path).is_file()]
    return sum(f.size or 0 for f in missing), missing


def missing_bytes(plan: DownloadPlan, cache_dir: Path | None = None) -> tuple[int, list[PlannedFile]]:
    """Bytes (and files) of ``plan`` and its companions not yet in the cache."""
    results = [_missing_here(p, cache_dir) for p in (plan, *plan.companions)]
    return sum(n for n, _ in results), [f for _, files in results for f in files]


def check_disk_space(needed: int, cache_dir: Path | None = None) -> None:
    """Raise when the cache's file system has less than ``needed`` bytes plus a 256 MiB margin free.

    Raises:
        DownloadError: naming the bytes needed, the bytes free and the folder.
    """
    root = _cache_root(cache_dir)
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + FREE_SPACE_MARGIN:
        raise DownloadError(
            f"not enough disk space in {root}: the download needs {human_size(needed)} and dalle keeps "
            f"{human_size(FREE_SPACE_MARGIN)} free beyond it ({human_size(needed + FREE_SPACE_MARGIN)} in all); "
            f"{human_size(free)} is free. Free some space or pass `--cache-dir` on a larger disk"
        )


def human_size(n: int | float) -> str:
    """``1536`` -> ``"1.5 kB"`` (decimal units, as the Hub shows them)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _progress_class(callback: ProgressCallback | None):
    """A silent tqdm class for ``snapshot_download`` that reports written bytes to ``callback``."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Reporter(hf_tqdm):
        def __init__(self, *args, **kwargs):
            self._report = callback is not None and kwargs.get("name") == "huggingface_hub.snapshot_download"
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self._report and n:
                callback(int(n), int(self.total or 0))
            return super().update(n)

    return _Reporter


def _remove_from_cache(path: Path) -> None:
    """Delete a snapshot file and, when it is a symlink into ``blobs/``, the blob too."""
    try:
        if path.is_symlink():
            blob = path.resolve()
            path.unlink()
            if blob.exists():
                blob.unlink()
        elif path.exists():
            path.unlink()
    except OSError:
        pass


def verify_download(plan: DownloadPlan, folder: Path) -> list[str]:
    """Check every planned ``.safetensors`` in ``folder`` by content; remove a bad one from the cache.

    Returns:
        The verified paths, relative to ``folder``.

    Raises:
        CorruptWeightsError: truncated, LFS pointer or unreadable (the message names the file and says to
            re-download).
        UnsafeWeightsError: a pickle, whatever its name.
    """
    checked = []
    for planned in plan.files:
        if _suffix(planned.path) != ".safetensors":
            continue
        path = folder / planned.path
        try:
            verify_safetensors(path)
        except (CorruptWeightsError, UnsafeWeightsError) as exc:
            kind = sniff(path)
            _remove_from_cache(path)
            what = {"truncated": "is truncated (shorter than its safetensors header says)",
                    "oversized": "is longer than its safetensors header says (damaged)",
                    "lfs-pointer": "is a Git LFS pointer file, not the weights",
                    "pickle": "is a pickle file whatever its name says (pickles can run code)",
                    "zip": "is a zipped torch pickle whatever its name says (pickles can run code)",
                    }.get(kind, "is not a safetensors file (unreadable header)")
            advice = ("refused; use a repo that provides real .safetensors weights" if isinstance(exc, UnsafeWeightsError)
                      else f"re-download it with `dalle download {plan.name}`")
            raise type(exc)(f"{plan.repo_id}: {planned.path} {what}; it was removed from the cache; {advice}") from exc
        checked.append(planned.path)
    return checked


def download(plan: DownloadPlan, *, token: str | None = None, cache_dir: Path | None = None,
             on_progress: ProgressCallback | None = None, max_workers: int = 8) -> DownloadResult:
    """Fetch the files of ``plan`` into the HF cache at ``plan.commit`` and verify them.

    Args:
        plan: from :func:`plan_download`.
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``, i.e. ``$HF_HOME/hub``).
        on_progress: called as ``(bytes_written, total_bytes)`` while files arrive.
        max_workers: parallel file downloads.

    Returns:
        A :class:`DownloadResult`; ``already_cached`` is true when nothing was missing (no file is fetched).

    Raises:
        DownloadError: not enough disk space, offline mode, network failure.
        AuthError, GatedError: 401 / 403 from the Hub.
        CorruptWeightsError, UnsafeWeightsError: a downloaded ``.safetensors`` failed verification.
    """
    from huggingface_hub import snapshot_download

    extra = [download(c, token=token, cache_dir=cache_dir, on_progress=on_progress, max_workers=max_workers)
             for c in plan.companions]
    needed, missing = _missing_here(plan, cache_dir)
    folder = snapshot_folder(plan.repo_id, plan.commit, cache_dir)
    if missing:
        check_disk_space(needed, cache_dir)
        result = _hub_call(lambda: snapshot_download(
            plan.repo_id, revision=plan.commit, cache_dir=cache_dir, token=token,
            allow_patterns=[f.path for f in plan.files], tqdm_class=_progress_class(on_progress),
            max_workers=max_workers,
        ), plan.repo_id, plan.name)
        folder = Path(result)
    _record_ref(plan, cache_dir)
    verified = verify_download(plan, folder)
    fetched = (needed if missing else 0) + sum(r.fetched_bytes for r in extra)
    return DownloadResult(folder, plan.commit, fetched, tuple(verified), tuple(extra))


def _record_ref(plan: DownloadPlan, cache_dir: Path | None) -> None:
    """Point ``refs/<revision>`` at the commit (``snapshot_download`` was given the commit, so it did not),
    so that offline lookups of the branch or tag find this snapshot."""
    if re.fullmatch(r"[0-9a-f]{40}", plan.revision):
        return
    refs = snapshot_folder(plan.repo_id, plan.commit, cache_dir).parent.parent / "refs"
    ref = refs / plan.revision
    if ref.is_file() and ref.read_text(encoding="utf-8").strip() == plan.commit:
        return
    write_file(ref, plan.commit, what=f"the {plan.revision} reference in the model cache")


def is_embedded(name: str) -> bool:
    """True for the names that mean the embedded model."""
    return name in (EMBEDDED, "embedded", "default")
