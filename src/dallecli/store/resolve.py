"""Turn what the user typed after ``--model`` into a local diffusers folder.

Order: the embedded model (no name, ``shapes`` or ``embedded``); an existing local folder; a registry alias
or any ``org/name`` repo id already in the Hugging Face cache (looked up with ``local_files_only`` so that
this never touches the network; ``dalle download`` is the only command that does). :func:`resolve_scorer` does
the same for a CLIP scorer (``--scorer``), :func:`resolve_lora` and :func:`resolve_vae` for ``--lora`` and ``--vae``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dallecli import __version__
from dallecli.errors import ModelNotFoundError, UnsafeWeightsError, UsageError
from dallecli.store.registry import (EMBEDDED, EMBEDDED_SCORER, PIPELINE_KINDS, REGISTRY, ModelSpec, canonical_name,
                                     lookup)
from dallecli.weightfiles import PICKLE_SUFFIXES


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load.

    Attributes:
        name: how it is recorded in image metadata (alias, repo id or path).
        path: the local diffusers folder (with ``model_index.json``); for a scorer, the transformers CLIP folder
            (with ``config.json``).
        spec: its registry entry, if any.
        revision: the Hub commit of the snapshot, the package version for the embedded model, or None.
        notice: one line for the user when the name typed was renamed or moved (see
            :func:`dallecli.store.registry.canonical_name`), else None.
        single_file: ``path`` is a single-file checkpoint (A1111/Civitai ``.safetensors``), not a folder;
            ``revision`` is then the file's ``sha256:<hex>``.
    """

    name: str
    path: Path
    spec: ModelSpec | None
    revision: str | None
    notice: str | None = None
    single_file: bool = False


def check_repo_id(name: str, option: str = "--model") -> str:
    """Check that ``name`` is a well-formed Hub repo id (``org/name``), before any lookup.

    Returns:
        ``name``.

    Raises:
        UsageError: naming the option and saying what a repo id or a folder looks like.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    try:
        if name.count("/") != 1:
            raise HFValidationError("not org/name")
        validate_repo_id(name)
    except HFValidationError:
        if looks_like_path:
            if option == "dalle download":
                raise UsageError(f"dalle download {name}: give a registry alias (see `dalle models`) or an org/name "
                                 "Hub repo id, not a path") from None
            raise UsageError(f"{option} {name}: no such file or folder") from None
        kinds = {"--vae": ("vae", "tiny-vae"), "--lora": ("lora",), "--scorer": ("scorer",)}.get(option, ("pipeline",))
        aliases = ", ".join((["full", "tiny"] if option == "--vae" else [])
                            + [spec.alias for spec in REGISTRY.values() if spec.kind in kinds])
        raise UsageError(f"{option} '{name}' is not a registry alias ({aliases}), a folder or an org/name "
                         "Hub repo id (letters, digits, '-', '_' and '.')") from None
    return name


def embedded_model_path() -> Path:
    """The folder of the embedded default model inside the installed package."""
    return Path(str(resources.files("dallecli.models") / EMBEDDED))


def _cached_file(repo_id: str, filename: str, cache_dir: Path | None, revision: str | None) -> Path | None:
    """A file of a repo in the HF cache (``revision``: branch, tag or commit; default main), or None.

    Not ``snapshot_download(local_files_only=True)``: it calls a snapshot incomplete unless every file of the repo
    is cached, while ``dalle download`` fetches only what the pipeline loads. refs/<revision> -> snapshot.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


_KIND_NAMES = {"pipeline": "a text-to-image model", "upscaler": "an upscaler", "inpainting": "an inpainting model",
               "scorer": "a CLIP scorer"}


def wrong_kind(spec: ModelSpec, kind: str) -> str:
    """The one-line message for a registry entry used by a command that needs another ``kind`` of model, naming
    the command (or option) that does use it, e.g. "sd-x4-upscaler is an upscaler: use `dalle upscale`"."""
    if spec.kind == "lora":
        return f"'{spec.alias}' is a lora entry, not {_KIND_NAMES[kind]}; use it with --lora"
    if spec.kind in ("vae", "tiny-vae"):
        return f"'{spec.alias}' is a {spec.kind} entry, not {_KIND_NAMES[kind]}; use it with --vae"
    if spec.kind == "scorer":
        return (f"'{spec.alias}' is a CLIP scorer, not {_KIND_NAMES[kind]}; use it with `dalle score --scorer "
                f"{spec.alias}` or `--rerank K --scorer {spec.alias}`")
    if kind == "scorer":
        return (f"'{spec.alias}' is {_KIND_NAMES[spec.kind]}, not a CLIP scorer; scorers: "
                f"{', '.join(s.alias for s in REGISTRY.values() if s.kind == 'scorer')} (see `dalle models`)")
    return f"{spec.alias} is {_KIND_NAMES[spec.kind]}: use `dalle {PIPELINE_KINDS[spec.kind]}`"


