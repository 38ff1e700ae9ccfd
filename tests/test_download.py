"""`dalle download` and `dalle models` against a local stand-in Hub (tests/hubserver.py); no network.

Cases: C13 (truncated .safetensors), C14 (pickle disguised as .safetensors), C15 (cache location honoured),
C16 (gated: 401 vs 403, token never printed).
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest

from conftest import run_dalle
from hubserver import FakeRepo, HubServer

from dallecli.errors import UnsafeWeightsError
from dallecli.store.download import select_files, variant_of

TOKEN = "hf_SeCrEtTeStToKeN0123456789"
BIG_SINGLE_FILE = "v1-5-pruned.safetensors"


def _safetensors(n_floats: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * n_floats)


class _Evil:
    """Unpickling this creates the file at ``marker`` (what a malicious checkpoint could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


MINIMAL_INDEX = json.dumps({"_class_name": "StableDiffusionPipeline",
                            "unet": ["diffusers", "UNet2DConditionModel"]}).encode()


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evil") / "pwned"


@pytest.fixture(scope="module")
def hub(tiny_pipeline, marker):
    """The stand-in Hub with five repos; started once per module, stopped after."""
    pickle_bytes = pickle.dumps({"w": list(range(200))}, protocol=4)
    unet = (tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    tiny = FakeRepo.from_folder(tiny_pipeline, extra={
        BIG_SINGLE_FILE: _safetensors(50_000),  # a root-level single-file checkpoint: never fetched
        "model.ckpt": pickle_bytes * 20,
        "unet/diffusion_pytorch_model.bin": pickle_bytes,
        "unet/diffusion_pytorch_model.fp16.safetensors": unet,
        "README.md": b"# tiny\n",
    })
    server = HubServer({
        "org/tiny-pipe": tiny,
        "org/gated-pipe": FakeRepo.from_folder(tiny_pipeline, gated=True),
        "org/pickle-only": FakeRepo({"model_index.json": MINIMAL_INDEX, "unet/config.json": b"{}",
                                     "unet/diffusion_pytorch_model.bin": pickle_bytes * 50}),
        "org/truncated": FakeRepo({"model_index.json": MINIMAL_INDEX, "unet/config.json": b"{}",
                                   "unet/diffusion_pytorch_model.safetensors": unet[:20_000]}),
        "org/disguised": FakeRepo({"model_index.json": MINIMAL_INDEX, "unet/config.json": b"{}",
                                   "unet/diffusion_pytorch_model.safetensors": _safetensors(10),
                                   "unet/evil.SafeTensors": pickle.dumps(_Evil(str(marker)), protocol=4),
                                   "x.ckpt": pickle.dumps(_Evil(str(marker)), protocol=4)}),
    }).start()
    yield server
    server.stop()


@pytest.fixture
def online(hub, monkeypatch, isolated_home):
    """Environment for a `dalle` subprocess that talks to the stand-in Hub (the autouse fixture is offline)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    hub.log.clear()
    return hub


def _cache_files(root: Path) -> set[str]:
    snapshots = list(root.glob("models--*/snapshots/*"))
    return {p.relative_to(s).as_posix() for s in snapshots for p in s.rglob("*") if p.is_file()}


# --- planning (pure) --------------------------------------------------------------------------------------

def test_select_files_prefers_variant_and_keeps_matching_shard_index():
    index = {"_class_name": "X", "unet": ["diffusers", "U"], "text_encoder": ["transformers", "T"],
             "safety_checker": [None, None]}
    listing = {
        "model_index.json": 1, "unet/config.json": 1,
        "unet/diffusion_pytorch_model.safetensors.index.json": 1,
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors": 10,
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors": 10,
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json": 1,
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors": 5,
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors": 5,
        "text_encoder/config.json": 1, "text_encoder/model.safetensors": 8, "text_encoder/pytorch_model.bin": 8,
        "safety_checker/model.safetensors": 100, "sd.ckpt": 1000, "flax/model.msgpack": 3,
    }
    files, skipped = select_files(listing, index, "fp16", "org/x")
    assert [f.path for f in files] == [
        "model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",  # no fp16: plain
        "unet/config.json", "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]
    assert dict(skipped)["sd.ckpt"].startswith("single-file")
    assert "safety_checker/model.safetensors" in dict(skipped)  # [null, null] in model_index: not loaded
    plain, _ = select_files(listing, index, None, "org/x")
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in [f.path for f in plain]
    assert not any(variant_of(f.path.rsplit("/", 1)[-1]) for f in plain if f.path.endswith(".safetensors"))


def test_select_files_refuses_pickle_only_component():
    with pytest.raises(UnsafeWeightsError, match="pickle-only.*unet"):
        select_files({"model_index.json": 1, "unet/config.json": 1, "unet/diffusion_pytorch_model.bin": 9},
                     json.loads(MINIMAL_INDEX), None, "org/p")


# --- download through the real entry point ---------------------------------------------------------------

def test_download_lands_only_in_hf_home_and_skips_big_files(online, isolated_home, tmp_path):
    """C15: HF_HOME is honoured; only what the pipeline loads is fetched; a second run is a no-op."""
    result = run_dalle("download", "org/tiny-pipe")
    assert result.returncode == 0, result.stderr
    hub_cache = isolated_home / "hf" / "hub"
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.is_relative_to(hub_cache) and (folder / "model_index.json").is_file()
    commit = online.repos["org/tiny-pipe"].commit
    assert folder.name == commit and commit in result.stderr  # the resolved commit is shown
    assert (hub_cache / "models--org--tiny-pipe" / "refs" / "main").read_text() == commit
    files = _cache_files(hub_cache)
    assert "unet/diffusion_pytorch_model.safetensors" in files and "tokenizer/tokenizer_config.json" in files
    assert not any(f.endswith((".bin", ".ckpt", ".md")) or f == BIG_SINGLE_FILE or ".fp16." in f for f in files)
    fetched = online.fetched()
    assert not any(p.endswith((BIG_SINGLE_FILE, ".bin", ".ckpt")) for p in fetched)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(isolated_home / "hf")]
    assert outside == []

    online.log.clear()
    again = run_dalle("download", "org/tiny-pipe")
    assert again.returncode == 0, again.stderr
    assert "already downloaded" in again.stderr
    assert not any(p.endswith(".safetensors") for p in online.fetched())


def test_cache_dir_option_wins(online, isolated_home, tmp_path):
    """C15: --cache-dir overrides HF_HOME."""
    other = tmp_path / "elsewhere"
    result = run_dalle("download", "org/tiny-pipe", "--cache-dir", str(other), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert Path(document["path"]).is_relative_to(other)
    assert "unet/diffusion_pytorch_model.safetensors" in _cache_files(other)
    assert not (isolated_home / "hf" / "hub" / "models--org--tiny-pipe").exists()


def test_dry_run_lists_files_and_fetches_nothing(online, isolated_home):
    result = run_dalle("download", "org/tiny-pipe", "--dry-run", "--variant", "fp16")
    assert result.returncode == 0, result.stderr
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in result.stdout
    assert "total" in result.stdout and BIG_SINGLE_FILE not in result.stdout
    assert f"skipped {BIG_SINGLE_FILE}" in result.stderr
    assert not (isolated_home / "hf" / "hub" / "models--org--tiny-pipe").exists()
    assert not any(p.endswith(".safetensors") for p in online.fetched())


def test_pickle_only_repo_refused_before_download(online):
    result = run_dalle("download", "org/pickle-only")
    assert result.returncode == 1
    assert "pickle-only" in result.stderr and "unet" in result.stderr
    assert online.fetched(".bin") == []


def test_gated_repo_401_and_403_messages_differ_and_never_show_the_token(online):
    """C16."""
    no_token = run_dalle("download", "org/gated-pipe")
    with_option = run_dalle("download", "org/gated-pipe", "--token", TOKEN)
    with_env = run_dalle("download", "org/gated-pipe", env={"HF_TOKEN": TOKEN})
    assert no_token.returncode == with_option.returncode == with_env.returncode == 1
    assert "no or invalid token (set HF_TOKEN or `--token`)" in no_token.stderr
    for result in (with_option, with_env):
        assert "licence not accepted (accept it at the model page" in result.stderr
        assert "no or invalid token" not in result.stderr
    for result in (no_token, with_option, with_env):
        assert TOKEN not in result.stdout + result.stderr
        assert TOKEN[5:15] not in result.stdout + result.stderr
    assert any(auth for _, _, auth in online.log)  # the token was sent, just never printed


def test_truncated_safetensors_named_with_redownload_advice(online, isolated_home):
    """C13: a truncated file is named as truncated, with re-download advice, and removed from the cache."""
    result = run_dalle("download", "org/truncated")
    assert result.returncode == 1
    assert "diffusion_pytorch_model.safetensors" in result.stderr
    assert "unet/diffusion_pytorch_model.safetensors is truncated" in result.stderr
    assert "re-download it with `dalle download org/truncated`" in result.stderr
    assert "unet/diffusion_pytorch_model.safetensors" not in _cache_files(isolated_home / "hf" / "hub")


def test_pickle_disguised_as_safetensors_refused_by_content(online, isolated_home, marker):
    """C14: evil.SafeTensors is a pickle; it is refused by content, never unpickled; x.ckpt is never fetched."""
    result = run_dalle("download", "org/disguised")
    assert result.returncode == 1
    assert "unet/evil.SafeTensors is a pickle" in result.stderr
    assert not marker.exists()
    assert online.fetched("x.ckpt") == []
    assert "unet/evil.SafeTensors" not in _cache_files(isolated_home / "hf" / "hub")


def test_offline_generation_after_download(online, monkeypatch, tmp_path):
    """`dalle download org/tiny-pipe`, then HF_HUB_OFFLINE=1 generate writes a PNG with no Hub request."""
    assert run_dalle("download", "org/tiny-pipe").returncode == 0
    online.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "out"
    result = run_dalle("generate", "x", "--model", "org/tiny-pipe", "--width", "32", "--height", "32",
                       "--steps", "2", "--seed", "1", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1 and Path(result.stdout.strip()) == pngs[0]
    assert online.log == []

    missing = run_dalle("generate", "x", "--model", "org/not-downloaded", "--steps", "2")
    assert missing.returncode == 1
    assert "run `dalle download org/not-downloaded`" in missing.stderr


def test_models_list_info_rm(online, isolated_home):
    assert run_dalle("download", "org/tiny-pipe").returncode == 0
    commit = online.repos["org/tiny-pipe"].commit

    listed = run_dalle("models", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(m for m in json.loads(listed.stdout)["models"] if m["repo_id"] == "org/tiny-pipe")
    assert entry["revision"] == commit and entry["refs"] == ["main"]
    assert entry["family"] == "stable-diffusion" and entry["size_bytes"] > 0
    table = run_dalle("models", "list")
    assert "org/tiny-pipe" in table.stdout and commit[:12] in table.stdout and "sd-turbo" in table.stderr

    info = run_dalle("models", "info", "org/tiny-pipe", "--json")
    details = json.loads(info.stdout)
    assert "unet/diffusion_pytorch_model.safetensors" in details["downloaded"][0]["files"]
    assert details["defaults"]["width"] == 32  # sample_size 16 x VAE factor 2
    registered = json.loads(run_dalle("models", "info", "sd-turbo", "--json").stdout)
    assert registered["registry"]["repo_id"] == "stabilityai/sd-turbo" and registered["defaults"]["steps"] == 1

    refused = run_dalle("models", "rm", "org/tiny-pipe", input="")  # stdin is not a terminal
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert "delete" in refused.stderr  # the plan is shown first
    assert (isolated_home / "hf" / "hub" / "models--org--tiny-pipe").exists()

    removed = run_dalle("models", "rm", "org/tiny-pipe", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "freed" in removed.stderr
    assert not (isolated_home / "hf" / "hub" / "models--org--tiny-pipe").exists()
    after = json.loads(run_dalle("models", "--json").stdout)
    assert not any(m["repo_id"] == "org/tiny-pipe" for m in after["models"])
