"""Sampler names users type (``--scheduler``) mapped to diffusers scheduler classes and settings."""

from __future__ import annotations

from dallecli.errors import UsageError

# name -> (diffusers class, config overrides, AUTOMATIC1111 sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    # final_sigmas_type="zero": the last step lands on a clean image, not on sigma_min noise
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero",
                                              "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero",
                                                     "use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
FLOW_MATCHING = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


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


def validate_scheduler(name: str | None) -> None:
    """Raises UsageError for a name that is not in :data:`SCHEDULERS` (None and "default" are fine)."""
    if name not in (None, "default") and name not in SCHEDULERS:
        raise UsageError(f"unknown --scheduler '{name}'; choose one of default, {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, base_config):
    """A new scheduler ``name`` built from the model's own scheduler config (keeps its betas and
    prediction type).

    Raises:
        UsageError: unknown name, or a model whose flow-matching scheduler these samplers do not fit.
    """
    validate_scheduler(name)
    if base_config.get("_class_name") in FLOW_MATCHING:
        raise UsageError(f"--scheduler {name} does not fit this flow-matching model; leave --scheduler out")
    class_name, overrides, _ = SCHEDULERS[name]
    if overrides.get("use_karras_sigmas") and base_config.get("rescale_betas_zero_snr"):
        # Karras spacing needs a finite largest sigma; a zero-terminal-SNR schedule has an infinite one
        raise UsageError(f"--scheduler {name} does not fit this model's zero-terminal-SNR schedule; use dpm++")
    import diffusers

    return getattr(diffusers, class_name).from_config(base_config, **overrides)
