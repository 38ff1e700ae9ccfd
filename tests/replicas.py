"""Replicas of the Hub repositories in the registry, for the stand-in Hub (tests/hubserver.py).

A replica has the real repository's file names and folder layout (``tests/data/replicas/<org>--<name>/files.txt``)
and its real configuration files (the other files in that folder, as published), with only the model dimensions
shrunk by :data:`SHRINK` so that the weights are tiny. Everything else is made here:

* weights of each loaded component: the component class instantiated from its shrunk config with a fixed seed,
  saved as safetensors under the real names (``.fp16.`` variants in float16, shards with their index);
* tokenizer vocabularies: a small CLIP BPE vocabulary (``vocab.json``/``merges.txt``) in CLIP's id order, and
  for T5 a small Unigram ``tokenizer.json`` plus an equivalent ``spiece.model`` (protobuf written by hand);
* CLIP scorers (``openai/clip-vit-*``, a transformers ``CLIPModel`` folder in the repo root): the same, with a
  CLIP ``tokenizer.json`` (the fast tokenizer of the small vocabulary) beside ``vocab.json``/``merges.txt``;
* named revisions (``@REV FILE...`` lines in ``files.txt``: that revision has main's files plus those, e.g. a
  ``refs/pr/N`` safetensors conversion): built with the repo and served by the stand-in Hub as their own commit;
* files the pipeline never loads (pickles, root single-file checkpoints, ONNX/Flax/OpenVINO exports, images):
  a few dummy bytes; pickles start like a pickle and are not valid ones, ``.safetensors`` are valid tiny files.

``build_all()`` builds every replica once and caches the bytes on disk, keyed by a hash of this file, the data
and the library versions; ``repo_files()`` returns ``{repo_id: {path: bytes}}`` (main) and ``revision_files()``
``{repo_id: {revision: {path: bytes}}}``. Run ``python tests/replicas.py``
to build and print the sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "replicas"
TOKEN = "hf_ReplicaTestToken0000000000000000"  # the token a gated replica accepts (licence "accepted")
GATED = {"stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-schnell"}
VOCAB = "<vocab>"  # in SHRINK: the size of the replica's tiny vocabulary

# --- the shrink table: (repo, config path) -> keys replaced in the real config ----------------------------
_CLIP = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
         "vocab_size": VOCAB}
_CLIP_L = {**_CLIP, "projection_dim": 32}          # CLIP ViT-L/14 text tower (768 wide, 12 layers)
_CLIP_H = {**_CLIP, "projection_dim": 32}          # OpenCLIP ViT-H (1024 wide, 23 layers)
_CLIP_G = {**_CLIP, "projection_dim": 32}          # OpenCLIP ViT-bigG (1280 wide, 32 layers)
# CLIPModel scorers: both towers shrunk to the text encoders' size (hidden 32, 2 layers, 4 heads, intermediate
# 37), projections to 32; the vision tower sees 32x32 images in 8x8 patches (16 patches + the class token), so the
# preprocessor's resize and centre crop shrink from 224 to 32 too. ``*_config_dict`` (ViT-L/14's config carries
# one per tower, which transformers reads instead of ``*_config`` when present) is shrunk the same way, and gets
# the vocabulary size, image size and special token ids of its ``*_config`` too (the real ones leave those at
# CLIP's defaults: 49408, 224 and ids 49406/49407, outside the small vocabulary).
_CLIP_TOWER = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
               "projection_dim": 32}
_CLIP_TEXT = {**_CLIP_TOWER, "vocab_size": VOCAB}
_CLIP_VISION = {**_CLIP_TOWER, "image_size": 32, "patch_size": 8}
_CLIP_TEXT_DICT = {**_CLIP_TEXT, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
_CLIP_MODEL = {"projection_dim": 32, "text_config": _CLIP_TEXT, "vision_config": _CLIP_VISION}
_CLIP_PROCESSOR = {"size": 32, "crop_size": 32}
_T5 = {"d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 1, "num_decoder_layers": 1, "vocab_size": VOCAB}
_VAE = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64}
_SD_UNET = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
            "cross_attention_dim": 32, "sample_size": 8}
# SDXL: cross_attention_dim = text_encoder + text_encoder_2 widths (768 + 1280 -> 32 + 32);
# projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + text_encoder_2 projection (6*256 + 1280).
_SDXL_UNET = {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4], "layers_per_block": 1,
              "transformer_layers_per_block": [1, 1, 1], "norm_num_groups": 8, "cross_attention_dim": 64,
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32, "sample_size": 8}
_TAESD = {"decoder_block_out_channels": [8, 8, 8, 8], "encoder_block_out_channels": [8, 8, 8, 8],
          "num_decoder_blocks": [1, 1, 1, 1], "num_encoder_blocks": [1, 1, 1, 1]}
SHRINK: dict[str, dict[str, dict]] = {
    "stabilityai/sd-turbo": {
        "unet/config.json": {**_SD_UNET, "attention_head_dim": [2, 2, 4, 4]},
        "vae/config.json": _VAE, "text_encoder/config.json": _CLIP_H},
    "stabilityai/sdxl-turbo": {
        "unet/config.json": _SDXL_UNET, "vae/config.json": _VAE,
        "text_encoder/config.json": _CLIP_L, "text_encoder_2/config.json": _CLIP_G},
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {
        "unet/config.json": _SD_UNET, "vae/config.json": _VAE, "text_encoder/config.json": _CLIP_L},
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "unet/config.json": _SDXL_UNET, "vae/config.json": _VAE,
        "text_encoder/config.json": _CLIP_L, "text_encoder_2/config.json": _CLIP_G},
    # SD3: joint_attention_dim = T5 width >= the two CLIP widths side by side (32 + 32); pooled = both projections.
    "stabilityai/stable-diffusion-3.5-medium": {
        "transformer/config.json": {"attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
                                    "num_layers": 2, "dual_attention_layers": [0], "joint_attention_dim": 64,
                                    "pooled_projection_dim": 64, "pos_embed_max_size": 32, "sample_size": 16},
        "vae/config.json": _VAE, "text_encoder/config.json": _CLIP_L, "text_encoder_2/config.json": _CLIP_G,
        "text_encoder_3/config.json": {**_T5, "d_model": 64}},
    # FLUX: the rotary axes must add up to attention_head_dim (16+56+56 = 128 -> 4+6+6 = 16).
    "black-forest-labs/FLUX.1-schnell": {
        "transformer/config.json": {"attention_head_dim": 16, "axes_dims_rope": [4, 6, 6], "num_attention_heads": 2,
                                    "num_layers": 1, "num_single_layers": 1, "joint_attention_dim": 32,
                                    "pooled_projection_dim": 32},
        "vae/config.json": _VAE, "text_encoder/config.json": _CLIP_L, "text_encoder_2/config.json": {**_T5, "d_model": 32}},
    # PixArt: cross_attention_dim = heads * head dim; caption_channels = T5 width. sample_size stays 128: the
    # pipeline picks its aspect-ratio bins from it.
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": {
        "transformer/config.json": {"attention_head_dim": 8, "num_attention_heads": 4, "cross_attention_dim": 32,
                                    "caption_channels": 32, "num_layers": 1},
        "vae/config.json": _VAE, "text_encoder/config.json": {**_T5, "d_model": 32}},
    "nota-ai/bk-sdm-tiny": {
        "unet/config.json": {**_SD_UNET, "block_out_channels": [32, 32, 64]},
        "vae/config.json": _VAE, "text_encoder/config.json": _CLIP_L},
    "madebyollin/sdxl-vae-fp16-fix": {"config.json": _VAE},
    "madebyollin/taesd": {"config.json": _TAESD},
    "madebyollin/taesdxl": {"config.json": _TAESD},
    "latent-consistency/lcm-lora-sdv1-5": {},
    # inpainting variants: the base models' shrink; the UNet keeps its 9 input channels
    "stable-diffusion-v1-5/stable-diffusion-inpainting": {
        "unet/config.json": _SD_UNET, "vae/config.json": _VAE, "text_encoder/config.json": _CLIP_L},
    "diffusers/stable-diffusion-xl-1.0-inpainting-0.1": {
        "unet/config.json": _SDXL_UNET, "vae/config.json": _VAE,
        "text_encoder/config.json": _CLIP_L, "text_encoder_2/config.json": _CLIP_G},
    # x4 upscaler: 7 input channels (4 latent + the 3-channel low-res image) and the 1000-class noise-level
    # embedding stay; the VAE keeps 3 blocks (a scale factor of 4, not SD's 8).
    "stabilityai/stable-diffusion-x4-upscaler": {
        "unet/config.json": {**_SD_UNET, "attention_head_dim": 2},
        "vae/config.json": {**_VAE, "block_out_channels": [8, 8, 16]}, "text_encoder/config.json": _CLIP_H},
    # x2 latent upscaler: time_cond_proj_dim = 128 (noise-level embedding) + the text encoder's pooled width.
    # scorers (issue 16)
    "openai/clip-vit-base-patch32": {"config.json": _CLIP_MODEL, "preprocessor_config.json": _CLIP_PROCESSOR},
    "openai/clip-vit-large-patch14": {
        "config.json": {**_CLIP_MODEL, "text_config_dict": _CLIP_TEXT_DICT, "vision_config_dict": _CLIP_VISION},
        "preprocessor_config.json": _CLIP_PROCESSOR},
    "stabilityai/sd-x2-latent-upscaler": {
        "unet/config.json": {"block_out_channels": [32, 32, 64, 64], "attention_head_dim": 8, "layers_per_block": 1,
                             "cross_attention_dim": 32, "time_cond_proj_dim": 128 + 32},
        "vae/config.json": _VAE, "text_encoder/config.json": _CLIP_L},
}
# dtype of the plain (non-variant) weight files where the real repo stores them in a half precision
STORED_DTYPE = {"black-forest-labs/FLUX.1-schnell": "bfloat16", "stabilityai/stable-diffusion-3.5-medium": "float16"}
LORA_RANK = 4  # the real LCM-LoRA has rank 64
LCM_LORA_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
WORDS = ("a cat astronaut on the moon photo of red green blue circle square dog painting in style with and "
         "portrait landscape city night sky").split()
PICKLE_DUMMY = b"\x80\x04\x95DUMMY-PICKLE-REPLICA: never load this\n"


def repo_ids() -> list[str]:
    return sorted(SHRINK)


def _folder(repo: str) -> Path:
    return DATA / repo.replace("/", "--")


def listing(repo: str) -> list[str]:
    """Every file of the real repository's main branch, from ``files.txt``."""
    lines = (_folder(repo) / "files.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith(("#", "@"))]


def revisions(repo: str) -> dict[str, list[str]]:
    """The named revisions in ``files.txt`` (``@refs/pr/66 model.safetensors``): revision -> every file it has
    (main's files plus the ones named)."""
    out: dict[str, list[str]] = {}
    for line in (_folder(repo) / "files.txt").read_text().splitlines():
        if line.startswith("@"):
            revision, *added = line[1:].split()
            out[revision] = sorted(set(out.get(revision, listing(repo))) | set(added))
    return out


def _revision_folder(repo: str, revision: str) -> str:
    return f"{repo.replace('/', '--')}@{revision.replace('/', '--')}"


def _shrink(config: dict, shrink: dict, vocab_size: int) -> dict:
    """``config`` with ``shrink``'s keys replaced; a dict value is laid over the config's dict of that key (the
    towers of a CLIPModel config), and :data:`VOCAB` becomes ``vocab_size``."""
    for key, value in shrink.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = _shrink(config[key], value, vocab_size)
        elif isinstance(value, dict) and key in config and config[key] is None:
            continue  # "text_config_dict": null stays null
        else:
            config[key] = vocab_size if value == VOCAB else value
    return config


def real_config(repo: str, path: str) -> dict:
    return json.loads((_folder(repo) / path).read_text())


# --- tokenizers -------------------------------------------------------------------------------------------
def clip_vocabulary(workdir: Path) -> tuple[dict[str, int], str]:
    """A small CLIP vocabulary: the 512 byte symbols in CLIP's order, merges for WORDS, then the two specials."""
    from dallecli.training.vocabulary import build_clip_vocabulary

    vocab_path, merges_path = build_clip_vocabulary([" ".join(WORDS)], workdir / "clipvocab")
    learnt = json.loads(vocab_path.read_text(encoding="utf-8"))
    from dallecli.engine.single_file import clip_byte_symbols

    symbols = list(clip_byte_symbols().values())  # in CLIP's vocabulary order
    order = symbols + [s + "</w>" for s in symbols]
    order += [t for t in sorted(learnt, key=learnt.get) if t not in set(order) and not t.startswith("<|")]
    order += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(order)}, merges_path.read_text(encoding="utf-8")


