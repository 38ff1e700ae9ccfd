"""Generation options shared by ``dalle generate`` and ``dalle batch`` (one declaration, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.completion import (complete_device, complete_dtype, complete_format, complete_model,
                                     complete_progress, complete_scheduler)

Steps = Annotated[Optional[int], typer.Option(help="num_inference_steps (default: the model's).")]
Guidance = Annotated[Optional[float], typer.Option(help="Guidance scale; 0 turns classifier-free guidance off.")]
Width = Annotated[Optional[int], typer.Option(help="Width in pixels, a multiple of 8.")]
Height = Annotated[Optional[int], typer.Option(help="Height in pixels, a multiple of 8.")]
NegativePrompt = Annotated[Optional[str], typer.Option(help="What to steer away from (needs guidance > 1).")]
Model = Annotated[Optional[str], typer.Option(help="Registry alias, org/name repo id or local folder (default: embedded).", autocompletion=complete_model)]
Scheduler = Annotated[Optional[str], typer.Option(help="euler, euler-a, dpm++, dpm++-karras, ddim, ddpm, unipc, lcm, or a diffusers class name such as PNDMScheduler (default: the model's).", autocompletion=complete_scheduler)]
Revision = Annotated[Optional[str], typer.Option(help="Branch, tag or commit of a Hub model, as given to `dalle download --revision` (default: main).")]
CacheDir = Annotated[Optional[Path], typer.Option(help="HF cache folder, as given to `dalle download --cache-dir` (default: $HF_HUB_CACHE or $HF_HOME/hub).")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps.", autocompletion=complete_device)]
Dtype = Annotated[Optional[str], typer.Option(help="auto, float32, float16 or bfloat16.", autocompletion=complete_dtype)]
Backend = Annotated[Optional[str], typer.Option(help="What runs the UNet and VAE decoder: torch (default) or openvino (CPU, SD 1.x/2.x; `pip install 'dallecli[openvino]'`; converted once into dalle's cache).", show_default=False)]
Vae = Annotated[Optional[str], typer.Option(help="Decoder: full (the model's), tiny (fast previews; `dalle download taesd`), or a VAE alias/repo/folder.")]
ClipSkip = Annotated[Optional[int], typer.Option(help="CLIP layers to skip, AUTOMATIC1111 numbering: 1 = none, 2 = use the penultimate layer (SD 1.x/2.x, SDXL, SD 3).", show_default=False)]
LowMemory = Annotated[Optional[bool], typer.Option("--low-memory/--no-low-memory", help="VAE tiling for big images, CPU offload on CUDA, attention slicing on MPS (default: on when free memory is short).", show_default=False)]
Strength = Annotated[Optional[float], typer.Option(help="Denoising strength in (0, 1]: the share of the steps run on the noised init image (int(steps x strength) steps); low keeps the input, 1 redraws it.", show_default=False)]

# shared by generate, edit and variations
NumImages = Annotated[int, typer.Option("-n", "--num-images", help="Number of images.")]
Seed = Annotated[Optional[int], typer.Option(help="Seed of the first image; image i gets seed+i. Random if omitted or -1.")]
OutFolder = Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: ./dalle-out or $DALLE_OUTPUT_DIR).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass (default 1: any image reproducible alone, bit for bit); larger is faster, pixels may move by 1 level.")]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of paths.")]

# best-of-K reranking with a CLIP scorer, shared by generate and batch (and the scorer by `dalle score`)
Rerank = Annotated[Optional[int], typer.Option(help="Draw K candidates for each image (seeds S, S+1, ...) and keep the one the scorer rates best against the prompt (2-64).", show_default=False)]
KeepCandidates = Annotated[bool, typer.Option("--keep-candidates", help="With --rerank, also write the candidates that lost into a candidates/ subfolder.")]
Scorer = Annotated[Optional[str], typer.Option(help="CLIP scorer: shapes-clip (embedded, the default), a registry alias after `dalle download NAME` (clip-vit-base-patch32, clip-vit-large-patch14), an org/name repo or a folder.", show_default=False)]

# output format, shared by generate, edit, variations, batch and upscale
ImageFormat = Annotated[Optional[str], typer.Option("--format", help="Image file format: png, jpeg or webp (JPEG/WebP keep the parameters in EXIF and XMP; default png).", show_default=False, autocompletion=complete_format)]
Quality = Annotated[Optional[int], typer.Option(help="JPEG/WebP quality, 1-100 (default 90).", show_default=False)]

# shared by every command that shows progress (generate, edit, variations, batch, upscale, finetune)
Progress = Annotated[Optional[str], typer.Option("--progress", help="auto (a bar on a terminal, plain lines otherwise), bar, plain (log-friendly: a line per tenth of the job, no redraws) or none (default: $DALLE_PROGRESS or auto).", show_default=False, autocompletion=complete_progress)]
