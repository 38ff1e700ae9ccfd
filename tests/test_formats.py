"""JPEG and WebP with their parameters, limits checked up front, ComfyUI metadata, labelled and combined grids
(issue 19, items 1-3)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from dallecli.cli.app import app
from dallecli.images import (EXIF_IFD, USER_COMMENT, OutputFormat, a1111_parameters, check_image_size,
                             read_metadata, read_xmp_settings, write_image)
from dallecli.errors import UsageError


def tiny(tiny_pipeline, *extra: str) -> list[str]:
    return ["--model", str(tiny_pipeline), "--width", "32", "--height", "32", "--steps", "2", *extra]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def user_comment_of(path) -> bytes:
    with Image.open(path) as image:
        return image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]


@pytest.mark.parametrize("name, suffix, pil", [("jpeg", ".jpg", "JPEG"), ("webp", ".webp", "WEBP")])
def test_jpeg_and_webp_carry_the_a1111_text_in_exif_and_the_json_in_xmp(tiny_pipeline, tmp_path, name, suffix, pil):
    made = invoke("generate", "a red circle", *tiny(tiny_pipeline, "--seed", "7", "--format", name, "--quality", "80",
                                                     "--negative-prompt", "blur", "--out", str(tmp_path), "--json"))
    assert made.exit_code == 0, made.output
    path = tmp_path / json.loads(made.stdout)["images"][0]["path"].rsplit("/", 1)[-1]
    assert path.suffix == suffix and path.is_file()
    with Image.open(path) as image:
        assert image.format == pil and image.mode == "RGB" and image.size == (32, 32)
        image.load()  # decodes
        stored = json.loads(read_xmp_settings(image.info["xmp"]))
    comment = user_comment_of(path)
    assert comment.startswith(b"UNICODE\0")  # piexif's UserComment.dump(encoding="unicode"), as A1111 writes it
    text = comment[8:].decode("utf-16-be")
    assert text == a1111_parameters(stored, "DPM++ 2M") or text.startswith("a red circle\nNegative prompt: blur\n")
    assert "Steps: 2" in text and "Seed: 7" in text and "Size: 32x32" in text
    assert (stored["prompt"], stored["seed"], stored["negative_prompt"]) == ("a red circle", 7, "blur")
    shown = invoke("info", str(path), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == {"source": "dalle", **stored}  # what was written, read back whole


def test_from_a_jpeg_replays_its_request(tiny_pipeline, tmp_path):
    first = invoke("generate", "a blue square", *tiny(tiny_pipeline, "--seed", "11", "--format", "jpeg",
                                                       "--out", str(tmp_path / "a")))
    assert first.exit_code == 0, first.output
    jpeg = tmp_path / "a" / first.stdout.strip().rsplit("/", 1)[-1]
    again = invoke("generate", "--from", str(jpeg), "--model", str(tiny_pipeline), "--out", str(tmp_path / "b"))
    assert again.exit_code == 0, again.output
    replayed = read_metadata(tmp_path / "b" / again.stdout.strip().rsplit("/", 1)[-1])
    original = read_metadata(jpeg)
    for key in ("prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler"):
        assert replayed[key] == original[key], key
    assert again.stdout.strip().endswith(".png")  # --format is not replayed: PNG unless asked


def test_rgba_is_laid_on_white_for_jpeg_and_kept_for_webp(tmp_path):
    image = Image.new("RGBA", (16, 8), (255, 0, 0, 255))
    image.paste((0, 0, 255, 0), (8, 0, 16, 8))  # right half fully transparent
    settings = {"prompt": "half", "negative_prompt": None, "seed": 1, "steps": 2, "guidance_scale": 1.0,
                "width": 16, "height": 8, "model": "shapes"}
    jpeg = write_image(image, tmp_path, settings, "Euler", fmt=OutputFormat("jpeg", 95))
    with Image.open(jpeg) as decoded:
        assert decoded.mode == "RGB"
        left, right = decoded.getpixel((2, 4)), decoded.getpixel((13, 4))
    assert left[0] > 200 and left[2] < 60 and min(right) > 230  # red stays, transparent is white, not black
    webp = write_image(image, tmp_path, settings, "Euler", fmt=OutputFormat("webp", 100))
    with Image.open(webp) as decoded:
        assert decoded.mode == "RGBA" and decoded.getpixel((13, 4))[3] == 0
    assert read_metadata(jpeg)["prompt"] == read_metadata(webp)["prompt"] == "half"


def test_format_and_quality_are_checked_before_anything_loads(tiny_pipeline):
    for args, message in ((("--format", "gif"), "--format 'gif' is not one of png, jpeg, webp"),
                          (("--quality", "80"), "--quality is for --format jpeg or webp"),
                          (("--format", "webp", "--quality", "0"), "--quality must be between 1 and 100")):
        result = invoke("generate", "x", "--model", "no-such-model", *args)
        assert result.exit_code == 2 and message in result.stderr, result.output


def test_upscale_too_big_for_webp_is_refused_before_the_upscaler_is_looked_for(tmp_path):
    Image.new("RGB", (4100, 8), "white").save(tmp_path / "wide.png")
    result = invoke("upscale", str(tmp_path / "wide.png"), "--format", "webp", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "the upscaled image would be 16400x32 pixels and WEBP holds at most 16,383" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_grid_too_big_for_the_format_is_refused_before_any_image(tiny_pipeline, tmp_path, monkeypatch):
    from dallecli.batch.grid import grid_size

    with pytest.raises(UsageError, match="WEBP holds at most 16,383"):  # over a million images: 8-pixel cells
        check_image_size(OutputFormat("webp"), *grid_size(5_000_000), "the grid")
    monkeypatch.setitem(__import__("dallecli.images", fromlist=["MAX_SIDE"]).MAX_SIDE, "webp", 300)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    result = invoke("batch", str(tmp_path / "p.txt"), *tiny(tiny_pipeline, "--format", "webp", "--grid",
                                                            "--out", str(tmp_path / "out")))
    assert result.exit_code == 2, result.output
    assert "the grid would be 512x256 pixels and WEBP holds at most 300" in result.stderr
    assert not list((tmp_path / "out").glob("*.webp"))  # refused up front, not after the images


def test_a_prompt_too_long_for_jpeg_metadata_is_refused_before_any_image(tiny_pipeline, tmp_path):
    # under the 32,000-character limit of every prompt, but 70,000 bytes as the EXIF UserComment's UTF-16
    (tmp_path / "p.txt").write_text("a red circle\n" + "\U0001f431\U0001f431 " * 7000 + "\n", encoding="utf-8")
    result = invoke("batch", str(tmp_path / "p.txt"), *tiny(tiny_pipeline, "--format", "jpeg",
                                                            "--out", str(tmp_path / "out")))
    assert result.exit_code == 2, result.output
    assert "line 2: the prompt is too long for a JPEG's metadata" in result.stderr
    assert not list((tmp_path / "out").glob("*.jpg"))


def test_batch_resume_counts_images_of_the_chosen_format_only(tiny_pipeline, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    args = ["batch", str(tmp_path / "p.txt"), *tiny(tiny_pipeline, "--seed", "3", "--out", str(tmp_path / "out"))]
    first = invoke(*args, "--format", "jpeg", "--quality", "70")
    assert first.exit_code == 0, first.output
    out = tmp_path / "out"
    assert sorted(p.suffix for p in out.iterdir() if p.suffix != ".jsonl") == [".jpg", ".jpg"]
    again = invoke(*args, "--format", "jpeg")
    assert again.exit_code == 0 and "skipped 2, generating 0" in again.stderr, again.output
    webp = invoke(*args, "--format", "webp", "--grid-label", "seed")
    assert webp.exit_code == 0 and "skipped 0, generating 2" in webp.stderr, webp.output
    assert len(list(out.glob("0*.webp"))) == 2 and (out / "grid.webp").is_file()
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()][1:]
    assert sorted(r["path"].rsplit(".", 1)[1] for r in records) == ["jpg", "jpg", "webp", "webp"]
    for record in records:
        assert read_metadata(out / record["path"])["seed"] == record["seed"]


def test_grid_labels_draw_a_band_under_each_cell(tmp_path):
    from dallecli.batch.grid import contact_sheet, grid_layout

    paths = []
    for index, colour in enumerate(("red", "green", "blue")):
        paths.append(tmp_path / f"{index}.png")
        Image.new("RGB", (64, 64), colour).save(paths[-1])
    plain = contact_sheet(paths, tmp_path / "plain.png", cell=64)
    labelled = contact_sheet(paths, tmp_path / "labelled.jpg", cell=64, fmt=OutputFormat("jpeg"),
                             labels=["a red circle with a very long prompt that cannot fit", "seed 2", "\x1b[31m"])
    columns, rows, cell, band = grid_layout(3, cell=64, labelled=True)
    assert band > 0 and (columns, rows, cell) == (2, 2, 64)
    with Image.open(plain) as image:
        assert image.size == (128, 128)
    with Image.open(labelled) as image:
        assert image.format == "JPEG" and image.size == (128, 2 * (64 + band))
        strip = image.crop((0, 64, 64, 64 + band)).convert("L")
        assert min(strip.getdata()) < 128  # text drawn in the band under the first cell
        assert image.getpixel((32, 32))[0] > 200  # the first thumbnail, red, above it


def test_sharded_run_writes_the_combined_grid_when_the_last_shard_ends(tiny_pipeline, tmp_path):
    from dallecli.batch.grid import grid_size

    (tmp_path / "p.txt").write_text("a red circle\na blue square\na cat\n")
    args = ["batch", str(tmp_path / "p.txt"), *tiny(tiny_pipeline, "--seed", "3", "--out", str(tmp_path / "out"),
                                                    "--grid-label", "prompt")]
    out = tmp_path / "out"
    first = invoke(*args, "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert (out / "grid-0-of-2.png").is_file() and not (out / "grid.png").exists()
    second = invoke(*args, "--shard", "1/2")
    assert second.exit_code == 0, second.output
    assert (out / "grid-1-of-2.png").is_file() and "the combined grid is" in second.stderr
    with Image.open(out / "grid.png") as image:
        assert image.size == grid_size(3, labelled=True)
    bad = invoke(*args, "--grid-label", "colour")
    assert bad.exit_code == 2 and "--grid-label 'colour' is not one of none, prompt, seed" in bad.stderr


# -- reading other tools' files ---------------------------------------------------------------------------------

A1111_TEXT = ("a castle on a hill, 東京\nNegative prompt: blurry\n"
              "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, Model: dreamshaper_8")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_info_and_from_read_a1111_exif_user_comment(tmp_path, fmt, encoding):
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + A1111_TEXT.encode(encoding)
    path = tmp_path / f"a1111.{fmt.lower()}"
    Image.new("RGB", (16, 16), "green").save(path, format=fmt, exif=exif)
    shown = invoke("info", str(path), "--json")
    assert shown.exit_code == 0, shown.output
    stored = json.loads(shown.stdout)
    assert stored["source"] == "a1111" and stored["prompt"] == "a castle on a hill, 東京"
    assert (stored["negative_prompt"], stored["steps"], stored["seed"], stored["guidance_scale"]) == \
        ("blurry", 28, 1234, 6.5)
    assert (stored["width"], stored["height"], stored["sampler"]) == (512, 768, "DPM++ 2M Karras")
    text = invoke("info", str(path))
    assert "AUTOMATIC1111 parameters" in text.stdout and "dreamshaper_8" in text.stdout


def _comfy_graph(**changes) -> dict:
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8,
                                                   "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1,
                                                   "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "x.safetensors", "model": ["4", 0],
                                                      "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a bottle with a galaxy inside", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }
    graph.update(changes)
    return graph


def _png(path, **chunks):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8), "blue").save(path, pnginfo=info)
    return path


EXPECTED_COMFY = {"source": "comfyui", "prompt": "a bottle with a galaxy inside", "negative_prompt": "text, watermark",
                  "seed": 156680208700286, "steps": 20, "guidance_scale": 8.0, "sampler": "dpmpp_2m (karras)",
                  "scheduler": "dpm++-karras", "model": "v1-5-pruned-emaonly.safetensors", "width": 512,
                  "height": 768}


def test_info_reads_a_comfyui_prompt_chunk(tmp_path):
    path = _png(tmp_path / "comfy.png", prompt=json.dumps(_comfy_graph()), workflow="{}")
    shown = invoke("info", str(path), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == EXPECTED_COMFY
    text = invoke("info", str(path)).stdout
    assert "ComfyUI prompt graph" in text and "a bottle with a galaxy inside" in text


def test_info_reads_a_comfyui_workflow_chunk_alone(tmp_path):
    workflow = {
        "nodes": [
            {"id": 3, "type": "KSampler", "widgets_values": [42, "randomize", 25, 7.5, "euler_ancestral", "normal", 1],
             "inputs": [{"name": "model", "link": 1}, {"name": "positive", "link": 4}, {"name": "negative", "link": 6},
                        {"name": "latent_image", "link": 2}]},
            {"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["sd_xl_base_1.0.safetensors"]},
            {"id": 5, "type": "EmptyLatentImage", "widgets_values": [1024, 1024, 1]},
            {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a fox in the snow"]},
            {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["ugly"]},
        ],
        "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [4, 6, 0, 3, 1, "CONDITIONING"],
                  [6, 7, 0, 3, 2, "CONDITIONING"]],
    }
    path = _png(tmp_path / "workflow.png", workflow=json.dumps(workflow))
    stored = json.loads(invoke("info", str(path), "--json").stdout)
    assert stored == {"source": "comfyui", "prompt": "a fox in the snow", "negative_prompt": "ugly", "seed": 42,
                      "steps": 25, "guidance_scale": 7.5, "sampler": "euler_ancestral", "scheduler": "euler-a",
                      "model": "sd_xl_base_1.0.safetensors", "width": 1024, "height": 1024}


@pytest.mark.parametrize("prompt_chunk", [
    "{not json",
    "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser's stack
    json.dumps({"1": "node?", "2": [1, 2], "3": {"class_type": 5, "inputs": "x"}}),
    json.dumps({"3": {"class_type": "KSampler", "inputs": {"positive": ["3", 0], "seed": ["3", 0], "model": ["9", 0],
                                                           "steps": True, "cfg": "high", "latent_image": ["3", 0]}}}),
    json.dumps(_comfy_graph(**{"6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["6", 0]}}})),
    json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1, "cfg": 10 ** 400}}}),
])
def test_odd_comfyui_chunks_never_crash(tmp_path, prompt_chunk):
    path = _png(tmp_path / "odd.png", prompt=prompt_chunk, workflow='{"nodes": 5, "links": [[1], "x", null]}')
    for args in (("info", str(path), "--json"), ("generate", "--from", str(path), "--model", "no-such-model")):
        result = invoke(*args)
        assert result.exit_code in (0, 1, 2), result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if args[0] == "info" and result.exit_code == 0:
            stored = json.loads(result.stdout)
            assert stored["source"] == "comfyui"
            assert all(not isinstance(stored.get(k), (list, dict, bool)) for k in ("seed", "steps", "prompt"))


def test_comfyui_prompt_cannot_drive_the_terminal(tmp_path):
    hostile = "a\x1b]0;pwned\x07 cat\u202e"
    graph = _comfy_graph(**{"6": {"class_type": "CLIPTextEncode", "inputs": {"text": hostile}}})
    path = _png(tmp_path / "hostile.png", prompt=json.dumps(graph))
    shown = invoke("info", str(path))
    assert "\x1b" not in shown.stdout and "\u202e" not in shown.stdout
    assert "a\\x1b]0;pwned\\x07 cat\\u202e" in shown.stdout
    assert json.loads(invoke("info", str(path), "--json").stdout)["prompt"] == hostile


def test_damaged_exif_and_xmp_are_no_parameters_not_a_crash(tmp_path):
    path = tmp_path / "odd.jpg"
    Image.new("RGB", (8, 8)).save(path, exif=b"Exif\0\0garbage-not-tiff",
                                  xmp=b"<dalle:settings>{&quot;seed&quot;: [</dalle:settings>")
    result = invoke("info", str(path))
    assert result.exit_code == 2 and "damaged dalle metadata" in result.stderr, result.output
    Image.new("RGB", (8, 8)).save(path, exif=b"Exif\0\0garbage-not-tiff")
    result = invoke("info", str(path))
    assert result.exit_code == 2 and "carries no generation parameters" in result.stderr, result.output
