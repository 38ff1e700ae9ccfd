"""Sample images rendered during ``dalle finetune`` (``--sample-prompt``): the same prompts and seed at every
``--sample-every`` steps, so that the folders ``samples/step-NNNNNNN/`` show the training's progress."""

from __future__ import annotations

from pathlib import Path

from dallecli import __version__


def render_samples(pipe, prompts, seed: int, resolution: int, defaults: dict, folder: Path, step: int,
                   model_name: str) -> list[Path]:
    """Render one image per prompt with seed ``seed`` into ``folder/step-NNNNNNN/`` (PNG with metadata).

    The UNet and text encoder are put in eval mode for the rendering and back in their former mode after it.

    Args:
        pipe: the pipeline being trained.
        prompts: the sample prompts.
        seed: the generator seed of every image (a CPU generator).
        resolution: width and height in pixels.
        defaults: ``{"steps", "guidance"}`` to render with.
        folder: the samples folder (the step's folder is made in it).
        step: the training step, for the folder name and the metadata.
        model_name: the base model, for the metadata.

    Returns:
        The PNG files written, one per prompt, in prompt order.
    """
    import torch

    from dallecli.images import write_png

    target = folder / f"step-{step:07d}"
    was_training = pipe.unet.training, pipe.text_encoder.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    written = []
    try:
        for index, prompt in enumerate(prompts):
            with torch.no_grad():
                image = pipe(prompt, num_inference_steps=defaults["steps"], guidance_scale=defaults["guidance"],
                             width=resolution, height=resolution, output_type="pil",
                             generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            settings = {"prompt": prompt, "negative_prompt": None, "seed": seed, "steps": defaults["steps"],
                        "guidance_scale": float(defaults["guidance"]), "width": resolution, "height": resolution,
                        "model": model_name, "training_step": step, "version": __version__}
            written.append(write_png(image, target, settings, "Euler", index=index))
    finally:
        pipe.unet.train(was_training[0])
        pipe.text_encoder.train(was_training[1])
    return written