def t5_pieces() -> list[tuple[str, float, int]]:
    """(piece, score, sentencepiece type) for a small T5 Unigram vocabulary; types: 1 normal, 2 unknown, 3 control."""
    pieces = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2), ("▁", -2.0, 1)]
    pieces += [("▁" + w, -3.0 - i * 0.01, 1) for i, w in enumerate(WORDS)]
    pieces += [(c, -8.0, 1) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"]
    return pieces


T5_EXTRA_IDS = 2  # the real T5 tokenizers add 100 <extra_id_N> sentinels after the sentencepiece vocabulary


def t5_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = t5_pieces()
    tokenizer = Tokenizer(models.Unigram([(p, s) for p, s, _ in pieces], unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens([AddedToken(p, normalized=False) for p, _, t in pieces if t != 1])
    tokenizer.add_special_tokens([AddedToken(f"<extra_id_{i}>", normalized=False)
                                  for i in reversed(range(T5_EXTRA_IDS))])
    return tokenizer.to_str(pretty=True)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def t5_spiece_model() -> bytes:
    """A sentencepiece ModelProto (unigram) with the same pieces as :func:`t5_tokenizer_json`."""
    body = b""
    for piece, score, kind in t5_pieces():
        entry = _bytes_field(1, piece.encode()) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(kind))
        body += _bytes_field(1, entry)
    trainer = (_field(3, 0, _varint(1)) + _field(4, 0, _varint(len(t5_pieces()))) + _field(40, 0, _varint(2))
               + _field(41, 0, _varint(-1)) + _field(42, 0, _varint(1)) + _field(43, 0, _varint(0)))
    normalizer = (_bytes_field(1, b"identity") + _field(3, 0, _varint(1)) + _field(4, 0, _varint(1))
                  + _field(5, 0, _varint(1)))
    return body + _bytes_field(2, trainer) + _bytes_field(3, normalizer)


def _remap_added_tokens(config: dict, ids: dict[str, int]) -> dict:
    """Point ``added_tokens_decoder`` (ids of the real vocabulary) at the tiny vocabulary's ids, by content."""
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {str(ids[v["content"]]): v for v in config["added_tokens_decoder"].values()
                                          if v["content"] in ids}
    return config


# --- weights ----------------------------------------------------------------------------------------------
def _instantiate(library: str, class_name: str, config: dict, seed: int):
    import torch

    torch.manual_seed(seed)
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, class_name).from_config(config)
    import transformers

    arch = config.get("architectures", [class_name])[0]
    model_class = getattr(transformers, class_name if class_name.endswith("Model") or "Projection" in class_name else arch)
    config_class = model_class.config_class
    cfg = config_class.from_dict({k: v for k, v in config.items() if k != "transformers_version"})
    model = model_class(cfg)
    model.eval()
    return model


def _state_dict(model, dtype: str) -> dict:
    import torch

    target = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return {k: v.detach().to(target).contiguous().clone() for k, v in model.state_dict().items()}


def _safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata or {"format": "pt"})


