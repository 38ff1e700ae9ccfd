"""LoRA fine-tuning on the tiny pipeline (32x32): output file, samples, resume, NaN stop (C20), the LoRA's effect."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import DATA, run_dalle
from dallecli import __version__

PHOTOS = DATA / "photos"
CAPTION = (PHOTOS / "chelsea.txt").read_text(encoding="utf-8").strip()


def _config(model, output, **overrides):
    from dallecli.training.finetune import FinetuneConfig

    settings = dict(data_dir=PHOTOS, output=output, model=str(model), steps=6, learning_rate=1e-3, seed=0)
    settings.update(overrides)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
    """One 6-step LoRA run on the six photos (checkpoint every 3 steps, one sample at the end, kohya export)."""
    from dallecli.training.finetune import FinetuneHooks, finetune

    reports = []
    output = tmp_path_factory.mktemp("finetune") / "photos-lora"
    result = finetune(_config(tiny_pipeline, output, save_every=3, sample_prompts=(CAPTION,), sample_every=6,
                              export_kohya=True), FinetuneHooks(step=reports.append))
    return result, reports


def test_lora_file_keys_metadata_checkpoints_and_samples(trained, tiny_pipeline):
    result, reports = trained
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    assert result.lora == result.output / "lora.safetensors" and result.steps_per_second > 0
    with safe_open(str(result.lora), framework="pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("unet.") and ".lora" in k for k in keys)
    assert any(".to_out.0." in k for k in keys) and any(".to_q." in k for k in keys)
    assert meta["base_model"] == str(tiny_pipeline)
    assert (meta["rank"], meta["alpha"], meta["steps"], meta["resolution"], meta["images"]) == ("4", "4", "6", "32", "6")
    assert meta["tool_version"] == __version__
    with safe_open(str(result.kohya), framework="pt") as handle:
        assert all(k.startswith("lora_unet_") for k in handle.keys())
    assert sorted(p.name for p in (result.output / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    assert len(result.samples) == 1 and result.samples[0].parent.name == "step-0000006"
    assert not list(result.output.rglob(".tmp*"))
    # training flushed denormal floats to zero; the process-wide setting did not outlive it (images generated
    # later in the same process otherwise changed: a tiny random UNet's output moved by up to 123 levels)
    assert torch.tensor(1e-40).mul(1.0).item() > 0
    # plain diffusers takes the file as is
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, use_safetensors=True)
    pipe.load_lora_weights(str(result.lora), adapter_name="mine")
    assert "mine" in pipe.get_list_adapters()["unet"]


def test_lora_changes_the_trained_caption_and_grows_with_scale(trained, tiny_pipeline):
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest, LoraSpec

    result, _ = trained
    engine = Engine(str(tiny_pipeline), "cpu", "float32")

    def pixels(*loras):
        image = next(engine.generate(GenerationRequest(CAPTION, seed=0, steps=2, loras=tuple(loras))))
        return np.asarray(image.image).astype(np.int32), image.settings.loras

    base, none = pixels()
    off, _ = pixels(LoraSpec(str(result.lora), 0.0))
    one, recorded = pixels(LoraSpec(str(result.lora), 1.0))
    two, _ = pixels(LoraSpec(str(result.lora), 2.0))
    kohya, _ = pixels(LoraSpec(str(result.kohya), 1.0))
    again, _ = pixels()
    assert none == [] and np.array_equal(off, base) and np.array_equal(again, base)
    effect_one, effect_two = np.abs(one - base).mean(), np.abs(two - base).mean()
    assert 0 < effect_one < effect_two
    assert np.abs(kohya - one).max() <= 1  # same LoRA in the kohya layout
    assert recorded[0]["scale"] == 1.0 and recorded[0]["tensors"] > 0


def test_resume_runs_only_the_remaining_steps_and_matches_an_uninterrupted_run(tiny_pipeline, tmp_path):
    from dallecli.training.finetune import finetune

    straight = finetune(_config(tiny_pipeline, tmp_path / "straight", steps=4, save_every=2))
    finetune(_config(tiny_pipeline, tmp_path / "resumed", steps=2, save_every=2))  # "interrupted" after 2
    refused = run_dalle("finetune", str(PHOTOS), "--model", str(tiny_pipeline), "--output", str(tmp_path / "resumed"),
                        "--steps", "4")
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_dalle("finetune", str(PHOTOS), "--model", str(tiny_pipeline), "--output", str(tmp_path / "resumed"),
                        "--steps", "4", "--save-every", "2", "--learning-rate", "1e-3", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 2" in resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["resumed_from"], summary["steps_run"], summary["steps"]) == (2, 2, 4)
    a, b = load_file(straight.lora), load_file(summary["lora"])
    assert a.keys() == b.keys()
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)


def _nan_from_step(monkeypatch, bad_step: int):
    import torch

    from dallecli.training.trainer import DenoiserTrainer

    original = DenoiserTrainer._loss

    def loss(self, latents, ids):
        value = original(self, latents, ids)
        return value * torch.tensor(float("nan")) if self.step + 1 >= bad_step else value

    monkeypatch.setattr(DenoiserTrainer, "_loss", loss)


def test_nan_loss_stops_at_its_step_and_nothing_is_saved_after(tiny_pipeline, tmp_path, monkeypatch):
    """C20."""
    from dallecli.errors import TrainingDivergedError
    from dallecli.training.finetune import finetune

    _nan_from_step(monkeypatch, 3)
    output = tmp_path / "out"
    with pytest.raises(TrainingDivergedError, match=r"at step 3.*--learning-rate"):
        finetune(_config(tiny_pipeline, output, save_every=1))
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert not (output / "lora.safetensors").exists() and not (output / "training.json").exists()

    from dallecli.cli.app import app

    cli_out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["finetune", str(PHOTOS), "--model", str(tiny_pipeline), "--output",
                                      str(cli_out), "--steps", "5", "--json"])
    assert result.exit_code == 1
    assert "at step 3" in result.stderr and "Lower --learning-rate" in result.stderr
    assert result.stdout == ""
    assert not (cli_out / "lora.safetensors").exists()


def test_full_finetune_writes_a_loadable_pipeline(tiny_pipeline, tmp_path):
    """--full (with bf16 autocast and a random crop): every UNet weight trains; the result is a pipeline folder."""
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest
    from dallecli.training.finetune import finetune

    result = finetune(_config(tiny_pipeline, tmp_path / "full", steps=2, full=True, mixed_precision="bf16",
                              center_crop=False, flip=True))
    assert result.lora is None and (result.model / "model_index.json").exists()
    assert result.training_examples == 12  # six photos and their mirror images
    image = next(Engine(str(result.model), "cpu", "float32").generate(GenerationRequest("a cat", seed=0, steps=2)))
    assert image.image.size == (32, 32)


def test_text_encoder_lora_trains_saves_and_applies(tiny_pipeline, tmp_path):
    """--train-text-encoder: the LoRA holds text-encoder tensors and changes the image when applied."""
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest, LoraSpec
    from dallecli.training.finetune import finetune

    result = finetune(_config(tiny_pipeline, tmp_path / "te", steps=2, train_text_encoder=True))
    keys = list(load_file(result.lora))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    engine = Engine(str(tiny_pipeline), "cpu", "float32")

    def pixels(*loras):
        image = next(engine.generate(GenerationRequest(CAPTION, seed=0, steps=2, loras=tuple(loras))))
        return np.asarray(image.image).astype(np.int32)

    base = pixels()
    assert np.abs(pixels(LoraSpec(str(result.lora), 1.0)) - base).mean() > 0
    assert np.array_equal(pixels(LoraSpec(str(result.lora), 0.0)), base)


def test_bad_options_fail_before_loading(tmp_path):
    result = run_dalle("finetune", str(PHOTOS), "--output", str(tmp_path / "o"), "--resolution", "30")
    assert result.returncode == 2 and "--resolution 30" in result.stderr
    result = run_dalle("finetune", str(PHOTOS), "--output", str(tmp_path / "o"), "--mixed-precision", "fp8")
    assert result.returncode == 2 and "--mixed-precision" in result.stderr


def _refuses_writes(folder: str) -> bool:
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return os.path.isdir(folder)
    os.close(fd)
    os.unlink(name)
    return False


def test_an_output_that_cannot_take_the_results_fails_before_the_data_is_read(tiny_pipeline, tmp_path):
    """#18 item 7: an output the run cannot write (a file where checkpoints/ or samples/ go, a folder where
    lora.safetensors goes, a folder that refuses new files though the access check passes) is exit 2 before the
    data is scanned; the old code scanned, loaded, encoded and trained first."""
    def run(output, *extra):
        return CliRunner().invoke(app, ["finetune", str(PHOTOS), "--model", str(tiny_pipeline), "--output",
                                        str(output), "--steps", "1", *extra])

    from dallecli.cli.app import app

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoints").write_text("a file")
    (tmp_path / "b" / "lora.safetensors").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "samples").write_text("a file")
    cases = [(tmp_path / "a", ()), (tmp_path / "b", ()), (tmp_path / "c", ("--sample-prompt", "a cat"))]
    if _refuses_writes("/sys/kernel"):  # passes os.access as root, refuses every new file
        cases.append((Path("/sys/kernel"), ()))
    for output, extra in cases:
        result = run(output, *extra)
        assert result.exit_code == 2, (output, result.output)
        assert "--output" in result.stderr and "captioned" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "b" / "samples").exists() and not list((tmp_path / "b").glob(".dalle-probe-*"))


def test_a_model_that_is_not_downloaded_fails_before_the_data_is_scanned(tmp_path):
    """#18 item 7: the model is resolved before the data folder is read (it was resolved after the scan)."""
    from dallecli.cli.app import app

    result = CliRunner().invoke(app, ["finetune", str(PHOTOS), "--model", "org/not-downloaded", "--output",
                                      str(tmp_path / "o")])
    assert result.exit_code == 1 and "not downloaded" in result.stderr
    assert "captioned" not in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel(tiny_pipeline, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): one run, one LoRA file, 2 processes reported."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is not installed next to this Python"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
               "-m", "dallecli", "finetune", str(PHOTOS), "--model", str(tiny_pipeline), "--output",
               str(tmp_path / "ddp"), "--steps", "3", "--batch-size", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert (tmp_path / "ddp" / "lora.safetensors").exists()
    assert done.stderr.count("6/6 images captioned") == 1  # only the main process reports


