"""Sampler names users type (``--scheduler``) mapped to diffusers scheduler classes and settings.

``--scheduler`` takes one of the short names in :data:`SCHEDULERS` or the class name of any diffusers scheduler
(``PNDMScheduler``, ``FlowMatchEulerDiscreteScheduler``, ``LCMScheduler``, ...): an image records the short name
when its scheduler is one of ours and the class name otherwise, so every image replays with ``--from``.
"""

from __future__ import annotations

from dallecli.errors import UsageError, first_line

# name -> (diffusers class, config overrides, AUTOMATIC1111 sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    # final_sigmas_type="zero": the last step lands on a clean image, not on sigma_min noise (a model's own
    # config saved by an older diffusers may say "sigma_min"; our names override it)
    "euler": ("EulerDiscreteScheduler", {"final_sigmas_type": "zero"}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero",
                                              "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero",
                                                     "use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "unipc": ("UniPCMultistepScheduler", {"final_sigmas_type": "zero"}, "UniPC"),
    # Latent Consistency Models (arXiv 2310.04378): 2-8 steps with an LCM-distilled model or LCM-LoRA, guidance ~1
    "lcm": ("LCMScheduler", {}, "LCM"),
}
FLOW_MATCHING_PREFIXES = ("FlowMatch", "FlowMap")  # FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, ...


def is_flow_matching(class_name: str | None) -> bool:
    """Whether a scheduler class integrates a flow-matching (rectified-flow) model: SD 3, FLUX, ..."""
    return bool(class_name) and class_name.startswith(FLOW_MATCHING_PREFIXES)


def scheduler_name(scheduler) -> str:
    """Our name for a scheduler instance (its class name when it is not one of ours)."""
    cls = type(scheduler).__name__
    for name, (class_name, overrides, _) in SCHEDULERS.items():
        if class_name == cls and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
    return cls


def a1111_sampler(name: str) -> str:
    """The AUTOMATIC1111 spelling of a sampler name, for the ``parameters`` text chunk."""
    return SCHEDULERS[name][2] if name in SCHEDULERS else name


def from_a1111_sampler(sampler: str | None) -> str | None:
    """Our scheduler name for an AUTOMATIC1111 ``Sampler:`` value ("DPM++ 2M Karras" -> "dpm++-karras"; a
    diffusers class name as written by dalle stays), or None when it has no equivalent here."""
    if not sampler:
        return None
    found = next((name for name, (_, _, a1111) in SCHEDULERS.items() if a1111.lower() == sampler.strip().lower()), None)
    return found or (sampler.strip() if sampler.strip().endswith("Scheduler") else None)


def scheduler_class(name: str):
    """The diffusers scheduler class for a short name or a class name, or None when there is none."""
    class_name = SCHEDULERS[name][0] if name in SCHEDULERS else name
    if not class_name.endswith("Scheduler") or not class_name.isidentifier():
        return None
    import diffusers

    cls = getattr(diffusers, class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) else None


def check_scheduler_name(name: str | None, source: str = "--scheduler") -> None:
    """Check a scheduler name without importing diffusers: None, "default", a name in :data:`SCHEDULERS`, or
    text shaped like a scheduler class name (``...Scheduler``; :func:`validate_scheduler` looks it up).

    Raises:
        UsageError: any other value; the message names ``source`` (``--scheduler``, ``DALLE_SCHEDULER``, ...).
    """
    if name in (None, "default") or name in SCHEDULERS or (name.endswith("Scheduler") and name.isidentifier()):
        return
    raise UsageError(f"unknown {source} '{name}'; choose one of default, {', '.join(SCHEDULERS)}, "
                     "or a diffusers scheduler class name such as PNDMScheduler")


def validate_scheduler(name: str | None, source: str = "--scheduler") -> None:
    """Check a ``--scheduler`` value: None, "default", a name in :data:`SCHEDULERS` or a diffusers scheduler
    class name (the latter imports diffusers to look it up).

    Args:
        name: the value.
        source: where it came from, for the error (``--scheduler``, ``DALLE_SCHEDULER``, the config file's key).

    Raises:
        UsageError: any other value.
    """
    check_scheduler_name(name, source)
    if name in (None, "default") or name in SCHEDULERS:
        return
    if scheduler_class(name) is None:
        raise UsageError(f"unknown {source} '{name}'; choose one of default, {', '.join(SCHEDULERS)}, "
                         "or a diffusers scheduler class name such as PNDMScheduler")


def make_scheduler(name: str, base_config):
    """A new scheduler ``name`` (short name or class name) built from the model's own scheduler config (keeps
    its betas, timestep spacing and prediction type); the model's own class name gives its own scheduler back.

    Raises:
        UsageError: unknown name, or a flow-matching scheduler for a diffusion model or the reverse.
    """
    validate_scheduler(name)
    cls = scheduler_class(name)
    overrides = SCHEDULERS[name][1] if name in SCHEDULERS else {}
    flow_model = is_flow_matching(base_config.get("_class_name"))
    if flow_model != is_flow_matching(cls.__name__):
        kind = "flow-matching" if flow_model else "diffusion (noise-prediction)"
        raise UsageError(f"--scheduler {name} does not fit this {kind} model; leave --scheduler out")
    if overrides.get("use_karras_sigmas") and base_config.get("rescale_betas_zero_snr"):
        # Karras spacing needs a finite largest sigma; a zero-terminal-SNR schedule has an infinite one
        raise UsageError(f"--scheduler {name} does not fit this model's zero-terminal-SNR schedule; use dpm++")
    try:
        return cls.from_config(base_config, **overrides)
    except (TypeError, ValueError, NotImplementedError) as exc:  # a scheduler for another kind of model
        raise UsageError(f"--scheduler {name} cannot be built from this model's scheduler settings "
                         f"({first_line(exc)})") from None