def resolve_model(name: str | None, cache_dir: Path | None = None, revision: str | None = None, *,
                  recorded_revision: str | None = None, kind: str = "pipeline") -> ResolvedModel:
    """Find the folder for ``name`` without any network access.

    Args:
        name: alias, ``org/name`` repo id, local folder, single-file ``.safetensors`` checkpoint, or None for
            the embedded model.
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``), as given to ``dalle download --cache-dir``.
        revision: branch, tag or commit downloaded with ``dalle download --revision`` (default: main).
        recorded_revision: the commit an image records (``dalle generate --from``): used when no ``revision`` is
            given and that snapshot is downloaded; otherwise the default one, with a notice that pixels may differ.
        kind: the registry kind the command needs: "pipeline" (text to image), "upscaler" or "inpainting"; a
            registry entry of another kind, or the embedded model for anything but "pipeline", is refused.

    Raises:
        ModelNotFoundError: nothing by that name is available locally (the message says how to get it).
        UnsafeWeightsError: a single pickle checkpoint file was given (by name or by content).
        CorruptWeightsError: a single file that is truncated or not safetensors.
        UnsupportedCheckpointError: a single safetensors file that is not an SD 1.x/2.x/SDXL checkpoint.
        UsageError: a name that is neither a path, an alias nor a well-formed repo id; a registry entry (or the
            embedded model) of another kind than ``kind`` (:func:`wrong_kind`).
    """
    if name in (None, "", EMBEDDED, "embedded", "default"):
        if kind != "pipeline":
            raise UsageError(f"the embedded model ({EMBEDDED}) cannot do {PIPELINE_KINDS[kind]}; it draws text to "
                             f"images only. Use {_KIND_NAMES[kind]} (see `dalle models`)")
        path = embedded_model_path()
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                "the embedded model is missing from this installation; rebuild it with "
                "`python -m dallecli.training.build_default --out src/dallecli/models/shapes`"
            )
        return ResolvedModel(EMBEDDED, path, lookup(EMBEDDED), f"dallecli-{__version__}")
    local = Path(name).expanduser()
    if local.exists():
        if local.is_file():
            if local.suffix.lower() in PICKLE_SUFFIXES:
                raise UnsafeWeightsError(
                    f"{local.name} is a pickle checkpoint; dalle loads .safetensors only. Convert it or use a "
                    "diffusers folder with .safetensors weights"
                )
            # a single-file checkpoint: content-checked (pickles refused) and its family told from the safetensors
            # header now, so that an unsupported layout fails before anything loads or is hashed
            from dallecli.weightfiles import file_digest, single_file_family

            single_file_family(local)
            return ResolvedModel(str(local), local.resolve(), None, file_digest(local), single_file=True)
        if not (local / "model_index.json").exists():
            raise ModelNotFoundError(f"{local} has no model_index.json; it is not a diffusers pipeline folder")
        return ResolvedModel(str(local), local.resolve(), None, None)
    name, notice = canonical_name(name)
    spec = lookup(name)
    if spec is not None and spec.kind != kind:
        raise UsageError(wrong_kind(spec, kind))
    repo_id = spec.repo_id if spec else check_repo_id(name)
    alias = spec.alias if spec else repo_id

    def download(rev: str | None) -> str:
        return (f"dalle download {alias}" + (f" --revision {rev}" if rev else "")
                + (f" --cache-dir {shlex.quote(str(cache_dir))}" if cache_dir else ""))

    if revision is None and recorded_revision and re.fullmatch(r"[0-9a-f]{40}", recorded_revision):
        if _cached_file(repo_id, "model_index.json", cache_dir, recorded_revision) is not None:
            revision = recorded_revision
        else:
            notice = "; ".join(filter(None, (notice, (
                f"the image was made with {alias} at {recorded_revision[:12]}, which is not downloaded; using the "
                f"downloaded revision, so pixels may differ (`{download(recorded_revision)}` replays it exactly)"))))
    if revision is None and spec is not None:
        revision = spec.revision  # the revision `dalle download` fetches for this entry (None: main)
    found = _cached_file(repo_id, "model_index.json", cache_dir, revision)
    if found is None:
        where = f" at revision {revision}" if revision else ""
        raise ModelNotFoundError(f"model '{name}' is not downloaded{where}; run `{download(revision)}`")
    folder = found.parent
    missing = missing_components(folder)
    if missing:
        raise ModelNotFoundError(f"model '{name}' is only partly downloaded ({', '.join(missing)} missing; an "
                                 f"interrupted download?); run `{download(revision)}` again")
    return ResolvedModel(alias, folder, spec, folder.name, notice)


