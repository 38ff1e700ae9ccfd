"""CLIP scorers in the model store (issue 16): registry entries, `dalle download` of the replicas of
openai/clip-vit-base-patch32 (main pickle-only, safetensors in refs/pr/66) and openai/clip-vit-large-patch14
from the stand-in Hub, `resolve_scorer`, loading with transformers, and `dalle models`. No network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_dalle

from dallecli.errors import ModelNotFoundError, UnsafeWeightsError, UsageError
from dallecli.store.download import select_scorer_files
from dallecli.store.registry import EMBEDDED_SCORER, REGISTRY, scorers
from dallecli.store.resolve import resolve_scorer

BASE, LARGE = "clip-vit-base-patch32", "clip-vit-large-patch14"
# What `dalle download` must fetch from a CLIP repo, written from the real repos' layouts (not from the selector)
EXPECTED = ["config.json", "merges.txt", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.json"]
NEVER = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
LISTING = {".gitattributes": 1, "README.md": 1, "config.json": 4, "flax_model.msgpack": 600, "merges.txt": 5,
           "preprocessor_config.json": 1, "pytorch_model.bin": 600, "special_tokens_map.json": 1, "tf_model.h5": 600,
           "tokenizer.json": 2, "tokenizer_config.json": 1, "vocab.json": 8}


# --- registry and selection (pure) -------------------------------------------------------------------------

def test_registry_scorers():
    assert [s.alias for s in scorers()] == [EMBEDDED_SCORER, BASE, LARGE]
    base, large, embedded = REGISTRY[BASE], REGISTRY[LARGE], REGISTRY[EMBEDDED_SCORER]
    assert (base.repo_id, base.revision, base.licence) == ("openai/clip-vit-base-patch32", "refs/pr/66", "MIT")
    assert "pickle" in base.note and "refs/pr/66" in base.note
    assert (large.repo_id, large.revision, large.licence) == ("openai/clip-vit-large-patch14", None, "MIT")
    assert embedded.repo_id is None and embedded.licence == "Apache-2.0" and "offline" in embedded.note
    assert {s.family for s in scorers()} == {"clip"} and not any(s.is_diffusers_pipeline for s in scorers())


def test_select_scorer_files_takes_configs_tokenizer_and_safetensors_only():
    files, skipped = select_scorer_files({**LISTING, "model.safetensors": 900}, "org/clip")
    assert [f.path for f in files] == EXPECTED
    reasons = dict(skipped)
    assert set(reasons) == set(NEVER)
    assert "pickle" in reasons["pytorch_model.bin"] and "TensorFlow" in reasons["tf_model.h5"]
    assert "Flax" in reasons["flax_model.msgpack"]
    sharded = {**LISTING, "model-00001-of-00002.safetensors": 5, "model-00002-of-00002.safetensors": 5,
               "model.safetensors.index.json": 1}
    paths = [f.path for f in select_scorer_files(sharded, "org/clip")[0]]
    assert "model.safetensors.index.json" in paths and "model-00002-of-00002.safetensors" in paths


def test_select_scorer_files_refuses_pickle_only_with_the_refs_pr_hint():
    with pytest.raises(UnsafeWeightsError, match=r"org/clip at main has pickle-only weights .*refs/pr/N"):
        select_scorer_files(LISTING, "org/clip", "main")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        select_scorer_files({"model.safetensors": 1}, "org/clip")


# --- resolve_scorer (no network) ---------------------------------------------------------------------------

@pytest.fixture
def embedded_folder(tmp_path, monkeypatch) -> Path:
    """The embedded scorer's package folder, moved to a temporary one (empty: as if not built)."""
    folder = tmp_path / "package" / EMBEDDED_SCORER
    folder.mkdir(parents=True)
    monkeypatch.setattr("dallecli.store.resolve.embedded_scorer_path", lambda: folder)
    return folder


