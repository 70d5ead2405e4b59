"""SDXL with an identity adapter: FaceID-SDXL, or InstantID (image adapter + IdentityNet)."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from idgen.adapters.context import call_hook
from idgen.adapters.regions import Regions, place_kps, regional_cross_attention
from idgen.errors import IdentityInputError
from idgen.faces import ImageInput, draw_kps, load_image
from idgen.formats import formats_run_by

from .face_inputs import FaceImages, IDScale, RegionsInput, per_person
from .id_tokens import PeopleLayout
from .identity import IdentityPipelineMixin, IdentityTokens
from .shared import shared_modules


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (isinstance(value, (bool, int, float, str, tuple)) and value == default)


def load_identitynet(pretrained_model_name_or_path: str, subfolder: str | None = "ControlNetModel", **kwargs) -> ControlNetModel:
    """InstantID's IdentityNet: a diffusers SDXL ``ControlNetModel`` from the InstantID layout
    (``InstantX/InstantID`` or a local copy, ``ControlNetModel/`` subfolder), or a local
    ControlNet folder itself."""
    if os.path.isfile(os.path.join(pretrained_model_name_or_path, "config.json")):
        subfolder = None
    return ControlNetModel.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


class IDStableDiffusionXLPipeline(IdentityPipelineMixin, StableDiffusionXLControlNetPipeline):
    """diffusers' SDXL ControlNet pipeline plus identity arguments.

    With an InstantID adapter and its IdentityNet as ``controlnet`` (or as the first of several
    ControlNets), IdentityNet sees the identity tokens and a keypoint image drawn from the face;
    further ControlNets see the text and the images given in ``image=``. With no ControlNet it is
    plain SDXL plus the identity adapter (e.g. FaceID-SDXL).

    >>> pipe = IDStableDiffusionXLPipeline.from_pretrained(
    ...     "stabilityai/stable-diffusion-xl-base-1.0", controlnet=load_identitynet("InstantX/InstantID"))
    >>> pipe.load_identity_adapter("InstantX/InstantID", weight_name="ip-adapter.bin")
    >>> image = pipe("a photo of a person as an astronaut", face_image="me.jpg", id_scale=0.8).images[0]
    """

    _optional_components = [*StableDiffusionXLControlNetPipeline._optional_components, "controlnet"]
    supported_adapter_formats = formats_run_by("IDStableDiffusionXLPipeline")
    base_family = "sdxl"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        controlnet: ControlNetModel | Sequence[ControlNetModel] | MultiControlNetModel | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
    ):
        super().__init__(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, controlnet=controlnet, scheduler=scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker,
            feature_extractor=feature_extractor, image_encoder=image_encoder,
        )
        # plain SDXL's loop (no ControlNet) reads it; a pipeline of text encoders alone has no UNet
        self.default_sample_size = unet.config.sample_size if unet is not None else 128

    @property
    def _callback_tensor_inputs(self) -> list[str]:
        """The tensors ``callback_on_step_end`` may ask for: those of the diffusers loop that runs
        this call (with ControlNets or without)."""
        classes = self._loop_classes or (StableDiffusionXLPipeline, StableDiffusionXLControlNetPipeline)
        return classes[bool(self.controlnets)]._callback_tensor_inputs

    # ---------------------------------------------------------------- ControlNets
    @property
    def controlnets(self) -> list[ControlNetModel]:
        if self.controlnet is None:
            return []
        nets = self.controlnet.nets if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]
        return cast(list[ControlNetModel], list(nets))

    @property
    def has_identitynet(self) -> bool:
        """InstantID adapter + a ControlNet: the first ControlNet is IdentityNet."""
        return bool(self.controlnets) and self.raw_id_embeds

    @contextlib.contextmanager
    def _identitynet_tokens(self, batches: IdentityTokens, regions: Regions | None = None) -> Iterator[None]:
        """IdentityNet reads the identity tokens where the other ControlNets read the text; with
        ``regions`` (several people) each position of its cross-attention reads the tokens of the
        person whose region it is in."""
        net: Any = self.controlnets[0]  # a diffusers ControlNetModel (a torch module)
        weights = {}

        def tokens(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            batch = kwargs["encoder_hidden_states"].shape[0]
            kwargs["encoder_hidden_states"] = batches.for_batch(batch).to(kwargs["encoder_hidden_states"].dtype)
            if regions is not None:
                sample = args[0] if args else kwargs["sample"]
                weights["now"] = regions.weights(sample.shape[-2], sample.shape[-1], self.vae_scale_factor, sample.device,
                                                 normalise=True)
            return args, kwargs

        if regions is not None:
            regional_cross_attention(getattr(net, "_orig_mod", net), net)
        with call_hook(net, pre=tokens, region_weights=weights if regions is not None else None):
            yield

    # ---------------------------------------------------------------- the denoising loop
    #: diffusers pipelines whose loop runs a call: (without ControlNet, with); None: this class's own.
    _loop_classes: tuple[type, type] | None = None
    #: The loop's argument for the ControlNet images.
    _control_image_arg = "image"
    #: Arguments of this call that go to the loop as they are (img2img's image, strength, ...).
    _loop_inputs: dict[str, Any] = {}

    def _loop_pipeline(self):
        """The pipeline whose loop runs this call: this one, or a diffusers img2img / inpaint
        pipeline sharing its modules (``from_pipe``: nothing is copied)."""
        if self._loop_classes is None:
            return self
        cls = self._loop_classes[bool(self.controlnets)]
        loop = cls.from_pipe(self, **shared_modules(cls, self))
        loop.image_processor = self.image_processor  # the caller's, if they set their own
        if hasattr(self, "mask_processor"):
            loop.mask_processor = self.mask_processor
        loop.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return loop

    def _run_loop(self, loop, **kwargs: Any):
        """Run ``loop``'s denoising with ``kwargs`` (and the call's ``_loop_inputs``); arguments its
        pipeline does not take must keep their defaults, else a ValueError names them.

        Without an IdentityNet this pipeline (a ``StableDiffusionXLControlNetPipeline``, whose loop
        needs a ControlNet) runs plain SDXL's loop, ``StableDiffusionXLPipeline.__call__``, on
        itself: one class holds SDXL with and without IdentityNet, so loading, ``from_pipe`` and
        saving are the same for both. What that loop reads and the ControlNet class lacks or
        defines otherwise is set here: ``default_sample_size``, ``check_inputs`` and
        ``guidance_rescale``; ``tests/test_sdxl.py`` pins that list against diffusers' source."""
        if loop is not self:
            call = type(loop).__call__
        else:
            call = StableDiffusionXLControlNetPipeline.__call__ if self.controlnets else StableDiffusionXLPipeline.__call__
        params = inspect.signature(call).parameters
        kwargs = {**kwargs, **self._loop_inputs}
        defaults = {key: p.default for key, p in inspect.signature(IDStableDiffusionXLPipeline.__call__).parameters.items()}
        unsupported = sorted(key for key, value in kwargs.items()
                             if key not in params and not _is_default(value, defaults.get(key)))
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)} not supported by diffusers' {call.__qualname__.split('.')[0]}: "
                             "leave them out")
        return call(loop, **{key: value for key, value in kwargs.items() if key in params})

    @property
    def guidance_rescale(self) -> float:
        return getattr(self, "_guidance_rescale", 0.0)

    def check_inputs(self, *args, **kwargs):
        """The ControlNet pipeline's checks, or plain SDXL's when there is no ControlNet."""
        if self.controlnet is None:
            return StableDiffusionXLPipeline.check_inputs(self, *args, **kwargs)
        return super().check_inputs(*args, **kwargs)

    def kps_condition(
        self, face_kps: np.ndarray, source_size: tuple[int, int] | None, height: int | None, width: int | None
    ) -> Image.Image:
        """The IdentityNet image: keypoints of a ``source_size`` photo drawn at the output size (the
        reference draws at the photo's size and lets the ControlNet resize). ``source_size`` None:
        the keypoints are already in output pixels."""
        size = self.output_size(source_size, height, width)
        source_size = source_size or size
        scale = np.array([size[0] / source_size[0], size[1] / source_size[1]])
        return draw_kps(size, np.asarray(face_kps, dtype=np.float64) * scale)

    def _pose(self, face_image, face_kps, kps_image, face_index: int | Sequence[int]) -> tuple[np.ndarray, tuple[int, int] | None]:
        """Keypoints and the size of the photo they belong to: ``face_kps`` as given (output
        pixels), or the largest face of ``kps_image`` (the pose photo), or the ``face_index``
        face of the first face photo."""
        if face_kps is not None:
            return np.asarray(face_kps), None
        source, index = (kps_image, 0) if kps_image is not None else (face_image, face_index)
        while isinstance(source, (list, tuple)):
            source = source[0]
        index = index if isinstance(index, (int, np.integer)) else list(index)[0]
        if source is None:
            raise ValueError("IdentityNet needs keypoints: pass face_image=, kps_image= or face_kps=")
        image = load_image(source, self.face_analyzer.max_pixels)
        return self.face_analyzer.get_face(image, index).kps, image.size

    def _poses(self, face_image, face_kps, kps_image, face_index: int | Sequence[int], batch_size: int
               ) -> list[tuple[np.ndarray, tuple[int, int] | None]]:
        """IdentityNet's keypoints, one ``_pose`` for every prompt, or one per prompt: from
        ``face_kps`` (N, 5, 2), from ``kps_image`` as a list of N pose photos, or, without either,
        from ``face_image`` holding one photo (or list of photos) per prompt."""
        if face_kps is not None and np.ndim(face_kps) == 3:
            poses: list[tuple[np.ndarray, tuple[int, int] | None]] = [(np.asarray(kps), None) for kps in face_kps]
            given = "face_kps"
        elif isinstance(kps_image, (list, tuple)) and batch_size > 1:
            poses, given = [self._pose(None, None, photo, face_index) for photo in kps_image], "kps_image"
        else:
            per_prompt = face_kps is None and kps_image is None and face_image is not None and batch_size > 1
            groups = self._face_groups(face_image, batch_size) if per_prompt else []
            if len(groups) > 1:  # one identity per prompt: each photo poses its own
                return [self._pose(group[0], None, None, face_index) for group in groups]
            return [self._pose(face_image, face_kps, kps_image, face_index)]
        if len(poses) != batch_size:
            raise IdentityInputError(f"{given} gives {len(poses)} poses for {batch_size} prompts: give one for all, or "
                                     "one per prompt")
        return poses

    def _people_pose(self, photos, face_kps, people: PeopleLayout, face_index: int | Sequence[int],
                     height: int | None, width: int | None) -> tuple[np.ndarray, tuple[int, int] | None]:
        """Every person's keypoints (people, 5, 2) and the size of the photo they belong to:
        ``face_kps`` as given (output pixels), the faces of the group photo, or the face of each
        person's photo in ``photos`` (their pose photo, else their face photo) posed in their
        region (``place_kps``)."""
        regions = people.regions
        if face_kps is not None:
            kps = np.asarray(face_kps, np.float64)
            if kps.shape != (regions.count, 5, 2):
                raise IdentityInputError(f"face_kps= for {regions.count} people must have shape ({regions.count}, 5, 2), "
                                         f"got {kps.shape}")
            return kps, None
        if people.pose_faces is not None:
            return np.stack([face.kps for face in people.pose_faces]), people.pose_size
        if photos is None or len(photos) != regions.count:
            raise IdentityInputError("IdentityNet needs each person's keypoints: pass kps_image= (a photo with a face "
                                     "per person, or a list with a pose photo per person), face_kps= (people, 5, 2) "
                                     "or face_image=")
        size = self.output_size(None, height, width)
        return np.stack([place_kps(self._pose(photo, None, None, index)[0], box)
                         for photo, index, box in zip(photos, per_person(face_index, regions.count),
                                                      regions.boxes(*size))]), None

    # ---------------------------------------------------------------- call
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
        num_zero: int | None = None,
        ortho: str | None = None,
        face_kps: np.ndarray | None = None,
        kps_image: ImageInput | None = None,
        regions: RegionsInput | None = None,
        face_order: Sequence[int] | None = None,
        id_fusion: str | None = None,
        recover_words: Sequence[str] | None = None,
        image: Any = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
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
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
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
        """Generate SDXL images of the person in ``face_image`` (or given ``id_embeds``).

        Identity arguments are those of ``IDStableDiffusionPipeline``. With IdentityNet:
        ``kps_image`` takes the pose (keypoints) from another photo, ``face_kps`` (5, 2) gives
        them in output pixels; with one identity per prompt each prompt takes its own photo's pose,
        or its own of ``kps_image`` (a list, one photo per prompt) or ``face_kps`` (N, 5, 2);
        ``image`` holds the images of any further ControlNets;
        ``controlnet_conditioning_scale`` (one value, or one per ControlNet), ``guess_mode`` and
        ``control_guidance_start/end`` work as in diffusers. With no ControlNet the call runs
        plain SDXL's loop (``StableDiffusionXLPipeline.__call__``) on this pipeline. Other
        arguments are diffusers'.

        Several people: ``regions`` and ``face_order`` as in ``IDStableDiffusionPipeline``. IdentityNet
        then draws every person's keypoints in one image (from ``kps_image``'s faces, ``face_kps``
        (people, 5, 2), or the face of each person's photo posed in their region: ``kps_image`` as
        a list with one pose photo per person, else their face photos) and reads each person's
        tokens in their region.

        ``id_fusion`` / ``recover_words`` as in ``IDStableDiffusionPipeline`` (IdentityNet acts in the
        identity stream only).

        PuLID: ``num_zero`` zero identity tokens and ``ortho`` ("off", "v1", "v2"), defaults from
        its reference demo (``pulid_settings``); ``face_image`` is required (EVA-CLIP reads it),
        several photos of one person are read together (v1.1).
        """
        # 1. Check inputs
        self._check_identity_call(ip_adapter_image, ip_adapter_image_embeds)
        extra_images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        if not self.has_identitynet and (face_kps is not None or (kps_image is not None and regions is None)):
            raise ValueError(
                "kps_image= and face_kps= drive InstantID's IdentityNet, which this pipeline does not have: load an "
                "InstantID adapter and pass controlnet=load_identitynet(...) to from_pretrained, or leave them out"
            )
        expected = len(self.controlnets) - self.has_identitynet
        if len(extra_images) != expected:
            raise ValueError(
                f"image= holds {len(extra_images)} control image(s) but the pipeline has {expected} ControlNet(s) "
                "besides IdentityNet: pass one image per extra ControlNet"
            )
        device = self._execution_device

        # 2. Encode the prompt once per prompt (the parent repeats it per image)
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt, prompt_2, device, 1, True, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )

        # 3. Encode the identity (several people: side by side, each in a region); draw the IdentityNet keypoints
        tokens, negative_tokens, people = self.encode_call_identity(
            face_image, id_embeds, negative_face_image, negative_id_embeds, prompt_embeds.shape[0], face_index,
            face_weights, face_clip_embeds, s_scale, regions, kps_image, face_order,
        )
        if people is not None and people.pose_size is not None and self._loop_classes is None:
            width, height = self.output_size(people.pose_size, height, width)  # text to image: the group photo's aspect
        control_images = extra_images
        if self.has_identitynet:
            if people is not None:
                photos = kps_image if isinstance(kps_image, (list, tuple)) else face_image
                poses = [self._people_pose(photos, face_kps, people, face_index, height, width)]
            else:
                poses = self._poses(face_image, face_kps, kps_image, face_index, prompt_embeds.shape[0])
            width, height = self.output_size(poses[0][1], height, width)
            drawn = [self.kps_condition(kps, source_size, height, width) for kps, source_size in poses]
            control_images = [drawn[0] if len(drawn) == 1 else drawn, *extra_images]
        common = dict(
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,  # diffusers' IP-Adapter
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            height=height, width=width, num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
            denoising_end=denoising_end, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
            eta=eta, generator=generator, latents=latents, output_type=output_type, return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size, negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 4. Denoise and decode: the loop of the matching diffusers pipeline
        loop = self._loop_pipeline()
        with self.identity_conditioning(
            tokens, negative_tokens, num_images_per_prompt, id_scale, id_guidance_start, id_guidance_end, loop,
            None if people is None else people.regions,
            id_fusion, self.fusion_tokens(id_fusion, prompt, num_images_per_prompt, recover_words), num_zero, ortho,
        ) as batches:
            if not self.controlnets:
                output = self._run_loop(loop, guidance_rescale=guidance_rescale, **common)
            elif guidance_rescale:
                raise ValueError("guidance_rescale is not supported by diffusers' SDXL ControlNet loops")
            else:
                routing = self._identitynet_tokens(batches, None if people is None else people.regions) \
                    if self.has_identitynet else contextlib.nullcontext()
                with routing:
                    output = self._run_loop(
                        loop, **{self._control_image_arg: control_images[0] if len(control_images) == 1 else control_images},
                        controlnet_conditioning_scale=controlnet_conditioning_scale, guess_mode=guess_mode,
                        control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                        **common,
                    )
        return self._watermarked(output, output_type)


@dataclass(frozen=True)
class SDXLIdentityArgs:
    """The identity and ControlNet arguments of ``IDStableDiffusionXLPipeline.__call__`` (see its
    docstring), carried as they are from the SDXL img2img and inpainting calls."""

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
    num_zero: int | None = None
    ortho: str | None = None
    face_kps: np.ndarray | None = None
    kps_image: ImageInput | None = None
    regions: RegionsInput | None = None
    face_order: Sequence[int] | None = None
    id_fusion: str | None = None
    recover_words: Sequence[str] | None = None
    controlnet_conditioning_scale: float | list[float] = 0.8
    guess_mode: bool = False
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0


@dataclass(frozen=True)
class SDXLTextArgs:
    """The arguments diffusers' SDXL img2img and inpainting share with its text-to-image call,
    carried as they are to ``IDStableDiffusionXLPipeline.__call__``."""

    prompt: str | list[str] | None = None
    prompt_2: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    denoising_end: float | None = None
    guidance_scale: float = 5.0
    negative_prompt: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    num_images_per_prompt: int = 1
    eta: float = 0.0
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    ip_adapter_image: Any = None
    ip_adapter_image_embeds: list[torch.Tensor] | None = None
    output_type: str = "pil"
    return_dict: bool = True
    cross_attention_kwargs: dict[str, Any] | None = None
    guidance_rescale: float = 0.0
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    clip_skip: int | None = None
    callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None
    callback_on_step_end_tensor_inputs: list[str] = field(default_factory=lambda: ["latents"])


def _as_kwargs(args: SDXLIdentityArgs | SDXLTextArgs) -> dict[str, Any]:
    """A call's argument record as keyword arguments (the values themselves, not copies)."""
    return {item.name: getattr(args, item.name) for item in fields(args)}


class _IDStableDiffusionXLRedraw(IDStableDiffusionXLPipeline):
    """Shared by SDXL img2img and inpainting: the identity call of ``IDStableDiffusionXLPipeline``
    around the loop of diffusers' matching pipeline (with ControlNet or without), which shares
    this pipeline's modules. The output has the input image's size."""

    _control_image_arg = "control_image"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        controlnet: ControlNetModel | Sequence[ControlNetModel] | MultiControlNetModel | None = None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
    ):
        # The signature is diffusers' SDXL img2img / inpaint one: a refiner folder
        # (requires_aesthetics_score: true) loads, and its loop conditions on the aesthetic scores.
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, controlnet,
                         force_zeros_for_empty_prompt, add_watermarker, feature_extractor, image_encoder)
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)

    def _redraw(self, image: Any, control_image: Any, loop_inputs: dict[str, Any], text: SDXLTextArgs,
                identity: SDXLIdentityArgs):
        """``IDStableDiffusionXLPipeline.__call__`` with the redraw loop's own inputs (``image``,
        ``strength``, ...) handed to that loop; with ControlNets the output takes ``image``'s size."""
        if self.controlnets and text.height is None and text.width is None:
            height, width = self.image_processor.get_default_height_width(image)
            text = replace(text, height=height, width=width)
        self._loop_inputs = {"image": image, **loop_inputs}
        try:
            return IDStableDiffusionXLPipeline.__call__(self, image=control_image, **_as_kwargs(text),
                                                        **_as_kwargs(identity))
        finally:
            self._loop_inputs = {}