def test_lora_header_metadata_is_strings_and_is_built_before_training():
    """safetensors headers hold strings only; a number must not fail the save after the training (issue 18, item 10)."""
    import inspect

    from dallecli.training import finetune
    from dallecli.training.finetune_export import header_metadata

    header = header_metadata(rank=4, alpha=4.0, learning_rate=1e-4, flag=True, revision=None, name="x")
    assert header == {"rank": "4", "alpha": "4", "learning_rate": "0.0001", "flag": "true", "revision": "",
                      "name": "x"}
    with pytest.raises(TypeError, match="'bad' must be a string or a number, not list"):
        header_metadata(bad=[1])
    source = inspect.getsource(finetune)
    assert source.index("metadata = header_metadata(") < source.index("result = trainer.run(")


# -- #19 item 13 -------------------------------------------------------------------------------------------
def test_displayed_loss_is_a_bias_corrected_moving_average():
    from dallecli.training.trainer import LOSS_BETA, LossAverage

    average = LossAverage()
    assert LOSS_BETA == 0.98 and math.isnan(average.value)
    assert average.update(2.0) == pytest.approx(2.0, rel=1e-12)  # step 1 shows its own loss, not 0.04
    assert average.update(1.0) == pytest.approx((0.98 * 0.04 + 0.02) / (1 - 0.98 ** 2), rel=1e-12)  # 1.49495...
    steady = LossAverage()
    assert all(steady.update(0.25) == pytest.approx(0.25, rel=1e-12) for _ in range(60))  # no climb from 0
    restored = LossAverage()
    restored.load(average.state())
    assert restored.state() == {"beta": 0.98, "ema": pytest.approx(0.0592), "count": 2}
    assert restored.update(3.0) == average.update(3.0)
    restored.load(None)  # a checkpoint from before: the value in force is kept
    assert restored.count == 3


