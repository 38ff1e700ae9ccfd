"""``manifest.jsonl``: the record of a batch output folder, shared by every process that writes to it.

The first line is the run header, created atomically by whichever process comes first (the others read it, so
all shards and every resume use the same base seed):

    type        "run"
    base_seed   the base seed of every image's seed (:func:`dallecli.batch.plan.image_seed`)
    started     when the first run started, ISO 8601 local time with its offset
    source      the prompt file as given on the command line, or "stdin" (``dalle batch -``)
    version     the dallecli version of the first run

Then one line per image, appended once its file is in place (``"status": "done"``) or when it failed
(``"status": "failed"``):

    type            "image"
    status          "done" or "failed"
    row, line       the record's 0-based row number and 1-based line in the prompt file
    image           the image's 0-based number within its row
    prompt, seed    the prompt and the image's own seed
    negative_prompt, steps, guidance_scale, width, height
                    the settings it was made with (a row's own values or the options; None: no negative prompt)
    model           the model's name (alias, repo id or folder)
    scheduler       the scheduler that ran: our short name (``euler``, ...) or the diffusers class name of the
                    model's own (``PNDMScheduler``); None in a failed record
    requested_scheduler
                    what ``--scheduler`` asked for, "default" for the model's own (part of the resume key)
    clip_skip       AUTOMATIC1111 numbering (None: no layer skipped)
    init_image, mask, strength
                    a row's image-to-image or inpainting inputs (absolute paths) and strength, or None
    dtype, vae, loras, model_revision
                    the engine's resolved dtype, ``--vae`` name (None: the model's own), LoRAs as
                    ``[path or name, scale]`` pairs, and the model's resolved revision
    device          the device it ran on (done records)
    base_seed, shard
                    the run's base seed and ``--shard I/N`` (None: unsharded)
    path            the file's name directly inside the folder (done records)
    seconds         the wall time of the image's forward pass divided by the images in it (None for an image
                    found on disk and recorded afterwards)
    error           why it failed (failed records)
    rerank, scorer  ``--rerank K`` and the scorer's name (None: no reranking); part of the resume key
    reranked        with --rerank, done records: ``{"winner_seed", "clip_score", "candidate_seeds"}`` (``seed``
                    is then the first candidate's, the key's; the image's own is ``winner_seed``)

A record whose ``path`` is anything but a plain file name inside the folder (``../x.png``, an absolute path, a
sub-folder, a symbolic link) is ignored: nothing outside the folder is ever read or deleted through the
manifest. :data:`dallecli.batch.plan.KEY_FIELDS` (row, image, prompt, seed, the settings, model,
``requested_scheduler``, clip skip, inputs, and the engine's dtype, vae, loras and model_revision) is the resume
key: a job whose key has a done record, with its file on disk, is not made again.

Older manifests stay readable: before #19, ``scheduler`` held the ``--scheduler`` value ("default" for the
model's own) and an undocumented ``sampler`` field the one that ran; a record without ``requested_scheduler``
takes its key from that ``scheduler`` (:func:`dallecli.batch.plan.record_key`). Before #18, records lacked
``vae``, ``loras`` and ``model_revision`` (:func:`finished_images`).

Prompts read from stdin are kept beside the manifest as ``stdin-<sha256 prefix>.<format>``
(:func:`save_stdin_copy`), so that a resume can feed the same prompts again.

Each line is appended with one ``write`` on an ``O_APPEND`` descriptor and fsynced, so lines from parallel
processes never interleave and a line is either whole or absent. Later lines win over earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from dallecli.atomic import write_file
from dallecli.batch.plan import ADDED_KEY_FIELDS, record_key

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
        DiskFullError: no space left (or quota exceeded).
        OSError: the folder cannot be created or written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = manifest_path(folder)
    line = _line({"type": "run", "base_seed": base_seed, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  **(header or {})})
    if not path.exists():
        try:  # hard-linked into place: fails if another process made it first
            write_file(path, line, overwrite=False, what=f"the manifest in {folder}")
            return base_seed
        except FileExistsError:
            pass
    for _ in range(50):  # a manifest made by exclusive create may be empty for a moment
        recorded = recorded_seed(folder)
        if recorded is not None:
            return recorded
        if path.stat().st_size:
            break
        time.sleep(0.02)
    append_record(folder, json.loads(line))  # a manifest without a header (written by hand): add one
    return base_seed


def recorded_seed(folder: Path) -> int | None:
    """The base seed of the manifest's run header (read only); None when there is no manifest or no header."""
    for record in read_records(folder):
        if record.get("type") == "run" and isinstance(record.get("base_seed"), int):
            return record["base_seed"]
    return None


