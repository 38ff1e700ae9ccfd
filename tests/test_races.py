"""Processes released at the same instant on a new output folder (issue 18, item 1).

Each trial forks several processes that wait on one barrier, then do what ``dalle batch`` and ``dalle generate``
do before and at the first write: check the folder, start the run's manifest, write an image. Before the fix,
the folder check made the folder and removed it again, so a process that saw it appear could lose it.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

PROCESSES = 4
TRIALS = 25


def _start_and_write(barrier, folder: str, results) -> None:
    from pathlib import Path

    from PIL import Image

    from dallecli.batch.manifest import start_run
    from dallecli.images import prepare_output_folder, write_png

    try:
        barrier.wait()
        target = prepare_output_folder(Path(folder))
        start_run(target, 7, {"source": "race"})
        settings = {"prompt": "a red circle", "negative_prompt": None, "seed": os.getpid(), "steps": 1,
                    "guidance_scale": 0.0, "width": 8, "height": 8, "model": "shapes"}
        write_png(Image.new("RGB", (8, 8), "red"), target, settings, "Euler")
        results.put("ok")
    except BaseException as exc:  # the test reports what each process met
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to release processes together cheaply")
def test_processes_released_together_all_write_into_a_new_folder(tmp_path):
    context = multiprocessing.get_context("fork")
    failures = []
    for trial in range(TRIALS):
        folder = tmp_path / f"trial{trial}" / "nested" / "out"
        barrier, results = context.Barrier(PROCESSES), context.Queue()
        workers = [context.Process(target=_start_and_write, args=(barrier, str(folder), results))
                   for _ in range(PROCESSES)]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        failures += [outcome for outcome in outcomes if outcome != "ok"]
        assert len(list(folder.glob("*.png"))) == PROCESSES - sum(o != "ok" for o in outcomes)
        assert not list(folder.glob(".tmp-*")), "a temporary file was left behind"
    assert not failures, f"{len(failures)} of {TRIALS * PROCESSES} processes failed: {sorted(set(failures))[:3]}"


def test_file_modes_never_flip_the_process_umask(tmp_path, monkeypatch):
    """``default_mode`` runs in ``dalle serve``'s threads: setting the umask and back would race with them."""
    from dallecli import atomic

    assert atomic._UMASK == _current_umask()

    def refuse(_mask):
        raise AssertionError("os.umask was called while writing")

    monkeypatch.setattr(os, "umask", refuse)
    made = tmp_path / "made.png"
    made.write_bytes(b"")
    os.chmod(made, 0o600)
    atomic.default_mode(made)
    assert made.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
