"""`dalle generate --lora`: kohya-layout files load (C10), a LoRA matching nothing fails (C11), scale 0 is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

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
    from dallecli.errors import LoraError

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
    with pytest.raises(LoraError, match="not found"):
        pixels(LoraSpec(str(missing)))
    assert np.array_equal(pixels(), base)
