"""`dalle doctor`, `dalle info` and the config file (precedence: flag > DALLE_* > config file > built-in)."""

import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from conftest import run_dalle
from dallecli.cli.app import app
from dallecli.config import config_path, default_output_dir, user_default
from dallecli.images import write_png

SETTINGS = {"prompt": "a red cat\non two lines", "negative_prompt": "blur", "seed": 42, "steps": 2,
            "guidance_scale": 7.5, "width": 8, "height": 8, "model": "tiny", "scheduler": "ddim"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def write_config(text: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- config ------------------------------------------------------------------------------------------------

def test_config_file_lives_in_the_platformdirs_config_folder(isolated_home):
    assert config_path() == isolated_home / "config" / "dallecli" / "config.toml"


def test_precedence_environment_over_file_over_built_in(monkeypatch, tmp_path):
    assert user_default("model") is None and default_output_dir() == Path("dalle-out")
    write_config('model = "from-file"\noutput_dir = "~/pictures"\nscheduler = "euler"\n')
    assert user_default("model") == "from-file" and user_default("scheduler") == "euler"
    assert default_output_dir() == Path.home() / "pictures"
    monkeypatch.setenv("DALLE_MODEL", "from-env")
    monkeypatch.setenv("DALLE_OUTPUT_DIR", str(tmp_path / "env-out"))
    assert user_default("model") == "from-env" and default_output_dir() == tmp_path / "env-out"
    assert user_default("device") is None


@pytest.mark.parametrize("text, expected", [
    ('modle = "x"\n', "unknown key 'modle'"),
    ("steps = 4\n", "'steps'"),
    ('device = 3\n', "must be a string"),
    ('model = "unterminated\n', "not valid TOML"),
])
def test_a_bad_config_file_is_a_one_line_usage_error_naming_the_file(text, expected):
    path = write_config(text)
    result = invoke("generate", "a cat", "--width", "32", "--height", "32")
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert expected in message and str(path) in message and len(message.splitlines()) == 1


def test_generate_and_batch_take_defaults_from_config_then_env_then_flags(tiny_pipeline, tmp_path, monkeypatch):
    write_config(f'model = "{tiny_pipeline.as_posix()}"\noutput_dir = "{(tmp_path / "cfg").as_posix()}"\n'
                 'scheduler = "euler"\ndevice = "cpu"\n')
    size = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "1"]

    def made(result) -> dict:
        assert result.exit_code == 0, result.output
        [path] = result.stdout.split()
        return {"folder": Path(path).parent, **json.loads(Image.open(path).text["dalle"])}

    from_file = made(invoke("generate", "a cat", *size))
    assert from_file["folder"] == tmp_path / "cfg" and from_file["scheduler"] == "euler"
    assert from_file["model"] == tiny_pipeline.as_posix()

    monkeypatch.setenv("DALLE_SCHEDULER", "ddim")
    monkeypatch.setenv("DALLE_OUTPUT_DIR", str(tmp_path / "env"))
    from_env = made(invoke("generate", "a cat", *size))
    assert from_env["folder"] == tmp_path / "env" and from_env["scheduler"] == "ddim"

    from_flags = made(invoke("generate", "a cat", *size, "--scheduler", "dpm++", "--out", str(tmp_path / "flag")))
    assert from_flags["folder"] == tmp_path / "flag" and from_flags["scheduler"] == "dpm++"

    monkeypatch.delenv("DALLE_SCHEDULER")
    monkeypatch.delenv("DALLE_OUTPUT_DIR")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    result = invoke("batch", str(prompts), "--width", "32", "--height", "32", "--steps", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in (tmp_path / "cfg" / "manifest.jsonl").read_text().splitlines()
                if '"path"' in line]
    assert record["scheduler"] == "euler"


# -- doctor ------------------------------------------------------------------------------------------------

def test_doctor_json_reports_versions_devices_dtype_cache_disk_and_config(isolated_home, monkeypatch):
    config = write_config('dtype = "float32"\n')
    blob = isolated_home / "hf" / "hub" / "models--org--m" / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x" * 1234)
    done = run_dalle("doctor", "--json", env={"DALLE_DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for name in ("torch", "diffusers", "transformers", "huggingface_hub"):
        assert report["packages"][name]
    assert report["python"]["version"].count(".") == 2
    names = [device["name"] for device in report["devices"]]
    assert names[0] == "cpu" and report["auto"]["device"].split(":")[0] in {n.split(":")[0] for n in names}
    assert report["auto"]["dtype"] in ("float32", "float16", "bfloat16") and report["auto"]["dtype_reason"]
    assert report["auto"]["device_reason"]
    for device in report["devices"]:
        if device["kind"] == "cuda":
            assert device["memory_bytes"] > 0 and isinstance(device["bf16"], bool)
    assert report["config"] == {"path": str(config), "exists": True, "values": {"dtype": "float32"}, "error": None}
    assert report["defaults"]["dtype"] == {"value": "float32", "source": "config file"}
    assert report["defaults"]["device"] == {"value": "cpu", "source": "environment DALLE_DEVICE"}
    assert report["defaults"]["model"]["source"] == "built-in"
    assert report["cache"] == {"path": str(isolated_home / "hf" / "hub"), "exists": True, "size_bytes": 1234}
    assert report["disk"]["cache"]["free_bytes"] > 0 and report["disk"]["output"]["total_bytes"] > 0


def test_doctor_text_names_the_auto_choice_and_survives_a_broken_config(monkeypatch):
    import dallecli.doctor as doctor

    monkeypatch.setattr(doctor, "list_devices", lambda: [
        {"name": "cpu", "kind": "cpu", "label": "x86_64", "threads": 1,
         "threads_reason": "2 physical core(s), 1.0 kept busy by other processes"},
        {"name": "cuda:0", "kind": "cuda", "label": "Test GPU", "memory_bytes": 24 * 1000**3,
         "free_memory_bytes": 20 * 1000**3, "capability": "8.9", "bf16": True}])
    path = write_config("not toml at all [\n")
    result = invoke("doctor")
    assert result.exit_code == 0
    assert "cuda:0: Test GPU, 24.0 GB VRAM (20.0 GB free), compute 8.9, bfloat16" in result.stdout
    assert "cpu: x86_64, 1 thread (2 physical core(s), 1.0 kept busy by other processes; DALLE_THREADS overrides)" \
        in result.stdout
    assert "auto " in result.stdout and str(path) in result.stdout and "(invalid)" in result.stdout
    assert "not valid TOML" in result.stderr


# -- info --------------------------------------------------------------------------------------------------

def test_info_shows_our_parameters_and_how_to_rerun(tmp_path):
    path = write_png(Image.new("RGB", (8, 8)), tmp_path / "my images", SETTINGS, "DDIM")
    text = invoke("info", str(path))
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["source", "dalle"]
    assert any(line.split()[:2] == ["seed", "42"] for line in lines)
    assert "a red cat" in text.stdout and "blur" in text.stdout
    assert lines[-1].endswith(f"dalle generate --from '{path}'")
    document = json.loads(invoke("info", str(path), "--json").stdout)
    assert document == {"source": "dalle", **SETTINGS}


def test_info_reads_automatic1111_parameters(tmp_path):
    meta = PngInfo()
    meta.add_text("parameters", "a castle, (masterpiece:1.2)\nNegative prompt: blurry, lowres\nSteps: 20, "
                                "Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model: sd15")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=meta)
    document = json.loads(invoke("info", str(path), "--json").stdout)
    assert document == {"source": "a1111", "prompt": "a castle, (masterpiece:1.2)", "negative_prompt": "blurry, lowres",
                        "steps": 20, "sampler": "DPM++ 2M Karras", "guidance_scale": 7.0, "seed": 1234,
                        "width": 512, "height": 768, "model": "sd15"}
    text = invoke("info", str(path)).stdout
    assert "AUTOMATIC1111" in text and "DPM++ 2M Karras" in text and "--from" not in text


@pytest.mark.parametrize("content", ["plain png", "not an image"])
def test_info_without_parameters_is_a_usage_error(tmp_path, content):
    path = tmp_path / "x.png"
    if content == "plain png":
        Image.new("RGB", (8, 8)).save(path)
    else:
        path.write_bytes(b"hello")
    result = invoke("info", str(path))
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and str(path) in result.stderr
