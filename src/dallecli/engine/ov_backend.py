"""``--backend openvino``: a Stable Diffusion pipeline's UNet and VAE decoder run by OpenVINO on the CPU.

Why: on this project's CPUs OpenVINO runs the SD-Turbo-architecture image (512², 1 step) in about half the time
of PyTorch in float32 and a quarter of it in bfloat16 on CPUs with bfloat16 instructions (BENCHMARKS.md,
"OpenVINO"): its CPU plugin fuses the convolutions and their activations into blocked-layout kernels.

How: the pipeline loads as always (safetensors only, diffusers). The UNet and the VAE's ``decode`` are converted
once with OpenVINO's PyTorch frontend (``openvino.convert_model``, which traces them) and saved as OpenVINO IR
(``.xml`` graph + ``.bin`` constants) into dalle's cache, under a key made from the content digests of the weight
files they were loaded from, the dtype and the OpenVINO version; later runs compile that IR directly. The
pipeline object keeps its scheduler, tokenizer, text encoder, VAE encoder and every diffusers step; only
``unet.forward`` and ``vae.decode`` call the compiled models, so schedulers, prompt weighting, clip skip, image to
image and inpainting work as on the PyTorch path. The PyTorch weights of the converted parts are released.

Not through optimum-intel: its 2.2 release pins transformers < 5.6 and huggingface-hub < 1.22 (below this
project's), and requires torchvision, whose PyPI wheels pull a CUDA build of torch onto CPU machines.

Security: an IR ``.bin`` has no header; it is accepted only when its ``.xml`` twin parses with root ``<net>`` and
the constants it addresses end exactly at the ``.bin``'s size (:func:`check_ir_pair`), and it is only ever read by
``openvino.Core.read_model``, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dallecli.errors import CorruptWeightsError, UnsafeWeightsError, UsageError

BACKENDS = ("torch", "openvino")
EXPORT_FORMAT = 1  # bump when what is exported (inputs, wrappers) changes: old exports are then not reused
INSTALL_HINT = "pip install 'dallecli[openvino]'"
# the pipelines whose UNet takes (sample, timestep, encoder_hidden_states) and nothing else
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
PARTS = ("unet", "vae_decoder")
PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}  # dtype name -> the CPU plugin's inference precision


@dataclass(frozen=True)
class OpenVinoInfo:
    """What :func:`accelerate` did: the inference ``precision`` ("f32" or "bf16"), the export ``folder``, whether
    it was ``exported`` now (False: reused from the cache) and the seconds spent exporting and compiling."""

    precision: str
    folder: Path
    exported: bool
    export_s: float
    compile_s: float


def installed() -> bool:
    """Whether the ``openvino`` package can be imported (the ``dallecli[openvino]`` extra); imports nothing."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def normalize_backend(requested: str | None, source: str = "--backend") -> str:
    """A backend name from a flag, ``DALLE_BACKEND`` or the config file: one of :data:`BACKENDS` (None: "torch").

    Raises:
        UsageError: any other name, naming ``source``.
    """
    name = (requested or "torch").strip().lower()
    if name not in BACKENDS:
        raise UsageError(f"{source} {requested!r}: choose one of {', '.join(BACKENDS)}")
    return name


def check_backend(backend: str, device: str, pipeline_class: str | None) -> None:
    """Refuse a backend that cannot run here, before anything loads.

    Args:
        backend: one of :data:`BACKENDS`, as :func:`normalize_backend` returns it.
        device: the resolved torch device ("cpu", "cuda:0", ...).
        pipeline_class: the model's diffusers pipeline class name (None when unknown).

    Raises:
        UsageError: openvino on a device other than the CPU, for a pipeline other than
            :data:`SUPPORTED_PIPELINES`, or without the extra installed.
    """
    if backend != "openvino":
        return
    if device != "cpu":
        raise UsageError(f"--backend openvino runs on the CPU; leave out --device {device} or use --backend torch")
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise UsageError(f"--backend openvino runs Stable Diffusion 1.x/2.x pipelines; this model is "
                         f"{pipeline_class or 'of an unknown kind'}: use --backend torch")
    if not installed():
        raise UsageError(f"--backend openvino needs OpenVINO: {INSTALL_HINT}")


def choose_precision(dtype_requested: str | None, cpu_bf16: str | None) -> str:
    """OpenVINO's inference precision for a ``--dtype`` request: "bf16" for bfloat16, "f32" for float32, and for
    auto (None) "bf16" on CPUs with bfloat16 instructions (AVX-512-BF16 or AMX, ``cpu_bf16`` "native" or "amx":
    the CPU plugin's own default there, measured 2× faster than its f32 at 50 dB PSNR), else "f32".

    Raises:
        UsageError: float16 (the CPU plugin does not run it).
    """
    if dtype_requested in (None, "auto"):
        return "bf16" if cpu_bf16 in ("amx", "native") else "f32"
    if dtype_requested in PRECISIONS:
        return PRECISIONS[dtype_requested]
    raise UsageError(f"--backend openvino runs float32 or bfloat16, not {dtype_requested}; use --dtype auto")


