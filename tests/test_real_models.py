"""What real Hub repositories expose (issue 12), checked on small fixtures: variant-only folders, model-own
scheduler classes that replay, library errors as one line, moved and renamed names, no safety checker, the
fp16-safe VAE companion, the CUDA dtype of bfloat16 models, --revision. The full per-entry conformance against
replicas of the real repositories is ``test_conformance.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import run_dalle
from hubserver import FakeRepo, HubServer

from dallecli.cli.app import app
from dallecli.engine.device import choose_dtype
from dallecli.engine.loading import choose_variant, pretrained_kwargs
from dallecli.store.download import select_component_files, select_files, select_lora_files
from dallecli.store.registry import REGISTRY, canonical_name, lookup, tiny_decoder_for


def _invoke(*args: str):
    """The real Typer app in-process (no torch import cost per call); stderr kept apart from stdout. Only for
    commands that do not read the HF cache: huggingface_hub fixes its cache path when first imported."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _half_only(folder: Path, components=("unet", "vae", "text_encoder")) -> Path:
    """Replace each component's plain weights with a float16 ``.fp16.safetensors`` (what `dalle download` keeps
    for an fp16-variant registry entry)."""
    from safetensors.torch import load_file, save_file

    for component in components:
        for plain in (folder / component).glob("*.safetensors"):
            if ".fp16." in plain.name:
                continue
            tensors = load_file(plain)
            save_file({k: v.half() for k, v in tensors.items()}, plain.with_name(plain.stem + ".fp16.safetensors"))
            plain.unlink()
    return folder


