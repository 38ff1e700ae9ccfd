"""``manifest.jsonl``: the record of a batch output folder, shared by every process that writes to it.

The first line is the run header, ``{"type": "run", "base_seed": ..., ...}``, created atomically by whichever
process comes first (the others read it, so all shards and every resume use the same base seed). Then one line
per image: ``{"type": "image", "status": "done", "row", "line", "image", "prompt", "seed", <settings>, "path",
"seconds", ...}`` once the PNG is in place, or ``"status": "failed"`` with ``"error"``. ``path`` is relative to
the folder; ``seconds`` is the wall time of the image's forward pass divided by the images in it.

Each line is appended with one ``write`` on an ``O_APPEND`` descriptor and fsynced, so lines from parallel
processes never interleave and a line is either whole or absent. Later lines win over earlier ones.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from dallecli.batch.plan import record_key

MANIFEST_NAME = "manifest.jsonl"


def manifest_path(folder: Path) -> Path:
    """Where the manifest of an output folder lives."""
    return Path(folder) / MANIFEST_NAME


def start_run(folder: Path, base_seed: int, header: dict | None = None) -> int:
    """Create the manifest with its run header if it does not exist yet; return the base seed in force.

    Safe against other processes starting at the same moment: the header goes to a temporary file that is
    hard-linked into place, so exactly one process creates the manifest and the others read its header.

    Args:
        folder: the output folder (created).
        base_seed: the base seed to record when this call creates the manifest.
        header: more fields for the header line (source file, version, ...).

    Returns:
        The base seed recorded in the manifest (``base_seed`` if this call created it).

    Raises:
        OSError: the folder cannot be created or written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = manifest_path(folder)
    line = _line({"type": "run", "base_seed": base_seed, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  **(header or {})})
    if not path.exists():
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-manifest-", dir=folder)
        from dallecli.images import default_mode

        default_mode(Path(tmp_name))
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp_name, path)  # fails if another process made it first
                return base_seed
            except FileExistsError:
                pass
            except OSError:  # no hard links here: exclusive create instead
                try:
                    _write_all(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), line)
                    return base_seed
                except FileExistsError:
                    pass
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    for _ in range(50):  # a manifest made by exclusive create may be empty for a moment
        for record in read_records(folder):
            if record.get("type") == "run" and isinstance(record.get("base_seed"), int):
                return record["base_seed"]
        if path.stat().st_size:
            break
        time.sleep(0.02)
    append_record(folder, json.loads(line))  # a manifest without a header (written by hand): add one
    return base_seed


def append_record(folder: Path, record: dict) -> None:
    """Append one record as one line, atomically (one O_APPEND write, then fsync).

    Raises:
        OSError: the manifest cannot be written.
    """
    _write_all(os.open(manifest_path(folder), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), _line(record))


def read_records(folder: Path) -> list[dict]:
    """All records of the manifest in order; [] when there is none. Lines that are not JSON objects are
    skipped (a line being written by another process, or a damaged one)."""
    try:
        data = manifest_path(folder).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for raw in data.splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def finished_images(folder: Path, records: list[dict]) -> dict[tuple, list[Path]]:
    """The finished images that are still on disk: job key -> their paths (oldest first).

    An image counts as finished when its latest record is ``"done"`` and its file exists; an image recorded
    as failed after it was done (or whose file was deleted) is not finished.
    """
    latest: dict[tuple, dict] = {}
    paths: dict[tuple, list[Path]] = {}
    for record in records:
        if record.get("type") != "image":
            continue
        key = record_key(record)
        latest[key] = record
        if record.get("status") == "done" and record.get("path"):
            path = Path(folder) / record["path"]
            if path.is_file() and path not in paths.setdefault(key, []):
                paths[key].append(path)
    return {key: paths[key] for key, record in latest.items()
            if record.get("status") == "done" and paths.get(key)}


def _line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n").encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
