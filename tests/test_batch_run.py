"""dalle batch with a tiny random pipeline: batches, manifest, resume, failures, Ctrl-C, shards, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import default_sigint, run_dalle
from dallecli.cli.app import app
from dallecli.engine.generate import Engine


def tiny(tiny_pipeline, *extra: str) -> list[str]:
    return ["--model", str(tiny_pipeline), "--width", "32", "--height", "32", "--steps", "2", *extra]


def invoke(*args: str):
    return CliRunner().invoke(app, ["batch", *args])


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def images(folder):
    return sorted(p.name for p in folder.glob("*.png") if not p.name.startswith("grid"))


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def close(a, b, tolerance: int = 2) -> bool:
    """Same image up to float summation order: a batch of another size can round a few pixels the other way."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= tolerance


@pytest.fixture
def passes(monkeypatch):
    """Record the (prompts, steps) of every forward pass made through Engine.generate_items."""
    calls = []
    original = Engine.generate_items

    def spy(self, items, request, on_step=None):
        calls.append(([prompt for prompt, _ in items], request.steps))
        return original(self, items, request, on_step)

    monkeypatch.setattr(Engine, "generate_items", spy)
    return calls


def test_c08_partial_last_batch_manifest_and_resume(tiny_pipeline, tmp_path, passes):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\na cat\n")
    args = ["p.txt", *tiny(tiny_pipeline, "--batch-size", "2", "-n", "2", "--seed", "5", "--out", "out", "--grid")]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert len(images(out)) == 6 and (out / "grid.png").is_file()
    assert [len(prompts) for prompts, _ in passes] == [2, 2, 2]
    assert result.stdout.splitlines() == [f"out/{name}" for name in images(out)]
    header, *records = manifest(out)
    assert header["type"] == "run" and header["base_seed"] == 5
    assert [(r["row"], r["image"], r["seed"]) for r in sorted(records, key=lambda r: (r["row"], r["image"]))] == [
        (0, 0, 5), (0, 1, 6), (1, 0, 1005), (1, 1, 1006), (2, 0, 2005), (2, 1, 2006)]
    for record in records:
        assert record["status"] == "done" and (out / record["path"]).is_file()
        assert record["steps"] == 2 and record["width"] == 32 and record["model"] == str(tiny_pipeline)
        assert record["seconds"] > 0 and record["line"] == record["row"] + 1
        stored = json.loads(Image.open(out / record["path"]).text["dalle"])
        assert (stored["prompt"], stored["seed"]) == (record["prompt"], record["seed"])
    assert "skipped 0, generating 6" in result.stderr and "images/s" in result.stderr

    # the same command again: nothing to do, nothing written
    before = (out / "manifest.jsonl").read_bytes()
    passes.clear()
    result = invoke(*args[:-1], "--json")
    assert result.exit_code == 0, result.output
    assert "skipped 6, generating 0" in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["skipped"], summary["failed"], summary["base_seed"]) == (0, 6, 0, 5)
    assert passes == [] and (out / "manifest.jsonl").read_bytes() == before and len(images(out)) == 6

    # a deleted image is made again, identical, under the same name; nothing else is touched
    victim = out / records[3]["path"]
    original = pixels(victim)
    victim.unlink()
    result = invoke(*args[:-1])
    assert result.exit_code == 0, result.output
    assert "skipped 5, generating 1" in result.stderr
    assert victim.is_file() and close(pixels(victim), original)  # made alone now, in a pass of 2 before
    assert len(images(out)) == 6

    # --overwrite makes everything again, replacing the files
    result = invoke(*args[:-1], "--overwrite")
    assert result.exit_code == 0, result.output
    assert "skipped 0, generating 6" in result.stderr and len(images(out)) == 6


