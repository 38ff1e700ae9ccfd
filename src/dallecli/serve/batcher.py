"""The bounded request queue and dynamic batching, run by one worker thread (torch passes never overlap).

A request becomes a :class:`Job`: its images as ``(prompt, seed)`` items and the settings they share. The
worker takes the oldest job and, when requests have been overlapping (one arrived while another waited or ran, in
the last :data:`QUIET_SECONDS`), waits up to ``batch_window`` for more jobs with the same model and settings (size,
steps, guidance, scheduler, negative prompt, LoRAs, clip skip, images per pass), and runs them together through
:meth:`dallecli.engine.generate.Engine.generate_items`, at most ``limit`` images per forward pass. Each image keeps
its own seed, so its pixels equal ``dalle generate --seed S --batch-size B`` with B the images of its pass. A
request with an init image (edits, variations, img2img) is never batched with another: two requests rarely share
an input, and comparing uploads byte for byte to find out is not worth a pass; its own ``n`` images still share
passes, as ``dalle edit --batch-size`` does. Images
are written in the worker, atomically (:func:`dallecli.images.write_png`), so a client that goes away leaves no
half-written file; its images stay in the output folder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from dallecli.errors import DalleError

log = logging.getLogger("dallecli.serve")


QUIET_SECONDS = 2.0  # requests have not been overlapping for this long: a lone client, no waiting


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already (the server answers 503)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no more work."""


@dataclass
class Job:
    """One request's images.

    Attributes:
        engine: the model's engine.
        request: the shared settings, planned (defaults filled; its prompt, seed and count are ignored).
        items: ``(prompt, seed)`` per image.
        limit: images per forward pass at most (the request's batch size, capped by the server's).
        future: resolved with ``[(path, settings dict), ...]`` in item order, or the error.
    """

    engine: object
    request: object
    items: list[tuple[str, int]]
    limit: int
    future: Future = field(default_factory=Future)
    results: list = field(default_factory=list)

    @property
    def key(self) -> tuple:
        """What must be equal for two jobs to share a forward pass. A job with an init image (edits, variations,
        img2img) shares with no other: its images run in passes of their own."""
        if self.request.image is not None:
            return (id(self),)
        return (id(self.engine), replace(self.request, prompt="", seed=None, num_images=1, batch_size=None),
                self.limit)


