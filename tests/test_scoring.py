"""CLIP scoring and best-of-K reranking (#16): `dalle score`, `--rerank K` in generate and batch, the embedded
scorer's accuracy, and the download -> score -> rerank path with a Hub CLIP replica."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_dalle

PROMPT = "a red circle on a blue background"


def _cli(*args: str):
    from typer.testing import CliRunner

    from dallecli.cli.app import app

    return CliRunner().invoke(app, list(args))


def _meta(path: str | Path) -> dict:
    from dallecli.images import read_metadata

    return read_metadata(Path(path))


def test_score_is_the_clip_score_metric_and_ranks_best_first():
    from dallecli.scoring.clip import Score
    from dallecli.scoring.rerank import rank_group

    scores = [Score(0.0, -0.2), Score(31.0, 0.31), Score(31.0, 0.31), Score(12.5, 0.125)]
    ranked = rank_group(["a", "b", "c", "d"], scores, group=3)
    assert [r.result for r in ranked] == ["b", "c", "d", "a"]  # ties go to the earlier candidate (lower seed)
    assert [r.rank for r in ranked] == [1, 2, 3, 4] and {r.group for r in ranked} == {3}
    assert {r.candidates for r in ranked} == {4}


def test_embedded_scorer_tells_each_attribute_from_a_one_word_change():
    """On 400 freshly rendered scenes, the true caption outscores its twin with one attribute changed."""
    from dallecli.scoring.clip import ClipScorer
    from dallecli.training.build_scorer import make_data

    images, captions, negatives, changed = make_data(400, seed=777)
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    scorer = ClipScorer.load(None, device="cpu")
    true = scorer.score(pil, captions)
    false = scorer.score(pil, negatives)
    wins: dict[str, list[bool]] = {}
    for attribute, a, b in zip(changed, true, false):
        wins.setdefault(attribute, []).append(a.cosine > b.cosine)
    accuracy = {k: sum(v) / len(v) for k, v in wins.items()}
    assert set(accuracy) == {"colour", "shape", "background", "size", "position"}
    assert min(accuracy.values()) >= 0.85, accuracy
    # the score is the metric's: 100 x cosine, floored at 0, in [0, 100]
    assert all(s.clip_score == pytest.approx(max(100 * s.cosine, 0), abs=1e-3) for s in true)
    assert all(0 <= s.clip_score <= 100 for s in true + false)


def test_dalle_score_uses_the_stored_prompt_or_the_given_one(tmp_path):
    # in-process (CliRunner): five CLI runs in subprocesses cost 19 s of imports; the entry point is run for real
    # by the other tests here
    made = _cli("generate", PROMPT, "-n", "2", "--seed", "3", "--out", str(tmp_path / "out"), "--json",
                "--progress", "none")
    assert made.exit_code == 0, made.stderr
    paths = [image["path"] for image in json.loads(made.stdout)["images"]]
    plain = tmp_path / "plain.png"
    Image.new("RGB", (64, 64), (35, 70, 225)).save(plain)  # no metadata: no stored prompt
    stored = _cli("score", *paths, str(plain), "--json")
    assert stored.exit_code == 0, stored.stderr
    document = json.loads(stored.stdout)
    assert document["scorer"]["name"] == "shapes-clip"
    rows = document["images"]
    assert [r["prompt"] for r in rows] == [PROMPT, PROMPT, None]
    assert rows[2]["clip_score"] is None and "give --prompt" in rows[2]["problem"]
    assert "plain.png: stores no prompt" in stored.stderr

    from dallecli.scoring.clip import ClipScorer

    direct = ClipScorer.load(None).score([Image.open(p) for p in paths], [PROMPT, PROMPT])
    assert [r["clip_score"] for r in rows[:2]] == [s.clip_score for s in direct]
    against = json.loads(_cli("score", paths[0], "--prompt", "a green triangle on a white background",
                                   "--json").stdout)["images"][0]
    assert against["cosine"] < rows[0]["cosine"]  # the image matches its own prompt better
    table = _cli("score", *paths)
    assert table.exit_code == 0
    assert [line.split()[0] for line in table.stdout.splitlines()] == [f"{r['clip_score']:.2f}" for r in rows[:2]]
    none_scored = _cli("score", str(plain))
    assert none_scored.exit_code == 1 and "no image was scored" in none_scored.stderr


def test_dalle_score_on_a_batch_folder_writes_a_scored_copy_of_the_manifest(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\na small yellow square in the top left corner, black background\n")
    folder = tmp_path / "run"
    assert _cli("batch", str(prompts), "--out", str(folder), "--seed", "1", "--progress", "none").exit_code == 0
    manifest = (folder / "manifest.jsonl").read_bytes()
    scored = _cli("score", str(folder), "--json")
    assert scored.exit_code == 0, scored.stderr
    document = json.loads(scored.stdout)
    assert document["manifests"] == [str(folder / "manifest.scores.jsonl")]
    assert (folder / "manifest.jsonl").read_bytes() == manifest  # the original is never rewritten
    lines = [json.loads(line) for line in (folder / "manifest.scores.jsonl").read_text().splitlines()]
    by_path = {Path(r["path"]).name: r["clip_score"] for r in document["images"]}
    images = [line for line in lines if line.get("type") == "image"]
    assert len(images) == 2 and all(line["clip_score"] == by_path[line["path"]] for line in images)
    assert all(line["scorer"] == "shapes-clip" for line in images)
    assert lines[0]["type"] == "run"


def test_generate_rerank_keeps_the_best_candidate_which_replays_alone(tmp_path):
    out = tmp_path / "out"
    made = _cli("generate", PROMPT, "-n", "2", "--seed", "5", "--rerank", "3", "--keep-candidates",
                "--out", str(out), "--json", "--progress", "none")
    assert made.exit_code == 0, made.stderr
    winners = json.loads(made.stdout)["images"]
    assert len(winners) == 2 and len(list((out / "candidates").glob("*.png"))) == 4
    candidates = [_meta(p) for p in sorted((out / "candidates").glob("*.png"))]
    for number, winner in enumerate(winners):
        meta = _meta(winner["path"])
        record = meta["rerank"]
        assert record["candidate_seeds"] == [5 + 3 * number + j for j in range(3)]
        assert record["rank"] == 1 and record["candidates"] == 3 and record["scorer"] == "shapes-clip"
        assert meta["seed"] in record["candidate_seeds"] and winner["clip_score"] == record["clip_score"]
        losers = [c for c in candidates if c["rerank"]["candidate_seeds"] == record["candidate_seeds"]]
        assert sorted(c["rerank"]["rank"] for c in losers) == [2, 3]
        assert all(c["rerank"]["cosine"] <= record["cosine"] for c in losers)
        assert {c["seed"] for c in losers} | {meta["seed"]} == set(record["candidate_seeds"])
    # the replay in a fresh process, as a user reruns it
    replay = run_dalle("generate", "--from", winners[1]["path"], "--out", str(tmp_path / "again"), "--json",
                       "--progress", "none")
    assert replay.returncode == 0, replay.stderr
    again = json.loads(replay.stdout)["images"]
    assert len(again) == 1 and again[0]["seed"] == winners[1]["seed"]
    assert np.array_equal(np.asarray(Image.open(again[0]["path"])), np.asarray(Image.open(winners[1]["path"])))
    assert "rerank" not in _meta(again[0]["path"])


@pytest.mark.parametrize("args, message", [
    (["--rerank", "1"], "--rerank must be from 2 to 64"),
    (["--rerank", "65"], "--rerank must be from 2 to 64"),
    (["--keep-candidates"], "--keep-candidates needs --rerank K"),
    (["--scorer", "clip-vit-base-patch32"], "--scorer needs --rerank K"),
    (["--rerank", "2", "--server", "http://127.0.0.1:9"], "--rerank runs locally only"),
])
def test_rerank_usage_errors_exit_2_before_anything_loads(args, message, tmp_path):
    done = run_dalle("generate", PROMPT, "--out", str(tmp_path / "o"), *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not list(tmp_path.glob("o/*.png"))


def test_a_scorer_that_is_not_downloaded_is_named_with_the_command_that_gets_it(tmp_path):
    done = run_dalle("generate", PROMPT, "--out", str(tmp_path / "o"), "--rerank", "2", "--scorer",
                     "clip-vit-base-patch32")
    assert done.returncode != 0 and "dalle download clip-vit-base-patch32" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("o/*.png"))


def test_batch_rerank_records_the_winner_and_resumes_by_its_key(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\ngreen triangle, white background\n")
    folder = tmp_path / "run"
    args = ["batch", str(prompts), "--out", str(folder), "--seed", "100", "--rerank", "2", "--progress", "none"]
    first = _cli(*args, "--json")
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["images"] == 2
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()][1:]
    for record in records:
        seeds = [100 + 1000 * record["row"] + j for j in range(2)]
        assert record["rerank"] == 2 and record["scorer"] == "shapes-clip"  # part of the resume key
        assert record["reranked"]["candidate_seeds"] == seeds and record["seed"] == seeds[0]
        assert record["reranked"]["winner_seed"] in seeds
        meta = _meta(folder / record["path"])
        assert meta["seed"] == record["reranked"]["winner_seed"] and meta["rerank"]["rank"] == 1
        assert meta["rerank"]["clip_score"] == record["reranked"]["clip_score"]
    again = _cli(*args, "--json")
    assert json.loads(again.stdout)["skipped"] == 2 and json.loads(again.stdout)["images"] == 0
    other = _cli(*args[:-2], "--rerank", "3", "--progress", "none", "--json")  # another K: another key
    assert json.loads(other.stdout)["images"] == 2


def test_download_score_and_rerank_with_a_hub_clip_replica(replica_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", replica_hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    got = run_dalle("download", "clip-vit-base-patch32")
    assert got.returncode == 0, got.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # scoring never touches the network
    made = run_dalle("generate", PROMPT, "--seed", "9", "--rerank", "2", "--scorer", "clip-vit-base-patch32",
                     "--out", str(tmp_path / "o"), "--json", "--progress", "none")
    assert made.returncode == 0, made.stderr
    record = _meta(json.loads(made.stdout)["images"][0]["path"])["rerank"]
    assert record["scorer"] == "clip-vit-base-patch32" and len(record["scorer_revision"]) == 40
    scored = json.loads(run_dalle("score", str(tmp_path / "o"), "--scorer", "clip-vit-base-patch32", "--json").stdout)
    assert scored["images"][0]["cosine"] == pytest.approx(record["cosine"], abs=1e-5)
