"""`dalle generate --lora`: kohya-layout files load (C10), a LoRA matching nothing fails (C11), scale 0 is a no-op;
safetensors only, another family refused in one line, registry LoRAs by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_dalle
from dallecli.engine.lora import parse_lora
from dallecli.engine.request import LoraSpec
from dallecli.errors import UsageError


def _random_peft_lora(tiny_pipeline, rank: int = 2) -> dict[str, torch.Tensor]:
    """A PEFT-format UNet LoRA (``unet.`` prefix) with random non-zero up weights, as trainers produce."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet", use_safetensors=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = get_peft_model_state_dict(unet)
    return {f"unet.{k}": (torch.randn_like(v) * 0.5 if "lora_B" in k else v) for k, v in state.items()}


@pytest.fixture(scope="module")
def kohya_lora(tiny_pipeline, tmp_path_factory):
    from diffusers.utils import convert_state_dict_to_kohya

    state = convert_state_dict_to_kohya(_random_peft_lora(tiny_pipeline))
    assert all(k.startswith("lora_unet_") for k in state)
    path = tmp_path_factory.mktemp("lora") / "style_kohya.safetensors"
    save_file(state, str(path))
    return path, sum(1 for k in state if not k.endswith(".alpha"))


def test_parse_lora():
    assert parse_lora("a.safetensors") == LoraSpec("a.safetensors", 1.0)
    assert parse_lora("dir/a.safetensors:0.5") == LoraSpec("dir/a.safetensors", 0.5)
    assert parse_lora("C:\\loras\\a.safetensors") == LoraSpec("C:\\loras\\a.safetensors", 1.0)
    with pytest.raises(UsageError, match="must be a number"):
        parse_lora("a.safetensors:strong")


