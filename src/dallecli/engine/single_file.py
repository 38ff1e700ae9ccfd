"""Single-file checkpoints (the AUTOMATIC1111/Civitai format), loaded offline through diffusers' ``from_single_file``.

A single file holds the whole pipeline under the original LDM key names (``model.diffusion_model.*`` for the
UNet, ``first_stage_model.*`` for the VAE, ``cond_stage_model.*`` or ``conditioner.embedders.N.*`` for the text
encoders). Nothing here reads a tensor: the family (SD 1.x, SD 2.x, SDXL) and every model dimension the shapes
can tell (channels, blocks, transformer depth, cross-attention width, text encoder width/depth/vocabulary, VAE
channels) come from the safetensors header. What shapes cannot tell (attention heads, group norm groups,
prediction type, scheduler, tokenizer) comes from the published config of the family's reference repo, shipped
in ``dallecli/models/single_file/<config>/`` (sources in its ``SOURCES.md``). The merged configs are written to
a cache folder and handed to ``<Pipeline>.from_single_file(file, config=folder, local_files_only=True)``, so
that no config is ever fetched from the network, and a tiny test checkpoint loads through the same path as a
real one.

SD 2.x prediction type: the 768 px models (2.0-v, 2.1) predict v, the 512 px "base" models epsilon; the
weights do not say which. As diffusers' own ``from_single_file`` does, a 2.x file is taken as v-prediction at
768 px unless (in this order) the file's ``__metadata__`` names it (``modelspec.prediction_type`` or
``modelspec.architecture``, the Stability model-spec keys), or a ``NAME.yaml`` beside ``NAME.safetensors``
(AUTOMATIC1111's convention) lacks ``parameterization: "v"``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from dallecli.atomic import staged_folder
from dallecli.errors import ModelNotFoundError, UnsupportedCheckpointError, first_line
# the header-only checks (family, what an unsupported file holds) are weightfiles', which the store uses too
from dallecli.weightfiles import (SD1_CLIP, SD2_OPENCLIP, SDXL_CLIP, SDXL_OPENCLIP, UNET, VAE, read_header as raw_header,
                                  single_file_family, unsupported_checkpoint)

# family -> (shipped config folder, pipeline class)
FAMILIES = {
    "sd1": ("sd15", "StableDiffusionPipeline"),
    "sd2": ("sd21", "StableDiffusionPipeline"),
    "sd2-base": ("sd21-base", "StableDiffusionPipeline"),
    "sdxl": ("sdxl-base", "StableDiffusionXLPipeline"),
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x (768, v-prediction)", "sd2-base": "SD 2.x (512, epsilon)",
                "sdxl": "SDXL"}


@dataclass(frozen=True)
class SingleFile:
    """What a single-file checkpoint holds, read from its header.

    Attributes:
        path: the file.
        family: "sd1", "sd2", "sd2-base" or "sdxl" (keys of :data:`FAMILIES`).
        overrides: component -> config keys read from the tensor shapes (``{"unet": {...}, "vae": {...}, ...}``).
        float32_bytes: bytes of every tensor in float32 (elements x 4).
    """

    path: Path
    family: str
    overrides: dict = field(default_factory=dict)
    float32_bytes: int = 0

    @property
    def config_name(self) -> str:
        return FAMILIES[self.family][0]

    @property
    def pipeline_class(self) -> str:
        return FAMILIES[self.family][1]

    @property
    def default_size(self) -> int:
        """The image size (pixels) of the family: UNet ``sample_size`` x 8."""
        return int(self.overrides["unet"].get("sample_size") or _shipped(self.config_name, "unet")["sample_size"]) * 8


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors of a safetensors file, read from its JSON header only (no tensor data, no pickle).

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``{name: (dtype, shape)}`` (``__metadata__`` left out; see :func:`read_metadata`).

    Raises:
        UnsafeWeightsError: the content is a pickle, whatever the name.
        CorruptWeightsError: truncated, a Git LFS pointer or not safetensors.
    """
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in raw_header(path).items()
            if k != "__metadata__" and isinstance(v, dict) and "shape" in v}


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty when it has none)."""
    meta = raw_header(path).get("__metadata__")
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _blocks(keys, prefix: str) -> list[int]:
    """The sorted distinct integers N of keys ``prefix + "N." ...``."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def detect(path: Path) -> SingleFile:
    """Detect the family of a single-file checkpoint and read its dimensions from the tensor shapes.

    Args:
        path: a ``.safetensors`` file in the original LDM key layout.

    Returns:
        A :class:`SingleFile`.

    Raises:
        UnsupportedCheckpointError: not an SD 1.x, SD 2.x or SDXL base checkpoint (one line naming what it is).
        UnsafeWeightsError, CorruptWeightsError: as :func:`read_header`.
    """
    header = read_header(path)
    shapes = {k: shape for k, (_, shape) in header.items()}
    total = sum(4 * _prod(shape) for shape in shapes.values())

    def unsupported(what: str) -> UnsupportedCheckpointError:
        return unsupported_checkpoint(path, what)

    family = single_file_family(path, shapes)  # "sd1", "sd2" or "sdxl"; 4-channel UNet and VAE present
    unet = _unet_config(shapes)
    overrides = {"unet": unet, "vae": _vae_config(shapes)}
    if family == "sdxl":
        te1 = _clip_config(shapes, SDXL_CLIP)
        te2 = _openclip_config(shapes, SDXL_OPENCLIP, drop_last=False)
        if te1["hidden_size"] == te2["hidden_size"]:
            raise unsupported(f"an SDXL checkpoint whose two text encoders share the width {te1['hidden_size']}")
        overrides.update(text_encoder=te1, text_encoder_2=te2)
        pooled = te2["projection_dim"]
        extra = unet.get("projection_class_embeddings_input_dim") or 0
        if extra <= pooled or (extra - pooled) % 6:
            raise unsupported("an SDXL checkpoint without the expected added time embedding")
        unet["addition_time_embed_dim"] = (extra - pooled) // 6
        unet["attention_head_dim"] = [max(1, c // 64) for c in unet["block_out_channels"]]
    elif family == "sd2":
        # SD 2.x conditions on the penultimate layer of OpenCLIP; its last block is in the file but never used
        overrides["text_encoder"] = _openclip_config(shapes, SD2_OPENCLIP, drop_last=True)
        unet["attention_head_dim"] = [max(1, c // 64) for c in unet["block_out_channels"]]
        if _sd2_prediction(path) == "epsilon":
            family = "sd2-base"
    else:
        overrides["text_encoder"] = _clip_config(shapes, SD1_CLIP)
    if family != "sdxl":
        unet.pop("projection_class_embeddings_input_dim", None)
    for name in ("text_encoder", "text_encoder_2"):
        if name in overrides and overrides[name]["vocab_size"] < 49408:
            raise unsupported(f"a checkpoint whose {name} has a {overrides[name]['vocab_size']}-token vocabulary "
                              "(CLIP's BPE has 49408)")
    return SingleFile(path, family, overrides, total)


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _unet_config(shapes: dict) -> dict:
    """UNet2DConditionModel config keys from the ``model.diffusion_model.*`` shapes."""
    p = UNET
    inputs = _blocks(shapes, p + "input_blocks.")
    downs = [i for i in inputs if p + f"input_blocks.{i}.0.op.weight" in shapes]
    levels = len(downs) + 1
    per_level, rest = divmod(len(inputs) - 1 - len(downs), levels)
    if rest or per_level < 1:
        raise ModelNotFoundError("the UNet's input blocks do not form a Stable Diffusion UNet")
    channels, attention, depth = [], [], []
    cross = linear = None
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        channels.append(shapes[p + f"input_blocks.{first}.0.out_layers.3.weight"][0])
        proj_in = p + f"input_blocks.{first}.1.proj_in.weight"
        attention.append(proj_in in shapes)
        depth.append(len(_blocks(shapes, p + f"input_blocks.{first}.1.transformer_blocks.")) or 1)
        if proj_in in shapes:
            linear = len(shapes[proj_in]) == 2
            cross = shapes[p + f"input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"][1]
    config = {
        "in_channels": shapes[p + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[p + "out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "transformer_layers_per_block": depth if any(d != 1 for d in depth) else 1,
        "cross_attention_dim": cross,
        "use_linear_projection": bool(linear),
    }
    if p + "label_emb.0.0.weight" in shapes:  # SDXL's added (pooled text + size) embedding
        config["projection_class_embeddings_input_dim"] = shapes[p + "label_emb.0.0.weight"][1]
    return config


def _vae_config(shapes: dict) -> dict:
    """AutoencoderKL config keys from the ``first_stage_model.*`` shapes."""
    p = VAE
    downs = _blocks(shapes, p + "encoder.down.")
    channels = [shapes[p + f"encoder.down.{i}.block.0.conv1.weight"][0] for i in downs]
    return {
        "in_channels": shapes[p + "encoder.conv_in.weight"][1],
        "out_channels": shapes[p + "decoder.conv_out.weight"][0],
        "latent_channels": shapes[p + "decoder.conv_in.weight"][1],
        "block_out_channels": channels,
        "layers_per_block": len(_blocks(shapes, p + "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "mid_block_add_attention": p + "encoder.mid.attn_1.q.weight" in shapes,
    }


def _clip_config(shapes: dict, p: str) -> dict:
    """CLIPTextConfig keys from OpenAI-CLIP (transformers layout) shapes under prefix ``p``."""
    vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
    return {"vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": max(1, hidden // 64),
            "max_position_embeddings": shapes[p + "embeddings.position_embedding.weight"][0],
            "num_hidden_layers": len(_blocks(shapes, p + "encoder.layers.")),
            "intermediate_size": shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]}


def _openclip_config(shapes: dict, p: str, drop_last: bool) -> dict:
    """CLIPTextConfig keys from OpenCLIP shapes under prefix ``p`` (``drop_last``: SD 2.x's unused last block)."""
    vocab, hidden = shapes[p + "token_embedding.weight"]
    layers = len(_blocks(shapes, p + "transformer.resblocks."))
    config = {"vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": max(1, hidden // 64),
              "max_position_embeddings": shapes[p + "positional_embedding"][0],
              "num_hidden_layers": layers - 1 if drop_last else layers,
              "intermediate_size": shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0]}
    if not drop_last and p + "text_projection" in shapes:
        config["projection_dim"] = shapes[p + "text_projection"][1]  # (width, embed): x @ projection
    return config


def _sd2_prediction(path: Path) -> str:
    """"v" or "epsilon" for an SD 2.x file (see the module docstring for the order of evidence)."""
    meta = read_metadata(path)
    named = meta.get("modelspec.prediction_type", "").lower()
    if named in ("v", "v_prediction", "v-prediction"):
        return "v"
    if named in ("epsilon", "eps"):
        return "epsilon"
    architecture = meta.get("modelspec.architecture", "").lower()
    if architecture.startswith("stable-diffusion-v2"):
        return "v" if architecture.endswith("-v") else "epsilon"
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        try:
            import yaml

            original = yaml.safe_load(beside.read_text(encoding="utf-8")) or {}
            params = original.get("model", {}).get("params", {})
            return "v" if str(params.get("parameterization", "eps")).lower() == "v" else "epsilon"
        except Exception:  # noqa: BLE001 - unreadable or malformed yaml (safe loader only): keep the default
            return "v"
    return "v"


def _shipped_root() -> Path:
    return Path(str(resources.files("dallecli.models") / "single_file"))


def _shipped(config_name: str, component: str) -> dict:
    path = _shipped_root() / config_name / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def scheduler_config(model: SingleFile) -> dict:
    """The scheduler config ``model`` is loaded with (its family's shipped one; see :func:`materialise`)."""
    return {**_shipped(model.config_name, "scheduler"), **model.overrides.get("scheduler", {})}


@lru_cache(maxsize=1)
def clip_bpe_files() -> tuple[str, str]:
    """``(vocab.json text, merges.txt text)`` for CLIPTokenizer, built from OpenAI CLIP's BPE merges
    (``bpe_simple_vocab_16e6.txt.gz``, MIT) exactly as CLIP's own tokenizer builds its vocabulary: the 256
    byte symbols, the same with ``</w>``, one token per merge (48894 merges), then the two special tokens —
    49408 tokens."""
    gz = _shipped_root() / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(clip_byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    return vocab_json, merges_txt


def clip_byte_symbols() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def cache_root() -> Path:
    """Where materialised config folders go: ``DALLE_CACHE`` or the per-user cache (platformdirs)."""
    from dallecli.config import cache_dir

    return cache_dir() / "single-file-configs"


def materialise(model: SingleFile, root: Path | None = None) -> Path:
    """Write the diffusers config folder for ``model``: the shipped family configs with the dimensions read
    from the file, plus the CLIP tokenizer files. Written once per distinct configuration (the folder name is a
    hash of its content), atomically (a temporary folder renamed into place), never beside the user's file.

    Args:
        model: from :func:`detect`.
        root: parent folder (default :func:`cache_root`).

    Returns:
        The folder, holding ``model_index.json`` and one sub-folder per component (configs only, no weights).
    """
    source = _shipped_root() / model.config_name
    files: dict[str, str] = {}
    for item in sorted(source.rglob("*.json")):
        relative = item.relative_to(source).as_posix()
        data = json.loads(item.read_text(encoding="utf-8"))
        component = relative.split("/")[0]
        if component in model.overrides:
            data.update(model.overrides[component])
        files[relative] = json.dumps(data, indent=2, sort_keys=True) + "\n"
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    folder = (root or cache_root()) / f"{model.config_name}-{digest}"
    if (folder / "model_index.json").exists():
        return folder
    try:
        with staged_folder(folder, overwrite=False, what=f"a model folder in {folder.parent}") as work:
            vocab, merges = clip_bpe_files()
            for relative, text in files.items():
                target = work / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            for tokenizer in (p for p in work.iterdir() if p.is_dir() and p.name.startswith("tokenizer")):
                (tokenizer / "vocab.json").write_text(vocab, encoding="utf-8")
                (tokenizer / "merges.txt").write_text(merges, encoding="utf-8")
    except FileExistsError:  # another process got there first
        if not (folder / "model_index.json").exists():
            raise
    return folder


def _safetensors_name(path: Path, folder: Path) -> Path:
    """A path ending in ``.safetensors`` for ``path``: diffusers picks its reader by the name (anything else
    would go to ``torch.load``), so another name is linked under the cache first."""
    if path.name.endswith(".safetensors"):
        return path
    link = folder.parent / "links" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".safetensors")
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(path.resolve())
    return link


def load_single_file(path: Path, dtype: str):
    """Load a single-file checkpoint as a diffusers pipeline on the CPU, offline.

    Args:
        path: the ``.safetensors`` file (content checked: pickles are refused, never opened by torch).
        dtype: "float32", "float16" or "bfloat16".

    Returns:
        The pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``), not yet moved to a device;
        no safety checker.

    Raises:
        UnsupportedCheckpointError: see :func:`detect`.
        UnsafeWeightsError, CorruptWeightsError: as :func:`read_header`.
        ModelNotFoundError: diffusers cannot build the pipeline from it.
    """
    import diffusers

    from dallecli.engine.loading import _dtype_kwargs

    model = detect(path)
    folder = materialise(model)
    cls = getattr(diffusers, model.pipeline_class)
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if model.pipeline_class == "StableDiffusionPipeline" else {}
    try:
        return cls.from_single_file(str(_safetensors_name(path, folder)), config=str(folder), local_files_only=True,
                                    **_dtype_kwargs(dtype), **extra)
    except (EnvironmentError, ValueError, KeyError, AttributeError) as exc:
        raise ModelNotFoundError(f"cannot load {path.name} as {FAMILY_NAMES[model.family]}: {first_line(exc)}") from exc
