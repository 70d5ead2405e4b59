"""Face photos to ArcFace ``id_embeds`` (and PuLID's EVA features): what every idgen pipeline
reads from its ``face_image=``, with the input types it accepts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
from diffusers.hooks.group_offloading import _is_group_offload_enabled

from idgen.adapters.eva_clip import EVAVisionTower, load_eva_tower
from idgen.adapters.face_parsing import load_face_parser
from idgen.adapters.pulid import eva_face_pixels
from idgen.errors import IdentityInputError, NoFaceError
from idgen.faces import DEFAULT_MAX_PIXELS, Face, FaceAnalyzer, ImageInput, load_image
from idgen.formats import Method, method_of
from idgen.watermark import embed

from .shared import OnDenoiser, on_denoiser

FaceImages = ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]]


IDScale = float | dict


#: Where several people go: one mask or (x0, y0, x1, y1) box per person, or "faces" (of kps_image).
RegionsInput = str | Sequence[Any]




#: PuLID's face crop for parsing and EVA-CLIP (FFHQ-aligned, as facexlib's).
PULID_CROP_SIZE = 512


def as_tensor(embeds: Any) -> torch.Tensor | None:
    """ArcFace vectors as given (tensor), or from numpy arrays and lists (as float32)."""
    if embeds is None or isinstance(embeds, torch.Tensor):
        return embeds
    return torch.as_tensor(np.asarray(embeds, np.float32))


def _offloaded_by_hooks(module: torch.nn.Module) -> bool:
    """Whether offloading hooks move ``module`` already: accelerate's (model and sequential CPU
    offload) or diffusers' group offloading, which refuses ``.to()``."""
    return hasattr(module, "_hf_hook") or _is_group_offload_enabled(module)


class FaceInputMixin:
    """Face photos -> ArcFace ``id_embeds``: shared by every idgen pipeline."""

    @contextlib.contextmanager
    def _on(self, device: torch.device, *modules: torch.nn.Module) -> Iterator[None]:
        """``modules`` on ``device`` inside the block, back where they were after: the identity's own
        modules follow the pipeline's offloading (on the GPU while they run, on the CPU between), and
        modules its hooks move are left to them."""
        modules = tuple(m for m in modules if m is not None and not _offloaded_by_hooks(m))
        places = [next(m.parameters()).device for m in modules]
        for module in modules:
            module.to(device)
        try:
            yield
        finally:
            for module, place in zip(modules, places):
                module.to(place)

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

    @property
    def is_pulid(self) -> bool:
        """Whether the loaded identity is PuLID's (SDXL or FLUX), which also reads EVA features of the face."""
        return self.identity_method is not None and self.identity_method.face_eva

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

    @property
    def _has_ip_adapter(self) -> bool:
        """Whether diffusers' IP-Adapter is loaded into the denoiser beside the identity adapter."""
        model = OnDenoiser.model(self)
        return getattr(model, "encoder_hid_proj", None) is not None and \
            getattr(model.config, "encoder_hid_dim_type", None) == "ip_image_proj"

    def _check_identity_call(self, ip_adapter_image: Any, ip_adapter_image_embeds: Any) -> None:
        """An identity adapter is loaded, and diffusers' IP-Adapter inputs come with an IP-Adapter."""
        if self.identity_adapter is None:
            raise RuntimeError("no identity adapter is loaded: call pipe.load_identity_adapter(...) before generating")
        if (ip_adapter_image is not None or ip_adapter_image_embeds is not None) and not self._has_ip_adapter:
            raise ValueError("ip_adapter_image(_embeds) feed diffusers' IP-Adapter, and none is loaded: the identity "
                             "goes in face_image= or id_embeds=; pipe.load_ip_adapter(...) adds a style or image reference")

    def _watermarked(self, output: Any, output_type: str | None) -> Any:
        """``output`` with its images marked, when the watermark is on."""
        if not self._watermark:
            return output

        images = output[0] if isinstance(output, tuple) else output.images
        marked: Any
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
            return [[cast(ImageInput, face_image)]]
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
        return cast(torch.Tensor, as_tensor(id_embeds)), as_tensor(negative_id_embeds)  # one of the two was given

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
    eva_encoder = on_denoiser()
    face_parser = on_denoiser()

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
        parser, tower = self.face_parser, self.eva_encoder
        embeds, hidden = [], []
        with self._on(self._execution_device, parser, tower):
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
            dtype = cast(torch.dtype, projection.dtype)
            return projection(cond.to(dtype), [level.to(device, dtype) for level in eva[1]])

        return tokens(id_embeds, positive_eva), tokens(negative_id_embeds, negative_eva)


def per_person(face_index: int | Sequence[int], people: int) -> list[int]:
    """``face_index`` for each of ``people``: one index for all, or one each."""
    indices = list(face_index) if isinstance(face_index, (list, tuple)) else [cast(int, face_index)] * people
    if len(indices) != people:
        raise IdentityInputError(f"face_index has {len(indices)} values for {people} people: give one, or one per person")
    return indices

