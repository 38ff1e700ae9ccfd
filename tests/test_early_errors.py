"""Usage errors that need no weights are found before any model loads, with exit 2 (issue 18, items 7 and 11)."""

from __future__ import annotations

import json
import shutil

import pytest

from dallecli.engine.generate import Engine
from dallecli.engine.request import GenerationRequest, LoraSpec
from dallecli.errors import UsageError


@pytest.fixture
def no_loading(monkeypatch):
    """Make any pipeline load fail loudly: the checks under test must come first."""
    import dallecli.engine.generate as generate

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(generate, "load_pipeline", refuse)


def test_karras_sigmas_on_the_zero_snr_embedded_model_fail_before_loading(no_loading):
    engine = Engine(None, "cpu")
    with pytest.raises(UsageError, match="zero-terminal-SNR"):
        engine.plan(GenerationRequest("a red circle", scheduler="dpm++-karras"))
    assert engine._pipe is None


def test_karras_sigmas_on_a_cosine_schedule_are_refused_before_loading(tiny_pipeline, tmp_path, no_loading):
    cosine = shutil.copytree(tiny_pipeline, tmp_path / "cosine")
    config_path = cosine / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "beta_schedule": "squaredcos_cap_v2"}))
    engine = Engine(str(cosine), "cpu")
    with pytest.raises(UsageError, match=r"plans only \d+ distinct timesteps of 25 .*squaredcos_cap_v2.*use dpm\+\+$"):
        engine.plan(GenerationRequest("a red circle", scheduler="dpm++-karras", steps=25))
    planned, _ = engine.plan(GenerationRequest("a red circle", scheduler="dpm++", steps=25))  # the plain one fits
    assert planned.scheduler == "dpm++" and engine._pipe is None


def test_missing_lora_is_a_usage_error_before_loading(tmp_path, no_loading):
    engine = Engine(None, "cpu")
    with pytest.raises(UsageError, match="no such file"):
        engine.plan(GenerationRequest("a red circle", loras=(LoraSpec(str(tmp_path / "missing.safetensors")),)))
    assert engine._pipe is None


def test_unknown_vae_names_the_vae_entries_not_the_pipelines():
    with pytest.raises(UsageError) as caught:
        Engine(None, "cpu", vae="foo")
    assert "taesd" in str(caught.value) and "sd-turbo" not in str(caught.value)


def _vae_folder(folder, **config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    return folder


@pytest.mark.parametrize("config, message", [
    ({"latent_channels": 16, "scaling_factor": 1.5305}, "16-channel latents; this model's are 4-channel"),
    ({"latent_channels": 4, "scaling_factor": 0.13025}, "scales latents by 0.13025, this model's VAE by 0.18215"),
])
def test_a_vae_of_another_latent_space_is_refused_before_loading(tiny_pipeline, tmp_path, config, message):
    vae = _vae_folder(tmp_path / "other-vae", **config)
    with pytest.raises(UsageError, match=message):
        Engine(str(tiny_pipeline), "cpu", vae=str(vae))


def test_a_vae_of_the_same_latent_space_is_accepted(tiny_pipeline, tmp_path):
    vae = _vae_folder(tmp_path / "same-vae", latent_channels=4)  # scaling_factor defaults to SD's 0.18215
    assert Engine(str(tiny_pipeline), "cpu", vae=str(vae)).vae.path == vae.resolve()


def test_a_registry_vae_of_another_family_is_refused():
    from dallecli.engine.loading import check_vae_fits

    with pytest.raises(UsageError, match="made for sdxl models; this model is stable-diffusion"):
        check_vae_fits(Engine(None, "cpu").model.path, Engine(None, "cpu").model.path / "vae", "taesdxl",
                       model_family="stable-diffusion", vae_family="sdxl")


def test_a_lora_that_is_not_safetensors_fails_before_loading(tmp_path, no_loading):
    from dallecli.errors import CorruptWeightsError

    picture = tmp_path / "notes.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    engine = Engine(None, "cpu")
    with pytest.raises(CorruptWeightsError):
        engine.plan(GenerationRequest("a red circle", loras=(LoraSpec(str(picture)),)))
    assert engine._pipe is None


def test_the_floor_of_a_vae_that_cannot_tile_counts_the_whole_decode():
    from dallecli.engine.memory import low_memory_floor_bytes, vae_can_tile
    from dallecli.store.resolve import embedded_model_path

    assert not vae_can_tile(embedded_model_path())
    tiled = low_memory_floor_bytes(0, "float32", 8192, 8192, 1, True, 0.1)
    whole = low_memory_floor_bytes(0, "float32", 8192, 8192, 1, True, 0.1, tiles=False)
    assert whole > 3 * tiled
