"""The emoji model's build command (#15, stage 2), end to end with tiny sizes on the nine-emoji fixture: it writes a
pipeline that plain diffusers loads and runs, a learning curve, and a compact checkpoint that a new work folder
resumes from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dallecli.training import build_emoji
from dallecli.training import emoji_judge as judge_mod
from dallecli.training import emoji_source as source

FIXTURE = Path(__file__).resolve().parent / "data" / "emoji"
TINY = ["--concepts", "everyday", "--images", "48", "--ae-steps", "2", "--ae-channels", "8",
        "--unet-channels", "16,16,32", "--text-hidden", "32", "--text-layers", "1", "--batch-size", "4",
        "--eval-concepts", "4", "--eval-per-concept", "1", "--eval-steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The fixture laid out as :func:`emoji_source.fetch_sources` unpacks the npm packages."""
    root = tmp_path_factory.mktemp("emoji-src")
    google = root / source.GOOGLE.stem / "package"
    (google / "img" / "google").mkdir(parents=True)
    shutil.copyfile(FIXTURE / "emoji.json", google / "emoji.json")
    shutil.copytree(FIXTURE / "img", google / "img" / "google" / "64")
    base = root / source.EMOJIBASE.stem / "package" / "en"
    base.mkdir(parents=True)
    shutil.copyfile(FIXTURE / "data.json", base / "data.json")
    return root


@pytest.fixture(scope="module")
def judge(cache, tmp_path_factory) -> Path:
    concepts = source.load_concepts(cache, "everyday")
    trained = judge_mod.train_judge(concepts, judge_mod.JudgeConfig(width=8, steps=2, batch_size=8, seed=0))
    return trained.save(tmp_path_factory.mktemp("judge") / "judge", concepts)


def build(tmp_path: Path, cache: Path, judge: Path, work: str, steps: int, *extra: str) -> Path:
    out = tmp_path / f"model-{work}"
    build_emoji.main(["--out", str(out), "--work", str(tmp_path / work), "--compact", str(tmp_path / f"compact-{work}"),
                      "--cache", str(cache), "--judge", str(judge), "--steps", str(steps), "--save-every", "2",
                      "--eval-every", "2", *TINY, *extra])
    return out


def test_build_writes_a_pipeline_plain_diffusers_runs_and_a_curve(tmp_path, cache, judge):
    from diffusers import DiffusionPipeline

    out = build(tmp_path, cache, judge, "work", 2)
    pipe = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    image = pipe("a cat face on a blue background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    record = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert record["steps"] == 2 and record["concepts"] == "everyday" and "cat" in record["words"]
    curve = build_emoji.read_curve(tmp_path / "work")
    assert [row["step"] for row in curve] == [2]
    assert {"top1", "top5", "background", "size", "position"} <= set(curve[0])
    assert (tmp_path / "work" / "samples-last.png").exists()
    images = np.load(tmp_path / "work" / "images.npy", allow_pickle=False)
    assert images.shape == (48, 64, 64, 3) and images.dtype == np.uint8


def test_compact_checkpoint_resumes_in_a_new_work_folder(tmp_path, cache, judge):
    build(tmp_path, cache, judge, "first", 2)
    compact = tmp_path / "compact-first"
    assert json.loads((compact / build_emoji.COMPACT_RECORD).read_text(encoding="utf-8"))["step"] == 2
    assert sorted(p.name for p in compact.iterdir()) == ["compact-ema.safetensors", "compact.json", "compact.safetensors",
                                                          "tokenizer", "vae"]

    out = build(tmp_path, cache, judge, "second", 4, "--resume-from-compact", str(compact))
    log = (tmp_path / "second" / "log.txt").read_text(encoding="utf-8")
    assert "at step 2 (optimizer moments restart)" in log
    assert json.loads((out / "training.json").read_text(encoding="utf-8"))["steps"] == 4
    assert json.loads((tmp_path / "compact-second" / "compact.json").read_text(encoding="utf-8"))["step"] == 4
    assert [row["step"] for row in build_emoji.read_curve(tmp_path / "second")] == [4]


def test_a_signal_during_the_data_stages_ends_the_build_at_once(tmp_path, cache, judge):
    """SIGTERM before the training loop (here: in a long autoencoder stage) used to be only noted, so `kill` left the
    build running for the whole stage; now it exits with 128 + the signal and the next run resumes from the cache."""
    import os
    import signal
    import subprocess
    import sys
    import time

    work = tmp_path / "work"
    command = [sys.executable, "-m", "dallecli.training.build_emoji", "--out", str(tmp_path / "model"),
               "--work", str(work), "--cache", str(cache), "--judge", str(judge), *TINY]
    command[command.index("--ae-steps") + 1] = "1000000"
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (work / "log.txt").exists() or "concepts" not in (work / "log.txt").read_text(encoding="utf-8"):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    try:
        code = process.wait(timeout=30)
    finally:
        process.kill()
    assert code == 128 + signal.SIGTERM
    assert (work / "images.npy").exists() and not (work / "vae").exists()  # the finished stage kept, none half-written


def test_a_subset_is_evenly_spaced_and_keeps_the_coloured_shapes(cache):
    concepts = source.load_concepts(cache, "everyday")
    shapes = [c for c in concepts if c.id in source.SHAPE_EMOJI]
    subset = build_emoji.evenly_spaced(concepts, len(shapes) + 2)
    assert len(subset) == len(shapes) + 2 and set(shapes) <= set(subset)
    assert [c for c in concepts if c in subset] == subset  # in emoji order
    with pytest.raises(ValueError):
        build_emoji.evenly_spaced(concepts, len(shapes) - 1)


def test_a_bundle_holds_the_selection_and_loads_as_a_cache(tmp_path, cache):
    (cache / "sources.json").write_text("[]\n", encoding="utf-8")
    copied = source.bundle_selection(cache, tmp_path / "bundle", "core")
    concepts = source.load_concepts(cache, "core")
    bundled = source.load_concepts(tmp_path / "bundle", "core")
    assert copied == len(concepts) == len(bundled) > 0
    assert [(c.id, c.name, c.keywords) for c in bundled] == [(c.id, c.name, c.keywords) for c in concepts]
    images = list((tmp_path / "bundle").rglob("*.png"))
    assert sorted(p.name for p in images) == sorted(c.image.name for c in concepts)  # nothing outside the selection


def test_a_time_limit_with_pipeline_on_stop_writes_what_it_reached(tmp_path, cache, judge):
    out = build(tmp_path, cache, judge, "work", 50, "--time-limit", "0.0001", "--pipeline-on-stop")
    record = json.loads((out / "training.json").read_text(encoding="utf-8"))
    assert 1 <= record["steps"] < 50
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    compact = json.loads((tmp_path / "compact-work" / build_emoji.COMPACT_RECORD).read_text(encoding="utf-8"))
    assert compact["step"] == record["steps"]
