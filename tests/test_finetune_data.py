"""Training folders: image conversion (C18), caption detection and the missing-caption stop (C19), skipped files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from conftest import run_dalle
from dallecli.errors import DatasetError
from dallecli.engine.inputs import load_rgb, to_rgb8
from dallecli.training.dataset import check_captions, resize_and_crop, scan_folder


def _pixels(image) -> np.ndarray:
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.dtype == np.uint8
    return array


# -- C18: every kind of image becomes 8-bit RGB -------------------------------------------------------
def test_rgba_transparent_areas_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere, but only the left half is opaque
    rgba[:, :2, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    array = _pixels(load_rgb(path))
    assert (array[:, :2] == [200, 0, 0]).all()
    assert (array[:, 2:] == [255, 255, 255]).all()


def test_half_transparent_pixel_is_blended_with_white():
    image = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    value = _pixels(to_rgb8(image))[0, 0]
    assert np.allclose(value, 127, atol=1)


def test_grayscale_palette_and_palette_transparency(tmp_path):
    gray = Image.fromarray(np.full((3, 3), 90, dtype=np.uint8), "L")
    assert (_pixels(to_rgb8(gray)) == 90).all()
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 0, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # palette entry 1 is transparent
    path = tmp_path / "p.png"
    palette.save(path)
    array = _pixels(load_rgb(path))
    assert list(array[0, 0]) == [10, 20, 30]
    assert list(array[0, 1]) == [255, 255, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    red, green, blue = _pixels(load_rgb(path)).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    array = _pixels(load_rgb(path))
    assert list(array[0, :, 0]) == [0, 64, 128, 255]  # clipping would give [0, 255, 255, 255]
    assert (array[..., 0] == array[..., 1]).all()


def test_jpeg_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high: left half red, right half blue
    pixels[:, :2] = [255, 0, 0]
    pixels[:, 2:] = [0, 0, 255]
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "turned.jpg"
    image.save(path, exif=exif.tobytes(), quality=100)
    array = _pixels(load_rgb(path))
    assert array.shape == (4, 2, 3)  # now 2 wide, 4 high
    assert array[0, :, 0].min() > 200 and array[-1, :, 2].min() > 200  # red on top, blue at the bottom


def test_resize_and_crop_gives_a_square_of_the_resolution():
    image = Image.new("RGB", (90, 45), "white")
    assert resize_and_crop(image, 32).size == (32, 32)
    assert resize_and_crop(image, 32, center_crop=False, rng=random.Random(0)).size == (32, 32)


# -- C19: captions found, missing ones stop the run -------------------------------------------------------
def _image(path):
    Image.new("RGB", (8, 8), "red").save(path)


def test_missing_caption_stops_unless_allowed_or_default(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n", encoding="utf-8")
    _image(tmp_path / "b.png")
    scan = scan_folder(tmp_path)
    assert scan.summary() == "1/2 images captioned"
    with pytest.raises(DatasetError, match=r"1/2 images captioned.*b\.png"):
        check_captions(scan)
    check_captions(scan, allow_missing=True)  # no raise
    with_default = scan_folder(tmp_path, caption="a photo of sks square")
    assert with_default.summary() == "2/2 images captioned"
    captions = {e.path.name: e.caption for e in with_default.examples}
    assert captions == {"a.png": "a red square", "b.png": "a photo of sks square"}
    check_captions(with_default)


def test_caption_sources_and_prefix(tmp_path):
    for name in ("a.png", "b.jpg", "c.png", "d.png"):
        _image(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from jsonl"}) + "\n")
    (tmp_path / "metadata.csv").write_text("file_name,text\nb.jpg,from csv\n")
    (tmp_path / "c.caption").write_text("from caption file")
    (tmp_path / "d.txt").write_text("from txt")
    scan = scan_folder(tmp_path, caption_prefix="sks")
    assert {e.path.name: (e.caption, e.source) for e in scan.examples} == {
        "a.png": ("sks, from jsonl", "metadata.jsonl"), "b.jpg": ("sks, from csv", "metadata.csv"),
        "c.png": ("sks, from caption file", ".caption"), "d.png": ("sks, from txt", ".txt"),
    }
    assert scan.skipped == []


def test_skipped_files_are_listed_with_reasons(tmp_path):
    _image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("good")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "notes.txt").write_text("remember to crop")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    scan = scan_folder(tmp_path)
    reasons = {s.path: s.reason for s in scan.skipped}
    assert set(reasons) == {".DS_Store", "Thumbs.db", "notes.txt", "empty.png", "corrupt.jpg", "truncated.png"}
    assert "macOS" in reasons[".DS_Store"] and "0 bytes" in reasons["empty.png"]
    assert reasons["corrupt.jpg"].startswith("corrupt") and reasons["truncated.png"].startswith("corrupt")
    assert [e.path.name for e in scan.examples] == ["good.png"]


def test_no_usable_images_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match="no usable images"):
        check_captions(scan_folder(tmp_path))


def test_cli_stops_before_training_and_lists_skips(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _image(data / "a.png")
    (data / "a.txt").write_text("a red square")
    _image(data / "b.png")
    (data / ".DS_Store").write_bytes(b"junk")
    result = run_dalle("finetune", str(data), "--output", str(tmp_path / "out"), "--steps", "1")
    assert result.returncode == 2, result.stderr
    assert "1/2 images captioned" in result.stderr
    assert "skipped .DS_Store" in result.stderr
    assert "--allow-missing-captions" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()
