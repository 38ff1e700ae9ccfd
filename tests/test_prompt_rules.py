"""Issue 19 item 6: one rule for every prompt (generate, edit, variations, batch rows, ``dalle serve``, ``--from``):
at most MAX_PROMPT_CHARS characters, and no control character but tab, line feed and carriage return; a prompt
that breaks it is refused (exit 2, a malformed batch row, a 400) in one short line that never quotes it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from dallecli.cli.app import app
from dallecli.engine.request import MAX_PROMPT_CHARS, GenerationRequest, field_problem, validate_request
from dallecli.errors import UsageError

SMALL = ["--steps", "2", "--width", "32", "--height", "32"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("text, expected", [
    ("a red\x00 circle", "U+0000 (NUL) at character 6"),
    ("\x1b[31mred", "U+001B (ESC) at character 1"),
    ("a\x7f", "U+007F (DEL)"),
    ("a\x85b", "U+0085 at character 2"),  # C1: NEL
    ("x" * (MAX_PROMPT_CHARS + 1), f"{MAX_PROMPT_CHARS + 1:,} characters long; at most {MAX_PROMPT_CHARS:,}"),
])
def test_prompt_and_negative_prompt_share_the_rule(text, expected):
    with pytest.raises(UsageError, match="^the prompt ") as prompt:
        validate_request(GenerationRequest(text))
    assert expected in str(prompt.value) and len(str(prompt.value)) < 200  # never the prompt itself
    with pytest.raises(UsageError, match="^--negative-prompt ") as negative:
        validate_request(GenerationRequest("a cat", negative_prompt=text))
    assert expected in str(negative.value)
    assert field_problem("prompt", text, label="prompt").startswith("prompt ")


def test_tabs_line_breaks_and_the_longest_prompt_are_accepted():
    for text in ("a red\tcircle", "a red circle\non blue", "two\r\nlines", "x" * MAX_PROMPT_CHARS, "café ⚽ 猫"):
        validate_request(GenerationRequest(text, negative_prompt=text))
        assert field_problem("prompt", text) is None


def test_generate_and_edit_refuse_a_control_character_before_loading(tiny_pipeline, tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(image)
    for args in (["generate", "a red\x00circle"], ["generate", "a cat", "--negative-prompt", "blue\x1b]0;x\x07"],
                 ["edit", str(image), "a \x00cat"], ["variations", str(image), "--prompt", "a\x00cat"]):
        result = invoke(*args, "--model", str(tiny_pipeline), *SMALL, "--out", str(tmp_path / "out"))
        assert result.exit_code == 2, (args, result.output)
        assert "control character U+00" in result.output and "\x00" not in result.output
        assert "\x1b" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_from_refuses_a_prompt_with_nul_from_image_metadata(tiny_pipeline, tmp_path):
    info = PngInfo()
    info.add_text("dalle", json.dumps({"prompt": "a red\x00circle", "negative_prompt": None, "seed": 3, "steps": 2,
                                       "guidance_scale": 4.0, "width": 32, "height": 32, "model": str(tiny_pipeline),
                                       "scheduler": "default"}))
    Image.new("RGB", (8, 8)).save(tmp_path / "nul.png", pnginfo=info)
    result = invoke("generate", "--from", str(tmp_path / "nul.png"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "U+0000 (NUL)" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_batch_rows_with_nul_or_megabytes_are_malformed_and_short(tiny_pipeline, tmp_path):
    """The issue's report: a 2.4 MB line printed 2.6 MB of warnings and wrote a 7.8 MB PNG."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\na red\x00 circle\n" + b"cat " * 600_000 + b"\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a\\u0000b"}\n{"prompt": "a cat", "negative_prompt": "\\u001b[2J"}\n'
                     '{"prompt": "a blue square"}\n', encoding="utf-8")
    common = ["--model", str(tiny_pipeline), *SMALL, "--seed", "1"]
    refused = invoke("batch", str(prompts), *common, "--out", str(tmp_path / "refused"))
    assert refused.exit_code == 2 and "2 malformed row(s)" in refused.output
    assert "line 2: the prompt contains the control character U+0000 (NUL)" in refused.output
    assert "line 3: the prompt is 2,399,999 characters long"  # stripped in refused.output
    assert len(refused.output) < 2000 and not (tmp_path / "refused").exists()
    kept = invoke("batch", str(prompts), *common, "--skip-invalid", "--out", str(tmp_path / "kept"))
    assert kept.exit_code == 0, kept.output
    assert len(kept.output) < 2000
    files = sorted(p for p in (tmp_path / "kept").rglob("*") if p.is_file())
    assert len([p for p in files if p.suffix == ".png"]) == 1
    assert all(p.stat().st_size < 100_000 for p in files), [(p.name, p.stat().st_size) for p in files]
    rows = invoke("batch", str(jsonl), *common, "--out", str(tmp_path / "jsonl"))
    assert rows.exit_code == 2
    assert "line 1: the prompt contains the control character U+0000" in rows.output
    assert "line 2: negative_prompt contains the control character U+001B (ESC)" in rows.output
    assert "\x1b" not in rows.output


def test_the_longest_prompt_writes_bounded_metadata_and_a_short_warning(tiny_pipeline, tmp_path):
    longest = ("a red circle " * MAX_PROMPT_CHARS)[:MAX_PROMPT_CHARS]
    result = invoke("generate", longest, "--model", str(tiny_pipeline), *SMALL, "--seed", "1",
                    "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output[:500]
    warning = [line for line in result.stderr.splitlines() if "tokens" in line]
    assert len(warning) == 1 and len(warning[0]) < 400, warning
    [image] = (tmp_path / "out").glob("*.png")
    assert image.stat().st_size < 4 * MAX_PROMPT_CHARS + 50_000  # prompt, A1111 text, dropped words: ~100 KB
    assert len(image.name.encode()) <= 100


def test_serve_refuses_nul_in_the_prompt_and_negative_prompt_with_400(tmp_path):
    from serve_helpers import ServeProcess

    server = ServeProcess.start(tmp_path, "--no-warmup")
    try:
        cases = [("/v1/images/generations", {"prompt": "a red\x00circle"}, "prompt"),
                 ("/v1/images/generations", {"prompt": "a cat", "negative_prompt": "\x00"}, "negative_prompt"),
                 ("/v1/images/generations", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
                 ("/sdapi/v1/txt2img", {"prompt": "a\x1bcat"}, "prompt")]
        for route, body, param in cases:
            answer = httpx.post(f"{server.url}{route}", json=body, timeout=120)
            assert answer.status_code == 400, (route, answer.text)
            error = answer.json()["error"] if "error" in answer.json() else answer.json()
            text = json.dumps(error)
            assert "control character" in text or "characters long" in text, text
            if "param" in error:
                assert error["param"] == param
        assert not any(Path(server.out).glob("*.png")) if Path(server.out).exists() else True
    finally:
        server.stop()