def ir_constants(root) -> Iterator[tuple[int, int, str]]:
    """``(offset, size, element_type)`` of each ``Const`` layer of a parsed IR ``.xml`` (``root``, the ``<net>``
    element): where in the ``.bin`` its data lies, in bytes. An IR ``.bin`` has no header or magic number; it is
    these constants' raw data, concatenated."""
    for layer in root.iter("layer"):
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None and data.get("offset") is not None:
            yield int(data.get("offset")), int(data.get("size")), data.get("element_type")


def check_ir_pair(xml_path: Path) -> Path:
    """Check that ``xml_path`` and the ``.bin`` beside it are an OpenVINO IR pair, from their bytes alone.

    Returns:
        The ``.bin`` path.

    Raises:
        UnsafeWeightsError: the ``.bin`` is a zip or pickle (torch's formats), or not the constants of the ``.xml``.
        CorruptWeightsError: a file is missing or unreadable, or the ``.bin`` is shorter or longer than the
            constants the ``.xml`` addresses.
    """
    import xml.etree.ElementTree as ET

    bin_path = xml_path.with_suffix(".bin")
    try:
        size = bin_path.stat().st_size
        with bin_path.open("rb") as handle:
            head = handle.read(2)
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise CorruptWeightsError(f"{xml_path.parent}: unreadable OpenVINO export ({exc})") from exc
    if root.tag != "net":
        raise UnsafeWeightsError(f"{xml_path}: not an OpenVINO IR graph (root <{root.tag}>)")
    end = max((offset + length for offset, length, _ in ir_constants(root)), default=0)
    if end != size:
        if head == b"PK" or (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5):
            raise UnsafeWeightsError(f"{bin_path}: a zip or pickle, not OpenVINO constants; refusing to read it")
        raise CorruptWeightsError(f"{bin_path}: {size} bytes where its graph addresses {end}; delete "
                                  f"{xml_path.parent} to export again")
    return bin_path


def export_key(weight_digests: list[str], dtype: str) -> str:
    """The cache key of an export: the weights' content digests (``sha256:...``), the dtype they were loaded in,
    OpenVINO's version and :data:`EXPORT_FORMAT`."""
    import openvino

    text = json.dumps({"weights": sorted(weight_digests), "dtype": dtype, "openvino": openvino.__version__,
                       "format": EXPORT_FORMAT})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def export_folder(cache_root: Path, key: str) -> Path:
    """Where the export with ``key`` lives: ``<dalle cache>/openvino/<key>``."""
    return cache_root / "openvino" / key


