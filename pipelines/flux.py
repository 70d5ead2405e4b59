"""``IDFluxPipeline``: FLUX.1 with an identity, from PuLID-FLUX or InfiniteYou.

diffusers' ``FluxPipeline`` runs the loop; the identity enters through hooks registered once when
the adapter loads, which act only inside this pipeline's own calls and only in the calling thread
(``idgen.adapters.context``). A hook on the transformer tells the conditional call from true CFG's
negative one by its text embeddings and sets that branch's identity: PuLID-FLUX's tokens for the
cross-attention that follows its blocks (diffusers hooks on those blocks, inside any block cache,
so a skipped block skips its identity too), or InfiniteYou's InfuseNet residuals (the
transformer's own ``controlnet_block_samples`` arguments).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux_controlnet import retrieve_latents
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from idgen.adapters import resolve_checkpoint_file
from idgen.adapters.checkpoints import is_infiniteyou, is_pulid_flux, read_checkpoint
from idgen.adapters.context import (
    HOOK_NAME,
    ModelHooks,
    hook,
    hook_owner,
    open_identity,
    registration_lock,
    unhook,
)
from idgen.adapters.face_recognition import load_irse_recognizer
from idgen.adapters.flux import (
    INFINITEYOU_WEIGHT_NAME,
    INFUSENET_FOLDER,
    infiniteyou_projection,
    pulid_flux_adapter,
)
from idgen.errors import CheckpointError, ModelNotFoundError, NoFaceError
from idgen.faces import ImageInput, draw_kps, load_image
from idgen.faces.analyzer import check_face_weights, mean_identity

from .face_inputs import FaceImages, IDScale, PuLIDInputMixin
from .identity import id_window, layer_id_scales
from .shared import on_denoiser

#: InfiniteYou's residual groups, the names its per-block ``id_scale`` takes ("double", "single").
_INFUSENET_GROUPS = ("transformer_blocks", "single_transformer_blocks")
#: Short block names accepted in an ``id_scale`` dict.
_FLUX_ALIASES = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
#: What a loaded identity consists of (``OnDenoiser`` attributes).
_IDENTITY_PARTS = ("identity_adapter", "adapter_format", "eva_encoder", "face_parser", "infusenet", "face_recognizer")
#: Where the identity's owner keeps its hooks on the whole transformer (a ``ModelHooks``).
_MODEL_HOOKS = "_idgen_model_hooks"
#: Parts of the names of diffusers' hooks that may skip a block (``_is_block_cache``).
_BLOCK_CACHE_NAMES = ("fbc_", "cache", "skip", "broadcast")


class _FluxCall:
    """The identity of one ``IDFluxPipeline`` call, as its hooks read it while the call runs:
    ``before(negative, kwargs) -> kwargs`` ahead of each transformer forward (``negative``: true
    CFG's negative branch, told apart by its text embeddings); PuLID's cross-attention after each of
    its blocks, on ``tokens`` (None: off) at ``scales``."""

    def __init__(self, owner: torch.nn.Module, before, scales: dict[str, float] | None = None,
                 cross_attention: dict[str, torch.nn.Module] | None = None):
        self.owner, self.before = owner, before
        self.scales, self.cross_attention = scales or {}, cross_attention or {}
        self.tokens: torch.Tensor | None = None
        self.text: torch.Tensor | None = None  # the conditional branch's text embeddings

    def pre_forward(self, role: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if role != "transformer":
            return args, kwargs
        text = kwargs.get("encoder_hidden_states")
        if self.text is None:
            self.text = text
        return args, self.before(text is not self.text, kwargs)

    def post_forward(self, role: str, module: torch.nn.Module, output: Any) -> Any:
        kind, _, name = role.partition(":")
        scale = self.scales.get(name, 0.0)
        if kind != "ca" or self.tokens is None or scale == 0.0:
            return output
        text, image = output
        return text, image + scale * self.cross_attention[name](self.tokens, image)


class IDFluxPipeline(PuLIDInputMixin, FluxPipeline):
    """FLUX.1 with an identity adapter: PuLID-FLUX or InfiniteYou (``load_identity_adapter``),
    called like the other idgen pipelines (``face_image=``, ``id_embeds=``, ``id_scale=``)."""

    base_family = "flux"
    #: PuLID-FLUX's ``PuLIDFluxAdapter`` or InfiniteYou's ``InstantIDResampler`` (None: plain FLUX).
    identity_adapter: Any = on_denoiser()
    adapter_format: str | None = on_denoiser()
    #: InfiniteYou's InfuseNet (a ``FluxControlNetModel``) and ArcFace (facexlib's IR-SE50).
    infusenet: Any = on_denoiser()  # FluxControlNetModel | None
    face_recognizer: Any = on_denoiser()  # IRSEArcFace | None

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, text_encoder_2: T5EncoderModel, tokenizer_2: T5TokenizerFast,
                 transformer: FluxTransformer2DModel, image_encoder: CLIPVisionModelWithProjection | None = None,
                 feature_extractor: CLIPImageProcessor | None = None):
        # The signature is FluxPipeline's, types included: diffusers' from_pretrained and from_pipe read it.
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder, feature_extractor)
        if vae is not None:  # FluxPipeline assumes 1024 px; the VAE's own size serves any base
            self.default_sample_size = self.vae.config.sample_size // self.vae_scale_factor

    @property
    def identity_format(self) -> str | None:
        return self.adapter_format

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe``. The identity is the transformer's (``OnDenoiser``): the new
        pipeline has the one loaded into a transformer it shares; it also takes ``pipeline``'s face
        analyzer."""
        new = super().from_pipe(pipeline, **kwargs)
        if getattr(pipeline, "_face_analyzer", None) is not None:
            new._face_analyzer = pipeline._face_analyzer
        return new

    def _identity_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.identity_adapter, self.infusenet, self.eva_encoder, self.face_parser,
                            self.face_recognizer) if m is not None]

    def to(self, *args: Any, **kwargs: Any):
        """diffusers' ``to``, the identity modules going with the transformer."""
        super().to(*args, **kwargs)
        for module in self._identity_modules():
            full = module is self.face_parser or module is self.face_recognizer  # small; kept in float32
            module.to(self.transformer.device, None if full else self.transformer.dtype)
        return self

    # ---------------------------------------------------------------- loading
    def load_identity_adapter(
        self,
        pretrained_model_name_or_path_or_file: str | os.PathLike | dict,
        weight_name: str | None = None,
        subfolder: str | None = None,
        image_encoder: Any = None,
        face_parser: Any = None,
        infusenet: FluxControlNetModel | str | None = None,
        face_recognizer: Any = None,
        **hub_kwargs: Any,
    ) -> None:
        """Load PuLID-FLUX (``guozinan/PuLID``, ``weight_name="pulid_flux_v0.9.1.safetensors"``) or
        InfiniteYou (``ByteDance/InfiniteYou``, ``subfolder="infu_flux_v1.0/aes_stage2"``; its
        ``image_proj_model.bin`` by default) from a hub id, a folder, a file or a state dict; the
        format comes from the keys. The modules take the transformer's device and dtype.

        PuLID-FLUX also loads EVA02-CLIP's tower (``image_encoder``) and the face parser
        (``face_parser``), as the SDXL pipeline does. InfiniteYou also loads InfuseNet
        (``infusenet``: a ``FluxControlNetModel``, its folder or hub id; default the
        ``InfuseNetModel`` folder beside the projection file) and the ArcFace it was trained on,
        facexlib's IR-SE50 (``face_recognizer``: a module or ``recognition_arcface_ir_se50.pth``;
        default facexlib's release), which reads its ``face_image=`` photos.
        """
        if isinstance(pretrained_model_name_or_path_or_file, dict):
            path, raw = weight_name or "the given state dict", pretrained_model_name_or_path_or_file
        else:
            source = os.fspath(pretrained_model_name_or_path_or_file)
            folder = os.path.join(source, subfolder or "")
            if weight_name is None and os.path.isfile(os.path.join(folder, INFINITEYOU_WEIGHT_NAME)):
                weight_name = INFINITEYOU_WEIGHT_NAME
            if weight_name is None and not os.path.exists(source) and subfolder:  # InfiniteYou's hub layout
                weight_name = INFINITEYOU_WEIGHT_NAME
            path = resolve_checkpoint_file(source, weight_name, subfolder, **hub_kwargs)
            raw = read_checkpoint(path)
        device, dtype = self.transformer.device, self.transformer.dtype
        eva = parser = network = recognizer = None
        if is_pulid_flux(raw):
            adapter, format = pulid_flux_adapter(raw, path), "pulid_flux"
            adapter.positions(self.transformer)
            eva, parser = self._pulid_encoders(image_encoder, face_parser, device, dtype)
        elif is_infiniteyou(raw):
            adapter, format = infiniteyou_projection(raw, path), "infiniteyou"
            width = self.transformer.config.joint_attention_dim
            if adapter.config.output_dim != width:
                raise CheckpointError(f"{path}: InfiniteYou's projection makes {adapter.config.output_dim}-d tokens, "
                                      f"but this transformer reads {width}-d text: use the adapter made for this base")
            network = self._load_infusenet(infusenet, pretrained_model_name_or_path_or_file, path, weight_name, subfolder,
                                           hub_kwargs)
            recognizer = load_irse_recognizer(face_recognizer).to(device)
        else:
            raise CheckpointError(
                f"{path} is not a FLUX identity adapter: IDFluxPipeline runs PuLID-FLUX (pulid_flux_v0.9.x.safetensors) "
                "and InfiniteYou (image_proj_model.bin beside InfuseNetModel/); SD1.5 and SDXL adapters load into "
                "IDStableDiffusionPipeline and IDStableDiffusionXLPipeline")
        if format != "pulid_flux" and (image_encoder is not None or face_parser is not None):
            raise ValueError(f"image_encoder= and face_parser= are PuLID's; {path} is {format}: leave them out")
        if format != "infiniteyou" and (infusenet is not None or face_recognizer is not None):
            raise ValueError(f"infusenet= and face_recognizer= are InfiniteYou's; {path} is {format}: leave them out")
        # Everything is built and checked; a failure while it goes in puts the old identity back.
        before = {name: getattr(self, name) for name in _IDENTITY_PARTS}
        self.unload_identity_adapter()
        try:
            self._install_identity(dict(zip(_IDENTITY_PARTS, (adapter.to(device, dtype).eval(), format, eva, parser,
                                                               network, recognizer))))
        except BaseException:
            self.unload_identity_adapter()
            if before["identity_adapter"] is not None:
                self._install_identity(before)
            raise

    def _install_identity(self, parts: dict[str, Any]) -> None:
        for name, value in parts.items():
            setattr(self, name, value)
        self._attach_identity()

    def _load_infusenet(self, infusenet: Any, source: Any, path: str, weight_name: str | None, subfolder: str | None,
                        hub_kwargs: dict) -> FluxControlNetModel:
        """InfuseNet: given, or ``InfuseNetModel/`` beside the projection file, locally or in its hub repo."""
        if isinstance(infusenet, FluxControlNetModel):
            network = infusenet
        else:
            local = os.path.join(os.path.dirname(path), INFUSENET_FOLDER)
            if infusenet is None and os.path.isdir(local):
                where, kwargs = local, {}
            elif infusenet is None and isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
                folder = (subfolder, os.path.dirname(weight_name or ""), INFUSENET_FOLDER)
                where, kwargs = os.fspath(source), dict(subfolder="/".join(filter(None, folder)))
            else:
                where, kwargs = infusenet, {}
            if where is None:
                raise ModelNotFoundError(f"InfiniteYou runs InfuseNet, found neither beside {path} ({INFUSENET_FOLDER}/) "
                                         "nor given: pass infusenet= (its folder, hub id or FluxControlNetModel)")
            try:
                network = FluxControlNetModel.from_pretrained(where, **kwargs, **hub_kwargs)
            except Exception as err:  # missing folder or repo, offline, not a FluxControlNetModel
                raise ModelNotFoundError(f"could not load InfiniteYou's InfuseNet from {where} ({type(err).__name__}): "
                                         "pass infusenet= with its InfuseNetModel folder or hub id") from None
        config, base = network.config, self.transformer.config
        if config.joint_attention_dim != base.joint_attention_dim or config.attention_head_dim != base.attention_head_dim \
                or config.num_attention_heads != base.num_attention_heads:
            raise CheckpointError("InfiniteYou's InfuseNet does not fit this transformer (its width or text width "
                                  "differ): use the InfuseNet made for this base")
        return network.to(self.transformer.device, self.transformer.dtype).eval()

    def unload_identity_adapter(self) -> None:
        """Remove the identity modules and their hooks: the pipeline is plain FLUX again."""
        self._detach_identity()
        self.identity_adapter = self.adapter_format = self.infusenet = self.eva_encoder = self.face_parser = None
        self.face_recognizer = None

    # ---------------------------------------------------------------- identity tokens
    def encode_identity(self, face_image: FaceImages, batch_size: int = 1, face_index: int = 0,
                        face_weights: Sequence[float] | None = None) -> torch.Tensor:
        """ArcFace ``id_embeds`` (N, 512) of face photos; InfiniteYou's from its own recognizer
        (facexlib's IR-SE50 on the face aligned at 112 px), several photos of one person averaged
        (weighted by ``face_weights``) and normalised again."""
        if self.adapter_format != "infiniteyou":
            return super().encode_identity(face_image, batch_size, face_index, face_weights)
        groups = self._face_groups(face_image, batch_size)
        weights = face_weights if len(groups) == 1 else None
        rows = []
        with self._on(self._execution_device, self.face_recognizer):
            for photos in groups:
                check_face_weights(weights, len(photos))
                embeds = self.face_recognizer.embed(self.face_analyzer.face_crops(photos, face_index, 112))
                rows.append(mean_identity(embeds.cpu().numpy(), weights))
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    @torch.no_grad()
    def encode_id_tokens(
        self,
        face_image: FaceImages | None,
        id_embeds: torch.Tensor | None,
        batch_size: int = 1,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
        negative_face_image: FaceImages | None = None,
        negative_id_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Identity tokens, one row per prompt, and the negative ones (PuLID's, for true CFG: its
        encoder on ``negative_id_embeds``, zeros by default; InfiniteYou has none: None)."""
        if self.identity_adapter is None:
            raise RuntimeError("no identity adapter is loaded: call pipe.load_identity_adapter(...) before generating")
        face_image, eva_photos = self._identity_photos(face_image, id_embeds)
        if not self.is_pulid and (negative_face_image is not None or negative_id_embeds is not None):
            raise ValueError("InfiniteYou defines no negative identity (its negative branch runs without InfuseNet): "
                             "leave negative_face_image= and negative_id_embeds= out")
        id_embeds, negative_id_embeds = self.prepare_id_embeds(face_image, id_embeds, negative_face_image,
                                                               negative_id_embeds, batch_size, face_index, face_weights)
        device, dtype = self._execution_device, self.transformer.dtype
        if self.is_pulid:
            positive = self._batch_id_embeds(id_embeds, batch_size, "id_embeds", 2)
            negative = torch.zeros_like(positive) if negative_id_embeds is None else \
                self._batch_id_embeds(negative_id_embeds, batch_size, "negative_id_embeds", 2)
            with self._on(device, self.identity_adapter, self.eva_encoder, self.face_parser):
                tokens = self.pulid_tokens(self.identity_adapter.pulid_encoder, positive, negative, eva_photos,
                                           negative_face_image, face_index)
            return tokens[0].to(dtype), tokens[1].to(dtype)
        projection = self.identity_adapter
        id_embeds = self._batch_id_embeds(id_embeds, batch_size, "id_embeds")
        if id_embeds.shape[-1] != projection.id_embed_dim:
            raise ValueError(f"id_embeds must be {projection.id_embed_dim}-d ArcFace vectors, got {tuple(id_embeds.shape)}")
        with self._on(device, projection):
            return projection(id_embeds.to(device, projection.dtype)[:, None]).to(dtype), None

    def kps_control(self, control_image: ImageInput | None, width: int, height: int, face_index: int = 0):
        """InfiniteYou's InfuseNet condition: the keypoints of ``control_image``'s face (its
        ``face_index``-th largest) where they fall once the photo is fitted, centred, into the
        output size (the reference's resize and pad), drawn on black; a black image without one.
        The face is found in the photo at its own resolution, so small outputs still see it."""
        if control_image is None:
            return Image.new("RGB", (width, height))
        photo = load_image(control_image, self.max_pixels)
        faces = self.face_analyzer.analyze(photo)
        if len(faces) <= face_index:
            raise NoFaceError(f"control_image has {len(faces)} face(s): InfuseNet's control needs a face to pose the "
                              "person (or leave control_image= out)")
        scale = min(width / photo.width, height / photo.height)
        offset = np.array([(width - photo.width * scale) / 2, (height - photo.height * scale) / 2])
        return draw_kps((width, height), np.asarray(faces[face_index].kps) * scale + offset)

    def _control_latents(self, image, batch: int, generator, device: torch.device) -> torch.Tensor:
        """The control image as InfuseNet reads it: VAE-encoded (sampled), shifted, scaled, packed."""
        pixels = FluxControlNetPipeline.prepare_image(self, image, image.width, image.height, batch, 1, device,
                                                      self.vae.dtype)
        latents = retrieve_latents(self.vae.encode(pixels), generator=generator)
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return self._pack_latents(latents, batch, latents.shape[1], latents.shape[2], latents.shape[3])

    # ---------------------------------------------------------------- calling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        face_image: FaceImages | None = None,
        id_embeds: torch.Tensor | None = None,
        id_scale: IDScale | None = None,
        id_guidance_start: float = 0.0,
        id_guidance_end: float = 1.0,
        id_start_step: int = 0,
        negative_face_image: FaceImages | None = None,
        negative_id_embeds: torch.Tensor | None = None,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
        control_image: ImageInput | None = None,
        infusenet_conditioning_scale: float = 1.0,
        infusenet_guidance_start: float = 0.0,
        infusenet_guidance_end: float = 1.0,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # diffusers' own default
        max_sequence_length: int = 512,
    ):
        """FluxPipeline's call with the identity of ``face_image`` (one photo, several of one person,
        or one per prompt) or ``id_embeds``.

        ``id_scale``: a float, or per block a dict (``"double"``, ``"single"`` or a block prefix such
        as ``"transformer_blocks.4"``); None: the method's default (``idgen.formats``). The identity acts at the steps inside
        ``id_guidance_start/end`` (fractions of the loop) from step ``id_start_step`` on (PuLID's
        "timestep to start inserting ID"). True CFG (``true_cfg_scale`` > 1 with
        ``negative_prompt``) gives PuLID's negative branch its unconditional identity
        (``negative_face_image`` / ``negative_id_embeds``, zeros by default) and InfiniteYou's none.

        InfiniteYou: ``control_image`` poses the face (its keypoints; black without one);
        InfuseNet's residuals are scaled by ``infusenet_conditioning_scale`` times ``id_scale`` and
        act where both ``infusenet_guidance_start/end`` and the identity window allow.
        """
        # 1. Check inputs
        self._check_identity_call(ip_adapter_image, ip_adapter_image_embeds)
        if not 0.0 <= id_guidance_start < id_guidance_end <= 1.0 or not 0.0 <= infusenet_guidance_start < infusenet_guidance_end <= 1.0:
            raise ValueError("need 0 <= start < end <= 1 for id_guidance_start/end and infusenet_guidance_start/end")
        if id_start_step < 0:
            raise ValueError(f"id_start_step counts loop steps from 0, got {id_start_step}")
        if self.adapter_format != "infiniteyou" and (control_image is not None or infusenet_conditioning_scale != 1.0
                                                     or (infusenet_guidance_start, infusenet_guidance_end) != (0.0, 1.0)):
            raise ValueError("control_image= and infusenet_* are InfiniteYou's: this pipeline has no InfuseNet loaded")
        batch_size = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        if prompt is None and prompt_embeds is not None:
            batch_size = len(prompt_embeds)

        # 2. Encode the identity; InfiniteYou's pose for InfuseNet
        tokens, negative_tokens = self.encode_id_tokens(face_image, id_embeds, batch_size, face_index, face_weights,
                                                        negative_face_image, negative_id_embeds)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        control = None
        if self.adapter_format == "infiniteyou":
            with self._on(self._execution_device, self.vae):
                control = self._control_latents(self.kps_control(control_image, width, height, face_index),
                                                batch_size * num_images_per_prompt, generator, self._execution_device)
        window = (max(id_guidance_start, infusenet_guidance_start), min(id_guidance_end, infusenet_guidance_end)) \
            if control is not None else (id_guidance_start, id_guidance_end)
        if window[0] >= window[1]:
            raise ValueError(f"InfuseNet's window {infusenet_guidance_start}-{infusenet_guidance_end} and the identity's "
                             f"{id_guidance_start}-{id_guidance_end} do not overlap: the identity would never act")

        # 3. Encode the prompt, denoise and decode: FluxPipeline's own call, the transformer conditioned on the identity
        with self.identity_conditioning(tokens, negative_tokens, num_images_per_prompt, id_scale, *window,
                                        id_start_step, control, infusenet_conditioning_scale):
            output = super().__call__(
                prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
                true_cfg_scale=true_cfg_scale, height=height, width=width, num_inference_steps=num_inference_steps,
                sigmas=sigmas, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                generator=generator, latents=latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                negative_ip_adapter_image=negative_ip_adapter_image,
                negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
                negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                output_type=output_type, return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                max_sequence_length=max_sequence_length,
            )
        return self._watermarked(output, output_type)

    @contextlib.contextmanager
    def identity_conditioning(
        self,
        tokens: torch.Tensor,
        negative_tokens: torch.Tensor | None,
        num_images_per_prompt: int = 1,
        id_scale: IDScale | None = None,
        id_guidance_start: float = 0.0,
        id_guidance_end: float = 1.0,
        id_start_step: int = 0,
        control: torch.Tensor | None = None,
        infusenet_conditioning_scale: float = 1.0,
    ) -> Iterator[None]:
        """Condition the transformer on the identity while the block runs, in this thread; plain
        again after, and for every other caller meanwhile."""
        id_scale = self.default_id_scale(id_scale)
        tokens = tokens.repeat_interleave(num_images_per_prompt, dim=0)
        if negative_tokens is not None:
            negative_tokens = negative_tokens.repeat_interleave(num_images_per_prompt, dim=0)
        progress = {"step": -1}

        def acting(step: int) -> bool:  # outside a call (training) the loop is one step
            total = max(getattr(self, "_num_timesteps", 1), 1)
            return step >= id_start_step and id_window(step, total, id_guidance_start, id_guidance_end)

        self._attach_identity()
        if self.adapter_format == "pulid_flux":
            adapter = self.identity_adapter
            names = adapter.positions(self.transformer)
            scales = layer_id_scales(names, id_scale, _FLUX_ALIASES)
            modules = [adapter]

            def before(negative: bool, kwargs: dict) -> dict:
                if not negative:
                    progress["step"] += 1
                call.tokens = (negative_tokens if negative else tokens) if acting(progress["step"]) else None
                return kwargs

            call = _FluxCall(adapter, before, scales, dict(zip(names, adapter.pulid_ca)))
        else:
            network = self.infusenet
            scales = layer_id_scales(list(_INFUSENET_GROUPS), id_scale, _FLUX_ALIASES)
            modules = [network]
            text_ids = torch.zeros(tokens.shape[1], 3, device=tokens.device, dtype=tokens.dtype)

            def before(negative: bool, kwargs: dict) -> dict:
                if not negative:
                    progress["step"] += 1
                if negative or not acting(progress["step"]):
                    return kwargs
                guidance = None
                if network.config.guidance_embeds:  # the reference's InfuseNet guidance: 1
                    guidance = torch.ones(len(tokens), device=tokens.device, dtype=torch.float32)
                double, single = network(
                    hidden_states=kwargs["hidden_states"], controlnet_cond=control.to(kwargs["hidden_states"].dtype),
                    conditioning_scale=infusenet_conditioning_scale, timestep=kwargs["timestep"], guidance=guidance,
                    pooled_projections=kwargs["pooled_projections"], encoder_hidden_states=tokens,
                    txt_ids=text_ids, img_ids=kwargs["img_ids"], joint_attention_kwargs=kwargs.get("joint_attention_kwargs"),
                    return_dict=False)
                scale_double, scale_single = (scales[group] for group in _INFUSENET_GROUPS)
                return dict(kwargs, controlnet_block_samples=None if double is None else [s * scale_double for s in double],
                            controlnet_single_block_samples=None if single is None else [s * scale_single for s in single],
                            controlnet_blocks_repeat=network.input_hint_block is not None)

            call = _FluxCall(network, before)
        with self._on(self._execution_device, *modules), open_identity(call):
            yield call

    def _attach_identity(self) -> None:
        """Hook the transformer for the loaded identity (once; again if it was compiled or its
        hooks were taken off): the whole model, and PuLID's blocks, whose hooks must sit inside any
        block cache so that a skipped block skips its identity too."""
        transformer = self.transformer
        base = getattr(transformer, "_orig_mod", transformer)
        owner = self.identity_adapter if self.adapter_format == "pulid_flux" else self.infusenet
        blocks = owner.positions(base) if self.adapter_format == "pulid_flux" else []
        if self.adapter_format == "infiniteyou" and any(_is_block_cache(name) for _, block in _blocks(base)
                                                       for name in _hook_names(block)):
            raise ValueError("InfiniteYou adds InfuseNet's residuals between the transformer's blocks, which a block "
                             "cache (first-block, MagCache) would count twice: call pipe.transformer.disable_cache() "
                             "for InfiniteYou, or use PuLID-FLUX")
        with registration_lock():
            for name in blocks:
                block = base.get_submodule(name)
                if hook_owner(block) is not owner:
                    hook(block, owner, f"ca:{name}")
                order = _hook_names(block)
                if any(_is_block_cache(other) for other in order[:order.index(HOOK_NAME)]):
                    raise ValueError("a cache was enabled on the transformer before the identity adapter was loaded, "
                                     "so it cannot skip the identity with its blocks: call pipe.transformer.disable_cache(), "
                                     "load the identity adapter, then enable the cache")
            owner.__dict__.setdefault(_MODEL_HOOKS, ModelHooks()).follow(transformer, owner, "transformer")

    def _detach_identity(self) -> None:
        owner = self.identity_adapter if self.adapter_format == "pulid_flux" else self.infusenet
        if owner is None:
            return
        base = getattr(self.transformer, "_orig_mod", self.transformer)
        with registration_lock():
            for _, block in _blocks(base):
                if hook_owner(block) is owner:
                    unhook(block)
            if _MODEL_HOOKS in owner.__dict__:
                owner.__dict__[_MODEL_HOOKS].remove()


def _blocks(transformer: Any) -> list[tuple[str, torch.nn.Module]]:
    return [(f"{group}.{i}", block) for group in _INFUSENET_GROUPS for i, block in enumerate(getattr(transformer, group))]


def _hook_names(module: torch.nn.Module) -> list[str]:
    """The diffusers hooks on ``module``, innermost first."""
    registry = getattr(module, "_diffusers_hook", None)
    return [] if registry is None else list(registry.hooks)


def _is_block_cache(hook_name: str) -> bool:
    """Whether a diffusers hook may skip its block and hand back a cached output: first-block
    cache (``fbc_*``), MagCache, SeaCache, FasterCache, pyramid attention broadcast, layer skip."""
    return any(part in hook_name for part in _BLOCK_CACHE_NAMES)


__all__ = ["IDFluxPipeline"]
