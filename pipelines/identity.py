"""What every idgen pipeline adds to its diffusers parent: loading an identity adapter,
turning face photos into ArcFace ``id_embeds`` and ``id_embeds`` into identity tokens."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch
from transformers import CLIPVisionModelWithProjection
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from idgen.adapters import (
    AdapterSpec,
    FaceIDPlusProjection,
    FaceIDProjection,
    FusedLoRA,
    IdentityAdapter,
    InstantIDResampler,
    LoRALayers,
    build_identity_adapter,
    check_adapter,
    check_portrait_faces,
    detect_format,
    faceid_lora_layers,
    load_adapter_state_dict,
    peft_lora_state_dict,
    resolve_checkpoint_file,
)
from idgen.adapters.attention import IdentityCall
from idgen.adapters.context import open_identity
from idgen.adapters.eva_clip import EVAVisionTower, load_eva_tower
from idgen.adapters.face_parsing import load_face_parser
from idgen.adapters.fusion import StreamFusion, attribute_tokens
from idgen.adapters.pulid import PULID_DEFAULTS, eva_face_pixels, pulid_settings
from idgen.adapters.regions import Regions
from idgen.errors import CheckpointError, IdentityInputError, ModelNotFoundError, NoFaceError
from idgen.faces import DEFAULT_MAX_PIXELS, Face, FaceAnalyzer, ImageInput, load_image
from idgen.formats import ID_LORA_NAME, Method, formats_run_by, method_of, wrong_pipeline_message
from idgen.watermark import embed

FaceImages = ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]]

#: FaceID-Plus's image encoder (CLIP ViT-H/14), in ``models/image_encoder`` of this repo.
PLUS_IMAGE_ENCODER = "h94/IP-Adapter"
SDXL_CROSS_ATTENTION_DIM = 2048
#: PuLID's checkpoint formats (v1.1, v1).
PULID_FORMATS = tuple(PULID_DEFAULTS)
#: PuLID's face crop for parsing and EVA-CLIP (FFHQ-aligned, as facexlib's).
PULID_CROP_SIZE = 512
_NO_ENCODER = object()  # no FaceID-Plus image encoder to take out on unload


#: Where an identity's loaded parts are kept: on the UNet or transformer they are attached to.
_IDENTITY_RECORD = "_idgen_identity"


class OnDenoiser:
    """A pipeline attribute kept on the pipeline's denoiser (its UNet, else its transformer), not
    on the pipeline: every pipeline that shares the model sees the same loaded identity, including
    one made with ``from_pipe`` from a plain diffusers pipeline in between, so an identity is never
    lost with the pipeline object nor loaded twice into one model."""

    def __init__(self, default: Any = None):
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @staticmethod
    def model(pipe: Any) -> torch.nn.Module | None:
        model = getattr(pipe, "unet", None)
        if model is None:
            model = getattr(pipe, "transformer", None)
        return getattr(model, "_orig_mod", model)  # a torch.compile'd model: the record is on the model it wraps

    def __get__(self, pipe: Any, owner: type | None = None) -> Any:
        if pipe is None:
            return self
        record = getattr(self.model(pipe), _IDENTITY_RECORD, None)
        return self.default if record is None else record.get(self.name, self.default)

    def __set__(self, pipe: Any, value: Any) -> None:
        model = self.model(pipe)
        if model is None:
            raise RuntimeError("an identity is attached to the pipeline's UNet or transformer, and this pipeline has none")
        model.__dict__.setdefault(_IDENTITY_RECORD, {})[self.name] = value


IDScale = float | dict
#: Where several people go: one mask or (x0, y0, x1, y1) box per person, or "faces" (of kps_image).
RegionsInput = str | Sequence[Any]


class _DropMessages(logging.Filter):
    """Drops log records containing any of ``fragments``: diffusers notices that do not apply."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


# ModelMixin.to(dtype=...) warns about modules "kept in float32" even when there are none.
logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropMessages("should be kept in float32: []"))


@contextlib.contextmanager
def _quiet_lora_loading() -> Iterator[None]:
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


#: Short block names accepted in an ``id_scale`` dict.
_BLOCK_ALIASES = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


def layer_id_scales(names: Sequence[str], id_scale: IDScale, aliases: dict[str, str] = _BLOCK_ALIASES
                    ) -> dict[str, float]:
    """Scale of each identity layer from a float or a dict of name prefixes.

    Dict keys are ``aliases`` (the UNet's ``"down"``, ``"mid"``, ``"up"``) or any prefix of a layer
    name (``"up_blocks.1"``, ``"up_blocks.1.attentions.0"``, ...); the longest matching prefix wins,
    and layers no key matches get 0 (as diffusers' ``set_ip_adapter_scale`` does).
    """
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