def _dummy_safetensors(label: str) -> bytes:
    header = json.dumps({"__metadata__": {"replica": label},
                         "dummy": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def _weights_for(files: list[str], folder: str, tensors_by_dtype, stored: str) -> dict[str, bytes]:
    """The weight files of one component folder named in ``files``: plain, variants, shards with index."""
    import re

    out: dict[str, bytes] = {}
    prefix = f"{folder}/" if folder else ""
    names = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
    for name in names:
        if not name.endswith(".safetensors") or not name.startswith(("model", "diffusion_pytorch_model")):
            continue
        shard = re.search(r"-(\d{5})-of-(\d{5})\.safetensors$", name)
        variant = name.split(".")[-2] if name.count(".") >= 2 else None
        dtype = "float16" if variant == "fp16" else stored
        tensors = tensors_by_dtype(dtype)
        if shard is None:
            out[prefix + name] = _safetensors_bytes(tensors)
            continue
        index, total = int(shard.group(1)), int(shard.group(2))
        keys = list(tensors)
        chunk = keys[(index - 1) * len(keys) // total: index * len(keys) // total]
        out[prefix + name] = _safetensors_bytes({k: tensors[k] for k in chunk})
        stem = name[: shard.start()]
        index_name = f"{prefix}{stem}.safetensors.index.json"
        entry = json.loads(out.get(index_name, b'{"metadata": {"total_size": 0}, "weight_map": {}}'))
        entry["metadata"]["total_size"] += sum(tensors[k].numel() * tensors[k].element_size() for k in chunk)
        entry["weight_map"].update({k: name for k in chunk})
        entry["weight_map"] = dict(sorted(entry["weight_map"].items()))
        out[index_name] = (json.dumps(entry, indent=2) + "\n").encode()
    return out


# --- one replica ------------------------------------------------------------------------------------------
def _text(repo: str, path: str) -> bytes:
    name = path.rsplit("/", 1)[-1]
    if name == ".gitattributes":
        return b"".join(f"*.{s} filter=lfs diff=lfs merge=lfs -text\n".encode()
                        for s in ("bin", "ckpt", "safetensors", "msgpack", "onnx", "onnx_data", "png", "jpg", "jpeg"))
    if name == "README.md":
        return f"---\nlibrary_name: diffusers\n---\n# {repo} (test replica)\n\nTiny random weights; see SOURCES.md.\n".encode()
    if name.startswith("LICENSE"):
        return f"Licence text of {repo} (not reproduced in the replica).\n".encode()
    return f"dummy {path} of the {repo} replica\n".encode()


def clip_tokenizer_json(clip_vocab: tuple[dict[str, int], str], workdir: Path) -> str:
    """The fast tokenizer (``tokenizer.json``) of the small CLIP vocabulary, as transformers converts it."""
    from transformers import CLIPTokenizer

    ids, merges = clip_vocab
    folder = workdir / "cliptokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    text = tokenizer.backend_tokenizer.to_str(pretty=True)
    shutil.rmtree(folder)
    return text


def build_replica(repo: str, workdir: Path, clip_vocab: tuple[dict[str, int], str], seed: int = 0) -> dict[str, bytes]:
    """All files of one replica, path -> bytes: main's and those its named revisions add."""
    files = listing(repo)
    files += sorted(set().union(*revisions(repo).values()) - set(files))
    shrink = SHRINK[repo]
    clip_ids, clip_merges = clip_vocab
    t5_ids = {p: i for i, (p, _, _) in enumerate(t5_pieces())}
    t5_ids.update({f"<extra_id_{i}>": len(t5_ids) + T5_EXTRA_IDS - 1 - i for i in range(T5_EXTRA_IDS)})
    out: dict[str, bytes] = {}

    def folder_kind(folder: str) -> str:
        siblings = {f.rsplit("/", 1)[-1] for f in files if (f.startswith(folder + "/") if folder else "/" not in f)}
        return "t5" if "spiece.model" in siblings else "clip"

    configs: dict[str, dict] = {}
    for path in files:
        if path in out or not (path.endswith(".json") and (_folder(repo) / path).is_file()):
            continue
        config = real_config(repo, path)
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        ids = t5_ids if folder_kind(folder) == "t5" else clip_ids
        config = _shrink(config, shrink.get(path, {}), len(ids))
        name = path.rsplit("/", 1)[-1]
        if name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            config = _shrink_tokenizer_file(name, config, ids)
        configs[path] = config
        out[path] = (json.dumps(config, indent=2) + "\n").encode()

    for path in files:
        if path in out:
            continue
        name = path.rsplit("/", 1)[-1]
        if name == "vocab.json":
            out[path] = json.dumps(clip_ids, ensure_ascii=False).encode()
        elif name == "merges.txt":
            out[path] = clip_merges.encode()
        elif name == "tokenizer.json":
            folder = path.rsplit("/", 1)[0] if "/" in path else ""
            out[path] = (t5_tokenizer_json() if folder_kind(folder) == "t5"
                         else clip_tokenizer_json(clip_vocab, workdir)).encode()
        elif name == "spiece.model":
            out[path] = t5_spiece_model()

    # loaded components: model_index entries, or the root config of a VAE repo
    components: list[tuple[str, str, str]] = []
    index = configs.get("model_index.json")
    if index:
        components = [(k, v[0], v[1]) for k, v in index.items()
                      if isinstance(v, list) and v[0] in ("diffusers", "transformers") and f"{k}/config.json" in configs]
    elif "config.json" in configs and "_class_name" in configs["config.json"]:
        components = [("", "diffusers", configs["config.json"]["_class_name"])]
    elif "config.json" in configs:  # a transformers model folder (a CLIP scorer)
        components = [("", "transformers", configs["config.json"]["architectures"][0])]
    for number, (folder, library, class_name) in enumerate(components):
        config = configs[f"{folder}/config.json" if folder else "config.json"]
        model = _instantiate(library, class_name, config, seed + number)
        cache: dict[str, dict] = {}
        out.update(_weights_for(files, folder, lambda d: cache.setdefault(d, _state_dict(model, d)),
                                STORED_DTYPE.get(repo, "float32")))

    if repo == "latent-consistency/lcm-lora-sdv1-5":
        out["pytorch_lora_weights.safetensors"] = _lcm_lora(seed)

    for path in files:
        if path in out:
            continue
        name = path.rsplit("/", 1)[-1]
        if name.endswith((".bin", ".ckpt", ".pt", ".pth")) and not name.startswith("openvino"):
            out[path] = PICKLE_DUMMY + path.encode()
        elif name.endswith(".safetensors"):
            out[path] = _dummy_safetensors(f"{repo}/{path}")
        elif name.endswith(".json"):
            out[path] = b'{"replica": "not reproduced"}\n'
        else:
            out[path] = _text(repo, path)
    missing = set(files) ^ set(out)
    assert not missing, f"{repo}: files not built or not listed: {sorted(missing)}"
    return out


def _shrink_tokenizer_file(name: str, config: dict, ids: dict[str, int]) -> dict:
    """The vocabulary is a model dimension: T5's 100 sentinels become T5_EXTRA_IDS; ids follow the tiny vocab."""
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    if name == "added_tokens.json":
        return {t: ids[t] for t in config if t in ids}
    if "additional_special_tokens" in config:
        config["additional_special_tokens"] = extra
    if "extra_ids" in config:
        config["extra_ids"] = T5_EXTRA_IDS
    return _remap_added_tokens(config, ids)


def _lcm_lora(seed: int) -> bytes:
    """A LoRA for the SD 1.5 replica's UNet in the released file's layout: kohya-style ``lora_unet_<module path
    with underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, float16, over the modules the LCM-LoRA
    training script targets (attention, feed-forward, resnet convs, time embedding projections, resamplers)."""
    import torch
    import torch.nn as nn

    unet_config = real_config(LCM_LORA_BASE, "unet/config.json")
    unet_config.update(SHRINK[LCM_LORA_BASE]["unet/config.json"])
    unet = _instantiate("diffusers", "UNet2DConditionModel", unet_config, 0)
    generator = torch.Generator().manual_seed(seed + 1000)
    tensors = {}
    for name, module in unet.named_modules():
        if not any(name.endswith("." + t) or name == t for t in LCM_LORA_TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, nn.Linear):
            down = torch.randn(LORA_RANK, module.in_features, generator=generator) * 0.05
            up = torch.randn(module.out_features, LORA_RANK, generator=generator) * 0.05
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size
            down = torch.randn(LORA_RANK, module.in_channels, *k, generator=generator) * 0.05
            up = torch.randn(module.out_channels, LORA_RANK, 1, 1, generator=generator) * 0.05
        else:
            continue
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.lora_up.weight"] = up.half()
        tensors[f"{key}.alpha"] = torch.tensor(float(LORA_RANK)).half()
    return _safetensors_bytes(dict(sorted(tensors.items())))


# --- all replicas, cached on disk -------------------------------------------------------------------------
def cache_key() -> str:
    import diffusers
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(DATA.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(DATA).as_posix().encode() + path.read_bytes())
    for module in (torch, diffusers, transformers, tokenizers):
        digest.update(module.__version__.encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("DALLE_REPLICA_CACHE") or Path(tempfile.gettempdir()) / "dallecli-replicas")


def build_all(root: Path | None = None) -> Path:
    """Build every replica under ``root/<key>/<org>--<name>/`` (once per cache key) and return that folder."""
    root = root or cache_root()
    target = root / cache_key()
    if (target / "COMPLETE").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        clip_vocab = clip_vocabulary(work)
        shutil.rmtree(work / "clipvocab")
        for repo in repo_ids():
            built = build_replica(repo, work, clip_vocab)
            folders = {repo.replace("/", "--"): listing(repo)}
            folders.update({_revision_folder(repo, rev): names for rev, names in revisions(repo).items()})
            for folder, names in folders.items():
                for path in names:
                    file = work / folder / path
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_bytes(built[path])
        (work / "COMPLETE").write_text("ok\n")
        try:
            work.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if work.exists() and not (target / "COMPLETE").is_file():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def repo_files(built: Path) -> dict[str, dict[str, bytes]]:
    """``{repo_id: {path: bytes}}`` (main) from :func:`build_all`'s folder."""
    return {repo: _read_folder(built / repo.replace("/", "--")) for repo in repo_ids()}


def revision_files(built: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """``{repo_id: {revision: {path: bytes}}}`` for the repos with named revisions (``@REV`` in ``files.txt``)."""
    return {repo: {rev: _read_folder(built / _revision_folder(repo, rev)) for rev in revs}
            for repo in repo_ids() if (revs := revisions(repo))}


if __name__ == "__main__":
    import time

    started = time.perf_counter()
    built = build_all(Path(tempfile.mkdtemp()))
    for repo, files in repo_files(built).items():
        print(f"{repo:50s} {len(files):3d} files {sum(map(len, files.values())) / 1e6:8.2f} MB")
    print(f"built in {time.perf_counter() - started:.1f} s -> {built}")
