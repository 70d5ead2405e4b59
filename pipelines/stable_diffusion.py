"""Stable Diffusion 1.5 with an ArcFace identity adapter (IP-Adapter-FaceID format)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from idgen.faces import ImageInput

from .face_inputs import FaceImages, IDScale, RegionsInput
from .identity import IdentityPipelineMixin


@dataclass(frozen=True)
class IdentityArgs:
    """The identity arguments of one SD1.5 call, as ``IDStableDiffusionPipeline.__call__`` documents them."""

    face_image: FaceImages | None = None
    id_embeds: torch.Tensor | None = None
    id_scale: IDScale | None = None
    negative_face_image: FaceImages | None = None
    negative_id_embeds: torch.Tensor | None = None
    face_index: int = 0
    face_weights: Sequence[float] | None = None
    id_guidance_start: float = 0.0
    id_guidance_end: float = 1.0
    face_clip_embeds: torch.Tensor | None = None
    s_scale: float = 1.0
    regions: RegionsInput | None = None
    kps_image: ImageInput | None = None
    face_order: Sequence[int] | None = None
    id_fusion: str | None = None
    recover_words: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.kps_image, (list, tuple)) or (self.kps_image is not None and self.regions is None):
            raise ValueError("kps_image= on SD1.5 places several people around the faces of one group photo: pass "
                             "regions= ('faces', or one mask or box per person) with one photo")


@dataclass(frozen=True)
class PromptArgs:
    """The prompt arguments of one call, encoded once per prompt before diffusers' loop runs."""

    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    clip_skip: int | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    ip_adapter_image: Any = None
    ip_adapter_image_embeds: list[torch.Tensor] | None = None


