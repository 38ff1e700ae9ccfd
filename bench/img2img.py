"""Image to image at strength 0.5 against text to image, on the embedded model, next to plain diffusers.

    python -m bench.img2img [--repeats 20]

Warm, in one process, median of interleaved runs (dalle txt2img, diffusers txt2img, dalle img2img, diffusers
img2img, repeated). img2img at strength 0.5 runs int(12 x 0.5) = 6 of the model's 12 steps plus one VAE
encode, so it should cost about half of text to image; the rows give the steps each arm ran (counted by its step
callback), its time, the ratio to the same task in plain diffusers (``StableDiffusionImg2ImgPipeline.from_pipe``
on the same loaded pipeline), and img2img / txt2img for both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine

PROMPT = "a red circle on a blue background"
STRENGTH = 0.5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    engine = Engine(None)
    pipe = engine.pipe
    init = Path(tempfile.mkdtemp(prefix="dalle-bench-")) / "init.png"
    next(engine.generate(GenerationRequest(PROMPT, seed=1))).image.save(init)
    from PIL import Image

    init_image = Image.open(init).convert("RGB")
    plain_img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe, vae=pipe.vae)  # same components, as dalle does
    plain_img2img.set_progress_bar_config(disable=True)
    steps: dict[str, int] = {}

    def counted(name):
        def callback(_pipe, step, _t, kwargs):
            steps[name] = step + 1
            return kwargs

        return callback

    def timed(name, run):
        def arm() -> float:
            started = time.perf_counter()
            run(name)
            return time.perf_counter() - started
        return arm

    arms = {
        "dalle txt2img": timed("dalle txt2img", lambda n: list(engine.generate(
            GenerationRequest(PROMPT, seed=1), on_step=lambda s, t: steps.__setitem__(n, s)))),
        "diffusers txt2img": timed("diffusers txt2img", lambda n: pipe(
            PROMPT, num_inference_steps=12, guidance_scale=4.0, height=64, width=64,
            generator=torch.Generator().manual_seed(1), callback_on_step_end=counted(n)).images[0]),
        "dalle img2img": timed("dalle img2img", lambda n: list(engine.generate(
            GenerationRequest(PROMPT, seed=1, image=str(init), strength=STRENGTH),
            on_step=lambda s, t: steps.__setitem__(n, s)))),
        "diffusers img2img": timed("diffusers img2img", lambda n: plain_img2img(
            PROMPT, image=init_image, strength=STRENGTH, num_inference_steps=12, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(1), callback_on_step_end=counted(n)).images[0]),
    }
    for arm in arms.values():  # warm-up
        arm()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, arm in arms.items():
            times[name].append(arm())
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"Machine: {machine()}; torch threads: {torch.get_num_threads()}")  # machine() names the CPU flags
    print(f"Embedded model, 64x64, 12 steps, guidance 4, strength {STRENGTH}; median of {args.repeats}, interleaved")
    print("| task | steps run | dallecli | plain diffusers | dallecli / diffusers |\n|---|---|---|---|---|")
    for task in ("txt2img", "img2img"):
        ours, theirs = median[f"dalle {task}"], median[f"diffusers {task}"]
        print(f"| {task} | {steps[f'dalle {task}']} (diffusers {steps[f'diffusers {task}']}) | {ours * 1000:.1f} ms "
              f"| {theirs * 1000:.1f} ms | {ours / theirs:.2f}x |")
    print(f"| img2img / txt2img | | {median['dalle img2img'] / median['dalle txt2img']:.2f}x "
          f"| {median['diffusers img2img'] / median['diffusers txt2img']:.2f}x | |")


if __name__ == "__main__":
    main()
