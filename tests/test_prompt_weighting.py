"""Issue 19 item 8: AUTOMATIC1111's attention syntax, ``(word:1.3)``, ``(word)``, ``[word]``, ``\\(``: parsed as A1111
parses it, applied to CLIP text encoder outputs with A1111's "Original" emphasis (weights, then the mean restored),
plain prompts untouched, the raw prompt recorded; other families get it verbatim with one warning."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from dallecli.engine.generate import Engine
from dallecli.engine.request import GenerationRequest
from dallecli.engine.weighting import WeightedPrompt, emphasize, has_weighting, parse_attention, prompt_arguments

SMALL = {"width": 32, "height": 32, "steps": 2, "seed": 3}


@pytest.mark.parametrize("text, chunks", [  # A1111's own doctest of parse_prompt_attention, value for value
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # and the rest of the rules
    ("(red:1.3) circle", [("red", 1.3), (" circle", 1.0)]),
    ("[red] circle", [("red", 1 / 1.1), (" circle", 1.0)]),
    ("[[red]]", [("red", 1 / 1.1 / 1.1)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("[(red:1.5)]", [("red", 1.5 / 1.1)]),
    ("( red : 0.5 )", [(" red ", 0.5)]),
    ("a red) circle]", [("a red) circle]", 1.0)]),  # closing with nothing open: text
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # not a number: text (A1111 raises)
    ("", [("", 1.0)]),
])
def test_parse_attention_matches_a1111(text, chunks):
    assert parse_attention(text) == chunks


def test_only_syntax_counts_as_weighting():
    assert not has_weighting("a red circle, 16:9, high quality")
    assert not has_weighting("") and not has_weighting(None)
    assert has_weighting("a (red) circle") and has_weighting("a \\(red\\) circle") and has_weighting("[red]")


def test_emphasis_weights_tokens_and_keeps_the_mean():
    import torch

    torch.manual_seed(0)
    embeds = torch.randn(2, 8, 6) + 0.5  # (B, T, D): BOS, 6 tokens at most, EOS
    weighted = emphasize(embeds, [(1.0, 1.5, 1.0), (1.0, 1.0, 1.0)])
    assert torch.allclose(weighted[0].mean(), embeds[0].mean(), atol=1e-6)
    ratio = weighted[0] / embeds[0]  # every feature of a token scaled alike; token 2 (position 2) by 1.5x more
    assert torch.allclose(ratio[2], 1.5 * ratio[1], atol=1e-5) and torch.allclose(ratio[1], ratio[7], atol=1e-5)
    assert torch.equal(weighted[1], embeds[1])  # all weights 1: untouched, bit for bit
    halves = emphasize(embeds, [(2.0,), (1.0,)], widths=[2, 4])  # SDXL: each encoder's part keeps its own mean
    assert torch.allclose(halves[0, :, :2].mean(), embeds[0, :, :2].mean(), atol=1e-6)
    assert torch.allclose(halves[0, :, 2:].mean(), embeds[0, :, 2:].mean(), atol=1e-6)
    long = emphasize(embeds, [(2.0,) * 20, (1.0,)])  # more tokens than the window: the rest were truncated
    assert long.shape == embeds.shape


def _image(engine, prompt, **extra):
    [result] = engine.generate(GenerationRequest(prompt, **{**SMALL, **extra}))
    return np.asarray(result.image, dtype=np.int16), result


def _with_trained_like_text_bias(engine) -> Engine:
    """The engine with its text encoder's final LayerNorm given a bias. A random init leaves that bias 0, so every
    embedding's mean over tokens and features is 0 up to rounding, and A1111's mean restoring (original mean /
    weighted mean) divides rounding noise by rounding noise: depending on the summation order (threads, load) the
    weighted embeddings came out all zero (CI) or moved the image by 2 levels or by 143. Trained CLIP encoders
    have a bias, and a mean well away from 0."""
    import torch

    with torch.no_grad():
        engine.pipe.text_encoder.text_model.final_layer_norm.bias.fill_(0.25)
    return engine


def test_weights_change_the_image_and_plain_prompts_do_not(tiny_pipeline):
    engine = _with_trained_like_text_bias(Engine(str(tiny_pipeline), "cpu", "float32"))
    plain, result = _image(engine, "a red circle on blue")
    called = {}
    original = engine._prompt_arguments

    def spy(pipe, prompts, request):
        called["arguments"] = original(pipe, prompts, request)
        return called["arguments"]

    engine._prompt_arguments = spy
    again, _ = _image(engine, "a red circle on blue")
    assert called["arguments"] == {"prompt": ["a red circle on blue"]}  # the text, exactly as before
    assert np.array_equal(plain, again)
    same, _ = _image(engine, "a (red:1.0) circle on blue")  # weight 1: the same image
    assert np.abs(same - plain).max() <= 1
    heavier, weighted = _image(engine, "a (red:3.0) circle on blue")
    assert set(called["arguments"]) == {"prompt_embeds", "negative_prompt_embeds"}
    assert np.abs(heavier - plain).max() > 2
    assert weighted.settings.prompt == "a (red:3.0) circle on blue" and not weighted.warnings  # the raw prompt
    heavier_embeds = called["arguments"]["prompt_embeds"]
    _image(engine, "a [red] circle on blue")
    # [red] weighs "red" by 1/1.1: other embeddings than (red:3.0) (two steps of a tiny random UNet at 32x32 can
    # round both to the same 8-bit pixels, depending on the thread count, so the embeddings are compared)
    assert not torch.equal(called["arguments"]["prompt_embeds"], heavier_embeds)
    skipped, _ = _image(engine, "a (red:3.0) circle on blue", clip_skip=2)  # weights on the penultimate layer
    assert not np.array_equal(skipped, heavier)
    negative, _ = _image(engine, "a red circle on blue", negative_prompt="a (green:2.0) square", guidance_scale=7.0)
    plain_negative, _ = _image(engine, "a red circle on blue", negative_prompt="a green square", guidance_scale=7.0)
    assert np.abs(negative - plain_negative).max() > 2


def test_ones_through_the_embedding_path_equal_the_text_path(tiny_pipeline):
    """The weighted path encodes with the pipeline's own ``encode_prompt`` (clip skip included): with every
    weight 1 it hands the pipeline exactly what the pipeline makes from the text."""
    import torch

    engine = Engine(str(tiny_pipeline), "cpu", "float32")
    pipe = engine.pipe
    assert hasattr(pipe.text_encoder, "text_model")  # loading gives transformers 5's CLIPTextModel diffusers' path
    prompt = WeightedPrompt("a red circle", (1.0, 1.0, 1.0))
    for clip_skip in (None, 1):
        arguments = prompt_arguments(pipe, [prompt], None, guidance_scale=4.0, clip_skip=clip_skip)
        common = dict(num_inference_steps=2, guidance_scale=4.0, width=32, height=32, output_type="np",
                      clip_skip=clip_skip)
        with torch.inference_mode():
            by_text = pipe(prompt=["a red circle"], generator=torch.Generator().manual_seed(1), **common).images
            by_embeds = pipe(**arguments, generator=torch.Generator().manual_seed(1), **common).images
        assert np.array_equal(by_text, by_embeds)


def test_weighted_batch_rows_equal_single_images_and_escapes_are_text(tiny_pipeline):
    engine = Engine(str(tiny_pipeline), "cpu", "float32")
    request = GenerationRequest("unused", width=32, height=32, steps=2)
    items = [("a (red:1.5) circle", 1), ("a blue square", 2), ("a \\(blue\\) square", 3)]
    batch = engine.generate_items(items, request)
    for (prompt, seed), result in zip(items, batch):
        alone, _ = _image(engine, prompt, seed=seed)
        assert np.abs(np.asarray(result.image, dtype=np.int16) - alone).max() <= 1
        assert result.settings.prompt == prompt
    assert engine.weighted_prompt("a \\(blue\\) square") == WeightedPrompt("a (blue) square", (1.0,) * 5)
    assert engine.check_prompt("(red:1.5)").tokens == 1  # counted as the encoder reads it


def test_families_without_weighting_get_the_prompt_verbatim_with_one_warning(tiny_pipeline):
    engine = Engine(str(tiny_pipeline), "cpu", "float32")

    class FluxPipeline:  # a family without CLIP-only prompt encoding, as the engine sees it
        tokenizer = engine.pipe.tokenizer

    engine._pipe = FluxPipeline()
    assert engine.weighted_prompt("a (red:1.3) circle") is None
    request = GenerationRequest("a (red:1.3) circle", width=32, height=32)
    _, first = engine.prompt_warnings(request)
    _, second = engine.prompt_warnings(request)
    assert [w for w in first if "verbatim" in w] == [
        "prompt weighting ((word:1.3), (word), [word]) is implemented for CLIP text encoders (SD 1.x/2.x, SDXL); "
        "FluxPipeline gets the prompt verbatim, brackets included"]
    assert not [w for w in second if "verbatim" in w]


def _tiny_sdxl(folder, tokenizer_folder):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_sdxl_two_encoders_are_weighted(tiny_pipeline, tmp_path):
    folder = _tiny_sdxl(tmp_path / "tiny-sdxl", tiny_pipeline / "tokenizer")
    engine = Engine(str(folder), "cpu", "float32")
    plain, _ = _image(engine, "a red circle", guidance_scale=5.0)
    same, _ = _image(engine, "a (red:1.0) circle", guidance_scale=5.0)
    heavier, result = _image(engine, "a (red:1.8) circle", negative_prompt="[blue]", guidance_scale=5.0)
    assert np.array_equal(plain, same)
    assert np.abs(heavier - plain).max() > 2 and not result.warnings
    unguided, _ = _image(engine, "a (red:1.8) circle", guidance_scale=1.0)  # no negative embeddings needed
    assert unguided.shape == plain.shape


def test_image_to_image_and_inpainting_take_weights_too(tiny_pipeline, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    engine = Engine(str(tiny_pipeline), "cpu", "float32")
    for extra in ({"strength": 0.8}, {"mask": str(tmp_path / "mask.png")}):
        inputs = {"image": str(tmp_path / "in.png"), **extra}
        plain, _ = _image(engine, "a red circle", **inputs)
        weighted, result = _image(engine, "a (red:1.8) circle", **inputs)
        assert not np.array_equal(plain, weighted) and result.settings.prompt == "a (red:1.8) circle"