def test_resolve_scorer_embedded_local_and_refusals(embedded_folder, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"python -m dallecli\.training\.build_scorer --out "
                                                 r"src/dallecli/models/shapes-clip"):
        resolve_scorer(None)
    (embedded_folder / "config.json").write_text("{}")
    for name in (None, EMBEDDED_SCORER):
        found = resolve_scorer(name)
        assert (found.name, found.path, found.spec) == (EMBEDDED_SCORER, embedded_folder, REGISTRY[EMBEDDED_SCORER])
        assert found.revision.startswith("dallecli-")

    local = tmp_path / "my-clip"
    local.mkdir()
    with pytest.raises(ModelNotFoundError, match="needs a config.json"):
        resolve_scorer(str(local))
    (local / "config.json").write_text("{}")
    found = resolve_scorer(str(local))
    assert found.path == local.resolve() and found.spec is None

    cache = tmp_path / "empty-cache"
    with pytest.raises(ModelNotFoundError, match=f"scorer '{BASE}' is not downloaded; run `dalle download {BASE}"):
        resolve_scorer(BASE, cache)
    with pytest.raises(ModelNotFoundError, match="scorer 'org/other-clip' is not downloaded; run `dalle download "
                                                 "org/other-clip"):
        resolve_scorer("org/other-clip", cache)
    with pytest.raises(UsageError, match="'sd-turbo' is a text-to-image model, not a CLIP scorer; scorers: "
                                         "shapes-clip, clip-vit-base-patch32"):
        resolve_scorer("sd-turbo", cache)
    with pytest.raises(UsageError, match="--scorer"):
        resolve_scorer("not a name", cache)


# --- download from the replicas, through the real entry point ----------------------------------------------

@pytest.fixture
def online(replica_hub, monkeypatch, isolated_home):
    """Environment for a `dalle` subprocess that talks to the replica Hub (the autouse fixture is offline)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", replica_hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    replica_hub.log.clear()
    return replica_hub


def _snapshot_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _similarity(folder: Path) -> float:
    """CLIP's image-text cosine similarity x 100 for one image and one text, loaded as `dalle score` loads."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    image = Image.new("RGB", (48, 40), (220, 30, 30))
    inputs = processor(text=["a red circle"], images=[image], return_tensors="pt", padding=True)
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)  # the replica's shrunk processor
    with torch.no_grad():
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        picture = model.get_image_features(pixel_values=inputs["pixel_values"])
    text, picture = (getattr(t, "pooler_output", t) for t in (text, picture))  # a tensor, or an output object
    return float(torch.nn.functional.cosine_similarity(text, picture).item() * 100)


@pytest.mark.parametrize("name", [BASE, LARGE])
def test_download_resolve_load_and_list(name, online, isolated_home, monkeypatch):
    spec = REGISTRY[name]
    replica = online.repos[spec.repo_id]
    served = replica.revisions[spec.revision] if spec.revision else replica
    done = run_dalle("download", name, "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["commit"] == served.commit and document["revision"] == (spec.revision or "main")
    folder = Path(document["path"])
    hub_cache = isolated_home / "hf" / "hub"
    assert folder.is_relative_to(hub_cache) and folder.name == served.commit
    assert _snapshot_files(folder) == EXPECTED
    assert all((folder / p).read_bytes() == served.files[p] for p in EXPECTED)
    assert "verified 1 .safetensors" in done.stderr
    requested = [path for _, path, _ in online.log]
    assert not [p for p in requested if p.endswith(NEVER)]  # not even a HEAD
    assert sorted(p.rsplit("/", 1)[-1] for p in online.fetched()) == EXPECTED
    if spec.revision:  # asked by name (huggingface_hub sends refs%2Fpr%2F66), then every file at its commit
        assert f"/api/models/{spec.repo_id}/revision/{spec.revision}" in requested
        assert all(f"/resolve/{served.commit}/" in p for p in online.fetched())
        assert served.commit != replica.commit and "model.safetensors" not in replica.files
        ref = hub_cache / f"models--{spec.repo_id.replace('/', '--')}" / "refs" / spec.revision
        assert ref.read_text() == served.commit

    resolved = resolve_scorer(name, hub_cache)
    assert (resolved.name, resolved.path, resolved.spec, resolved.revision) == (name, folder, spec, served.commit)
    assert resolve_scorer(spec.repo_id, hub_cache).path == folder
    assert math.isfinite(_similarity(resolved.path))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    listed = run_dalle("models", "--json")
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)
    entry = next(m for m in models["models"] if m["repo_id"] == spec.repo_id)
    assert (entry["name"], entry["kind"], entry["family"], entry["revision"]) == (name, "scorer", "clip", served.commit)
    if spec.revision:
        assert entry["refs"] == [spec.revision]
    other = LARGE if name == BASE else BASE
    assert other in [a["alias"] for a in models["available"]]
    table = run_dalle("models")
    row = next(line for line in table.stdout.splitlines() if line.startswith(name + " "))
    assert spec.repo_id in row and served.commit[:12] in row and "clip (scorer)" in row
    assert other in table.stderr  # "available to download"
    info = run_dalle("models", "info", name, "--json")
    assert info.returncode == 0, info.stderr
    details = json.loads(info.stdout)
    assert details["registry"]["revision"] == spec.revision and details["defaults"] is None
    assert details["downloaded"][0]["files"] == EXPECTED


