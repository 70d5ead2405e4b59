"""The lifecycle of an identity adapter's own LoRA (FaceID's): fused into the UNet's weights or run
by peft as the adapter ``"faceid"``, kept apart from the user's LoRAs through diffusers' LoRA
methods, QKV fusion and saving (which writes the base model)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch

from idgen.adapters import (
    FusedLoRA,
    LoRALayers,
    peft_lora_state_dict,
)
from idgen.formats import ID_LORA_NAME


class _DropMessages(logging.Filter):
    """Drops log records containing any of ``fragments``: diffusers notices that do not apply."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


@contextlib.contextmanager
def quiet_lora_loading() -> Iterator[None]:
    """Drop notices that loading a LoRA beside the identity's gives and that ask nothing of the
    user: text encoders without LoRA keys (FaceID's and most speed LoRAs are UNet-only), peft's
    note that the UNet now holds several adapters, and diffusers' log of a failure it raises anyway."""
    drops = {"diffusers.loaders.lora_base": _DropMessages("No LoRA keys associated to CLIPText"),
             "diffusers.loaders.peft": _DropMessages("was unsuccessful with the following error")}
    for name, drop in drops.items():
        logging.getLogger(name).addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            yield
    finally:
        for name, drop in drops.items():
            logging.getLogger(name).removeFilter(drop)


#: Said once when a UNet that holds FaceID's fused LoRA runs outside an identity call.
FUSED_LORA_NOTICE = (
    "this UNet holds FaceID's LoRA, fused into its weights by load_identity_adapter, and runs here without an "
    "identity (a pipeline sharing it, or a direct call): that is not the base model; for the base model call "
    "unload_identity_adapter() on the idgen pipeline (loading again later costs a second)")



# ModelMixin.to(dtype=...) warns about modules "kept in float32" even when there are none.
logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropMessages("should be kept in float32: []"))


class IdentityLoRAMixin:
    """diffusers' LoRA, QKV-fusion and saving methods, kept true with FaceID's LoRA loaded."""

    _fused_id_lora: FusedLoRA | None  # set by the pipeline (an attribute of its denoiser)

    @property
    def _has_id_lora(self) -> bool:
        """Whether this pipeline's identity adapter has its LoRA loaded in the UNet."""
        return self._id_lora is not None and ID_LORA_NAME in getattr(self.unet, "peft_config", {})

    def _require_id_lora_unmerged(self, action: str) -> None:
        """Refuse ``action`` while fused projections hold the identity LoRA: taking the LoRA out
        then would leave it baked into the fused layers."""
        fused_projections = any(type(p).__name__.startswith("Fused") for p in self.unet.attn_processors.values())
        merged = self._id_lora is not None and (
            (self._fused_id_lora is not None and fused_projections)
            or any(ID_LORA_NAME in getattr(module, "merged_adapters", ()) for module in self.unet.modules())
        )
        if merged:
            raise RuntimeError(
                f"{action} needs the identity LoRA apart from the base weights, but fused projections hold it "
                "merged: call pipe.unfuse_qkv_projections() first"
            )

    def _user_lora_names(self) -> list[str]:
        return [name for name in getattr(self.unet, "peft_config", {}) if name != ID_LORA_NAME]

    def _load_id_lora(self, lora: LoRALayers) -> None:
        active = [name for name in self.get_active_adapters() if name != ID_LORA_NAME]
        if ID_LORA_NAME in getattr(self.unet, "peft_config", {}):
            self.delete_adapters(ID_LORA_NAME)
        with quiet_lora_loading():
            super().load_lora_weights(peft_lora_state_dict(lora), adapter_name=ID_LORA_NAME)
        super().set_adapters(active + [ID_LORA_NAME])

    def _unfuse_id_lora(self) -> None:
        """Move a fused identity LoRA into peft (original weights restored exactly)."""
        if self._fused_id_lora is None:
            return
        self._require_id_lora_unmerged("unfusing the identity LoRA")
        self._fused_id_lora.unfuse()
        self._fused_id_lora = None
        self._load_id_lora(self._id_lora)

    def load_lora_weights(self, *args, **kwargs) -> None:
        """diffusers' ``load_lora_weights``; a fused identity LoRA first moves into peft (exactly)
        and stays active beside the new one."""
        self._unfuse_id_lora()
        with quiet_lora_loading():
            super().load_lora_weights(*args, **kwargs)
        if self._has_id_lora and ID_LORA_NAME not in self.get_active_adapters():
            super().set_adapters([*self.get_active_adapters(), ID_LORA_NAME])

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: Any = None) -> None:
        """diffusers' ``set_adapters``; naming ``"faceid"`` weighs the identity LoRA (a fused one
        first moves into peft, exactly)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if ID_LORA_NAME in names:
            self._unfuse_id_lora()
        super().set_adapters(adapter_names, adapter_weights)

    def _remove_id_lora(self) -> None:
        """Delete the ``faceid`` peft adapter; with no other LoRA left, remove peft's wrappers
        so the UNet holds its original modules."""
        if not self._has_id_lora:
            return
        others = self._user_lora_names()
        if others:
            active = [name for name in self.get_active_adapters() if name != ID_LORA_NAME]
            self.delete_adapters(ID_LORA_NAME)
            self.set_adapters(active or others)
        else:
            self.unet.unload_lora()

    def unload_lora_weights(self) -> None:
        """diffusers' ``unload_lora_weights`` for the user's LoRAs; the identity adapter's own
        LoRA stays (``unload_identity_adapter`` removes it)."""
        if not self._has_id_lora:
            return super().unload_lora_weights()

        others = self._user_lora_names()
        if others:
            self.unet.delete_adapters(others)
        self.unet.set_adapters([ID_LORA_NAME])
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self, name, None) is not None:
                _remove_text_encoder_monkey_patch(getattr(self, name))

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """diffusers' fused projections. Fusing reads the base weights, so an identity LoRA in peft
        is merged into them first (peft would otherwise leave it out of the fused layers)."""
        if unet and self._has_id_lora:
            self.unet.fuse_lora(adapter_names=[ID_LORA_NAME])
        super().fuse_qkv_projections(unet=unet, vae=vae)

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        super().unfuse_qkv_projections(unet=unet, vae=vae)
        if unet and self._has_id_lora:
            self.unet.unfuse_lora()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' ``save_pretrained``, writing the base model: the identity adapter is not
        part of it (save its checkpoint separately) and its LoRA is taken out while saving."""
        if self._fused_id_lora is not None:
            self._require_id_lora_unmerged("save_pretrained")
            self._fused_id_lora.unfuse()
            try:
                return super().save_pretrained(save_directory, *args, **kwargs)
            finally:
                self._fused_id_lora = FusedLoRA(self.unet, self._id_lora)
        if not self._has_id_lora:
            return super().save_pretrained(save_directory, *args, **kwargs)
        if self._user_lora_names():
            raise RuntimeError(
                "save_pretrained would write peft's LoRA wrappers into the UNet: fuse your LoRA "
                "(pipe.fuse_lora(); pipe.unload_lora_weights()) or unload it before saving"
            )
        self._require_id_lora_unmerged("save_pretrained")
        self.unet.unload_lora()
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self._load_id_lora(self._id_lora)
