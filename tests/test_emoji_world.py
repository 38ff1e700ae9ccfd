"""The emoji world (#15, stage 1): sources, filtering, rendering, captions, the judge. Offline, on a fixture of
nine real Noto emoji (tests/data/emoji, with its licences)."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dallecli.training import emoji_judge as judge_mod
from dallecli.training import emoji_source as source
from dallecli.training import emoji_world as world

FIXTURE = Path(__file__).resolve().parent / "data" / "emoji"


@pytest.fixture(scope="module")
def parsed() -> list[source.Concept]:
    return source.parse_concepts(FIXTURE / "emoji.json", FIXTURE / "data.json", FIXTURE / "img")


@pytest.fixture(scope="module")
def concepts(parsed) -> list[source.Concept]:
    return source.select(parsed, "everyday")


def by_name(concepts, name):
    return next(c for c in concepts if c.name == name)


# ---------------------------------------------------------------------------------------------- sources

def test_parse_joins_names_and_keywords(parsed):
    cat = by_name(parsed, "cat face")
    assert cat.char == "\U0001F431" and cat.category == "Animals & Nature" and cat.short_names == ("cat",)
    assert "kitten" in cat.keywords and "animal" not in cat.keywords  # generic tags are not names
    assert cat.image == FIXTURE / "img" / "1f431.png"
    assert len([c for c in parsed if c.id.startswith("1F44B")]) == 1  # skin tones are not separate concepts


def test_selection_drops_flags_keycaps_variants_and_symbols_but_keeps_shapes(parsed, concepts):
    assert {c.name for c in concepts} == {"cat face", "rocket", "red apple", "dog face", "red circle",
                                          "blue square", "red triangle", "astronaut"}
    broad = {c.name: source.keep_concept(c, "broad") for c in parsed}
    assert broad["waving hand"] and broad["astronaut"]
    dropped = [name for name, kept in broad.items() if not kept]
    assert sorted(dropped) == ["flag: united states", "keycap: #", "man astronaut", "one o'clock", "recycling symbol"]
    assert source.category_counts(concepts)["Shapes"] == 3


def test_safe_extract_refuses_traversal_and_links(tmp_path):
    def tarball(name: str, members: list[tarfile.TarInfo]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member in members:
                tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
        return path

    def file(name: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size = 1
        return info

    evil = tarball("evil.tgz", [file("package/ok.txt"), file("package/../../evil.txt")])
    with pytest.raises(source.EmojiSourceError, match=r"\.\./"):
        source.safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "out" / "package" / "ok.txt").exists() and not (tmp_path / "evil.txt").exists()
    link = tarfile.TarInfo("package/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(source.EmojiSourceError, match="not a regular file"):
        source.safe_extract(tarball("link.tgz", [link]), tmp_path / "out2")
    good = tarball("good.tgz", [file("package/emoji.json"), file("package/img/a.png"), file("package/big.png")])
    written = source.safe_extract(good, tmp_path / "out3", keep=("package/emoji.json", "package/img/"))
    assert sorted(p.name for p in written) == ["a.png", "emoji.json"]


def test_cached_tarball_is_verified_without_npm(tmp_path, monkeypatch):
    tgz = tmp_path / "pkg-1.0.0.tgz"
    tgz.write_bytes(b"some tarball")
    pinned = source.Source("pkg", "1.0.0", source.integrity_of(tgz), {}, ())
    monkeypatch.setattr(source, "_npm", lambda *a, **k: pytest.fail("npm must not run for a verified cache"))
    assert source.fetch_tarball(pinned, tmp_path) == tgz
    tgz.write_bytes(b"tampered")  # a bad cache asks the registry, which here reports another integrity
    monkeypatch.setattr(source, "_npm", lambda *a, **k: "sha512-other\n")
    with pytest.raises(source.EmojiSourceError, match="not the pinned"):
        source.fetch_tarball(pinned, tmp_path)


# ---------------------------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("position", ["top left", "bottom right", "center", "left", "bottom"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_render_puts_the_emoji_at_the_named_place_and_size(concepts, position, size):
    rng = random.Random(1)
    rocket = by_name(concepts, "rocket")
    extent = world.SIZES[size][0] + 2
    cx, cy = world.place(position, extent, rng)
    scene = world.EmojiScene(rocket, "blue", extent, cx, cy, size, position)
    image = np.asarray(world.render(scene), dtype=np.float32)  # (64, 64, 3)
    mask = world.alpha_mask(scene)
    ys, xs = np.nonzero(mask > 0.03)
    assert max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) in (extent - 1, extent, extent + 1)
    assert judge_mod.position_word((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2) == position
    assert np.abs(image[mask == 0] - world.BACKGROUNDS["blue"]).max() <= 1  # background untouched
    found = judge_mod.detect_scene(image.astype(np.uint8))
    assert (found.background, found.size, found.position) == ("blue", size, position)


def test_gradient_background_and_its_detection(concepts):
    apple = by_name(concepts, "red apple")
    scene = world.EmojiScene(apple, "white", 26, 20, 20, "medium", "top left", True, "black", "vertical")
    image = world.render_array(scene)
    assert tuple(image[0, -1]) == (255, 255, 255) and tuple(image[-1, -1]) == (0, 0, 0)
    found = judge_mod.detect_scene(image)
    assert (found.background, found.background_to, found.gradient) == ("white", "black", "vertical")
    assert (found.size, found.position) == ("medium", "top left")
    assert "white to black gradient" in world.caption(scene, random.Random(0))


def test_render_is_deterministic(concepts):
    rng = random.Random(0)
    scenes = [world.sample_scene(rng, concepts) for _ in range(300)]
    first = [world.render_array(s) for s in scenes]
    assert all(np.array_equal(a, world.render_array(s)) for a, s in zip(first, scenes))


# ---------------------------------------------------------------------------------------------- captions

def test_captions_name_the_concept_background_and_position(concepts):
    rng = random.Random(3)
    for _ in range(400):
        scene = world.sample_scene(rng, concepts)
        text = world.caption(scene, rng)
        named = any(word in text for word in scene.concept.words)
        assert named or set(scene.concept.name.split()) <= set(text.replace(",", "").split()), text  # shapes' form
        if scene.show_background:
            assert scene.background_name in text, text
        if scene.position_word:
            assert scene.position_word in text or (scene.position_word == "center" and "middle" in text), text
        if scene.size_word:
            assert scene.size_word in text, text
        assert not world.caption_is_held_out(text), text
        assert not world.is_held_out(scene)


def test_shapes_world_prompts_keep_working(concepts):
    scene = world.EmojiScene(by_name(concepts, "red circle"), "blue", 26, 32, 32, None, None, True)
    texts = {world.caption(scene, random.Random(seed)) for seed in range(200)}
    assert "a red circle on a blue background" in texts
    assert any("circle that is red" in t for t in texts)


def test_held_out_phrasings_and_combinations(concepts):
    rng = random.Random(5)
    for phrasing in world.HELD_OUT_PHRASINGS:
        scene = world.sample_scene(rng, concepts, held_out=True)
        text = world.caption(scene, rng, phrasing=phrasing)
        assert world.caption_is_held_out(text) and scene.concept.name in text, text
        assert world.is_held_out(scene)
        assert (scene.background, scene.position_word) == world.held_out_combination(scene.concept)
    cat = by_name(concepts, "cat face")
    assert world.held_out_combination(cat) == world.held_out_combination(cat)  # stable (a CRC, not hash())


def test_evaluation_scenes_state_everything_in_held_out_phrasings(concepts):
    items = world.evaluation_scenes(concepts, per_concept=4)
    assert len(items) == 4 * len(concepts)
    for index, (scene, prompt) in enumerate(items):
        assert world.caption_is_held_out(prompt) and scene.concept.name in prompt, prompt
        assert scene.size_word and scene.position_word and scene.show_background
        assert world.is_held_out(scene) == (index % 2 == 0)
    images, captions = world.render_dataset(20, concepts, seed=1)
    assert images.shape == (20, 64, 64, 3) and images.dtype == np.uint8 and len(captions) == 20


def test_write_folder_writes_finetune_pairs(tmp_path, concepts):
    paths = world.write_folder(tmp_path / "data", 5, concepts, seed=2)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(5)]
    assert all(p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths)
    assert not list((tmp_path / "data").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- the judge

def _stop_at(stop: int):
    def on_step(step: int, loss: float) -> None:
        if step == stop:
            raise KeyboardInterrupt
    return on_step


def test_tiny_judge_trains_resumes_saves_and_loads(tmp_path, concepts):
    torch.set_num_threads(1)
    config = judge_mod.JudgeConfig(width=8, steps=4, batch_size=8, seed=3)
    straight = judge_mod.train_judge(concepts, config)
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):  # stopped after step 3: the checkpoint of step 2 is kept
        judge_mod.train_judge(concepts, config, checkpoints, save_every=2, on_step=_stop_at(3))
    resumed = judge_mod.train_judge(concepts, config, checkpoints, save_every=2)
    for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)  # deterministic for a seed, across an interruption

    folder = resumed.save(tmp_path / "judge", concepts, {"top1": 0.0})
    assert sorted(p.name for p in folder.iterdir()) == ["concepts.json", "judge.safetensors"]
    loaded = judge_mod.EmojiJudge.load(folder)
    scenes = judge_mod.clean_scenes(concepts, 2, seed=0)
    images = [world.render(s) for s in scenes]
    assert torch.allclose(loaded.logits(images), resumed.logits(images))
    figures = judge_mod.concept_accuracy(images, [s.concept for s in scenes], loaded)
    assert set(figures) == {"top1", "top5", "n"} and figures["n"] == len(scenes) and 0 <= figures["top1"] <= 1
    assert judge_mod.concept_accuracy(images, [s.concept.id for s in scenes], loaded) == figures