def missing_components(folder: Path) -> list[str]:
    """The components that ``folder``'s ``model_index.json`` names but that are absent or have no weights (a
    download that was interrupted); the safety checker and feature extractor, which dalle never loads, do not
    count. Tokenizers and schedulers need no weights; a component with a ``config.json`` (a model) does, and
    a weights file whose cache blob is gone (a dangling snapshot link, a blob deleted by hand or removed after
    failing verification) does not count as there."""
    import json

    from dallecli.store.download import pipeline_components

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["model_index.json"]
    missing = []
    for key in pipeline_components(index):
        component = folder / key
        weights = list(component.glob("*.safetensors")) if component.is_dir() else []
        if not component.is_dir() or not any(component.iterdir()):
            missing.append(key)
        elif any(not path.is_file() for path in weights):  # is_file follows the snapshot link to its blob
            missing.append(key)
        elif (component / "config.json").is_file() and not weights:
            missing.append(key)
    return missing


def embedded_scorer_path() -> Path:
    """The folder of the embedded CLIP scorer inside the installed package."""
    return Path(str(resources.files("dallecli.models") / EMBEDDED_SCORER))


def resolve_scorer(name: str | None, cache_dir: Path | None = None, *, revision: str | None = None) -> ResolvedModel:
    """Find the folder of a CLIP scorer (``--scorer NAME``) without any network access.

    Order: the embedded scorer (no name or ``shapes-clip``); an existing local folder with ``config.json`` (a
    transformers ``CLIPModel`` folder); a registry scorer alias or an ``org/name`` repo id downloaded into the HF
    cache with ``dalle download NAME`` (at the registry entry's ``revision``, e.g. ``refs/pr/66``, else main).

    Args:
        name: None or ``shapes-clip`` for the embedded scorer, a folder, a registry scorer alias
            (``clip-vit-base-patch32``) or an ``org/name`` repo id.
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``), as given to ``dalle download --cache-dir``.
        revision: branch, tag or commit given to ``dalle download --revision`` (default: the registry entry's
            ``revision``, else main).

    Returns:
        A :class:`ResolvedModel`: ``name`` the alias (or repo id, or path), ``path`` the folder, ``spec`` the registry
        entry or None, ``revision`` the snapshot's commit (``dallecli-<version>`` for the embedded scorer, None
        for a local folder).

    Raises:
        ModelNotFoundError: the embedded scorer is missing from the installation (the message gives the rebuild
            command), a folder without ``config.json``, or a scorer that is not downloaded (or only partly: no
            ``model.safetensors``); the message says how to get it.
        UsageError: a registry entry of another kind (a text-to-image model, a VAE...), or a name that is neither
            a path, an alias nor a well-formed repo id.
    """
    if name in (None, "", EMBEDDED_SCORER):
        path = embedded_scorer_path()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"the embedded scorer ({EMBEDDED_SCORER}) is missing from this installation; rebuild it with "
                f"`python -m dallecli.training.build_scorer --out src/dallecli/models/{EMBEDDED_SCORER}`"
            )
        return ResolvedModel(EMBEDDED_SCORER, path, REGISTRY[EMBEDDED_SCORER], f"dallecli-{__version__}")
    local = Path(name).expanduser()
    if local.exists():
        if not (local.is_dir() and (local / "config.json").is_file()):
            raise ModelNotFoundError(f"--scorer {local}: a scorer folder needs a config.json (a transformers CLIP "
                                     "model folder, as `dalle download` or `save_pretrained` writes it)")
        return ResolvedModel(str(local), local.resolve(), None, None)
    name, notice = canonical_name(name)
    spec = lookup(name)
    if spec is not None and spec.kind != "scorer":
        raise UsageError(f"--scorer {name}: {wrong_kind(spec, 'scorer')}")
    repo_id = spec.repo_id if spec else check_repo_id(name, "--scorer")
    alias = spec.alias if spec else repo_id
    if revision is None and spec is not None:
        revision = spec.revision
    command = (f"dalle download {alias}" + (f" --revision {revision}" if revision and spec is None else "")
               + (f" --cache-dir {shlex.quote(str(cache_dir))}" if cache_dir else ""))
    found = _cached_file(repo_id, "config.json", cache_dir, revision)
    if found is None:
        raise ModelNotFoundError(f"scorer '{alias}' is not downloaded; run `{command}`")
    folder = found.parent
    if not any((folder / weights).is_file() for weights in ("model.safetensors", "model.safetensors.index.json")):
        raise ModelNotFoundError(f"scorer '{alias}' is only partly downloaded (no model.safetensors; an interrupted "
                                 f"download?); run `{command}` again")
    return ResolvedModel(alias, folder, spec, folder.name, notice)


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name; what a LoRA repo's download holds


