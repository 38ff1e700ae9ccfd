"""Start-up, cold and warm generation with the embedded model, next to plain diffusers doing the same work.

    python -m bench.generate_bench [--repeats 5]
    python -m bench.generate_bench --only cold --repeats 7   # the cold-start row alone, each run printed

Rows (median of interleaved runs, ratio = dallecli / baseline):
- `dalle --help` against a bare `python -c pass` (the interpreter's own start-up);
- cold `dalle generate` (process start to PNG written) against a script that imports diffusers, loads the
  same folder with `DiffusionPipeline.from_pretrained` and saves one image with the same settings;
- warm per-image time in one process: `Engine.generate` against calling the loaded pipeline directly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import PYTHON, interleaved, machine, row, run_process, run_process_cpu

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
    parser.add_argument("--only", choices=("cold",), help="measure one row only (cold: process start to PNG written)")
    args = parser.parse_args(argv)
    from dallecli.store.resolve import embedded_model_path

    model = str(embedded_model_path())
    work = Path(tempfile.mkdtemp(prefix="dalle-bench-"))
    load_before = os.getloadavg()[0]
    counter = iter(range(10**6))

    if args.only == "cold":
        runs: dict[str, list[tuple[float, float]]] = {"dalle": [], "plain": []}
        for _ in range(args.repeats):  # alternating; each run printed, wall and CPU time, so the spread is visible
            runs["dalle"].append(run_process_cpu([PYTHON, "-m", "dallecli", "generate", PROMPT, "--seed", "1",
                                                  "--out", str(work / f"ours{next(counter)}")]))
            runs["plain"].append(run_process_cpu([PYTHON, "-c", PLAIN_SCRIPT, model, PROMPT,
                                                  str(work / f"plain{next(counter)}.png")]))
        print(f"Machine: {machine()}; load average before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
        for name, values in [(k, v) for k, v in runs.items() if v]:
            print(f"{name}: wall " + " ".join(f"{w:.2f}" for w, _ in values) + " s; CPU "
                  + " ".join(f"{c:.2f}" for _, c in values) + " s")
        print("| what | dallecli | baseline | ratio |\n|---|---|---|---|")
        for arm in [k for k in runs if k != "plain" and runs[k]]:
            for i, what in ((0, "wall"), (1, "CPU time")):
                ours, base = (statistics.median(v[i] for v in runs[k]) for k in (arm, "plain"))
                print(row(f"cold generate ({arm}), embedded model, 1 image, {what} (baseline: plain diffusers script)",
                          ours, base))
        return
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