class IDStableDiffusionXLImg2ImgPipeline(_IDStableDiffusionXLRedraw):
    """SDXL img2img plus the identity arguments of ``IDStableDiffusionXLPipeline``, with InstantID's
    IdentityNet when it is the ``controlnet`` (keypoints from ``face_image``, ``kps_image`` or
    ``face_kps``, drawn at the input image's size); ``control_image`` holds further ControlNets'
    images.

    >>> pipe = IDStableDiffusionXLImg2ImgPipeline.from_pipe(text_to_image_pipe)  # keeps the adapter
    >>> image = pipe("an oil painting", image=photo, strength=0.5, face_image="me.jpg", kps_image=photo).images[0]
    """

    _loop_classes = (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLControlNetImg2ImgPipeline)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
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
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # diffusers' own default
        *,
        control_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
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
        num_zero: int | None = None,
        ortho: str | None = None,
        face_kps: np.ndarray | None = None,
        kps_image: ImageInput | None = None,
        regions: RegionsInput | None = None,
        face_order: Sequence[int] | None = None,
        id_fusion: str | None = None,
        recover_words: Sequence[str] | None = None,
    ):
        """``image`` redrawn at ``strength`` (or from ``denoising_start`` on, after a base model's
        ``denoising_end``); ``aesthetic_score`` / ``negative_aesthetic_score`` condition a refiner.
        The positional arguments are ``StableDiffusionXLImg2ImgPipeline.__call__``'s; the keyword-only
        ones are ``IDStableDiffusionXLPipeline``'s identity and ControlNet arguments, with
        ``control_image`` for further ControlNets' images and ``height``/``width`` for the
        ControlNet loop (default: ``image``'s size)."""
        text = SDXLTextArgs(
            prompt, prompt_2, height, width, num_inference_steps, timesteps, sigmas, denoising_end, guidance_scale,
            negative_prompt, negative_prompt_2, num_images_per_prompt, eta, generator, latents, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, output_type, return_dict, cross_attention_kwargs, guidance_rescale, original_size,
            crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
            negative_target_size, clip_skip, callback_on_step_end, callback_on_step_end_tensor_inputs)
        identity = SDXLIdentityArgs(
            face_image, id_embeds, id_scale, negative_face_image, negative_id_embeds, face_index, face_weights,
            id_guidance_start, id_guidance_end, face_clip_embeds, s_scale, num_zero, ortho, face_kps, kps_image,
            regions, face_order, id_fusion, recover_words, controlnet_conditioning_scale, guess_mode,
            control_guidance_start, control_guidance_end)
        return self._redraw(image, control_image, dict(
            strength=strength, denoising_start=denoising_start, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score), text, identity)