def check_scheduler(name: str | None, base_config: dict, steps: int) -> None:
    """Check, from the model's scheduler config alone (no weights loaded), that ``--scheduler name`` can be
    built for it and plans ``steps`` distinct timesteps.

    Karras sigmas on a cosine (``squaredcos_cap_v2``) schedule plan the same timestep many times over (its
    largest sigma is huge, so the spacing piles up at the top: 25 steps give 14 distinct timesteps), which
    diffusers' multistep solvers do not survive (public report); it is refused here as the zero-terminal-SNR
    case is in :func:`make_scheduler`.

    ``name`` None or "default" checks the model's own scheduler (built from ``base_config`` as the loaded
    pipeline builds it), except one that shifts its timesteps by the image size (``use_dynamic_shifting``: the
    pipeline passes its ``mu`` at run time), which :meth:`~dallecli.engine.generate.Engine.generate` checks once
    loaded.

    Raises:
        UsageError: the scheduler does not fit the model (see :func:`make_scheduler`), cannot plan ``steps``
            (:func:`check_steps`), or would repeat timesteps.
    """
    if name in (None, "default"):
        own = scheduler_class(base_config.get("_class_name") or "")
        if own is not None and not base_config.get("use_dynamic_shifting"):
            check_steps(own.from_config(base_config), steps)
        return
    scheduler = make_scheduler(name, base_config)
    sigma_spacing = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    if any(scheduler.config.get(key) for key in sigma_spacing):  # respaced sigmas can collapse: say why
        distinct = distinct_timesteps(scheduler, steps)
        if distinct is not None and distinct < steps:
            instead = name.removesuffix("-karras") if name.endswith("-karras") else "another --scheduler"
            raise UsageError(f"--scheduler {name} plans only {distinct} distinct timesteps of {steps} on this "
                             f"model's {base_config.get('beta_schedule', '')} noise schedule; use {instead}")
    check_steps(scheduler, steps)


def distinct_timesteps(scheduler, steps: int) -> int | None:
    """How many different timesteps ``scheduler`` plans for ``steps`` (on a copy); None when it cannot plan them."""
    import copy

    planned = copy.deepcopy(scheduler)
    try:
        planned.set_timesteps(steps)
    except (ValueError, IndexError, ZeroDivisionError):
        return None
    return len({float(t) for t in planned.timesteps})


def check_steps(scheduler, steps: int) -> None:
    """Check that ``scheduler`` can plan ``steps`` denoising steps, each at its own timestep (on a copy; the
    scheduler is not changed), so that every step asked for runs and the image records how many did.

    Some cannot: PNDM with its Runge-Kutta warm-up (``skip_prk_steps`` false) fails below 4 steps with a numpy
    broadcasting error deep inside diffusers. Some plan a timestep twice, which leaves fewer distinct steps
    than asked and breaks the multistep solvers (a zero step size: NaN): in diffusers 0.42.1, DPM++ and UniPC
    at 1000 steps (and only there, of 1-1000) plan timestep 500 twice on SD 1.5's and 2.x's schedules (999
    distinct) and one timestep 1000 times on SDXL's ``leading`` spacing.
    Schedulers that repeat timesteps by design (PNDM's warm-up, Heun's and KDPM2's second stages) still plan
    at least ``steps`` distinct ones. No supported scheduler plans fewer timesteps than asked
    (``tests/test_generate.py`` guards it).

    Raises:
        UsageError: naming the scheduler, the steps asked for and what to do.
    """
    distinct = distinct_timesteps(scheduler, steps)
    name = type(scheduler).__name__
    if distinct is not None and distinct < steps:
        fewer = next((n for n in range(steps - 1, max(0, steps - 100), -1)  # the nearest count that fits
                      if (distinct_timesteps(scheduler, n) or 0) >= n), None)
        instead = f"use --steps {fewer} or another --scheduler" if fewer else "use another --scheduler"
        raise UsageError(f"--steps {steps} makes the {name} scheduler plan only {distinct} distinct timesteps on "
                         f"this model's schedule (a repeated timestep breaks the solver); {instead}")
    if distinct is not None:
        return

    def plans(n: int) -> bool:
        return distinct_timesteps(scheduler, n) is not None

    least = next((n for n in range(steps + 1, 51) if plans(n)), None)
    need = f"it needs at least {least}" if least else "it cannot plan that many"
    raise UsageError(f"--steps {steps} does not fit the {name} scheduler ({need}); use more steps or another "
                     "--scheduler")