def test_pickle_only_main_is_refused_and_nothing_is_written(online, isolated_home):
    refused = run_dalle("download", BASE, "--revision", "main")
    assert refused.returncode == 1, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert "openai/clip-vit-base-patch32 at main has pickle-only weights" in lines[0]
    assert "refs/pr/66" in lines[0] and f"`dalle download {BASE}` without --revision" in lines[0]
    assert online.fetched() == []
    assert not (isolated_home / "hf" / "hub" / "models--openai--clip-vit-base-patch32").exists()
    dry = run_dalle("download", BASE, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert [f["path"] for f in plan["files"]] == EXPECTED and plan["revision"] == "refs/pr/66"
    assert {s["path"] for s in plan["skipped"]} == set(NEVER)


def test_commands_that_take_another_kind_refuse_a_scorer_in_one_line(online):
    embedded = run_dalle("download", EMBEDDED_SCORER)
    assert embedded.returncode == 2 and "embedded scorer; it ships with dalle" in embedded.stderr
    for name in (BASE, EMBEDDED_SCORER):
        made = run_dalle("generate", "a cat", "--model", name, "--steps", "1")
        errors = [line for line in made.stderr.splitlines() if line.strip()]
        assert made.returncode == 2 and len(errors) == 1, made.stderr
        assert f"'{name}' is a CLIP scorer, not a text-to-image model" in errors[0] and "`dalle score" in errors[0]
        assert "--rerank" in errors[0]
    assert online.log == []


def test_embedded_scorer_is_listed_when_installed(embedded_folder):
    from dallecli.store.cache import list_models, model_details

    assert EMBEDDED_SCORER not in [m.name for m in list_models()]
    (embedded_folder / "config.json").write_text("{}")
    (embedded_folder / "model.safetensors").write_bytes(b"x" * 10)
    listed = {m.name: m for m in list_models()}
    scorer = listed[EMBEDDED_SCORER]
    assert (scorer.repo_id, scorer.kind, scorer.family, scorer.size_bytes) == (None, "scorer", "clip", 12)
    assert scorer.files == ("config.json", "model.safetensors")
    details = model_details(EMBEDDED_SCORER)
    assert [d["name"] for d in details["downloaded"]] == [EMBEDDED_SCORER]


def test_an_unregistered_clip_repo_downloads_and_resolves_as_a_scorer(replica_hub, monkeypatch, isolated_home):
    """`dalle download org/name` of a transformers CLIP repo (config.json says model_type clip) takes the scorer
    files; `--scorer org/name` then finds it."""
    from hubserver import FakeRepo, HubServer

    files = dict(replica_hub.repos["openai/clip-vit-large-patch14"].files)
    server = HubServer({"org/my-clip": FakeRepo(files)}).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        done = run_dalle("download", "org/my-clip", "--json")
        assert done.returncode == 0, done.stderr
        folder = Path(json.loads(done.stdout)["path"])
        assert _snapshot_files(folder) == EXPECTED
        assert not [p for _, p, _ in server.log if p.endswith(NEVER)]
    finally:
        server.stop()
    found = resolve_scorer("org/my-clip", isolated_home / "hf" / "hub")
    assert (found.name, found.path, found.spec) == ("org/my-clip", folder, None)