class Batcher:
    """The queue and its worker.

    Args:
        pool: the :class:`~dallecli.serve.pool.EnginePool` (the worker loads and unloads through it).
        out: the output folder.
        max_queue: jobs waiting at most (:class:`QueueFull` above).
        batch_window: seconds to wait for jobs to join a pass.
        max_batch: images per forward pass at most.
        model: the model the progress names before the first pass (the preloaded one).
    """

    def __init__(self, pool, out: Path, max_queue: int = 64, batch_window: float = 0.05, max_batch: int = 8,
                 model: str | None = None):
        self.pool, self.out = pool, Path(out)
        self.max_queue, self.batch_window, self.max_batch = max_queue, batch_window, max_batch
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._progress = {"busy": False, "loading": False, "step": 0, "steps": 0, "model": model}
        self._abort = False  # discard the pass in flight at its next step (a forced shutdown)
        self._overlap_at = float("-inf")  # when a request last came while another was waiting or running
        self.passes = 0  # forward passes run (tests, logs)

    # -- the request side ------------------------------------------------------------------------------
    def submit(self, engine, request, items: list[tuple[str, int]], batch_size: int | None = None) -> Future:
        """Queue a request's images; returns the future of ``[(path, settings), ...]``.

        Raises:
            QueueFull: ``max_queue`` requests are waiting.
            ShuttingDown: the server is stopping.
        """
        limit = max(1, min(batch_size or self.max_batch, self.max_batch))
        job = Job(engine, request, list(items), limit)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (--max-queue {self.max_queue})")
            if self._pending or self._progress["busy"]:  # it arrived while others were waiting or running
                self._overlap_at = time.monotonic()
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def progress(self) -> dict:
        """``{"busy", "loading", "step", "steps", "queued", "model"}``: the pass running now (``loading`` while its
        model loads, before step 1) and the requests waiting."""
        with self._cond:
            return {**self._progress, "queued": len(self._pending)}

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dalle-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Take no more work and fail the waiting requests (503); the pass in flight finishes and its images are
        written."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down"))

    def abort(self) -> None:
        """Discard the pass in flight at its next denoising step (nothing of it is written; its requests get
        :class:`ShuttingDown`), after :meth:`stop`: a forced shutdown, or one whose grace period has run out."""
        with self._cond:
            self._abort = True

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to finish the pass in flight."""
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------------------
    def _next_group(self) -> list[Job] | None:
        """The oldest job and the compatible jobs that arrive within the window (None when stopping; empty when
        the oldest job was cancelled)."""
        while True:
            with self._cond:
                if self._stopping:
                    return None
                if self._pending:
                    break
                self._cond.wait(timeout=1.0)
                if self._pending or self._stopping:
                    continue
            self.pool.unload_idle()  # idle: models unused for --keep-alive seconds go
        with self._cond:
            if self._stopping:
                return None
            first = self._pending.popleft()
            if not first.future.set_running_or_notify_cancel():  # its client went away before it started
                return []
            group, count = [first], len(first.items)
            # wait for company only when there is traffic: a lone client (`dalle generate --server`) never waits
            company = time.monotonic() - self._overlap_at < QUIET_SECONDS
            deadline = time.monotonic() + (self.batch_window if company or self._pending else 0)
            while count < first.limit and not self._stopping:
                for job in [j for j in self._pending if j.key == first.key]:
                    if count + len(job.items) > first.limit:  # a request is not split to fill a pass
                        continue
                    self._pending.remove(job)
                    if job.future.set_running_or_notify_cancel():
                        group.append(job)
                        count += len(job.items)
                remaining = deadline - time.monotonic()
                if count >= first.limit or remaining <= 0:
                    break
                self._cond.wait(timeout=remaining)
            self._progress.update(busy=True, step=0, steps=first.request.steps or 0,
                                  model=first.engine.model.name)
            return group

    def _run(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            if not group:
                continue
            try:
                self._run_group(group)
            except Exception as exc:  # noqa: BLE001 - every request of the group gets the error
                if not isinstance(exc, (DalleError, ShuttingDown)):
                    log.exception("pass failed")
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._cond:
                    self._progress.update(busy=False, step=0, steps=0)
            self.pool.unload_idle()

    def _on_step(self, step: int, steps: int) -> None:
        with self._cond:
            if self._abort:
                raise ShuttingDown("the server is shutting down; the pass was discarded")
            self._progress.update(step=step, steps=steps)

    def _run_group(self, group: list[Job]) -> None:
        from dallecli.engine.schedulers import a1111_sampler
        from dallecli.images import write_png

        first = group[0]
        engine, limit = first.engine, first.limit
        if not engine.loaded:
            with self._cond:
                self._progress["loading"] = True
        try:
            self.pool.acquire(engine)
        finally:
            with self._cond:
                self._progress["loading"] = False
        owners = [(job, item) for job in group for item in job.items]
        for start in range(0, len(owners), limit):
            chunk = owners[start:start + limit]
            started = time.perf_counter()
            images = engine.generate_items([item for _, item in chunk], first.request, on_step=self._on_step)
            self.passes += 1
            log.info("pass %d: %d image(s) from %d request(s), %s, %.2f s", self.passes, len(chunk),
                     len({id(job) for job, _ in chunk}), engine.model.name, time.perf_counter() - started)
            for (job, _), made in zip(chunk, images):
                settings = made.settings.to_dict()
                path = write_png(made.image, self.out, settings, a1111_sampler(settings["scheduler"]))
                job.results.append((path, settings))
                if len(job.results) == len(job.items):
                    job.future.set_result(job.results)
