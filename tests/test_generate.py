"""The engine on a tiny random pipeline: seeds, batching, guidance, truncation, NaN, schedulers.
Cases C01, C02, C04, C21, C22."""

from pathlib import Path

import numpy as np
import pytest

from dallecli.engine.generate import Engine
from dallecli.engine.request import GenerationRequest
from dallecli.engine.schedulers import SCHEDULERS, make_scheduler
from dallecli.errors import NonFiniteOutputError, UnsafeWeightsError, UsageError

SMALL = {"width": 32, "height": 32, "steps": 2}


def pixels(results):
    return [np.asarray(r.image, dtype=np.int16) for r in results]


def test_image_k_of_a_run_equals_a_single_run_with_its_seed_case_c04(tiny_pipeline):
    engine = Engine(str(tiny_pipeline))
    four = list(engine.generate(GenerationRequest("a red circle", num_images=4, seed=1, **SMALL)))
    assert [r.settings.seed for r in four] == [1, 2, 3, 4]
    alone = list(engine.generate(GenerationRequest("a red circle", num_images=1, seed=4, **SMALL)))
    assert np.array_equal(pixels(four)[3], pixels(alone)[0])  # the default batch size keeps this bit-exact
    assert not np.array_equal(pixels(four)[0], pixels(four)[1])  # seeds really differ


def test_batch_size_does_not_change_pixels(tiny_pipeline):
    engine = Engine(str(tiny_pipeline))
    batched = pixels(engine.generate(GenerationRequest("a cat", num_images=3, seed=10, batch_size=3, **SMALL)))
    single = pixels(engine.generate(GenerationRequest("a cat", num_images=3, seed=10, batch_size=1, **SMALL)))
    for a, b in zip(batched, single):
        assert np.abs(a - b).max() <= 1  # float summation order differs with batch shape; at most 1 level


def test_random_seed_is_drawn_and_recorded(tiny_pipeline):
    engine = Engine(str(tiny_pipeline))
    results = list(engine.generate(GenerationRequest("a cat", num_images=2, **SMALL)))
    assert results[1].settings.seed == results[0].settings.seed + 1
    again = list(engine.generate(GenerationRequest("a cat", seed=results[1].settings.seed, **SMALL)))
    assert np.array_equal(pixels(results)[1], pixels(again)[0])
    assert not np.array_equal(pixels(results)[0], pixels(again)[0])  # the recorded seed, not any seed


def test_guidance_zero_is_used_recorded_and_negative_prompt_warned_case_c21(tiny_pipeline):
    engine = Engine(str(tiny_pipeline))
    with_negative = list(engine.generate(GenerationRequest("a cat", negative_prompt="blur", guidance_scale=0,
                                                           seed=3, **SMALL)))
    plain = list(engine.generate(GenerationRequest("a cat", guidance_scale=0, seed=3, **SMALL)))
    guided = list(engine.generate(GenerationRequest("a cat", negative_prompt="blur", guidance_scale=7, seed=3,
                                                    **SMALL)))
    assert with_negative[0].settings.guidance_scale == 0.0
    assert any("no effect" in w for w in with_negative[0].warnings)
    assert np.array_equal(pixels(with_negative)[0], pixels(plain)[0])  # guidance off: negative prompt unused
    assert not np.array_equal(pixels(guided)[0], pixels(plain)[0])


def test_long_prompt_warns_once_and_records_truncation_case_c01(tiny_pipeline):
    engine = Engine(str(tiny_pipeline))
    results = list(engine.generate(GenerationRequest(" ".join(["cat"] * 100), num_images=2, seed=0, **SMALL)))
    warnings = [w for r in results for w in r.warnings]
    assert len(warnings) == 1
    assert "100 tokens" in warnings[0] and "keeps 75" in warnings[0]
    assert 'dropped 25 word(s): "cat cat cat cat cat cat cat cat ..."' in warnings[0]  # not all 25: no flood
    assert results[0].settings.truncation == {"tokens": 100, "kept": 75, "dropped": " ".join(["cat"] * 25)}
    short = list(engine.generate(GenerationRequest("a cat", seed=0, **SMALL)))
    assert short[0].warnings == [] and short[0].settings.truncation is None