def resolve_lora(name: str, cache_dir: Path | None = None) -> tuple[Path, str | None]:
    """Find the file that ``--lora NAME`` means, without any network access: an existing path wins; else a
    registry LoRA entry (alias or repo id) downloaded into the HF cache with ``dalle download NAME``.

    Args:
        name: a file path, a folder written by ``dalle finetune`` (its ``lora.safetensors``), or a registry
            LoRA alias such as ``lcm-lora-sdv1-5``.
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``), as given to ``dalle download --cache-dir``.

    Returns:
        ``(path of the .safetensors file, registry alias or None for a plain path)``.

    Raises:
        UsageError: no such file and not a registry name, a folder without ``lora.safetensors``, or a registry
            entry that is not a LoRA.
        ModelNotFoundError: a registry LoRA that is not downloaded (the message says how to get it).
    """
    local = Path(name).expanduser()
    if local.is_dir():  # the folder `dalle finetune` writes
        if (local / "lora.safetensors").is_file():
            return local / "lora.safetensors", None
        raise UsageError(f"--lora {local} is a folder without lora.safetensors; give the LoRA's .safetensors file")
    if local.exists():
        return local, None
    spec = lookup(name)
    if spec is None:
        raise UsageError(f"--lora {local}: no such file (nor a registry LoRA name; see `dalle models`)")
    if spec.kind != "lora":
        raise UsageError(f"--lora {name}: '{spec.alias}' is a {spec.kind} entry, not a LoRA")
    found = _cached_file(spec.repo_id, LORA_FILE, cache_dir, None)
    if found is None:
        raise ModelNotFoundError(f"LoRA '{spec.alias}' is not downloaded; run `dalle download {spec.alias}`")
    return found, spec.alias


def resolve_vae(name: str, cache_dir: Path | None = None) -> ResolvedModel:
    """Find the folder of a VAE given to ``--vae`` (not ``tiny``, which the engine maps to a registry entry)
    without any network access: a local folder with ``config.json``, or a registry alias / ``org/name`` repo
    already in the Hugging Face cache.

    Raises:
        ModelNotFoundError: nothing by that name is available locally (the message says how to get it).
    """
    local = Path(name).expanduser()
    if local.exists():
        if not (local.is_dir() and (local / "config.json").exists()):
            raise ModelNotFoundError(f"--vae {local}: a VAE folder needs a config.json (a diffusers model folder)")
        return ResolvedModel(str(local), local.resolve(), None, None)
    spec = lookup(name)
    repo_id = spec.repo_id if spec else check_repo_id(name, "--vae")
    if repo_id is None or (spec is not None and spec.kind not in ("vae", "tiny-vae")):
        raise UsageError(f"--vae {name}: not a VAE; give tiny, full, a folder, a VAE alias or an org/name repo id")
    found = _cached_file(repo_id, "config.json", cache_dir, None)
    if found is None:
        raise ModelNotFoundError(f"VAE '{name}' is not downloaded; run `dalle download {spec.alias if spec else name}`")
    folder = found.parent
    return ResolvedModel(spec.alias if spec else repo_id, folder, spec, folder.name)
