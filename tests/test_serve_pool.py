"""`dalle serve`'s engine pool and batcher with stand-in engines (no torch, no HTTP): loading on first use, LRU
unloading under the memory budget, `--keep-alive`, grouping into passes, the per-pass limit, cancelled and
dropped requests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from dallecli.engine.request import GenerationRequest
from dallecli.errors import ModelNotFoundError
from dallecli.serve.batcher import Batcher, QueueFull, ShuttingDown
from dallecli.serve.config import ServeConfig
from dallecli.serve.pool import EnginePool


@dataclass(frozen=True)
class FakeModel:
    name: str
    revision: str = "r1"
    path: Path = Path("/nonexistent")


class FakeSettings:
    def __init__(self, prompt: str, seed: int, request: GenerationRequest):
        self.data = {"prompt": prompt, "negative_prompt": None, "seed": seed, "steps": request.steps or 2,
                     "guidance_scale": 1.0, "width": 8, "height": 8, "model": "fake", "model_revision": "r1",
                     "scheduler": "euler", "dtype": "float32", "device": "cpu", "version": "0"}

    def to_dict(self) -> dict:
        return dict(self.data)


class FakeEngine:
    """What the pool and the batcher use of an Engine; records its passes."""

    def __init__(self, name: str, size: int = 100, delay: float = 0.0):
        if name.startswith("missing"):
            raise ModelNotFoundError(f"model '{name}' is not downloaded")
        self.model, self.device, self.dtype = FakeModel(name), "cpu", "float32"
        self.weight_bytes, self.delay, self.load_delay = size, delay, 0.0
        self.loaded, self.loads, self.passes = False, 0, []

    @property
    def pipe(self):
        if not self.loaded:
            time.sleep(self.load_delay)
            self.loaded, self.loads = True, self.loads + 1
        return self

    def unload(self) -> None:
        self.loaded = False

    def generate_items(self, items, request, on_step=None):
        assert self.loaded
        time.sleep(self.delay)
        self.passes.append([seed for _, seed in items])
        for step in range(1, 3):
            if on_step:
                on_step(step, 2)
        return [type("Made", (), {"image": Image.new("RGB", (8, 8)), "settings": FakeSettings(p, s, request)})()
                for p, s in items]


def make_pool(**config) -> tuple[EnginePool, dict]:
    built: dict[str, FakeEngine] = {}

    def factory(name, device, dtype, cache_dir):
        built[name] = FakeEngine(name or "default")
        return built[name]

    return EnginePool(ServeConfig(model="default", **config), engine_factory=factory), built


def test_openai_names_mean_the_default_and_paths_are_refused():
    pool, built = make_pool()
    default = pool.engine_for("dall-e-3")
    assert pool.engine_for(None) is default and pool.engine_for("gpt-image-1") is default
    assert not default.loaded  # resolving never loads
    for name in ("/etc", "../models/x", "a/b/c", "x.safetensors", "~/m"):
        with pytest.raises(ModelNotFoundError, match="paths on the server"):
            pool.engine_for(name)
    with pytest.raises(ModelNotFoundError):
        pool.engine_for("missing-model")  # no --allow-download: never a download


def test_the_default_model_is_the_one_serve_chose_and_is_not_read_again(monkeypatch, tmp_path):
    """`dalle serve` picks the default model as every command does (--model, else DALLE_MODEL or the config
    file); the pool takes it as given, so None is the embedded model, never the environment read a second time."""
    from typer.testing import CliRunner

    import dallecli.serve.run as run
    from dallecli.cli.app import app

    monkeypatch.setenv("DALLE_MODEL", "from-the-environment")
    names: list = []

    def factory(name, device, dtype, cache_dir):
        names.append(name)
        return FakeEngine(name or "embedded")

    pool = EnginePool(ServeConfig(), engine_factory=factory)
    assert pool.default_model is None
    assert pool.engine_for("dall-e-3").model.name == "embedded" and names == [None]

    class Started(Exception):
        pass

    chosen: list[ServeConfig] = []

    def serve_forever(config):  # stands in for the server (the real one ends the process when it stops)
        chosen.append(config)
        raise Started

    monkeypatch.setattr(run, "serve_forever", serve_forever)
    CliRunner().invoke(app, ["serve", "--out", str(tmp_path / "out")])
    assert [config.model for config in chosen] == ["from-the-environment"]
    CliRunner().invoke(app, ["serve", "--out", str(tmp_path / "out"), "--model", "given"])
    assert [config.model for config in chosen] == ["from-the-environment", "given"]


def test_least_recently_used_model_is_unloaded_under_the_budget_and_idle_ones_after_keep_alive():
    pool, _ = make_pool(memory_budget=250, keep_alive=10.0)
    a, b, c = pool.engine_for("a"), pool.engine_for("b"), pool.engine_for("c")
    pool.acquire(a), pool.acquire(b)
    assert a.loaded and b.loaded
    pool.acquire(a)  # a is now the most recently used
    pool.acquire(c)  # 300 > 250: b goes
    assert a.loaded and c.loaded and not b.loaded
    assert sorted(pool.loaded_names()) == ["a", "c"]
    assert pool.unload_idle(time.monotonic() + 5) == []
    assert sorted(pool.unload_idle(time.monotonic() + 11)) == ["a", "c"]
    pool.acquire(a)
    assert a.loaded and a.loads == 2  # loaded again on use


def run_batcher(pool, **options) -> Batcher:
    return Batcher(pool, options.pop("out"), **options)


def test_compatible_requests_share_a_pass_within_the_limit_and_others_do_not(tmp_path):
    pool, _ = make_pool()
    engine = pool.engine_for(None)
    pool.acquire(engine)
    batcher = run_batcher(pool, out=tmp_path, max_queue=16, batch_window=0.2, max_batch=4)
    same = GenerationRequest("x", steps=2)
    other = GenerationRequest("x", steps=3)
    futures = [batcher.submit(engine, same, [(f"p{i}", i)]) for i in range(3)]
    futures.append(batcher.submit(engine, other, [("q", 10)]))
    futures.append(batcher.submit(engine, same, [("p3", 3), ("p4", 4)]))  # would make 5 > 4: waits for the next pass
    futures.append(batcher.submit(engine, same, [("alone", 20)], batch_size=1))  # asks for passes of 1
    batcher.start()
    results = [f.result(timeout=30) for f in futures]
    batcher.stop(), batcher.join(5)
    assert engine.passes == [[0, 1, 2], [10], [3, 4], [20]]
    assert [len(r) for r in results] == [1, 1, 1, 1, 2, 1]
    assert all(path.parent == tmp_path and path.is_file() for r in results for path, _ in r)
    assert [settings["seed"] for _, settings in results[4]] == [3, 4]
    assert not list(tmp_path.glob(".tmp*"))


def test_full_queue_cancelled_requests_and_shutdown(tmp_path):
    pool, _ = make_pool()
    engine = pool.engine_for(None)
    batcher = run_batcher(pool, out=tmp_path, max_queue=2, batch_window=0.0, max_batch=8)
    request = GenerationRequest("x", steps=2)
    first = batcher.submit(engine, request, [("gone", 1)])
    second = batcher.submit(engine, request, [("kept", 2)], batch_size=1)
    with pytest.raises(QueueFull):
        batcher.submit(engine, request, [("third", 3)])
    assert batcher.progress()["queued"] == 2
    assert first.cancel()  # its client went away before it started: it never runs, nothing is written
    batcher.start()
    assert second.result(timeout=30)[0][1]["seed"] == 2
    assert engine.passes == [[2]] and len(list(tmp_path.glob("*.png"))) == 1
    engine.delay = 0.5
    running = batcher.submit(engine, request, [("running", 4)])
    time.sleep(0.2)
    queued = batcher.submit(engine, GenerationRequest("x", steps=5), [("queued", 5)])
    batcher.stop()
    with pytest.raises(ShuttingDown):
        queued.result(timeout=30)
    assert running.result(timeout=30)[0][1]["seed"] == 4  # the pass in flight finishes
    with pytest.raises(ShuttingDown):
        batcher.submit(engine, request, [("late", 6)])
    batcher.join(5)
    assert batcher.progress() == {"busy": False, "loading": False, "step": 0, "steps": 0, "queued": 0,
                                  "model": "default"}


def test_progress_says_loading_while_a_model_loads_and_abort_discards_the_pass_in_flight(tmp_path):
    pool, _ = make_pool()
    engine = pool.engine_for(None)
    engine.load_delay, engine.delay = 0.3, 0.3
    batcher = run_batcher(pool, out=tmp_path, max_queue=4, batch_window=0.0, max_batch=8)
    batcher.start()
    future = batcher.submit(engine, GenerationRequest("x", steps=2), [("x", 1)])
    seen = []
    while not future.done():
        seen.append(batcher.progress()["loading"])
        time.sleep(0.02)
    assert True in seen and future.result()[0][1]["seed"] == 1
    assert batcher.progress()["loading"] is False
    running = batcher.submit(engine, GenerationRequest("x", steps=2), [("discarded", 2)])
    time.sleep(0.1)  # in its pass now
    batcher.stop()
    batcher.abort()  # a forced shutdown: the pass is dropped at its next step, nothing of it is written
    with pytest.raises(ShuttingDown):
        running.result(timeout=30)
    batcher.join(5)
    assert [p.name for p in tmp_path.glob("*.png") if "discarded" in p.name] == []
