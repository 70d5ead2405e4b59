"""What every idgen pipeline adds to its diffusers parent: loading an identity adapter,
turning face photos into ArcFace ``id_embeds`` and ``id_embeds`` into identity tokens."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from idgen.adapters import (
    AdapterSpec,
    FaceIDProjection,
    FusedLoRA,
    IdentityAdapter,
    InstantIDResampler,
    LoRALayers,
    build_identity_adapter,
    check_adapter,
    detect_format,
    faceid_lora_layers,
    holds_plain_weights,
    load_adapter_state_dict,
    resolve_checkpoint_file,
)
from idgen.adapters.attention import IdentityCall
from idgen.adapters.context import open_identity
from idgen.adapters.fusion import StreamFusion
from idgen.adapters.pulid import PULID_DEFAULTS
from idgen.adapters.regions import Regions
from idgen.errors import CheckpointError
from idgen.formats import formats_run_by, wrong_pipeline_message

from .face_inputs import IDScale, PuLIDInputMixin
from .id_lora import FUSED_LORA_NOTICE, IdentityLoRAMixin
from .id_tokens import IdentityTokensMixin
from .shared import on_denoiser, shared_modules

SDXL_CROSS_ATTENTION_DIM = 2048
#: PuLID's checkpoint formats (v1.1, v1).
PULID_FORMATS = tuple(PULID_DEFAULTS)
_NO_ENCODER = object()  # no FaceID-Plus image encoder to take out on unload




#: Short block names accepted in an ``id_scale`` dict.
_BLOCK_ALIASES = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


def layer_id_scales(names: Sequence[str], id_scale: IDScale, aliases: dict[str, str] = _BLOCK_ALIASES
                    ) -> dict[str, float]:
    """Scale of each identity layer from a float or a dict of name prefixes.

    Dict keys are ``aliases`` (the UNet's ``"down"``, ``"mid"``, ``"up"``) or any prefix of a layer
    name (``"up_blocks.1"``, ``"up_blocks.1.attentions.0"``, ...); the longest matching prefix wins,
    and layers no key matches get 0 (as diffusers' ``set_ip_adapter_scale`` does). Every value is
    finite and not negative (0 turns a layer's identity off; NaN would make a black image).
    """
    values = list(id_scale.values()) if isinstance(id_scale, dict) else [id_scale]
    if not all(math.isfinite(float(value)) and float(value) >= 0 for value in values):
        raise ValueError(f"id_scale={id_scale!r}: identity strengths are finite and not negative (0 turns it off)")
    if not isinstance(id_scale, dict):
        return {name: float(id_scale) for name in names}
    prefixes = {aliases.get(key, key): float(value) for key, value in id_scale.items()}
    for prefix in prefixes:
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            raise ValueError(
                f"id_scale key {prefix!r} matches no identity layer: use {', '.join(aliases)} or a layer prefix "
                f"such as {names[0].rsplit('.', 2)[0]}"
            )
    scales = {}
    for name in names:
        matches = [p for p in prefixes if name == p or name.startswith(p + ".")]
        scales[name] = prefixes[max(matches, key=len)] if matches else 0.0
    return scales


def id_window(step: int, total: int, start: float, end: float) -> bool:
    """Whether the identity acts at loop step ``step`` of ``total``: ``start <= step/total`` and
    ``(step+1)/total <= end`` (ControlNet's ``control_guidance_start/end`` rule)."""
    return not (step / total < start or (step + 1) / total > end)


class IdentityPipelineMixin(IdentityLoRAMixin, IdentityTokensMixin, PuLIDInputMixin):
    """Identity-adapter methods shared by the SD1.5 and SDXL pipelines.

    The adapter (projection + identity attention) lives beside the UNet and hooks into its
    cross-attention layers; it acts only inside this pipeline's own calls, so saving, other
    pipelines sharing the UNet, attention processors and the user's LoRAs see the base model.
    """

    #: Adapter formats this pipeline runs (the registry's rows for it).
    supported_adapter_formats: tuple[str, ...] = formats_run_by("IDStableDiffusionPipeline")
    identity_adapter: IdentityAdapter | None = on_denoiser()
    adapter_spec: AdapterSpec | None = on_denoiser()
    #: The identity adapter's own LoRA (FaceID), fused into the UNet's weights (``_fused_id_lora``)
    #: or run by peft as the adapter ``"faceid"``.
    _id_lora: LoRALayers | None = on_denoiser()
    _fused_id_lora: FusedLoRA | None = on_denoiser()
    #: The ``image_encoder`` before FaceID-Plus set its own (put back on unload).
    _image_encoder_before: Any = on_denoiser(_NO_ENCODER)

    @property
    def id_projection(self) -> FaceIDProjection | InstantIDResampler | None:
        """The loaded adapter's projection (ArcFace vector -> identity tokens), or None."""
        return None if self.identity_adapter is None else cast(FaceIDProjection | InstantIDResampler,
                                                                self.identity_adapter.projection)

    @property
    def identity_format(self) -> str | None:
        return None if self.adapter_spec is None else self.adapter_spec.format

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe``. The identity is the UNet's (``OnDenoiser``): the new pipeline has
        the one loaded into a UNet it shares, whatever pipelines came in between; it also takes
        ``pipeline``'s face analyzer."""
        new = super().from_pipe(pipeline, **{**shared_modules(cls, pipeline), **kwargs})
        if getattr(pipeline, "_face_analyzer", None) is not None:
            new._face_analyzer = pipeline._face_analyzer
        return new

    def to(self, *args: Any, **kwargs: Any):
        """diffusers' ``to``, PuLID's EVA tower and face parser going with the UNet (under CPU
        offload they are on the GPU only while they read the face)."""
        super().to(*args, **kwargs)
        if self.unet is not None:
            for module, dtype in ((self.eva_encoder, self.unet.dtype), (self.face_parser, None)):
                if module is not None:
                    module.to(self.unet.device, dtype)
        return self

    # ---------------------------------------------------------------- loading
    def load_identity_adapter(
        self,
        pretrained_model_name_or_path_or_file: str | os.PathLike | dict,
        weight_name: str | None = None,
        subfolder: str | None = None,
        fuse_lora: bool = True,
        image_encoder: Any = None,
        shortcut: bool | None = None,
        face_parser: Any = None,
        **hub_kwargs,
    ) -> None:
        """Load an identity adapter (e.g. ``h94/IP-Adapter-FaceID`` with
        ``weight_name="ip-adapter-faceid_sd15.bin"``) from a hub id, a folder, a file, or a
        state dict ``{"image_proj": ..., "ip_adapter": ...}`` already in memory (``weight_name``
        then names it: its file, for messages and the PlusV2 check).

        Hooks identity attention into every cross-attention layer. FaceID's LoRA is fused into
        the UNet's weights at its full strength, so steps cost what the base model's do; it is
        unfused exactly (the original weights come back) when you weigh it with
        ``set_adapters([..., "faceid"], [...])``, load another LoRA, save or unload, and from
        then on runs through peft as the adapter ``"faceid"``. ``fuse_lora=False`` keeps it in
        peft from the start (to train it); so do quantized UNet weights (torchao, bitsandbytes,
        GGUF), which take no sum. A previously loaded identity adapter is replaced.

        FaceID-Plus also loads CLIP ViT-H (``image_encoder``, default h94/IP-Adapter's) as the
        pipeline's ``image_encoder``; ``shortcut`` marks PlusV2 (default: "plusv2" in the file
        name, or an SDXL checkpoint: the keys do not tell).

        PuLID (v1.1 or v1) also loads EVA02-CLIP-L's vision tower (``image_encoder``: an
        ``EVAVisionTower``, its folder or an official file; default QuanSun/EVA-CLIP's) and
        facexlib's BiSeNet face parser (``face_parser``: a module or ``parsing_bisenet.pth``;
        default facexlib's release), as ``pipe.eva_encoder`` and ``pipe.face_parser``.
        """
        if isinstance(pretrained_model_name_or_path_or_file, dict):
            path, state_dict = weight_name or "the given state dict", pretrained_model_name_or_path_or_file
        else:
            path = resolve_checkpoint_file(pretrained_model_name_or_path_or_file, weight_name, subfolder, **hub_kwargs)
            state_dict = load_adapter_state_dict(path)
        spec = detect_format(state_dict, path)
        if spec.format not in self.supported_adapter_formats:
            raise CheckpointError(wrong_pipeline_message(spec.format, path, type(self).__name__))
        check_adapter(self.unet, state_dict, spec, path)
        encoder = pulid = None
        if spec.format in PULID_FORMATS:
            pulid = self._pulid_encoders(image_encoder, face_parser, self.unet.device, self.unet.dtype)
        elif image_encoder is not None and spec.format != "faceid_plus":
            raise ValueError(f"image_encoder= is FaceID-Plus's and PuLID's; {path} is a {spec.format} adapter: leave it out")
        if face_parser is not None and pulid is None:
            raise ValueError(f"face_parser= is PuLID's; {path} is a {spec.format} adapter: leave it out")
        if spec.format == "faceid_plus":
            encoder = self._face_image_encoder(image_encoder)
            if shortcut is None:
                sdxl = spec.cross_attention_dim == SDXL_CROSS_ATTENTION_DIM
                shortcut = "plusv2" in os.path.basename(path).lower() or sdxl

        adapter = build_identity_adapter(self.unet, state_dict, spec, path, bool(shortcut))
        lora = faceid_lora_layers(self.unet, state_dict) or None
        fuse_lora = fuse_lora and not self._user_lora_names() and (lora is None or holds_plain_weights(self.unet, lora))
        parts = _IdentityParts(adapter, spec, lora, encoder, pulid, fuse_lora)
        # Everything is built and checked; now the old identity goes and the new one comes in. A
        # failure on the way takes out what came in and puts the old identity back.
        before = self._identity_parts()
        if before is not None:
            self.unload_identity_adapter()
        try:
            self._install_identity(parts)
        except BaseException:
            self.unload_identity_adapter()
            if before is not None:
                self._install_identity(before)
            raise

    def _identity_parts(self) -> _IdentityParts | None:
        """The loaded identity, as ``_install_identity`` puts it in again (None without one)."""
        if self.identity_adapter is None:
            return None
        encoder = self.image_encoder if self._image_encoder_before is not _NO_ENCODER else None
        pulid = (self.eva_encoder, self.face_parser) if self.eva_encoder is not None else None
        return _IdentityParts(self.identity_adapter, cast(AdapterSpec, self.adapter_spec), self._id_lora, encoder, pulid,
                              self._fused_id_lora is not None)

    def _install_identity(self, parts: _IdentityParts) -> None:
        """Put a built identity into the pipeline and its UNet: the image encoders, the hooks, the
        LoRA (fused into the UNet's weights, or through peft)."""
        if parts.image_encoder is not None:  # unloading puts the pipeline's own image_encoder back
            self._image_encoder_before = getattr(self, "image_encoder", None)
            self.register_modules(image_encoder=parts.image_encoder)
        self.identity_adapter, self.adapter_spec = parts.adapter, parts.spec
        if parts.pulid is not None:
            self.eva_encoder, self.face_parser = parts.pulid
        parts.adapter.attach(self.unet)
        if parts.lora:
            self._id_lora = parts.lora
            if parts.fuse_lora:
                self._fused_id_lora = FusedLoRA(self.unet, parts.lora)
                parts.adapter.plain_notice = FUSED_LORA_NOTICE
            else:
                self._load_id_lora(parts.lora)

    def unload_identity_adapter(self) -> None:
        """Remove the identity adapter and its LoRA: the pipeline, and every pipeline sharing its
        UNet, is the base model again."""
        self._require_id_lora_unmerged("unload_identity_adapter")
        if self.identity_adapter is not None:
            self.identity_adapter.detach()
            self.identity_adapter.plain_notice = None
        if self._fused_id_lora is not None:
            self._fused_id_lora.unfuse()
        elif self._id_lora is not None:
            self._remove_id_lora()
        self.identity_adapter, self.adapter_spec, self._id_lora, self._fused_id_lora = None, None, None, None
        self.eva_encoder = self.face_parser = None
        if self._image_encoder_before is not _NO_ENCODER:  # FaceID-Plus's image encoder goes too
            self.register_modules(image_encoder=self._image_encoder_before)
            self._image_encoder_before = _NO_ENCODER

    # ---------------------------------------------------------------- calling
    @contextlib.contextmanager
    def identity_conditioning(
        self,
        tokens: torch.Tensor,
        negative_tokens: torch.Tensor,
        num_images_per_prompt: int = 1,
        id_scale: IDScale | None = None,
        id_guidance_start: float = 0.0,
        id_guidance_end: float = 1.0,
        loop: Any = None,
        regions: Regions | None = None,
        id_fusion: str | None = None,
        fusion_tokens: list[list[int]] | None = None,
        num_zero: int | None = None,
        ortho: str | None = None,
    ) -> Iterator[IdentityTokens]:
        """Condition the UNet on the identity for one generation call.

        ``tokens`` hold one row per prompt. At every UNet call the identity keys/values match
        its batch (classifier-free guidance or not, ``num_images_per_prompt`` copies), and the
        step window ``id_guidance_start/end`` is read off the pipeline's real schedule
        (``num_timesteps``), so custom ``timesteps=`` / ``sigmas=`` work. Outside the block the
        UNet is plain. With ``regions`` the tokens are several people's (``encode_people_tokens``),
        each acting in their region at every resolution of the UNet's latents. ``id_fusion`` runs
        the base stream beside (``idgen.adapters.fusion``; ``fusion_tokens``: FreeCure's attribute
        tokens per prompt row). ``num_zero`` and ``ortho``: PuLID's (``pulid_settings``).
        """
        num_zero, ortho = self.pulid_settings(num_zero, ortho)
        id_scale = self.default_id_scale(id_scale)
        if not 0.0 <= id_guidance_start < id_guidance_end <= 1.0:
            raise ValueError(
                f"need 0 <= id_guidance_start < id_guidance_end <= 1, got {id_guidance_start} and {id_guidance_end}"
            )
        adapter = self.identity_adapter
        if adapter is None:
            raise RuntimeError("no identity adapter is loaded: call pipe.load_identity_adapter(...) before generating")
        schedule = loop or self  # the pipeline whose loop runs (its num_timesteps)
        scales = layer_id_scales(adapter.names, id_scale)
        gates = {name: torch.tensor(scales[name], device=tokens.device) for name in adapter.names}
        batches = IdentityTokens(tokens, negative_tokens, num_images_per_prompt)
        progress: dict[str, Any] = {"step": 0, "shape": None, "on": True}

        def on_unet(args: tuple, kwargs: dict) -> None:
            sample = args[0] if args else kwargs["sample"]
            if progress["shape"] != sample.shape:
                weights = None if regions is None else regions.weights(
                    sample.shape[-2], sample.shape[-1], self.vae_scale_factor, sample.device)
                rows = batches.for_batch(sample.shape[0])
                if call.fusion is not None:  # the base stream, after the identity rows: no identity
                    rows = torch.cat([rows, torch.zeros_like(rows)])
                call.set_tokens(rows, gates, weights, num_zero, ortho)
                progress["shape"] = sample.shape
            on = id_window(progress["step"], max(schedule.num_timesteps, 1), id_guidance_start, id_guidance_end)
            if on != progress["on"]:
                for name, gate in gates.items():
                    gate.fill_(scales[name] if on else 0.0)
                progress["on"] = on
            progress["step"] += 1

        fusion = StreamFusion(self.unet, id_fusion, fusion_tokens) if id_fusion is not None else None
        call = IdentityCall(adapter, on_unet, fusion)
        adapter.attach(self.unet, fusion=fusion is not None)
        with open_identity(call):
            yield batches


@dataclass(frozen=True)
class _IdentityParts:
    """A built identity adapter with what comes with it, ready to go into a pipeline."""

    adapter: IdentityAdapter
    spec: AdapterSpec
    lora: LoRALayers | None
    image_encoder: Any
    pulid: tuple[Any, Any] | None
    fuse_lora: bool


class IdentityTokens:
    """Identity tokens of one call (one row per prompt), laid out for any batch the pipeline runs:
    ``B * n`` rows (no CFG) or ``2 * B * n`` (unconditional half first), prompt by prompt."""

    def __init__(self, tokens: torch.Tensor, negative_tokens: torch.Tensor, num_images_per_prompt: int):
        positive = tokens.repeat_interleave(num_images_per_prompt, dim=0)
        negative = negative_tokens.repeat_interleave(num_images_per_prompt, dim=0)
        self._by_batch = {len(positive): positive, 2 * len(positive): torch.cat([negative, positive])}

    def for_batch(self, batch: int) -> torch.Tensor:
        if batch not in self._by_batch:
            rows = min(self._by_batch)
            raise ValueError(f"the UNet runs a batch of {batch} but the call has {rows} identity rows")
        return self._by_batch[batch]
