"""Image to image (``dalle generate --image``), ``dalle variations`` and the input loader they share with training:
strength, EXIF orientation, sizes, metadata, ``--from`` replay, batch rows, models that cannot do the task."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dallecli.engine.generate import Engine
from dallecli.engine.request import GenerationRequest, denoising_problem, effective_steps, smallest_steps
from dallecli.errors import UsageError
from dallecli.training import shapes

PROMPT = "a red circle on a white background"


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def dalle(*args: str):
    """Run a dalle command in this process (so monkeypatches apply); returns click's Result."""
    from dallecli.cli.app import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def embedded():
    return Engine(None)


@pytest.fixture(scope="module")
def drawn(embedded, tmp_path_factory):
    """A text-to-image picture of the embedded model (seed 1) written to a PNG (read-only), and the result."""
    result = next(embedded.generate(GenerationRequest(PROMPT, seed=1)))
    path = tmp_path_factory.mktemp("drawn") / "drawn.png"
    result.image.save(path)
    return path, result


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any weight load fail the test: usage checks must all run before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("dallecli.engine.generate.load_pipeline", refuse)


# -- strength ---------------------------------------------------------------------------------------------
def test_strength_one_equals_text_to_image_with_the_same_seed(embedded, drawn):
    path, txt = drawn
    other = next(embedded.generate(GenerationRequest("a blue square on a black background", seed=5)))
    other_path = path.with_name("other.png")
    other.image.save(other_path)
    result = next(embedded.generate(GenerationRequest(PROMPT, seed=1, image=str(other_path), strength=1.0)))
    assert np.array_equal(np.asarray(result.image), np.asarray(txt.image))  # the input is discarded by construction
    assert (result.settings.task, result.settings.strength) == ("img2img", 1.0)


def test_low_strength_stays_close_to_the_input_and_runs_int_steps_x_strength(embedded, drawn):
    path, txt = drawn
    steps_seen = []
    result = next(embedded.generate(GenerationRequest(PROMPT, seed=2, image=str(path), strength=0.1, steps=20),
                                    on_step=lambda step, total: steps_seen.append((step, total))))
    assert psnr(result.image, txt.image) >= 25
    assert steps_seen == [(1, 2), (2, 2)]  # int(20 x 0.1) = 2 denoising steps
    strong = next(embedded.generate(GenerationRequest(PROMPT, seed=2, image=str(path), strength=0.9)))
    assert psnr(strong.image, txt.image) < psnr(result.image, txt.image)


@pytest.mark.parametrize(("strength", "fewest"), [(0.05, 20), (0.1, 10), (0.3, 4), (0.999, 2), (1.0, 1)])
def test_smallest_steps(strength, fewest):
    assert smallest_steps(strength) == fewest
    assert int(fewest * strength) >= 1 and int((fewest - 1) * strength) < 1


def test_one_denoising_rule_worded_by_its_caller():
    """#18 leftovers: the CLI (validate_request) and the server (serve.checks.check_denoising) share one rule;
    only the names differ: the CLI's flags by default, the API's quoted fields."""
    assert denoising_problem(12, 0.05) == ("--strength 0.05 with 12 steps runs no denoising step (int(12 x 0.05) = 0); "
                                           "use --steps 20 or more, or a higher --strength")
    assert denoising_problem(2, 0.0001).endswith("; use a higher --strength")  # 10000 steps: over MAX_STEPS
    api = {"steps_name": "'steps'", "strength_name": "'denoising_strength'", "counted": "'steps'", "verb": "send"}
    assert denoising_problem(3, 0.01, **api) == (
        "'denoising_strength' 0.01 with 3 'steps' runs no denoising step (int(3 x 0.01) = 0); send 'steps' 100 or "
        "more, or a higher 'denoising_strength'")
    assert denoising_problem(20, 0.05) is None and denoising_problem(1, 1.0, **api) is None


def test_strength_times_steps_below_one_exits_2_before_the_model_loads(drawn, no_model_load):
    done = dalle("generate", PROMPT, "--image", str(drawn[0]), "--strength", "0.05")  # default 12 steps
    assert done.exit_code == 2
    assert "use --steps 20 or more" in done.output and "int(12 x 0.05) = 0" in done.output
    for bad in ("0", "1.5", "nan"):
        done = dalle("generate", PROMPT, "--image", str(drawn[0]), "--strength", bad)
        assert done.exit_code == 2 and "--strength must be above 0 and at most 1" in done.output
    done = dalle("generate", PROMPT, "--strength", "0.5")
    assert done.exit_code == 2 and "needs an init image" in done.output


def test_effective_steps():
    assert effective_steps(GenerationRequest("x", steps=12, image="a.png", strength=0.6)) == 7
    assert effective_steps(GenerationRequest("x", steps=12)) == 12