def save_stdin_copy(folder: Path, data: bytes, fmt: str) -> Path:
    """Keep prompts read from stdin in the output folder, named by their content, so that a resume feeds the
    same prompts again (``dalle batch - ... < FOLDER/stdin-<hash>.txt``); written atomically, once.

    Args:
        folder: the output folder (exists).
        data: the bytes read from stdin, as they came.
        fmt: their format ("txt", "csv", "tsv" or "jsonl"), the file's suffix.

    Returns:
        The copy's path, ``folder/stdin-<first 12 hex digits of the sha256>.<fmt>``.

    Raises:
        DiskFullError: no space left (or quota exceeded).
        OSError: the file cannot be written.
    """
    path = Path(folder) / f"stdin-{hashlib.sha256(data).hexdigest()[:12]}.{fmt}"
    if not path.is_file():
        try:
            write_file(path, data, overwrite=False, what=f"the prompts read from stdin in {folder}")
        except FileExistsError:  # another shard wrote the same prompts first
            pass
    return path


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


def image_file(folder: Path, name) -> Path | None:
    """The file a record's ``path`` names, if it is a plain file directly inside ``folder``; None for anything
    else (not a string, a separator or ``..`` in it, an absolute path, a symbolic link, missing)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    path = Path(folder) / name
    if path.parent != Path(folder) or path.is_symlink() or not path.is_file():
        return None
    return path


def finished_images(folder: Path, records: list[dict]) -> dict[tuple, list[Path]]:
    """The finished images that are still on disk: job key -> their paths (oldest first).

    An image counts as finished when its latest record is ``"done"`` and its file exists inside ``folder``
    (:func:`image_file`); an image recorded as failed after it was done (or whose file was deleted) is not
    finished.

    A record written before the key held ``vae``, ``loras`` and ``model_revision`` (a manifest from an older
    dalle) takes them from its image's own metadata, which has always recorded them: it counts as done for a
    run with the same VAE, LoRAs and revision, and not for another (a re-run with ``--vae tiny`` makes its
    images again). A record whose image carries no readable dalle metadata does not count as done.
    """
    latest: dict[tuple, dict] = {}
    paths: dict[tuple, list[Path]] = {}
    old_latest = {_old_key(r): r for r in records if r.get("type") == "image" and _is_old(r)}
    for record in records:
        if record.get("type") != "image":
            continue
        if _is_old(record):
            if old_latest.get(_old_key(record)) is not record or record.get("status") != "done":
                continue  # an older record of the same image, or a failure: no key to finish
            record = _completed_from_image(folder, record)
            if record is None:
                continue
        key = record_key(record)
        latest[key] = record
        if record.get("status") == "done":
            path = image_file(folder, record.get("path"))
            if path is not None and path not in paths.setdefault(key, []):
                paths[key].append(path)
    return {key: paths[key] for key, record in latest.items()
            if record.get("status") == "done" and paths.get(key)}


def _is_old(record: dict) -> bool:
    return any(name not in record for name in ADDED_KEY_FIELDS)


def _old_key(record: dict) -> tuple:
    return record_key({k: v for k, v in record.items() if k not in ADDED_KEY_FIELDS})


def _completed_from_image(folder: Path, record: dict) -> dict | None:
    """An old record with the key fields it lacks taken from its image's dalle metadata; None when unreadable."""
    from dallecli.errors import UsageError
    from dallecli.images import read_metadata

    path = image_file(folder, record.get("path"))
    try:
        stored = read_metadata(path) if path is not None else None
    except UsageError:
        return None
    if not stored or stored.get("source") != "dalle" or stored.get("loras"):
        return None  # dalle batch applied no LoRAs before the key held them
    return {**record, "vae": stored.get("vae"), "loras": [], "model_revision": stored.get("model_revision"),
            "dtype": record.get("dtype", stored.get("dtype"))}


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


def in_format(finished: dict[tuple, list[Path]], suffix: str) -> dict[tuple, list[Path]]:
    """The finished images (:func:`finished_images`) whose files end in ``suffix`` (``--format``'s: ".jpg"): a
    re-run in another format makes its images again, in that format, instead of counting the others as done."""
    kept = {key: [path for path in paths if path.suffix.lower() == suffix] for key, paths in finished.items()}
    return {key: paths for key, paths in kept.items() if paths}
