"""What every idgen pipeline adds to its diffusers parent: loading an identity adapter,
turning face photos into ArcFace ``id_embeds`` and ``id_embeds`` into identity tokens."""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch

from idgen.adapters import (
    AdapterSpec,
    FaceIDProjection,
    IDAttnProcessor,
    InstantIDResampler,
    build_processors,
    build_projection,
    check_adapter,
    detect_format,
    faceid_lora_state_dict,
    load_adapter_state_dict,
    resolve_checkpoint_file,
)
from idgen.errors import CheckpointError
from idgen.faces import FaceAnalyzer
from idgen.images import ImageInput

FaceImages = Union[ImageInput, Sequence[ImageInput], Sequence[Sequence[ImageInput]]]

#: Name of the peft adapter that holds an identity adapter's own LoRA (FaceID).
ID_LORA_NAME = "faceid"


IDScale = Union[float, dict]

#: Short block names accepted in an ``id_scale`` dict.
_BLOCK_ALIASES = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


def layer_id_scales(names: Sequence[str], id_scale: IDScale) -> dict[str, float]:
    """Scale of each identity layer from a float or a dict of name prefixes.

    Dict keys are ``"down"``, ``"mid"``, ``"up"`` or any prefix of a layer name
    (``"up_blocks.1"``, ``"up_blocks.1.attentions.0"``, ...); the longest matching prefix wins,
    and layers no key matches get 0 (as diffusers' ``set_ip_adapter_scale`` does).
    """
    if not isinstance(id_scale, dict):
        return {name: float(id_scale) for name in names}
    prefixes = {_BLOCK_ALIASES.get(key, key): float(value) for key, value in id_scale.items()}
    for prefix in prefixes:
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            raise ValueError(
                f"id_scale key {prefix!r} matches no identity layer: use down, mid, up or a layer prefix "
                f"such as {names[0].rsplit('.', 2)[0]}"
            )
    scales = {}
    for name in names:
        matches = [p for p in prefixes if name == p or name.startswith(p + ".")]
        scales[name] = prefixes[max(matches, key=len)] if matches else 0.0
    return scales