# -- inputs cleaned like training images ------------------------------------------------------------------
def _upright_scene():
    """64x32: red on the left half, blue on the right; what an Orientation=6 JPEG must turn into."""
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32] = (220, 30, 30)
    array[:, 32:] = (35, 70, 225)
    return Image.fromarray(array)


def _orientation_6_jpeg(path):
    """Store the upright scene rotated a quarter turn anticlockwise, tagged Orientation=6 ("rotate 90 clockwise
    to display"): how a phone held upright writes it."""
    stored = _upright_scene().transpose(Image.Transpose.ROTATE_90)  # 32 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif)
    return path


def test_exif_orientation_6_jpeg_is_used_upright(embedded, tmp_path):
    from dallecli.engine.inputs import load_init_image, load_rgb

    path = _orientation_6_jpeg(tmp_path / "phone.jpg")
    assert Image.open(path).size == (32, 64)
    loaded = load_init_image(path)
    assert loaded.size == (64, 32)
    assert psnr(loaded.rgb, _upright_scene()) > 30
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(loaded.rgb))  # the loader training uses too
    result = next(embedded.generate(GenerationRequest("a red square", seed=0, image=str(path), strength=0.1)))
    assert result.image.size == (64, 32)
    pixels = np.asarray(result.image, dtype=float)
    left, right = pixels[:, 8:24].mean((0, 1)), pixels[:, 40:56].mean((0, 1))
    assert left[0] > left[2] + 80 and right[2] > right[0] + 80  # red stays left, blue right: upright


def test_rgba_palette_and_16_bit_inputs_become_rgb(tmp_path):
    from dallecli.engine.inputs import load_init_image

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:, :4, 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    loaded = load_init_image(tmp_path / "a.png")
    assert (np.asarray(loaded.rgb)[:, 4:] == 255).all() and loaded.alpha is not None  # composited on white
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert (np.asarray(load_init_image(tmp_path / "deep.png").rgb) == 255).all()  # scaled, not clipped
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert load_init_image(tmp_path / "c.jpg").rgb.mode == "RGB"


def test_size_not_a_multiple_of_8_is_rounded_with_a_note(embedded, tmp_path):
    Image.new("RGB", (61, 67), (128, 128, 128)).save(tmp_path / "odd.png")
    result = next(embedded.generate(GenerationRequest("a red circle", seed=0, image=str(tmp_path / "odd.png"),
                                                      strength=0.5)))
    assert result.image.size == (64, 64)
    assert any("61x67" in w and "64x64" in w for w in result.warnings)
    sized = next(embedded.generate(GenerationRequest("a red circle", seed=0, image=str(tmp_path / "odd.png"),
                                                     strength=0.5, width=32, height=32)))
    assert sized.image.size == (32, 32) and not any("61x67" in w for w in sized.warnings)


def test_unreadable_or_missing_input_is_a_usage_error_naming_the_file(tmp_path, no_model_load):
    (tmp_path / "notes.png").write_text("not an image")
    done = dalle("generate", PROMPT, "--image", str(tmp_path / "notes.png"))
    assert done.exit_code == 2 and "notes.png is not a readable image" in done.output
    done = dalle("variations", str(tmp_path / "gone.png"))
    assert done.exit_code == 2 and "gone.png does not exist" in done.output


# -- models that cannot do the task -----------------------------------------------------------------------
def test_task_table_follows_diffusers_autopipeline():
    from diffusers.pipelines import auto_pipeline

    from dallecli.engine.tasks import TASK_PIPELINES

    for name, (image_to_image, inpaint) in TASK_PIPELINES.items():
        for mapping, ours in ((auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, image_to_image),
                              (auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING, inpaint)):
            theirs = auto_pipeline._get_task_class(mapping, name, throw_error_if_not_exist=False)
            assert ours == (theirs.__name__ if theirs else None), name


def test_a_model_without_the_pipeline_cannot_do_edit_before_anything_loads(tmp_path, no_model_load):
    folder = tmp_path / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    for command in (["edit", str(tmp_path / "in.png"), "a cat", "--mask", str(tmp_path / "in.png")],
                    ["variations", str(tmp_path / "in.png")],
                    ["generate", "a cat", "--image", str(tmp_path / "in.png")]):
        done = dalle(*command, "--model", str(folder))
        assert done.exit_code == 2, done.output
        verb = {"edit": "edit", "variations": "variations", "generate": "image to image"}[command[0]]
        assert f"{folder} cannot do {verb}" in done.output and "PixArtSigmaPipeline" in done.output


