"""`--clip-skip N` (AUTOMATIC1111 numbering: 1 = none, 2 = penultimate layer): validated, applied, recorded in both
metadata chunks, parsed back from A1111 text and replayed by `--from`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from dallecli.cli.app import app
from dallecli.engine.request import GenerationRequest, ImageSettings, validate_request
from dallecli.errors import UsageError
from dallecli.images import a1111_parameters, parse_a1111, read_metadata

SETTINGS = {"prompt": "a red circle", "negative_prompt": None, "seed": 3, "steps": 2, "guidance_scale": 4.0,
            "width": 32, "height": 32, "model": "tiny"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_a1111_text_round_trips_clip_skip():
    text = a1111_parameters({**SETTINGS, "clip_skip": 2}, "DDIM")
    assert text.endswith(", Model: tiny, Clip skip: 2")
    assert parse_a1111(text)["clip_skip"] == 2
    for off in (None, 1):
        assert "Clip skip" not in a1111_parameters({**SETTINGS, "clip_skip": off}, "DDIM")
    assert "clip_skip" not in parse_a1111(a1111_parameters(SETTINGS, "DDIM"))
    assert parse_a1111("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Clip skip: 2, "
                       "Model: x")["clip_skip"] == 2


def test_settings_write_clip_skip_only_when_a_layer_is_skipped():
    common = dict(prompt="p", negative_prompt=None, seed=1, steps=2, guidance_scale=1.0, width=8, height=8,
                  model="m", model_revision=None, scheduler="ddim", dtype="float32", device="cpu", version="0")
    assert "clip_skip" not in ImageSettings(**common).to_dict()
    assert ImageSettings(**common, clip_skip=2).to_dict()["clip_skip"] == 2


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_clip_skip_must_be_a_whole_number_from_one(value):
    with pytest.raises(UsageError, match="--clip-skip must be a whole number >= 1"):
        validate_request(GenerationRequest("p", clip_skip=value))
    validate_request(GenerationRequest("p", clip_skip=1))


def test_the_clip_skip_rule_is_field_problems_worded_by_its_caller():
    """#18 leftovers: the CLI and the server (serve.checks.check_settings) share field_problem's rule."""
    from dallecli.engine.request import field_problem

    assert field_problem("clip_skip", 0) == ("--clip-skip must be a whole number >= 1 (1 = no skip, 2 = penultimate "
                                             "layer; got 0)")
    assert field_problem("clip_skip", "2", label="Invalid value for 'clip_skip':") == (
        "Invalid value for 'clip_skip': must be a whole number >= 1 (1 = no skip, 2 = penultimate layer; got '2')")
    assert field_problem("clip_skip", 1) is None and field_problem("clip_skip", 2) is None


