"""File naming, atomic no-overwrite writes and PNG metadata. Cases C05, C06."""

import json
import os

from PIL import Image

import pytest

from dallecli.images import MAX_NAME_BYTES, image_name, parse_a1111, read_metadata, slugify, write_png

FORBIDDEN = set('/\\:*?"<>|') | {chr(c) for c in range(32)}


def settings(prompt="a red circle", seed=7, negative=None):
    return {"prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": 20, "guidance_scale": 4.0,
            "width": 64, "height": 64, "model": "shapes", "model_revision": "dallecli-0.1.0", "scheduler": "dpm++",
            "dtype": "float32", "device": "cpu", "version": "0.1.0", "loras": [], "truncation": None}


def test_long_prompt_name_is_short_and_full_prompt_in_metadata_case_c05(tmp_path):
    prompt = " ".join(f"word{i}" for i in range(200))
    path = write_png(Image.new("RGB", (8, 8)), tmp_path, settings(prompt), "DPM++ 2M")
    assert path.parent == tmp_path
    assert len(path.name.encode("utf-8")) <= MAX_NAME_BYTES
    assert read_metadata(path)["prompt"] == prompt


def test_hostile_prompt_gives_one_file_directly_in_folder_case_c06(tmp_path):
    prompt = 'knight (fate/zero) 東京 ★ ?:*"<>'
    out = tmp_path / "out"
    path = write_png(Image.new("RGB", (8, 8)), out, settings(prompt), "Euler")
    assert [p.name for p in out.iterdir()] == [path.name]
    assert not FORBIDDEN & set(path.name)
    assert "東京" in path.name
    assert path.name == "0000-7-knight-fate-zero-東京.png"


def test_slug_is_nfc_and_never_empty():
    assert slugify("e\u0301cole") == "\u00e9cole"
    assert slugify("?*?") == "image"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert len(slugify("東" * 100, max_bytes=10).encode()) <= 10


def test_never_overwrites_and_numbers_increase(tmp_path):
    tmp_path = tmp_path / "out"
    first = write_png(Image.new("RGB", (8, 8), "red"), tmp_path, settings(seed=1), "Euler")
    second = write_png(Image.new("RGB", (8, 8), "blue"), tmp_path, settings(seed=1), "Euler", index=0)
    assert first.name.startswith("0000-") and second.name.startswith("0001-")
    assert Image.open(first).getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])  # no temp files


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_png(Broken(), tmp_path / "out", settings(), "Euler")
    assert os.listdir(tmp_path / "out") == []


def test_metadata_round_trip_both_chunks(tmp_path):
    path = write_png(Image.new("RGB", (8, 8)), tmp_path, settings(negative="blur, low quality"), "DPM++ 2M")
    text = Image.open(path).text
    assert json.loads(text["dalle"]) == settings(negative="blur, low quality")
    assert text["parameters"] == (
        "a red circle\nNegative prompt: blur, low quality\n"
        "Steps: 20, Sampler: DPM++ 2M, CFG scale: 4, Seed: 7, Size: 64x64, Model: shapes"
    )


def test_parse_a1111_from_other_tools():
    parsed = parse_a1111("a cat, masterpiece\nNegative prompt: ugly\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, "
                         "Seed: 42, Size: 512x768, Model hash: abc, Model: sd15")
    assert parsed["prompt"] == "a cat, masterpiece" and parsed["negative_prompt"] == "ugly"
    assert (parsed["steps"], parsed["guidance_scale"], parsed["seed"]) == (30, 7.5, 42)
    assert (parsed["width"], parsed["height"], parsed["sampler"], parsed["model"]) == (512, 768, "Euler a", "sd15")


def test_image_name_budget():
    name = image_name(12345, 4294967295, "x" * 500)
    assert len(name.encode()) <= MAX_NAME_BYTES and name.startswith("12345-4294967295-")


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        path = write_png(Image.new("RGB", (8, 8)), tmp_path / "out", settings(), "Euler")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_output_folder_that_is_a_file_is_a_usage_error(tmp_path):
    from dallecli.errors import UsageError
    from dallecli.images import prepare_output_folder

    afile = tmp_path / "p.txt"
    afile.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        prepare_output_folder(afile)
    with pytest.raises(UsageError, match="is a file"):
        prepare_output_folder(afile / "sub")
    assert prepare_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing is created before a model loads
