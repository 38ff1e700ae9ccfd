"""Write what ``dalle finetune`` trained: the LoRA files or, with ``--full``, a pipeline folder; all atomically.

``lora.safetensors`` has diffusers/PEFT keys with ``alpha/r`` folded into ``lora_B`` and the run's metadata in
its header (:func:`header_metadata`); ``lora.kohya.safetensors`` (optional) has the kohya/A1111 key layout;
``model/`` (``--full``) is a pipeline folder whose ``training.json`` carries the base model's generation defaults,
read back by :func:`dallecli.engine.loading.recorded_defaults`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dallecli.atomic import place, staged_file, staged_folder
from dallecli.training.clip_layout import write_hub_layout

LORA_FILE = "lora.safetensors"
KOHYA_FILE = "lora.kohya.safetensors"
MODEL_FOLDER = "model"
RESUME_ADVICE = "Free some space, then re-run with --resume"  # what to do when the disk fills up


def header_metadata(**values) -> dict[str, str]:
    """Metadata for a safetensors header, which holds strings only: numbers as ``str``/``:g``, booleans as
    "true"/"false", None as "".

    Raises:
        TypeError: a value that is not a string, number, boolean or None (a fault of the caller).
    """
    header = {}
    for key, value in values.items():
        if value is None:
            header[key] = ""
        elif isinstance(value, bool):
            header[key] = str(value).lower()
        elif isinstance(value, float):
            header[key] = f"{value:g}"
        elif isinstance(value, (int, str)):
            header[key] = str(value)
        else:
            raise TypeError(f"safetensors metadata {key!r} must be a string or a number, not {type(value).__name__}")
    return header


def save_safetensors_atomically(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (name -> tensor, any device) to ``path`` as safetensors with ``metadata`` in the header,
    through a temporary file in the same folder renamed into place: ``path`` is either whole or untouched.

    Raises:
        DiskFullError: the disk filled up (the message says to free space and re-run with ``--resume``).
    """
    from safetensors.torch import save_file

    with staged_file(path.parent, ".safetensors", what=str(path), advice=RESUME_ADVICE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        place(tmp, path)


def lora_state_dicts(pipe, scale: float, train_text_encoder: bool) -> tuple[dict, dict]:
    """The trained LoRA as PEFT-format state dicts ``(unet, text_encoder)`` with ``alpha/r`` folded into
    ``lora_B``, so that loaders that take alpha = r (diffusers without metadata, kohya alpha = rank) apply
    exactly what was trained.

    Args:
        pipe: the pipeline whose UNet (and text encoder) carry PEFT adapters.
        scale: ``alpha / rank``.
        train_text_encoder: whether the text encoder has adapters (else its dict is empty).

    Returns:
        Two dicts of name -> CPU tensor (``lora_A``: (r, in), ``lora_B``: (out, r)).
    """
    from peft.utils import get_peft_model_state_dict

    def folded(model):
        return {k: (v * scale if ".lora_B." in k else v).detach().cpu().contiguous()
                for k, v in get_peft_model_state_dict(model).items()}

    return folded(pipe.unet), (folded(pipe.text_encoder) if train_text_encoder else {})


def write_lora(pipe, folder: Path, metadata: dict[str, str], scale: float, train_text_encoder: bool,
               kohya: bool) -> tuple[Path, Path | None]:
    """Write ``lora.safetensors`` (diffusers keys, via ``StableDiffusionPipeline.save_lora_weights``) and
    optionally ``lora.kohya.safetensors``, atomically, with ``metadata`` in the header.

    Args:
        pipe: the trained pipeline (PEFT adapters on the UNet, and on the text encoder with ``train_text_encoder``).
        folder: the output folder (exists).
        metadata: the header (:func:`header_metadata`; must hold ``"rank"``).
        scale: ``alpha / rank``, folded into ``lora_B``.
        train_text_encoder: also write the text encoder's adapters.
        kohya: also write the kohya/A1111 layout.

    Returns:
        ``(lora path, kohya path or None)``.

    Raises:
        DiskFullError: the disk filled up; no partial file is left.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    unet_sd, text_sd = lora_state_dicts(pipe, scale, train_text_encoder)
    header = {"format": "pt", **metadata}
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder), unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_sd) if text_sd else None,
        weight_name=LORA_FILE, safe_serialization=True,
        save_function=lambda weights, filename: save_safetensors_atomically(weights, Path(filename), header),
    )
    kohya_path = None
    if kohya:
        peft_sd = {f"unet.{k}": v for k, v in unet_sd.items()}
        peft_sd.update({f"text_encoder.{k}": v for k, v in text_sd.items()})
        kohya_path = folder / KOHYA_FILE
        save_safetensors_atomically(convert_state_dict_to_kohya(peft_sd), kohya_path,
                                    dict(header, ss_network_dim=metadata["rank"], ss_network_alpha=metadata["rank"]))
    return folder / LORA_FILE, kohya_path


def write_full_model(pipe, folder: Path, metadata: dict[str, str], defaults: dict, resolution: int) -> Path:
    """Write the fully trained pipeline as the folder ``folder/model`` (safetensors), atomically, with a
    ``training.json`` holding ``metadata`` and the base model's generation defaults: the steps and guidance of
    ``defaults``, and the training resolution (pixels) as width and height (a folder has no registry entry).

    Returns:
        The model folder.

    Raises:
        DiskFullError: the disk filled up; no partial folder is left.
    """
    from dallecli.engine.loading import GENERATION_DEFAULTS_KEY

    model_path = folder / MODEL_FOLDER
    with staged_folder(model_path, what=f"the model in {folder}", advice=RESUME_ADVICE) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        if (staging / "text_encoder").is_dir():
            write_hub_layout(staging / "text_encoder")  # loadable by every transformers in our range
        record = {**metadata, GENERATION_DEFAULTS_KEY: {"steps": defaults["steps"], "guidance": defaults[
            "guidance"], "width": resolution, "height": resolution}}
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return model_path