def shared_modules(cls: type, pipeline: Any) -> dict[str, Any]:
    """``pipeline``'s modules that a ``cls`` pipeline takes, by name: diffusers' ``from_pipe`` drops
    a module whose class is not the one ``cls``'s signature names (a TAESD VAE, a subclassed UNet)
    and then refuses the pipeline; passed by name, it is kept."""
    expected, _ = cls._get_signature_keys(cls)
    return {name: module for name, module in pipeline.components.items() if name in expected}


def _as_tensor(embeds: Any) -> torch.Tensor | None:
    """ArcFace vectors as given (tensor), or from numpy arrays and lists (as float32)."""
    if embeds is None or isinstance(embeds, torch.Tensor):
        return embeds
    return torch.as_tensor(np.asarray(embeds, np.float32))


class FaceInputMixin:
    """Face photos -> ArcFace ``id_embeds``: shared by every idgen pipeline."""

    _face_analyzer: FaceAnalyzer | None = None
    #: The base family this pipeline runs ("sd15", "sdxl", "flux", "arc2face"): with the loaded
    #: checkpoint format, it picks the method's row in ``idgen.formats``.
    base_family: str = "sd15"

    @property
    def identity_format(self) -> str | None:
        """The loaded identity's checkpoint format (``idgen.adapters.detect_format``'s name), or None."""
        return None

    @property
    def identity_method(self) -> Method | None:
        """The registry's row (``idgen.formats``) for the loaded identity on this pipeline's family:
        what it reads from the photos and its defaults."""
        return None if self.identity_format is None else method_of(self.identity_format, self.base_family)

    @property
    def raw_id_embeds(self) -> bool:
        """Whether identities from photos keep the recognizer's raw scale (InstantID, PuLID) or unit norm."""
        return self.identity_method is not None and self.identity_method.raw_id_embeds

    @property
    def per_photo_id_embeds(self) -> bool:
        """Whether several photos of one person stay apart, (n, 512) per identity (FaceID-Portrait,
        PuLID), instead of being averaged into one vector."""
        return self.identity_method is not None and self.identity_method.per_photo

    def default_id_scale(self, id_scale: IDScale | None) -> IDScale:
        """``id_scale``, or when None the method's (its reference demo's: InstantID and PuLID 0.8)."""
        if id_scale is not None:
            return id_scale
        return 1.0 if self.identity_method is None else self.identity_method.id_scale

    @property
    def face_analyzer(self) -> FaceAnalyzer:
        """The analyzer used for ``face_image=``; insightface's ``buffalo_l`` pack unless set."""
        if self._face_analyzer is None:
            self._face_analyzer = FaceAnalyzer()
        return self._face_analyzer

    def set_face_analyzer(self, analyzer: FaceAnalyzer) -> None:
        self._face_analyzer = analyzer

    @property
    def max_pixels(self) -> int:
        """The largest photo accepted: the face analyzer's limit, without loading one."""
        return DEFAULT_MAX_PIXELS if self._face_analyzer is None else self._face_analyzer.max_pixels

    #: Whether images leave the pipeline with idgen's invisible mark (``idgen.watermark``).
    _watermark: bool = False

    def set_watermark(self, enabled: bool = True) -> None:
        """Write idgen's invisible watermark into every image this pipeline returns (PIL or numpy
        output). The CLI, demo and ``idgen eval`` write it themselves, with their settings' hash."""
        self._watermark = enabled

    def _watermarked(self, output: Any, output_type: str | None) -> Any:
        """``output`` with its images marked, when the watermark is on."""
        if not self._watermark:
            return output

        images = output[0] if isinstance(output, tuple) else output.images
        if output_type == "pil":
            marked = [embed(image) for image in images]
        elif output_type == "np":
            marked = np.stack([np.asarray(embed((image * 255).round().astype(np.uint8)), np.float32) / 255 for image in images])
        else:
            raise ValueError(f"the watermark is written into images, not output_type={output_type!r}: use 'pil' or 'np', "
                             "or pipe.set_watermark(False)")
        if isinstance(output, tuple):
            return (marked, *output[1:])
        output.images = marked
        return output

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
        person, whose embeddings are averaged (weighted by ``face_weights``), or with
        ``per_photo_id_embeds`` kept apart: (N, n, 512).
        """
        groups = self._face_groups(face_image, batch_size)
        weights = face_weights if len(groups) == 1 else None
        if not self.per_photo_id_embeds:
            return torch.from_numpy(np.stack([self.face_analyzer.identity(g, face_index, weights, self.raw_id_embeds)
                                              for g in groups]))
        if face_weights is not None:
            raise ValueError("face_weights= weighs photos that are averaged, but this adapter makes tokens from each "
                             "photo: leave it out")
        if len({len(g) for g in groups}) > 1:
            raise ValueError(f"each identity needs the same number of photos, got {[len(g) for g in groups]}")
        return torch.from_numpy(np.stack([self.face_analyzer.embeddings(g, face_index, self.raw_id_embeds) for g in groups]))

    @staticmethod
    def _face_groups(face_image: FaceImages, batch_size: int) -> list[list[ImageInput]]:
        """The photos of each identity: one photo; one per prompt; or several of one person."""
        if not isinstance(face_image, (list, tuple)):
            return [[face_image]]
        if face_image and all(isinstance(item, (list, tuple)) for item in face_image):
            return [list(item) for item in face_image]
        if batch_size > 1 and len(face_image) == batch_size:
            return [[item] for item in face_image]
        return [list(face_image)]

    def pose_faces(self, kps_image: ImageInput, people: int, face_order: Sequence[int] | None = None
                   ) -> tuple[list[Face], tuple[int, int]]:
        """The faces of a group photo that ``people`` identities take, and the photo's size: the
        ``people`` largest, left to right; or ``face_order[i]``, counting all faces left to right,
        for person ``i``."""
        photo = load_image(kps_image, self.face_analyzer.max_pixels)
        faces = self.face_analyzer.analyze(photo)
        if len(faces) < people:
            raise NoFaceError(f"kps_image has {len(faces)} face(s) for {people} people: use a photo with a face per "
                              "person, or give regions= as masks or boxes")
        left_to_right = lambda chosen: sorted(chosen, key=lambda face: face.bbox[0] + face.bbox[2])
        if face_order is None:
            return left_to_right(faces[:people]), photo.size
        order = [int(i) for i in face_order]
        if len(order) != people or len(set(order)) != people or not all(0 <= i < len(faces) for i in order):
            raise IdentityInputError(f"face_order={list(face_order)} must give {people} different faces of kps_image, "
                                     f"each 0..{len(faces) - 1} counting left to right")
        everyone = left_to_right(faces)
        return [everyone[i] for i in order], photo.size

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
        if negative_face_image is not None:  # its largest face: face_index picks among the face photos'
            negative_id_embeds = self.encode_identity(negative_face_image, batch_size)
        return _as_tensor(id_embeds), _as_tensor(negative_id_embeds)

    @staticmethod
    def _batch_id_embeds(id_embeds: torch.Tensor, batch_size: int, name: str, row_ndim: int = 1) -> torch.Tensor:
        """One row per prompt: (N, 512), or (N, n, 512) for photos kept apart, (N, L, C) for CLIP
        features; a single row (no N) serves every prompt."""
        if id_embeds.ndim == row_ndim:
            id_embeds = id_embeds[None]
        if id_embeds.ndim != row_ndim + 1:
            raise ValueError(f"{name} must have {row_ndim} dimensions, or {row_ndim + 1} with one row per prompt; "
                             f"got shape {tuple(id_embeds.shape)}")
        if id_embeds.shape[0] == 1:
            return id_embeds.expand(batch_size, *id_embeds.shape[1:])
        if id_embeds.shape[0] != batch_size:
            raise ValueError(
                f"{name} holds {id_embeds.shape[0]} identities for {batch_size} prompts: "
                "pass one identity, or one per prompt"
            )
        return id_embeds


class PuLIDInputMixin(FaceInputMixin):
    """PuLID's face inputs, shared by its SDXL and FLUX pipelines: EVA02-CLIP features of the
    parsed face, joined with the ArcFace vectors by its ID encoder into identity tokens."""

    #: PuLID's face encoders: EVA02-CLIP's vision tower and the face parser (set by loading PuLID).
    eva_encoder = OnDenoiser()
    face_parser = OnDenoiser()

    def _check_identity_inputs(self, face_image: Any, id_embeds: Any) -> None:
        """Exactly one of ``face_image`` and ``id_embeds``; PuLID takes both (its EVA-CLIP reads the
        photos, ``id_embeds`` then stand for their ArcFace vectors)."""
        if (face_image is None) == (id_embeds is None) and not (self.is_pulid and face_image is not None):
            raise ValueError("pass exactly one of face_image= and id_embeds=")

    def _identity_photos(self, face_image: FaceImages | None, id_embeds: Any
                         ) -> tuple[FaceImages | None, FaceImages | None]:
        """The checked identity inputs split by reader: (the photos ArcFace reads, None when
        ``id_embeds`` stand for them; the photos PuLID's EVA reads, None for other adapters)."""
        self._check_identity_inputs(face_image, id_embeds)
        eva_photos = face_image if self.is_pulid else None  # PuLID's EVA reads the photos even beside id_embeds
        return (None if eva_photos is not None and id_embeds is not None else face_image), eva_photos

    @staticmethod
    def _pulid_encoders(image_encoder: Any, face_parser: Any, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        """PuLID's EVA02-CLIP tower and face parser, on ``device`` (the tower in ``dtype``)."""
        tower = image_encoder if isinstance(image_encoder, torch.nn.Module) else load_eva_tower(image_encoder)
        if not isinstance(tower, EVAVisionTower):
            raise ValueError(f"PuLID's image_encoder is an EVAVisionTower (EVA02-CLIP), got {type(tower).__name__}")
        return tower.to(device, dtype), load_face_parser(face_parser).to(device)

    @torch.no_grad()
    def encode_face_eva(self, face_image: FaceImages, batch_size: int = 1, face_index: int = 0
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """PuLID's EVA02-CLIP features of each identity's photos: the normalised image embeddings
        (N, n, 768) and five hidden states (N, n * L, C), the photos' tokens side by side. Each
        photo's face is aligned to FFHQ's template at 512 px and parsed; EVA sees it grey on white."""
        device = self._execution_device
        parser, tower = self.face_parser.to(device), self.eva_encoder.to(device)
        embeds, hidden = [], []
        for photos in self._face_groups(face_image, batch_size):
            crops = self.face_analyzer.face_crops(photos, face_index, PULID_CROP_SIZE, template="ffhq")
            embed, states = tower(eva_face_pixels(crops, parser, tower.config.image_size))
            embeds.append(torch.nn.functional.normalize(embed.float(), dim=-1))
            hidden.append([state.reshape(1, -1, state.shape[-1]) for state in states])
        return torch.stack(embeds), [torch.cat(level) for level in zip(*hidden)]

    def pulid_tokens(self, projection: torch.nn.Module, id_embeds: torch.Tensor, negative_id_embeds: torch.Tensor,
                     face_image: FaceImages | None, negative_face_image: FaceImages | None, face_index: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """PuLID's identity tokens: its ID encoder on each identity's raw ArcFace vectors (N, n, 512)
        joined with EVA's features of the same photos; the negative's EVA features are its photo's,
        else zeros (the reference's unconditional input)."""
        if face_image is None:
            raise IdentityInputError("PuLID also reads EVA-CLIP features of the face photo: pass face_image= (with "
                                     "id_embeds=, one vector per photo, if you have them)")
        device = self._execution_device

        def for_each_row(eva: tuple[torch.Tensor, list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            """One identity's EVA features for every prompt (one photo, or photos of one person, for N prompts)."""
            if len(eva[0]) == len(id_embeds):
                return eva
            return eva[0].expand(len(id_embeds), *eva[0].shape[1:]), [level.expand(len(id_embeds), *level.shape[1:])
                                                                       for level in eva[1]]

        positive_eva = for_each_row(self.encode_face_eva(face_image, len(id_embeds), face_index))
        if positive_eva[0].shape[1] != id_embeds.shape[1]:
            raise IdentityInputError(f"id_embeds holds {id_embeds.shape[1]} vector(s) per identity for "
                                     f"{positive_eva[0].shape[1]} face photo(s): give one per photo")
        if negative_face_image is not None:
            negative_eva = for_each_row(self.encode_face_eva(negative_face_image, len(id_embeds)))
        elif negative_id_embeds.shape[1] != id_embeds.shape[1]:
            raise IdentityInputError(f"the negative identity has {negative_id_embeds.shape[1]} vector(s) and the "
                                     f"identity {id_embeds.shape[1]} photo(s): give as many")
        else:
            negative_eva = (torch.zeros_like(positive_eva[0]), [torch.zeros_like(level) for level in positive_eva[1]])

        def tokens(arcface: torch.Tensor, eva: tuple[torch.Tensor, list[torch.Tensor]]) -> torch.Tensor:
            cond = torch.cat([arcface.float().to(device), eva[0].to(device)], dim=-1)
            return projection(cond.to(projection.dtype), [level.to(device, projection.dtype) for level in eva[1]])

        return tokens(id_embeds, positive_eva), tokens(negative_id_embeds, negative_eva)


def per_person(face_index: int | Sequence[int], people: int) -> list[int]:
    """``face_index`` for each of ``people``: one index for all, or one each."""
    indices = list(face_index) if isinstance(face_index, (list, tuple)) else [face_index] * people
    if len(indices) != people:
        raise IdentityInputError(f"face_index has {len(indices)} values for {people} people: give one, or one per person")
    return indices


def id_window(step: int, total: int, start: float, end: float) -> bool:
    """Whether the identity acts at loop step ``step`` of ``total``: ``start <= step/total`` and
    ``(step+1)/total <= end`` (ControlNet's ``control_guidance_start/end`` rule)."""
    return not (step / total < start or (step + 1) / total > end)


class IdentityPipelineMixin(PuLIDInputMixin):
    """Identity-adapter methods shared by the SD1.5 and SDXL pipelines.

    The adapter (projection + identity attention) lives beside the UNet and hooks into its
    cross-attention layers; it acts only inside this pipeline's own calls, so saving, other
    pipelines sharing the UNet, attention processors and the user's LoRAs see the base model.
    """

    #: Adapter formats this pipeline runs (the registry's rows for it).
    supported_adapter_formats: tuple[str, ...] = formats_run_by("IDStableDiffusionPipeline")
    identity_adapter: IdentityAdapter | None = OnDenoiser()
    adapter_spec: AdapterSpec | None = OnDenoiser()
    #: The identity adapter's own LoRA (FaceID), fused into the UNet's weights (``_fused_id_lora``)
    #: or run by peft as the adapter ``"faceid"``.
    _id_lora: LoRALayers | None = OnDenoiser()
    _fused_id_lora: FusedLoRA | None = OnDenoiser()
    #: The ``image_encoder`` before FaceID-Plus set its own (put back on unload).
    _image_encoder_before: Any = OnDenoiser(_NO_ENCODER)

    @property
    def id_projection(self) -> FaceIDProjection | InstantIDResampler | None:
        """The loaded adapter's projection (ArcFace vector -> identity tokens), or None."""
        return None if self.identity_adapter is None else self.identity_adapter.projection

    @property
    def identity_format(self) -> str | None:
        return None if self.adapter_spec is None else self.adapter_spec.format

    @property
    def is_pulid(self) -> bool:
        return self.identity_method is not None and self.identity_method.face_eva

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe``. The identity is the UNet's (``OnDenoiser``): the new pipeline has
        the one loaded into a UNet it shares, whatever pipelines came in between; it also takes
        ``pipeline``'s face analyzer."""
        new = super().from_pipe(pipeline, **{**shared_modules(cls, pipeline), **kwargs})
        if getattr(pipeline, "_face_analyzer", None) is not None:
            new._face_analyzer = pipeline._face_analyzer
        return new

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
        peft from the start (to train it). A previously loaded identity adapter is replaced.

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
        parts = _IdentityParts(adapter, spec, faceid_lora_layers(self.unet, state_dict) or None, encoder, pulid,
                               fuse_lora and not self._user_lora_names())
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
        return _IdentityParts(self.identity_adapter, self.adapter_spec, self._id_lora, encoder, pulid,
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

    # ---------------------------------------------------------------- the identity LoRA
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
        with _quiet_lora_loading():
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
        with _quiet_lora_loading():
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

    # ---------------------------------------------------------------- calling
    @property
    def _has_ip_adapter(self) -> bool:
        """Whether diffusers' IP-Adapter is loaded into the UNet beside the identity adapter."""
        return getattr(self.unet, "encoder_hid_proj", None) is not None and \
            getattr(self.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"

    def _check_identity_call(self, ip_adapter_image, ip_adapter_image_embeds) -> None:
        if self.identity_adapter is None:
            raise RuntimeError(
                "no identity adapter is loaded: call pipe.load_identity_adapter(...) before generating"
            )
        if (ip_adapter_image is not None or ip_adapter_image_embeds is not None) and not self._has_ip_adapter:
            raise ValueError("ip_adapter_image(_embeds) feed diffusers' IP-Adapter, and none is loaded: the identity "
                             "goes in face_image= or id_embeds=; pipe.load_ip_adapter(...) adds a style or image reference")

    @torch.no_grad()
    def encode_face_clip(self, face_image: FaceImages, batch_size: int = 1, face_index: int = 0) -> torch.Tensor:
        """FaceID-Plus's CLIP features (N, L, C): the penultimate hidden states of the image
        encoder for each face, aligned to the ArcFace template at the encoder's input size, in RGB
        (the reference's model card fed BGR); several photos of one person are averaged."""
        size = self.image_encoder.config.image_size
        rows = []
        for photos in self._face_groups(face_image, batch_size):
            crops = torch.from_numpy(self.face_analyzer.face_crops(photos, face_index, size))
            rows.append(self._clip_hidden_states(crops.permute(0, 3, 1, 2).float() / 255).mean(0))
        return torch.stack(rows)

    def _clip_hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate hidden states of the image encoder for RGB ``pixels`` in [0, 1] (B, 3, s, s)."""
        pixels = (pixels - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]
        return self._clip_features(pixels)

    def _clip_features(self, normalised: torch.Tensor) -> torch.Tensor:
        encoder = self.image_encoder
        return encoder(normalised.to(encoder.device, encoder.dtype), output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def _blank_face_clip(self) -> torch.Tensor:
        """CLIP features of an all-zero (normalised) image: FaceID-Plus's unconditional input."""
        size = self.image_encoder.config.image_size
        return self._clip_features(torch.zeros(1, 3, size, size))

    def _face_image_encoder(self, image_encoder: Any) -> Any:
        """FaceID-Plus's CLIP ViT-H: the one given, the pipeline's own, or h94/IP-Adapter's."""
        if image_encoder is None and getattr(self, "image_encoder", None) is not None:
            return self.image_encoder
        if image_encoder is None:
            try:
                image_encoder = CLIPVisionModelWithProjection.from_pretrained(
                    PLUS_IMAGE_ENCODER, subfolder="models/image_encoder", dtype=self.unet.dtype
                )
            except Exception as err:  # offline, missing repo
                raise ModelNotFoundError(
                    f"FaceID-Plus reads CLIP ViT-H features of the face, and its encoder ({PLUS_IMAGE_ENCODER}, "
                    f"models/image_encoder) could not be loaded ({type(err).__name__}): make the hub reachable, or "
                    "pass image_encoder= (a CLIPVisionModelWithProjection)"
                ) from None
        return image_encoder.to(self.unet.device, self.unet.dtype)

    def encode_id_tokens(
        self,
        face_image: FaceImages | None,
        id_embeds: torch.Tensor | None,
        negative_face_image: FaceImages | None,
        negative_id_embeds: torch.Tensor | None,
        batch_size: int,
        face_index: int = 0,
        face_weights: Sequence[float] | None = None,
        face_clip_embeds: torch.Tensor | None = None,
        s_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity tokens for the conditional and unconditional branches, one row per prompt.

        The unconditional tokens project ``negative_id_embeds``, zeros by default, as the
        reference implementations do. FaceID-Plus also reads CLIP features of the face crop
        (``face_clip_embeds``, else from ``face_image``; a blank image's for the unconditional
        branch) and PlusV2 adds its MLP tokens back at ``s_scale``.
        """
        face_image, eva_photos = self._identity_photos(face_image, id_embeds)
        id_embeds, negative_id_embeds = self.prepare_id_embeds(
            face_image, id_embeds, negative_face_image, negative_id_embeds, batch_size, face_index, face_weights
        )
        projection = self.identity_adapter.projection
        dim = projection.id_embed_dim
        if id_embeds.shape[-1] != dim:
            raise ValueError(f"id_embeds must be {dim}-d ArcFace vectors, got shape {tuple(id_embeds.shape)}")
        per_photo = self.per_photo_id_embeds
        positive = self._batch_id_embeds(id_embeds, batch_size, "id_embeds", 1 + per_photo)
        if negative_id_embeds is None:
            negative_id_embeds = torch.zeros_like(positive)
        negative = self._batch_id_embeds(negative_id_embeds, batch_size, "negative_id_embeds", 1 + per_photo)
        if self.is_pulid:
            self.identity_adapter.to(device=self._execution_device, dtype=self.unet.dtype)
            return self.pulid_tokens(projection, positive, negative, eva_photos, negative_face_image, face_index)
        if per_photo:
            check_portrait_faces(positive.shape[1])
            if negative.shape[1] != positive.shape[1]:
                raise IdentityInputError(f"the negative identity has {negative.shape[1]} photo(s) and the identity "
                                         f"{positive.shape[1]}: FaceID-Portrait needs as many of each")
        device = self._execution_device
        self.identity_adapter.to(device=device, dtype=self.unet.dtype)
        both = torch.cat([negative, positive]).to(device=device, dtype=projection.dtype)
        extra = {}
        if isinstance(projection, FaceIDPlusProjection):
            if face_clip_embeds is None:
                if face_image is None:
                    raise IdentityInputError("FaceID-Plus also reads CLIP features of the face: pass face_image= (or "
                                             "face_clip_embeds= from pipe.encode_face_clip() beside id_embeds=)")
                face_clip_embeds = self.encode_face_clip(face_image, batch_size, face_index)
            clip = self._batch_id_embeds(_as_tensor(face_clip_embeds), batch_size, "face_clip_embeds", 2)
            negative_clip = self._blank_face_clip().expand_as(clip)  # the reference's unconditional features
            extra = dict(clip_embeds=torch.cat([negative_clip, clip]).to(device, projection.dtype), s_scale=s_scale)
        tokens = projection(both.reshape(-1, dim), **extra)  # each photo's tokens, then side by side per identity
        negative_tokens, tokens = tokens.reshape(len(both), -1, tokens.shape[-1]).chunk(2)
        return tokens, negative_tokens

    def encode_call_identity(
        self,
        face_image: FaceImages | None,
        id_embeds: torch.Tensor | None,
        negative_face_image: FaceImages | None,
        negative_id_embeds: torch.Tensor | None,
        batch_size: int,
        face_index: int | Sequence[int] = 0,
        face_weights: Sequence[float] | None = None,
        face_clip_embeds: torch.Tensor | None = None,
        s_scale: float = 1.0,
        regions: RegionsInput | None = None,
        kps_image: ImageInput | None = None,
        face_order: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, PeopleLayout | None]:
        """A call's identity tokens and negative tokens: one person (``encode_id_tokens``), or with
        ``regions`` several, side by side (``encode_people_tokens``), with where each goes."""
        if regions is None:
            if face_order is not None:
                raise ValueError("face_order= orders the people of regions=: pass regions= too, or leave it out")
            return (*self.encode_id_tokens(face_image, id_embeds, negative_face_image, negative_id_embeds, batch_size,
                                           face_index, face_weights, face_clip_embeds, s_scale), None)
        if face_weights is not None:
            raise ValueError("face_weights= weighs photos of one person; with regions= each face_image entry is a person")
        layout = PeopleLayout(*self.people_regions(regions, self.count_people(face_image, id_embeds), kps_image,
                                                   face_order))
        tokens = self.encode_people_tokens(face_image, id_embeds, negative_face_image, negative_id_embeds, batch_size,
                                           face_index, face_clip_embeds, s_scale)
        return (*tokens, layout)

    def encode_people_tokens(
        self,
        face_image: Sequence[FaceImages] | None,
        id_embeds: torch.Tensor | None,
        negative_face_image: FaceImages | None,
        negative_id_embeds: torch.Tensor | None,
        batch_size: int,
        face_index: int | Sequence[int] = 0,
        face_clip_embeds: torch.Tensor | None = None,
        s_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity tokens of several people side by side, (N, people * T, C): person ``p`` is
        ``face_image[p]`` (a photo, or a list of photos of them) or ``id_embeds[p]``, the same
        people in every prompt; ``face_index`` is one index, or one per person."""
        people = self.count_people(face_image, id_embeds)
        if face_clip_embeds is not None and len(face_clip_embeds) != people:
            raise IdentityInputError(f"face_clip_embeds holds {len(face_clip_embeds)} rows for {people} people: give one per person")
        indices = per_person(face_index, people)
        if negative_face_image is not None and negative_id_embeds is None:  # one negative for all: detected once
            negative_id_embeds, negative_face_image = self.encode_identity(negative_face_image, batch_size), None
        rows = []
        for p in range(people):
            photos = None if face_image is None else face_image[p]
            rows.append(self.encode_id_tokens(
                [photos] if isinstance(photos, (list, tuple)) else photos,  # several photos of this one person
                None if id_embeds is None else _as_tensor(id_embeds)[p], negative_face_image, negative_id_embeds,
                batch_size, indices[p], None, None if face_clip_embeds is None else face_clip_embeds[p], s_scale,
            ))
        tokens, negative_tokens = zip(*rows)
        return torch.cat(tokens, dim=1), torch.cat(negative_tokens, dim=1)

    def count_people(self, face_image: Sequence[FaceImages] | None, id_embeds: Any) -> int:
        """How many people ``face_image`` (one entry per person) or ``id_embeds`` (one row each) hold."""
        self._check_identity_inputs(face_image, id_embeds)
        if face_image is not None and not isinstance(face_image, (list, tuple)):
            raise IdentityInputError("with regions=, face_image= is a list with one entry per person (a photo, or a "
                                     "list of photos of that person)")
        people = len(face_image) if face_image is not None else len(_as_tensor(id_embeds))
        if people < 1:
            raise IdentityInputError("regions= places several people, but no person was given")
        return people

    def people_regions(self, regions: RegionsInput, people: int, kps_image: ImageInput | None = None,
                       face_order: Sequence[int] | None = None) -> tuple[Regions, list[Face] | None, tuple[int, int] | None]:
        """The regions of ``people`` identities, and the faces and size of ``kps_image`` when given
        (their keypoints pose IdentityNet): ``regions`` as masks or boxes, one per person, or
        ``"faces"``: the part of the image nearest to each person's face in ``kps_image``."""
        group = None if isinstance(kps_image, (list, tuple)) else kps_image  # a list: each person's own pose photo
        faces, size = self.pose_faces(group, people, face_order) if group is not None else (None, None)
        if isinstance(regions, str):
            if regions != "faces" or faces is None:
                raise IdentityInputError(f"regions={regions!r}: give one mask or box per person, or regions='faces' "
                                         "with kps_image= (a photo with a face per person)")
            centres = [((f.bbox[0] + f.bbox[2]) / 2 / size[0], (f.bbox[1] + f.bbox[3]) / 2 / size[1]) for f in faces]
            return Regions.around(np.asarray(centres)), faces, size
        if face_order is not None and group is None:
            raise IdentityInputError("face_order= picks faces of kps_image=: pass the group photo too")
        spec = Regions.from_spec(regions)
        if spec.count != people:
            raise IdentityInputError(f"regions= holds {spec.count} region(s) for {people} people: give one per person")
        return spec, faces, size

    def fusion_tokens(self, id_fusion: str | None, prompt: str | list[str] | None, num_images_per_prompt: int,
                      recover_words: Sequence[str] | None) -> list[list[int]] | None:
        """FreeCure's attribute tokens for each prompt row (``attribute_tokens``); None otherwise."""
        if id_fusion != "freecure":
            if recover_words is not None:
                raise ValueError("recover_words= names what id_fusion='freecure' recovers: set it too, or leave them out")
            return None
        if prompt is None:
            raise ValueError("id_fusion='freecure' finds the attribute words in the prompt: pass prompt= as text")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [attribute_tokens(self.tokenizer, text, recover_words) for text in prompts
                for _ in range(num_images_per_prompt)]

    def output_size(self, source_size: tuple[int, int] | None, height: int | None, width: int | None) -> tuple[int, int]:
        """(width, height) of the output: as given; else the base model's native resolution on the
        long side with the pose photo's aspect (multiples of 64 for SDXL), never the photo's own
        pixel size (a 4032x3024 phone photo renders at 1024x768, not 12 megapixels)."""
        native = self.unet.config.sample_size * self.vae_scale_factor
        multiple = 8 * self.vae_scale_factor
        if source_size is None or (height and width):
            return width or native, height or native
        aspect = source_size[1] / source_size[0]  # height / width
        snap = lambda value: max(multiple, int(round(value / multiple)) * multiple)
        if width:
            return width, snap(width * aspect)
        if height:
            return snap(height / aspect), height
        return (native, snap(native * aspect)) if aspect <= 1 else (snap(native / aspect), native)

    def pulid_settings(self, num_zero: int | None, ortho: str | None) -> tuple[int, str]:
        """PuLID's attention settings for a call (``idgen.adapters.pulid.pulid_settings``); other
        adapters take neither."""
        if not self.is_pulid:
            if num_zero is not None or ortho is not None:
                raise ValueError("num_zero= and ortho= are PuLID's settings; this adapter takes neither: leave them out")
            return 0, "off"
        return pulid_settings(self.adapter_spec.format, num_zero, ortho)

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
        schedule = loop or self  # the pipeline whose loop runs (its num_timesteps)
        scales = layer_id_scales(adapter.names, id_scale)
        gates = {name: torch.tensor(scales[name], device=tokens.device) for name in adapter.names}
        batches = IdentityTokens(tokens, negative_tokens, num_images_per_prompt)
        progress = {"step": 0, "shape": None, "on": True}

        def on_unet(args: tuple, kwargs: dict) -> None:
            sample = args[0] if args else kwargs["sample"]
            if progress["shape"] != sample.shape:
                weights = None if regions is None else regions.weights(
                    *sample.shape[-2:], self.vae_scale_factor, sample.device)
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


#: Said once when a UNet that holds FaceID's fused LoRA runs outside an identity call.
FUSED_LORA_NOTICE = (
    "this UNet holds FaceID's LoRA, fused into its weights by load_identity_adapter, and runs here without an "
    "identity (a pipeline sharing it, or a direct call): that is not the base model; for the base model call "
    "unload_identity_adapter() on the idgen pipeline (loading again later costs a second)")


@dataclass(frozen=True)
class _IdentityParts:
    """A built identity adapter with what comes with it, ready to go into a pipeline."""

    adapter: IdentityAdapter
    spec: AdapterSpec
    lora: LoRALayers | None
    image_encoder: Any
    pulid: tuple[Any, Any] | None
    fuse_lora: bool


@dataclass(frozen=True)
class PeopleLayout:
    """Where several people go: their regions, and the faces and size of the group photo
    (``kps_image``) when one was given."""

    regions: Regions
    pose_faces: list[Face] | None
    pose_size: tuple[int, int] | None


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