@pytest.fixture(scope="module")
def half_pipeline(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline with only fp16-variant weights, and SD 1.5's safety checker entries in model_index.json
    but no such folders (as after `dalle download sd-1.5`)."""
    folder = tmp_path_factory.mktemp("half") / "sd"
    shutil.copytree(tiny_pipeline, folder)
    _half_only(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# --- variants ---------------------------------------------------------------------------------------------

def test_choose_variant_from_the_files_present(tiny_pipeline, half_pipeline, tmp_path):
    assert choose_variant(tiny_pipeline, "float32") is None
    assert choose_variant(tiny_pipeline, "float16") is None  # nothing but plain files
    assert choose_variant(half_pipeline, "float32") == "fp16"  # only fp16 files: load them and cast
    both = tmp_path / "both"
    shutil.copytree(tiny_pipeline, both)
    shutil.copy(half_pipeline / "unet" / "diffusion_pytorch_model.fp16.safetensors", both / "unet")
    assert choose_variant(both, "float32") is None  # full precision is there: use it
    assert choose_variant(both, "bfloat16") == "fp16"  # half precision reads the smaller files
    kwargs = pretrained_kwargs(half_pipeline, "float32")
    assert kwargs["variant"] == "fp16" and kwargs["use_safetensors"] and kwargs["local_files_only"]
    assert kwargs["safety_checker"] is None and kwargs["feature_extractor"] is None
    assert kwargs["requires_safety_checker"] is False


def test_fp16_only_folder_generates_in_float32_and_finetunes(half_pipeline, tmp_path):
    result = _invoke("generate", "a red circle", "--model", str(half_pipeline), "--steps", "2", "--width", "32",
                     "--height", "32", "--seed", "3", "--dtype", "float32", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    png = Path(result.stdout.strip().splitlines()[-1])
    stored = json.loads(Image.open(png).text["dalle"])
    assert stored["dtype"] == "float32" and stored["seed"] == 3
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), "red").save(data / "a.png")
    (data / "a.txt").write_text("a red square")
    tuned = _invoke("finetune", str(data), "--model", str(half_pipeline), "--steps", "1", "--output",
                    str(tmp_path / "lora"))
    assert tuned.exit_code == 0, tuned.output
    assert (tmp_path / "lora" / "lora.safetensors").is_file()
    styled = _invoke("generate", "a red circle", "--model", str(half_pipeline), "--steps", "2", "--width", "32",
                     "--height", "32", "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "styled"))
    assert styled.exit_code == 0, styled.output  # the folder finetune wrote stands for its lora.safetensors
    assert json.loads(Image.open(styled.stdout.strip()).text["dalle"])["loras"][0]["path"].endswith("lora.safetensors")
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    refused = _invoke("finetune", str(data), "--model", str(half_pipeline), "--steps", "1", "--output", str(taken))
    assert refused.exit_code == 2 and "is a file" in refused.output and taken.read_text() == "mine"


# --- schedulers -------------------------------------------------------------------------------------------

def _with_scheduler(tiny_pipeline: Path, folder: Path, class_name: str, **config) -> Path:
    shutil.copytree(tiny_pipeline, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    settings = json.loads(path.read_text())
    settings.update(_class_name=class_name, **config)
    path.write_text(json.dumps(settings))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", class_name]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_model_own_pndm_scheduler_is_recorded_and_replays_pixel_identically(tiny_pipeline, tmp_path):
    """SD 1.5 ships PNDMScheduler, which has no short name: the image records the class name and replays."""
    model = _with_scheduler(tiny_pipeline, tmp_path / "pndm", "PNDMScheduler", skip_prk_steps=True, steps_offset=1)
    first = _invoke("generate", "a cat", "--model", str(model), "--steps", "3", "--width", "32", "--height", "32",
                    "--seed", "5", "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    png = Path(first.stdout.strip())
    assert json.loads(Image.open(png).text["dalle"])["scheduler"] == "PNDMScheduler"
    assert "Sampler: PNDMScheduler" in Image.open(png).text["parameters"]
    again = _invoke("generate", "--from", str(png), "--out", str(tmp_path / "b"))
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again.stdout.strip())))
    info = _invoke("info", str(png))
    assert f"dalle generate --from {png}" in info.stdout


def test_scheduler_class_names_and_lcm_are_accepted_and_flow_matching_refused(tiny_pipeline, tmp_path):
    common = ["--model", str(tiny_pipeline), "--steps", "4", "--width", "32", "--height", "32", "--seed", "1"]
    for name, recorded in (("PNDMScheduler", "PNDMScheduler"), ("lcm", "lcm"), ("LCMScheduler", "lcm"),
                           ("EulerDiscreteScheduler", "euler")):
        result = _invoke("generate", "a cat", *common, "--scheduler", name, "--out", str(tmp_path / name))
        assert result.exit_code == 0, (name, result.output)
        assert json.loads(Image.open(result.stdout.strip()).text["dalle"])["scheduler"] == recorded
    flow = _invoke("generate", "a cat", *common, "--scheduler", "FlowMatchEulerDiscreteScheduler")
    assert flow.exit_code == 2 and "does not fit this diffusion" in flow.output
    unknown = _invoke("generate", "a cat", *common, "--scheduler", "NoSuchScheduler")
    assert unknown.exit_code == 2 and "unknown --scheduler 'NoSuchScheduler'" in unknown.output
    assert not list(tmp_path.glob("*.png"))


def test_steps_a_scheduler_cannot_plan_are_one_usage_line(tiny_pipeline, tmp_path):
    """PNDM with its Runge-Kutta warm-up fails below 4 steps with a numpy broadcasting error inside diffusers."""
    model = _with_scheduler(tiny_pipeline, tmp_path / "prk", "PNDMScheduler", skip_prk_steps=False)
    done = run_dalle("generate", "a cat", "--model", str(model), "--steps", "2", "--width", "32", "--height", "32",
                     "--out", str(tmp_path / "out"), "--progress", "none")  # no "loading model" line
    assert done.returncode == 2, done.stderr
    assert "--steps 2 does not fit the PNDMScheduler scheduler (it needs at least 4)" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- errors a user can type -------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("generate", "x", "--model", "../nothere"),
    ("generate", "x", "--model", "a/b c"),
    ("generate", "x", "--model", "a/b/c"),
    ("download", "../x", "--dry-run"),
    ("download", "a/b c", "--dry-run"),
    ("models", "info", "a/b c"),
])
def test_malformed_model_names_are_one_line_usage_errors(args):
    done = run_dalle(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "HFValidationError" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


def test_prompts_that_are_not_utf8_and_files_that_are_not_models_are_one_line(tmp_path):
    from dallecli.engine.request import GenerationRequest, validate_request
    from dallecli.errors import UsageError

    with pytest.raises(UsageError, match="the prompt is not valid UTF-8 \\(byte 0xe9 at position 3\\)"):
        validate_request(GenerationRequest(prompt="caf\udce9"))
    with pytest.raises(UsageError, match="--negative-prompt is not valid UTF-8"):
        validate_request(GenerationRequest(prompt="a cat", negative_prompt="\udcff"))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    for args in (("--model", str(notes)), ("--lora", str(notes))):
        done = run_dalle("generate", "a cat", *args, "--out", str(tmp_path / "out"))
        assert done.returncode != 0 and "is not a safetensors file" in done.stderr, done.stderr
        assert "re-download" not in done.stderr and "delete" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and notes.read_text() == "hello\n"


def test_library_error_table_translates_by_class_name():
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    from dallecli.cli.errors import library_error

    assert library_error(HFValidationError("Repo id must be in the form 'org/name'."))[0] == 2
    code, message = library_error(LocalEntryNotFoundError("cannot find the file"))
    assert code == 1 and "dalle download" in message and "\n" not in message
    assert library_error(ValueError("other")) is None


# --- names that moved ---------------------------------------------------------------------------------------

def test_moved_repo_and_renamed_alias_map_with_a_notice():
    assert canonical_name("runwayml/stable-diffusion-v1-5")[0] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "deleted from the Hub" in canonical_name("RunwayML/stable-diffusion-v1-5")[1]
    assert canonical_name("tiny-sd") == ("bk-sdm-tiny", canonical_name("tiny-sd")[1])
    assert lookup("tiny-sd") is REGISTRY["bk-sdm-tiny"] and "tiny-sd" not in REGISTRY
    assert lookup("runwayml/stable-diffusion-v1-5") is REGISTRY["sd-1.5"]
    assert canonical_name("sd-1.5") == ("sd-1.5", None)


def test_registry_fields_are_consistent():
    for spec in REGISTRY.values():
        assert spec.kind in ("pipeline", "upscaler", "inpainting", "vae", "tiny-vae", "lora", "scorer")
        if spec.vae is not None:
            assert REGISTRY[spec.vae].kind == "vae" and REGISTRY[spec.vae].family == spec.family
        if spec.kind in ("pipeline", "inpainting"):
            assert spec.steps >= 1 and spec.width % 8 == 0 and spec.height % 8 == 0
        if spec.inpaint is not None:  # `dalle edit` reads it: an inpainting entry of the same family
            assert spec.kind == "pipeline"
            assert REGISTRY[spec.inpaint].kind == "inpainting" and REGISTRY[spec.inpaint].family == spec.family
        assert (spec.scale is not None) == (spec.kind == "upscaler")
        if spec.kind == "upscaler":
            assert spec.steps >= 1 and spec.scale in (2, 4) and spec.repo_id
    from dallecli.store.registry import upscale_factors, upscaler_for

    assert upscale_factors() == [2, 4]
    assert upscaler_for(4).alias == "sd-x4-upscaler" and upscaler_for(2).alias == "sd-x2-latent-upscaler"
    assert REGISTRY["sd-1.5"].inpaint == "sd-1.5-inpainting" and REGISTRY["sdxl"].inpaint == "sdxl-inpainting"
    assert tiny_decoder_for("sdxl").alias == "taesdxl" and tiny_decoder_for("stable-diffusion").alias == "taesd"
    assert tiny_decoder_for("flux") is None


def test_cuda_auto_dtype_keeps_bfloat16_models_out_of_float16():
    assert choose_dtype("cuda", None, cuda_bf16=False, model_dtype="bfloat16").dtype == "float32"
    assert choose_dtype("cuda", None, cuda_bf16=False, model_dtype="float16").dtype == "float16"
    assert choose_dtype("cuda", None, cuda_bf16=True, model_dtype="bfloat16").dtype == "bfloat16"
    assert choose_dtype("cpu", None, model_dtype="bfloat16").dtype == "float32"
    assert choose_dtype("cuda", "float16", cuda_bf16=False, model_dtype="bfloat16").dtype == "float16"


# --- what a download selects ---------------------------------------------------------------------------------

def test_safety_checker_and_feature_extractor_are_never_planned():
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    listing = {"model_index.json": 1, "unet/config.json": 1, "unet/diffusion_pytorch_model.fp16.safetensors": 5,
               "safety_checker/config.json": 1, "safety_checker/model.fp16.safetensors": 600,
               "feature_extractor/preprocessor_config.json": 1}
    files, skipped = select_files(listing, index, "fp16", "org/sd")
    assert [f.path for f in files] == ["model_index.json", "unet/config.json",
                                      "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert dict(skipped)["safety_checker/model.fp16.safetensors"].startswith("safety checker")


def test_vae_repos_take_only_the_files_diffusers_loads():
    """madebyollin's repos also hold copies for other tools (sdxl_vae.safetensors, taesd_decoder.safetensors)."""
    listing = {"config.json": 1, "diffusion_pytorch_model.safetensors": 100, "diffusion_pytorch_model.bin": 100,
               "sdxl_vae.safetensors": 100, "sdxl.vae.safetensors": 100, "README.md": 1}
    files, skipped = select_component_files(listing, None, "madebyollin/sdxl-vae-fp16-fix")
    assert [f.path for f in files] == ["config.json", "diffusion_pytorch_model.safetensors"]
    lora, _ = select_lora_files({"pytorch_lora_weights.safetensors": 9, "README.md": 1, "x/y.safetensors": 2},
                                "latent-consistency/lcm-lora-sdv1-5")
    assert [f.path for f in lora] == ["pytorch_lora_weights.safetensors"]


# --- the companion VAE, renamed repos and --revision against the stand-in Hub --------------------------------

@pytest.fixture(scope="module")
def hub(tiny_pipeline, tmp_path_factory):
    """sd-1.5's and sdxl's repo ids served from the tiny pipeline, and the fp16-fix VAE repo."""
    half = _half_only(shutil.copytree(tiny_pipeline, tmp_path_factory.mktemp("h") / "sd"))
    vae = half / "vae"
    vae_repo = FakeRepo({"config.json": (tiny_pipeline / "vae" / "config.json").read_bytes(),
                         "diffusion_pytorch_model.safetensors":
                             (tiny_pipeline / "vae" / "diffusion_pytorch_model.safetensors").read_bytes(),
                         "sdxl_vae.safetensors": (vae / "diffusion_pytorch_model.fp16.safetensors").read_bytes(),
                         "README.md": b"# fp16 fix\n"})
    server = HubServer({
        REGISTRY["sd-1.5"].repo_id: FakeRepo.from_folder(half),
        REGISTRY["sdxl"].repo_id: FakeRepo.from_folder(half),
        REGISTRY["sdxl-vae-fp16-fix"].repo_id: vae_repo,
    }).start()
    yield server
    server.stop()


@pytest.fixture
def online(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    hub.log.clear()
    return hub


def test_moved_repo_downloads_the_new_one_and_generates_with_a_notice(online, monkeypatch, tmp_path):
    done = run_dalle("download", "runwayml/stable-diffusion-v1-5")
    assert done.returncode == 0, done.stderr
    assert "deleted from the Hub" in done.stderr and "models--stable-diffusion-v1-5--stable-diffusion-v1-5" in done.stdout
    assert not any("runwayml" in path for path in online.fetched())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    made = run_dalle("generate", "a cat", "--model", "runwayml/stable-diffusion-v1-5", "--steps", "2", "--width",
                     "32", "--height", "32", "--out", str(tmp_path / "out"))
    assert made.returncode == 0, made.stderr
    assert "deleted from the Hub" in made.stderr
    assert json.loads(Image.open(made.stdout.strip()).text["dalle"])["model"] == "sd-1.5"


def test_sdxl_download_brings_its_fp16_fix_vae_which_float16_uses(online, monkeypatch, tmp_path):
    plan = run_dalle("download", "sdxl", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    companion = planned["companions"][0]
    assert companion["repo_id"] == "madebyollin/sdxl-vae-fp16-fix"
    assert [f["path"] for f in companion["files"]] == ["config.json", "diffusion_pytorch_model.safetensors"]
    done = run_dalle("download", "sdxl", "--json")
    assert done.returncode == 0, done.stderr
    fetched = json.loads(done.stdout)
    assert fetched["fetched_bytes"] == planned["total_bytes"]
    assert not any(path.endswith("sdxl_vae.safetensors") for path in online.fetched())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["a cat", "--model", "sdxl", "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path)]
    for extra, vae in ((["--dtype", "float16"], "sdxl-vae-fp16-fix"), (["--dtype", "float32"], None),
                       (["--dtype", "float16", "--vae", "full"], None)):
        made = run_dalle("generate", *common, *extra)
        assert made.returncode == 0, made.stderr
        assert json.loads(Image.open(made.stdout.strip()).text["dalle"])["vae"] == vae, extra


def test_revision_and_cache_dir_given_to_download_are_what_generate_reads(online, monkeypatch, tmp_path):
    commit = online.repos[REGISTRY["sd-1.5"].repo_id].commit
    cache = tmp_path / "elsewhere"
    done = run_dalle("download", "sd-1.5", "--revision", commit, "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--model", "sd-1.5", "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "o")]
    missing = run_dalle("generate", "a cat", *common)
    assert missing.returncode == 1 and "dalle download sd-1.5" in missing.stderr
    made = run_dalle("generate", "a cat", *common, "--revision", commit, "--cache-dir", str(cache))
    assert made.returncode == 0, made.stderr
    png = made.stdout.strip()
    assert json.loads(Image.open(png).text["dalle"])["model_revision"] == commit
    # --from replays the recorded commit (no refs/main points at it), pixel for pixel
    again = run_dalle("generate", "--from", png, "--cache-dir", str(cache), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again.stdout.strip())))
    # a recorded commit that is not downloaded: the downloaded revision, with a notice saying so
    stored = json.loads(Image.open(png).text["dalle"])
    stored["model_revision"] = "f" * 40
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("dalle", json.dumps(stored))
    Image.open(png).save(tmp_path / "old.png", pnginfo=info)
    older = run_dalle("generate", "--from", str(tmp_path / "old.png"), "--cache-dir", str(cache), "--revision", commit,
                      "--out", str(tmp_path / "older"))
    assert older.returncode == 0 and "not downloaded" not in older.stderr  # --revision given: it wins
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert run_dalle("download", "sd-1.5").returncode == 0  # main, in the default cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fallback = run_dalle("generate", "--from", str(tmp_path / "old.png"), "--out", str(tmp_path / "fallback"))
    assert fallback.returncode == 0, fallback.stderr
    assert "at ffffffffffff, which is not downloaded; using the downloaded revision, so pixels may differ" in fallback.stderr
    assert f"dalle download sd-1.5 --revision {'f' * 40}" in fallback.stderr


def test_a_partly_downloaded_model_says_so_and_bad_download_options_are_usage_errors(online, monkeypatch, tmp_path):
    done = run_dalle("download", "sd-1.5")
    assert done.returncode == 0, done.stderr
    snapshot = Path(done.stdout.strip())
    (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()  # as after Ctrl-C
    from dallecli.store.resolve import missing_components

    assert missing_components(snapshot) == ["unet"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    made = run_dalle("generate", "a cat", "--model", "sd-1.5", "--steps", "2", "--out", str(tmp_path / "o"))
    assert made.returncode == 1 and "only partly downloaded (unet missing" in made.stderr
    assert "dalle download sd-1.5" in made.stderr and not (tmp_path / "o").exists()
    listed = run_dalle("models")
    assert "sd-1.5 is only partly downloaded" in listed.stderr
    monkeypatch.delenv("HF_HUB_OFFLINE")
    variant = run_dalle("download", "sd-1.5", "--variant", "fp8", "--dry-run")
    assert variant.returncode == 2 and "has no fp8 weights (it has: fp16)" in variant.stderr
    (tmp_path / "file").write_text("x")
    cache = run_dalle("download", "sd-1.5", "--cache-dir", str(tmp_path / "file"))
    assert cache.returncode == 2 and "--cache-dir" in cache.stderr and len(cache.stderr.strip().splitlines()) == 1


def test_a1111_sampler_names_map_back_to_schedulers():
    from dallecli.engine.schedulers import a1111_sampler, from_a1111_sampler

    for name in ("euler", "euler-a", "dpm++", "dpm++-karras", "ddim", "unipc", "lcm"):
        assert from_a1111_sampler(a1111_sampler(name)) == name
    assert from_a1111_sampler("PNDMScheduler") == "PNDMScheduler"
    assert from_a1111_sampler("Heun") is None and from_a1111_sampler(None) is None


def test_safetensors_is_recognised_before_the_pickle_opcode_and_must_end_where_its_header_says(tmp_path):
    """A 640-byte header makes a safetensors file start with 0x80 0x02, like a protocol-2 pickle (T5 shards of
    SD 3.5, FLUX and PixArt were refused for that); a file longer than its header says is damaged."""
    import struct

    from dallecli.weightfiles import sniff, verify_safetensors
    from dallecli.errors import CorruptWeightsError

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (640 - len(header))
    path = tmp_path / "model-00001-of-00002.safetensors"
    path.write_bytes(struct.pack("<Q", 640) + header + b"\0" * 8)
    assert path.read_bytes()[:2] == b"\x80\x02" and sniff(path) == "safetensors"
    verify_safetensors(path)
    path.write_bytes(path.read_bytes() + b"extra")
    assert sniff(path) == "oversized"
    with pytest.raises(CorruptWeightsError, match="bytes after its last tensor"):
        verify_safetensors(path)


def _diffusers_scheduler_classes() -> list[str]:
    import diffusers

    names = []
    for name in dir(diffusers):
        if not name.endswith("Scheduler"):
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # noqa: BLE001 - optional backends (flax, onnx) that are not installed
            continue
        if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) and "Flax" not in name:
            names.append(name)
    return sorted(names)


def test_every_diffusers_scheduler_class_is_accepted_and_rebuilds_itself_or_is_refused_in_one_line():
    """Whatever scheduler a model ships, its recorded name builds that scheduler again (--from replays it)."""
    from dallecli.engine.schedulers import is_flow_matching, make_scheduler, scheduler_name, validate_scheduler
    from dallecli.errors import UsageError

    sd = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    names = _diffusers_scheduler_classes()
    assert {"PNDMScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler", "DDIMScheduler"} <= set(names)
    built = 0
    for name in names:
        validate_scheduler(name)
        base = flow if is_flow_matching(name) else sd
        try:
            scheduler = make_scheduler(name, base)
        except UsageError as exc:  # schedulers for other kinds of models (VQ-diffusion, unCLIP...): one line
            assert "\n" not in str(exc) and f"--scheduler {name}" in str(exc), name
            continue
        built += 1
        recorded = scheduler_name(scheduler)
        again = make_scheduler(recorded, base)
        assert type(again) is type(scheduler) and scheduler_name(again) == recorded, name
    assert built >= 20
    with pytest.raises(UsageError, match="does not fit this flow-matching model"):
        make_scheduler("PNDMScheduler", flow)
    assert type(make_scheduler("FlowMatchLCMScheduler", flow)).__name__ == "FlowMatchLCMScheduler"
