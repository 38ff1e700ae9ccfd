"""OpenVINO through optimum-intel against dallecli's PyTorch path and plain diffusers (issue #17).

    python -m bench.openvino                           # SD-Turbo architecture, 512², 1 step, 3 repeats
    python -m bench.openvino --size 256 --repeats 2    # a quick check that every arm runs

OpenVINO runs in its own environment (optimum-intel 2.2 pins transformers < 5.6 and huggingface-hub < 1.22,
below what dallecli uses), given by ``--ov-python`` (default /work/ovenv/bin/python). Made once with:

    python3 -m venv /work/ovenv
    /work/ovenv/bin/pip install torch==2.13.0                  # the local CPU wheel, never a plain `torch`
    printf 'torch==2.13.0\\ntorchvision==0.28.0\\n' > /work/ovenv/constraints.txt  # else torchvision pulls CUDA torch 2.14
    /work/ovenv/bin/pip install -c /work/ovenv/constraints.txt optimum-intel openvino diffusers transformers
    /work/ovenv/bin/pip uninstall -y torchvision               # PyPI's build is linked to CUDA torch and cannot load

Arms, each in its own child process, alternating (A B C D A B C D ...), median of ``--repeats``:
- ``diffusers fp32``: ``DiffusionPipeline`` in float32, this environment: the quality reference;
- ``dalle auto``: ``Engine(folder)`` as ``dalle generate`` runs it (dtype auto, dallecli's thread policy);
- ``dalle openvino`` and ``dalle openvino fp32``: ``Engine(folder, backend="openvino")`` as ``dalle generate
  --backend openvino`` runs it (this environment, the ``openvino`` package alone; precision auto, or float32),
  its export kept in build/bench/dalle-cache;
- ``openvino fp32``: ``OVDiffusionPipeline`` from the exported IR, ``INFERENCE_PRECISION_HINT`` f32;
- ``openvino int8w``: the same IR with its weights compressed to int8 by NNCF (data-free), activations f32;
- ``openvino default``: the fp32 IR at the CPU plugin's default precision, only where that is not f32
  (bf16 on CPUs with AVX-512-BF16 or AMX).

Every arm starts from the same initial latents (seed 1, passed as ``latents=``; dalle's seeded noise is checked
to be equal to them). Per image = one pipeline call after a warm-up call of the same shapes; load, compile and
export are not included. PSNR is against the ``diffusers fp32`` image. The export (local folder -> IR) runs once
into build/bench-models/sd-turbo-random-openvino-{fp32,int8w}/ and is reused; its wall time is kept there in
export.json (``--fresh-export`` redoes it). It reads a copy of the folder whose text encoder has the
``text_model.`` key prefix (:func:`export_source`): without it optimum-intel's transformers exports a randomly
initialised text encoder. Each IR ``.bin`` is then checked by content (:func:`inspect_ir_bin`).

Decision rule of #17: adopt OpenVINO if an OpenVINO arm with PSNR >= 30 dB takes <= 1/1.5 of the time of the
fastest PyTorch arm (``diffusers fp32`` or ``dalle auto``) with PSNR >= 30 dB, on an idle CPU.
Raw results: build/bench/openvino.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.common import run_json_child
from bench.suite import PROMPT, _current_rss_mb, _instrument, _rss_mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "build" / "bench" / "openvino.json"
OV_PYTHON = "/work/ovenv/bin/python"
SEED, STEPS, GUIDANCE = 1, 1, 0.0
QUALITY_DB, SPEEDUP = 30.0, 1.5
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6: a zip archive holding data.pkl


# -- children -------------------------------------------------------------------------------------------------
def _timed_calls(pipe, one, warmup_steps: int, steps: int) -> dict:
    """Warm-up call, then one timed call with per-component timers; the image as uint8 (H, W, 3)."""
    timings = _instrument(pipe)
    one(warmup_steps)  # same shapes: oneDNN primitives / OpenVINO infer requests are created here
    for values in timings.values():
        values.clear()
    started = time.perf_counter()
    image = one(steps)
    seconds = time.perf_counter() - started
    unet = timings["unet"]
    return {"image": image, "image_s": seconds, "text_encoder_s": sum(timings["text_encoder"]),
            "unet_step_s": statistics.median(unet) if unet else None, "unet_calls": len(unet),
            "vae_decode_s": sum(timings["vae_decode"])}


def child_torch(spec: dict) -> dict:
    """``diffusers fp32`` or ``dalle auto`` (this environment): load, warm up, time one image."""
    import numpy as np
    import torch

    from dallecli.engine.loading import quiet_libraries

    quiet_libraries()
    latents = torch.from_numpy(np.load(spec["latents"]))  # (1, 4, size/8, size/8) float32
    size, extra = spec["size"], {}
    started = time.perf_counter()
    if spec["arm"].startswith("dalle"):
        from dataclasses import replace

        from dallecli.engine.generate import Engine
        from dallecli.engine.request import GenerationRequest

        if spec.get("dalle_cache"):  # dalle's own export (``--backend openvino``) is kept between runs here
            os.environ["DALLE_CACHE"] = spec["dalle_cache"]
        engine = Engine(spec["model"], "cpu", spec.get("dtype"), backend=spec.get("backend"))
        pipe = engine.pipe
        if engine.openvino is not None:
            extra.update(precision=engine.openvino.precision, exported_now=engine.openvino.exported,
                         export_s=engine.openvino.export_s, compile_s=engine.openvino.compile_s)
        request = GenerationRequest(PROMPT, seed=SEED, steps=STEPS, guidance_scale=GUIDANCE, width=size, height=size)
        # dalle draws its noise from a CPU generator seeded with the request's seed: the same tensor as latents=
        extra["latents_match"] = bool(torch.equal(
            torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(SEED)), latents))

        def one(steps):
            return np.asarray(next(engine.generate(replace(request, steps=steps))).image)
        dtype = engine.openvino.precision if engine.openvino is not None else engine.dtype
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(spec["model"], use_safetensors=True, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def one(steps):
            return np.asarray(pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size,
                                   width=size, latents=latents.clone()).images[0])
        dtype = "float32"
    load_s = time.perf_counter() - started
    rss_after_load = _current_rss_mb()
    result = _timed_calls(pipe, one, 1, STEPS)
    np.save(spec["save"], result.pop("image"))
    return {**result, **extra, "arm": spec["arm"], "dtype": dtype, "load_s": load_s, "rss_after_load_mb": rss_after_load,
            "peak_rss_mb": _rss_mb(), "threads": torch.get_num_threads()}


def child_openvino(spec: dict) -> dict:
    """An OpenVINO arm (the OpenVINO environment): load and compile the IR, warm up, time one image."""
    import numpy as np
    import torch
    from optimum.intel import OVDiffusionPipeline

    latents = torch.from_numpy(np.load(spec["latents"]))
    size = spec["size"]
    ov_config = {"INFERENCE_PRECISION_HINT": spec["precision"]} if spec.get("precision") else {}
    started = time.perf_counter()
    pipe = OVDiffusionPipeline.from_pretrained(spec["ir"], compile=False, ov_config=ov_config, local_files_only=True)
    pipe.compile()  # dynamic shapes: optimum's static reshape() assumes guidance (UNet batch 2)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    rss_after_load = _current_rss_mb()

    def one(steps):
        return np.asarray(pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                               latents=latents.clone()).images[0])
    result = _timed_calls(pipe, one, 1, STEPS)
    np.save(spec["save"], result.pop("image"))
    request = pipe.unet.request
    return {**result, "arm": spec["arm"], "dtype": _type_name(request.get_property("INFERENCE_PRECISION_HINT")),
            "weights": spec["weights"], "load_s": load_s, "rss_after_load_mb": rss_after_load, "peak_rss_mb": _rss_mb(),
            "threads": int(request.get_property("INFERENCE_NUM_THREADS"))}


def _type_name(element_type) -> str:
    """An OpenVINO element type by its short name: f32, bf16, f16."""
    return element_type.get_type_name() if hasattr(element_type, "get_type_name") else str(element_type)


def child_export(spec: dict) -> dict:
    """Export the local diffusers folder to OpenVINO IR (float32 weights), then compress a copy to int8 weights.
    Each folder is written under a temporary name and renamed into place.

    Raises:
        RuntimeError: this environment's transformers would leave text-encoder weights of the folder unloaded
            (newly initialised at random): the export would not be the model.
    """
    import torch
    from optimum.intel import OVDiffusionPipeline, OVWeightQuantizationConfig
    from transformers import CLIPTextModel

    fp32, int8 = Path(spec["fp32"]), Path(spec["int8"])
    _, info = CLIPTextModel.from_pretrained(Path(spec["model"]) / "text_encoder", output_loading_info=True)
    if info["missing_keys"]:
        raise RuntimeError(f"text_encoder: {len(info['missing_keys'])} weights missing for this transformers, "
                           f"e.g. {sorted(info['missing_keys'])[:2]}")
    result = {}
    started = time.perf_counter()
    # load_in_8bit=False: optimum otherwise compresses any part over 1 B parameters to int8 on its own
    pipe = OVDiffusionPipeline.from_pretrained(spec["model"], export=True, load_in_8bit=False, compile=False,
                                               torch_dtype=torch.float32, local_files_only=True)
    result["export_s"] = time.perf_counter() - started
    started = time.perf_counter()
    _save(pipe, fp32)
    result["save_s"] = time.perf_counter() - started
    result["class"] = type(pipe).__name__
    del pipe
    started = time.perf_counter()
    quantized = OVDiffusionPipeline.from_pretrained(fp32, compile=False, local_files_only=True,
                                                    quantization_config=OVWeightQuantizationConfig(bits=8))
    _save(quantized, int8)
    result["int8_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = _rss_mb()
    return result


def export_source(model: Path) -> Path:
    """``model``, or a copy whose text encoder has transformers' canonical key names, when it lacks them.

    transformers 5.24 (dallecli's) saves ``CLIPTextModel`` without the ``text_model.`` prefix; transformers 5.5
    (the newest optimum-intel 2.2 allows) then loads none of those weights and initialises the whole text encoder
    at random, with only a warning, and the export is another model. Hub checkpoints carry the prefix. The copy
    links every other part to ``model``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = model / "text_encoder" / "model.safetensors"
    with safe_open(weights, "pt") as handle:
        keys = list(handle.keys())
        if all(key.startswith("text_model.") for key in keys):
            return model
        tensors = {(key if key.startswith("text_model.") else "text_model." + key): handle.get_tensor(key)
                   for key in keys}
        metadata = handle.metadata()
    source = model.with_name(model.name + "-export-source")
    partial = source.with_name(source.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "text_encoder").mkdir(parents=True)
    for part in model.iterdir():
        if part.name != "text_encoder":
            (partial / part.name).symlink_to(part.resolve())
    shutil.copy(model / "text_encoder" / "config.json", partial / "text_encoder" / "config.json")
    save_file(tensors, partial / "text_encoder" / "model.safetensors", metadata=metadata)
    shutil.rmtree(source, ignore_errors=True)
    partial.rename(source)
    return source


def _save(pipe, folder: Path) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def child_versions(spec: dict) -> dict:
    """Package versions of the OpenVINO environment and what its CPU plugin would pick by itself."""
    from importlib.metadata import version

    import openvino as ov

    core = ov.Core()
    names = ("torch", "openvino", "openvino-tokenizers", "optimum-intel", "optimum", "nncf", "diffusers",
             "transformers", "huggingface-hub", "numpy")
    return {"versions": {n: version(n) for n in names},
            "cpu_default_precision": _type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "cpu_name": core.get_property("CPU", "FULL_DEVICE_NAME")}


# -- OpenVINO IR weight files: identified by content ----------------------------------------------------------
def inspect_ir_bin(bin_path: Path) -> dict:
    """What ``bin_path`` is, decided from the bytes of it and of its ``.xml`` twin; nothing is unpickled.

    An OpenVINO IR ``.bin`` has no header or magic number: it is the raw little-endian data of the model's
    constants, concatenated, which the ``.xml`` (root element ``<net>``) addresses as ``<data offset= size=>``
    of its ``Const`` layers. So it is IR weights when the ``.xml`` beside it parses as ``<net>`` and its
    constants end exactly at the ``.bin``'s size. A PyTorch ``.bin`` (``pytorch_model.bin``) starts with a zip
    header (``torch.save`` since 1.6) or a pickle ``PROTO`` opcode (0x80 then 2-5, older files); those bytes
    can begin raw float data too, so their absence alone proves nothing.
    """
    import xml.etree.ElementTree as ET

    from dallecli.engine.ov_backend import ir_constants

    with open(bin_path, "rb") as handle:
        head = handle.read(16)
    info = {"file": str(bin_path.relative_to(bin_path.parents[1])), "bytes": bin_path.stat().st_size,
            "first_bytes": head.hex(" "), "zip_header": head.startswith(ZIP_MAGIC),
            "pickle_proto_opcode": len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5}
    xml_path = bin_path.with_suffix(".xml")
    end, types = 0, {}
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return {**info, "openvino_ir": False}
    for offset, size, element_type in ir_constants(root):
        end = max(end, offset + size)
        types[element_type] = types.get(element_type, 0) + size
    info.update(openvino_ir=root.tag == "net" and end == info["bytes"], xml_root=root.tag,
                ir_version=root.get("version"), consts_end=end, const_bytes_by_type=types)
    return info


# -- the parent -----------------------------------------------------------------------------------------------
def run_child(python: str, kind: str, spec: dict) -> dict:
    return run_json_child("bench.openvino", kind, json.dumps(spec), python=python, env=dict(os.environ, **OFFLINE))


def export(args, model: Path) -> dict:
    """The IR folders, exported now if absent (or ``--fresh-export``); the export's record either way."""
    fp32 = model.with_name(model.name + "-openvino-fp32")
    int8 = model.with_name(model.name + "-openvino-int8w")
    record = fp32 / "export.json"
    made = json.loads(record.read_text()) if record.exists() else {}
    if args.fresh_export or "source" not in made or not (int8 / "model_index.json").exists():
        print(f"[{time.strftime('%H:%M:%S')}] exporting {model.name} to OpenVINO IR", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]
        source = export_source(model)
        data = run_child(args.ov_python, "export", {"model": str(source), "fp32": str(fp32), "int8": str(int8)})
        data.update(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average=load, source=str(source))
        record.write_text(json.dumps(data, indent=1))
        data["reused"] = False
    else:
        data = {**made, "reused": True}
    data["fp32"], data["int8"] = str(fp32), str(int8)
    data["ir_bytes"] = {name: sum(p.stat().st_size for p in Path(folder).rglob("*.bin"))
                        for name, folder in (("fp32", fp32), ("int8w", int8))}
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ov-python", default=OV_PYTHON, help="the OpenVINO environment's python")
    parser.add_argument("--fresh-export", action="store_true", help="export again even if the IR folders exist")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        child = {"torch": child_torch, "openvino": child_openvino, "export": child_export,
                 "versions": child_versions}[kind]
        print(json.dumps(child(spec)))
        return 0
    if args.size % 8:
        parser.error(f"--size {args.size}: must be a multiple of 8")
    if not Path(args.ov_python).exists():
        parser.error(f"--ov-python {args.ov_python}: not found; make the OpenVINO environment as this module's "
                     "docstring shows (python -m pydoc bench.openvino)")

    import numpy as np
    import torch

    from bench import models
    from bench.common import machine
    from dallecli.engine.device import psnr_db

    began, load_before = time.perf_counter(), os.getloadavg()
    model = models.sd_turbo()
    work = ROOT / "build" / "bench" / "openvino"
    work.mkdir(parents=True, exist_ok=True)
    latents = torch.randn((1, 4, args.size // 8, args.size // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    np.save(work / "latents.npy", latents.numpy())  # (1, 4, size/8, size/8) float32: every arm's initial noise
    ov_env = run_child(args.ov_python, "versions", {})
    exported = export(args, model)

    common = {"model": str(model), "size": args.size, "latents": str(work / "latents.npy")}
    dalle_cache = str(ROOT / "build" / "bench" / "dalle-cache")
    arms = [("torch", {"arm": "diffusers fp32"}), ("torch", {"arm": "dalle auto"}),
            ("torch", {"arm": "dalle openvino", "backend": "openvino", "dalle_cache": dalle_cache}),
            ("torch", {"arm": "dalle openvino fp32", "backend": "openvino", "dtype": "float32",
                       "dalle_cache": dalle_cache}),
            ("openvino", {"arm": "openvino fp32", "ir": exported["fp32"], "precision": "f32", "weights": "float32"}),
            ("openvino", {"arm": "openvino int8w", "ir": exported["int8"], "precision": "f32", "weights": "int8"})]
    if ov_env["cpu_default_precision"] != "f32":
        arms.append(("openvino", {"arm": "openvino default", "ir": exported["fp32"], "weights": "float32"}))
    runs: dict[str, list[dict]] = {spec["arm"]: [] for _, spec in arms}
    errors: dict[str, str] = {}
    for repeat in range(args.repeats):
        for kind, spec in arms:
            if spec["arm"] in errors:
                continue
            python = sys.executable if kind == "torch" else args.ov_python
            save = work / f"{spec['arm'].replace(' ', '_')}.npy"
            try:
                result = run_child(python, kind, {**common, **spec, "save": str(save), "repeat": repeat})
            except RuntimeError as exc:  # reported; the other arms go on
                errors[spec["arm"]] = str(exc).strip().splitlines()[-1]
                print(f"  {spec['arm']} #{repeat} FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            runs[spec["arm"]].append(result)
            print(f"  {spec['arm']} #{repeat}: {json.dumps(result)}", file=sys.stderr, flush=True)

    reference = np.load(work / "diffusers_fp32.npy").astype(np.float64) / 255
    summary = {}
    for arm, results in runs.items():
        if not results:
            continue
        image = np.load(work / f"{arm.replace(' ', '_')}.npy").astype(np.float64) / 255
        row = {key: statistics.median(r[key] for r in results) if all(r.get(key) is not None for r in results) else None
               for key in ("image_s", "load_s", "text_encoder_s", "unet_step_s", "vae_decode_s", "rss_after_load_mb")}
        row.update(peak_rss_mb=max(r["peak_rss_mb"] for r in results), dtype=results[0]["dtype"],
                   threads=results[0]["threads"], runs=[round(r["image_s"], 3) for r in results],
                   psnr_db=psnr_db(reference, image), latents_match=results[0].get("latents_match"))
        summary[arm] = row
    base = summary["diffusers fp32"]["image_s"]
    good = {arm: r for arm, r in summary.items() if r["psnr_db"] >= QUALITY_DB}
    pytorch_arms = ("diffusers fp32", "dalle auto")
    best_torch = min((a for a in good if a in pytorch_arms), key=lambda a: good[a]["image_s"])
    best_ov = min((a for a in good if a not in pytorch_arms), key=lambda a: good[a]["image_s"], default=None)
    speedup = good[best_torch]["image_s"] / good[best_ov]["image_s"] if best_ov else None
    load_after = os.getloadavg()
    results_json = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                    "command": "python -m bench.openvino " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "size": args.size, "repeats": args.repeats, "load_average_before": load_before,
                    "load_average_after": load_after, "openvino_env": ov_env, "export": exported, "arms": summary,
                    "errors": errors, "best_torch": best_torch, "best_openvino": best_ov, "speedup": speedup,
                    "ir_bin_files": [inspect_ir_bin(p) for p in sorted(Path(exported["fp32"]).glob("*/*.bin"))
                                     + sorted(Path(exported["int8"]).glob("*/*.bin"))],
                    "seconds": round(time.perf_counter() - began, 1)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results_json, indent=1))

    versions = ", ".join(f"{k} {v}" for k, v in ov_env["versions"].items())
    print(f"Machine: {machine()}")
    print(f"OpenVINO environment: {versions}; CPU plugin: {ov_env['cpu_name']}, default precision "
          f"{ov_env['cpu_default_precision']}")
    print(f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
          f"{', '.join(f'{x:.2f}' for x in load_after)}")
    print(f"Export ({'reused, measured ' + exported.get('when', '?') if exported['reused'] else 'this run'}): "
          f"{exported['export_s']:.1f} s to IR + {exported['save_s']:.1f} s to save; int8 weight compression "
          f"{exported['int8_s']:.1f} s; IR weights fp32 {exported['ir_bytes']['fp32'] / 1e9:.2f} GB, "
          f"int8w {exported['ir_bytes']['int8w'] / 1e9:.2f} GB; peak RSS {exported['peak_rss_mb'] / 1024:.2f} GiB")
    print(f"\nSD-Turbo architecture (random weights), {args.size}×{args.size}, {STEPS} step, guidance {GUIDANCE:g}, "
          f"seed {SEED} as explicit latents, median of {args.repeats} (alternating, one process per run)\n")
    print("| arm | precision | per image | vs diffusers fp32 | vs best PyTorch | text encoder | UNet step | "
          "VAE decode | load+compile | peak RSS | threads | PSNR vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    best_s = good[best_torch]["image_s"]

    def fmt(value, unit=" s", digits=2):
        return "–" if value is None else f"{value:.{digits}f}{unit}"
    for arm, r in summary.items():
        psnr = ("(reference)" if arm == "diffusers fp32" else "∞" if r["psnr_db"] == float("inf")
                else f"{r['psnr_db']:.1f} dB")
        print(f"| {arm} | {r['dtype']} | {r['image_s']:.2f} s | {r['image_s'] / base:.2f}× | {r['image_s'] / best_s:.2f}× | "
              f"{fmt(r['text_encoder_s'])} | {fmt(r['unet_step_s'])} | {fmt(r['vae_decode_s'])} | "
              f"{fmt(r['load_s'], ' s', 1)} | {r['peak_rss_mb'] / 1024:.2f} GiB | {r['threads']} | {psnr} |")
    for arm, error in errors.items():
        print(f"| {arm} | failed: {error} |")
    match = summary.get("dalle auto", {}).get("latents_match")
    print(f"\ndalle's seeded noise equals the latents given to the other arms: {match}")
    if best_ov:
        verdict = "adopt" if speedup >= SPEEDUP else "do not ship"
        print(f"Decision rule (#17): fastest OpenVINO arm with PSNR ≥ {QUALITY_DB:g} dB ({best_ov}) is "
              f"{speedup:.2f}× as fast as the fastest PyTorch arm ({best_torch}); needs ≥ {SPEEDUP}× → **{verdict}** "
              "(valid only on an idle CPU)")
    else:
        print(f"Decision rule (#17): no OpenVINO arm reached PSNR ≥ {QUALITY_DB:g} dB → **do not ship**")
    print(f"Raw results: {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
