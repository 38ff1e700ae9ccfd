"""#19 items 4, 5, 7 and 14: progress that reads well in a log, quiet closed pipes and double Ctrl-C, errors that
name the variable a bad value came from, shell completion of option values."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import default_sigint, run_dalle
from dallecli.cli import console
from dallecli.cli.app import app
from dallecli.config import config_path

SMALL = ("--steps", "3", "--seed", "1")  # the embedded model at its native 64x64: a few seconds a run
DALLE = Path(sys.executable).with_name("dalle")  # the console script, as a shell's completion hook runs it


def invoke(*args, env=None):
    return CliRunner().invoke(app, list(args), env=env)


# -- item 4: --progress auto|bar|plain|none ---------------------------------------------------------------------
def test_generate_off_a_terminal_writes_whole_lines_a_tenth_at_a_time(tmp_path):
    done = run_dalle("generate", "a red circle", "-n", "4", *SMALL, "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines.count("loading model") == 1 and lines.index("loading model") < 2, done.stderr
    progress = [line for line in lines if line.startswith("generating")]
    percents = [int(line.split()[1].rstrip("%")) for line in progress]
    assert 1 <= len(progress) <= 10 and percents == sorted(set(percents)) and percents[-1] == 100, done.stderr
    assert progress[-1].split()[2] == "12/12"  # 4 images x 3 steps
    assert len(lines) <= 12, done.stderr  # loading + at most ten tenths + a note: bounded however long the job

    quiet = run_dalle("generate", "a red circle", *SMALL, "--out", str(tmp_path / "q"), env={"DALLE_PROGRESS": "none"})
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    flag_wins = run_dalle("generate", "a red circle", *SMALL, "--out", str(tmp_path / "f"), "--progress", "none",
                          env={"DALLE_PROGRESS": "plain"})
    assert flag_wins.returncode == 0 and flag_wins.stderr == "", flag_wins.stderr


def test_batch_log_has_one_loading_line_and_at_most_a_line_per_tenth(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"a red circle {i}\n" for i in range(5)))
    done = run_dalle("batch", "p.txt", *SMALL, "--out", "out", "--batch-size", "1", "--progress", "plain")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and lines.count("loading model") == 1, done.stderr
    progress = [line for line in lines if line.startswith("generating")]
    assert 1 <= len(progress) <= 10 and "15/15" in progress[-1], done.stderr


def test_plain_bar_reports_each_tenth_once_and_the_rich_bar_says_loading(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(console, "err", lambda: Console(file=stream, force_terminal=False, width=200))
    with console.progress_bar(240, "generating", mode="plain") as bar:
        assert (bar.mode, bar.shown) == ("plain", False)
        with bar.loading():
            pass
        for _ in range(240):
            bar.advance()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "loading model" and len(lines) == 11 and "\r" not in stream.getvalue()
    assert [line.split()[1] for line in lines[1:]] == [f"{p}%" for p in range(10, 101, 10)]
    assert lines[-1].startswith("generating  100%  240/240 steps")

    resumed = io.StringIO()  # a resumed run does not report the tenths it had already done
    monkeypatch.setattr(console, "err", lambda: Console(file=resumed, force_terminal=False, width=200))
    with console.progress_bar(10, "training", mode="plain", completed=5) as bar:
        bar.update(completed=6, loss="0.1")
    assert resumed.getvalue().splitlines() == [line for line in resumed.getvalue().splitlines()
                                               if line.startswith("training   60%  6/10")] != []

    monkeypatch.setattr(console, "err", lambda: Console(file=io.StringIO(), force_terminal=True))
    with console.progress_bar(24, "generating", mode="auto") as bar:
        bar.advance(0)
        with bar.loading():
            task = bar.progress.tasks[0]
            assert task.description == "loading model" and task.total is None  # a pulse, not 0/24
        task = bar.progress.tasks[0]
        assert (task.description, task.total, task.completed) == ("generating", 24, 0)
    with console.progress_bar(5, "x", mode="none") as bar:
        assert bar.mode == "none"


def test_progress_mode_comes_from_the_flag_the_variable_the_config_file_then_the_terminal(monkeypatch):
    monkeypatch.setattr(console, "err", lambda: Console(file=io.StringIO(), force_terminal=False))
    assert console.progress_mode() == "plain"
    monkeypatch.setattr(console, "err", lambda: Console(file=io.StringIO(), force_terminal=True))
    assert console.progress_mode() == "bar" and console.progress_mode("none") == "none"
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('progress = "plain"\n', encoding="utf-8")
    assert console.progress_mode() == "plain"
    monkeypatch.setenv("DALLE_PROGRESS", "none")
    assert console.progress_mode() == "none" and console.progress_mode("bar") == "bar"

    from dallecli.errors import UsageError

    with pytest.raises(UsageError, match="unknown --progress 'fast'"):
        console.progress_mode("fast")
    monkeypatch.setenv("DALLE_PROGRESS", "fast")
    with pytest.raises(UsageError, match="unknown DALLE_PROGRESS 'fast'"):
        console.progress_mode()


# -- item 5: closed pipes and Ctrl-C twice -------------------------------------------------------------------
def _piped_into_head(command: list[str], folder: Path) -> tuple[int, str, str]:
    """Run ``command | head -1`` in a real shell pipe; returns (dalle's exit code, head's output, dalle's stderr)."""
    script = (f"{subprocess.list2cmdline(command)} 2>err.txt | head -1 > head.txt; "
              "echo ${PIPESTATUS[0]} > rc.txt")
    subprocess.run(["bash", "-c", script], cwd=folder, check=True, timeout=300)
    return (int((folder / "rc.txt").read_text()), (folder / "head.txt").read_text(),
            (folder / "err.txt").read_text())


def test_generate_into_a_reader_that_closes_early_stops_quietly(tmp_path):
    out = tmp_path / "out"
    code, head, stderr = _piped_into_head([sys.executable, "-m", "dallecli", "generate", "a red circle", "-n", "6",
                                           *SMALL, "--batch-size", "1", "--out", str(out)], tmp_path)
    assert code == 1, stderr  # Python's documented SIGPIPE handling (and Click's, and Rich's)
    assert "error" not in stderr and "Broken pipe" not in stderr and "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr
    kept = sorted(out.iterdir())
    assert Path(head.strip()) == kept[0] and 1 <= len(kept) < 6
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in kept)  # no partial file


