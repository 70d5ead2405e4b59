"""PhotoMaker V2 on SDXL: the identity enters the prompt.

The prompt names the person with a class word followed by the trigger word ("a photo of a woman
img"). The trigger word is dropped and the class word repeated, one copy per identity token
(two per photo); PhotoMaker's ID encoder fuses each copy's text embedding with a token made from
the photo's ArcFace vector and CLIP patch tokens. The first ``start_merge_step`` steps denoise
with the prompt alone (the trigger word removed), the rest with the fused prompt; the
checkpoint's LoRA acts throughout. A pipeline of its own, as Arc2Face's, because its conditioning
path is the text's, not adapter attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from transformers import CLIPImageProcessor

from idgen.adapters.checkpoints import resolve_checkpoint_file
from idgen.adapters.context import call_hook
from idgen.adapters.photomaker import PhotoMakerEncoder, build_photomaker_clip, build_photomaker_encoder, photomaker_state_dicts
from idgen.errors import CheckpointError, IdentityInputError
from idgen.faces import ImageInput, load_image

from .face_inputs import FaceInputMixin
from .id_lora import quiet_lora_loading

PHOTOMAKER_LORA_NAME = "photomaker"
_NO_ENCODER = object()


class IDPhotoMakerPipeline(FaceInputMixin, StableDiffusionXLPipeline):
    """diffusers' ``StableDiffusionXLPipeline`` with PhotoMaker V2's identity in the prompt.

    >>> pipe = IDPhotoMakerPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    >>> pipe.load_identity_adapter("TencentARC/PhotoMaker-V2", weight_name="photomaker-v2.bin")
    >>> image = pipe("a photo of a woman img as an astronaut", face_image=["me1.jpg", "me2.jpg"]).images[0]
    """

    base_family = "sdxl"
    identity_format = "photomaker"  # its row: insightface's raw vectors, one per photo
    id_encoder: PhotoMakerEncoder | None = None
    _image_encoder_before: Any = _NO_ENCODER

    # ---------------------------------------------------------------- loading
    def load_identity_adapter(self, pretrained_model_name_or_path_or_file: str | dict, weight_name: str | None = None,
                              subfolder: str | None = None, **hub_kwargs) -> None:
        """Load a PhotoMaker V2 checkpoint (a file, a folder + ``weight_name``, a hub repo, or its
        ``{"id_encoder": ..., "lora_weights": ...}`` dict): its ID encoder, its CLIP ViT-L (as
        ``image_encoder``) and its UNet LoRA (peft adapter ``"photomaker"``)."""
        source = pretrained_model_name_or_path_or_file
        path = "state dict" if isinstance(source, dict) else resolve_checkpoint_file(source, weight_name, subfolder,
                                                                                       **hub_kwargs)
        ours, clip, lora = photomaker_state_dicts(source if isinstance(source, dict) else path, path)
        encoder = build_photomaker_encoder(ours, path)
        width = self.unet.config.cross_attention_dim
        if encoder.config.embed_dim != width:
            raise CheckpointError(f"{path} is PhotoMaker for prompt embeddings of width {encoder.config.embed_dim} "
                                  f"(SDXL: 2048) but this UNet reads {width}: use an SDXL base model")
        if self.id_encoder is not None:
            self.unload_identity_adapter()
        clip_model = build_photomaker_clip(clip, path).to(self.unet.device, self.unet.dtype)
        self._image_encoder_before = getattr(self, "image_encoder", None)
        self.register_modules(image_encoder=clip_model)
        self.id_encoder = encoder.to(self.unet.device, self.unet.dtype)
        try:
            with quiet_lora_loading():
                self.load_lora_weights(lora, adapter_name=PHOTOMAKER_LORA_NAME)
        except Exception as err:
            self.unload_identity_adapter()
            raise CheckpointError(f"{path}: its LoRA does not fit this UNet ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:160]}): use the SDXL base PhotoMaker was made for") from None

    def unload_identity_adapter(self) -> None:
        """Remove the ID encoder, its CLIP and its LoRA: the pipeline is plain SDXL again."""
        if PHOTOMAKER_LORA_NAME in getattr(self.unet, "peft_config", {}):
            self.delete_adapters(PHOTOMAKER_LORA_NAME)
        if self._image_encoder_before is not _NO_ENCODER:
            self.register_modules(image_encoder=self._image_encoder_before)
            self._image_encoder_before = _NO_ENCODER
        self.id_encoder = None

    # ---------------------------------------------------------------- the prompt
    def _trigger_id(self, tokenizer, trigger_word: str) -> int:
        """The trigger word's token id, added to ``tokenizer`` as one token (as PhotoMaker does)."""
        if len(tokenizer(trigger_word, add_special_tokens=False).input_ids) != 1 or trigger_word not in tokenizer.get_vocab():
            tokenizer.add_tokens([trigger_word], special_tokens=True)
        return tokenizer.convert_tokens_to_ids(trigger_word)

    def text_only_prompt(self, prompt: str, trigger_word: str) -> str:
        """``prompt`` without the trigger word (tokenised, the token dropped, decoded: as the reference)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        ids.remove(self._trigger_id(self.tokenizer, trigger_word))
        return self.tokenizer.decode(ids, add_special_tokens=False)

    def _class_ids(self, tokenizer, prompt: str, trigger_word: str, copies: int) -> tuple[list[int], list[bool]]:
        """Token ids of ``prompt`` with the trigger word dropped and the class word before it
        repeated ``copies`` times, padded to the tokenizer's length, and the copies' mask."""
        trigger = self._trigger_id(tokenizer, trigger_word)
        length = tokenizer.model_max_length
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        if ids.count(trigger) != 1:
            raise IdentityInputError(f"PhotoMaker needs the trigger word {trigger_word!r} once in each prompt, right "
                                     f"after the class word (e.g. 'a photo of a woman {trigger_word}'); got {prompt!r}")
        at = ids.index(trigger) - 1
        if at < 1:
            raise IdentityInputError(f"the trigger word {trigger_word!r} follows the class word it marks, e.g. 'a man "
                                     f"{trigger_word}': {prompt!r} has none before it")
        ids = ids[:at] + [ids[at]] * copies + ids[at + 2:]
        ids = (ids + [tokenizer.pad_token_id] * length)[:length]
        return ids, [at <= i < at + copies for i in range(length)]

    def encode_trigger_prompt(self, prompts: Sequence[str], trigger_word: str, copies: int, device: torch.device,
                              clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt embeddings (N, L, D), pooled (N, P), class-copy mask (N, L)) of the prompts with the
        class word repeated ``copies`` times, from both text encoders as SDXL encodes them."""
        hidden, pooled, mask = [], None, None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            rows = [self._class_ids(tokenizer, prompt, trigger_word, copies) for prompt in prompts]
            ids = torch.tensor([row[0] for row in rows], device=device)
            mask = torch.tensor([row[1] for row in rows], device=device)
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)])
        return torch.cat(hidden, dim=-1).to(self.text_encoder_2.dtype), cast(torch.Tensor, pooled), cast(torch.Tensor, mask)

    # ---------------------------------------------------------------- the identity
    @torch.no_grad()
    def encode_photomaker_identity(self, face_image: Sequence[ImageInput], id_embeds: torch.Tensor | None = None,
                                   face_index: int = 0) -> torch.Tensor:
        """Identity tokens (n * num_tokens, D) of n photos of one person: their ArcFace vectors (raw,
        or ``id_embeds`` (n, 512)) and CLIP's last hidden states of the photos (resized and centre
        cropped as CLIPImageProcessor does)."""
        photos = [load_image(photo, self.max_pixels) for photo in face_image]
        if id_embeds is None:
            id_embeds = torch.from_numpy(self.face_analyzer.embeddings(photos, face_index, raw=self.raw_id_embeds))
        id_embeds = torch.as_tensor(id_embeds).reshape(-1, self.id_encoder.config.id_embed_dim)
        if len(id_embeds) != len(photos):
            raise IdentityInputError(f"id_embeds holds {len(id_embeds)} vectors for {len(photos)} photos: one per photo")
        size = self.image_encoder.config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        pixels = processor(photos, return_tensors="pt").pixel_values
        device, dtype = self._execution_device, self.image_encoder.dtype
        clip = self.image_encoder.vision_model(pixels.to(device, dtype))[0]
        self.id_encoder.to(device)
        return self.id_encoder.id_tokens(id_embeds.to(device, self.id_encoder.dtype), clip.to(self.id_encoder.dtype))

    @contextlib.contextmanager
    def _merged_after(self, start_merge_step: int, embeds: torch.Tensor, pooled: torch.Tensor) -> Iterator[None]:
        """From step ``start_merge_step + 1`` on, the UNet's prompt rows (the last ``len(embeds)``)
        read the fused prompt and its pooled embedding."""
        state = {"step": 0}

        def merge(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            step, state["step"] = state["step"], state["step"] + 1
            if step <= start_merge_step:
                return args, kwargs
            states = kwargs["encoder_hidden_states"].clone()
            states[-len(embeds):] = embeds.to(states.dtype)
            added = dict(kwargs["added_cond_kwargs"])
            added["text_embeds"] = added["text_embeds"].clone()
            added["text_embeds"][-len(pooled):] = pooled.to(added["text_embeds"].dtype)
            return args, {**kwargs, "encoder_hidden_states": states, "added_cond_kwargs": added}

        with call_hook(self.unet, pre=merge):
            yield

    # ---------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        face_image: ImageInput | Sequence[ImageInput] | None = None,
        id_embeds: torch.Tensor | None = None,
        trigger_word: str = "img",
        start_merge_step: int = 10,
        face_index: int = 0,
        prompt_2: None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: None = None,
        ip_adapter_image_embeds: None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # diffusers' own default
    ):
        """Generate SDXL images of the person in ``face_image`` (one photo, or several of one person).

        Args:
            prompt: text naming the person by a class word and the trigger word, e.g. "a photo of
                a woman img in a garden"; one prompt or a list.
            id_embeds: the photos' raw ArcFace vectors (n, 512), instead of detecting them.
            trigger_word: the word that marks the class word (added to the tokenizers as one token).
            start_merge_step: steps 0..start_merge_step denoise with the prompt alone (the trigger
                word removed); later steps with the identity fused in. Lower: more likeness; higher:
                more of the prompt's style.
        Every other argument is ``StableDiffusionXLPipeline.__call__``'s; the prompt's own embeddings
        (``prompt_embeds``, ``pooled_prompt_embeds``), ``prompt_2`` and diffusers' IP-Adapter inputs
        must stay None: PhotoMaker builds the prompt embeddings from ``prompt=`` and the photos.
        """
        # 1. Check inputs
        if self.id_encoder is None:
            raise RuntimeError("no PhotoMaker adapter is loaded: call pipe.load_identity_adapter(...) first")
        if face_image is None:
            raise IdentityInputError("PhotoMaker reads CLIP features of the photos themselves: pass face_image=")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ValueError("PhotoMaker finds the person's class word and trigger word in the text: pass prompt=")
        given = dict(prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                     ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)
        for name, value in given.items():
            if value is not None:
                raise ValueError(f"{name}= is not taken by PhotoMaker: its prompt embeddings come from prompt=")
        photos = list(face_image) if isinstance(face_image, (list, tuple)) else [face_image]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self._execution_device

        # 2. Encode the prompt: alone (trigger word removed), and with the class word repeated
        tokens = self.encode_photomaker_identity(cast(list[ImageInput], photos), id_embeds, face_index)
        embeds, pooled, mask = self.encode_trigger_prompt(prompts, trigger_word, len(tokens), device, clip_skip)
        text_only = [self.text_only_prompt(text, trigger_word) for text in prompts]
        prompt_embeds, negative_prompt_embeds, pooled_text, negative_pooled = self.encode_prompt(
            text_only, None, device, 1, guidance_scale > 1.0, negative_prompt, negative_prompt_2,
            negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip,
        )

        # 3. Fuse the identity into the class word's copies
        fused = self.id_encoder.fuse_prompt(embeds.to(self.id_encoder.dtype), mask, tokens).to(prompt_embeds.dtype)
        fused = fused.repeat_interleave(num_images_per_prompt, dim=0)
        pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0)

        # 4. Denoise and decode: SDXL's loop, the fused prompt after start_merge_step
        with self._merged_after(start_merge_step, fused, pooled):
            output = super().__call__(
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_text, negative_pooled_prompt_embeds=negative_pooled, height=height,
                width=width, num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                denoising_end=denoising_end, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                eta=eta, generator=generator, latents=latents, output_type=output_type, return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs, guidance_rescale=guidance_rescale,
                original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                negative_original_size=negative_original_size, negative_crops_coords_top_left=negative_crops_coords_top_left,
                negative_target_size=negative_target_size, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
        return self._watermarked(output, output_type)
