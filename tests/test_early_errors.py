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


def _with_prk_warm_up(tiny_pipeline, folder):
    """The tiny pipeline with PNDM's Runge-Kutta warm-up as its own scheduler: fewer than 4 steps cannot run."""
    shutil.copytree(tiny_pipeline, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "PNDMScheduler",
                                "skip_prk_steps": False}))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    return folder


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_steps_the_models_own_scheduler_cannot_plan_exit_2_before_loading(tiny_pipeline, tmp_path, no_loading,
                                                                            command):
    """#18 leftovers item 6: --steps against the model's own scheduler was checked after the model loaded, so a
    "loading model" line came before the usage error (and dalle batch recorded every row as failed, exit 1)."""
    from typer.testing import CliRunner

    from dallecli.cli.app import app

    model = _with_prk_warm_up(tiny_pipeline, tmp_path / "prk")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    target = ["a cat"] if command == "generate" else [str(prompts)]
    result = CliRunner().invoke(app, [command, *target, "--model", str(model), "--steps", "2", "--width", "32",
                                      "--height", "32", "--out", str(tmp_path / "out"), "--progress", "plain"])
    assert result.exit_code == 2, result.output
    assert "--steps 2 does not fit the PNDMScheduler scheduler (it needs at least 4)" in result.stderr
    assert "loading" not in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("*.png"))


# a check dalle batch makes before the model loads: (a row added to the prompt file, options, the message)
BATCH_USAGE_ERRORS = {
    "init image": ('{"prompt": "a cat", "image": "notes.txt"}\n', [], "line 2: image"),
    "scheduler": ("", ["--steps", "2"], "--steps 2 does not fit the PNDMScheduler scheduler"),
}


@pytest.mark.parametrize("problem", BATCH_USAGE_ERRORS)
def test_a_batch_usage_error_writes_nothing_into_a_new_or_resumed_folder(tiny_pipeline, tmp_path, problem):
    """#18 leftovers: BatchRun.start wrote the manifest header (creating the folder) before its size, task and
    scheduler checks, so a batch that exited 2 left a manifest.jsonl (and a copy of prompts read from stdin)
    behind. A new folder is not created; a resumed folder keeps its files as they were, the manifest
    byte-identical."""
    from typer.testing import CliRunner

    from dallecli.cli.app import app

    row, options, message = BATCH_USAGE_ERRORS[problem]
    model = _with_prk_warm_up(tiny_pipeline, tmp_path / "prk")
    (tmp_path / "notes.txt").write_text("not an image")
    prompts = '{"prompt": "a cat"}\n'

    def batch(out, *extra):  # from stdin: a run keeps a copy of the prompts beside its manifest
        return CliRunner().invoke(app, ["batch", "-", "--input-format", "jsonl", "--model", str(model), "--width",
                                        "32", "--height", "32", "--seed", "5", "--steps", "4", "--progress", "plain",
                                        "--out", str(out), *extra], input=prompts)

    resumed = tmp_path / "resumed"
    assert batch(resumed).exit_code == 0
    before = {path.name: path.read_bytes() for path in resumed.iterdir()}
    prompts += row
    for out in (tmp_path / "new" / "out", resumed):
        result = batch(out, *options)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "loading" not in result.stderr
    assert not (tmp_path / "new").exists()
    assert {path.name: path.read_bytes() for path in resumed.iterdir()} == before
