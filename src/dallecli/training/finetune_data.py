"""The training set of ``dalle finetune``, encoded once before the loop: every image loaded, converted, cropped
(and, with ``flip``, mirrored), passed through the frozen VAE; every caption tokenized and, when the text
encoder is frozen, encoded. The training loop then never runs the VAE or a frozen text encoder."""

from __future__ import annotations

import random

from dallecli.training.dataset import FolderScan
from dallecli.training.finetune_config import FinetuneConfig

VAE_BATCH = 8  # images per VAE encode
TEXT_BATCH = 16  # captions per text-encoder call


def encode_examples(pipe, scan: FolderScan, config: FinetuneConfig, resolution: int, device, cache_text: bool):
    """Load every image of ``scan`` once and encode it with ``pipe``'s VAE, and tokenize (and with ``cache_text``
    encode) its caption; the VAE and text encoder are moved to ``device`` for it and the VAE back to the CPU.

    Random crops (``config.center_crop`` off) are drawn once per image from ``config.seed``; with
    ``config.flip`` every image is followed by its mirror image, with the same caption. A missing caption is
    the empty caption.

    Args:
        pipe: the pipeline (``vae``, ``tokenizer``, ``text_encoder``).
        scan: the checked data folder.
        config: the run's options (``seed``, ``center_crop``, ``flip``).
        resolution: the square training size in pixels, a multiple of 8.
        device: where to run the encoders (a torch device or its name).
        cache_text: also run the (frozen) text encoder on the captions.

    Returns:
        A :class:`~dallecli.training.trainer.EncodedData`: latents (N, C, h, w) float32 scaled by the VAE's
        ``scaling_factor``, token ids (N, L), the empty caption's ids (L,), and with ``cache_text`` the hidden
        states (N, L, D) and the empty caption's (L, D); N is the number of images, doubled with ``flip``.

    Raises:
        OSError: an image that changed or went away since the folder was scanned (PIL's own errors).
    """
    import torch
    from PIL import Image

    from dallecli.engine.inputs import load_rgb
    from dallecli.training.dataset import image_tensor, resize_and_crop
    from dallecli.training.trainer import EncodedData

    rng = random.Random(config.seed)
    pixels, captions = [], []
    for example in scan.examples:
        image = resize_and_crop(load_rgb(example.path), resolution, config.center_crop, rng)
        variants = [image] + ([image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if config.flip else [])
        for variant in variants:
            pixels.append(image_tensor(variant))  # (3, H, W) in [-1, 1]
            captions.append(example.caption or "")
    vae, tokenizer, text_encoder = pipe.vae, pipe.tokenizer, pipe.text_encoder
    vae.to(device)
    scaling = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    chunks = []
    with torch.no_grad():
        for batch in torch.stack(pixels).split(VAE_BATCH):  # (b, 3, H, W)
            encoded = vae.encode(batch.to(device))
            latent = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
            chunks.append((latent * scaling).float().cpu())
    latents = torch.cat(chunks)  # (N, C, H/f, W/f)
    vae.to("cpu")
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else 77
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt").input_ids  # (N, L)
    empty = tokenizer([""], padding="max_length", max_length=max_length, return_tensors="pt").input_ids[0]  # (L,)
    hidden = empty_hidden = None
    if cache_text:
        text_encoder.to(device)
        with torch.no_grad():
            hidden = torch.cat([text_encoder(b.to(device))[0].float().cpu()
                                for b in ids.split(TEXT_BATCH)])  # (N, L, D)
            empty_hidden = text_encoder(empty[None].to(device))[0][0].float().cpu()  # (L, D)
    return EncodedData(latents=latents, input_ids=ids, empty_ids=empty, hidden_states=hidden,
                       empty_hidden=empty_hidden)
