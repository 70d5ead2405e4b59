"""No black images: a pipeline call that makes NaN or Inf stops with one line naming the step and
the part that made them, before any file is written (diffusers would turn them into black pixels)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from idgen.errors import IDGenError

_HOOK = "idgen_finite"
_FIX = ("its weights are damaged (a diverged training run, a bad download) or the numbers overflow "
        "(float16 on some models: try --dtype float32)")


class _FiniteOutput(ModelHook):
    """Raise when the wrapped module's output holds NaN or Inf."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if isinstance(tensor, torch.Tensor) and not bool(torch.isfinite(tensor).all()):
            raise IDGenError(f"the {self.what} made NaN or Inf values, which would be a black image: {_FIX}")
        return output


def finite_call(pipe: Any, **call: Any) -> Any:
    """``pipe(**call)``, stopped with an ``IDGenError`` as soon as the latents after a denoising step
    or the VAE's decoded image hold NaN or Inf (one check per step and one per decode)."""
    denoiser = "UNet" if getattr(pipe, "unet", None) is not None else "transformer"
    if call.get("callback_on_step_end") is not None:
        raise ValueError("finite_call checks the latents with its own callback_on_step_end: leave it out")

    def check_latents(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
        if not bool(torch.isfinite(tensors["latents"]).all()):
            raise IDGenError(f"the {denoiser} made NaN or Inf latents at step {step + 1} of {_pipe.num_timesteps}, "
                             f"which would be a black image: {_FIX}")
        return {}

    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    registry = HookRegistry.check_if_exists_or_initialize(decoder) if decoder is not None else None
    if registry is not None:
        registry.register_hook(_FiniteOutput("VAE decoder"), _HOOK)
    try:
        return pipe(**call, callback_on_step_end=check_latents)
    finally:
        if registry is not None:
            registry.remove_hook(_HOOK)
