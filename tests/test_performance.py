"""Speed policies (issue #7): CPU bfloat16, its quality rule, --vae tiny, --low-memory, threads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dallecli.engine.device import (
    bf16_kind_from_flags,
    bf16_quality_holds,
    choose_dtype,
    cpu_flags,
    float32_weight_bytes,
    psnr_db,
)
from dallecli.engine.memory import MemoryChoice, apply_memory_mode, choose_low_memory, estimate_bytes
from dallecli.engine.threads import choose_threads, local_process_count, physical_cores, threads_per_process

GiB = 1024**3
ICE_LAKE = {"avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"}


# -- dtype policy --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "kind"), [
    (ICE_LAKE, "avx512"),
    (ICE_LAKE | {"avx512_bf16"}, "native"),
    ({"avx2", "fma", "amx_bf16", "amx_tile"}, "amx"),
    (ICE_LAKE | {"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8"}, "amx"),  # Sapphire Rapids
    ({"avx2", "fma"}, None),
    ({"avx512f"}, None),  # AVX-512 foundation alone: no oneDNN bf16 path
    (set(), None),
])
def test_cpu_bf16_kind_from_flags(flags, kind):
    assert bf16_kind_from_flags(frozenset(flags)) == kind


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize(("kind", "reason"), [
    ("native", "measured slower"),           # AVX-512-BF16: bf16 measured slower than fp32 (BENCHMARKS.md)
    ("avx512", "slower"),                    # no bf16 instructions: measured 2.6x slower (BENCHMARKS.md)
    (None, "without AVX-512"),
])
def test_cpu_auto_dtype_is_float32(kind, reason):
    choice = choose_dtype("cpu", None, cpu_bf16=kind)
    assert choice.dtype == "float32"
    assert reason in choice.reason
    assert "CPU" in choice.reason


def test_cpu_auto_dtype_is_bfloat16_with_amx_tiles():
    choice = choose_dtype("cpu", None, cpu_bf16="amx")
    assert choice.dtype == "bfloat16" and "AMX" in choice.reason and "--dtype float32" in choice.reason


def test_explicit_dtype_beats_cpu_bf16_policy():
    assert choose_dtype("cpu", "float32", cpu_bf16="amx").dtype == "float32"
    assert choose_dtype("cpu", "float32", cpu_bf16="native").dtype == "float32"
    assert choose_dtype("cpu", "bf16", cpu_bf16=None).dtype == "bfloat16"
    # CUDA and MPS do not look at the CPU
    assert choose_dtype("mps", None, cpu_bf16="amx").dtype == "float32"
    assert choose_dtype("cuda", None, cuda_bf16=False, cpu_bf16="native").dtype == "float16"


def test_float32_weight_bytes_reads_headers_only(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    save_file({"a": torch.zeros(3, 5, dtype=torch.float16), "b": torch.zeros(7)},
              str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({"a": torch.zeros(3, 5, dtype=torch.float16), "b": torch.zeros(7, dtype=torch.float16)},
              str(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))  # same tensors: not counted twice
    save_file({"c": torch.zeros(2, 2, 2, dtype=torch.bfloat16)}, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert float32_weight_bytes(tmp_path) == 4 * (15 + 7 + 8)
    assert float32_weight_bytes(tmp_path / "vae") is None  # no component folders


# -- the bf16 quality rule -------------------------------------------------------------------------------------
def test_psnr_exact_values():
    import numpy as np

    a = np.zeros((4, 4, 3))
    assert psnr_db(a, a + 0.1) == pytest.approx(20.0)
    assert psnr_db(a, a + 0.01) == pytest.approx(40.0)
    assert psnr_db(a, a) == math.inf


@pytest.mark.parametrize(("psnr", "nan", "holds"), [
    (30.0, False, True), (41.7, False, True), (29.99, False, False), (45.0, True, False), (math.nan, False, False),
    (math.inf, False, True),
])
def test_bf16_quality_rule(psnr, nan, holds):
    assert bf16_quality_holds(psnr, nan) is holds


@pytest.mark.slow
def test_bf16_against_fp32_on_the_embedded_model():
    """The rule as BENCHMARKS.md applies it: the worst PSNR over the 8 prompt/seed pairs, default steps."""
    import numpy as np

    from dallecli.engine.device import BF16_QUALITY_PAIRS
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    engines = {dtype: Engine(None, "cpu", dtype) for dtype in ("float32", "bfloat16")}
    worst, nan = math.inf, False
    for prompt, seed in BF16_QUALITY_PAIRS:
        images = {dtype: np.asarray(next(engine.generate(GenerationRequest(prompt, seed=seed))).image,
                                    dtype=np.float64) / 255 for dtype, engine in engines.items()}
        worst = min(worst, psnr_db(images["float32"], images["bfloat16"]))
        nan = nan or bool(np.isnan(images["bfloat16"]).any())
    assert bf16_quality_holds(worst, nan), worst


# -- --vae tiny -------------------------------------------------------------------------------------------------
def build_tiny_autoencoder(folder: Path, seed: int = 0) -> Path:
    """A seeded random AutoencoderTiny that decodes the tiny pipeline's 4-channel latents 2x (as its VAE does)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def cache_as_hub_repo(folder: Path, hub_cache: Path, repo_id: str, commit: str = "a" * 40) -> Path:
    """Lay ``folder``'s files out as a Hugging Face cache snapshot of ``repo_id`` (refs/main -> commit)."""
    import shutil

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory) -> Path:
    return build_tiny_autoencoder(tmp_path_factory.mktemp("taesd") / "taesd")


