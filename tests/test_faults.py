"""Faults: a full disk while writing an image, a checkpoint or a LoRA (one-line error, nothing half-written
left), and Ctrl-C in download and finetune (exit 130 through the one error translator)."""

import errno
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dallecli.cli.app import app
from dallecli.errors import DiskFullError
from dallecli.images import write_png

SETTINGS = {"prompt": "a red cat", "negative_prompt": None, "seed": 3, "steps": 2, "guidance_scale": 1.0,
            "width": 8, "height": 8, "model": "tiny", "scheduler": "ddim"}


def fill_then_fail(exc: BaseException):
    """A PIL ``save`` that writes some bytes to the file, then fails as a full disk would."""

    def save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise exc

    return save


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_while_writing_an_image_leaves_nothing(tmp_path, monkeypatch, code):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "0000-1-kept.png").write_bytes(b"an earlier image")
    monkeypatch.setattr(Image.Image, "save", fill_then_fail(OSError(code, "No space left on device")))
    with pytest.raises(DiskFullError, match="disk is full") as caught:
        write_png(Image.new("RGB", (8, 8)), folder, SETTINGS, "DDIM")
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)
    assert [p.name for p in folder.iterdir()] == ["0000-1-kept.png"]


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", fill_then_fail(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as caught:
        write_png(Image.new("RGB", (8, 8)), tmp_path / "out", SETTINGS, "DDIM")
    assert not isinstance(caught.value, DiskFullError)
    assert list((tmp_path / "out").iterdir()) == []


def test_generate_on_a_full_disk_is_one_line_and_exit_1(tiny_pipeline, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(Image.Image, "save", fill_then_fail(OSError(errno.ENOSPC, "No space left on device")))
    result = CliRunner().invoke(app, ["generate", "a cat", "--model", str(tiny_pipeline), "--width", "32",
                                      "--height", "32", "--steps", "2", "--seed", "1", "--out", str(out),
                                      "--progress", "none"])  # only the error on stderr
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: the disk is full") and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == "" and list(out.iterdir()) == []


class SafetensorError(Exception):
    """What safetensors' Rust writer raises: the OS error is only in the text."""


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
])
def test_disk_full_while_saving_a_checkpoint_keeps_the_older_one(tmp_path, monkeypatch, failure):
    import torch

    from dallecli.training import checkpoint

    root = tmp_path / "checkpoints"
    older = checkpoint.save_checkpoint(root, 1, {"w": torch.ones(2)})

    def partial_save(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(checkpoint, "save_file", partial_save)
    with pytest.raises(DiskFullError, match="disk is full.*--resume"):
        checkpoint.save_checkpoint(root, 2, {"w": torch.zeros(2)})
    assert [p.name for p in root.iterdir()] == [older.name]
    assert checkpoint.list_checkpoints(root) == [older]
    step, state = checkpoint.load_checkpoint(older)
    assert step == 1 and torch.equal(state["w"], torch.ones(2))


def test_ctrl_c_while_saving_a_checkpoint_leaves_no_partial_folder(tmp_path, monkeypatch):
    import torch

    from dallecli.training import checkpoint

    def interrupted(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path / "checkpoints", 5, {"w": torch.ones(2)})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_disk_full_while_saving_a_lora_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from dallecli.training.finetune_export import save_safetensors_atomically

    def partial_save(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", partial_save)
    target = tmp_path / "lora" / "lora.safetensors"
    with pytest.raises(DiskFullError, match="disk is full"):
        save_safetensors_atomically({"w": torch.ones(2)}, target, {})
    assert list(target.parent.iterdir()) == []


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_in_download_after_the_files_arrived_exits_130_and_a_rerun_finishes(replica_hub, tmp_path, monkeypatch):
    """Ctrl-C inside the real download (the files fetched from the stand-in Hub, verification under way)."""
    import huggingface_hub.constants

    import dallecli.store.download as store

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", replica_hub.url)  # in-process: read at import
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        replica_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "cache"
    real_verify = store.verify_download
    monkeypatch.setattr(store, "verify_download", interrupt)
    result = CliRunner().invoke(app, ["download", "taesd", "--cache-dir", str(cache)])
    assert result.exit_code == 130 and result.stderr.strip().splitlines()[-1] == "interrupted", result.stderr
    assert list(cache.rglob("*.safetensors")), "the interrupt came before any file arrived"
    monkeypatch.setattr(store, "verify_download", real_verify)
    again = CliRunner().invoke(app, ["download", "taesd", "--cache-dir", str(cache)])
    assert again.exit_code == 0, again.stderr


def test_ctrl_c_in_finetune_mid_training_exits_130_and_resumes(tiny_pipeline, tmp_path, monkeypatch):
    """Ctrl-C at step 3 of the real training loop: exit 130, the step-2 checkpoint kept, ``--resume`` goes on."""
    from conftest import DATA
    from dallecli.training.trainer import DenoiserTrainer

    real_loss = DenoiserTrainer._loss

    def loss_until_step_3(self, latents, ids):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_loss(self, latents, ids)

    monkeypatch.setattr(DenoiserTrainer, "_loss", loss_until_step_3)
    output = tmp_path / "lora"
    args = ["finetune", str(DATA / "photos"), "--model", str(tiny_pipeline), "--output", str(output), "--steps", "4",
            "--save-every", "2", "--batch-size", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130 and "interrupted" in result.stderr, result.stderr
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-0000002"]
    monkeypatch.setattr(DenoiserTrainer, "_loss", real_loss)
    resumed = CliRunner().invoke(app, [*args, "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["resumed_from"], summary["steps"]) == (2, 4)