@pytest.mark.parametrize(("dtype", "advice"), [("bfloat16", "--dtype float32"), ("float32", "weights may hold NaN")])
def test_nan_output_writes_nothing_and_names_the_fix_case_c02(tiny_pipeline, tmp_path, dtype, advice):
    # in a half precision the fix is float32; already in float32 that advice would be wrong
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_pipeline, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_out.bias"] = torch.full_like(state["decoder.conv_out.bias"], float("nan"))
    save_file(state, weights)
    with pytest.raises(NonFiniteOutputError, match=advice):
        list(Engine(str(broken), "cpu", dtype).generate(GenerationRequest("a cat", seed=0, **SMALL)))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("guidance_scale", float("nan"), "--guidance must be between 0 and 100"),
    ("guidance_scale", float("inf"), "--guidance must be between 0 and 100"),
    ("steps", 1001, "--steps must be between 1 and 1000"),
])
def test_out_of_range_steps_and_guidance_are_usage_errors(field, value, message):
    from dallecli.engine.request import validate_request

    with pytest.raises(UsageError, match=message):
        validate_request(GenerationRequest("a cat", **{field: value}))


@pytest.mark.parametrize("name", ["dpm++", "dpm++-karras", "euler", "euler-a", "unipc"])
def test_scheduler_ends_on_sigma_zero_case_c22(tiny_pipeline, name):
    """C22: DPM++ ending on sigma_min leaves noise in the image. A model's own config may ask for that
    (``final_sigmas_type: sigma_min``, as configs saved by older diffusers do): our names must override it."""
    import json

    config = json.loads((tiny_pipeline / "scheduler" / "scheduler_config.json").read_text())
    config["final_sigmas_type"] = "sigma_min"
    from diffusers import DPMSolverMultistepScheduler

    as_configured = DPMSolverMultistepScheduler.from_config(config)  # what the case looked like
    as_configured.set_timesteps(8)
    assert float(as_configured.sigmas[-1]) > 0.0
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(8)
    assert float(scheduler.sigmas[-1]) == 0.0
    assert len(scheduler.timesteps) == 8


def test_every_scheduler_generates(tiny_pipeline):
    engine = Engine(str(tiny_pipeline))
    for name in SCHEDULERS:
        result = next(engine.generate(GenerationRequest("a cat", seed=0, scheduler=name, **SMALL)))
        assert result.settings.scheduler == name
        assert result.image.size == (32, 32)


SHIPPED_SCHEDULER_CONFIGS = sorted(
    (Path(__file__).parents[1] / "src" / "dallecli" / "models").glob("**/scheduler/scheduler_config.json"))


@pytest.mark.parametrize("config_path", SHIPPED_SCHEDULER_CONFIGS,
                         ids=lambda p: p.parent.parent.name)
def test_no_supported_scheduler_runs_fewer_steps_than_asked(config_path):
    """#18 item 11: a scheduler that plans fewer denoising steps than ``--steps`` would make progress and the
    image's recorded ``steps`` wrong. Older diffusers did that (DPMSolverMultistepScheduler dropped repeated
    Karras timesteps with ``np.unique``); in diffusers 0.42.1 none of ours does, on any shipped model's schedule
    (embedded, SD 1.5, 2.1, 2.1-base, SDXL), for 1-60 steps and up to 1000: every step asked for is planned, at
    a distinct timestep, or the request is refused before anything runs (check_scheduler). If an upgrade brings
    it back, this names the scheduler, and the engine must then report the steps that ran."""
    import copy
    import json

    from dallecli.engine.schedulers import check_scheduler, scheduler_class

    config = json.loads(config_path.read_text())
    own = scheduler_class(config["_class_name"])
    for name in ["default", *SCHEDULERS]:
        for steps in [*range(1, 61), 100, 250, 500, 999, 1000]:
            try:
                check_scheduler(name, config, steps)
                scheduler = own.from_config(config) if name == "default" else make_scheduler(name, config)
                from dallecli.engine.schedulers import check_steps

                check_steps(scheduler, steps)
            except UsageError:
                continue  # refused before the model loads: nothing runs
            planned = copy.deepcopy(scheduler)
            planned.set_timesteps(steps)
            timesteps = [float(t) for t in planned.timesteps]
            assert len(timesteps) >= steps and len(set(timesteps)) >= steps, (name, steps, len(set(timesteps)))


