"""Safety: pickles are refused by content and never unpickled (C14); names from prompts never leave the folder.

The pickles here create a marker file when unpickled (``Path.touch`` through ``__reduce__``); a sanity test
shows that they really do, so "the marker never appears" means "nothing unpickled them".
"""

import io
import os
import pickle
import shutil
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from typer.testing import CliRunner

from dallecli.cli.app import app
from dallecli.images import MAX_NAME_BYTES, image_name, slugify, write_png


class _Touch:
    """Unpickling this creates the file at ``marker``: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def evil_bytes(marker: Path, kind: str) -> bytes:
    """A pickle stream of protocol 0/2/4/5, or torch's zip layout (``archive/data.pkl``) with one inside."""
    if kind == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps(_Touch(marker), protocol=2))
            archive.writestr("archive/version", "3\n")
        return buffer.getvalue()
    return pickle.dumps(_Touch(marker), protocol=int(kind.removeprefix("protocol-")))


KINDS = ["protocol-0", "protocol-2", "protocol-4", "protocol-5", "zip"]


def generate(*args: str):
    return CliRunner().invoke(app, ["generate", "a cat", "--width", "32", "--height", "32", "--steps", "2",
                                    "--device", "cpu", "--progress", "none", *args])


@pytest.mark.parametrize("kind", KINDS)
def test_the_evil_pickle_really_creates_its_marker(tmp_path, kind):
    marker = tmp_path / "sanity-marker"
    data = evil_bytes(marker, kind)
    pickle.loads(zipfile.ZipFile(io.BytesIO(data)).read("archive/data.pkl") if kind == "zip" else data)
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["extra evil.SafeTensors", "weights file replaced"])
def test_pickle_named_safetensors_in_a_model_folder_is_refused_by_content_case_c14(tiny_pipeline, tmp_path, kind, layout):
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    name = "evil.SafeTensors" if layout.startswith("extra") else "diffusion_pytorch_model.safetensors"
    (model / "unet" / name).write_bytes(evil_bytes(marker, kind))
    result = generate("--model", str(model), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output
    assert name in message and "safetensors" in message.lower()
    if kind != "protocol-0":  # protocol 0 has no magic bytes: refused as "not a safetensors file"
        assert "pickle" in message and "Use a .safetensors" in message
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".CKPT", ".pt", ".bin"])
def test_pickle_checkpoint_given_to_model_is_refused_and_never_opened_case_c14(tmp_path, suffix):
    marker = tmp_path / "marker"
    checkpoint = tmp_path / f"x{suffix}"
    checkpoint.write_bytes(evil_bytes(marker, "protocol-4"))
    result = generate("--model", str(checkpoint), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "pickle" in result.stderr and ".safetensors" in result.stderr  # names the safe alternative
    assert not marker.exists()


def test_pickle_lora_named_safetensors_is_refused(tiny_pipeline, tmp_path):
    marker = tmp_path / "marker"
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(evil_bytes(marker, "protocol-4"))
    result = generate("--model", str(tiny_pipeline), "--lora", str(lora), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "pickle" in result.stderr
    assert not marker.exists()


# -- names -------------------------------------------------------------------------------------------------

FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, invisible format, surrogates


def check_name(name: str) -> None:
    assert name == unicodedata.normalize("NFC", name)
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    assert not set(name) & set('/\\:*?"<>|'), name
    assert not {os.sep, os.altsep or os.sep} & set(name)
    assert not any(unicodedata.category(ch) in FORBIDDEN_CATEGORIES for ch in name), ascii(name)
    assert name.endswith(".png") and not name.startswith(".") and name not in (".", "..")


prompts = st.text(st.characters(), max_size=400) | st.sampled_from(
    ["../../etc/passwd", "..", "/", "a\x00b", "C:\\Windows\\x", "knight (fate/zero) 東京 ★ ?:*\"<>", "\u202egnp.exe",
     "e\u0301" * 80, "İ" * 90, "\ud800 lone surrogate", "\u1100\u1161\u11a8" * 40, " " * 50, "CON", "nul.txt"])


@settings(max_examples=400, deadline=None)
@given(prompt=prompts, index=st.integers(0, 10**7), seed=st.integers(0, 2**64 - 1))
def test_any_prompt_gives_a_safe_name(prompt, index, seed):
    """Generate and batch both name files with image_name (batch with the row number as the index)."""
    name = image_name(index, seed, prompt)
    check_name(name)
    assert name.startswith(f"{index:04d}-{seed}-")
    slug = slugify(prompt)
    assert slug and len(slug.encode("utf-8")) <= 60 and slug not in (".", "..")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.text(st.characters(codec="utf-8"), max_size=300) | st.sampled_from(["../x", "a/b\\c", ".."]))
def test_any_prompt_is_written_directly_in_the_output_folder(prompt):
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    settings_ = {"prompt": prompt, "negative_prompt": None, "seed": 7, "steps": 2, "guidance_scale": 1.0,
                 "width": 8, "height": 8, "model": "tiny", "scheduler": "ddim"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        path = write_png(image, folder, settings_, "DDIM")
        assert path.parent == folder
        assert [p.name for p in folder.iterdir()] == [path.name]
        check_name(path.name)
        with Image.open(path) as written:
            assert written.size == (8, 8)
