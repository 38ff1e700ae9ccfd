"""Engines kept warm: one per (model, device, dtype), loaded on first use, unloaded when idle too long
(``--keep-alive``) or, least recently used first, to keep the loaded models under the memory budget.

Only the batcher's worker thread loads, runs and unloads pipelines (:meth:`EnginePool.acquire`,
:meth:`EnginePool.unload_idle`); request handlers only resolve names to engines (:meth:`EnginePool.engine_for`),
which reads configs and never loads weights, never downloads (unless ``--allow-download``) and never touches the
network otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from dallecli.engine.memory import DTYPE_BYTES
from dallecli.errors import ModelNotFoundError, UsageError
from dallecli.serve.config import ServeConfig

log = logging.getLogger("dallecli.serve")

# OpenAI's model names: clients send them by default; they mean the server's default model
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith(".safetensors")


class EnginePool:
    """The engines of a server.

    Args:
        config: the server's settings (default model, device, dtype, cache, keep-alive, budget, downloads).
        engine_factory: builds an engine from ``(model, device, dtype, cache_dir)``; default
            :class:`dallecli.engine.generate.Engine` (tests may pass another).
    """

    def __init__(self, config: ServeConfig, engine_factory=None):
        self.config = config
        # as `dalle serve` chose it (--model, else the user's default): None is the embedded model, as for every
        # command (dallecli.store.resolve.resolve_model)
        self.default_model = config.model
        self._factory = engine_factory
        self._engines: dict[tuple, object] = {}
        self._by_name: dict[str | None, tuple] = {}
        self._for_task: dict[tuple, object] = {}  # (engine key, task) -> the engine that runs it
        self._last_used: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._download_lock = threading.Lock()

    # -- names -> engines (request handlers) ---------------------------------------------------------
    def model_name(self, requested: str | None) -> str | None:
        """The model a request means: its ``model``, or the default for none and for OpenAI's own names."""
        if requested is None or not requested.strip() or requested.strip().lower() in OPENAI_MODELS:
            return self.default_model
        return requested.strip()

    def engine_for(self, requested: str | None):
        """The engine for a request's ``model`` (nothing is loaded here).

        Raises:
            ModelNotFoundError: "model 'X' is not available: ...": unknown, malformed, not downloaded (downloaded
                first when the server allows it), or a file-system path (only the server's own ``--model`` may
                be one).
            UsageError: a registry entry of another kind (an upscaler, a VAE).
        """
        name = self.model_name(requested)
        with self._lock:
            key = self._by_name.get(name)
            if key is not None:
                return self._engines[key]
        if name is not None and name != self.default_model and (_looks_like_path(name) or Path(name).exists()):
            raise ModelNotFoundError(f"model '{name}' is not available: give a registry alias or an org/name repo "
                                     "id (paths on the server are not accepted over the API)")
        try:
            engine = self._build(name)
        except UsageError:
            if name is not None:
                self._check_name(name)  # the CLI's "--model 'x' is not a registry alias" in API words, as a 404
            raise
        except ModelNotFoundError as exc:
            if name is None:
                raise
            if not self.config.allow_download:
                raise ModelNotFoundError(f"model '{name}' is not available: {_reason(exc, name)} (the server "
                                         "downloads only when started with --allow-download)") from None
            self._download(name)
            engine = self._build(name)
        key = self._key(engine)
        with self._lock:
            engine = self._engines.setdefault(key, engine)
            self._by_name[name] = key
        return engine

    @staticmethod
    def _check_name(name: str) -> None:
        """Refuse, in API words (not the CLI's ``--model``), a name that is neither a registry alias nor an
        org/name repo id.

        Raises:
            ModelNotFoundError: such a name.
        """
        from dallecli.store.registry import lookup
        from dallecli.store.resolve import check_repo_id

        if lookup(name) is None:
            try:
                check_repo_id(name)
            except UsageError:
                raise ModelNotFoundError(f"model '{name}' is not available: it is neither a registry alias nor an "
                                         "org/name Hub repo id; GET /v1/models lists the models this server "
                                         "has") from None

    def engine_for_task(self, requested: str | None, task: str):
        """The engine that runs ``task`` ("img2img", "inpaint", "variation") for a request's ``model``: the
        model's own, or its registry inpainting variant for "inpaint" when downloaded (as ``dalle edit``
        chooses: :meth:`dallecli.engine.generate.Engine.for_task`), kept like the others.

        Raises:
            ModelNotFoundError, UsageError: as :meth:`engine_for`.
            TaskUnsupportedError: the model cannot run ``task`` ("MODEL cannot do edit"), before anything loads.
        """
        if task != "txt2img":  # "pixart-sigma cannot do edit", downloaded or not (as `dalle edit` says it)
            from dallecli.engine.tasks import check_registry_task
            from dallecli.store.registry import lookup

            name = self.model_name(requested)
            check_registry_task(lookup(name) if name else None, task)
        engine = self.engine_for(requested)
        if task == "txt2img":
            return engine
        key = (self._key(engine), task)
        with self._lock:
            found = self._for_task.get(key)
        if found is None:
            found = engine.for_task(task)
            for notice in found.notices:
                log.info("%s", notice)
            with self._lock:
                if found is not engine:
                    found = self._engines.setdefault(self._key(found), found)
                self._for_task[key] = found
        return found

    def _build(self, name: str | None):
        if self._factory is not None:
            return self._factory(name, self.config.device, self.config.dtype, self.config.cache_dir)
        from dallecli.engine.generate import Engine

        return Engine(name, self.config.device, self.config.dtype, self.config.cache_dir, backend=self.config.backend)

    def _download(self, name: str) -> None:
        from dallecli.store.download import download, plan_download

        with self._download_lock:  # one download at a time; a second request for it finds it cached
            log.info("downloading %s (--allow-download)", name)
            download(plan_download(name), cache_dir=self.config.cache_dir)

    # -- loading and unloading (the worker thread) -----------------------------------------------------
    @staticmethod
    def _key(engine) -> tuple:
        return (engine.model.name, engine.model.revision, engine.device, engine.dtype)

    def weight_bytes(self, engine) -> int:
        """Memory the engine's weights take once loaded, bytes (estimated from the safetensors headers)."""
        fp32 = getattr(engine, "weight_bytes", None)
        if fp32 is None:
            from dallecli.engine.device import float32_weight_bytes

            fp32 = float32_weight_bytes(engine.model.path) or 0
        return fp32 * DTYPE_BYTES.get(engine.dtype, 4) // 4

    def acquire(self, engine) -> None:
        """Make ``engine`` ready to run: mark it used, unload the least recently used others while the budget
        would be exceeded, and load it."""
        key = self._key(engine)
        with self._lock:
            self._last_used[key] = time.monotonic()
            others = sorted((k for k, e in self._engines.items() if k != key and e.loaded),
                            key=lambda k: self._last_used.get(k, 0))
        budget = self.config.memory_budget
        if budget is not None and not engine.loaded:
            need = self.weight_bytes(engine)
            held = sum(self.weight_bytes(self._engines[k]) for k in others)
            while others and held + need > budget:
                victim = others.pop(0)
                held -= self.weight_bytes(self._engines[victim])
                self._unload(victim, "to stay under the memory budget")
        if not engine.loaded:
            started = time.perf_counter()
            engine.pipe  # noqa: B018 - loads it
            log.info("loaded %s in %.1f s", engine.model.name, time.perf_counter() - started)

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload the models unused for longer than ``keep_alive``; returns their names."""
        if self.config.keep_alive is None:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [k for k, e in self._engines.items()
                    if e.loaded and now - self._last_used.get(k, now) > self.config.keep_alive]
        for key in idle:
            self._unload(key, f"idle for more than {self.config.keep_alive:g} s")
        return [k[0] for k in idle]

    def _unload(self, key: tuple, why: str) -> None:
        self._engines[key].unload()
        log.info("unloaded %s (%s)", key[0], why)

    def loaded_names(self) -> list[str]:
        """Names of the models in memory now."""
        with self._lock:
            return [k[0] for k, e in self._engines.items() if e.loaded]

    def available_models(self) -> list[dict]:
        """The models a request can name without a download: the default model, the embedded one and every
        complete text-to-image pipeline in the HF cache: ``{"id", "revision", "family", "created"}``."""
        from dallecli.store.cache import list_models

        found, seen = [], set()
        if self.default_model is not None:
            try:
                engine = self.engine_for(None)
                found.append({"id": engine.model.name, "revision": engine.model.revision, "family": None,
                              "created": _mtime(engine.model.path)})
                seen.add(engine.model.name)
            except ModelNotFoundError:
                pass
        for model in list_models(self.config.cache_dir):
            if model.kind != "pipeline" or model.missing or model.name in seen:
                continue
            seen.add(model.name)
            found.append({"id": model.name, "revision": model.revision, "family": model.family,
                          "created": _mtime(model.path)})
        return found


def _reason(exc: ModelNotFoundError, name: str) -> str:
    """The engine's "model 'X' is not downloaded; run ..." without its repeated name."""
    text = str(exc)
    for prefix in (f"model '{name}' ", f"{name} "):
        if text.startswith(prefix):
            return "it " + text[len(prefix):]
    return text


def _mtime(path: Path) -> int:
    try:
        return int(Path(path).stat().st_mtime)
    except OSError:
        return 0