# -- metadata and replay ----------------------------------------------------------------------------------
def test_metadata_and_from_replay_and_changed_input_refused(drawn, tmp_path):
    from dallecli.images import read_metadata

    source = tmp_path / "input.png"
    source.write_bytes(drawn[0].read_bytes())
    done = dalle("generate", "a blue circle on a white background", "--image", str(source), "--strength", "0.6",
                 "--seed", "4", "--out", str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    made = tmp_path / "out" / done.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    stored = read_metadata(made)
    import hashlib

    assert stored["init_image"] == {"path": str(source.resolve()),
                                    "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    assert (stored["task"], stored["strength"]) == ("img2img", 0.6)
    assert "Denoising strength: 0.6" in Image.open(made).text["parameters"]
    info = dalle("info", str(made))
    assert "init_image" in info.output and "strength" in info.output
    again = dalle("generate", "--from", str(made), "--out", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    replayed = next((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(replayed)), np.asarray(Image.open(made)))
    Image.new("RGB", (64, 64), "white").save(source)  # the input changes
    changed = dalle("generate", "--from", str(made), "--out", str(tmp_path / "again"))
    assert changed.exit_code == 2 and "has changed since the image was made" in changed.output
    source.unlink()
    missing = dalle("generate", "--from", str(made), "--out", str(tmp_path / "again"))
    assert missing.exit_code == 2 and "is missing" in missing.output


# -- variations -------------------------------------------------------------------------------------------
def test_variations_take_the_prompt_from_the_image_metadata(tmp_path):
    done = dalle("generate", "a green square on a black background", "--seed", "3", "--out", str(tmp_path / "a"))
    source = next((tmp_path / "a").glob("*.png"))
    done = dalle("variations", str(source), "-n", "2", "--seed", "7", "--out", str(tmp_path / "v"))
    assert done.exit_code == 0, done.output
    from dallecli.images import read_metadata

    made = sorted((tmp_path / "v").glob("*.png"))
    assert len(made) == 2
    stored = read_metadata(made[0])
    assert stored["prompt"] == "a green square on a black background"
    assert (stored["task"], stored["strength"], stored["seed"]) == ("variation", 0.6, 7)
    assert 15 < psnr(Image.open(made[0]), Image.open(source)) < 60  # like the input, not a copy of it


def test_variations_of_an_image_without_metadata_use_the_given_or_an_empty_prompt(tmp_path):
    shapes.render(shapes.Scene("triangle", "yellow", "gray", 30, 32, 32)).save(tmp_path / "plain.png")
    done = dalle("variations", str(tmp_path / "plain.png"), "--seed", "1", "--out", str(tmp_path / "v"))
    assert done.exit_code == 0, done.output
    from dallecli.images import read_metadata

    assert read_metadata(next((tmp_path / "v").glob("*.png")))["prompt"] == ""
    with pytest.raises(UsageError, match="the prompt is empty"):  # only variations may have no prompt
        Engine(None).plan(GenerationRequest("", image=str(tmp_path / "plain.png")))


# -- dalle batch ------------------------------------------------------------------------------------------
def test_batch_rows_with_image_and_strength_columns(drawn, tmp_path):
    folder = tmp_path / "job"
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "in.png").write_bytes(drawn[0].read_bytes())
    (folder / "prompts.csv").write_text("prompt,image,strength,seed\n"
                                        f"{PROMPT},inputs/in.png,1.0,1\n"
                                        "a blue square on a white background,,,2\n")
    done = dalle("batch", str(folder / "prompts.csv"), "--out", str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()][1:]
    by_row = {r["row"]: r for r in records}
    assert by_row[0]["init_image"] == str((folder / "inputs" / "in.png").absolute()) and by_row[0]["strength"] == 1.0
    assert by_row[1]["init_image"] is None
    first = np.asarray(Image.open(tmp_path / "out" / by_row[0]["path"]))
    assert np.array_equal(first, np.asarray(drawn[1].image))  # strength 1.0, seed 1: the text-to-image picture
    (folder / "bad.jsonl").write_text(json.dumps({"prompt": "a red circle", "image": "inputs/nope.png"}) + "\n")
    bad = dalle("batch", str(folder / "bad.jsonl"), "--dry-run")
    assert bad.exit_code == 2 and "line 1: image inputs/nope.png does not exist" in bad.output


def test_an_input_file_is_read_once_for_its_pixels_and_its_digest(tmp_path, monkeypatch):
    """#18 leftovers item 4: the image was decoded from one read and hashed from a second, so a file replaced
    in between recorded a SHA-256 of other bytes than the pixels used (and every input was read twice)."""
    import builtins
    import hashlib

    from PIL import Image

    from dallecli.engine.inputs import load_init_image, load_mask

    path = tmp_path / "in.png"
    Image.new("RGB", (16, 8), "red").save(path)
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(path):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    image = load_init_image(path)
    assert len(opened) == 1 and image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    mask = load_mask(path, (16, 8))
    assert len(opened) == 2 and mask.sha256 == image.sha256 and mask.path == path.resolve()
