"""Arc2Face: identity-only generation, the ArcFace vector written into the text encoder.

The projected identity replaces the embedding of the token "id" in the fixed prompt
"photo of a id person"; the (fine-tuned) CLIP text encoder then runs as usual and its last
hidden state conditions a fine-tuned SD1.5 UNet. There is no adapter and no user prompt,
so this is its own pipeline rather than a mode of ``IDStableDiffusionPipeline``: the two
share face input, not their conditioning path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from transformers import CLIPTextModel

from idgen.adapters.context import call_hook

from .face_inputs import FaceImages, FaceInputMixin

ID_PROMPT = "photo of a id person"
ID_WORD = "id"


class IDArc2FacePipeline(FaceInputMixin, StableDiffusionPipeline):
    """diffusers' ``StableDiffusionPipeline`` driven by an ArcFace identity instead of a prompt.

    >>> pipe = IDArc2FacePipeline.from_arc2face("FoivosPar/Arc2Face")
    >>> pipe.set_face_analyzer(FaceAnalyzer("antelopev2"))  # with arcface.onnx in the pack
    >>> image = pipe(face_image="me.jpg", num_inference_steps=25, guidance_scale=3.0).images[0]
    """

    @classmethod
    def from_arc2face(
        cls,
        arc2face: str = "FoivosPar/Arc2Face",
        base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        **kwargs,
    ) -> IDArc2FacePipeline:
        """Load the official layout: ``encoder/`` (CLIP text encoder) and ``arc2face/`` (UNet)
        from ``arc2face``; tokenizer, VAE and scheduler from ``base_model``."""
        hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision") if k in kwargs}
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        text_encoder = CLIPTextModel.from_pretrained(arc2face, subfolder="encoder", dtype=dtype, **hub)
        unet = UNet2DConditionModel.from_pretrained(arc2face, subfolder="arc2face", **hub)
        if dtype is not None:
            unet = unet.to(dtype)
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
        return cls.from_pretrained(base_model, text_encoder=text_encoder, unet=unet, **kwargs)

    def _id_token(self) -> int:
        ids = self.tokenizer(ID_WORD, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits {ID_WORD!r} into {len(ids)} tokens; Arc2Face needs it as one token")
        return ids[0]

    @contextlib.contextmanager
    def _replace_id_token(self, mask: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
        """Within the block, the text encoder's token embedding at ``mask`` is ``vectors``."""

        def replace(output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[mask] = vectors.to(output.dtype)
            return output

        with call_hook(self.text_encoder.get_input_embeddings(), post=replace):
            yield

    def encode_id_prompt(self, id_embeds: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Text-encoder states (N, 77, D) of "photo of a id person" with identity i in row i."""
        id_embeds = F.normalize(id_embeds.reshape(-1, id_embeds.shape[-1]).float(), dim=-1)
        hidden = self.text_encoder.config.hidden_size
        if id_embeds.shape[-1] > hidden:
            raise ValueError(f"a {id_embeds.shape[-1]}-d identity does not fit the {hidden}-d text encoder")
        input_ids = self.tokenizer(
            [ID_PROMPT] * len(id_embeds), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(device)
        vectors = F.pad(id_embeds, (0, hidden - id_embeds.shape[-1])).to(device)
        with self._replace_id_token(input_ids == self._id_token(), vectors):
            return self.text_encoder(input_ids)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: None = None,
        face_image: FaceImages | None = None,
        id_embeds: torch.Tensor | None = None,
        negative_face_image: FaceImages | None = None,
        negative_id_embeds: torch.Tensor | None = None,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.0,
        negative_prompt: None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: None = None,
        negative_prompt_embeds: None = None,
        ip_adapter_image: None = None,
        ip_adapter_image_embeds: None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # diffusers' own default
    ):
        """Generate images of the person in ``face_image`` (or given ArcFace ``id_embeds``).

        ``face_image`` takes one photo, a list of photos of one person (averaged), or a list
        of lists (one identity per sample); ``id_embeds`` (512,) or (N, 512). The negative
        branch is the empty prompt, or ``negative_face_image`` / ``negative_id_embeds``.
        ``num_inference_steps`` and ``guidance_scale`` default to Arc2Face's own (25, 3.0). Every
        argument of ``StableDiffusionPipeline.__call__`` is here in its place; those of the text
        prompt (``prompt``, ``negative_prompt``, their embeddings, ``clip_skip``) and of diffusers'
        IP-Adapter must stay None: the identity is the whole condition.
        """
        # 1. Check inputs and encode the identity
        given = dict(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                     negative_prompt_embeds=negative_prompt_embeds, ip_adapter_image=ip_adapter_image,
                     ip_adapter_image_embeds=ip_adapter_image_embeds, clip_skip=clip_skip)
        refused = [name for name, value in given.items() if value is not None]
        if refused:
            raise ValueError(f"Arc2Face takes no {', '.join(refused)}: the identity is its whole condition (face_image= "
                             "or id_embeds=; negative_face_image= or negative_id_embeds= for the negative branch)")
        id_embeds, negative_id_embeds = self.prepare_id_embeds(
            face_image, id_embeds, negative_face_image, negative_id_embeds, 1, face_index, face_weights
        )
        device = self._execution_device

        # 2. Write the identity into the text encoder's input
        id_prompt_embeds = self.encode_id_prompt(id_embeds, device)
        if negative_id_embeds is not None:
            negative = self._batch_id_embeds(negative_id_embeds, len(id_prompt_embeds), "negative_id_embeds")
            negative_id_prompt_embeds = self.encode_id_prompt(negative, device)
        else:
            _, negative_id_prompt_embeds = self.encode_prompt(None, device, 1, True, prompt_embeds=id_prompt_embeds)

        # 3. Denoise and decode: the parent's loop
        output = super().__call__(
            prompt_embeds=id_prompt_embeds, negative_prompt_embeds=negative_id_prompt_embeds, height=height, width=width,
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            output_type=output_type, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        return self._watermarked(output, output_type)
