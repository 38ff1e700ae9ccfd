"""`dalle batch` throughput against a bare loop calling the same diffusers pipeline on the same prompts.

    python -m bench.batch_bench [--prompts 96] [--batch-sizes 1,4,16] [--repeats 3]

Both arms run the embedded model on the first N prompts of PartiPrompts with the same settings (12 steps,
guidance 4, 64x64), each in its own process, alternately (A B A B ...); loading is not timed. Ours is the
real command (`dalle batch --json`, whose summary reports the generation seconds apart from loading)
writing PNGs and its manifest; the baseline only calls `pipe(prompts[i:i+B], generator=...)` and keeps the
images in memory. Columns (medians): images/s of each arm, what `--batch-size` buys (images/s against the
first batch size), ratio = ours ÷ bare loop (higher is better; target ≥ 0.95) with its range over the
repeats, and the CPU the rest of the machine used meanwhile (cores; above ~0.1 the timings are not
comparable: run again on a quiet machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine

PARTI = Path(__file__).resolve().parents[2] / "shared" / "data" / "PartiPrompts.tsv"
BARE_LOOP = """
import json, sys, time, torch
from diffusers import DiffusionPipeline
model, prompts_file, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = open(prompts_file, encoding="utf-8").read().splitlines()
pipe = DiffusionPipeline.from_pretrained(model, use_safetensors=True)
pipe.set_progress_bar_config(disable=True)
started = time.perf_counter()
for i in range(0, len(prompts), batch):
    chunk = prompts[i:i + batch]
    pipe(chunk, num_inference_steps=12, guidance_scale=4.0, height=64, width=64,
         generator=[torch.Generator().manual_seed(i + k) for k in range(len(chunk))])
print(json.dumps({"seconds": time.perf_counter() - started, "images": len(prompts)}))
"""


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``; None elsewhere)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(args: list[str]) -> tuple[dict, float | None]:
    """Run a child that prints a JSON document with ``seconds`` and ``images`` last on stdout.

    Returns:
        (that document, the CPU the rest of the machine used meanwhile in cores, or None if unknown).
    """
    busy, child, started = _busy_seconds(), _children_cpu(), time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    after = _busy_seconds()
    other = None if busy is None or after is None else max(0.0, (after - busy - (_children_cpu() - child)) / wall)
    return json.loads(done.stdout[done.stdout.rfind("\n{") + 1:]), other  # the last document that starts a line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from dallecli.store.resolve import embedded_model_path

    with PARTI.open(encoding="utf-8") as handle:
        prompts = [row["Prompt"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    prompts = [p.replace("\n", " ") for p in prompts[: args.prompts]]
    work = Path(tempfile.mkdtemp(prefix="dalle-batch-bench-"))
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    model = str(embedded_model_path())
    print(f"Machine: {machine()}; {len(prompts)} PartiPrompts, embedded model, 12 steps, 64x64, "
          f"median of {args.repeats} A B runs")
    print("| --batch-size | dalle batch images/s | × first size | bare loop images/s | × first size "
          "| ratio (range) | other load (cores) |\n|---|---|---|---|---|---|---|")
    first = None
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ours, bare, others = [], [], []
        for repeat in range(args.repeats):  # A B A B
            summary, other = timed_run([sys.executable, "-m", "dallecli", "batch", str(prompt_file), "--out",
                                        str(work / f"out-{batch}-{repeat}"), "--batch-size", str(batch),
                                        "--seed", "0", "--json"])
            if summary["images"] != len(prompts):  # both arms must make the same images
                raise SystemExit(f"dalle batch made {summary['images']} images, not {len(prompts)}")
            ours.append(summary["images"] / summary["seconds"])
            others.append(other)
            result, other = timed_run([sys.executable, "-c", BARE_LOOP, model, str(prompt_file), str(batch)])
            bare.append(result["images"] / result["seconds"])
            others.append(other)
        a, b = statistics.median(ours), statistics.median(bare)
        first = first or (a, b)
        ratios = [x / y for x, y in zip(ours, bare)]
        load = "?" if None in others else f"{max(others):.2f}"
        print(f"| {batch} | {a:.2f} | {a / first[0]:.2f}x | {b:.2f} | {b / first[1]:.2f}x "
              f"| {a / b:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {load} |", flush=True)


if __name__ == "__main__":
    main()
