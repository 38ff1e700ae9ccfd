"""Start-up, cold and warm generation with the embedded model, next to plain diffusers doing the same work.

    python -m bench.generate_bench [--repeats 5]

Rows (median of interleaved runs, ratio = dallecli / baseline):
- `dalle --help` against a bare `python -c pass` (the interpreter's own start-up);
- cold `dalle generate` (process start to PNG written) against a script that imports diffusers, loads the
  same folder with `DiffusionPipeline.from_pretrained` and saves one image with the same settings;
- warm per-image time in one process: `Engine.generate` against calling the loaded pipeline directly.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import PYTHON, interleaved, machine, row, run_process

PROMPT = "a red circle on a blue background"
PLAIN_SCRIPT = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], use_safetensors=True)
image = pipe(sys.argv[2], num_inference_steps=12, guidance_scale=4.0, height=64, width=64,
             generator=torch.Generator().manual_seed(1)).images[0]
image.save(sys.argv[3])
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from dallecli.store.resolve import embedded_model_path

    model = str(embedded_model_path())
    work = Path(tempfile.mkdtemp(prefix="dalle-bench-"))
    counter = iter(range(10**6))

    help_ours, help_base = interleaved(
        lambda: run_process([PYTHON, "-m", "dallecli", "--help"]),
        lambda: run_process([PYTHON, "-c", "pass"]), args.repeats)
    cold_ours, cold_base = interleaved(
        lambda: run_process([PYTHON, "-m", "dallecli", "generate", PROMPT, "--seed", "1", "--out",
                             str(work / f"ours{next(counter)}")]),
        lambda: run_process([PYTHON, "-c", PLAIN_SCRIPT, model, PROMPT, str(work / f"plain{next(counter)}.png")]),
        args.repeats)

    import torch

    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    engine = Engine(None)
    pipe = engine.pipe

    def ours() -> float:
        started = time.perf_counter()
        list(engine.generate(GenerationRequest(PROMPT, seed=1)))
        return time.perf_counter() - started

    def plain() -> float:
        started = time.perf_counter()
        pipe(PROMPT, num_inference_steps=12, guidance_scale=4.0, height=64, width=64,
             generator=torch.Generator().manual_seed(1)).images[0]
        return time.perf_counter() - started

    ours(), plain()  # warm-up
    warm_ours, warm_base = interleaved(ours, plain, max(args.repeats * 4, 10))
    print(f"Machine: {machine()}")
    print("| what | dallecli | baseline | ratio |\n|---|---|---|---|")
    print(row("`dalle --help` (baseline: `python -c pass`)", help_ours, help_base))
    print(row("cold generate, embedded model, 1 image (baseline: plain diffusers script)", cold_ours, cold_base))
    print(row("warm per image, 64x64, 12 steps (baseline: pipe() call)", warm_ours, warm_base))


if __name__ == "__main__":
    main()
