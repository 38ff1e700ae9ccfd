"""The one atomic writer (``dallecli.atomic``) and the one weight-file reader (``dallecli.weightfiles``): every file
the project writes is flushed before it is named, never half there, never left as a temporary name (Ctrl-C
included); a full disk is one DiskFullError; a no-overwrite write never replaces a file, even without hard links;
and the leaf modules import nothing above them."""

import ast
import errno
import json
import os
import struct
from pathlib import Path

import pytest

from dallecli import atomic
from dallecli.errors import CorruptWeightsError, DiskFullError, UnsafeWeightsError

SRC = Path(__file__).resolve().parents[1] / "src" / "dallecli"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(atomic.PREFIX))


def test_write_file_replaces_flushes_before_naming_and_gives_the_default_mode(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "notes.txt"
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.write_file(target, "first")
    atomic.write_file(target, b"second")
    assert target.read_bytes() == b"second" and events == ["fsync", "replace"] * 2
    assert target.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK
    assert leftovers(target.parent) == []


@pytest.mark.parametrize("hard_links", [True, False])
def test_no_overwrite_never_replaces_a_file_with_or_without_hard_links(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    taken = tmp_path / "taken.json"
    taken.write_text("older")
    with pytest.raises(FileExistsError):
        atomic.write_file(taken, "newer", overwrite=False)
    assert taken.read_text() == "older"
    fresh = atomic.write_file(tmp_path / "fresh.json", lambda handle: handle.write(b"made"), overwrite=False)
    assert fresh.read_text() == "made" and leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.EIO, "I/O error"), ValueError("bad")])
def test_any_failure_leaves_the_old_file_and_no_temporary_name(tmp_path, failure):
    target = tmp_path / "kept.png"
    target.write_bytes(b"older")

    def fill(handle):
        handle.write(b"half")
        raise failure

    with pytest.raises(type(failure)) as caught:
        atomic.write_file(target, fill)
    assert not isinstance(caught.value, DiskFullError)
    assert target.read_bytes() == b"older" and leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'),
])
def test_a_full_disk_is_one_disk_full_error_naming_what(tmp_path, failure):
    def fill(handle):
        handle.write(b"half")
        raise failure

    with pytest.raises(DiskFullError, match=r"the disk is full: could not write the grid; .*Free some") as caught:
        atomic.write_file(tmp_path / "out" / "grid.png", fill, what="the grid")
    assert "\n" not in str(caught.value) and caught.value.__cause__ is failure
    assert list((tmp_path / "out").iterdir()) == []


def test_staged_folder_replaces_the_old_folder_only_when_complete(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.staged_folder(final) as staging:
            (staging / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["old.txt"] and leftovers(tmp_path) == []
    with atomic.staged_folder(final) as staging:
        assert staging.parent == tmp_path and staging.stat().st_mode & 0o777 == 0o777 & ~atomic._UMASK
        (staging / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"] and leftovers(tmp_path) == []
    with pytest.raises(FileExistsError):
        with atomic.staged_folder(final, overwrite=False) as staging:
            (staging / "other.txt").write_text("other")
    assert [p.name for p in final.iterdir()] == ["new.txt"] and leftovers(tmp_path) == []


def test_disk_full_is_defined_once():
    defined = [path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py")
               if any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DISK_FULL" for t in node.targets)
                      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))]
    assert defined == ["atomic.py"]


def _module_imports(path: Path, everywhere: bool = False) -> set[str]:
    """The dallecli modules ``path`` imports at module level (``everywhere``: inside functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dallecli"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dallecli")}
    return found


def test_leaf_modules_import_only_errors_and_store_does_not_import_the_engine():
    assert _module_imports(SRC / "atomic.py", everywhere=True) == {"dallecli.errors"}
    assert _module_imports(SRC / "weightfiles.py") == {"dallecli.errors"}
    # the digest memo is the only other use: of leaves themselves
    assert _module_imports(SRC / "weightfiles.py", everywhere=True) <= {"dallecli.errors", "dallecli.atomic",
                                                                          "dallecli.config"}
    assert _module_imports(SRC / "config.py") == {"dallecli.errors"}
    for path in (SRC / "store").glob("*.py"):  # not even inside a function (#18 leftovers item 2)
        assert not [m for m in _module_imports(path, everywhere=True) if m.startswith("dallecli.engine")], path.name
    assert not (SRC / "engine" / "weights.py").exists()


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_one_header_reader_for_checks_estimates_and_single_files(tmp_path):
    from dallecli.engine.device import float32_weight_bytes
    from dallecli.engine.single_file import read_metadata
    from dallecli.weightfiles import read_header

    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F16", "shape": [3, 5], "data_offsets": [0, 30]}}
    unet = tmp_path / "pipe" / "unet"
    unet.mkdir(parents=True)
    good = _safetensors(unet / "diffusion_pytorch_model.safetensors", header, bytes(30))
    assert read_header(good) == header and read_metadata(good) == {"format": "pt"}
    assert float32_weight_bytes(tmp_path / "pipe") == 4 * 15
    good.write_bytes(good.read_bytes()[:-1])  # truncated: refused, and no estimate from it
    with pytest.raises(CorruptWeightsError, match="truncated"):
        read_header(good)
    assert float32_weight_bytes(tmp_path / "pipe") is None
    good.write_bytes(b"\x80\x02" + bytes(64))
    with pytest.raises(UnsafeWeightsError):
        read_header(good)


def test_from_merge_is_below_the_cli_and_given_values_win():
    """``--from``'s merge lives in ``engine.replay`` (a library user replays an image without the CLI)."""
    from dallecli.engine.replay import merge_stored, request_fields
    from dallecli.engine.request import GenerationRequest, LoraSpec

    stored = {"source": "dalle", "prompt": "a red circle", "negative_prompt": "blur", "seed": 42, "steps": 12,
              "guidance_scale": 5.0, "width": 64, "height": 64, "model": "shapes", "model_revision": "abc",
              "dtype": "float32", "scheduler": "ddim", "loras": [{"path": "/l.safetensors", "scale": 0.5}]}
    merged = merge_stored(stored, steps=30, seed=None)
    assert merged["steps"] == 30 and merged["seed"] == 42 and merged["scheduler"] == "ddim"
    assert merged["loras"] == (LoraSpec("/l.safetensors", 0.5),) and merged["recorded_revision"] == "abc"
    request = GenerationRequest(**request_fields(merged))
    assert (request.prompt, request.negative_prompt, request.guidance_scale) == ("a red circle", "blur", 5.0)
    other = merge_stored(stored, model="tiny", loras=(LoraSpec("x.safetensors"),), scheduler="euler")
    assert other["recorded_revision"] is None and other["loras"] == (LoraSpec("x.safetensors"),)
    assert other["scheduler"] == "euler"
    assert merged["backend"] is None  # an image made by PyTorch: the user's backend
    openvino = merge_stored({**stored, "backend": {"name": "openvino", "precision": "bf16"}})
    assert openvino["backend"] == "openvino" and merge_stored(stored, backend="torch")["backend"] == "torch"
    a1111 = merge_stored({"source": "a1111", "prompt": "p", "sampler": "DDIM"})
    assert a1111["scheduler"] == "ddim" and a1111["loras"] == ()
    with pytest.raises(TypeError, match="guidance"):
        merge_stored({}, guidance=3.0)
    assert "stored.get(" not in (SRC / "cli" / "generate.py").read_text(encoding="utf-8")