def test_vae_folder_swaps_the_decoder_only(tiny_pipeline, tiny_autoencoder):
    import numpy as np

    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    full = Engine(str(tiny_pipeline), "cpu", "float32")
    tiny = Engine(str(tiny_pipeline), "cpu", "float32", vae=str(tiny_autoencoder))
    assert type(tiny.pipe.vae).__name__ == "AutoencoderTiny"
    assert type(full.pipe.vae).__name__ == "AutoencoderKL"  # the shared cached pipeline keeps its own VAE
    assert tiny.pipe.unet is full.pipe.unet and tiny.pipe.text_encoder is full.pipe.text_encoder  # no copies
    request = GenerationRequest("a red circle", seed=3, steps=2)
    a = next(full.generate(request))
    b = next(tiny.generate(request))
    assert a.image.size == b.image.size == (32, 32)
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert b.settings.vae == str(tiny_autoencoder) and a.settings.vae is None
    # the same latents through the tiny decoder: deterministic
    assert np.array_equal(np.asarray(next(tiny.generate(request)).image), np.asarray(b.image))


def test_derived_pipelines_keep_the_loaded_dtype(tiny_pipeline, tiny_autoencoder, tmp_path):
    """``--vae`` and image to image derive a pipeline from the loaded one (``from_pipe``), which by default casts
    every shared component to float32 in place: the bfloat16 UNet turned float32 (3x slower with AMX)."""
    import torch
    from PIL import Image

    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "init.png")
    for vae in (None, str(tiny_autoencoder)):
        engine = Engine(str(tiny_pipeline), "cpu", "bfloat16", vae=vae)
        next(engine.generate(GenerationRequest("a red circle", seed=3, steps=2)))
        next(engine.generate(GenerationRequest("a red circle", seed=3, steps=2, image=str(tmp_path / "init.png"),
                                               strength=0.5)))
        derived = engine.task_pipe("img2img")
        assert derived is not engine.pipe and derived.unet is engine.pipe.unet
        assert engine.pipe.unet.dtype == engine.pipe.text_encoder.dtype == torch.bfloat16, vae
        assert engine.pipe.vae.dtype == torch.bfloat16


def test_vae_tiny_uses_the_registry_decoder_from_the_hf_cache(tiny_pipeline, tiny_autoencoder, isolated_home):
    from dallecli.engine.generate import Engine

    hub = isolated_home / "hf" / "hub"
    cache_as_hub_repo(tiny_autoencoder, hub, "madebyollin/taesd")
    engine = Engine(str(tiny_pipeline), "cpu", "float32", cache_dir=hub, vae="tiny")
    assert engine.vae.name == "taesd"
    assert type(engine.pipe.vae).__name__ == "AutoencoderTiny"