def test_a_plan_that_repeats_a_timestep_is_refused_before_anything_loads(tiny_pipeline):
    """#18 item 11: DPM++ and UniPC at 1000 steps on SD 1.5's schedule plan timestep 500 twice (999 distinct);
    the solver divided by the zero step and the image came out NaN after the whole run. Refused up front."""
    import json

    from dallecli.engine.schedulers import check_scheduler

    sd15 = json.loads((SHIPPED_SCHEDULER_CONFIGS[0].parents[2] / "single_file" / "sd15" / "scheduler" /
                       "scheduler_config.json").read_text())
    for name in ("dpm++", "unipc"):
        with pytest.raises(UsageError, match=r"only 999 distinct timesteps.*use --steps 999 or another --scheduler"):
            check_scheduler(name, sd15, 1000)
        check_scheduler(name, sd15, 999)
    from dallecli.engine.schedulers import check_steps, scheduler_class

    check_steps(scheduler_class(sd15["_class_name"]).from_config(sd15), 1000)  # its own PNDM: 1000 distinct
    config = json.loads((tiny_pipeline / "scheduler" / "scheduler_config.json").read_text())
    if config.get("timestep_spacing", "leading") == "leading" and not config.get("rescale_betas_zero_snr"):
        engine = Engine(str(tiny_pipeline))
        with pytest.raises(UsageError, match="distinct timesteps"):
            engine.plan(GenerationRequest("a cat", scheduler="dpm++", **{**SMALL, "steps": 1000}))
        assert not engine.loaded


def test_progress_and_metadata_count_the_steps_that_ran(tiny_pipeline):
    """#18 item 11: each denoising step is one progress call, out of the recorded number of steps."""
    engine = Engine(str(tiny_pipeline))
    for name in SCHEDULERS:
        calls = []
        result = next(engine.generate(GenerationRequest("a cat", seed=0, scheduler=name, **{**SMALL, "steps": 3}),
                                      on_step=lambda step, total: calls.append((step, total))))
        assert calls == [(1, 3), (2, 3), (3, 3)] and result.settings.steps == 3, name
        assert len(engine.pipe.scheduler.timesteps) == 3, name


def test_pipeline_is_loaded_once_per_process(tiny_pipeline):
    first, second = Engine(str(tiny_pipeline)), Engine(str(tiny_pipeline))
    assert first.pipe is second.pipe


def test_defaults_come_from_the_model_folder(tiny_pipeline):
    engine = Engine(str(tiny_pipeline))
    request, seeds = engine.plan(GenerationRequest("a cat", seed=5, num_images=2))
    assert (request.width, request.height) == (32, 32)  # sample_size 16 x VAE factor 2
    assert seeds == [5, 6]


def test_pickle_only_model_is_refused(tiny_pipeline, tmp_path):
    import shutil

    folder = tmp_path / "pickles"
    shutil.copytree(tiny_pipeline, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UnsafeWeightsError, match="only pickle weights"):
        Engine(str(folder)).pipe


def test_bad_requests_are_usage_errors(tiny_pipeline):
    engine = Engine(str(tiny_pipeline))
    for bad in (GenerationRequest(""), GenerationRequest("x", width=30), GenerationRequest("x", num_images=0),
                GenerationRequest("x", steps=0), GenerationRequest("x", guidance_scale=-1),
                GenerationRequest("x", scheduler="heun2")):
        with pytest.raises(UsageError):
            list(engine.generate(bad))


