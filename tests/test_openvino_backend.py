"""``--backend openvino`` (issue #17): the UNet and VAE decoder run by OpenVINO, exported once into dalle's cache,
with the same images as PyTorch (within float32 rounding), and every refusal in one line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_dalle
from dallecli.engine import ov_backend
from dallecli.engine.generate import Engine
from dallecli.engine.request import GenerationRequest
from dallecli.errors import CorruptWeightsError, UnsafeWeightsError, UsageError

needs_openvino = pytest.mark.skipif(not ov_backend.installed(), reason="the openvino extra is not installed")
SMALL = {"width": 32, "height": 32, "steps": 3, "seed": 5, "guidance_scale": 4.0}


def _pixels(engine, prompt="a red circle", **extra):
    [result] = engine.generate(GenerationRequest(prompt, **{**SMALL, **extra}))
    return np.asarray(result.image, dtype=np.float64), result


def _psnr(a, b):
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@needs_openvino
def test_openvino_draws_what_torch_draws_and_reuses_its_export(tiny_pipeline, isolated_home):
    reference, _ = _pixels(Engine(str(tiny_pipeline), "cpu", "float32"))
    engine = Engine(str(tiny_pipeline), "cpu", "float32", backend="openvino")
    assert (engine.backend, engine.openvino_precision, engine.dtype) == ("openvino", "f32", "float32")
    image, result = _pixels(engine)
    assert engine.openvino.exported and engine.openvino.precision == "f32"
    assert _psnr(image, reference) >= 40, _psnr(image, reference)
    assert result.settings.to_dict()["backend"] == {"name": "openvino", "precision": "f32"}
    assert "backend" not in _pixels(Engine(str(tiny_pipeline), "cpu", "float32"))[1].settings.to_dict()
    folder = engine.openvino.folder
    assert folder.is_relative_to(isolated_home / "cache") and sorted(p.name for p in folder.iterdir()) == [
        "export.json", "unet.bin", "unet.xml", "vae_decoder.bin", "vae_decoder.xml"]
    assert engine.pipe.unet.conv_in.weight.numel() == 0  # PyTorch's copy of the UNet weights was given back

    stamp = (folder / "unet.bin").stat().st_mtime_ns
    again = Engine(str(tiny_pipeline), "cpu", "float32", backend="openvino")
    image_again, _ = _pixels(again)
    assert not again.openvino.exported and again.openvino.folder == folder
    assert (folder / "unet.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(image_again, image)
    # a different seed and size go through the same export (its inputs are dynamic)
    other, _ = _pixels(again, width=48, height=40, seed=6)
    torch_other, _ = _pixels(Engine(str(tiny_pipeline), "cpu", "float32"), width=48, height=40, seed=6)
    assert other.shape == (40, 48, 3) and _psnr(other, torch_other) >= 40


@needs_openvino
def test_image_to_image_and_weighted_prompts_run_through_openvino(tiny_pipeline):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save("init.png")
    torch_engine = Engine(str(tiny_pipeline), "cpu", "float32")
    ov_engine = Engine(str(tiny_pipeline), "cpu", "float32", backend="openvino")
    for extra in ({"image": "init.png", "strength": 0.6}, {}):
        prompt = "a (red:1.5) circle"
        reference, _ = _pixels(torch_engine, prompt, **extra)
        image, _ = _pixels(ov_engine, prompt, **extra)
        assert _psnr(image, reference) >= 40, (extra, _psnr(image, reference))


@needs_openvino
def test_bfloat16_precision_stays_within_the_quality_rule(tiny_pipeline):
    reference, _ = _pixels(Engine(str(tiny_pipeline), "cpu", "float32"))
    engine = Engine(str(tiny_pipeline), "cpu", "bfloat16", backend="openvino")
    image, result = _pixels(engine)
    assert engine.openvino_precision == "bf16" and engine.dtype == "float32"  # PyTorch's parts stay float32
    assert result.settings.to_dict()["backend"]["precision"] == "bf16"
    assert _psnr(image, reference) >= 30


def test_precision_follows_dtype_and_the_cpu():
    assert ov_backend.choose_precision(None, "native") == "bf16"
    assert ov_backend.choose_precision(None, "amx") == "bf16"
    assert ov_backend.choose_precision("auto", "avx512") == "f32"
    assert ov_backend.choose_precision(None, None) == "f32"
    assert ov_backend.choose_precision("float32", "native") == "f32"
    assert ov_backend.choose_precision("bfloat16", None) == "bf16"
    with pytest.raises(UsageError, match="float32 or bfloat16, not float16"):
        ov_backend.choose_precision("float16", "native")


def test_refusals_before_anything_loads(tiny_pipeline, monkeypatch):
    with pytest.raises(UsageError, match="choose one of torch, openvino"):
        Engine(str(tiny_pipeline), "cpu", backend="tensorrt")
    monkeypatch.setattr(ov_backend, "installed", lambda: False)
    with pytest.raises(UsageError, match=r"needs OpenVINO: pip install 'dallecli\[openvino\]'"):
        Engine(str(tiny_pipeline), "cpu", backend="openvino")
    monkeypatch.setattr(ov_backend, "installed", lambda: True)
    with pytest.raises(UsageError, match="runs on the CPU"):
        ov_backend.check_backend("openvino", "cuda:0", "StableDiffusionPipeline")
    with pytest.raises(UsageError, match="this model is StableDiffusionXLPipeline: use --backend torch"):
        ov_backend.check_backend("openvino", "cpu", "StableDiffusionXLPipeline")


def test_the_cli_refuses_in_one_line(tiny_pipeline, tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"\x00")
    cases = [
        (["--backend", "onnx"], "--backend 'onnx': choose one of torch, openvino"),
        (["--backend", "openvino", "--dtype", "float16"], "float32 or bfloat16, not float16"),
    ]
    if ov_backend.installed():
        cases.append((["--backend", "openvino", "--lora", str(lora)], "--lora runs with --backend torch only"))
    for extra, message in cases:
        done = run_dalle("generate", "a red circle", "--model", str(tiny_pipeline), "--device", "cpu", *extra)
        assert done.returncode == 2 and done.stderr.strip().endswith(message) or message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    done = run_dalle("generate", "a red circle", "--model", str(tiny_pipeline), env={"DALLE_BACKEND": "cuda"})
    assert done.returncode == 2 and "DALLE_BACKEND 'cuda': choose one of torch, openvino" in done.stderr


def _ir_pair(folder, consts: bytes, size: int | None = None):
    size = len(consts) if size is None else size
    (folder / "m.xml").write_text(
        '<?xml version="1.0"?><net name="m" version="11"><layers>'
        f'<layer id="0" type="Const"><data element_type="f32" shape="{size // 4}" offset="0" size="{size}"/></layer>'
        '</layers></net>')
    (folder / "m.bin").write_bytes(consts)
    return folder / "m.xml"


def test_ir_weights_are_identified_by_content_never_by_name(tmp_path):
    good = np.arange(4, dtype=np.float32).tobytes()
    assert ov_backend.check_ir_pair(_ir_pair(tmp_path, good)) == tmp_path / "m.bin"
    import pickle

    disguised = pickle.dumps({"weights": [1.0]}, protocol=4)  # what torch.load would unpickle
    with pytest.raises(UnsafeWeightsError, match="a zip or pickle, not OpenVINO constants"):
        ov_backend.check_ir_pair(_ir_pair(tmp_path, disguised, size=16))
    with pytest.raises(UnsafeWeightsError, match="a zip or pickle"):
        ov_backend.check_ir_pair(_ir_pair(tmp_path, b"PK\x03\x04" + bytes(60), size=16))
    with pytest.raises(CorruptWeightsError, match="12 bytes where its graph addresses 16"):
        ov_backend.check_ir_pair(_ir_pair(tmp_path, good[:12], size=16))
    (tmp_path / "m.xml").write_text('<?xml version="1.0"?><data/>')
    with pytest.raises(UnsafeWeightsError, match="not an OpenVINO IR graph"):
        ov_backend.check_ir_pair(tmp_path / "m.xml")


@needs_openvino
def test_a_damaged_export_is_refused_not_read(tiny_pipeline):
    engine = Engine(str(tiny_pipeline), "cpu", "float32", backend="openvino")
    _pixels(engine)
    unet_bin = engine.openvino.folder / "unet.bin"
    unet_bin.write_bytes(unet_bin.read_bytes()[:-8])
    # in-process (a CLI run costs seconds of imports): a CorruptWeightsError is a DalleError, which the CLI prints
    # as one line like every other (test_cli)
    with pytest.raises(CorruptWeightsError) as refused:
        _pixels(Engine(str(tiny_pipeline), "cpu", "float32", backend="openvino"))
    assert f"unet.bin: {unet_bin.stat().st_size} bytes where its graph addresses" in str(refused.value)
    assert "to export again" in str(refused.value)
    assert json.loads((engine.openvino.folder / "export.json").read_text())["format"] == ov_backend.EXPORT_FORMAT


@needs_openvino
def test_latent_sizes_the_unet_cannot_halve_evenly_run_right(tmp_path):
    """Three down-samplings (SD's depth): latents of 13×11 are not multiples of 8, so the up-sampling blocks must
    take their sizes from the skip connections in the exported graph too."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3, cross_attention_dim=8, norm_num_groups=4,
        attention_head_dim=2).eval()
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()
    ov_backend.export(SimpleNamespace(unet=unet, vae=vae), tmp_path / "export")
    import openvino as ov

    compiled = ov_backend._Compiled(ov.Core(), tmp_path / "export" / "unet.xml", "f32", 1)
    for height, width in ((13, 11), (16, 16), (7, 24)):
        sample, text = torch.randn(2, 4, height, width), torch.randn(2, 5, 8)
        steps = torch.tensor([10.0, 500.0])
        with torch.no_grad():
            expected = unet(sample, steps, encoder_hidden_states=text).sample
        got = compiled(sample, steps, text)
        assert got.shape == expected.shape
        assert float((got - expected).norm() / expected.norm()) < 1e-4