def test_displayed_loss_continues_exactly_across_a_resume(tiny_pipeline, tmp_path):
    from dallecli.training.checkpoint import list_checkpoints, load_checkpoint
    from dallecli.training.finetune import FinetuneHooks, finetune

    def run(output, steps, **extra):
        reports = []
        finetune(_config(tiny_pipeline, output, steps=steps, save_every=2, **extra), FinetuneHooks(step=reports.append))
        return [r.step for r in reports], [r.loss for r in reports]

    straight = run(tmp_path / "straight", 3)
    first = run(tmp_path / "resumed", 2)
    _, state = load_checkpoint(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1])
    assert state["loss_average"]["count"] == 2 and state["loss_average"]["beta"] == 0.98
    assert state["loss_average"]["ema"] / (1 - 0.98 ** 2) == pytest.approx(first[1][-1], rel=1e-9)
    resumed = run(tmp_path / "resumed", 3, resume=True)
    assert (straight[0], first[0], resumed[0]) == ([1, 2, 3], [1, 2], [3])
    assert first[1] == pytest.approx(straight[1][:2], rel=1e-6)
    assert resumed[1][0] == pytest.approx(straight[1][2], rel=1e-5)  # not restarted from step 3's own loss


def test_resume_without_a_checkpoint_and_a_batch_larger_than_the_data_say_so(tiny_pipeline, tmp_path):
    from dallecli.cli.app import app

    output = tmp_path / "o"
    result = CliRunner().invoke(app, ["finetune", str(PHOTOS), "--model", str(tiny_pipeline), "--output", str(output),
                                      "--steps", "1", "--resume", "--batch-size", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert f"--resume: no checkpoint in {output / 'checkpoints'}; starting from step 0" in result.stderr
    assert "--batch-size 8 is larger than the 6 training example(s)" in result.stderr
    assert json.loads(result.stdout)["resumed_from"] == 0
    quiet = CliRunner().invoke(app, ["finetune", str(PHOTOS), "--model", str(tiny_pipeline), "--output",
                                     str(tmp_path / "q"), "--steps", "1", "--batch-size", "6", "--flip"])
    assert quiet.exit_code == 0 and "--batch-size" not in quiet.stderr and "--resume" not in quiet.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be a whole number, at least 1 (got 0)"),
    (["--rank", "-2"], "--rank must be a whole number, at least 1 (got -2)"),
    (["--batch-size", "0"], "--batch-size must be a whole number, at least 1 (got 0)"),
    (["--gradient-accumulation", "0"], "--gradient-accumulation must be a whole number, at least 1 (got 0)"),
    (["--learning-rate", "-0.5"], "--learning-rate must be a number greater than 0, e.g. 1e-4 (got -0.5)"),
    (["--save-every", "-1"], "--save-every must be 0 (only at the end) or more (got -1)"),
    (["--alpha", "0"], "--alpha must be a number greater than 0 (got 0)"),
    (["--resolution", "0"], "--resolution 0 must be a multiple of 8, at least 8 (e.g. 512 or 768)"),
])
def test_out_of_range_options_say_the_range(tmp_path, args, message):
    from dallecli.cli.app import app

    result = CliRunner().invoke(app, ["finetune", str(PHOTOS), "--output", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert result.stderr == f"error: {message}\n"


def test_nan_advice_names_mixed_precision_only_when_it_is_on(tiny_pipeline, tmp_path, monkeypatch):
    from dallecli.errors import TrainingDivergedError
    from dallecli.training.finetune import finetune

    _nan_from_step(monkeypatch, 1)
    with pytest.raises(TrainingDivergedError) as plain:
        finetune(_config(tiny_pipeline, tmp_path / "no", steps=2))
    assert str(plain.value).endswith("Lower --learning-rate (now 0.001)") and "--mixed-precision" not in str(plain.value)
    with pytest.raises(TrainingDivergedError) as bf16:
        finetune(_config(tiny_pipeline, tmp_path / "bf16", steps=2, mixed_precision="bf16"))
    assert str(bf16.value).endswith("Lower --learning-rate (now 0.001) or use --mixed-precision no")


def test_ctrl_c_prints_the_command_that_resumes(tiny_pipeline, tmp_path, monkeypatch):
    from dallecli.cli.app import app
    from dallecli.training.trainer import DenoiserTrainer

    original = DenoiserTrainer._loss
    stop_at = [3]

    def loss(self, latents, ids):
        if self.step + 1 == stop_at[0]:
            raise KeyboardInterrupt
        return original(self, latents, ids)

    monkeypatch.setattr(DenoiserTrainer, "_loss", loss)
    output = tmp_path / "my out"
    args = ["finetune", str(PHOTOS), "--model", str(tiny_pipeline), "--output", str(output), "--steps", "4",
            "--save-every", "2"]
    monkeypatch.setattr(sys, "argv", ["dalle", *args])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"interrupted: the checkpoint of step 2 is kept in {output / 'checkpoints'}. Resume with: dalle finetune "
        f"{PHOTOS} --model {tiny_pipeline} --output '{output}' --steps 4 --save-every 2 --resume")
    stop_at[0] = 1
    monkeypatch.setattr(sys, "argv", ["dalle", *args[:5], str(tmp_path / "b"), "--steps", "4", "--resume"])
    fresh = CliRunner().invoke(app, sys.argv[1:])
    assert fresh.exit_code == 130 and fresh.stderr.count("--resume") == 2  # the notice, and the command once
    assert "interrupted: no checkpoint was written yet (--save-every N keeps one every N steps); dalle " in fresh.stderr
    assert fresh.stderr.strip().endswith("--steps 4 --resume starts again from step 0")


def test_a_full_model_keeps_its_base_models_generation_defaults(tmp_path):
    """A --full fine-tune of the embedded model (12 steps, guidance 4, 64 px) generates with 12 / 4 / 64, not the
    25 / 7 of an unregistered Stable Diffusion folder."""
    from dallecli.engine.generate import Engine
    from dallecli.engine.loading import recorded_defaults
    from dallecli.training.finetune import FinetuneConfig, finetune

    result = finetune(FinetuneConfig(data_dir=PHOTOS, output=tmp_path / "full", steps=1, full=True))  # embedded
    assert json.loads((result.model / "training.json").read_text())["generation_defaults"] == {
        "steps": 12, "guidance": 4.0, "width": 64, "height": 64}
    assert Engine(str(result.model), "cpu", "float32").defaults() == {"steps": 12, "guidance": 4.0, "width": 64,
                                                                     "height": 64}
    (tmp_path / "junk").mkdir()
    for junk in ({"generation_defaults": {"steps": "12"}}, {"generation_defaults": {"steps": 0}}, [1], {}):
        (tmp_path / "junk" / "training.json").write_text(json.dumps(junk))
        assert recorded_defaults(tmp_path / "junk") is None
