"""The generation loop: one loaded pipeline, per-image seeds, NaN checks, progress through a callback."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from dallecli import __version__
from dallecli.engine import weighting
from dallecli.engine.device import float32_weight_bytes, resolve_device, resolve_dtype
from dallecli.engine.known_words import training_vocabulary, unknown_words
from dallecli.engine.loading import (check_vae_fits, derive_pipeline, load_fresh_pipeline, load_pipeline, load_vae,
                                     recorded_defaults, with_vae)
from dallecli.engine.memory import (MemoryChoice, activation_scale, apply_memory_mode, available_bytes, check_feasible,
                                    choose_low_memory, estimate_bytes, low_memory_floor_bytes, vae_can_tile)
from dallecli.engine.request import (RANDOM_SEED, GenerationRequest, ImageSettings, MAX_SEED, effective_steps,
                                     validate_request)
from dallecli.engine.schedulers import check_scheduler, check_steps, make_scheduler, scheduler_name, validate_scheduler
from dallecli.engine.failures import check_finite, out_of_memory
from dallecli.errors import ModelNotFoundError, UsageError, first_line
from dallecli.store.registry import PIPELINE_FAMILIES, defaults_for, tiny_decoder_for
from dallecli.store.resolve import ResolvedModel, resolve_lora, resolve_model, resolve_vae
from dallecli.weightfiles import component_class_name, default_size, pipeline_class_name, verify_safetensors

INPUTS_KEPT = 8  # init images (and masks) an engine keeps read: the requests being planned and run
StepCallback = Callable[[int, int], None]  # (steps done in this batch, steps per batch)


@dataclass(frozen=True)
class PromptCheck:
    """How a prompt fits the model: ``tokens`` counted without BOS/EOS, ``limit`` likewise; ``dropped`` is the
    text cut off (empty when it fits); ``unknown`` the words the model was not trained on (checked only for
    models that record their training words, such as the embedded one)."""

    tokens: int
    limit: int
    dropped: str = ""
    unknown: tuple[str, ...] = ()

    @property
    def truncated(self) -> bool:
        return self.tokens > self.limit

    def as_metadata(self) -> dict | None:
        if not self.truncated:
            return None
        return {"tokens": self.tokens, "kept": self.limit, "dropped": self.dropped}


@dataclass
class GeneratedImage:
    """One finished image: ``image`` is a PIL RGB image, ``settings`` what it was made with."""

    image: object
    settings: ImageSettings
    index: int
    warnings: list[str] = field(default_factory=list)


def random_seed() -> int:
    """A fresh seed in [0, 2**31) for runs without ``--seed``."""
    return random.SystemRandom().randrange(0, 2**31)


class Engine:
    """A model on a device, loaded on first use and kept for later requests.

    Args:
        model: alias, ``org/name`` repo id, local folder, or None for the embedded model.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (None = auto).
        dtype: "auto", "float32", "float16" or "bfloat16" (None = the device's policy:
            :func:`dallecli.engine.device.choose_dtype`).
        cache_dir: HF cache folder (default: ``HF_HUB_CACHE``), as given to ``dalle download --cache-dir``.
        vae: None (the model's own VAE, or in float16 the fp16-safe VAE its registry entry names, when
            downloaded), "full" (the model's own), "tiny" (the registry's tiny decoder for the model's family,
            e.g. ``taesd``: fast previews), or a registry alias, repo id or folder of a VAE.
        low_memory: True/False forces low-memory mode on/off; None decides per image size from the free
            memory (:meth:`memory`).
        revision: branch, tag or commit of a downloaded Hub model (``dalle download --revision``; default main).
        recorded_revision: the commit an image was made with (``--from``), used when downloaded and no
            ``revision`` is given (see :func:`dallecli.store.resolve.resolve_model`).
        kind: the registry kind a registered ``model`` must have: "pipeline" (text to image, the default) or
            "inpainting" (an inpainting variant, :meth:`for_task`); other kinds are refused in one line naming the
            command that uses them (``dalle upscale`` for an upscaler).
        backend: "torch" (None: the default) or "openvino": the UNet and VAE decoder run by OpenVINO on the CPU
            (:mod:`dallecli.engine.ov_backend`; the PyTorch parts load in float32 and ``dtype`` picks OpenVINO's
            precision, :func:`~dallecli.engine.ov_backend.choose_precision`).

    Attributes:
        notices: one-line notes for the user made while resolving (a renamed model, a VAE to download).

    Raises:
        ModelNotFoundError, DeviceUnavailableError, UsageError: at construction, before anything loads.
    """

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 cache_dir: Path | None = None, *, vae: str | None = None, low_memory: bool | None = None,
                 revision: str | None = None, recorded_revision: str | None = None, kind: str = "pipeline",
                 backend: str | None = None):
        self.model: ResolvedModel = resolve_model(model, cache_dir=cache_dir, revision=revision,
                                                  recorded_revision=recorded_revision, kind=kind)
        self.cache_dir = cache_dir  # also where registry LoRAs (``--lora NAME``) are looked up
        self.notices: list[str] = [self.model.notice] if self.model.notice else []
        self.device = resolve_device(device)
        self._single = None  # the detected single-file checkpoint (engine/single_file.py), read once
        self.weight_bytes = (self.single_file.float32_bytes if self.model.single_file else
                             float32_weight_bytes(self.model.path))
        from dallecli.engine import ov_backend

        self.backend = ov_backend.normalize_backend(backend)
        self.openvino_precision: str | None = None
        if self.backend != "torch":
            from dallecli.engine.device import cpu_bf16_kind, normalize_dtype

            ov_backend.check_backend(self.backend, self.device, self._layout()[0])
            self.openvino_precision = ov_backend.choose_precision(normalize_dtype(dtype) if dtype else None,
                                                                  cpu_bf16_kind())
            dtype = "float32"  # the parts PyTorch still runs (text encoder, VAE encoder) and what is converted
        self.dtype_choice = resolve_dtype(self.device, dtype, self.model.spec.dtype if self.model.spec else None)
        self.dtype = self.dtype_choice.dtype
        self.vae: ResolvedModel | None = self._resolve_vae(vae, cache_dir)
        if self.vae is not None:  # a VAE of another latent space is refused before anything loads
            check_vae_fits(self.model.path, self.vae.path, self.vae.name,
                           model_family=self.model.spec.family if self.model.spec else None,
                           vae_family=self.vae.spec.family if self.vae.spec else None)
        self.low_memory = low_memory
        self._memory: dict[tuple, MemoryChoice] = {}
        self._available: int | None = None
        self._pipe = None
        self._base_scheduler_config = None
        self._loras: tuple = ()  # (key, applied) of the LoRAs now in the pipeline
        self._task_pipes: dict[tuple, object] = {}  # (task class name, id of the loaded pipe) -> derived pipeline
        self._inputs: dict[tuple, object] = {}  # (image, mask, digests, task) -> engine.tasks.PreparedInputs
        self._inputs_lock = threading.Lock()
        self._schedulers_checked: set[tuple[str, int]] = set()  # (scheduler, steps) that check_scheduler passed
        self._weighting_noted = False  # the "passed verbatim" warning is given once per engine
        self._options = {"device": device, "dtype": dtype, "cache_dir": cache_dir, "vae": vae,
                         "low_memory": low_memory, "backend": backend}
        self.openvino = None  # what ov_backend.accelerate did, once loaded

    def _resolve_vae(self, vae: str | None, cache_dir: Path | None) -> ResolvedModel | None:
        """The VAE folder ``--vae`` names (None: the model's own), checked before anything loads.

        Raises:
            UsageError: ``tiny`` for a model family that has no tiny decoder in the registry.
            ModelNotFoundError: the VAE is not available locally.
        """
        spec = self.model.spec
        if vae in (None, "", "default") and spec is not None and spec.vae and self.dtype == "float16":
            # SDXL's own VAE overflows float16 (diffusers then decodes in float32: slower, more memory)
            try:
                return resolve_vae(spec.vae, cache_dir=cache_dir)
            except ModelNotFoundError:
                self.notices.append(f"{spec.vae} is not downloaded, so the VAE decodes in float32; "
                                    f"`dalle download {spec.vae}` makes float16 decoding safe and faster")
                return None
        if vae in (None, "", "full", "default"):
            return None
        if vae == "tiny":
            own = component_class_name(self.model.path / "vae")
            if own == "AutoencoderTiny":
                return None  # the model's own VAE is already a tiny one (the embedded model)
            family = PIPELINE_FAMILIES.get(self._layout()[0] or "") or (
                self.model.spec.family if self.model.spec else "stable-diffusion")
            spec = tiny_decoder_for(family)
            if spec is None:
                raise UsageError(f"--vae tiny: no tiny decoder for {family} models in the registry; use --vae full")
            vae = spec.alias
        return resolve_vae(vae, cache_dir=cache_dir)

    # -- model ---------------------------------------------------------------------------------------
    @property
    def pipe(self):
        """The loaded diffusers pipeline (loads it on first access)."""
        if self._pipe is None:
            variant = (self.model.spec.variant if self.model.spec else None) or "fp16"
            offload = any(c.low_memory for c in self._memory.values()) or bool(self.low_memory)
            if self.backend == "openvino":  # a copy of its own: its UNet and decoder weights are released
                pipe = load_fresh_pipeline(self.model.path, self.dtype, variant, cpu_threads=True)
            else:
                pipe = load_pipeline(self.model.path, self.device, self.dtype, variant, offload=offload)
            if self.vae is not None:
                pipe = with_vae(pipe, load_vae(self.vae.path, self.device, self.dtype), self.vae.name)
            if self.backend == "openvino":
                self.openvino = self._accelerate(pipe)
            self._base_scheduler_config = dict(pipe.scheduler.config)
            _give_text_model_path(pipe)
            self._pipe = pipe
        return self._pipe

    def _weight_files(self) -> list[Path]:
        """The weight files the UNet and VAE load from: the single file, or the ``.safetensors`` files of the
        folder's ``unet`` and ``vae`` (or ``--vae``'s folder)."""
        if self.model.single_file:
            return [self.model.path]
        vae_folder = self.vae.path if self.vae is not None else self.model.path / "vae"
        return sorted([*(self.model.path / "unet").glob("*.safetensors"), *vae_folder.glob("*.safetensors")])

    def _accelerate(self, pipe):
        """Hand the UNet and VAE decoder of ``pipe`` to OpenVINO (exported into dalle's cache once)."""
        import torch

        from dallecli.config import cache_dir
        from dallecli.engine import ov_backend
        from dallecli.weightfiles import file_digest

        digests = [file_digest(path) for path in self._weight_files()]
        return ov_backend.accelerate(pipe, digests, cache_dir(), dtype=self.dtype, precision=self.openvino_precision,
                                     threads=torch.get_num_threads())

    @property
    def loaded(self) -> bool:
        """Whether the pipeline is in memory (:attr:`pipe` loads it)."""
        return self._pipe is not None

    def unload(self) -> None:
        """Drop the loaded pipeline from this engine and the process cache (``dalle serve`` unloading an idle
        model) and give its memory back (a garbage collection; CUDA's cached blocks); :attr:`pipe` loads it
        again on next use."""
        import gc

        from dallecli.engine.loading import forget

        if self._pipe is not None:
            forget(self.model.path)
        self._pipe, self._loras = None, ()
        self._task_pipes.clear()  # they hold the same components
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def memory(self, width: int, height: int, images: int = 1, guidance: bool = True) -> MemoryChoice:
        """Whether a pass of ``images`` images of ``width`` x ``height`` pixels runs in low-memory mode.

        Decided once per shape: ``low_memory`` when given, else from the free memory on the device
        (read once, before the model loads) against :func:`dallecli.engine.memory.estimate_bytes`.
        """
        key = (width, height, images, bool(guidance))
        if key not in self._memory:
            if self._available is None:
                self._available = available_bytes(self.device)
            scale = activation_scale(self.model.path) if not self.model.single_file else 1.0
            shape = (self.weight_bytes or 0, self.dtype, width, height, images, guidance, scale)
            if self.low_memory is not False:  # a hopeless pass is refused before anything loads
                tiles = self.model.single_file or vae_can_tile(self.model.path)
                check_feasible(low_memory_floor_bytes(*shape, tiles=tiles), self._available, self.device, width,
                               height, images)
            needed = estimate_bytes(*shape) if self.low_memory is None else 0
            available = self._available if self.low_memory is None else None
            self._memory[key] = choose_low_memory(self.low_memory, needed, available, self.device, width, height)
        return self._memory[key]

    @property
    def single_file(self):
        """The :class:`dallecli.engine.single_file.SingleFile` of a single-file model (None for a folder)."""
        if self._single is None and self.model.single_file:
            from dallecli.engine.single_file import detect

            self._single = detect(self.model.path)
        return self._single

    def _layout(self) -> tuple[str | None, int | None]:
        """(pipeline class name, trained image size in pixels): from the folder's configs, or from the detected
        family of a single file."""
        if self.model.single_file:
            return self.single_file.pipeline_class, self.single_file.default_size
        return pipeline_class_name(self.model.path), default_size(self.model.path)

    def defaults(self) -> dict:
        """Generation defaults for this model: ``{"steps", "guidance", "width", "height"}``: its registry entry's,
        else those its folder records (a ``dalle finetune --full`` model keeps its base model's), else its
        family's."""
        recorded = None if self.model.spec is not None or self.model.single_file else recorded_defaults(self.model.path)
        return recorded or defaults_for(self.model.spec, *self._layout())

    def _vocabulary(self) -> tuple[frozenset[str], str] | None:
        """The model's training words and subject (:func:`dallecli.engine.known_words.training_vocabulary`)."""
        if not hasattr(self, "_known"):
            self._known = None if self.model.single_file else training_vocabulary(self.model.path)
        return self._known

    def check_prompt(self, prompt: str) -> PromptCheck:
        """Count the prompt's tokens against the text encoder's limit (``model_max_length``), and find the words
        a model that records its training words was never trained on. A weighted prompt is counted as the text
        encoder reads it, without its brackets and weights (:meth:`weighted_prompt`)."""
        vocabulary = self._vocabulary()
        unknown = tuple(unknown_words(prompt, vocabulary[0])) if vocabulary else ()
        tokenizer = getattr(self.pipe, "tokenizer", None)
        limit = getattr(tokenizer, "model_max_length", None)
        if tokenizer is None or not limit or limit > 100_000:
            return PromptCheck(0, 0, unknown=unknown)
        weighted = self.weighted_prompt(prompt)
        ids = tokenizer(weighted.text if weighted else prompt, truncation=False, add_special_tokens=True).input_ids
        tokens, kept = len(ids) - 2, limit - 2
        dropped = tokenizer.decode(ids[limit - 1:-1]) if tokens > kept else ""
        return PromptCheck(tokens, kept, dropped, unknown)

    def weighted_prompt(self, prompt: str | None):
        """How the text encoder reads ``prompt`` under AUTOMATIC1111's attention syntax (``(word:1.3)``,
        ``[word]``, ...): a :class:`dallecli.engine.weighting.WeightedPrompt`; None when the prompt has no such
        syntax or the loaded pipeline has no CLIP prompt encoding to weight (SD 3, FLUX, PixArt): it is then
        passed verbatim, brackets included."""
        if not weighting.has_weighting(prompt) or weighting.family(self.pipe) is None:
            return None
        return weighting.weigh(prompt, weighting.tokenizer_of(self.pipe))

    def _prompt_arguments(self, pipe, prompts: list[str], request: GenerationRequest) -> dict:
        """The ``__call__`` arguments that carry the prompts: the texts, or, when a prompt or the negative prompt
        is weighted (:meth:`weighted_prompt`), the weighted embeddings of
        :func:`dallecli.engine.weighting.prompt_arguments`. Plain prompts reach the pipeline exactly as before."""
        weighted = [self.weighted_prompt(p) for p in prompts]
        negative = self.weighted_prompt(request.negative_prompt)
        if not any(weighted) and negative is None:  # only when given: PixArt's default is "" and it fails on None
            given = {"negative_prompt": [request.negative_prompt] * len(prompts)} if request.negative_prompt else {}
            return {"prompt": prompts, **given}
        weighted = [w or weighting.WeightedPrompt(p, ()) for w, p in zip(weighted, prompts)]
        if negative is None and request.negative_prompt:
            negative = weighting.WeightedPrompt(request.negative_prompt, ())
        if all(w.plain for w in weighted) and (negative is None or negative.plain):  # escapes only: text will do
            return {"prompt": [w.text for w in weighted],
                    **({"negative_prompt": [negative.text] * len(prompts)} if negative is not None else {})}
        clip_skip = request.clip_skip - 1 if request.clip_skip and request.clip_skip > 1 else None
        return weighting.prompt_arguments(pipe, weighted, negative, guidance_scale=request.guidance_scale,
                                          clip_skip=clip_skip)

    # -- images in -----------------------------------------------------------------------------------
    def check_task(self, task: str) -> str | None:
        """Check from the model's pipeline class name (nothing loads) that it can run ``task`` ("txt2img",
        "img2img", "variation" or "inpaint"); returns the diffusers class that runs it.

        Raises:
            UsageError: "MODEL cannot do edit" (or variations, image to image).
        """
        from dallecli.engine.tasks import check_task

        return check_task(self.model.name, self._layout()[0], task)

    def for_task(self, task: str) -> Engine:
        """The engine to run ``task`` with: for "inpaint", an engine on the model's inpainting variant when its
        registry entry names one (``inpaint``) and it is downloaded; else this engine (the standard UNet
        inpaints by latent blending), with a note in :attr:`notices` when the variant exists but is not
        downloaded.

        Raises:
            UsageError: this model cannot run ``task`` (:meth:`check_task`).
        """
        variant = getattr(self.model.spec, "inpaint", None) if task == "inpaint" and self.model.spec else None
        if variant:
            try:
                engine = Engine(variant, kind="inpainting", **self._options)
            except ModelNotFoundError:
                self.notices.append(f"{variant}, the inpainting version of {self.model.name}, is not downloaded, so "
                                    f"{self.model.name} repaints with its own UNet (latent blending); "
                                    f"`dalle download {variant}` for edits that fit their surroundings better")
            else:
                engine.notices = self.notices + engine.notices
                engine.check_task(task)
                return engine
        self.check_task(task)
        return self

    def inputs(self, request: GenerationRequest):
        """The init image and mask of ``request``, read once per engine and checked
        (:func:`dallecli.engine.tasks.prepare_inputs`); None for text to image. A file changed on disk is read
        again.

        Raises:
            UsageError: see :func:`dallecli.engine.tasks.prepare_inputs`.
        """
        if request.image is None:
            return None
        from dallecli.engine.tasks import prepare_inputs

        def stamp(path):
            if not isinstance(path, (str, Path)):  # an Upload: its bytes are part of the key
                return None
            try:
                found = Path(path).stat()
                return found.st_mtime_ns, found.st_size
            except OSError:
                return None

        key = (request.image, stamp(request.image), request.mask, stamp(request.mask) if request.mask else None,
               request.image_sha256, request.mask_sha256, request.resolved_task, request.width, request.height,
               request.mask_alpha)
        with self._inputs_lock:  # a server plans requests in several threads while its worker runs
            found = self._inputs.get(key)
        if found is None:
            found = prepare_inputs(request)
            with self._inputs_lock:
                self._inputs[key] = found
                while len(self._inputs) > INPUTS_KEPT:  # a server sees a new upload per request: keep a few
                    self._inputs.pop(next(iter(self._inputs)))
        return found

    def _with_input_size(self, request: GenerationRequest) -> GenerationRequest:
        """Check the task and read the inputs; take the output size from the init image when none is given."""
        if request.image is None:
            return request
        from dallecli.engine.tasks import size_for

        self.check_task(request.resolved_task)
        width, height = size_for(request, self.inputs(request))
        return replace(request, width=width, height=height)

    def task_pipe(self, task: str):
        """The loaded pipeline turned into the one that runs ``task`` (its class's ``from_pipe``: the same
        components, no second load), kept for later requests; the loaded pipeline itself for "txt2img".

        Raises:
            UsageError: the model cannot run ``task``.
        """
        name = self.check_task(task)
        pipe = self.pipe
        if task == "txt2img" or name is None or type(pipe).__name__ == name:
            return pipe
        key = (name, id(pipe))
        if key not in self._task_pipes:
            import inspect

            import diffusers

            cls = getattr(diffusers, name)
            # passed explicitly: from_pipe drops a component whose class is not in the new class's type hints
            # (the embedded model's AutoencoderTiny for StableDiffusionImg2ImgPipeline), though it runs it fine
            accepted = inspect.signature(cls.__init__).parameters
            derived = derive_pipeline(cls, pipe, **{k: v for k, v in pipe.components.items() if k in accepted})
            derived.set_progress_bar_config(disable=True)
            self._task_pipes[key] = derived
        derived = self._task_pipes[key]
        derived.scheduler = pipe.scheduler  # --scheduler swaps the loaded pipeline's; follow it
        return derived

    # -- generation ----------------------------------------------------------------------------------
    def plan(self, request: GenerationRequest) -> tuple[GenerationRequest, list[int]]:
        """Validate, fill defaults (the model's; ``batch_size`` 1, so that each image is reproducible alone,
        bit for bit), and fix the seed of every image (image i gets seed + i).

        An init image (``request.image``) is read and checked here, before the model loads, and gives the size
        when the request has none (:func:`dallecli.engine.tasks.size_for`).

        Raises:
            UsageError: see :func:`dallecli.engine.request.validate_request`,
                :func:`dallecli.engine.tasks.prepare_inputs` and :meth:`check_task`.
        """
        validate_request(request)
        request = self._completed(request)
        for spec in request.loras:  # a LoRA that is missing, not downloaded or not safetensors fails before loading
            verify_safetensors(resolve_lora(spec.path, self.cache_dir)[0])
        seed = random_seed() if request.seed in (None, RANDOM_SEED) else request.seed
        request = replace(request, seed=seed, batch_size=request.batch_size or 1)
        return request, [(seed + i) % (MAX_SEED + 1) for i in range(request.num_images)]

    def _completed(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with the input image's size and the model's defaults filled in, checked by every rule that
        needs no weights (the request's ranges, the scheduler's name and plan, the clip skip), before anything loads.

        Raises:
            UsageError: see :meth:`plan`.
        """
        validate_scheduler(request.scheduler)
        if request.loras and self.backend == "openvino":
            raise UsageError("--lora runs with --backend torch only (OpenVINO runs the UNet as exported)")
        request = self._with_input_size(request)
        request = request.with_defaults(self.defaults())
        validate_request(request)
        self.check_scheduler(request.scheduler, request.steps)
        self.check_clip_skip(request.clip_skip)
        return request

    def scheduler_config(self) -> dict | None:
        """The model's own scheduler config, read from JSON alone (no weights): a folder's
        ``scheduler/scheduler_config.json``, or the shipped config of a single file's family; None when the
        folder has none or it cannot be read."""
        if self.model.single_file:
            from dallecli.engine.single_file import scheduler_config

            return scheduler_config(self.single_file)
        import json

        try:
            config = json.loads((self.model.path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return config if isinstance(config, dict) else None

    def check_scheduler(self, scheduler: str | None, steps: int) -> None:
        """Check, before the model loads (from its scheduler config alone), that ``scheduler`` (None or
        "default": the model's own) fits the model and plans ``steps`` denoising steps; a model without a
        readable scheduler config is checked once loaded. Remembered per (scheduler, steps).

        Raises:
            UsageError: see :func:`dallecli.engine.schedulers.check_scheduler`.
        """
        key = (scheduler or "default", steps)
        if key in self._schedulers_checked:
            return
        config = self.scheduler_config()
        if config is not None:
            check_scheduler(scheduler, config, steps)
        self._schedulers_checked.add(key)

    def _use_loras(self, loras) -> list[dict]:
        """Put exactly ``loras`` (LoraSpec, ...) into the pipeline (none: unload all); returns their metadata.

        Raises:
            LoraError, UnsafeWeightsError, CorruptWeightsError: see :func:`dallecli.engine.lora.apply_loras`.
        """
        files = [resolve_lora(s.path, self.cache_dir)[0] for s in loras]  # a path, or a registry name's file
        key = tuple((str(path.resolve()), path.stat().st_mtime_ns, float(s.scale)) for path, s in zip(files, loras))
        from dallecli.engine.lora import apply_loras, loaded_adapters

        # the loaded pipeline is shared by every Engine on the same model: trust what it holds, not a memo
        held = loaded_adapters(self.pipe)
        if not key and not held:
            return []
        if self._loras and self._loras[0] == key and len(held) == len(key):
            return [dict(entry) for entry in self._loras[1]]
        self._loras = ()
        applied = apply_loras(self.pipe, list(loras), cache_dir=self.cache_dir)
        self._loras = (key, applied) if key else ()
        return [dict(entry) for entry in applied]

    def check_clip_skip(self, clip_skip: int | None) -> None:
        """Check an AUTOMATIC1111 clip skip (1 = none, 2 = penultimate layer) against the model, from its configs
        alone (the pipeline class its ``model_index.json`` names, its text encoders' ``num_hidden_layers``), so
        that a value it cannot apply is refused before the model loads.

        Raises:
            UsageError: the pipeline's ``__call__`` takes no ``clip_skip``, or ``clip_skip`` would skip every layer
                of its text encoder(s).
        """
        if clip_skip is None or clip_skip == 1:
            return
        import inspect

        import diffusers

        class_name = self._layout()[0]
        cls = getattr(diffusers, class_name, None) if class_name and class_name.isidentifier() else None
        if isinstance(cls, type) and "clip_skip" not in inspect.signature(cls.__call__).parameters:
            raise UsageError(f"--clip-skip: {class_name} has no clip skip (it applies to CLIP text encoders of SD "
                             "1.x/2.x, SDXL and SD 3 pipelines); leave it out or use 1")
        encoders = self._text_encoder_configs()
        layers = [c["num_hidden_layers"] for c in encoders.values() if isinstance(c.get("num_hidden_layers"), int)]
        if not layers:
            return
        # SDXL and SD 3 (a second CLIP encoder) already read the penultimate layer: diffusers skips one more
        largest = min(layers) - (1 if "text_encoder_2" in encoders else 0)
        if clip_skip > largest:
            allowed = "1" if largest <= 1 else f"1 to {largest}"
            raise UsageError(f"--clip-skip {clip_skip} would skip every layer of this model's text encoder "
                             f"({min(layers)} layers); use {allowed}")

    def _text_encoder_configs(self) -> dict[str, dict]:
        """The configs of the model's ``text_encoder`` and ``text_encoder_2`` that it has (JSON, no weights)."""
        if self.model.single_file:
            overrides = self.single_file.overrides
            return {name: overrides[name] for name in ("text_encoder", "text_encoder_2") if name in overrides}
        import json

        found = {}
        for name in ("text_encoder", "text_encoder_2"):
            try:
                config = json.loads((self.model.path / name / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(config, dict):
                found[name] = config
        return found

    def _use_scheduler(self, name: str | None) -> str:
        pipe = self.pipe
        if name in (None, "default"):
            if type(pipe.scheduler).__name__ != self._base_scheduler_config["_class_name"]:
                import diffusers

                cls = getattr(diffusers, self._base_scheduler_config["_class_name"])
                pipe.scheduler = cls.from_config(self._base_scheduler_config)
        elif scheduler_name(pipe.scheduler) != name:
            pipe.scheduler = make_scheduler(name, self._base_scheduler_config)
        return scheduler_name(pipe.scheduler)

    def unknown_words_warning(self, words) -> str:
        """The warning for prompt words this model was not trained on (``words``: at most ten are named)."""
        words = list(words)
        shown = ", ".join(words[:10]) + (f" and {len(words) - 10} more" if len(words) > 10 else "")
        subject = (self._vocabulary() or (None, "a small set of captions"))[1]
        return (f"the {self.model.name} model was trained on {subject}; it does not know: {shown}. For real "
                "subjects use a real model (`dalle download sd-turbo`, then --model sd-turbo)")

    def prompt_warnings(self, request: GenerationRequest, name_unknown: bool = True) -> tuple[PromptCheck, list[str]]:
        """The check of ``request.prompt`` and the warnings to show for the request (at most one about words the
        model does not know (unless ``name_unknown`` is false: ``dalle batch`` sums them up once), one about
        truncation, one about a size at least twice or half the model's own in either dimension, one about a
        negative prompt that guidance <= 1 ignores, and the notes on an init image: a size rounded to multiples
        of 8, transparency used as the mask)."""
        check = self.check_prompt(request.prompt)
        warnings = []
        if check.unknown and name_unknown:
            warnings.append(self.unknown_words_warning(check.unknown))
        if check.truncated:  # the first few dropped words and their count: a long prompt must not flood stderr
            words = check.dropped.split()
            shown = " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
            warnings.append(f"prompt is {check.tokens} tokens; the text encoder keeps {check.limit}, dropped "
                            f"{len(words)} word(s): \"{shown}\" (the metadata records the truncation)")
        native = self.defaults()
        if request.width and request.height and any(
                max(asked, own) >= 2 * min(asked, own)
                for asked, own in ((request.width, native["width"]), (request.height, native["height"]))):
            advice = ("give --width/--height near it: the input image is resized to them" if request.image else
                      "leave out --width/--height for its own size")
            warnings.append(f"{request.width}x{request.height} is far from the {native['width']}x{native['height']} "
                            f"{self.model.name} was trained at: expect repeated or broken subjects, and a slow run "
                            f"({advice})")
        if not self._weighting_noted and any(weighting.has_weighting(text) and self.weighted_prompt(text) is None
                                             for text in (request.prompt, request.negative_prompt)):
            self._weighting_noted = True
            warnings.append(f"prompt weighting ((word:1.3), (word), [word]) is implemented for CLIP text encoders "
                            f"(SD 1.x/2.x, SDXL); {type(self.pipe).__name__} gets the prompt verbatim, brackets "
                            "included")
        if request.negative_prompt and request.guidance_scale is not None and request.guidance_scale <= 1:
            warnings.append(f"--negative-prompt has no effect with guidance {request.guidance_scale:g} "
                            "(classifier-free guidance needs a scale above 1)")
        inputs = self.inputs(request)
        if inputs is not None:
            warnings.extend(inputs.notes)
        return check, warnings

    def _task_call(self, request: GenerationRequest, count: int) -> tuple[object, dict]:
        """(pipeline, extra ``__call__`` arguments) for the request's task on ``count`` images.

        Image to image at strength 1.0 on a schedule that starts from pure noise (zero terminal SNR, as the
        embedded model's, or flow matching) runs the text-to-image pipeline: by construction x_T holds nothing of
        the input there, and diffusers' image-to-image pipeline differs from text to image only by rounding
        residue (it keeps ``alphas_cumprod[-1] = 2**-24``, so 2e-4 of the encoded image survives; a KL VAE also
        draws its latent sample from the generator before the noise). Measured on the embedded model: up to 4
        levels on 3% of pixels. So strength 1.0 equals text to image with the same seed, bit for bit, and the
        image records strength 1.0. On other schedules (SD 1.5's ends at SNR 0.0047) strength 1.0 keeps a trace
        of the input's colours, as in every diffusers-based tool, and runs the image-to-image pipeline.
        """
        import inspect

        task = request.resolved_task
        if task == "txt2img":
            return self.pipe, {"width": request.width, "height": request.height}
        inputs = self.inputs(request)
        image, mask = inputs.sized(request.width, request.height)
        if task != "inpaint" and request.strength >= 1.0:
            from dallecli.engine.tasks import ends_at_zero_snr

            if ends_at_zero_snr(self.pipe.scheduler):
                return self.pipe, {"width": request.width, "height": request.height}
        pipe = self.task_pipe(task)
        extra = {"image": [image] * count, "strength": request.strength}
        if task == "inpaint":
            extra["mask_image"] = [mask] * count
        accepted = inspect.signature(type(pipe).__call__).parameters
        extra.update({k: v for k, v in (("width", request.width), ("height", request.height)) if k in accepted})
        return pipe, extra

    def _run_pass(self, prompts: list[str], seeds: list[int], request: GenerationRequest,
                  on_step: StepCallback | None):
        """One forward pass: (B, 3, H, W) float images in [0, 1] for ``prompts`` and their ``seeds``; with an
        init image, through the task's pipeline (:meth:`_task_call`), before the unmasked pixels are put back.

        Raises:
            NonFiniteOutputError: NaN/Inf in the decoded images.
            OutOfMemoryError: the device ran out of memory.
        """
        import torch

        pipe, extra = self._task_call(request, len(prompts))
        steps = effective_steps(request) if "strength" in extra else request.steps  # what the pipeline runs
        apply_memory_mode(pipe, self.memory(request.width, request.height, len(prompts),
                                            request.guidance_scale > 1))
        def callback(_pipe, step_index, _timestep, kwargs):
            on_step(step_index + 1, steps)
            return kwargs

        try:
            with out_of_memory(out_of_memory_message(self.device, request, len(prompts))), torch.inference_mode():
                output = pipe(
                    **self._prompt_arguments(pipe, prompts, request),  # texts, or weighted embeddings
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    **extra,  # width and height; the init image, mask and strength of an image task
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                    output_type="pt",
                    callback_on_step_end=callback if on_step is not None else None,
                    # A1111's clip skip N is diffusers' N - 1; left out when off, for pipelines without it
                    **({"clip_skip": request.clip_skip - 1} if request.clip_skip and request.clip_skip > 1 else {}),
                )
        except ValueError as exc:  # diffusers' check_inputs and schedulers refuse a setting
            raise UsageError(f"{type(pipe).__name__} refused the request ({request.steps} steps, "
                             f"{request.width}x{request.height}, guidance {request.guidance_scale:g}): {first_line(exc)}") from exc
        images = output.images  # (B, 3, H, W) in [0, 1]
        check_finite(images, self.dtype, loras=True)
        return images

    @property
    def image_dtype(self) -> str:
        """The dtype the UNet and VAE decoder run in, as images and batch manifests record it: :attr:`dtype`, or
        under OpenVINO its precision as a dtype name ("bfloat16"/"float32"; the PyTorch parts stay float32), so
        that ``--from`` with the recorded backend and dtype replays the same pixels."""
        if self.openvino_precision is not None:
            from dallecli.engine.ov_backend import PRECISIONS

            return next(dtype for dtype, precision in PRECISIONS.items() if precision == self.openvino_precision)
        return self.dtype

    def _settings(self, prompt: str, seed: int, request: GenerationRequest, scheduler: str, loras: list[dict],
                  check: PromptCheck) -> ImageSettings:
        return ImageSettings(
            prompt=prompt, negative_prompt=request.negative_prompt, seed=seed, steps=request.steps,
            guidance_scale=float(request.guidance_scale), width=request.width, height=request.height,
            model=self.model.name, model_revision=self.model.revision, scheduler=scheduler, dtype=self.image_dtype,
            device=self.device, version=__version__, loras=loras, truncation=check.as_metadata(),
            vae=self.vae.name if self.vae is not None else None,
            clip_skip=request.clip_skip if request.clip_skip and request.clip_skip > 1 else None,
            unknown_words=list(check.unknown) or None,
            backend={"name": self.backend, "precision": self.openvino_precision} if self.openvino_precision else None,
            **self._input_settings(request),
        )

    def _input_settings(self, request: GenerationRequest) -> dict:
        """The task, init image, mask and strength an image records (nothing for text to image)."""
        inputs = self.inputs(request)
        if inputs is None:
            return {}
        return {"task": request.resolved_task, "strength": float(request.strength),
                "init_image": {"path": inputs.image.source, "sha256": inputs.image.sha256},
                "mask": {"path": inputs.mask.source, "sha256": inputs.mask.sha256} if inputs.mask else None}

    def _finish(self, image, request: GenerationRequest):
        """(3, H, W) decoded image -> PIL RGB; for inpainting, the pixels outside the mask are the input's own,
        exactly (:func:`dallecli.engine.tasks.paste_unmasked`)."""
        result = to_pil(image)
        if request.image is None or request.resolved_task != "inpaint":
            return result
        from dallecli.engine.tasks import paste_unmasked

        original, mask = self.inputs(request).sized(request.width, request.height)
        return paste_unmasked(result, original, mask)

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> Iterator[GeneratedImage]:
        """Make the requested images, yielding each as soon as its batch is decoded.

        Initial noise for image i comes from a CPU ``torch.Generator`` seeded with its own seed, so an image
        depends only on its settings and seed, not on ``num_images``. With the default ``batch_size`` of 1,
        image k of a run is bit-identical to a run of that image alone. A larger ``batch_size`` is faster but
        changes the summation order of the matrix products, which can move a pixel by one 8-bit level
        (0–255 scale) against another batch size; the same batch size is bit-identical.

        Args:
            request: the request; ``None`` fields take the model's defaults.
            on_step: progress callback ``(step, steps)`` after each denoising step of each batch.

        Yields:
            :class:`GeneratedImage` in order; ``warnings`` of the first one hold prompt warnings.

        Raises:
            UsageError: invalid request (before anything loads).
            NonFiniteOutputError: the decoded image holds NaN/Inf; nothing of that batch is yielded.
            OutOfMemoryError: the device ran out of memory.
            LoraError: a LoRA that cannot be applied or matches no layer.
        """
        request, seeds = self.plan(request)
        scheduler = self._use_scheduler(request.scheduler)
        check_steps(self.pipe.scheduler, request.steps)
        loras = self._use_loras(request.loras)
        check, warnings = self.prompt_warnings(request)
        batch_size = request.batch_size
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            images = self._run_pass([request.prompt] * len(chunk), chunk, request, on_step)
            for offset, seed in enumerate(chunk):
                index = start + offset
                settings = self._settings(request.prompt, seed, request, scheduler, loras, check)
                yield GeneratedImage(self._finish(images[offset], request), settings, index,
                                     warnings if index == 0 else [])

    def generate_items(self, items: list[tuple[str, int]], request: GenerationRequest,
                       on_step: StepCallback | None = None) -> list[GeneratedImage]:
        """Make one image per ``(prompt, seed)`` item in a single forward pass with shared settings.

        ``dalle batch`` uses this to put different prompts with identical settings into one batch. As in
        :meth:`generate`, image k's noise comes from a CPU ``torch.Generator`` seeded with its own seed.

        Args:
            items: ``(prompt, seed)`` pairs, one image each; seeds in [0, 2**32).
            request: the shared settings (negative prompt, steps, guidance, size, scheduler); its ``prompt``,
                ``num_images``, ``seed`` and ``batch_size`` are ignored; ``None`` fields take the model's defaults.
            on_step: progress callback ``(step, steps)`` after each denoising step.

        Returns:
            One :class:`GeneratedImage` per item, in order (``index`` = position in ``items``); ``warnings``
            hold that item's prompt warnings (words the model does not know are only in its settings'
            ``unknown_words``: :meth:`unknown_words_warning` words them once for a whole run).

        Raises:
            UsageError: no items, an empty prompt, a seed out of range or invalid settings (before anything loads).
            NonFiniteOutputError, OutOfMemoryError: as in :meth:`generate`; nothing of the pass is returned.
        """
        if not items:
            raise UsageError("generate_items needs at least one (prompt, seed) item")
        for prompt, seed in items:
            validate_request(replace(request, prompt=prompt, num_images=1, seed=seed))
        request = replace(request, prompt=items[0][0], num_images=len(items), seed=None, batch_size=None)
        request = self._completed(request)
        scheduler = self._use_scheduler(request.scheduler)
        check_steps(self.pipe.scheduler, request.steps)
        loras = self._use_loras(request.loras)
        prompts, seeds = [p for p, _ in items], [s for _, s in items]
        images = self._run_pass(prompts, seeds, request, on_step)
        results = []
        for index, (prompt, seed) in enumerate(items):
            check, warnings = self.prompt_warnings(replace(request, prompt=prompt, negative_prompt=None),
                                                   name_unknown=False)
            settings = self._settings(prompt, seed, request, scheduler, loras, check)
            results.append(GeneratedImage(self._finish(images[index], request), settings, index, warnings))
        return results


def _give_text_model_path(pipe) -> None:
    """diffusers' SD 1.x/2.x pipelines apply ``text_encoder.text_model.final_layer_norm`` to the layer a clip skip
    reads; transformers 5 flattened ``text_model`` into CLIPTextModel. A plain attribute (not a registered
    submodule: the weights and state dict are unchanged) gives them the path they read."""
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is not None and not hasattr(encoder, "text_model") and hasattr(encoder, "final_layer_norm"):
        from types import SimpleNamespace

        object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))


def to_pil(image):
    """(3, H, W) float tensor in [0, 1] -> PIL RGB image (rounded like diffusers' ``numpy_to_pil``)."""
    from PIL import Image

    array = (image.detach().float().cpu().permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    return Image.fromarray(array)


def out_of_memory_message(device: str, request: GenerationRequest, batch: int) -> str:
    """The one-line advice for an out-of-memory failure: what was asked for and what to lower."""
    half = ", or use --dtype float16" if device.startswith("cuda") else ""  # on a CPU float16 is slow and unsafe
    return (f"out of memory on {device} making {batch} image(s) of {request.width}x{request.height} at once; "
            f"lower --batch-size or -n, or the size (--width/--height){half}")
