"""Stable Diffusion 1.5 with an ArcFace identity adapter (IP-Adapter-FaceID format)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from .identity import FaceImages, IdentityPipelineMixin


class IDStableDiffusionPipeline(IdentityPipelineMixin, StableDiffusionPipeline):
    """diffusers' ``StableDiffusionPipeline`` plus identity arguments.

    >>> pipe = IDStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> pipe.load_identity_adapter("h94/IP-Adapter-FaceID", weight_name="ip-adapter-faceid_sd15.bin")
    >>> image = pipe("a photo of a person as an astronaut", face_image="me.jpg").images[0]
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        face_image: FaceImages | None = None,
        id_embeds: torch.Tensor | None = None,
        id_scale: float = 1.0,
        negative_id_embeds: torch.Tensor | None = None,
        face_index: int = 0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        **kwargs,
    ):
        """Generate images of the person in ``face_image`` (or given ArcFace ``id_embeds``).

        Args:
            face_image: a photo (path, PIL, RGB array or bytes); a list of photos of one
                person (averaged); or one photo per prompt.
            id_embeds: ArcFace embeddings, (512,) or (N, 512) with N = 1 or one per prompt.
            id_scale: weight of the identity attention (1.0 as trained; lower for more prompt freedom).
            negative_id_embeds: identity for the unconditional branch (zeros by default).
            face_index: which face of each photo, largest first.

        Every other argument is ``StableDiffusionPipeline.__call__``'s.
        """
        # 1. Check inputs
        self._require_adapter()
        if (face_image is None) == (id_embeds is None):
            raise ValueError("pass exactly one of face_image= and id_embeds=")
        if kwargs.get("ip_adapter_image") is not None or kwargs.get("ip_adapter_image_embeds") is not None:
            raise ValueError("use face_image= or id_embeds= with an identity adapter, not ip_adapter_image(_embeds)")
        device = self._execution_device

        # 2. Encode the prompt once per prompt (the parent repeats it per image)
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, 1, True, negative_prompt, prompt_embeds, negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )
        batch_size = prompt_embeds.shape[0]

        # 3. Encode the identity and append its tokens to the text tokens
        if face_image is not None:
            id_embeds = self.encode_identity(face_image, batch_size, face_index)
        id_tokens, negative_id_tokens = self.encode_id_tokens(id_embeds, negative_id_embeds, batch_size, device)
        prompt_embeds = torch.cat([prompt_embeds, id_tokens.to(prompt_embeds.dtype)], dim=1)
        negative_prompt_embeds = torch.cat([negative_prompt_embeds, negative_id_tokens.to(prompt_embeds.dtype)], dim=1)
        self.set_id_scale(id_scale)

        # 4. Denoise and decode: the parent's loop, unchanged
        return super().__call__(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            cross_attention_kwargs=cross_attention_kwargs,
            **kwargs,
        )