def test_cli_usage_errors_are_one_line_with_exit_2(tiny_pipeline, tmp_path):
    for command in (["generate", "a red circle"], ["batch", str(tmp_path / "p.txt")]):
        (tmp_path / "p.txt").write_text("a red circle\n")
        result = invoke(*command, "--model", str(tiny_pipeline), "--clip-skip", "0", "--out", str(tmp_path / "o"))
        assert result.exit_code == 2 and "--clip-skip must be a whole number >= 1" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    # the tiny text encoder has 2 layers: skipping 2 of them would leave none
    result = invoke("generate", "a red circle", "--model", str(tiny_pipeline), "--clip-skip", "3", "--steps", "2",
                    "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "use 1 to 2" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_pipeline_without_clip_skip_is_a_usage_error(tiny_pipeline, tmp_path, monkeypatch):
    """Told from model_index.json's pipeline class, before anything loads."""
    import shutil

    import dallecli.engine.generate as generate
    from dallecli.engine.generate import Engine

    folder = shutil.copytree(tiny_pipeline, tmp_path / "no-clip-skip")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtSigmaPipeline"}))
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the check"))
    engine = Engine(str(folder), "cpu", "float32")
    engine.check_clip_skip(1)  # off: nothing to pass
    with pytest.raises(UsageError, match="PixArtSigmaPipeline has no clip skip"):
        engine.check_clip_skip(2)


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_a_clip_skip_the_model_cannot_apply_exits_2_before_loading(tiny_pipeline, tmp_path, monkeypatch, command):
    """#18 leftovers item 6: the layer count was checked on the loaded pipeline, so "loading model" came first."""
    import dallecli.engine.generate as generate

    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the check"))
    (tmp_path / "p.txt").write_text("a red circle\n")
    target = ["a red circle"] if command == "generate" else [str(tmp_path / "p.txt")]
    result = invoke(command, *target, "--model", str(tiny_pipeline), "--clip-skip", "3", "--steps", "2",
                    "--out", str(tmp_path / "o"), "--progress", "plain")
    assert result.exit_code == 2 and "would skip every layer" in result.stderr and "use 1 to 2" in result.stderr
    assert "loading" not in result.stderr, result.stderr


def test_clip_skip_changes_the_image_records_and_replays(tiny_pipeline, tmp_path):
    common = ["--model", str(tiny_pipeline), "--steps", "2", "--seed", "7", "--json"]
    images = {}
    for skip in ("1", "2"):
        result = invoke("generate", "a red circle on blue", "--clip-skip", skip, "--out", str(tmp_path / skip), *common)
        assert result.exit_code == 0, result.output
        images[skip] = Path(json.loads(result.stdout)["images"][0]["path"])
    default = invoke("generate", "a red circle on blue", "--out", str(tmp_path / "none"), *common)
    pixels = {k: np.asarray(Image.open(v)) for k, v in images.items()}
    assert np.array_equal(pixels["1"], np.asarray(Image.open(json.loads(default.stdout)["images"][0]["path"])))
    assert not np.array_equal(pixels["1"], pixels["2"])
    assert "clip_skip" not in read_metadata(images["1"])
    stored = read_metadata(images["2"])
    assert stored["clip_skip"] == 2
    with Image.open(images["2"]) as image:
        assert "Clip skip: 2" in image.text["parameters"] and json.loads(image.text["dalle"])["clip_skip"] == 2
    replay = invoke("generate", "--from", str(images["2"]), "--out", str(tmp_path / "again"), "--json")
    assert replay.exit_code == 0, replay.output
    again = Path(json.loads(replay.stdout)["images"][0]["path"])
    assert np.array_equal(np.asarray(Image.open(again)), pixels["2"]) and read_metadata(again)["clip_skip"] == 2
    # an AUTOMATIC1111 image's "Clip skip: 2" replays too
    a1111 = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", f"a red circle on blue\nSteps: 2, Sampler: DDIM, CFG scale: {stored['guidance_scale']:g}, "
                                f"Seed: 7, Size: 32x32, Model: {tiny_pipeline}, Clip skip: 2")
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    replay = invoke("generate", "--from", str(a1111), "--out", str(tmp_path / "a1111"), "--json")
    assert replay.exit_code == 0, replay.output
    again = Path(json.loads(replay.stdout)["images"][0]["path"])
    assert np.array_equal(np.asarray(Image.open(again)), pixels["2"])


def test_batch_applies_and_records_clip_skip(tiny_pipeline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on blue\n")
    result = invoke("batch", str(prompts), "--model", str(tiny_pipeline), "--steps", "2", "--seed", "7",
                    "--clip-skip", "2", "--out", str(tmp_path / "run"), "--json")
    assert result.exit_code == 0, result.output
    image = next((tmp_path / "run").glob("*.png"))
    stored = read_metadata(image)
    assert stored["clip_skip"] == 2
    replay = invoke("generate", "--from", str(image), "--out", str(tmp_path / "again"), "--json")
    again = Path(json.loads(replay.stdout)["images"][0]["path"])
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(image)))
    manifest = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[-1]["clip_skip"] == 2
