"""Single-file (A1111/Civitai) checkpoints: tiny diffusers pipelines of each family, converted here to the
original LDM key layout (the mapping of diffusers' conversion scripts, written in reverse), loaded through
``dalle generate --model FILE.safetensors`` and compared pixel by pixel with the folder they came from."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_dalle

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


# -- diffusers -> original LDM keys -------------------------------------------------------------------
def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def unet_to_ldm(state: dict, layers_per_block: int, attention_up: list[bool]) -> dict:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` (input/middle/output blocks)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    out, step = {}, layers_per_block + 1
    for key, value in state.items():
        parts = key.split(".")
        stem = ".".join(parts[:-1])
        if stem in fixed:
            new = f"{fixed[stem]}.{parts[-1]}"
        elif parts[0] == "down_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + block * step + index}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + block * step + index}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{1 + block * step + layers_per_block}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * index}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{block * step + index}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{block * step + index}.1.{rest}"
            else:
                slot = 2 if attention_up[block] else 1
                new = f"output_blocks.{block * step + layers_per_block}.{slot}.conv.{parts[-1]}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, blocks: int) -> dict:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` (attention projections as 1x1 convolutions)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            index = int(parts[2]) if parts[1] == "down_blocks" else blocks - 1 - int(parts[2])
            name = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                new = f"{parts[0]}.{name}.{index}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:
                new = f"{parts[0]}.{name}.{index}.{'downsample' if name == 'down' else 'upsample'}.conv.{parts[-1]}"
            new = new.replace("conv_shortcut", "nin_shortcut")
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:-1])
            new = f"{parts[0]}.mid.attn_1.{attn[rest]}.{parts[-1]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """transformers CLIPTextModel keys -> the A1111 layout (``prefix`` + ``text_model.*``)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


def openclip_to_ldm(state: dict, prefix: str, extra_block: bool = False, seed: int = 0) -> dict:
    """transformers CLIP text keys -> OpenCLIP's (``resblocks``, fused ``in_proj``, ``text_projection`` as
    (width, embed)). ``extra_block``: add the unused last block an SD 2.x file carries (it conditions on the
    penultimate layer) and a text projection, as the real files have."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    rename = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for key, value in state.items():
        if key in rename:
            out[prefix + rename[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    if extra_block:
        generator = torch.Generator().manual_seed(seed)
        last = f"{prefix}transformer.resblocks.{layers[-1]}."
        for key in [k for k in out if k.startswith(last)]:
            out[key.replace(last, f"{prefix}transformer.resblocks.{layers[-1] + 1}.")] = torch.randn(
                out[key].shape, generator=generator)
        width = out[prefix + "token_embedding.weight"].shape[1]
        out[prefix + "text_projection"] = torch.randn((width, width), generator=generator)
    return out


# -- tiny pipelines of each family ---------------------------------------------------------------------
def _tokenizer(folder: Path, pad: str):
    """The real CLIP tokenizer (the shipped BPE), padding with ``pad`` as the family's published one does."""
    from transformers import CLIPTokenizer

    from dallecli.engine.single_file import clip_bpe_files

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_files()
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad, "model_max_length": 77}))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    return tokenizer