def test_grouping_by_settings_and_seeds_independent_of_batch_size(tiny_pipeline, tmp_path, passes):
    lines = ['{"prompt": "a cat"}', '{"prompt": "a red circle", "steps": 3}', '{"prompt": "a blue square"}',
             '{"prompt": "the knight", "steps": 3}', '{"prompt": "a photo", "seed": 77}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    result = invoke("p.jsonl", *tiny(tiny_pipeline, "--seed", "1", "--batch-size", "3", "--out", "big"))
    assert result.exit_code == 0, result.output
    assert passes == [(["a cat", "a blue square", "a photo"], 2), (["a red circle", "the knight"], 3)]
    result = invoke("p.jsonl", *tiny(tiny_pipeline, "--seed", "1", "--batch-size", "1", "--out", "one"))
    assert result.exit_code == 0, result.output
    big = {(r["row"], r["seed"]): r["path"] for r in manifest(tmp_path / "big")[1:]}
    one = {(r["row"], r["seed"]): r["path"] for r in manifest(tmp_path / "one")[1:]}
    assert big.keys() == one.keys() == {(0, 1), (1, 1001), (2, 2001), (3, 3001), (4, 77)}
    for key, name in big.items():
        assert name == one[key]
        assert close(pixels(tmp_path / "big" / name), pixels(tmp_path / "one" / name)), key


def test_malformed_rows_stop_before_anything_unless_skipped(tiny_pipeline, tmp_path, passes):
    (tmp_path / "p.csv").write_text("prompt,width\na cat,32\na dog,30\n,32\na bird,\n")
    result = invoke("p.csv", *tiny(tiny_pipeline, "--out", "out"))
    assert result.exit_code == 2
    assert "line 3:" in result.stderr and "line 4:" in result.stderr and "--skip-invalid" in result.stderr
    assert not (tmp_path / "out").exists() and passes == []
    result = invoke("p.csv", *tiny(tiny_pipeline, "--out", "out", "--skip-invalid", "--seed", "0"))
    assert result.exit_code == 0, result.output
    assert sorted(r["row"] for r in manifest(tmp_path / "out")[1:]) == [0, 3]  # rows keep their numbers


def test_failed_row_is_recorded_the_run_goes_on_and_a_rerun_retries_it(tiny_pipeline, tmp_path, monkeypatch):
    original = Engine.generate_items

    def flaky(self, items, request, on_step=None):
        if any("square" in prompt for prompt, _ in items):
            raise RuntimeError("simulated failure")
        return original(self, items, request, on_step)

    monkeypatch.setattr(Engine, "generate_items", flaky)
    (tmp_path / "p.txt").write_text("a cat\na blue square\na red circle\n")
    args = ["p.txt", *tiny(tiny_pipeline, "--batch-size", "3", "--out", "out")]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "1 image(s) failed" in result.stderr and "re-run" in result.stderr
    records = manifest(tmp_path / "out")
    failed = [r for r in records if r.get("status") == "failed"]
    assert [(r["row"], r["line"], r["prompt"]) for r in failed] == [(1, 2, "a blue square")]
    assert "simulated failure" in failed[0]["error"]
    assert sorted(r["row"] for r in records if r.get("status") == "done") == [0, 2]
    monkeypatch.setattr(Engine, "generate_items", original)
    result = invoke(*args)  # no --seed: the base seed comes back from the manifest
    assert result.exit_code == 0, result.output
    assert "skipped 2, generating 1" in result.stderr
    assert {r["base_seed"] for r in manifest(tmp_path / "out")[1:]} == {records[0]["base_seed"]}


def test_ctrl_c_discards_the_pass_in_progress_and_says_how_to_resume(tiny_pipeline, tmp_path, monkeypatch):
    original = Engine.generate_items
    calls = []

    def interrupted(self, items, request, on_step=None):
        calls.append(items)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, items, request, on_step)

    monkeypatch.setattr(Engine, "generate_items", interrupted)
    (tmp_path / "p.txt").write_text("a cat\na blue square\na red circle\n")
    args = ["p.txt", *tiny(tiny_pipeline, "--batch-size", "1", "--out", "out")]
    result = invoke(*args)
    assert result.exit_code == 130
    assert "Resume with: dalle" in result.stderr and "discarded" in result.stderr
    assert result.stderr.count("interrupted") == 1
    out = tmp_path / "out"
    assert len(images(out)) == 1 and not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(Engine, "generate_items", original)
    result = invoke(*args)
    assert result.exit_code == 0 and "skipped 1, generating 2" in result.stderr
    assert len(images(out)) == 3