@needs_openvino
def test_serve_runs_the_backend_it_is_given(tiny_pipeline, tmp_path):
    from dallecli.serve.config import ServeConfig
    from dallecli.serve.pool import EnginePool

    pool = EnginePool(ServeConfig(model=str(tiny_pipeline), out=tmp_path, device="cpu", backend="openvino"))
    engine = pool.engine_for(None)
    assert (engine.backend, engine.openvino_precision) in {("openvino", "f32"), ("openvino", "bf16")}
    assert EnginePool(ServeConfig(model=str(tiny_pipeline), out=tmp_path)).engine_for(None).backend == "torch"
    done = run_dalle("serve", "--port", "0", "--backend", "onnx", "--out", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2 and done.stderr.strip().endswith("--backend 'onnx': choose one of torch, openvino")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@needs_openvino
def test_a_tiny_image_first_does_not_spoil_later_sizes(isolated_home):
    """Found by trying ``dalle serve --backend openvino``: its warm-up pass at 16x16 left every later image of the
    process a flat field (up to 216 levels off), because the CPU plugin's runtime cache of shape-specific
    kernels served wrong ones after that size. The cache is off (``CPU_RUNTIME_CACHE_CAPACITY`` 0)."""
    request = {"prompt": "a red circle", "seed": 5}
    alone = Engine(None, "cpu", "float32", backend="openvino")
    reference = np.asarray(next(alone.generate(GenerationRequest(**request, width=64, height=64))).image)
    engine = Engine(None, "cpu", "float32", backend="openvino")
    next(engine.generate(GenerationRequest(**request, width=16, height=16)))
    after = np.asarray(next(engine.generate(GenerationRequest(**request, width=64, height=64))).image)
    assert np.array_equal(after, reference)


@needs_openvino
def test_an_openvino_image_replays_pixel_for_pixel(tiny_pipeline, tmp_path, isolated_home):
    """``--from`` takes the recorded backend, and the recorded dtype is OpenVINO's precision (the PyTorch parts
    run float32 whatever it is), so the replay runs what made the image."""
    from typer.testing import CliRunner

    from dallecli.cli.app import app
    from dallecli.images import read_metadata

    def generate(*args):
        done = CliRunner().invoke(app, ["generate", *args, "--json", "--progress", "none"])
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)["images"][0]["path"]

    made = generate("a red circle", "--model", str(tiny_pipeline), "--width", "32", "--height", "32", "--steps", "2",
                    "--seed", "4", "--backend", "openvino", "--dtype", "bfloat16", "--out", str(tmp_path / "a"))
    stored = read_metadata(Path(made))
    assert stored["dtype"] == "bfloat16" and stored["backend"] == {"name": "openvino", "precision": "bf16"}
    again = generate("--from", made, "--out", str(tmp_path / "b"))
    assert read_metadata(Path(again))["backend"] == stored["backend"]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
    on_torch = generate("--from", made, "--backend", "torch", "--out", str(tmp_path / "c"))  # given: it wins
    assert "backend" not in read_metadata(Path(on_torch)) and read_metadata(Path(on_torch))["dtype"] == "bfloat16"
