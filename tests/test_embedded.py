"""The shipped embedded model: it loads with plain diffusers, and follows a simple prompt."""

import json

import numpy as np
import pytest

from dallecli.engine.generate import Engine
from dallecli.engine.request import GenerationRequest
from dallecli.store.resolve import embedded_model_path
from dallecli.training.adherence import detect


def test_embedded_model_is_safetensors_and_small():
    folder = embedded_model_path()
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    assert sum(p.stat().st_size for p in weights) <= 25 * 1024 * 1024
    record = json.loads((folder / "training.json").read_text())
    for key in ("steps", "batch_size", "wall_time_s", "data_seed", "code_version"):
        assert key in record


def test_loads_with_plain_diffusers():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(embedded_model_path(), use_safetensors=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.tokenizer.model_max_length == 32


def test_the_embedded_models_defaults_are_recorded():
    """The fast half of the red-circle test (#18 item 13: its picture checks run with the slow set)."""
    engine = Engine(None)
    [result] = engine.generate(GenerationRequest("a large red circle on a white background", seed=0, steps=2))
    settings = result.settings
    assert result.image.size == (64, 64) and engine.defaults()["steps"] == 12
    assert (settings.model, settings.steps, settings.width, settings.seed) == ("shapes", 2, 64, 0)


@pytest.mark.slow
def test_red_prompt_gives_a_red_circle_with_metadata():
    """Model quality (#18 item 13: slow): the detector finds the prompted colour and background."""
    engine = Engine(None)
    results = list(engine.generate(GenerationRequest("a large red circle on a white background", num_images=2, seed=0)))
    for result in results:
        assert result.image.size == (64, 64)
        found = detect(result.image)
        assert (found.colour, found.background) == ("red", "white")
        pixels = np.asarray(result.image, dtype=np.float32)
        centre = pixels[24:40, 24:40].reshape(-1, 3).mean(axis=0)
        assert centre[0] > 150 and centre[1] < 100 and centre[2] < 100  # mostly red in the middle
    settings = results[0].settings
    assert (settings.model, settings.steps, settings.width, settings.seed) == ("shapes", 12, 64, 0)


@pytest.mark.slow
def test_position_words_move_the_object():
    """Model quality (#18 item 13: slow): the detector finds the object where the prompt puts it."""
    # same seeds, only the position words differ: the starting noise must not decide where the object goes
    engine = Engine(None)
    found = {}
    for where in ("top left", "bottom right"):
        request = GenerationRequest(f"a small blue square in the {where} corner on a white background",
                                    num_images=3, seed=11)
        found[where] = [detect(r.image).position for r in engine.generate(request)]
    assert found == {"top left": ["top left"] * 3, "bottom right": ["bottom right"] * 3}


def test_unknown_words_do_not_crash():
    engine = Engine(None)
    [result] = engine.generate(GenerationRequest("a zebra astronaut 東京 ★", seed=1))
    assert result.image.size == (64, 64)


@pytest.mark.slow
def test_adherence_in_distribution():
    from dallecli.training.adherence import evaluate

    result = evaluate(None, per_category=30)
    assert result["in_distribution"]["colour"]["accuracy"] >= 0.9
    assert result["in_distribution"]["shape"]["accuracy"] >= 0.85
    assert result["in_distribution"]["position"]["accuracy"] >= 0.8


def test_words_the_embedded_model_does_not_know_are_named_once_and_recorded(tmp_path):
    """Issue 15: "a cat astronaut" on the shapes model says what it does not know and how to get a real model."""
    from PIL import Image
    from typer.testing import CliRunner

    from dallecli.cli.app import app
    from dallecli.engine.known_words import training_vocabulary, unknown_words
    from dallecli.training import shapes

    words, subject = training_vocabulary(embedded_model_path())
    assert set(shapes.SHAPES) | {"small", "large", "background", "left", "corner"} <= words and "shapes" in subject
    assert unknown_words("A small Red circle, top-left, on a white background!", words) == []
    assert unknown_words("a cat astronaut riding a cat on the moon", words) == ["cat", "astronaut", "riding", "moon"]

    result = CliRunner().invoke(app, ["generate", "a cat astronaut", "-n", "2", "--steps", "2", "--seed", "1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "does not know" in line]
    assert len(warnings) == 1 and "does not know: cat, astronaut" in warnings[0]
    assert "dalle download sd-turbo" in warnings[0]
    for path in result.stdout.split():
        assert json.loads(Image.open(path).text["dalle"])["unknown_words"] == ["cat", "astronaut"]
    known = CliRunner().invoke(app, ["generate", "a red circle on a blue background", "--steps", "2", "--seed", "1",
                                     "--out", str(tmp_path / "known")])
    assert known.exit_code == 0 and "does not know" not in known.stderr
    assert "unknown_words" not in json.loads(Image.open(known.stdout.strip()).text["dalle"])


def test_batch_names_unknown_words_once_for_the_run(tmp_path):
    from typer.testing import CliRunner

    from dallecli.cli.app import app

    (tmp_path / "p.txt").write_text("a cat astronaut\na red circle\na dog and a cat\n")
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "p.txt"), "--steps", "2", "--seed", "1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "does not know" in line]
    assert len(warnings) == 1 and "does not know: cat, astronaut, dog." in warnings[0]
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len([r for r in records if r.get("status") == "done"]) == 3


def test_a_size_far_from_the_models_own_gets_one_warning(tmp_path):
    """#19 item 10: 512x512 on the 64-pixel embedded model draws tiled nonsense; say so once."""
    engine = Engine()
    _, far = engine.prompt_warnings(GenerationRequest("a red circle", width=512, height=512))
    assert len(far) == 1 and "512x512 is far from the 64x64 shapes was trained at" in far[0]
    assert "leave out --width/--height" in far[0]
    # the size of an init image: the advice is to give a size, not to leave one out
    from PIL import Image

    Image.new("RGB", (512, 512), "white").save(tmp_path / "big.png")
    big = GenerationRequest("a red circle", width=512, height=512, image=str(tmp_path / "big.png"))
    _, from_image = engine.prompt_warnings(big)
    assert "give --width/--height near it: the input image is resized to them" in from_image[0]
    for width, height in ((64, 64), (96, 64), (64, 120)):
        _, near = engine.prompt_warnings(GenerationRequest("a red circle", width=width, height=height))
        assert near == [], (width, height)
    _, tall = engine.prompt_warnings(GenerationRequest("a red circle", width=64, height=128))
    assert len(tall) == 1


def test_the_shipped_text_encoders_are_in_the_hub_key_layout_every_transformers_loads():
    """transformers 5 saves a CLIPTextModel without the `text_model.` prefix, which transformers 4.x and early 5.x
    read as missing weights (a random text encoder, only a warning); the shipped ones use the Hub layout."""
    from safetensors import safe_open

    from dallecli.store.resolve import embedded_model_path

    for folder in [embedded_model_path() / "text_encoder"]:
        with safe_open(folder / "model.safetensors", "pt") as handle:
            keys = list(handle.keys())
        assert keys and all(key.startswith("text_model.") for key in keys), folder


def test_write_hub_layout_rewrites_a_fresh_text_encoder_that_loads_to_the_same_outputs(tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from dallecli.training.clip_layout import write_hub_layout

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100, bos_token_id=0, eos_token_id=1))
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert write_hub_layout(tmp_path) is True
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert all(key.startswith("text_model.") for key in handle.keys()) and handle.metadata() == {"format": "pt"}
    assert write_hub_layout(tmp_path) is False  # already in the layout: left alone
    ids = torch.tensor([[0, 5, 9, 1]])
    with torch.no_grad():
        loaded = CLIPTextModel.from_pretrained(tmp_path, use_safetensors=True).eval()(ids).last_hidden_state
        assert torch.equal(loaded, model.eval()(ids).last_hidden_state)
