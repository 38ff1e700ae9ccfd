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