def test_batch_into_a_reader_that_closes_early_keeps_what_finished_and_resumes(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"a red circle {i}\n" for i in range(8)))
    args = ["batch", "p.txt", *SMALL, "--batch-size", "1", "--out", "out"]
    code, head, stderr = _piped_into_head([sys.executable, "-m", "dallecli", *args], tmp_path)
    assert code == 1 and "error" not in stderr and "Traceback" not in stderr, stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    done = [r for r in records if r.get("status") == "done"]
    assert head.strip() and 1 <= len(done) < 8
    assert all((tmp_path / "out" / Path(r["path"]).name).is_file() for r in done)
    again = run_dalle(*args)
    assert again.returncode == 0 and f"skipped {len(done)}, generating {8 - len(done)}" in again.stderr, again.stderr


@pytest.mark.parametrize("gap", [0.0, 0.005, 0.03])
def test_ctrl_c_twice_says_interrupted_once_without_a_traceback(tmp_path, gap):
    process = subprocess.Popen([sys.executable, "-m", "dallecli", "generate", "a red circle", "-n", "40", *SMALL,
                                "--batch-size", "1", "--out", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert process.stdout.readline().strip()  # the first image is written
    process.send_signal(signal.SIGINT)
    time.sleep(gap)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "Aborted" not in stderr, stderr
    assert stderr.count("interrupted") == 1 and "finished image(s) kept" in stderr, stderr


# -- item 7: a bad value names its variable ------------------------------------------------------------------
def test_bad_dalle_threads_is_refused_before_torch_is_imported(tmp_path):
    code = ("import sys; from dallecli.cli.app import app; sys.argv=['dalle','generate','a cat']\n"
            "try: app()\nexcept SystemExit as exc: print('exit', exc.code)\n"
            "print(sorted(m for m in ('torch','diffusers','transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, DALLE_THREADS="abc"))
    assert done.stdout.splitlines()[-2:] == ["exit 2", "[]"], done.stdout + done.stderr
    assert done.stderr.strip() == "error: DALLE_THREADS='abc': give a whole number of threads, at least 1 (or unset it)"


@pytest.mark.parametrize("variable, value, said", [
    ("DALLE_DEVICE", "bogus", "unknown DALLE_DEVICE 'bogus'"),
    ("DALLE_DTYPE", "fp13", "unknown DALLE_DTYPE 'fp13'"),
    ("DALLE_SCHEDULER", "fastest", "unknown DALLE_SCHEDULER 'fastest'"),
    ("DALLE_PROGRESS", "fancy", "unknown DALLE_PROGRESS 'fancy'"),
    ("DALLE_THREADS", "0", "DALLE_THREADS='0'"),
    ("DALLE_CONFIG", "/no/such/dalle.toml", "DALLE_CONFIG=/no/such/dalle.toml: no such file"),
])
def test_each_bad_variable_is_a_one_line_usage_error_naming_it(monkeypatch, tmp_path, variable, value, said):
    monkeypatch.setenv(variable, value)
    for args in (["generate", "a cat", "--out", str(tmp_path / "o")], ["batch", "p.txt"], ["models", "list"]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"] and said in result.stderr
        assert "--device" not in result.stderr and "--dtype" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_config_file_value_names_the_file_and_key_and_a_missing_device_names_the_variable(monkeypatch, tmp_path):
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('device = "gpu"\n', encoding="utf-8")
    result = invoke("generate", "a cat")
    assert result.exit_code == 2 and f"unknown 'device' in the config file {path} 'gpu'" in result.stderr
    path.write_text('scheduler = "NoSuchScheduler"\n', encoding="utf-8")  # shaped like a class: looked up later
    result = invoke("generate", "a cat", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and f"'scheduler' in the config file {path}" in result.stderr, result.stderr
    path.unlink()

    monkeypatch.setenv("DALLE_DEVICE", "mps")  # well spelled, absent on this machine
    result = invoke("generate", "a red circle", "--steps", "1", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert "DALLE_DEVICE asks for device 'mps', which is not available here" in result.stderr
    assert result.stderr.count("\n") == 1 and not list((tmp_path / "o").glob("*.png"))
    assert invoke("generate", "a red circle", "--steps", "1", "--device", "cpu", "--progress", "none",
                  "--out", str(tmp_path / "o")).exit_code == 0  # the flag wins over the variable


def test_doctor_lists_bad_variables_instead_of_refusing(monkeypatch):
    monkeypatch.setenv("DALLE_DEVICE", "bogus")
    monkeypatch.setenv("DALLE_THREADS", "many")
    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.output
    problems = json.loads(result.stdout)["problems"]
    assert "unknown DALLE_DEVICE 'bogus'; use auto, cpu, cuda, cuda:N or mps" in problems
    assert any(p.startswith("DALLE_THREADS='many'") for p in problems)


# -- item 14: shell completion --------------------------------------------------------------------------------
def test_completers_offer_the_values_each_option_takes(isolated_home):
    from dallecli.cli import completion

    assert completion.complete_scheduler("dpm") == ["dpm++", "dpm++-karras"]
    assert completion.complete_scheduler("")[:2] == ["default", "euler"]
    assert {"auto", "cpu", "cuda", "mps"} <= set(completion.complete_device(""))
    assert completion.complete_device("c")[:2] == ["cpu", "cuda"]
    assert completion.complete_dtype("") == ["auto", "float32", "float16", "bfloat16"]
    assert completion.complete_dtype("f") == ["float32", "float16"]
    assert completion.complete_format("") == ["png", "jpeg", "webp"]
    assert completion.complete_progress("") == ["auto", "bar", "plain", "none"]

    cached = isolated_home / "hf" / "hub" / "models--someone--tiny-model"
    cached.mkdir(parents=True)
    (isolated_home / "hf" / "hub" / "models--stabilityai--sd-turbo").mkdir()
    models = dict(completion.complete_model(None, ""))
    assert models["shapes"] == "stable-diffusion (embedded)" and models["someone/tiny-model"] == "downloaded"
    assert "downloaded" in models["sd-turbo"] and "GB to download" in models["sdxl"]
    assert "stabilityai/sd-turbo" not in models  # named by its alias
    assert [name for name, _ in completion.complete_model(None, "some")] == ["someone/tiny-model"]
    other = isolated_home / "elsewhere"
    (other / "models--org--only-here").mkdir(parents=True)

    class Ctx:
        params = {"cache_dir": other}

    assert [name for name, _ in completion.complete_model(Ctx, "org")] == ["org/only-here"]
    upscalers = [name for name, _ in completion.complete_upscaler(None, "")]
    assert upscalers == ["sd-x4-upscaler", "sd-x2-latent-upscaler", "someone/tiny-model"]  # any cached repo may be one


def _complete(words: str) -> list[str]:
    """What bash completion offers for ``words`` (Typer's protocol: the hook runs ``dalle`` with these set)."""
    env = dict(os.environ, _DALLE_COMPLETE="complete_bash", COMP_WORDS=words,
               COMP_CWORD=str(len(words.split()) - (0 if words.endswith(" ") else 1)))
    done = subprocess.run([str(DALLE)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not DALLE.exists(), reason="the dalle console script is not installed beside this Python")
def test_bash_completion_through_the_real_entry_point(isolated_home):
    (isolated_home / "hf" / "hub" / "models--someone--tiny-model").mkdir(parents=True)
    assert _complete("dalle generate --scheduler dpm") == ["dpm++", "dpm++-karras"]
    assert _complete("dalle batch p.txt --dtype b") == ["bfloat16"]
    assert _complete("dalle upscale x.png --device m") == ["mps"]
    assert _complete("dalle edit x.png y --progress p") == ["plain"]
    assert "someone/tiny-model" in _complete("dalle generate --model ") and "shapes" in _complete("dalle generate --model s")
    assert _complete("dalle finetune data --progress n") == ["none"]


def test_completion_does_not_import_torch():
    code = ("import os, sys; os.environ.update(_DALLE_COMPLETE='complete_bash', COMP_WORDS='dalle generate --model ', "
            "COMP_CWORD='3'); from dallecli.cli.app import app\n"
            "try: app(prog_name='dalle')\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch','diffusers','transformers','huggingface_hub') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "shapes" in done.stdout.split() and done.stdout.strip().splitlines()[-1] == "[]"
