"""Threads on a shared CPU: warm images of the embedded model with and without a competing busy process.

    python -m bench.threads_bench [--images 6] [--loads 0,1]

Each arm runs in a fresh process (thread settings apply at start): ``auto`` is dalle's policy (it measures the
cores other processes keep busy, engine/threads.py), ``1`` and ``2`` fix ``DALLE_THREADS``, ``passive`` adds
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead of spinning at barriers) to 2 threads, and ``diffusers`` is
a plain ``StableDiffusionPipeline`` with torch's default threads: the baseline. A load of N starts N
processes spinning in pure Python. Prints a Markdown table of median seconds per image and ratios to the
baseline under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import machine

ARMS = {"auto": {}, "1": {"DALLE_THREADS": "1"}, "2": {"DALLE_THREADS": "2"},
        "passive": {"DALLE_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}, "diffusers": {}}
PROMPT = "a red circle on a blue background"


def child(arm: str, images: int) -> dict:
    """Time ``images`` warm images (after one warm-up) in this process; returns seconds and threads used."""
    import torch

    if arm == "diffusers":
        from diffusers import StableDiffusionPipeline

        from dallecli.store.resolve import embedded_model_path

        pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path(), use_safetensors=True)

        def one(seed: int) -> None:
            pipe(PROMPT, num_inference_steps=12, guidance_scale=4.0, width=64, height=64,
                 generator=torch.Generator().manual_seed(seed))
    else:
        from dallecli.engine.generate import Engine
        from dallecli.engine.request import GenerationRequest

        engine = Engine(None, "cpu")

        def one(seed: int) -> None:
            next(engine.generate(GenerationRequest(PROMPT, seed=seed)))
    one(0)
    times = []
    for seed in range(1, images + 1):
        started = time.perf_counter()
        one(seed)
        times.append(time.perf_counter() - started)
    return {"seconds": statistics.median(times), "threads": torch.get_num_threads()}


def run_arm(arm: str, images: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DALLE_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-m", "bench.threads_bench", "--child", arm, "--images", str(images)],
                          capture_output=True, text=True, env={**env, **ARMS[arm]}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--loads", default="0,1", help="competing busy processes, comma-separated")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.images)))
        return
    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}\n")
    print("| competing busy processes | arm | threads | s/image | vs diffusers |")
    print("|---|---|---|---|---|")
    for load in (int(n) for n in args.loads.split(",")):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            time.sleep(1.0 if load else 0)
            results = {arm: run_arm(arm, args.images) for arm in ARMS}
        finally:
            for spinner in spinners:
                spinner.kill()
        base = results["diffusers"]["seconds"]
        for arm, result in results.items():
            print(f"| {load} | {arm} | {result['threads']} | {result['seconds']:.3f} | {result['seconds'] / base:.2f}x |")


if __name__ == "__main__":
    main()