def test_image_written_but_not_recorded_is_adopted(tiny_pipeline, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na red circle\n")
    args = ["p.txt", *tiny(tiny_pipeline, "--out", "out", "--seed", "3")]
    assert invoke(*args).exit_code == 0
    path = tmp_path / "out" / "manifest.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # as if stopped between the PNG and its manifest line
    result = invoke(*args)
    assert result.exit_code == 0 and "skipped 2, generating 0" in result.stderr
    assert len(images(tmp_path / "out")) == 2


def test_two_shards_in_parallel_fill_one_folder_like_an_unsharded_run(tiny_pipeline, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na red circle\na blue square\nthe knight\na photo\n")
    common = ["batch", "p.txt", *tiny(tiny_pipeline, "-n", "2", "--batch-size", "2", "--out", "shared")]
    # one thread everywhere: the thread policy gives shards started together one thread each (they measure one
    # another), and another thread count may move a pixel by a level; this test is about the folder and the seeds
    env = dict(os.environ, DALLE_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "dallecli", *common, "--shard", f"{i}/2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    records = manifest(tmp_path / "shared")
    assert [r["type"] for r in records].count("run") == 1  # no --seed: both shards used the one base seed
    base_seed = records[0]["base_seed"]
    done = [r for r in records if r["type"] == "image"]
    assert {r["base_seed"] for r in done} == {base_seed}
    assert sorted((r["row"], r["shard"]) for r in done) == [(r, f"{r % 2}/2") for r in range(5) for _ in range(2)]
    assert len(images(tmp_path / "shared")) == 10

    # same --batch-size: with -n 2 every pass holds one row's two images, sharded or not, so pixels match exactly
    result = run_dalle("batch", "p.txt", *tiny(tiny_pipeline, "-n", "2", "--batch-size", "2", "--out", "single",
                                               "--seed", str(base_seed)), env={"DALLE_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    single = {(r["row"], r["image"], r["seed"]): r["path"] for r in manifest(tmp_path / "single")[1:]}
    sharded = {(r["row"], r["image"], r["seed"]): r["path"] for r in done}
    assert single.keys() == sharded.keys()
    for key, name in single.items():
        assert sharded[key] == name
        assert np.array_equal(pixels(tmp_path / "single" / name), pixels(tmp_path / "shared" / name)), key

    # the same shard again through the real entry point: nothing to do
    again = run_dalle(*common, "--shard", "1/2")
    assert again.returncode == 0 and "skipped 4, generating 0" in again.stderr


def test_exit_codes_through_the_real_entry_point(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "width": 30}\n')
    result = run_dalle("batch", "bad.jsonl", "--out", "out")
    assert result.returncode == 2 and "line 2:" in result.stderr and "width 30" in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "p.txt").write_text("a cat\n")
    assert run_dalle("batch", "p.txt", "--shard", "2/2").returncode == 2
    assert run_dalle("batch", "missing.txt").returncode == 2


def test_sigint_exits_130_and_the_next_run_resumes(tiny_pipeline, tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"a red circle {i}\n" for i in range(16)))
    args = [sys.executable, "-m", "dallecli", "batch", "p.txt",
            *tiny(tiny_pipeline, "--batch-size", "1", "--out", "out", "--seed", "0")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    first = proc.stdout.readline()  # the first image is written
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert first.strip() and proc.returncode == 130, stderr
    assert "Resume with:" in stderr
    out = tmp_path / "out"
    done = len([r for r in manifest(out) if r.get("status") == "done"])
    assert 1 <= done < 16 and len(images(out)) == done
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    again = run_dalle("batch", "p.txt", *tiny(tiny_pipeline, "--batch-size", "4", "--out", "out", "--seed", "0"))
    assert again.returncode == 0 and f"skipped {done}, generating {16 - done}" in again.stderr
    assert len(images(out)) == 16


# -- #18 item 4: names stay tied to rows, the resume key holds the engine's settings, paths stay inside ----------
def test_rerun_with_another_dtype_makes_images_again_under_their_own_row_numbers(tiny_pipeline, tmp_path):
    """#18 item 4: dtype, VAE, LoRAs and revision are in the resume key (a re-run with another dtype counted the
    old images as done), and the new images clash with the old names: they keep their row's number and take a
    copy tag instead of drifting to the next row's number."""
    (tmp_path / "p.txt").write_text("a red circle\na red circle\n")  # same prompt: only the number and seed differ
    args = ["p.txt", *tiny(tiny_pipeline, "--out", "out", "--seed", "1000")]  # row 1 image 0 = seed 2000
    assert invoke(*args, "--dtype", "float32").exit_code == 0  # not auto: that is bfloat16 on AMX CPUs
    (tmp_path / "p.txt").write_text("a red circle\na red circle\n")
    result = invoke(*args, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "skipped 0, generating 2" in result.stderr
    records = [r for r in manifest(tmp_path / "out")[1:] if r["status"] == "done"]
    assert len(records) == 4 and {r["dtype"] for r in records} == {"float32", "bfloat16"}
    for record in records:
        assert record["path"].startswith(f"{record['row']:04d}-{record['seed']}-"), record["path"]
        assert {"vae", "loras", "model_revision"} <= record.keys()
    assert sorted(r["path"] for r in records if r["dtype"] == "bfloat16") == [
        "0000-1000-a-red-circle.2.png", "0001-2000-a-red-circle.2.png"]
    again = invoke(*args, "--dtype", "bfloat16")  # the same settings again: done
    assert again.exit_code == 0 and "skipped 2, generating 0" in again.stderr


def test_a_manifest_from_before_the_new_key_still_resumes(tiny_pipeline, tmp_path):
    """#18 item 4: a record without vae/loras/model_revision takes them from its image's metadata: done for the
    same settings; an image without readable metadata, or a damaged line, does not count and does not crash."""
    (tmp_path / "p.txt").write_text("a cat\na red circle\n")
    args = ["p.txt", *tiny(tiny_pipeline, "--out", "out", "--seed", "3")]
    assert invoke(*args).exit_code == 0
    path = tmp_path / "out" / "manifest.jsonl"
    header, *records = manifest(tmp_path / "out")
    old = [{k: v for k, v in r.items() if k not in ("vae", "loras", "model_revision")} for r in records]
    old.append({**old[0], "guidance_scale": "junk", "loras": {"x": 1}, "path": ["not", "a", "name"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in [header, *old]))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "skipped 2, generating 0" in result.stderr
    (tmp_path / "out" / old[1]["path"]).write_bytes(b"not a png")  # its metadata is gone: made again
    result = invoke(*args)
    assert result.exit_code == 0 and "skipped 1, generating 1" in result.stderr


def test_overwrite_never_deletes_or_reads_a_path_outside_the_folder(tiny_pipeline, tmp_path):
    """#18 item 4: manifest paths that leave the folder (``../x.png``, absolute) are not images of the run."""
    (tmp_path / "p.txt").write_text("a cat\na red circle\n")
    args = ["p.txt", *tiny(tiny_pipeline, "--out", "out", "--seed", "3")]
    assert invoke(*args).exit_code == 0
    outside = tmp_path / "keep.png"
    outside.write_bytes(b"precious")
    absolute = tmp_path / "also-keep.png"
    absolute.write_bytes(b"precious too")
    path = tmp_path / "out" / "manifest.jsonl"
    header, first, second = manifest(tmp_path / "out")
    for record in (first, second):
        (tmp_path / "out" / record["path"]).unlink()
    first["path"], second["path"] = "../keep.png", str(absolute)
    path.write_text("".join(json.dumps(r) + "\n" for r in [header, first, second]))
    result = invoke(*args, "--grid")  # not done: the files outside do not count (nor go into the grid)
    assert result.exit_code == 0 and "skipped 0, generating 2" in result.stderr
    path.write_text("".join(json.dumps(r) + "\n" for r in [header, first, second]))
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert outside.read_bytes() == b"precious" and absolute.read_bytes() == b"precious too"


def test_stdin_prompts_resume_from_the_saved_copy_after_ctrl_c(tiny_pipeline, tmp_path, monkeypatch):
    """#19 item 11: `dalle batch -` reads stdin; the prompts are kept beside the manifest, Ctrl-C names the
    command that feeds them again, and a rerun with the same stdin resumes."""
    original = Engine.generate_items
    calls = []

    def interrupted(self, items, request, on_step=None):
        calls.append(items)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, items, request, on_step)

    monkeypatch.setattr(Engine, "generate_items", interrupted)
    prompts = "a cat\n# a comment\na red circle\n"
    args = ["-", *tiny(tiny_pipeline, "--batch-size", "1", "--out", "out", "--seed", "3")]
    result = CliRunner().invoke(app, ["batch", *args], input=prompts)
    assert result.exit_code == 130, result.output
    copies = list((tmp_path / "out").glob("stdin-*.txt"))
    assert len(copies) == 1 and copies[0].read_text() == prompts
    assert "Resume with: dalle " in result.stderr and f"< out/{copies[0].name}" in result.stderr
    header, *records = manifest(tmp_path / "out")
    assert header["source"] == "stdin" and [r["prompt"] for r in records] == ["a cat"]
    monkeypatch.setattr(Engine, "generate_items", original)
    result = CliRunner().invoke(app, ["batch", *args], input=copies[0].read_text())
    assert result.exit_code == 0 and "stdin: 2 prompt(s); skipped 1, generating 1" in result.stderr
    assert [(r["row"], r["line"], r["seed"]) for r in manifest(tmp_path / "out")[1:]] == [(0, 1, 3), (1, 3, 1003)]
    result = CliRunner().invoke(app, ["batch", *args], input=prompts)
    assert "skipped 2, generating 0" in result.stderr and len(list((tmp_path / "out").glob("stdin-*"))) == 1


def test_stdin_takes_input_format_and_dry_run(tmp_path):
    """#19 item 11: --input-format for stdin (default txt) and for a file without a suffix; no model loads."""
    jsonl = '{"prompt": "a cat", "n": 3}\n{"prompt": "a dog"}\n'
    done = CliRunner().invoke(app, ["batch", "-", "--input-format", "jsonl", "--dry-run", "--model", "org/none"],
                              input=jsonl)
    assert done.exit_code == 0, done.output
    assert done.stdout == "2 prompt(s), 4 image(s)\n"
    as_text = CliRunner().invoke(app, ["batch", "-", "--dry-run"], input=jsonl)
    assert as_text.stdout == "2 prompt(s), 2 image(s)\n"  # txt: each line is a prompt
    (tmp_path / "prompts").write_text("prompt;n\na cat;2\n")
    unknown = CliRunner().invoke(app, ["batch", "prompts", "--dry-run"])
    assert unknown.exit_code == 2 and "--input-format" in unknown.stderr and len(unknown.stderr.splitlines()) == 1
    sniffed = CliRunner().invoke(app, ["batch", "prompts", "--input-format", "csv", "--dry-run"])
    assert sniffed.stdout == "1 prompt(s), 2 image(s)\n" and "delimiter ';'" in sniffed.stderr
    utf16 = CliRunner().invoke(app, ["batch", "-", "--dry-run"], input="\ufeffa cat\na dog\n".encode("utf-16-le"))
    assert utf16.stdout == "2 prompt(s), 2 image(s)\n" and "read as utf-16-le" in utf16.stderr
    bad = CliRunner().invoke(app, ["batch", "-", "--input-format", "xml", "--dry-run"], input="a cat\n")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --input-format 'xml' is not a prompt format")
    assert not (tmp_path / "dalle-out").exists()


def test_manifest_scheduler_records_what_ran_and_old_manifests_still_resume(tiny_pipeline, tmp_path):
    """#19 item 12: `scheduler` is the scheduler that ran (the tiny model's own DDIM: "ddim"), not "default";
    `requested_scheduler` keeps the --scheduler value for the resume key; a manifest written before (scheduler
    "default", the real one in "sampler") resumes, and a rerun with another --scheduler makes the images again."""
    (tmp_path / "p.txt").write_text("a cat\na red circle\n")
    args = ["p.txt", *tiny(tiny_pipeline, "--out", "out", "--seed", "3")]
    assert invoke(*args).exit_code == 0
    header, *records = manifest(tmp_path / "out")
    assert [(r["scheduler"], r["requested_scheduler"]) for r in records] == [("ddim", "default")] * 2
    assert all("sampler" not in r for r in records)
    stored = json.loads(Image.open(tmp_path / "out" / records[0]["path"]).text["dalle"])
    assert stored["scheduler"] == records[0]["scheduler"]
    old = [{**{k: v for k, v in r.items() if k != "requested_scheduler"}, "scheduler": "default",
            "sampler": r["scheduler"]} for r in records]
    (tmp_path / "out" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [header, *old]))
    assert "skipped 2, generating 0" in invoke(*args).stderr
    euler = invoke(*args, "--scheduler", "euler")
    assert euler.exit_code == 0 and "skipped 0, generating 2" in euler.stderr
    new = manifest(tmp_path / "out")[-2:]
    assert [(r["scheduler"], r["requested_scheduler"]) for r in new] == [("euler", "euler")] * 2
    assert "skipped 2, generating 0" in invoke(*args, "--scheduler", "euler").stderr
