"""Turn what the user typed after ``--model`` into a local diffusers folder.

Order: the embedded model (no name, ``shapes`` or ``embedded``); an existing local folder; a registry alias
or any ``org/name`` repo id already in the Hugging Face cache (looked up with ``local_files_only`` so that
this never touches the network; ``dalle download`` is the only command that does).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dallecli import __version__
from dallecli.errors import LoraError, ModelNotFoundError, UnsafeWeightsError, UsageError
from dallecli.store.registry import EMBEDDED, ModelSpec, canonical_name, lookup
from dallecli.engine.weights import PICKLE_SUFFIXES


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load.

    Attributes:
        name: how it is recorded in image metadata (alias, repo id or path).
        path: the local diffusers folder (with ``model_index.json``).
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
            raise UsageError(f"{option} {name}: no such file or folder") from None
        raise UsageError(f"{option} '{name}' is not a registry alias (see `dalle models`), a folder or an org/name "
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


def resolve_model(name: str | None, cache_dir: Path | None = None, revision: str | None = None) -> ResolvedModel:
    """Find the folder for ``name`` without any network access.

    Args:
        name: alias, ``org/name`` repo id, local folder, single-file ``.safetensors`` checkpoint, or None for
            the embedded model.
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``), as given to ``dalle download --cache-dir``.
        revision: branch, tag or commit downloaded with ``dalle download --revision`` (default: main).

    Raises:
        ModelNotFoundError: nothing by that name is available locally (the message says how to get it).
        UnsafeWeightsError: a single pickle checkpoint file was given (by name or by content).
        CorruptWeightsError: a single file that is truncated or not safetensors.
        UnsupportedCheckpointError: a single safetensors file that is not an SD 1.x/2.x/SDXL checkpoint.
        UsageError: a name that is neither a path, an alias nor a well-formed repo id.
    """
    if name in (None, "", EMBEDDED, "embedded", "default"):
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
            # a single-file checkpoint: content-checked (pickles refused) and its family detected from the
            # safetensors header now, so that an unsupported layout fails before anything loads
            from dallecli.engine.single_file import detect, file_digest

            detect(local)
            return ResolvedModel(str(local), local.resolve(), None, file_digest(local), single_file=True)
        if not (local / "model_index.json").exists():
            raise ModelNotFoundError(f"{local} has no model_index.json; it is not a diffusers pipeline folder")
        return ResolvedModel(str(local), local.resolve(), None, None)
    name, notice = canonical_name(name)
    spec = lookup(name)
    if spec is not None and not spec.is_pipeline:
        raise UsageError(f"'{name}' is a {spec.kind} entry, not a text-to-image model; "
                         + ("use it with --lora" if spec.kind == "lora" else "use it with --vae"))
    repo_id = spec.repo_id if spec else check_repo_id(name)
    download = f"dalle download {spec.alias if spec else repo_id}" + (f" --revision {revision}" if revision else "")
    found = _cached_file(repo_id, "model_index.json", cache_dir, revision)
    if found is None:
        where = f" at revision {revision}" if revision else ""
        raise ModelNotFoundError(f"model '{name}' is not downloaded{where}; run `{download}`")
    folder = found.parent
    return ResolvedModel(spec.alias if spec else repo_id, folder, spec, folder.name, notice)


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name; what a LoRA repo's download holds


def resolve_lora(name: str, cache_dir: Path | None = None) -> tuple[Path, str | None]:
    """Find the file that ``--lora NAME`` means, without any network access: an existing path wins; else a
    registry LoRA entry (alias or repo id) downloaded into the HF cache with ``dalle download NAME``.

    Args:
        name: a file path, or a registry LoRA alias such as ``lcm-lora-sdv1-5``.
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``), as given to ``dalle download --cache-dir``.

    Returns:
        ``(path of the .safetensors file, registry alias or None for a plain path)``.

    Raises:
        LoraError: no such file, and not a registry name.
        UsageError: a registry entry that is not a LoRA.
        ModelNotFoundError: a registry LoRA that is not downloaded (the message says how to get it).
    """
    local = Path(name).expanduser()
    if local.exists():
        return local, None
    spec = lookup(name)
    if spec is None:
        raise LoraError(f"LoRA file {local} not found (nor a registry LoRA name; see `dalle models`)")
    if spec.kind != "lora":
        raise UsageError(f"--lora {name}: '{spec.alias}' is a {spec.kind} entry, not a LoRA")
    found = _cached_file(spec.repo_id, getattr(spec, "file", None) or LORA_FILE, cache_dir, None)
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