@pytest.mark.parametrize("raised", ["cuda", "cpu"])
def test_out_of_memory_has_its_own_exit_code_and_says_what_to_lower_case_c12(tiny_pipeline, monkeypatch, raised):
    import torch

    from dallecli.errors import OutOfMemoryError

    engine = Engine(str(tiny_pipeline))

    def exhausted(*args, **kwargs):
        if raised == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        # what torch's CPU allocator raises (seen with --width 8192 --height 8192)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8796093022208 bytes")

    monkeypatch.setattr(type(engine.pipe), "__call__", exhausted)
    with pytest.raises(OutOfMemoryError) as info:
        list(engine.generate(GenerationRequest("a cat", num_images=3, batch_size=3, seed=0, **SMALL)))
    assert info.value.exit_code == 3
    message = str(info.value)
    assert "3 image(s) of 32x32" in message
    assert "--batch-size" in message and "-n" in message and "size" in message


@pytest.mark.parametrize("raised", ["cuda", "mps"])
def test_out_of_memory_while_the_model_moves_to_the_device_maps_as_generate_does(tiny_pipeline, monkeypatch, raised):
    """#18 leftovers: loading used its own mapping, which knew only torch.OutOfMemoryError (CUDA's); it now uses
    engine/failures.py's, so MPS's "MPS backend out of memory" RuntimeError is exit 3 too, with loading's message."""
    import diffusers
    import torch

    from dallecli.engine.loading import clear_cache, load_pipeline
    from dallecli.errors import OutOfMemoryError

    def exhausted(self, *args, **kwargs):
        if raised == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)")

    clear_cache()  # a pipeline cached by an earlier test would not be moved again
    monkeypatch.setattr(diffusers.DiffusionPipeline, "to", exhausted)
    with pytest.raises(OutOfMemoryError) as info:
        load_pipeline(tiny_pipeline, "cpu", "float32")
    assert info.value.exit_code == 3
    assert str(info.value) == "the model does not fit in cpu memory; try --low-memory or a smaller model"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_karras_spacing_is_refused_on_a_zero_terminal_snr_schedule():
    from dallecli.store.resolve import embedded_model_path
    import json

    config = json.loads((embedded_model_path() / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True
    with pytest.raises(UsageError, match="use dpm\\+\\+"):
        make_scheduler("dpm++-karras", config)
    make_scheduler("dpm++", config)  # the plain spacing works


def test_seed_minus_one_means_random_and_the_drawn_seed_is_recorded(tiny_pipeline, tmp_path):
    """AUTOMATIC1111 users type --seed -1 for a random seed (#19 item 9)."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from dallecli.cli.app import app

    made = CliRunner().invoke(app, ["generate", "a cat", "--seed", "-1", "-n", "2", "--model", str(tiny_pipeline),
                                    "--steps", "2", "--out", str(tmp_path / "g"), "--json"])
    assert made.exit_code == 0, made.output
    seeds = [image["seed"] for image in json.loads(made.stdout)["images"]]
    assert seeds[0] >= 0 and seeds[1] == seeds[0] + 1
    assert json.loads(Image.open(json.loads(made.stdout)["images"][0]["path"]).text["dalle"])["seed"] == seeds[0]
    (tmp_path / "p.txt").write_text("a cat\n")
    batch = CliRunner().invoke(app, ["batch", str(tmp_path / "p.txt"), "--seed", "-1", "--model", str(tiny_pipeline),
                                     "--steps", "2", "--out", str(tmp_path / "b")])
    assert batch.exit_code == 0, batch.output
    header = json.loads((tmp_path / "b" / "manifest.jsonl").read_text().splitlines()[0])
    assert header["base_seed"] >= 0
    bad = CliRunner().invoke(app, ["generate", "a cat", "--seed", "-2", "--model", str(tiny_pipeline)])
    assert bad.exit_code == 2 and "or -1 for a random seed" in bad.output
