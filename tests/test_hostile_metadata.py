"""Images and files from anyone (issue 18, items 5 and 6): metadata cannot drive the terminal or crash dalle."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from conftest import run_dalle


def _png(path, **chunks):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8), "blue").save(path, pnginfo=info)
    return path


def _settings(**changes) -> str:
    settings = {"prompt": "a red circle", "negative_prompt": None, "seed": 3, "steps": 2, "guidance_scale": 4.0,
                "width": 64, "height": 64, "model": "shapes", "scheduler": "default"}
    return json.dumps({**settings, **changes})


def test_printable_escapes_terminal_controls_and_keeps_lines():
    from dallecli.cli.console import printable

    assert printable("a\x1b]0;pwned\x07b") == "a\\x1b]0;pwned\\x07b"
    assert printable("left\u202eright") == "left\\u202eright"
    assert printable("csi\x9b31m") == "csi\\x9b31m"
    assert printable("two\nlines\tand tab") == "two\nlines\tand tab"
    assert printable("carriage\rreturn") == "carriage\\rreturn"


def test_info_cannot_set_the_terminal_title_and_json_stays_exact(tmp_path):
    hostile = "a\x1b]0;pwned\x07 red \x1b[31mcircle\u202e \x9b2J"
    path = _png(tmp_path / "hostile.png", dalle=_settings(prompt=hostile, negative_prompt="[red] (blue:1.2)"))
    shown = run_dalle("info", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout and "\u202e" not in shown.stdout
    assert "\x9b" not in shown.stdout
    assert "a\\x1b]0;pwned\\x07 red \\x1b[31mcircle\\u202e \\x9b2J" in shown.stdout
    assert "[red] (blue:1.2)" in shown.stdout  # brackets are text, not Rich markup
    as_json = run_dalle("info", str(path), "--json")
    assert "\x1b" not in as_json.stdout and "\x9b" not in as_json.stdout
    assert json.loads(as_json.stdout)["prompt"] == hostile


@pytest.mark.parametrize("chunk, expected", [
    ("[1, 2, 3]", "a JSON list, not an object"),
    ('"just text"', "a JSON str, not an object"),
    (_settings(seed="abc"), 'seed is "abc"'),
    (_settings(steps=True), "steps is true"),
    (_settings(prompt=["a", "b"]), "prompt is"),
    (_settings(loras=[1]), "loras holds a non-object"),
])
def test_damaged_dalle_chunk_is_one_usage_error_for_info_and_from(tmp_path, chunk, expected):
    path = _png(tmp_path / "odd.png", dalle=chunk)
    for args in (("info", str(path)), ("generate", "--from", str(path))):
        result = run_dalle(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_error_lines_escape_controls_from_the_prompt_file(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle", "steps": "\\u001b]0;pwned\\u0007"}\n', encoding="utf-8")
    result = run_dalle("batch", str(prompts), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "\\x1b]0;pwned" in result.stderr


def test_a1111_checkpoint_name_resolves_to_the_registry_model():
    from dallecli.store.registry import canonical_name

    assert canonical_name("v1-5-pruned-emaonly")[0] == "sd-1.5"
    assert canonical_name("sd_xl_base_1.0")[0] == "sdxl"
    assert canonical_name("sd_turbo")[0] == "sd-turbo"
    assert "AUTOMATIC1111" in canonical_name("V1-5-Pruned")[1]
    assert canonical_name("dreamshaper_8") == ("dreamshaper_8", None)


def test_an_a1111_image_names_its_checkpoint_and_unknown_names_list_the_registry(tmp_path):
    known = _png(tmp_path / "a1111.png", parameters="a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, "
                 "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")
    result = run_dalle("generate", "--from", str(known))
    assert result.returncode == 1 and "dalle download sd-1.5" in result.stderr, result.stderr
    unknown = _png(tmp_path / "other.png", parameters="a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, "
                   "Size: 512x512, Model: dreamshaper_8")
    result = run_dalle("generate", "--from", str(unknown))
    assert result.returncode == 2 and "sd-turbo" in result.stderr and "shapes" in result.stderr, result.stderr


def test_a1111_parameters_written_are_read_back_field_by_field():
    """#18 leftovers item 5: the writer and the reader of the A1111 ``parameters`` text share one table of fields
    (images.A1111_FIELDS); every field written, optional ones included, reads back to the same setting."""
    from dallecli.images import A1111_FIELDS, a1111_parameters, parse_a1111

    settings = {"prompt": "a red circle,\nby the sea", "negative_prompt": "blurry, dark", "steps": 30,
                "guidance_scale": 7.5, "seed": 4242, "width": 640, "height": 384, "model": "sd-1.5",
                "clip_skip": 2, "strength": 0.6}
    text = a1111_parameters(settings, "DPM++ 2M Karras")
    labels = [part.split(":")[0] for part in text.splitlines()[-1].split(", ")]
    assert labels == [label for label, _, _ in A1111_FIELDS]
    read = parse_a1111(text)
    assert read == {**settings, "sampler": "DPM++ 2M Karras"}
    plain = a1111_parameters({**settings, "negative_prompt": None, "clip_skip": 1, "strength": None}, "Euler")
    assert "Negative prompt" not in plain and "Clip skip" not in plain and "Denoising strength" not in plain
    assert parse_a1111(plain)["negative_prompt"] is None and "clip_skip" not in parse_a1111(plain)