class IDStableDiffusionXLInpaintPipeline(_IDStableDiffusionXLRedraw):
    """SDXL inpainting plus the identity arguments of ``IDStableDiffusionXLPipeline`` (and IdentityNet
    as in ``IDStableDiffusionXLImg2ImgPipeline``): the white part of ``mask_image`` is repainted."""

    _loop_classes = (StableDiffusionXLInpaintPipeline, StableDiffusionXLControlNetInpaintPipeline)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
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
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # diffusers' own default
        *,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
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
        num_zero: int | None = None,
        ortho: str | None = None,
        face_kps: np.ndarray | None = None,
        kps_image: ImageInput | None = None,
        regions: RegionsInput | None = None,
        face_order: Sequence[int] | None = None,
        id_fusion: str | None = None,
        recover_words: Sequence[str] | None = None,
    ):
        """``image`` repainted under ``mask_image`` at ``strength``; ``masked_image_latents``,
        ``padding_mask_crop`` (repaint a crop around the mask, pasted back), ``denoising_start`` and
        the aesthetic scores as in diffusers' SDXL inpainting. The positional arguments are
        ``StableDiffusionXLInpaintPipeline.__call__``'s; the keyword-only ones are
        ``IDStableDiffusionXLPipeline``'s identity and ControlNet arguments (``control_image`` for
        further ControlNets' images)."""
        text = SDXLTextArgs(
            prompt, prompt_2, height, width, num_inference_steps, timesteps, sigmas, denoising_end, guidance_scale,
            negative_prompt, negative_prompt_2, num_images_per_prompt, eta, generator, latents, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, output_type, return_dict, cross_attention_kwargs, guidance_rescale, original_size,
            crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
            negative_target_size, clip_skip, callback_on_step_end, callback_on_step_end_tensor_inputs)
        identity = SDXLIdentityArgs(
            face_image, id_embeds, id_scale, negative_face_image, negative_id_embeds, face_index, face_weights,
            id_guidance_start, id_guidance_end, face_clip_embeds, s_scale, num_zero, ortho, face_kps, kps_image,
            regions, face_order, id_fusion, recover_words, controlnet_conditioning_scale, guess_mode,
            control_guidance_start, control_guidance_end)
        return self._redraw(image, control_image, dict(
            mask_image=mask_image, masked_image_latents=masked_image_latents, strength=strength,
            padding_mask_crop=padding_mask_crop, denoising_start=denoising_start, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score), text, identity)
