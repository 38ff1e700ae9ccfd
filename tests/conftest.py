"""Shared fixtures: isolated homes (no test touches the real home or cache), offline Hub, tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Small data the tests carry with them (licences beside each file): a fresh clone has no ../shared.
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Point HOME, the HF cache and the platformdirs folders at tmp_path; go offline."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    for name in ("DALLE_DEBUG", "DALLE_MODEL", "DALLE_DEVICE", "DALLE_DTYPE", "DALLE_OUTPUT_DIR", "DALLE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return home


def build_tiny_pipeline(folder: Path, *, seed: int = 0, max_length: int = 77) -> Path:
    """A seeded random StableDiffusionPipeline (hidden size 32, 32x32 images) saved as safetensors."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dallecli.training.vocabulary import build_clip_vocabulary

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=16, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    words = "a red green blue circle square cat astronaut on background photo of the knight".split()
    build_clip_vocabulary([" ".join(words)], folder / "_vocab")
    tokenizer = CLIPTokenizer(vocab=str(folder / "_vocab" / "vocab.json"), merges=str(folder / "_vocab" / "merges.txt"),
                              model_max_length=max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(folder / "_vocab")
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """Path of a tiny random pipeline folder, built once per test session (treat as read-only)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(autouse=True)
def fresh_engine_cache():
    """Loaded pipelines are cached per process; start each test with none."""
    from dallecli.engine.loading import clear_cache

    clear_cache()
    yield
    clear_cache()


def default_sigint() -> None:
    """``preexec_fn`` for children that a test interrupts: a shell's background job (how some CI runners start
    the suite) inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_dalle(*args: str, env: dict | None = None, timeout: float = 300, input: str | None = None):
    """Run the real ``dalle`` entry point in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dallecli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, input=input)


@pytest.fixture(scope="session")
def replica_hub():
    """The stand-in Hub serving a replica of every registry repo (tests/replicas.py), built once and cached on
    disk; gated replicas let ``replicas.TOKEN`` through. Treat as read-only; ``log`` is shared."""
    from hubserver import FakeRepo, HubServer
    from replicas import GATED, TOKEN, build_all, repo_files, revision_files

    built = build_all()
    revisions = revision_files(built)  # e.g. openai/clip-vit-base-patch32's refs/pr/66 (safetensors conversion)
    repos = {repo: FakeRepo(files, gated=repo in GATED, tokens=frozenset({TOKEN}) if repo in GATED else frozenset(),
                            revisions={rev: FakeRepo(rev_files) for rev, rev_files in revisions.get(repo, {}).items()})
             for repo, files in repo_files(built).items()}
    server = HubServer(repos).start()
    yield server
    server.stop()
