"""The model registry: curated aliases with their Hub repo and generation defaults (one source of truth).

Every default that ``dalle generate`` applies (steps, guidance scale, size, dtype) comes from here for a
registered model, or from :data:`GENERIC_DEFAULTS` for any other diffusers folder or repo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EMBEDDED = "shapes"
EMBEDDED_SCORER = "shapes-clip"  # the embedded CLIP scorer (``dalle score``, ``--rerank``), shipped with dalle
# kinds whose repos are diffusers pipeline folders; what each is for (the command that uses it)
PIPELINE_KINDS = {"pipeline": "generate", "upscaler": "upscale", "inpainting": "edit"}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        alias: the short name users type (``dalle generate --model ALIAS``, ``dalle download ALIAS``).
        repo_id: Hugging Face Hub repo id, or None for the embedded model.
        family: pipeline family ("stable-diffusion", "sdxl", "sd3", "flux", "pixart"); for a VAE, tiny VAE or
            LoRA entry, the family of the pipelines it fits; "clip" for a scorer.
        kind: "pipeline" (text to image: ``dalle generate``, ``batch``, ``finetune``); "upscaler" (a diffusers
            super-resolution pipeline for ``dalle upscale``); "inpainting" (a diffusers inpainting pipeline, a
            9-channel UNet, for ``dalle edit``; reached through the text-to-image entry's ``inpaint``); "vae" (a
            replacement VAE, e.g. an fp16-safe one); "tiny-vae" (a TAESD decoder for ``--vae tiny``); or "lora" (a
            LoRA file for ``--lora NAME``); or "scorer" (a CLIP model that scores how well an image matches a text,
            for ``dalle score`` and ``--rerank``: a transformers ``CLIPModel`` folder with ``config.json``, its
            processor and tokenizer files and ``model.safetensors``; ``repo_id`` None for the embedded one).
            "pipeline", "upscaler" and "inpainting" are all diffusers pipeline folders (``model_index.json``):
            :attr:`is_diffusers_pipeline`; only "pipeline" is :attr:`is_pipeline`.
        steps: default ``num_inference_steps`` (pipelines, upscalers and inpainting models).
        guidance: default guidance scale (0 turns classifier-free guidance off).
        width, height: default image size in pixels.
        dtype: the half precision the weights were released in. A "bfloat16" model (T5 text encoder, MMDiT/DiT)
            overflows float16, so on a CUDA GPU without bfloat16 it runs in float32 instead of float16.
        gated: whether the Hub repo asks users to accept a licence first.
        licence: licence name.
        size_gb: download size of what ``dalle download`` fetches from the real repo, GB (decimal).
        note: one line for ``dalle models``.
        variant: weights variant to download (e.g. "fp16"), or None for the default files.
        vae: alias of a "vae" entry that replaces the model's own VAE in float16 (SDXL's VAE overflows
            float16; the fp16-fix VAE does not), or None. ``dalle download`` fetches it with the model.
        inpaint: alias of the "inpainting" entry that is this text-to-image model's inpainting variant (same
            family, UNet retrained with 4 extra input channels for the mask and the masked image's latents), or
            None; ``dalle edit`` uses it when downloaded.
        scale: upscalers only: the factor each side grows by (4 for the SD x4 upscaler, 2 for the latent one);
            None for the others.
        noise_level: upscalers that take one (the SD x4 upscaler): the default ``noise_level``, how much noise is
            added to the low-resolution image before it conditions the UNet (0 to the pipeline's
            ``max_noise_level``, 350; more noise lets the model invent more detail); None for the others.
        revision: the Hub revision (branch, tag, ``refs/pr/N`` or commit) that ``dalle download`` fetches and that
            resolution looks up when none is given; None means "main". Set where main has no safetensors but a
            revision does (a safetensors conversion PR).
    """

    alias: str
    repo_id: str | None
    family: str
    kind: str = "pipeline"
    steps: int = 0
    guidance: float = 0.0
    width: int = 0
    height: int = 0
    dtype: str = "float16"
    gated: bool = False
    licence: str = ""
    size_gb: float = 0.0
    note: str = ""
    variant: str | None = None
    vae: str | None = None
    inpaint: str | None = None
    scale: int | None = None
    noise_level: int | None = None
    revision: str | None = None

    @property
    def is_pipeline(self) -> bool:
        """True for a text-to-image pipeline (False for upscaler, inpainting, VAE, tiny VAE and LoRA entries)."""
        return self.kind == "pipeline"

    @property
    def is_diffusers_pipeline(self) -> bool:
        """True when the repo is a diffusers pipeline folder (``model_index.json``): text-to-image, upscaler and
        inpainting entries; False for VAE, tiny VAE and LoRA entries."""
        return self.kind in PIPELINE_KINDS

    def as_dict(self) -> dict:
        return asdict(self)