def _wrappers(pipe):
    """The two modules to trace: UNet (sample, timestep (B,) float32, encoder_hidden_states) -> noise, and
    latents -> image (the VAE's ``decode``, post-quant convolution included)."""
    import torch

    class UNetPart(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    class DecoderPart(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents, return_dict=False)[0]

    return UNetPart(pipe.unet), DecoderPart(pipe.vae)


def _example_inputs(pipe) -> dict:
    """Small inputs of the right ranks and dtypes for tracing; the exported inputs keep every dimension dynamic.

    The latents are 9×9, odd on purpose: tracing turns the UNet's Python branches on shapes into constants, and
    with a size its down-sampling does not divide, the up-sampling blocks take their output sizes from the skip
    connections' shapes (which stay symbolic) instead of doubling, so that every image size runs right."""
    import torch

    dtype = pipe.unet.dtype
    channels, latent = pipe.unet.config.in_channels, 9
    width = pipe.unet.config.cross_attention_dim
    return {"unet": (torch.randn(1, channels, latent, latent, dtype=dtype), torch.tensor([999.0]),
                     torch.randn(1, 77, width, dtype=dtype)),
            "vae_decoder": (torch.randn(1, pipe.vae.config.latent_channels, latent, latent, dtype=pipe.vae.dtype),)}


def export(pipe, folder: Path) -> float:
    """Convert the UNet and VAE decoder of ``pipe`` to OpenVINO IR in ``folder``, written whole or not at all
    (:func:`dallecli.atomic.staged_folder`). Returns the seconds it took.

    Raises:
        DiskFullError: the disk filled up; nothing is left behind.
        OSError: the cache folder cannot be written.
    """
    import time
    import warnings

    import openvino as ov
    import torch

    from dallecli.atomic import staged_folder

    started = time.perf_counter()
    try:
        with staged_folder(folder, overwrite=False, what=f"the OpenVINO export in {folder}") as work:
            examples = _example_inputs(pipe)
            with torch.no_grad(), warnings.catch_warnings():
                # the tracer's notes on shape branches (see _example_inputs) and diffusers' deprecations
                warnings.simplefilter("ignore")
                for name, module in zip(PARTS, _wrappers(pipe)):
                    model = ov.convert_model(module, example_input=examples[name])
                    ov.save_model(model, work / f"{name}.xml", compress_to_fp16=False)  # exact: no weight rounding
                    del model
            (work / "export.json").write_text(json.dumps({"format": EXPORT_FORMAT, "openvino": ov.__version__}))
    except FileExistsError:  # another process finished the same export first: keep theirs
        pass
    return time.perf_counter() - started


class _Compiled:
    """A compiled OpenVINO model called with torch tensors; one call at a time (one infer request)."""

    def __init__(self, core, xml_path: Path, precision: str, threads: int):
        check_ir_pair(xml_path)
        model = core.read_model(str(xml_path))
        # The runtime cache (kernels per input shape) is off: after one pass at 16x16 it served wrong kernels to
        # every later size, flat images up to 216 levels off (openvino 2026.4). Off, SD-Turbo's 512x512 image took
        # 3.25 s against 2.83 s on an AMX Xeon (BENCHMARKS.md).
        self.model = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                       "INFERENCE_NUM_THREADS": threads,
                                                       "CPU_RUNTIME_CACHE_CAPACITY": 0})
        self.request = self.model.create_infer_request()
        self.lock = threading.Lock()

    def __call__(self, *tensors):
        import torch

        with self.lock:
            outputs = self.request.infer([t.detach().float().contiguous().numpy() for t in tensors])
            return torch.from_numpy(outputs[self.model.output(0)].copy())


def _release(module) -> None:
    """Give back the memory of ``module``'s weights (OpenVINO holds its own copy): each becomes an empty tensor of
    the same dtype, so that ``module.dtype`` and ``module.device`` still answer."""
    import torch

    for parameter in module.parameters():
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)


def accelerate(pipe, weight_digests: list[str], cache_root: Path, *, dtype: str, precision: str,
               threads: int) -> OpenVinoInfo:
    """Run ``pipe``'s UNet and VAE decode with OpenVINO from now on (exporting them into the cache first when no
    export with the same key exists).

    Args:
        pipe: a loaded pipeline of :data:`SUPPORTED_PIPELINES`, on the CPU.
        weight_digests: content digests of the weight files the UNet and VAE were loaded from (:func:`export_key`).
        cache_root: dalle's cache folder (:func:`dallecli.config.cache_dir`).
        dtype: the dtype the PyTorch weights were loaded in (part of the key).
        precision: "f32" or "bf16" (:func:`choose_precision`).
        threads: OpenVINO's inference threads (the engine's thread policy).

    Raises:
        UnsafeWeightsError, CorruptWeightsError: a cached export that is not an IR pair (:func:`check_ir_pair`).
        DiskFullError: the export did not fit on the disk.
        OSError: the cache cannot be written.
    """
    import time

    import openvino as ov
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    folder = export_folder(cache_root, export_key(weight_digests, dtype))
    exported, export_s = False, 0.0
    if not (folder / "export.json").exists():
        export_s, exported = export(pipe, folder), True
    started = time.perf_counter()
    core = ov.Core()
    unet_model = _Compiled(core, folder / "unet.xml", precision, threads)
    decoder_model = _Compiled(core, folder / "vae_decoder.xml", precision, threads)
    compile_s = time.perf_counter() - started
    unet, vae = pipe.unet, pipe.vae

    def unet_forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **extra):
        unused = [k for k, v in extra.items() if v is not None and k not in ("cross_attention_kwargs",)]
        if args or unused or (extra.get("cross_attention_kwargs") or {}).get("scale", 1.0) != 1.0:
            raise UsageError("--backend openvino runs the UNet without extra conditioning or LoRA scales")
        import torch

        steps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        noise = unet_model(sample, steps, encoder_hidden_states).to(sample.dtype)
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)

    def vae_decode(latents, return_dict=True, generator=None):
        image = decoder_model(latents).to(latents.dtype)
        return DecoderOutput(sample=image) if return_dict else (image,)

    _release(unet)
    for part in ("decoder", "post_quant_conv"):
        if getattr(vae, part, None) is not None:
            _release(getattr(vae, part))
    unet.forward = unet_forward
    vae.decode = vae_decode
    return OpenVinoInfo(precision, folder, exported, export_s, compile_s)
