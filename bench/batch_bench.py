"""`dalle batch` throughput against a bare loop calling the same diffusers pipeline on the same prompts.

    python -m bench.batch_bench [--prompts 128] [--batch-sizes 1,8,16] [--repeats 2]

Both arms run the embedded model on the first N prompts of PartiPrompts with the same settings (12 steps,
guidance 4, 64x64), each in its own process; loading is not timed. Ours is the real command (`dalle batch
--json`, whose summary reports the generation seconds apart from loading) writing PNGs and its manifest; the
baseline only calls `pipe(prompts[i:i+B], generator=...)` and keeps the images in memory. Ratio =
ours images/s ÷ bare loop images/s (higher is better; target ≥ 0.95).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
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
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from dallecli.store.resolve import embedded_model_path

    with PARTI.open(encoding="utf-8") as handle:
        prompts = [row["Prompt"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    prompts = [p.replace("\n", " ") for p in prompts[: args.prompts]]
    work = Path(tempfile.mkdtemp(prefix="dalle-batch-bench-"))
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    model = str(embedded_model_path())
    print(f"Machine: {machine()}; {len(prompts)} PartiPrompts, embedded model, 12 steps, 64x64")
    print("| --batch-size | dalle batch images/s | bare loop images/s | ratio |\n|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ours, bare = [], []
        for repeat in range(args.repeats):  # A B A B
            out = work / f"out-{batch}-{repeat}"
            done = subprocess.run([sys.executable, "-m", "dallecli", "batch", str(prompt_file), "--out", str(out),
                                   "--batch-size", str(batch), "--seed", "0", "--json"],
                                  capture_output=True, text=True, check=True)
            ours.append(len(prompts) / json.loads(done.stdout)["seconds"])
            done = subprocess.run([sys.executable, "-c", BARE_LOOP, model, str(prompt_file), str(batch)],
                                  capture_output=True, text=True, check=True)
            bare.append(len(prompts) / json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
        a, b = sorted(ours)[len(ours) // 2], sorted(bare)[len(bare) // 2]
        print(f"| {batch} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
