"""The real entry point: exit codes, the stdout/stderr split, --json, --from, lazy imports. Cases C07, C17."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from conftest import default_sigint, run_dalle


def test_help_does_not_import_torch_or_diffusers():
    code = ("import sys; from dallecli.cli.app import app; sys.argv=['dalle','generate','--help']\n"
            "try: app()\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch','diffusers','transformers','huggingface_hub') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "--num-images" in done.stdout


def test_size_not_multiple_of_8_exits_2_before_loading_case_c07(tmp_path):
    done = run_dalle("generate", "x", "--width", "640", "--height", "427", "--model", str(tmp_path / "no-such-model"))
    assert done.returncode == 2
    assert "424" in done.stderr and "432" in done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_unknown_model_and_device_are_one_line_errors(tiny_pipeline):
    missing = run_dalle("generate", "x", "--model", "nobody/nothing")
    assert missing.returncode == 1 and "dalle download nobody/nothing" in missing.stderr
    device = run_dalle("generate", "x", "--model", str(tiny_pipeline), "--device", "cuda")
    assert device.returncode == 2 and "not available" in device.stderr
    for done in (missing, device):
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_json_output_and_from_round_trip(tiny_pipeline, tmp_path):
    out = tmp_path / "out"
    # batch size 1 on both sides: a batch of 2 may differ from a single image by float summation order
    done = run_dalle("generate", "a red cat", "-n", "2", "--batch-size", "1", "--seed", "9", "--steps", "2",
                     "--model", str(tiny_pipeline),
                     "--out", str(out), "--json", "--negative-prompt", "blue", "--guidance", "3")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert [image["seed"] for image in document["images"]] == [9, 10]
    assert document["parameters"]["guidance_scale"] == 3.0 and document["parameters"]["steps"] == 2
    first = document["images"][0]["path"]
    stored = json.loads(Image.open(first).text["dalle"])
    assert stored["negative_prompt"] == "blue" and stored["seed"] == 9 and stored["width"] == 32
    again = run_dalle("generate", "--from", first, "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    [path] = again.stdout.split()
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(first)))
    assert json.loads(Image.open(path).text["dalle"]) == stored


def test_ctrl_c_keeps_finished_images_and_leaves_no_partial_file_case_c17(tiny_pipeline, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "dallecli", "generate", "a cat", "-n", "40", "--batch-size", "1", "--seed", "1",
         "--steps", "4", "--model", str(tiny_pipeline), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ), preexec_fn=default_sigint,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not [p for p in out.glob("*.png") if not p.name.startswith(".")]:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert stderr.count("interrupted") == 1 and "finished image(s) kept" in stderr  # said once, with what was kept
    kept = sorted(out.iterdir())
    assert kept and all(p.suffix == ".png" and not p.name.startswith(".tmp") for p in kept)
    printed = stdout.split()
    assert set(printed) <= {str(p) for p in kept} and len(kept) - len(printed) <= 1  # SIGINT may fall between write and print
    for path in kept:
        assert Image.open(path).size == (32, 32)  # complete, readable images
    rerun = run_dalle("generate", "a cat", "--seed", "1", "--steps", "4", "--model", str(tiny_pipeline), "--out", str(out))
    assert rerun.returncode == 0 and len(list(out.iterdir())) == len(kept) + 1


def test_output_path_that_is_a_file_exits_2_before_loading(tmp_path):
    afile = tmp_path / "p.txt"
    afile.write_text("x")
    done = run_dalle("generate", "x", "--out", str(afile), "--model", str(tmp_path / "no-such-model"))
    assert done.returncode == 2 and "is a file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and afile.read_text() == "x"


def test_progress_bar_is_silent_off_a_terminal_and_keeps_each_commands_columns(monkeypatch):
    """One progress wrapper for generate/batch/upscale (steps), finetune (loss, rate) and download (bytes)."""
    import io

    from rich.console import Console

    from dallecli.cli import console

    monkeypatch.setattr(console, "err", lambda: Console(file=io.StringIO(), force_terminal=False))
    with console.progress_bar(10, "generating") as bar:
        bar.advance()
        bar.update(completed=3, loss="0.1")
        assert not bar.shown
    monkeypatch.setattr(console, "err", lambda: Console(file=io.StringIO(), force_terminal=True))
    shown = {}
    for name, args, kwargs in [
        ("steps", (10, "generating"), {}),
        ("training", (10, "training"), {"elapsed": False, "completed": 4, "fields": {"loss": "-"},
                                        "extra_columns": ("loss {task.fields[loss]}",)}),
        ("bytes", (None, "downloading"), {"unit": "bytes", "elapsed": False}),
    ]:
        with console.progress_bar(*args, **kwargs) as bar:
            bar.advance(2)
            task = bar.progress.tasks[0]
            shown[name] = ([type(c).__name__ for c in bar.progress.columns], task.completed, task.total, task.fields)
    assert shown["steps"] == (["TextColumn", "BarColumn", "MofNCompleteColumn", "TimeElapsedColumn",
                               "TimeRemainingColumn"], 2, 10, {})
    assert shown["training"] == (["TextColumn", "BarColumn", "MofNCompleteColumn", "TextColumn",
                                  "TimeRemainingColumn"], 6, 10, {"loss": "-"})
    assert shown["bytes"] == (["TextColumn", "BarColumn", "DownloadColumn", "TransferSpeedColumn",
                               "TimeRemainingColumn"], 2, None, {})
