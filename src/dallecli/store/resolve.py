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
from dallecli.errors import ModelNotFoundError, UnsafeWeightsError
from dallecli.store.registry import EMBEDDED, ModelSpec, lookup
from dallecli.engine.weights import PICKLE_SUFFIXES


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load.

    Attributes:
        name: how it is recorded in image metadata (alias, repo id or path).
        path: the local diffusers folder (with ``model_index.json``).
        spec: its registry entry, if any.
        revision: the Hub commit of the snapshot, the package version for the embedded model, or None.
    """

    name: str
    path: Path
    spec: ModelSpec | None
    revision: str | None


def embedded_model_path() -> Path:
    """The folder of the embedded default model inside the installed package."""
    return Path(str(resources.files("dallecli.models") / EMBEDDED))


def resolve_model(name: str | None, cache_dir: Path | None = None) -> ResolvedModel:
    """Find the folder for ``name`` without any network access.

    Raises:
        ModelNotFoundError: nothing by that name is available locally (the message says how to get it).
        UnsafeWeightsError: a single pickle checkpoint file was given.
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
            raise ModelNotFoundError(
                f"{local} is a single file; --model needs a diffusers folder (with model_index.json), "
                "a registry alias or a Hub repo id"
            )
        if not (local / "model_index.json").exists():
            raise ModelNotFoundError(f"{local} has no model_index.json; it is not a diffusers pipeline folder")
        return ResolvedModel(str(local), local.resolve(), None, None)
    spec = lookup(name)
    repo_id = spec.repo_id if spec else name
    if repo_id is None or repo_id.count("/") != 1:
        raise ModelNotFoundError(
            f"unknown model '{name}': not a folder, a registry alias (see `dalle models`) or an org/name repo id"
        )
    # Not snapshot_download(local_files_only=True): it calls a snapshot incomplete unless every file of the
    # repo is cached, while `dalle download` fetches only what the pipeline loads. refs/main -> snapshot.
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir)
    if not isinstance(found, str):
        raise ModelNotFoundError(f"model '{name}' is not downloaded; run `dalle download {name}`")
    folder = Path(found).parent
    if not (folder / "model_index.json").exists():
        raise ModelNotFoundError(f"model '{name}' is only partly downloaded; run `dalle download {name}`")
    return ResolvedModel(spec.alias if spec else repo_id, folder, spec, folder.name)


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
    repo_id = spec.repo_id if spec else name
    if repo_id is None or repo_id.count("/") != 1:
        raise ModelNotFoundError(f"unknown --vae '{name}': give tiny, full, a folder, a registry alias or an org/name repo id")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    if not isinstance(found, str):
        raise ModelNotFoundError(f"VAE '{name}' is not downloaded; run `dalle download {spec.alias if spec else name}`")
    folder = Path(found).parent
    return ResolvedModel(spec.alias if spec else repo_id, folder, spec, folder.name)