REGISTRY: dict[str, ModelSpec] = {spec.alias: spec for spec in (
    ModelSpec(EMBEDDED, None, "stable-diffusion", steps=12, guidance=4.0, width=64, height=64, dtype="float32",
              licence="Apache-2.0", size_gb=0.02,
              note="embedded: flat coloured shapes, trained by this project; works offline"),
    ModelSpec("sd-turbo", "stabilityai/sd-turbo", "stable-diffusion", steps=1, guidance=0.0, width=512,
              height=512, licence="stabilityai-ai-community", size_gb=2.6, variant="fp16",
              note="SD 2.1 distilled for 1-4 steps; fast general-purpose start"),
    ModelSpec("sdxl-turbo", "stabilityai/sdxl-turbo", "sdxl", steps=1, guidance=0.0, width=512, height=512,
              licence="stabilityai-ai-community", size_gb=6.9, variant="fp16", vae="sdxl-vae-fp16-fix",
              note="SDXL distilled for 1-4 steps at 512x512"),
    ModelSpec("sd-1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion", steps=30,
              guidance=7.5, width=512, height=512, licence="creativeml-openrail-m", size_gb=2.1,
              variant="fp16", inpaint="sd-1.5-inpainting",
              note="the classic; the base most community LoRAs target"),
    ModelSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", steps=30, guidance=5.0, width=1024,
              height=1024, licence="openrail++", size_gb=6.9, variant="fp16", vae="sdxl-vae-fp16-fix",
              inpaint="sdxl-inpainting", note="SDXL base 1.0; uses the fp16-fix VAE in float16"),
    ModelSpec("sd-3.5-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", steps=40, guidance=4.5,
              width=1024, height=1024, dtype="bfloat16", gated=True, licence="stabilityai-ai-community",
              size_gb=16.0, note="SD 3.5 Medium (MMDiT); gated: accept the licence on the model page"),
    ModelSpec("flux-schnell", "black-forest-labs/FLUX.1-schnell", "flux", steps=4, guidance=0.0, width=1024,
              height=1024, dtype="bfloat16", gated=True, licence="Apache-2.0", size_gb=34.0,
              note="FLUX.1 schnell, 4 steps; needs a large GPU; gated: accept the terms on the model page"),
    ModelSpec("pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart", steps=20, guidance=4.5,
              width=1024, height=1024, dtype="bfloat16", licence="openrail++", size_gb=21.0,
              note="PixArt-Sigma (DiT with T5 text encoder)"),
    # BK-SDM-Tiny (arXiv 2305.15798) is nota-ai's block-removal distillation of SD 1.4, with .safetensors and
    # fp16 variants for every component. It is not segmind/tiny-sd (pickle-only weights), hence the alias.
    ModelSpec("bk-sdm-tiny", "nota-ai/bk-sdm-tiny", "stable-diffusion", steps=25, guidance=7.5, width=512,
              height=512, licence="creativeml-openrail-m", size_gb=1.7, variant="fp16",
              note="BK-SDM-Tiny: distilled SD 1.4 (~55% smaller UNet); the most CPU-friendly real model"),
    # Inpainting variants (``dalle edit``, reached through a text-to-image entry's ``inpaint``): the UNet takes
    # 9 channels, the noisy latents plus the mask and the masked image's latents (Rombach et al. 2022, LDM §4.5).
    # Defaults from the model cards' examples (sd-1.5's for the SD one; SDXL's card: 20 steps, guidance 8).
    ModelSpec("sd-1.5-inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting", "stable-diffusion",
              kind="inpainting", steps=30, guidance=7.5, width=512, height=512, licence="creativeml-openrail-m",
              size_gb=2.1, variant="fp16", note="SD 1.5 inpainting (RunwayML), for `dalle edit` with sd-1.5"),
    ModelSpec("sdxl-inpainting", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "sdxl", kind="inpainting",
              steps=20, guidance=8.0, width=1024, height=1024, licence="openrail++", size_gb=6.9, variant="fp16",
              vae="sdxl-vae-fp16-fix", note="SDXL 1.0 inpainting 0.1 (diffusers), for `dalle edit` with sdxl"),
    # Upscalers (``dalle upscale``): defaults are diffusers' documented ones (pipeline signature; the x2 model
    # card's example: 20 steps, guidance 0, which makes the pipeline ignore the prompt).
    # x4: text-guided latent super-resolution (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
    # Diffusion Models", CVPR): the low-resolution image, noised to ``noise_level``, is concatenated to the latents.
    ModelSpec("sd-x4-upscaler", "stabilityai/stable-diffusion-x4-upscaler", "stable-diffusion", kind="upscaler",
              steps=75, guidance=9.0, scale=4, noise_level=20, licence="openrail++", size_gb=1.74, variant="fp16",
              note="SD x4 upscaler: 4x each side, prompt-guided (`dalle upscale --scale 4`)"),
    # x2: Katherine Crowson's latent upscaler (k-diffusion), in SD 1.x/2.x's latent space.
    ModelSpec("sd-x2-latent-upscaler", "stabilityai/sd-x2-latent-upscaler", "stable-diffusion", kind="upscaler",
              steps=20, guidance=0.0, scale=2, licence="openrail++", size_gb=1.1,
              note="SD x2 latent upscaler: 2x each side (`dalle upscale --scale 2`)"),
    # Replacement VAEs: downloaded with the pipelines that name them (``vae``), or alone.
    ModelSpec("sdxl-vae-fp16-fix", "madebyollin/sdxl-vae-fp16-fix", "sdxl", kind="vae", licence="MIT",
              size_gb=0.33, note="SDXL VAE fine-tuned not to overflow in float16 (used by sdxl, sdxl-turbo)"),
    # Tiny autoencoders (TAESD): 2.4 M-parameter decoders for fast previews, `--vae tiny`; not pipelines.
    ModelSpec("taesd", "madebyollin/taesd", "stable-diffusion", kind="tiny-vae", licence="MIT", size_gb=0.01,
              note="tiny VAE decoder for SD 1.x/2.x latents (--vae tiny): fast previews, softer detail"),
    ModelSpec("taesdxl", "madebyollin/taesdxl", "sdxl", kind="tiny-vae", licence="MIT", size_gb=0.01,
              note="tiny VAE decoder for SDXL latents (--vae tiny): fast previews, softer detail"),
    # LoRAs: `dalle download NAME`, then `--lora NAME[:SCALE]`.
    ModelSpec("lcm-lora-sdv1-5", "latent-consistency/lcm-lora-sdv1-5", "stable-diffusion", kind="lora",
              licence="openrail++", size_gb=0.13,
              note="LCM-LoRA for SD 1.5: 2-8 steps with --scheduler lcm --guidance 1 (arXiv 2311.05556)"),
    # CLIP scorers (`dalle score`, `--rerank`, `--scorer NAME`): image-text similarity (Radford et al. 2021).
    # openai/clip-vit-base-patch32's main is pickle-only (pytorch_model.bin, no model.safetensors; the Hub answers
    # 404 for it); its safetensors conversion PR, refs/pr/66 (commit c237dc49...), has model.safetensors.
    ModelSpec(EMBEDDED_SCORER, None, "clip", kind="scorer", licence="Apache-2.0", size_gb=0.0,
              note="embedded: a small CLIP trained by this project on the shapes world; works offline"),
    ModelSpec("clip-vit-base-patch32", "openai/clip-vit-base-patch32", "clip", kind="scorer", licence="MIT",
              size_gb=0.61, revision="refs/pr/66",
              note="CLIP ViT-B/32; from refs/pr/66 (main is pickle-only; the PR adds model.safetensors)"),
    ModelSpec("clip-vit-large-patch14", "openai/clip-vit-large-patch14", "clip", kind="scorer", licence="MIT",
              size_gb=1.71, note="CLIP ViT-L/14 (14-pixel patches): larger and slower than ViT-B/32"),
)}

