"""The model side of ``dalle finetune``: load the base pipeline (a fresh float32 copy, through the engine's one
loader) and choose what trains: LoRA adapters (``peft``) on the UNet attention projections (and the text
encoder's with ``train_text_encoder``), or the whole UNet with ``full``."""

from __future__ import annotations

from pathlib import Path

from dallecli.errors import LoraError, UsageError
from dallecli.training.finetune_config import NOT_SUPPORTED, FinetuneConfig, check_model

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def load_components(model: str | None, revision: str | None = None, cache_dir: Path | None = None):
    """Resolve ``model`` and load its pipeline in float32 on the CPU, fresh (not the Engine's cached copy):
    :func:`dallecli.engine.loading.load_fresh_pipeline`, the loader ``dalle generate`` uses.

    Args:
        model: model name or folder as for ``dalle generate --model`` (None: the embedded model).
        revision, cache_dir: where a downloaded Hub model is.

    Returns:
        ``(resolved, pipe)``: the :class:`~dallecli.store.resolve.ResolvedModel` and the pipeline.

    Raises:
        ModelNotFoundError, UnsafeWeightsError, CorruptWeightsError: as for ``dalle generate``.
        UsageError: a single-file checkpoint, or a pipeline without one UNet/VAE/text encoder of the supported kind.
    """
    from dallecli.engine.loading import load_fresh_pipeline

    resolved = check_model(model, revision, cache_dir)
    preferred = (resolved.spec.variant if resolved.spec else None) or "fp16"
    pipe = load_fresh_pipeline(resolved.path, "float32", preferred)
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer") if getattr(pipe, n, None) is None]
    if missing:
        raise UsageError(f"{resolved.name} ({type(pipe).__name__}) {NOT_SUPPORTED}")
    return resolved, pipe


def add_lora(pipe, config: FinetuneConfig) -> list:
    """Put LoRA adapters of rank ``config.rank`` (alpha ``config.alpha``, default the rank; gaussian init) on the
    UNet's :data:`UNET_TARGETS` and, with ``config.train_text_encoder``, the text encoder's
    :data:`TEXT_ENCODER_TARGETS`.

    Returns:
        The adapters' parameters (the only ones that require gradients).

    Raises:
        LoraError: the UNet has none of the target projections.
    """
    from peft import LoraConfig

    alpha = config.alpha if config.alpha is not None else config.rank
    pipe.unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=UNET_TARGETS))
    if config.train_text_encoder:
        # peft directly, not transformers' ``add_adapter``: transformers 5 refuses every peft release before
        # 0.22 there, although peft's own injection works with them. ``peft_config`` is what
        # ``get_peft_model_state_dict`` and diffusers' LoRA saving read.
        from peft import inject_adapter_in_model

        te_config = LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                               target_modules=TEXT_ENCODER_TARGETS)
        inject_adapter_in_model(te_config, pipe.text_encoder)
        pipe.text_encoder.peft_config = {"default": te_config}
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    if config.train_text_encoder:
        params += [p for p in pipe.text_encoder.parameters() if p.requires_grad]
    if not params:
        raise LoraError("the model has no to_q/to_k/to_v/to_out.0 attention projections to put a LoRA on")
    return params


def trainable_parameters(pipe, config: FinetuneConfig) -> list:
    """Freeze the VAE and choose what trains: LoRA adapters (:func:`add_lora`, seeded by ``config.seed``) or, with
    ``config.full``, every UNet weight (and the text encoder's with ``train_text_encoder``); turn on gradient
    checkpointing when asked.

    Returns:
        The parameters for the optimiser.

    Raises:
        LoraError: as :func:`add_lora`.
    """
    import torch

    torch.manual_seed(config.seed)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    for module in (unet, text_encoder, pipe.vae):
        module.requires_grad_(False)
    if config.full:
        unet.requires_grad_(True)
        if config.train_text_encoder:
            text_encoder.requires_grad_(True)
        parameters = [p for p in unet.parameters()] + (list(text_encoder.parameters()) if config.train_text_encoder else [])
    else:
        parameters = add_lora(pipe, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    return parameters