def _identity_call(pipe: IdentityPipelineMixin, parent_call: Callable, text: PromptArgs, identity: IdentityArgs,
                   loop: dict[str, Any]):
    """The identity call of every SD1.5 pipeline: check inputs, encode the prompt and the identity
    once per prompt, then run the diffusers pipeline's own loop (``parent_call``, given ``loop``:
    its remaining arguments) with the UNet conditioned on the identity."""
    # 1. Check inputs
    pipe._check_identity_call(text.ip_adapter_image, text.ip_adapter_image_embeds)
    device = pipe._execution_device

    # 2. Encode the prompt once per prompt (the parent repeats it per image)
    lora_scale = (text.cross_attention_kwargs or {}).get("scale")
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        text.prompt, device, 1, True, text.negative_prompt, text.prompt_embeds, text.negative_prompt_embeds,
        lora_scale=lora_scale, clip_skip=text.clip_skip,
    )

    # 3. Encode the identity (several people: side by side, each in a region)
    tokens, negative_tokens, people = pipe.encode_call_identity(
        identity.face_image, identity.id_embeds, identity.negative_face_image, identity.negative_id_embeds,
        prompt_embeds.shape[0], identity.face_index, identity.face_weights, identity.face_clip_embeds, identity.s_scale,
        identity.regions, identity.kps_image, identity.face_order,
    )
    if people is not None and people.pose_size is not None and "height" in loop:  # the group photo's aspect
        loop["width"], loop["height"] = pipe.output_size(people.pose_size, loop["height"], loop["width"])

    # 4. Denoise and decode: the parent's loop, the UNet conditioned on the identity
    images_per_prompt = loop["num_images_per_prompt"]
    fusion_tokens = pipe.fusion_tokens(identity.id_fusion, text.prompt, images_per_prompt, identity.recover_words)
    with pipe.identity_conditioning(
        tokens, negative_tokens, images_per_prompt, identity.id_scale, identity.id_guidance_start,
        identity.id_guidance_end, regions=None if people is None else people.regions, id_fusion=identity.id_fusion,
        fusion_tokens=fusion_tokens,
    ):
        output = parent_call(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                             cross_attention_kwargs=text.cross_attention_kwargs, ip_adapter_image=text.ip_adapter_image,
                             ip_adapter_image_embeds=text.ip_adapter_image_embeds, **loop)
    return pipe._watermarked(output, loop["output_type"])


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
        id_scale: IDScale | None = None,
        negative_face_image: FaceImages | None = None,
        negative_id_embeds: torch.Tensor | None = None,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
        id_guidance_start: float = 0.0,
        id_guidance_end: float = 1.0,
        face_clip_embeds: torch.Tensor | None = None,
        s_scale: float = 1.0,
        regions: RegionsInput | None = None,
        kps_image: ImageInput | None = None,
        face_order: Sequence[int] | None = None,
        id_fusion: str | None = None,
        recover_words: Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # diffusers' own default
    ):
        """Generate images of the person in ``face_image`` (or given ArcFace ``id_embeds``).

        Args:
            face_image: a photo (path, PIL, RGB array or bytes); a list of photos of one
                person (averaged, weighted by ``face_weights``); or one photo per prompt.
            id_embeds: ArcFace embeddings, (512,) or (N, 512) with N = 1 or one per prompt.
            id_scale: weight of the identity attention: a float, or a dict per block or layer such
                as ``{"down": 0.0, "mid": 1.0, "up": 0.8}``; None: the method's default in
                ``idgen.formats`` (1.0 as trained; InstantID and PuLID 0.8, as their demos), the
                same the command line uses.
            negative_face_image / negative_id_embeds: an identity to steer away from, through
                the unconditional branch (default: zeros, as the reference does).
            face_index: which face of each photo, largest first.
            id_guidance_start / id_guidance_end: fractions of the schedule during which the
                identity is applied, like ControlNet's ``control_guidance_start/end``.
            face_clip_embeds: FaceID-Plus: CLIP features of the face (``encode_face_clip``), (L, C)
                or (N, L, C); by default computed from ``face_image``.
            s_scale: FaceID-PlusV2: strength of its shortcut (the MLP tokens added back).
            regions: several people in one image. ``face_image`` (or ``id_embeds``) then holds one
                entry per person, the same people in every prompt, and ``regions`` says where
                each goes: one mask (PIL image or array, white = the person; any size with the
                output's aspect) or ``(x0, y0, x1, y1)`` box in output pixels per person, or
                ``"faces"``: each person takes the part of the image nearest to a face of
                ``kps_image``. Person ``p``'s identity attention acts only in their region (shared
                where regions overlap, none outside all); the text attention is untouched.
            kps_image: with ``regions="faces"``, a photo with a face per person; the image takes
                its aspect ratio unless ``height``/``width`` are given.
            face_order: which face of ``kps_image`` each person takes, counting its faces left to
                right (default: the largest faces, left to right).
            id_fusion: merge the identity with the base model's own take on the prompt, training-free
                (``idgen.adapters.fusion``): ``"adain"`` (Infinite-ID's mixed self-attention with
                AdaIN-mean) or ``"freecure"`` (FreeCure: the attributes named in the prompt, such
                as hair or a smile, drawn as the base model draws them). None: off.
            recover_words: with ``"freecure"``, the prompt's words to recover (default: those of
                ``idgen.adapters.fusion.ATTRIBUTE_WORDS`` in the prompt).

        Every other argument is ``StableDiffusionPipeline.__call__``'s.
        """
        text = PromptArgs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, cross_attention_kwargs,
                          ip_adapter_image, ip_adapter_image_embeds)
        identity = IdentityArgs(face_image, id_embeds, id_scale, negative_face_image, negative_id_embeds, face_index,
                                face_weights, id_guidance_start, id_guidance_end, face_clip_embeds, s_scale, regions,
                                kps_image, face_order, id_fusion, recover_words)
        loop = dict(height=height, width=width, num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                    guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, eta=eta,
                    generator=generator, latents=latents, output_type=output_type, return_dict=return_dict,
                    guidance_rescale=guidance_rescale, callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return _identity_call(self, super().__call__, text, identity, loop)


class IDStableDiffusionImg2ImgPipeline(IdentityPipelineMixin, StableDiffusionImg2ImgPipeline):
    """diffusers' ``StableDiffusionImg2ImgPipeline`` plus the identity arguments of
    ``IDStableDiffusionPipeline``: redraw ``image`` (at ``strength``) as the person in ``face_image``.

    >>> pipe = IDStableDiffusionImg2ImgPipeline.from_pipe(text_to_image_pipe)  # keeps the adapter
    >>> image = pipe("a portrait, oil painting", image=photo, strength=0.6, face_image="me.jpg").images[0]
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # diffusers' own default
        *,
        face_image: FaceImages | None = None,
        id_embeds: torch.Tensor | None = None,
        id_scale: IDScale | None = None,
        negative_face_image: FaceImages | None = None,
        negative_id_embeds: torch.Tensor | None = None,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
        id_guidance_start: float = 0.0,
        id_guidance_end: float = 1.0,
        face_clip_embeds: torch.Tensor | None = None,
        s_scale: float = 1.0,
        regions: RegionsInput | None = None,
        kps_image: ImageInput | None = None,
        face_order: Sequence[int] | None = None,
        id_fusion: str | None = None,
        recover_words: Sequence[str] | None = None,
    ):
        """Identity arguments (keyword only) as in ``IDStableDiffusionPipeline``; the others are
        ``StableDiffusionImg2ImgPipeline.__call__``'s."""
        text = PromptArgs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, cross_attention_kwargs,
                          ip_adapter_image, ip_adapter_image_embeds)
        identity = IdentityArgs(face_image, id_embeds, id_scale, negative_face_image, negative_id_embeds, face_index,
                                face_weights, id_guidance_start, id_guidance_end, face_clip_embeds, s_scale, regions,
                                kps_image, face_order, id_fusion, recover_words)
        loop = dict(image=image, strength=strength, num_inference_steps=num_inference_steps, timesteps=timesteps,
                    sigmas=sigmas, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, eta=eta,
                    generator=generator, output_type=output_type, return_dict=return_dict,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return _identity_call(self, super().__call__, text, identity, loop)


class IDStableDiffusionInpaintPipeline(IdentityPipelineMixin, StableDiffusionInpaintPipeline):
    """diffusers' ``StableDiffusionInpaintPipeline`` plus the identity arguments of
    ``IDStableDiffusionPipeline``: repaint the white part of ``mask_image`` as the person in
    ``face_image`` (the rest keeps ``image``'s content)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # diffusers' own default
        *,
        face_image: FaceImages | None = None,
        id_embeds: torch.Tensor | None = None,
        id_scale: IDScale | None = None,
        negative_face_image: FaceImages | None = None,
        negative_id_embeds: torch.Tensor | None = None,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
        id_guidance_start: float = 0.0,
        id_guidance_end: float = 1.0,
        face_clip_embeds: torch.Tensor | None = None,
        s_scale: float = 1.0,
        regions: RegionsInput | None = None,
        kps_image: ImageInput | None = None,
        face_order: Sequence[int] | None = None,
        id_fusion: str | None = None,
        recover_words: Sequence[str] | None = None,
    ):
        """Identity arguments (keyword only) as in ``IDStableDiffusionPipeline``; the others are
        ``StableDiffusionInpaintPipeline.__call__``'s."""
        text = PromptArgs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, cross_attention_kwargs,
                          ip_adapter_image, ip_adapter_image_embeds)
        identity = IdentityArgs(face_image, id_embeds, id_scale, negative_face_image, negative_id_embeds, face_index,
                                face_weights, id_guidance_start, id_guidance_end, face_clip_embeds, s_scale, regions,
                                kps_image, face_order, id_fusion, recover_words)
        loop = dict(image=image, mask_image=mask_image, masked_image_latents=masked_image_latents, height=height,
                    width=width, padding_mask_crop=padding_mask_crop, strength=strength,
                    num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                    guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, eta=eta,
                    generator=generator, latents=latents, output_type=output_type, return_dict=return_dict,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return _identity_call(self, super().__call__, text, identity, loop)