# Names that changed, with the one-line notice shown when the old one is typed.
RENAMED_ALIASES = {"tiny-sd": "bk-sdm-tiny"}
# Hub repos that were deleted or moved; the Hub answers 401 "Repository Not Found" for the old id, which users
# misread as a login problem.
# The stems of the single-file checkpoints in the registry's repos, which AUTOMATIC1111 writes as ``Model:``
# (an image from A1111 replays with ``--from`` on the same weights in diffusers form)
A1111_CHECKPOINTS = {
    **dict.fromkeys(("v1-5-pruned", "v1-5-pruned-emaonly", "v1-5-pruned-emaonly-fp16"), "sd-1.5"),
    "sd_turbo": "sd-turbo",
    **dict.fromkeys(("sd_xl_turbo_1.0", "sd_xl_turbo_1.0_fp16"), "sdxl-turbo"),
    **dict.fromkeys(("sd_xl_base_1.0", "sd_xl_base_1.0_0.9vae"), "sdxl"),
    "sd3.5_medium": "sd-3.5-medium",
    "flux1-schnell": "flux-schnell",
}
MOVED_REPOS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def canonical_name(name: str) -> tuple[str, str | None]:
    """Map a renamed alias or a moved Hub repo id to its current name.

    Returns:
        ``(name to use, one-line notice or None)``; names that did not change come back as they are.
    """
    if name in RENAMED_ALIASES:
        new = RENAMED_ALIASES[name]
        return new, f"'{name}' is now called '{new}' (nota-ai's BK-SDM-Tiny, not segmind/tiny-sd)"
    checkpoint = A1111_CHECKPOINTS.get(name.lower())
    if checkpoint is not None:
        return checkpoint, f"'{name}' (the name of a single-file checkpoint, as AUTOMATIC1111 records it) is {checkpoint}"
    moved = next((new for old, new in MOVED_REPOS.items() if old.lower() == name.lower()), None)
    if moved is not None:
        return moved, f"{name} was deleted from the Hub (2024-08); using its official copy {moved}"
    return name, None


