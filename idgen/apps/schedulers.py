"""diffusers' schedulers by the names people use for them (``--scheduler``).

``dpm++ 2m karras``, ``DPM++_2M_Karras`` and ``dpm++-2m-karras`` are one name; a diffusers
class name (``DPMSolverMultistepScheduler``) works too. A scheduler is built from the base
model's own scheduler config, so its training schedule (betas, prediction type) is kept and
only the sampling method changes.
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers

from idgen.errors import IDGenError

#: name -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "euler-trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),  # SDXL-Lightning
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++-2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++-2m-sde-karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),  # LCM-LoRA, DMD2
    "tcd": ("TCDScheduler", {}),
}
_ALIASES = {"euler-ancestral": "euler-a", "dpmpp-2m": "dpm++-2m", "dpmpp-2m-karras": "dpm++-2m-karras",
            "dpmpp-2m-sde-karras": "dpm++-2m-sde-karras", "lightning": "euler-trailing"}


def _normalise(name: str) -> str:
    return "-".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


def scheduler_spec(name: str) -> tuple[str, dict[str, Any]]:
    """The diffusers class and config overrides of ``name``; an IDGenError listing the names
    when there is no such scheduler."""
    key = _ALIASES.get(_normalise(name), _normalise(name))
    if key in SCHEDULERS:
        return SCHEDULERS[key]
    cls = getattr(diffusers, name.strip(), None) if name.strip().endswith("Scheduler") else None
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
        return cls.__name__, {}
    raise IDGenError(f"--scheduler {name!r} is not a scheduler idgen knows: use one of {', '.join(SCHEDULERS)}, "
                     "or a diffusers class name such as DPMSolverMultistepScheduler")


def make_scheduler(name: str, config: dict[str, Any]):
    """Scheduler ``name`` built from ``config`` (the base model's scheduler config)."""
    class_name, overrides = scheduler_spec(name)
    try:
        return getattr(diffusers, class_name).from_config(config, **overrides)
    except ImportError as err:  # e.g. a scheduler that needs torchsde
        raise IDGenError(f"--scheduler {name}: {str(err).strip()}") from None


def takes_timesteps(scheduler) -> bool:
    """Whether ``scheduler`` samples at custom timesteps (``timesteps=[999, 749, ...]``)."""
    return "timesteps" in inspect.signature(scheduler.set_timesteps).parameters