def test_kohya_layout_loads_and_reports_tensors_applied(kohya_lora, tiny_pipeline, tmp_path):
    """C10."""
    path, tensors = kohya_lora
    result = run_dalle("generate", "a red circle", "--model", str(tiny_pipeline), "--steps", "2", "--seed", "3",
                       "--lora", f"{path}:0.7", "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    assert f"{tensors} tensors applied" in result.stderr and "scale 0.7" in result.stderr
    image = json.loads(result.stdout)["images"][0]["path"]
    from dallecli.images import read_metadata

    recorded = read_metadata(Path(image))["loras"]
    assert recorded[0]["scale"] == 0.7 and recorded[0]["tensors"] == tensors and recorded[0]["path"] == str(path)


def test_lora_matching_no_layer_fails(tiny_pipeline, tmp_path):
    """C11."""
    bogus = tmp_path / "other_model.safetensors"
    save_file({"lora_unet_not_a_layer.lora_down.weight": torch.ones(2, 8),
               "lora_unet_not_a_layer.lora_up.weight": torch.ones(8, 2)}, str(bogus))
    result = run_dalle("generate", "a red circle", "--model", str(tiny_pipeline), "--steps", "2",
                       "--lora", str(bogus), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "matched 0 layers" in result.stderr
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_scale_zero_gives_the_same_pixels_and_later_requests_unload(kohya_lora, tiny_pipeline, tmp_path):
    from dallecli.engine.generate import Engine
    from dallecli.engine.lora import loaded_adapters
    from dallecli.engine.request import GenerationRequest

    path, _ = kohya_lora
    engine = Engine(str(tiny_pipeline), "cpu", "float32")

    def pixels(*loras):
        image = next(engine.generate(GenerationRequest("a red circle", seed=5, steps=2, loras=tuple(loras))))
        return np.asarray(image.image)

    base = pixels()
    assert np.array_equal(pixels(LoraSpec(str(path), 0.0)), base)
    assert not np.array_equal(pixels(LoraSpec(str(path), 1.0)), base)
    assert np.array_equal(pixels(), base) and loaded_adapters(engine.pipe) == []
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UsageError, match="no such file"):
        pixels(LoraSpec(str(missing)))
    assert np.array_equal(pixels(), base)


# -- safetensors only (item 9) -------------------------------------------------------------------------------

def test_lora_reaches_diffusers_as_a_dict_never_through_a_file_loader(kohya_lora, tiny_pipeline, monkeypatch):
    """No call can reach diffusers' pickle fallback: the tensors are read here and handed over as a dict."""
    import diffusers.loaders.lora_base as lora_base
    from diffusers import StableDiffusionPipeline

    from dallecli.engine.generate import Engine

    def no_pickles(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", no_pickles)
    monkeypatch.setattr(lora_base, "load_state_dict", no_pickles)
    seen = []
    original = StableDiffusionPipeline.load_lora_weights

    def spy(self, source, *args, **kwargs):
        seen.append(source)
        return original(self, source, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", spy)
    path, tensors = kohya_lora
    applied = Engine(str(tiny_pipeline), "cpu", "float32")._use_loras((LoraSpec(str(path), 0.5),))
    assert len(seen) == 1 and isinstance(seen[0], dict) and applied[0]["tensors"] == tensors


def _unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=text).sample


def test_a_dict_applies_exactly_what_diffusers_applies_from_the_file(kohya_lora, tiny_pipeline, tmp_path):
    """kohya keys convert from a dict as from a path, and a diffusers file's lora_alpha != rank header (which
    diffusers reads only from a file) is folded in: the UNet computes the same either way."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dallecli.engine.lora import apply_loras

    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet", use_safetensors=True)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=6, init_lora_weights="gaussian", target_modules=["to_k", "to_v"],
                                alpha_pattern={"attn2.to_v": 1}))
    layers = {k: (torch.randn_like(v) if "lora_B" in k else v) for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    with_header = tmp_path / "pytorch_lora_weights.safetensors"
    for path in (kohya_lora[0], with_header):
        by_path = StableDiffusionPipeline.from_pretrained(tiny_pipeline, use_safetensors=True)
        by_path.load_lora_weights(str(path), adapter_name="a", use_safetensors=True)
        ours = StableDiffusionPipeline.from_pretrained(tiny_pipeline, use_safetensors=True)
        apply_loras(ours, [LoraSpec(str(path))])
        base = _unet_output(StableDiffusionPipeline.from_pretrained(tiny_pipeline, use_safetensors=True))
        assert not torch.allclose(_unet_output(by_path), base)
        # alpha/rank folded into lora_B rounds differently from PEFT's scaling at run time: float32 tolerance
        torch.testing.assert_close(_unet_output(ours), _unet_output(by_path), rtol=1e-3, atol=1e-4)
    unfolded = StableDiffusionPipeline.from_pretrained(tiny_pipeline, use_safetensors=True)
    unfolded.load_lora_weights(load_file(str(with_header)), adapter_name="a")  # the header lost: alpha = rank
    assert (_unet_output(unfolded) - _unet_output(ours)).abs().max() > 1e-2


def test_lora_files_must_end_where_their_header_says(kohya_lora, tmp_path):
    from dallecli.engine.lora import read_lora
    from dallecli.weightfiles import sniff
    from dallecli.errors import CorruptWeightsError, UnsafeWeightsError

    path, _ = kohya_lora
    assert sniff(path) == "safetensors" and read_lora(path)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(CorruptWeightsError, match="bytes after its last tensor"):
        read_lora(longer)
    shorter = tmp_path / "shorter.safetensors"
    shorter.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        read_lora(shorter)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, pickled, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        read_lora(pickled)


# -- another base family (item 10) ---------------------------------------------------------------------------

def _family_lora(width: int, layout: str, rank: int = 4, out: int = 320) -> dict[str, torch.Tensor]:
    """A LoRA with only the shapes of one family: cross-attention key/value down (A) of input ``width``."""
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    names = {
        "peft": (f"unet.{block}.attn2.{{p}}.lora_A.weight", f"unet.{block}.attn2.{{p}}.lora_B.weight"),
        "diffusers": (f"unet.{block}.attn2.{{p}}.lora.down.weight", f"unet.{block}.attn2.{{p}}.lora.up.weight"),
        "attn-procs": (f"{block}.attn2.processor.{{p}}_lora.down.weight", f"{block}.attn2.processor.{{p}}_lora.up.weight"),
        "kohya": ("lora_unet_" + block.replace(".", "_") + "_attn2_{p}.lora_down.weight",
                  "lora_unet_" + block.replace(".", "_") + "_attn2_{p}.lora_up.weight"),
        "kohya-sgm": ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_{p}.lora_down.weight",
                      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_{p}.lora_up.weight"),
    }[layout]
    state = {}
    for projection in ("to_k", "to_v"):
        down, up = (name.format(p=projection) for name in names)
        state[down], state[up] = torch.zeros(rank, width), torch.zeros(out, rank)
    state[f"unet.{block}.attn2.to_q.lora_A.weight"] = torch.zeros(rank, out)  # the query reads the image: ignored
    return state


@pytest.mark.parametrize("layout", ["peft", "diffusers", "attn-procs", "kohya", "kohya-sgm"])
@pytest.mark.parametrize(("lora_width", "model_width", "expected"), [
    (2048, 768, "LoRA x.safetensors was made for SDXL (cross-attention 2048); this model is SD 1.x (768)"),
    (768, 2048, "LoRA x.safetensors was made for SD 1.x (cross-attention 768); this model is SDXL (2048)"),
    (1024, 768, "LoRA x.safetensors was made for SD 2.x (cross-attention 1024); this model is SD 1.x (768)"),
])
def test_a_lora_for_another_family_is_named_in_one_line(layout, lora_width, model_width, expected):
    from types import SimpleNamespace

    from dallecli.engine.lora import check_family, lora_cross_attention_width
    from dallecli.errors import LoraError

    state = _family_lora(lora_width, layout)
    assert lora_cross_attention_width(state) == lora_width
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=model_width)))
    with pytest.raises(LoraError) as caught:
        check_family(pipe, state, "x.safetensors")
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    check_family(SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=lora_width))),
                 state, "x.safetensors")  # the same family passes


def test_sdxl_lora_on_the_tiny_model_generates_nothing(tiny_pipeline, tmp_path):
    lora = tmp_path / "xl_style.safetensors"
    save_file(_family_lora(2048, "kohya-sgm"), str(lora))
    result = run_dalle("generate", "a red circle", "--model", str(tiny_pipeline), "--steps", "2",
                       "--lora", str(lora), "--out", str(tmp_path / "out"), "--progress", "none")
    assert result.returncode == 2  # the user's choice of LoRA: a usage error
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "made for SDXL (cross-attention 2048)" in lines[0] and "(32)" in lines[0], result.stderr
    assert "size mismatch" not in result.stderr and not (tmp_path / "out").exists()


# -- registry LoRAs (item 11) --------------------------------------------------------------------------------

def _cache_lora(cache: Path, source: Path, repo_id: str = "latent-consistency/lcm-lora-sdv1-5") -> Path:
    """Lay ``source`` out as ``dalle download`` leaves a LoRA repo in the HF cache."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    target = snapshot / "pytorch_lora_weights.safetensors"
    target.write_bytes(source.read_bytes())
    return target


def test_resolve_lora_by_path_or_registry_name(kohya_lora, tmp_path, monkeypatch):
    from dallecli.errors import ModelNotFoundError
    from dallecli.store.resolve import resolve_lora

    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match="run `dalle download lcm-lora-sdv1-5`"):
        resolve_lora("lcm-lora-sdv1-5", cache)
    target = _cache_lora(cache, kohya_lora[0])
    assert resolve_lora("lcm-lora-sdv1-5", cache) == (target, "lcm-lora-sdv1-5")
    assert resolve_lora("latent-consistency/lcm-lora-sdv1-5", cache) == (target, "lcm-lora-sdv1-5")
    with pytest.raises(UsageError, match="not a LoRA"):
        resolve_lora("taesd", cache)
    with pytest.raises(UsageError, match="no such file"):
        resolve_lora("no-such-lora.safetensors", cache)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lcm-lora-sdv1-5").write_bytes(kohya_lora[0].read_bytes())  # a path that exists wins
    assert resolve_lora("lcm-lora-sdv1-5", cache) == (Path("lcm-lora-sdv1-5"), None)


def test_registry_lora_generates_records_its_name_and_replays(kohya_lora, tiny_pipeline, tmp_path):
    from typer.testing import CliRunner

    from dallecli.cli.app import app
    from dallecli.images import read_metadata

    cache = tmp_path / "cache"
    common = ["--model", str(tiny_pipeline), "--cache-dir", str(cache), "--json"]
    missing = CliRunner().invoke(app, ["generate", "a red circle", "--lora", "lcm-lora-sdv1-5", *common])
    assert missing.exit_code == 1 and "run `dalle download lcm-lora-sdv1-5`" in missing.output
    target = _cache_lora(cache, kohya_lora[0])
    first = CliRunner().invoke(app, ["generate", "a red circle", "--steps", "2", "--seed", "4", "--lora",
                                     "lcm-lora-sdv1-5:0.6", "--out", str(tmp_path / "a"), *common])
    assert first.exit_code == 0, first.output
    image = Path(json.loads(first.stdout)["images"][0]["path"])
    recorded = read_metadata(image)["loras"][0]
    assert recorded["registry"] == "lcm-lora-sdv1-5" and recorded["name"] == "lcm-lora-sdv1-5"
    assert recorded["path"] == str(target) and recorded["scale"] == 0.6
    again = CliRunner().invoke(app, ["generate", "--from", str(image), "--out", str(tmp_path / "b"), *common])
    assert again.exit_code == 0, again.output
    replay = Path(json.loads(again.stdout)["images"][0]["path"])
    assert read_metadata(replay)["loras"][0]["registry"] == "lcm-lora-sdv1-5"
    assert np.array_equal(np.asarray(Image.open(replay)), np.asarray(Image.open(image)))