def test_vae_tiny_not_downloaded_says_how(tiny_pipeline):
    from dallecli.engine.generate import Engine
    from dallecli.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="dalle download taesd"):
        Engine(str(tiny_pipeline), "cpu", "float32", vae="tiny")


def test_vae_tiny_on_the_embedded_model_keeps_its_own_tiny_decoder():
    from dallecli.engine.generate import Engine

    assert Engine(None, "cpu", "float32", vae="tiny").vae is None


def test_tiny_vae_download_plan_takes_config_and_safetensors_only():
    from dallecli.store.download import select_component_files

    listing = {"config.json": 700, "diffusion_pytorch_model.safetensors": 9_800_000,
               "diffusion_pytorch_model.fp16.safetensors": 4_900_000, "diffusion_pytorch_model.bin": 9_800_000,
               "taesd_decoder.pth": 4_900_000, "README.md": 2_000, "images/preview.png": 100}
    files, skipped = select_component_files(listing, None, "madebyollin/taesd")
    assert [f.path for f in files] == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert {p for p, _ in skipped} == {"diffusion_pytorch_model.bin", "taesd_decoder.pth",
                                       "diffusion_pytorch_model.fp16.safetensors"}
    files, _ = select_component_files(listing, "fp16", "madebyollin/taesd")
    assert [f.path for f in files] == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]


