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


class IdentityPipelineMixin:
    """Identity-adapter methods shared by the SD1.5 and SDXL pipelines."""

    #: Adapter formats this pipeline runs.
    supported_adapter_formats: tuple[str, ...] = ("faceid",)
    id_projection: FaceIDProjection | None = None
    adapter_spec: AdapterSpec | None = None
    _face_analyzer: FaceAnalyzer | None = None

    # ---------------------------------------------------------------- loading
    def load_identity_adapter(
        self,
        pretrained_model_name_or_path_or_file: str | os.PathLike,
        weight_name: str | None = None,
        subfolder: str | None = None,
        **hub_kwargs,
    ) -> None:
        """Load an identity adapter (e.g. ``h94/IP-Adapter-FaceID`` with
        ``weight_name="ip-adapter-faceid_sd15.bin"``) from a hub id, a folder or a file.

        Installs identity attention on every cross-attention layer, the projection model and,
        for FaceID, its LoRA as the peft adapter ``"faceid"`` (kept beside any active LoRA).
        """
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

    def _require_adapter(self) -> FaceIDProjection:
        if self.id_projection is None:
            raise RuntimeError(
                "no identity adapter is loaded: call pipe.load_identity_adapter(...) before generating"
            )
        return self.id_projection

    def set_id_scale(self, id_scale: float) -> None:
        """Weight of the identity branch in every identity attention layer."""
        for processor in self.unet.attn_processors.values():
            if isinstance(processor, IDAttnProcessor):
                processor.scale = float(id_scale)

    # ---------------------------------------------------------------- faces
    @property
    def face_analyzer(self) -> FaceAnalyzer:
        """The analyzer used for ``face_image=``; insightface's ``buffalo_l`` pack unless set."""
        if self._face_analyzer is None:
            self._face_analyzer = FaceAnalyzer()
        return self._face_analyzer

    def set_face_analyzer(self, analyzer: FaceAnalyzer) -> None:
        self._face_analyzer = analyzer

    def encode_identity(self, face_image: FaceImages, batch_size: int = 1, face_index: int = 0) -> torch.Tensor:
        """ArcFace ``id_embeds`` (N, 512) from face photos.

        One image gives one identity. A list of ``batch_size`` (> 1) images, or a list of
        lists, gives one identity per prompt; any other list is several photos of one
        person, whose embeddings are averaged.
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
        return torch.from_numpy(np.stack([self.face_analyzer.identity(group, face_index) for group in groups]))

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
        dim = projection.config.id_embed_dim
        if id_embeds.shape[-1] != dim:
            raise ValueError(f"id_embeds must be {dim}-d ArcFace vectors, got shape {tuple(id_embeds.shape)}")
        positive = self._batch_id_embeds(id_embeds, batch_size, "id_embeds")
        if negative_id_embeds is None:
            negative_id_embeds = torch.zeros_like(positive)
        negative = self._batch_id_embeds(negative_id_embeds, batch_size, "negative_id_embeds")
        both = torch.cat([negative, positive]).to(device=device, dtype=projection.dtype)
        negative_tokens, tokens = projection(both).chunk(2)
        return tokens, negative_tokens
