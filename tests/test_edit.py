"""``dalle edit`` (inpainting): the masked area is repainted with what the prompt asks for, every other pixel is
the input's own; masks from files, alpha channels and transparency; sizes; the registry's inpainting variant."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dallecli.engine.generate import Engine
from dallecli.engine.request import GenerationRequest
from dallecli.training import shapes
from dallecli.training.adherence import detect


def dalle(*args: str):
    from dallecli.cli.app import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def embedded():
    return Engine(None)


@pytest.fixture
def red_circle(tmp_path):
    """A red circle on white (64x64) and a mask over the circle's box (white = repaint), as files."""
    shapes.render(shapes.Scene("circle", "red", "white", 30, 32, 32)).save(tmp_path / "circle.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:56, 8:56] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "circle.png", tmp_path / "mask.png", mask >= 128


@pytest.mark.parametrize("seed", [0, 3])
def test_edit_repaints_the_masked_area_and_keeps_every_other_pixel(embedded, red_circle, seed):
    image, mask, repaint = red_circle
    result = next(embedded.generate(GenerationRequest("a blue square on a white background", seed=seed,
                                                      image=str(image), mask=str(mask))))
    before, after = np.asarray(Image.open(image)), np.asarray(result.image)
    assert np.array_equal(after[~repaint], before[~repaint])  # exactly as given
    assert not np.array_equal(after[repaint], before[repaint])  # repainted
    assert (result.settings.task, result.settings.strength) == ("inpaint", 1.0)
    assert result.settings.mask["path"] == str(mask.resolve())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])
def test_edit_repaints_the_masked_area_as_prompted(embedded, red_circle, seed):
    """Model quality (#18 item 13: slow): the detector finds the prompted shape in the repainted area."""
    image, mask, _ = red_circle
    result = next(embedded.generate(GenerationRequest("a blue square on a white background", seed=seed,
                                                      image=str(image), mask=str(mask))))
    found = detect(result.image)
    assert (found.colour, found.shape, found.background) == ("blue", "square", "white")


