"""What reranking costs: CLIP scoring per candidate against generating that candidate.

    python -m bench.scoring [--repeats 5] [--skip-turbo]

``--rerank K`` makes K candidates per image and scores each once against the prompt, so its cost is K x
(generation + scoring) per image kept. This prints, per candidate, the warm generation time (dallecli, and plain
diffusers on the same loaded pipeline as the baseline) and the scoring time of each scorer, on the embedded
model (64x64, 12 steps) and on the SD-Turbo architecture (random weights, 512x512, 1 step). Scorers: the
embedded ``shapes-clip`` and the architectures of ``openai/clip-vit-base-patch32`` and
``openai/clip-vit-large-patch14`` with random weights (the cost depends on the architecture, not the values).
Median of interleaved runs; the machine line names the CPU and its flags.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine

PROMPT = "a red circle on a blue background"
CANDIDATES = 4
# transformers' CLIPConfig defaults are ViT-B/32; ViT-L/14 as published (text 768 x 12, vision 1024 x 24 / 14)
CLIP_L14 = {"projection_dim": 768, "text_config": {"hidden_size": 768, "intermediate_size": 3072,
                                                   "num_attention_heads": 12},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                              "num_hidden_layers": 24, "patch_size": 14}}


def random_clip(folder: Path, config: dict, size: int) -> Path:
    """A random-weight CLIP folder (safetensors, a CLIP tokenizer from the embedded model, a processor at
    ``size`` pixels) with the given architecture."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from dallecli.store.resolve import embedded_model_path

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**config)).save_pretrained(folder, safe_serialization=True)
    tokenizer = CLIPTokenizer.from_pretrained(embedded_model_path() / "tokenizer", model_max_length=77)
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-turbo", action="store_true", help="only the embedded model")
    args = parser.parse_args(argv)

    import torch

    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest
    from dallecli.scoring.clip import ClipScorer

    work = Path(tempfile.mkdtemp(prefix="dalle-bench-scoring-"))
    scorers = {"shapes-clip (embedded)": ClipScorer.load(None, device="cpu"),
               "ViT-B/32 architecture": ClipScorer(random_clip(work / "b32", {}, 224), "b32", device="cpu"),
               "ViT-L/14 architecture": ClipScorer(random_clip(work / "l14", CLIP_L14, 224), "l14", device="cpu")}
    models = [("embedded model, 64x64, 12 steps", None, GenerationRequest("", steps=12, guidance_scale=4.0))]
    if not args.skip_turbo:
        from bench.models import sd_turbo

        models.append(("SD-Turbo architecture (random weights), 512x512, 1 step", str(sd_turbo()),
                       GenerationRequest("", steps=1, guidance_scale=0.0, width=512, height=512)))
    print(f"Machine: {machine()}; torch threads: {torch.get_num_threads()}")
    print(f"{CANDIDATES} candidates per pass; seconds per candidate, median of {args.repeats} (SD-Turbo: "
          f"{max(1, args.repeats // 5)}) warm runs\n")
    print("| model | generation: dallecli | generation: plain diffusers | scorer | scoring | scoring / generation |")
    print("|---|---|---|---|---|---|")
    for label, model, shared in models:
        repeats = args.repeats if model is None else max(1, args.repeats // 5)
        engine = Engine(model, device="cpu")
        pipe = engine.pipe
        items = [(PROMPT, seed) for seed in range(CANDIDATES)]
        images = [r.image for r in engine.generate_items(items, shared)]  # warm-up, and the images to score
        ours = median_seconds(lambda: engine.generate_items(items, shared), repeats) / CANDIDATES
        plain = median_seconds(lambda: pipe(
            [PROMPT] * CANDIDATES, num_inference_steps=shared.steps, guidance_scale=shared.guidance_scale,
            height=shared.height or 64, width=shared.width or 64,
            generator=[torch.Generator().manual_seed(s) for s in range(CANDIDATES)]), repeats) / CANDIDATES
        for name, scorer in scorers.items():
            scorer.score(images, [PROMPT] * CANDIDATES)  # load and warm
            cost = median_seconds(lambda: scorer.score(images, [PROMPT] * CANDIDATES), args.repeats) / CANDIDATES
            print(f"| {label} | {ours * 1000:.1f} ms | {plain * 1000:.1f} ms | {name} | {cost * 1000:.1f} ms "
                  f"| {cost / ours:.3f}x |")
        engine.unload()


if __name__ == "__main__":
    main()