def upscaler_for(scale: int) -> ModelSpec | None:
    """The registry's upscaler that enlarges each side ``scale`` times (``dalle upscale --scale N``), or None."""
    return next((s for s in REGISTRY.values() if s.kind == "upscaler" and s.scale == scale), None)


def upscale_factors() -> list[int]:
    """The ``--scale`` values the registry's upscalers offer, ascending (e.g. ``[2, 4]``)."""
    return sorted({s.scale for s in REGISTRY.values() if s.kind == "upscaler"})


def scorers() -> list[ModelSpec]:
    """The registry's CLIP scorers (``--scorer NAME``), the embedded one first."""
    return [s for s in REGISTRY.values() if s.kind == "scorer"]


def tiny_decoder_for(family: str) -> ModelSpec | None:
    """The registry's tiny VAE (``--vae tiny``) for a pipeline family, or None when there is none."""
    return next((s for s in REGISTRY.values() if s.kind == "tiny-vae" and s.family == family), None)

GENERIC_DEFAULTS = {"steps": 25, "guidance": 7.0, "width": 512, "height": 512}
FAMILY_DEFAULTS = {
    "sdxl": {"steps": 30, "guidance": 5.0, "width": 1024, "height": 1024},
    "sd3": {"steps": 28, "guidance": 4.5, "width": 1024, "height": 1024},
    "flux": {"steps": 28, "guidance": 3.5, "width": 1024, "height": 1024},
    "pixart": {"steps": 20, "guidance": 4.5, "width": 1024, "height": 1024},
}
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "PixArtSigmaPipeline": "pixart",
    "PixArtAlphaPipeline": "pixart",
}


def lookup(name: str) -> ModelSpec | None:
    """The registry entry for an alias or for its Hub repo id (renamed and moved names included), or None."""
    name = canonical_name(name)[0]
    if name in REGISTRY:
        return REGISTRY[name]
    return next((s for s in REGISTRY.values() if s.repo_id and s.repo_id.lower() == name.lower()), None)


def defaults_for(spec: ModelSpec | None, pipeline_class: str | None = None, sample_size: int | None = None) -> dict:
    """Generation defaults ``{"steps", "guidance", "width", "height"}`` for a model (for an upscaler entry:
    ``{"steps", "guidance", "scale", "noise_level"}``).

    Args:
        spec: its registry entry, if any (wins).
        pipeline_class: ``_class_name`` from its ``model_index.json``, for unregistered models.
        sample_size: the denoiser's ``sample_size`` times the VAE scale factor, pixels, if known.
    """
    if spec is not None and spec.kind == "upscaler":  # the output size follows the input
        return {"steps": spec.steps, "guidance": spec.guidance, "scale": spec.scale, "noise_level": spec.noise_level}
    if spec is not None:
        return {"steps": spec.steps, "guidance": spec.guidance, "width": spec.width, "height": spec.height}
    family = PIPELINE_FAMILIES.get(pipeline_class or "", "stable-diffusion")
    defaults = dict(FAMILY_DEFAULTS.get(family, GENERIC_DEFAULTS))
    if sample_size:
        defaults["width"] = defaults["height"] = sample_size
    return defaults