def test_edit_on_a_kl_vae_pipeline_keeps_unmasked_pixels_exactly(tiny_pipeline, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 200  # grey >= 128 repaints too
    mask[0, 0] = 127  # just below the threshold: kept
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = next(Engine(str(tiny_pipeline)).generate(GenerationRequest(
        "a red circle", seed=0, steps=2, image=str(tmp_path / "noise.png"), mask=str(tmp_path / "mask.png"),
        strength=0.8)))
    before, after = np.asarray(Image.open(tmp_path / "noise.png")), np.asarray(result.image)
    kept = mask < 128
    assert np.array_equal(after[kept], before[kept])
    assert not np.array_equal(after[~kept], before[~kept])


def test_rgba_image_without_a_mask_repaints_its_transparent_pixels(embedded, tmp_path):
    scene = np.asarray(shapes.render(shapes.Scene("square", "green", "white", 20, 16, 32)))
    rgba = np.dstack([scene, np.full((64, 64), 255, dtype=np.uint8)])
    rgba[:, 32:, 3] = 0  # the right half is transparent: repaint it
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    done = dalle("edit", str(tmp_path / "cut.png"), "a blue square on the right on a white background", "--seed",
                 "1", "--out", str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    assert "its transparent pixels are repainted" in done.output
    after = np.asarray(Image.open(next((tmp_path / "out").glob("*.png"))))
    assert np.array_equal(after[:, :32], scene[:, :32])
    right = after[:, 32:].reshape(-1, 3).astype(int)
    assert (right[:, 2] > right[:, 0] + 80).sum() > 50  # blue pixels were painted there


def test_mask_from_alpha_channel_and_opaque_rgba_mask(tmp_path):
    from dallecli.engine.inputs import load_mask

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, :3, 3] = 0  # transparent = repaint (OpenAI's edits)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert (np.asarray(load_mask(tmp_path / "alpha.png", (8, 8)).rgb)[:, :3] == 255).all()
    assert (np.asarray(load_mask(tmp_path / "alpha.png", (8, 8)).rgb)[:, 3:] == 0).all()
    opaque = np.zeros((8, 8, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    opaque[:, 5:, :3] = 255  # a black-and-white mask saved as RGBA: its grey levels count
    Image.fromarray(opaque, "RGBA").save(tmp_path / "bw.png")
    assert (np.asarray(load_mask(tmp_path / "bw.png", (8, 8)).rgb)[:, 5:] == 255).all()


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("dallecli.engine.generate.load_pipeline", refuse)


def test_mask_of_another_size_and_bad_masks_exit_2_before_loading(red_circle, tmp_path, no_model_load):
    image, _, _ = red_circle
    Image.new("L", (32, 64), 255).save(tmp_path / "small.png")
    done = dalle("edit", str(image), "a blue square", "--mask", str(tmp_path / "small.png"))
    assert done.exit_code == 2
    assert "is 32x64 but the image is 64x64" in done.output
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    done = dalle("edit", str(image), "a blue square", "--mask", str(tmp_path / "black.png"))
    assert done.exit_code == 2 and "nothing to repaint" in done.output
    done = dalle("edit", str(image), "a blue square")  # RGB without a mask
    assert done.exit_code == 2 and "give --mask" in done.output
    (tmp_path / "mask.txt").write_text("white")
    done = dalle("edit", str(image), "a blue square", "--mask", str(tmp_path / "mask.txt"))
    assert done.exit_code == 2 and "mask.txt is not a readable image" in done.output


def test_edit_replays_with_from_pixel_for_pixel(red_circle, tmp_path):
    image, mask, _ = red_circle
    done = dalle("edit", str(image), "a yellow triangle on a white background", "--mask", str(mask), "--seed", "2",
                 "--out", str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    made = next((tmp_path / "out").glob("*.png"))
    again = dalle("generate", "--from", str(made), "--out", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    replayed = next((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(replayed)), np.asarray(Image.open(made)))
    Image.new("L", (64, 64), 255).save(mask)  # the mask changes
    changed = dalle("generate", "--from", str(made), "--out", str(tmp_path / "again"))
    assert changed.exit_code == 2 and "the mask" in changed.output and "has changed" in changed.output


def test_inpainting_variant_used_when_downloaded_else_noted(tiny_pipeline):
    from types import SimpleNamespace

    engine = Engine(None)
    own = dataclasses.asdict(engine.model.spec)

    def with_variant(engine, alias):  # the registry entry with its ``inpaint`` field set to ``alias``
        engine.model = dataclasses.replace(engine.model, spec=SimpleNamespace(**{**own, "inpaint": alias}))

    with_variant(engine, "sd-1.5-inpainting")
    assert engine.for_task("inpaint") is engine  # not downloaded: the standard UNet
    assert any("sd-1.5-inpainting" in n and "dalle download sd-1.5-inpainting" in n for n in engine.notices)
    with_variant(engine, str(tiny_pipeline))
    variant = engine.for_task("inpaint")
    assert variant is not engine and variant.model.path == tiny_pipeline.resolve()
    assert engine.for_task("img2img") is engine  # only edits use the variant


@pytest.mark.slow
def test_edit_of_the_right_half_paints_the_prompted_shape_there_in_most_seeds(embedded, tmp_path):
    """Quality over seeds: a small red circle on the left, the right half masked, "a blue square on the right":
    the detector, run on the repainted half alone (the kept half blanked to the background), finds a blue square
    in at least 6 of 8 seeds (measured: 8 of 8), and the left half is the input's, exactly."""
    scene = shapes.render(shapes.Scene("circle", "red", "white", 20, 16, 32))
    scene.save(tmp_path / "left.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "right.png")
    hits = 0
    for seed in range(8):
        result = next(embedded.generate(GenerationRequest("a blue square on the right on a white background",
                                                          seed=seed, image=str(tmp_path / "left.png"),
                                                          mask=str(tmp_path / "right.png"))))
        after = np.asarray(result.image).copy()
        assert np.array_equal(after[:, :32], np.asarray(scene)[:, :32])
        after[:, :32] = 255
        found = detect(Image.fromarray(after))
        hits += (found.colour, found.shape) == ("blue", "square")
    assert hits >= 6
