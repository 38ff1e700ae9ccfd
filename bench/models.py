"""Random-weight pipelines with the published architectures of SD 1.5 and SD-Turbo, built locally.

    python -m bench.models            # builds both (and a TAESD-shaped tiny decoder) under build/bench-models/

No download: the configs below are the published ``config.json`` values of each component, written out as
dicts (runwayml/stable-diffusion-v1-5, stabilityai/sd-turbo, madebyollin/taesd); the weights are random
(seeded) and saved as float16 safetensors, the variant ``dalle download`` fetches for these models. The
tokenizer is a small CLIP-format vocabulary (the real one is on the Hub); the text encoder keeps the real
49,408-token embedding, so every weight has its real shape. Speed and memory are those of the real models;
the pictures are noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "build" / "bench-models"

SD15_UNET = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = {  # stabilityai/sd-turbo unet/config.json (the SD 2.1 UNet at 512x512)
    **SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
}
SD_VAE = {  # the AutoencoderKL shared by SD 1.x and 2.x (vae/config.json)
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower (SD 1.5 text_encoder/config.json)
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
    "layer_norm_eps": 1e-05,
}
OPENCLIP_H_TEXT = {  # laion OpenCLIP ViT-H/14 text tower, 23 layers used (sd-turbo text_encoder/config.json)
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "projection_dim": 512,
    "layer_norm_eps": 1e-05,
}
TAESD = {  # madebyollin/taesd config.json
    "encoder_block_out_channels": [64, 64, 64, 64], "decoder_block_out_channels": [64, 64, 64, 64],
    "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1], "latent_channels": 4,
    "act_fn": "relu", "upsampling_scaling_factor": 2, "latent_magnitude": 3, "latent_shift": 0.5,
    "scaling_factor": 1.0,
}
PNDM = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}
EULER_TRAILING = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "timestep_spacing": "trailing", "prediction_type": "epsilon",
                  "steps_offset": 1}
WORDS = ("a photo of an astronaut riding a horse on mars cat dog red blue green circle square painting "
         "portrait landscape city night sunset oil watercolor").split()


def _tokenizer(work: Path):
    from transformers import CLIPTokenizer

    from dallecli.training.vocabulary import build_clip_vocabulary

    build_clip_vocabulary([" ".join(WORDS)], work / "_vocab")
    return CLIPTokenizer(vocab=str(work / "_vocab" / "vocab.json"), merges=str(work / "_vocab" / "merges.txt"),
                         model_max_length=77)


def _build(folder: Path, unet_config: dict, text_config: dict, scheduler, seed: int) -> Path:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(work)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**SD_VAE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(work, safe_serialization=True)
    shutil.rmtree(work / "_vocab")
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)  # a half-built folder never looks finished
    return folder


def sd15(root: Path = ROOT) -> Path:
    """SD 1.5 architecture (UNet 860 M, CLIP ViT-L text 123 M, VAE 84 M parameters), float16 safetensors."""
    from diffusers import PNDMScheduler

    folder = root / "sd15-random"
    if not (folder / "model_index.json").exists():
        _build(folder, SD15_UNET, CLIP_L_TEXT, PNDMScheduler(**PNDM), seed=15)
    return folder


def sd_turbo(root: Path = ROOT) -> Path:
    """SD-Turbo architecture (SD 2.1 UNet 866 M, OpenCLIP-H text 340 M, VAE 84 M parameters), float16."""
    from diffusers import EulerDiscreteScheduler

    folder = root / "sd-turbo-random"
    if not (folder / "model_index.json").exists():
        _build(folder, SD21_UNET, OPENCLIP_H_TEXT, EulerDiscreteScheduler(**EULER_TRAILING), seed=21)
    return folder


def taesd(root: Path = ROOT) -> Path:
    """A TAESD-shaped AutoencoderTiny (2.4 M parameters), random weights, float16."""
    import torch
    from diffusers import AutoencoderTiny

    folder = root / "taesd-random"
    if not (folder / "config.json").exists():
        torch.manual_seed(5)
        AutoencoderTiny(**TAESD).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def weights_bytes(folder: Path) -> int:
    """Bytes of the safetensors files under ``folder`` (as stored: float16)."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per component, from the safetensors headers."""
    from math import prod
    import struct

    counts = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        counts[path.parent.name] = sum(prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return counts


if __name__ == "__main__":
    for build in (sd15, sd_turbo, taesd):
        path = build()
        print(path, {k: f"{v / 1e6:.0f} M" for k, v in parameter_counts(path).items()})