def test_cli_generate_vae_tiny_records_it(tiny_pipeline, tiny_autoencoder, isolated_home, tmp_path):
    from conftest import run_dalle

    cache_as_hub_repo(tiny_autoencoder, isolated_home / "hf" / "hub", "madebyollin/taesd")
    done = run_dalle("generate", "a red circle", "--model", str(tiny_pipeline), "--steps", "2", "--seed", "1",
                     "--vae", "tiny", "--out", str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr
    from dallecli.images import read_metadata

    path = json.loads(done.stdout)["images"][0]["path"]
    assert read_metadata(Path(path))["vae"] == "taesd"


# -- --low-memory ----------------------------------------------------------------------------------------------
def test_estimate_bytes_exact():
    # weights 4 GiB fp32 -> 2 GiB in bf16; activations 1.5 GiB per 512x512 image in fp32 -> 0.75 GiB in bf16
    assert estimate_bytes(4 * GiB, "bfloat16", 512, 512, 1, False) == int(2.75 * GiB)
    # guidance doubles the activations, 1024x1024 quadruples them, 2 images double them
    assert estimate_bytes(0, "float32", 1024, 1024, 2, True) == int(1.5 * GiB * 4 * 2 * 2)


@pytest.mark.parametrize(("requested", "needed", "available", "low", "automatic"), [
    (None, 10 * GiB, 8 * GiB, True, True),      # short: turned on by itself, and said so
    (None, 7.5 * GiB, 8 * GiB, True, True),     # within the 10% headroom counts as short
    (None, 2 * GiB, 8 * GiB, False, False),
    (None, 10 * GiB, None, False, False),       # unknown free memory: left off
    (True, 1, 8 * GiB, True, False),            # --low-memory
    (False, 10 * GiB, 1 * GiB, False, False),   # --no-low-memory wins
])
def test_auto_low_memory_decision(requested, needed, available, low, automatic):
    choice = choose_low_memory(requested, int(needed), available, "cpu", 512, 512)
    assert (choice.low_memory, choice.automatic) == (low, automatic)
    if low:
        assert "attention slicing" not in choice.techniques  # SDPA already holds no full matrix: slicing costs


def test_low_memory_techniques_per_device_and_size():
    assert choose_low_memory(True, 0, None, "cpu", 512, 512).techniques == ()
    assert choose_low_memory(True, 0, None, "cpu", 2048, 2048).techniques == ("VAE tiling",)
    assert choose_low_memory(True, 0, None, "cuda:0", 512, 512).techniques == ("model CPU offload",)
    assert choose_low_memory(True, 0, None, "mps", 512, 512).techniques == ("attention slicing",)


def test_hopeless_sizes_are_refused_before_loading_with_the_figures(monkeypatch):
    import dallecli.engine.generate as generate_module
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest
    from dallecli.errors import OutOfMemoryError

    monkeypatch.setattr(generate_module, "available_bytes", lambda device: int(18.5e9))
    monkeypatch.setattr(generate_module, "load_pipeline", lambda *a, **k: pytest.fail("loaded before refusing"))
    engine = Engine(None, "cpu")
    planned, _ = engine.plan(GenerationRequest("a red circle", width=8192, height=8192))
    with pytest.raises(OutOfMemoryError, match=r"need about \d+\.\d GB even in low-memory mode and 18\.5 GB is "
                                                r"free on cpu") as caught:
        engine.memory(planned.width, planned.height, 1, True)
    assert caught.value.exit_code == 3 and "float16" not in str(caught.value)
    assert not engine.memory(2048, 2048, 1, True).low_memory  # the embedded model's small UNet fits 2048x2048


def test_activation_scale_follows_the_unet_width(tiny_pipeline, tmp_path):
    from dallecli.engine.memory import activation_scale
    from dallecli.store.resolve import embedded_model_path

    assert activation_scale(embedded_model_path()) == pytest.approx(32 / 320)
    assert activation_scale(tiny_pipeline) == pytest.approx(32 / 320)
    assert activation_scale(tmp_path) == 1.0  # no UNet (a transformer model, or unreadable): SD-sized


def test_low_memory_enables_tiling_and_keeps_sdpa_attention(tiny_pipeline):
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    engine = Engine(str(tiny_pipeline), "cpu", "float32", low_memory=True)
    next(engine.generate(GenerationRequest("a red circle", seed=1, steps=1)))
    processors = {type(p).__name__ for p in engine.pipe.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}
    apply_memory_mode(engine.pipe, MemoryChoice(True, False, "", ("attention slicing", "VAE tiling")))
    assert engine.pipe.vae.use_tiling
    apply_memory_mode(engine.pipe, MemoryChoice(False, False, ""))
    assert not engine.pipe.vae.use_tiling
    assert "SlicedAttnProcessor" not in {type(p).__name__ for p in engine.pipe.unet.attn_processors.values()}


def test_low_memory_pixels_match_normal_mode(tiny_pipeline):
    import numpy as np

    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    request = GenerationRequest("a red circle", seed=1, steps=2)
    normal = np.asarray(next(Engine(str(tiny_pipeline), "cpu", "float32", low_memory=False).generate(request)).image)
    sliced = np.asarray(next(Engine(str(tiny_pipeline), "cpu", "float32", low_memory=True).generate(request)).image)
    assert np.abs(normal.astype(int) - sliced.astype(int)).max() <= 1


def test_cli_says_when_low_memory_was_chosen(tiny_pipeline, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import dallecli.engine.generate as generate_module
    from dallecli.cli.app import app

    from dallecli.engine.device import float32_weight_bytes
    from dallecli.engine.memory import activation_scale

    needed = estimate_bytes(float32_weight_bytes(tiny_pipeline), "float32", 32, 32, 1, True,
                            activation_scale(tiny_pipeline))
    monkeypatch.setattr(generate_module, "available_bytes", lambda device: needed)  # within the headroom: short
    result = CliRunner().invoke(app, ["generate", "a red circle", "--model", str(tiny_pipeline), "--steps", "1",
                                      "--seed", "1", "--device", "cpu", "--dtype", "float32",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "low memory (0.0 GB free, about 0.0 GB needed): using --low-memory" in result.stderr
    assert "low memory" not in result.stdout


# -- threads ---------------------------------------------------------------------------------------------------
def _cpuinfo(tmp_path, cores: list[tuple[int, int]]) -> str:
    text = "".join(f"processor\t: {i}\nphysical id\t: {pkg}\ncore id\t\t: {core}\n\n" for i, (pkg, core) in enumerate(cores))
    (tmp_path / "cpuinfo").write_text(text)
    return str(tmp_path / "cpuinfo")


def test_physical_cores_counts_hyperthreads_once(tmp_path):
    info = _cpuinfo(tmp_path, [(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1), (1, 0), (1, 1)])  # 2 sockets x 2 cores x HT
    assert physical_cores(info, allowed=set(range(8))) == 4
    assert physical_cores(info, allowed={0, 2}) == 1  # pinned to the two threads of one core
    assert physical_cores(str(tmp_path / "none"), allowed={0, 1, 2}) == 3  # no cpuinfo: logical CPUs


@pytest.mark.parametrize(("physical", "processes", "threads"), [(2, 1, 2), (16, 4, 4), (16, 3, 5), (2, 4, 1), (8, 0, 8)])
def test_threads_per_process(physical, processes, threads):
    assert threads_per_process(physical, processes) == threads


def test_thread_choice_respects_explicit_settings():
    assert choose_threads(8, 2, env={}).threads == 4
    assert "shared by 2" in choose_threads(8, 2, env={}).reason
    assert choose_threads(8, 2, env={"OMP_NUM_THREADS": "3"}).threads == 3
    assert choose_threads(8, 1, env={"DALLE_THREADS": "5", "OMP_NUM_THREADS": "3"}).threads == 5
    assert choose_threads(8, 1, env={"OMP_NUM_THREADS": "junk"}).threads == 8
    assert local_process_count({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_process_count({}) == 1


@pytest.mark.parametrize(("physical", "logical", "busy", "threads"), [
    (2, 2, None, 2),    # not measured: every core
    (2, 2, 0.2, 2),     # noise: every core
    (2, 2, 1.0, 1),     # one busy process beside us on 2 cores: 1 thread
    (2, 2, 2.0, 1),     # never below 1
    (8, 16, 4.0, 6),    # 4 busy logical CPUs of 16 (hyper-threads) take a quarter of the physical cores
    (16, 16, 0.9, 15),
])
def test_threads_leave_the_cores_other_processes_use(physical, logical, busy, threads):
    choice = choose_threads(physical, 1, env={}, busy=busy, logical=logical)
    assert choice.threads == threads
    assert ("kept busy by other processes" in choice.reason) == (threads < physical)


def test_explicit_threads_beat_the_measurement_and_bad_dalle_threads_is_an_error():
    from dallecli.errors import UsageError

    assert choose_threads(2, 1, env={"DALLE_THREADS": "2"}, busy=2.0).threads == 2
    with pytest.raises(UsageError, match="DALLE_THREADS='abc'"):
        choose_threads(2, 1, env={"DALLE_THREADS": "abc"})
    with pytest.raises(UsageError, match="DALLE_THREADS='0'"):
        choose_threads(2, 1, env={"DALLE_THREADS": "0"})


def test_busy_elsewhere_subtracts_our_own_cpu_time(tmp_path):
    from dallecli.engine.threads import CpuSnapshot, busy_elsewhere, cpu_snapshot

    assert busy_elsewhere(CpuSnapshot(10.0, 100.0, 1.0), CpuSnapshot(12.0, 103.0, 2.0)) == pytest.approx(1.0)
    assert busy_elsewhere(CpuSnapshot(10.0, 100.0, 1.0), CpuSnapshot(12.0, 101.0, 2.0)) == 0.0
    assert busy_elsewhere(None, CpuSnapshot(1, 1, 1)) is None
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 1000 7 3 2 1 0 0\ncpu0 50 2 25 500 3 1 1 0 0 0\n")
    snapshot = cpu_snapshot(str(stat))
    import os

    assert snapshot.machine_busy == pytest.approx((100 + 5 + 50 + 3 + 2 + 1) / os.sysconf("SC_CLK_TCK"))
    assert cpu_snapshot(str(tmp_path / "none")) is None


def test_vae_tiling_is_skipped_for_a_tiny_vae_that_does_not_decode_8x():
    """diffusers' AutoencoderTiny tiles assume an 8x decoder; the embedded model's decodes 4x and its tiled decode
    fails at the first seam (found at 2048x2048 with --low-memory)."""
    from diffusers import AutoencoderTiny

    from dallecli.engine.memory import _tiling_fits
    from dallecli.store.resolve import embedded_model_path

    embedded = AutoencoderTiny.from_pretrained(embedded_model_path() / "vae")
    assert not _tiling_fits(embedded)
    assert _tiling_fits(AutoencoderTiny(decoder_block_out_channels=(8, 8, 8, 8), encoder_block_out_channels=(8, 8, 8, 8),
                                        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)))
