"""Broken downloads and disk-space refusals say what is wrong (issue 18, item 9)."""

from __future__ import annotations

import json
import os
from collections import namedtuple

import pytest

from dallecli.errors import DownloadError, ModelNotFoundError


def _pipeline(folder):
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet" / "config.json").write_text("{}")
    return folder


def test_a_weights_link_whose_blob_is_gone_makes_the_component_missing(tmp_path):
    from dallecli.store.resolve import missing_components

    folder = _pipeline(tmp_path / "snapshot")
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    os.symlink(blob, folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert missing_components(folder) == []
    blob.unlink()  # a blob deleted by hand, or removed after failing verification
    assert missing_components(folder) == ["unet"]


def test_using_a_broken_cache_entry_says_to_download_again(tmp_path, monkeypatch):
    from dallecli.store import resolve

    folder = _pipeline(tmp_path / "snapshot")
    os.symlink(tmp_path / "gone", folder / "unet" / "diffusion_pytorch_model.safetensors")
    monkeypatch.setattr(resolve, "_cached_file", lambda *args, **kwargs: folder / "model_index.json")
    with pytest.raises(ModelNotFoundError, match=r"only partly downloaded \(unet missing.*dalle download sd-turbo"):
        resolve.resolve_model("sd-turbo", cache_dir=tmp_path)


def test_disk_space_refusal_states_the_margin(tmp_path, monkeypatch):
    from dallecli.store import download

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda _path: usage(10**11, 0, 31_500_000))
    with pytest.raises(DownloadError) as caught:
        download.check_disk_space(19_700_000, tmp_path)
    message = str(caught.value)
    assert "needs 19.7 MB and dalle keeps 268.4 MB free beyond it (288.1 MB in all); 31.5 MB is free" in message


def test_the_store_never_imports_the_engine(tmp_path):
    """#18 leftovers item 2: store/ imported engine/ at function level (resolve: single_file.detect and
    file_digest; cache: loading's config readers), an arrow back up (test_atomic.py checks the imports). What both
    need is weightfiles' now: an unsupported single file is still refused at resolve, before it is hashed, with
    the engine never imported."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    inpainting = {"model.diffusion_model.input_blocks.0.0.weight": (4, 9, 3, 3),
                  "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3),
                  "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (4, 4)}
    save_file({k: torch.zeros(s) for k, s in inpainting.items()}, str(tmp_path / "inpainting.safetensors"))
    code = ("import sys; from dallecli.errors import UnsupportedCheckpointError\n"
            "from dallecli.store.resolve import resolve_model\n"
            "from dallecli.store.cache import list_models\n"
            "list_models()\n"
            f"try:\n    resolve_model({str(tmp_path / 'inpainting.safetensors')!r})\n"
            "except UnsupportedCheckpointError as exc:\n    print(exc)\n"
            "print(sorted(m for m in sys.modules if m.startswith('dallecli.engine')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "DALLE_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    refusal, imported = done.stdout.strip().splitlines()
    assert "inpainting.safetensors is an inpainting or other 9-channel UNet" in refusal
    assert imported == "[]"
    assert not (tmp_path / "cache" / "file-hashes").exists()  # refused before the digest
