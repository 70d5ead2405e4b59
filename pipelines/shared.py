"""What pipelines sharing a denoiser share: the identity lives on the UNet or transformer it is
attached to (``OnDenoiser``), so every pipeline built around that model sees it, and
``from_pipe`` passes modules through by name (``shared_modules``)."""

from __future__ import annotations

from typing import Any

import torch

#: Where an identity's loaded parts are kept: on the UNet or transformer they are attached to.
_IDENTITY_RECORD = "_idgen_identity"


class OnDenoiser:
    """A pipeline attribute kept on the pipeline's denoiser (its UNet, else its transformer), not
    on the pipeline: every pipeline that shares the model sees the same loaded identity, including
    one made with ``from_pipe`` from a plain diffusers pipeline in between, so an identity is never
    lost with the pipeline object nor loaded twice into one model."""

    def __init__(self, default: Any = None):
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @staticmethod
    def model(pipe: Any) -> torch.nn.Module | None:
        model = getattr(pipe, "unet", None)
        if model is None:
            model = getattr(pipe, "transformer", None)
        return getattr(model, "_orig_mod", model)  # a torch.compile'd model: the record is on the model it wraps

    def __get__(self, pipe: Any, owner: type | None = None) -> Any:
        if pipe is None:
            return self
        record = getattr(self.model(pipe), _IDENTITY_RECORD, None)
        return self.default if record is None else record.get(self.name, self.default)

    def __set__(self, pipe: Any, value: Any) -> None:
        model = self.model(pipe)
        if model is None:
            raise RuntimeError("an identity is attached to the pipeline's UNet or transformer, and this pipeline has none")
        model.__dict__.setdefault(_IDENTITY_RECORD, {})[self.name] = value


def on_denoiser(default: Any = None) -> Any:
    """An ``OnDenoiser`` attribute, typed as what it holds: ``identity_adapter: IdentityAdapter |
    None = on_denoiser()`` reads as an ``IdentityAdapter | None`` on a pipeline."""
    return OnDenoiser(default)


def shared_modules(cls: type, pipeline: Any) -> dict[str, Any]:
    """``pipeline``'s modules that a ``cls`` pipeline takes, by name: diffusers' ``from_pipe`` drops
    a module whose class is not the one ``cls``'s signature names (a TAESD VAE, a subclassed UNet)
    and then refuses the pipeline; passed by name, it is kept."""
    expected, _ = cls._get_signature_keys(cls)
    return {name: module for name, module in pipeline.components.items() if name in expected}