def _text_encoder(hidden: int, act: str, layers: int = 2, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2 + 5,
                            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                            max_position_embeddings=77, hidden_act=act, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _scheduler(config_name: str):
    import diffusers

    from dallecli.engine.single_file import _shipped

    config = _shipped(config_name, "scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)


def build_family(family: str, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny seeded pipeline folder of ``family`` ("sd1", "sd2", "sdxl") and its single-file conversion.

    Returns:
        ``(folder, file)``.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    xl, sd2 = family == "sdxl", family == "sd2"
    unet_kwargs = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                       out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    if family == "sd1":
        unet_kwargs.update(cross_attention_dim=32, attention_head_dim=8)
    elif sd2:
        unet_kwargs.update(cross_attention_dim=32, attention_head_dim=[1, 1], use_linear_projection=True,
                           upcast_attention=True)
    else:
        unet_kwargs.update(cross_attention_dim=32 + 64, attention_head_dim=[1, 1], use_linear_projection=True,
                           transformer_layers_per_block=[1, 2], addition_embed_type="text_time",
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8)
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=32, layers_per_block=1, scaling_factor=0.13025 if xl else 0.18215,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    state = {**unet_to_ldm(unet.state_dict(), 1, [True, False]), **vae_to_ldm(vae.state_dict(), 2)}
    folder = root / f"tiny-{family}"
    if xl:
        te1 = _text_encoder(32, "quick_gelu")
        te2 = _text_encoder(64, "gelu", projection=48)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=_tokenizer(root / "_t1", "<|endoftext|>"),
            tokenizer_2=_tokenizer(root / "_t2", "!"), unet=unet, scheduler=_scheduler("sdxl-base"))
        state.update(clip_to_ldm(te1.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(openclip_to_ldm(te2.state_dict(), "conditioner.embedders.1.model."))
    else:
        te = _text_encoder(32, "gelu" if sd2 else "quick_gelu")
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=_tokenizer(root / "_t1", "!" if sd2 else "<|endoftext|>"),
            unet=unet, scheduler=_scheduler("sd21" if sd2 else "sd15"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        if sd2:
            state.update(openclip_to_ldm(te.state_dict(), "cond_stage_model.model.", extra_block=True, seed=seed))
        else:
            state.update(clip_to_ldm(te.state_dict(), "cond_stage_model.transformer."))
    pipe.save_pretrained(folder, safe_serialization=True)
    file = root / f"tiny_{family}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return folder, file


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """``{family: (folder, file)}`` built once per session."""
    root = tmp_path_factory.mktemp("single-file")
    return {family: build_family(family, root) for family in ("sd1", "sd2", "sdxl")}


def _generate(model: Path, out: Path, *extra: str) -> tuple[np.ndarray, dict]:
    result = run_dalle("generate", "a cat", "--model", str(model), "--steps", "2", "--width", "32", "--height",
                       "32", "--seed", "7", "--out", str(out), "--json", *extra, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    entry = (document["images"] if isinstance(document, dict) and "images" in document else document)[0]
    path = Path(entry["path"] if isinstance(entry, dict) else entry)
    image = Image.open(path)
    return np.asarray(image.convert("RGB")).astype(int), json.loads(image.info["dalle"])


# -- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_detected_and_dimensions_read(families, family):
    from dallecli.engine.single_file import detect

    folder, file = families[family]
    found = detect(file)
    assert found.family == family
    unet = json.loads((folder / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                "up_block_types", "use_linear_projection"):
        assert found.overrides["unet"][key] == unet[key], key
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        assert found.overrides["text_encoder"][key] == te[key], key


@pytest.mark.parametrize("family", ["sd1", pytest.param("sd2", marks=pytest.mark.slow),
                                    pytest.param("sdxl", marks=pytest.mark.slow)])
def test_single_file_matches_its_folder(families, family, tmp_path):
    folder, file = families[family]
    local = tmp_path / file.name
    local.symlink_to(file)
    want, _ = _generate(folder, tmp_path / "folder")
    got, meta = _generate(Path("./" + file.name), tmp_path / "file")
    assert np.abs(got - want).max() <= 1  # measured: 0 (pixel-identical) for sd1, sd2 and sdxl
    assert meta["model"].endswith(file.name)
    assert meta["model_revision"].startswith("sha256:")
    assert not any(p.suffix == ".json" for p in tmp_path.iterdir() if p.is_file())  # nothing beside the file


def test_shipped_rules_reproduce_published_configs():
    """The head counts dalle derives (SD 1.x: 8; SD 2.x/SDXL: channels / 64; CLIP: width / 64) equal the
    published configs it ships."""
    from dallecli.engine.single_file import _shipped

    for name in ("sd21", "sd21-base", "sdxl-base"):
        unet = _shipped(name, "unet")
        assert unet["attention_head_dim"] == [c // 64 for c in unet["block_out_channels"]]
    for name, component in (("sd15", "text_encoder"), ("sd21", "text_encoder"), ("sdxl-base", "text_encoder_2")):
        te = _shipped(name, component)
        assert te["num_attention_heads"] == te["hidden_size"] // 64
    from dallecli.engine.single_file import clip_bpe_files

    vocab, merges = clip_bpe_files()
    tokens = json.loads(vocab)
    assert len(tokens) == 49408 and tokens["<|endoftext|>"] == 49407 and tokens["cat</w>"] == 2368


def test_pickle_checkpoint_refused_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    for name in ("model.ckpt", "model.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps({"state_dict": Boom()}))
        result = run_dalle("generate", "a cat", "--model", str(tmp_path / name), "--steps", "1")
        assert result.returncode != 0
        assert "pickle" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("keys, phrase", [
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "FLUX"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, "SD3"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA"),
    ({"encoder.conv_in.weight": (4, 3, 3, 3), "decoder.conv_in.weight": (4, 4, 3, 3)}, "VAE only"),
])
def test_unknown_layout_one_line(tmp_path, keys, phrase):
    import torch
    from safetensors.torch import save_file

    file = tmp_path / "odd.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(file))
    result = run_dalle("generate", "a cat", "--model", str(file), "--steps", "1", "--progress", "none")
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and phrase in lines[0] and "SD 1.x, SD 2.x and SDXL" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_finetune_refuses_a_single_file_in_one_line(families, tmp_path):
    from dallecli.errors import UsageError
    from dallecli.training.finetune_model import load_components

    with pytest.raises(UsageError, match="single-file checkpoint"):
        load_components(str(families["sd1"][1]))