class FaceInputMixin:
    """Face photos -> ArcFace ``id_embeds``: shared by every idgen pipeline."""

    _face_analyzer: FaceAnalyzer | None = None
    #: Whether identities from photos keep the recognizer's raw scale (InstantID) or unit norm.
    raw_id_embeds: bool = False

    @property
    def face_analyzer(self) -> FaceAnalyzer:
        """The analyzer used for ``face_image=``; insightface's ``buffalo_l`` pack unless set."""
        if self._face_analyzer is None:
            self._face_analyzer = FaceAnalyzer()
        return self._face_analyzer

    def set_face_analyzer(self, analyzer: FaceAnalyzer) -> None:
        self._face_analyzer = analyzer

    def encode_identity(
        self,
        face_image: FaceImages,
        batch_size: int = 1,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """ArcFace ``id_embeds`` (N, 512) from face photos.

        One image gives one identity. A list of ``batch_size`` (> 1) images, or a list of
        lists, gives one identity per prompt; any other list is several photos of one
        person, whose embeddings are averaged (weighted by ``face_weights``).
        """
        if isinstance(face_image, (list, tuple)):
            if face_image and all(isinstance(item, (list, tuple)) for item in face_image):
                groups = [list(item) for item in face_image]
            elif batch_size > 1 and len(face_image) == batch_size:
                groups = [[item] for item in face_image]
            else:
                groups = [list(face_image)]
        else:
            groups = [[face_image]]
        weights = face_weights if len(groups) == 1 else None
        return torch.from_numpy(np.stack([self.face_analyzer.identity(g, face_index, weights, self.raw_id_embeds) for g in groups]))

    def prepare_id_embeds(
        self,
        face_image: FaceImages | None,
        id_embeds: torch.Tensor | None,
        negative_face_image: FaceImages | None,
        negative_id_embeds: torch.Tensor | None,
        batch_size: int,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check the identity arguments and return (id_embeds, negative_id_embeds or None)."""
        if (face_image is None) == (id_embeds is None):
            raise ValueError("pass exactly one of face_image= and id_embeds=")
        if negative_face_image is not None and negative_id_embeds is not None:
            raise ValueError("pass at most one of negative_face_image= and negative_id_embeds=")
        if face_image is not None:
            id_embeds = self.encode_identity(face_image, batch_size, face_index, face_weights)
        if negative_face_image is not None:
            negative_id_embeds = self.encode_identity(negative_face_image, batch_size, face_index)
        return id_embeds, negative_id_embeds

    @staticmethod
    def _batch_id_embeds(id_embeds: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
        if id_embeds.ndim == 1:
            id_embeds = id_embeds[None]
        if id_embeds.ndim != 2:
            raise ValueError(f"{name} must have shape (512,) or (N, 512), got {tuple(id_embeds.shape)}")
        if id_embeds.shape[0] == 1:
            return id_embeds.expand(batch_size, -1)
        if id_embeds.shape[0] != batch_size:
            raise ValueError(
                f"{name} holds {id_embeds.shape[0]} identities for {batch_size} prompts: "
                "pass one identity, or one per prompt"
            )
        return id_embeds


class IdentityPipelineMixin(FaceInputMixin):
    """Identity-adapter methods shared by the SD1.5 and SDXL pipelines."""

    #: Adapter formats this pipeline runs.
    supported_adapter_formats: tuple[str, ...] = ("faceid",)
    id_projection: FaceIDProjection | InstantIDResampler | None = None
    adapter_spec: AdapterSpec | None = None

    @property
    def raw_id_embeds(self) -> bool:
        return self.adapter_spec is not None and self.adapter_spec.format == "instantid"

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe``; the new pipeline keeps the identity adapter and face
        analyzer of ``pipeline`` when it shares its UNet."""
        new = super().from_pipe(pipeline, **kwargs)
        if getattr(pipeline, "id_projection", None) is not None and new.unet is pipeline.unet:
            new.id_projection, new.adapter_spec = pipeline.id_projection, pipeline.adapter_spec
            new._face_analyzer = pipeline._face_analyzer
        return new

    # ---------------------------------------------------------------- loading
    def load_identity_adapter(
        self,
        pretrained_model_name_or_path_or_file: str | os.PathLike | dict,
        weight_name: str | None = None,
        subfolder: str | None = None,
        **hub_kwargs,
    ) -> None:
        """Load an identity adapter (e.g. ``h94/IP-Adapter-FaceID`` with
        ``weight_name="ip-adapter-faceid_sd15.bin"``) from a hub id, a folder, a file, or a
        state dict ``{"image_proj": ..., "ip_adapter": ...}`` already in memory.

        Installs identity attention on every cross-attention layer, the projection model and,
        for FaceID, its LoRA as the peft adapter ``"faceid"`` (kept beside any active LoRA).
        """
        if isinstance(pretrained_model_name_or_path_or_file, dict):
            path, state_dict = "the given state dict", pretrained_model_name_or_path_or_file
        else:
            path = resolve_checkpoint_file(pretrained_model_name_or_path_or_file, weight_name, subfolder, **hub_kwargs)
            state_dict = load_adapter_state_dict(path)
        spec = detect_format(state_dict, path)
        if spec.format not in self.supported_adapter_formats:
            raise CheckpointError(self._unsupported_format_message(spec, path))
        check_adapter(self.unet, state_dict, spec, path)

        self.unet.set_attn_processor(build_processors(self.unet, state_dict, spec))
        self.id_projection = build_projection(state_dict, spec).to(device=self.unet.device, dtype=self.unet.dtype)
        self.adapter_spec = spec
        lora = faceid_lora_state_dict(self.unet, state_dict)
        if lora:
            self._load_id_lora(lora)

    def _unsupported_format_message(self, spec: AdapterSpec, path: str) -> str:
        if spec.format == "faceid_plus":
            return (
                f"{path} is an IP-Adapter-FaceID-Plus checkpoint, which also needs CLIP image features; "
                "idgen runs FaceID (ip-adapter-faceid_sd15.bin / _sdxl.bin) and InstantID: use one of those"
            )
        if spec.format == "instantid":
            return (
                f"{path} is an InstantID adapter, made for SDXL: load it into IDStableDiffusionXLPipeline "
                "with an SDXL base (and its IdentityNet as the controlnet)"
            )
        return (
            f"{path} is a {spec.format} adapter, which {type(self).__name__} does not run "
            f"(it runs: {', '.join(self.supported_adapter_formats)}): use the matching idgen pipeline"
        )

    def _load_id_lora(self, lora: dict[str, torch.Tensor]) -> None:
        active = [name for name in self.get_active_adapters() if name != ID_LORA_NAME]
        if ID_LORA_NAME in getattr(self.unet, "peft_config", {}):
            self.delete_adapters(ID_LORA_NAME)
        self.load_lora_weights(lora, adapter_name=ID_LORA_NAME)
        self.set_adapters(active + [ID_LORA_NAME])

    def _check_identity_call(self, kwargs: dict) -> None:
        self._require_adapter()
        if kwargs.get("ip_adapter_image") is not None or kwargs.get("ip_adapter_image_embeds") is not None:
            raise ValueError("use face_image= or id_embeds= with an identity adapter, not ip_adapter_image(_embeds)")

    def append_identity(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        face_image: FaceImages | None,
        id_embeds: torch.Tensor | None,
        negative_face_image: FaceImages | None,
        negative_id_embeds: torch.Tensor | None,
        face_index: int,
        face_weights: Sequence[float] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Text embeddings (one row per prompt) with the identity tokens appended; returns them
        and the number of identity tokens."""
        batch_size, device = prompt_embeds.shape[0], prompt_embeds.device
        id_embeds, negative_id_embeds = self.prepare_id_embeds(
            face_image, id_embeds, negative_face_image, negative_id_embeds, batch_size, face_index, face_weights
        )
        tokens, negative_tokens = self.encode_id_tokens(id_embeds, negative_id_embeds, batch_size, device)
        return (
            torch.cat([prompt_embeds, tokens.to(prompt_embeds.dtype)], dim=1),
            torch.cat([negative_prompt_embeds, negative_tokens.to(prompt_embeds.dtype)], dim=1),
            tokens.shape[1],
        )

    def _require_adapter(self) -> FaceIDProjection | InstantIDResampler:
        if self.id_projection is None:
            raise RuntimeError(
                "no identity adapter is loaded: call pipe.load_identity_adapter(...) before generating"
            )
        return self.id_projection

    def _id_processors(self) -> dict[str, IDAttnProcessor]:
        return {
            name.rsplit(".processor", 1)[0]: processor
            for name, processor in self.unet.attn_processors.items()
            if isinstance(processor, IDAttnProcessor)
        }

    def set_id_scale(self, id_scale: IDScale) -> None:
        """Weight of the identity branch: a float for every layer, or a dict per block or layer
        (``{"down": 0.0, "mid": 1.0, "up": 0.8}``; see ``layer_id_scales``)."""
        processors = self._id_processors()
        for name, scale in layer_id_scales(list(processors), id_scale).items():
            processors[name].scale = scale

    def id_guidance_callback(
        self, id_scale: IDScale, start: float, end: float, num_inference_steps: int, callback=None, tensor_inputs=None
    ):
        """Apply ``id_scale`` and return (step-end callback, its tensor inputs): the callback keeps
        identity attention on only for steps ``i`` with ``start <= i/N`` and ``(i+1)/N <= end``
        (ControlNet's rule), then runs the user's ``callback``."""
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        tensor_inputs = tensor_inputs if tensor_inputs is not None else ["latents"]
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"need 0 <= id_guidance_start < id_guidance_end <= 1, got {start} and {end}")
        processors = self._id_processors()
        scales = layer_id_scales(list(processors), id_scale)

        def apply(step: int, total: int) -> None:
            keep = not (step / total < start or (step + 1) / total > end)
            for name, processor in processors.items():
                processor.scale = scales[name] if keep else 0.0

        apply(0, num_inference_steps)
        if start == 0.0 and end == 1.0:
            return callback, tensor_inputs

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            apply(step + 1, pipe.num_timesteps)
            return callback(pipe, step, timestep, tensors) if callback is not None else tensors

        return on_step_end, tensor_inputs

    def encode_id_tokens(
        self,
        id_embeds: torch.Tensor,
        negative_id_embeds: torch.Tensor | None,
        batch_size: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity tokens for the conditional and unconditional branches, one row per prompt.

        The unconditional tokens project ``negative_id_embeds``, zeros by default, as the
        reference implementations do.
        """
        projection = self._require_adapter().to(device)
        dim = projection.id_embed_dim
        if id_embeds.shape[-1] != dim:
            raise ValueError(f"id_embeds must be {dim}-d ArcFace vectors, got shape {tuple(id_embeds.shape)}")
        positive = self._batch_id_embeds(id_embeds, batch_size, "id_embeds")
        if negative_id_embeds is None:
            negative_id_embeds = torch.zeros_like(positive)
        negative = self._batch_id_embeds(negative_id_embeds, batch_size, "negative_id_embeds")
        both = torch.cat([negative, positive]).to(device=device, dtype=projection.dtype)
        negative_tokens, tokens = projection(both).chunk(2)
        return tokens, negative_tokens
