"""ArcFace ``id_embeds`` (and FaceID-Plus's CLIP features) to identity tokens for a call: one
person, or several people side by side with where each goes; the output size a pose photo asks
for; the fusion stream's attribute tokens; PuLID's per-call settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from transformers import CLIPVisionModelWithProjection
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from idgen.adapters import (
    FaceIDPlusProjection,
    check_portrait_faces,
)
from idgen.adapters.fusion import attribute_tokens
from idgen.adapters.pulid import pulid_settings
from idgen.adapters.regions import Regions
from idgen.errors import IdentityInputError, ModelNotFoundError
from idgen.faces import Face, ImageInput

from .face_inputs import FaceImages, RegionsInput, as_tensor, per_person

#: FaceID-Plus's image encoder (CLIP ViT-H/14), in ``models/image_encoder`` of this repo.
PLUS_IMAGE_ENCODER = "h94/IP-Adapter"


@dataclass(frozen=True)
class PeopleLayout:
    """Where several people go: their regions, and the faces and size of the group photo
    (``kps_image``) when one was given."""

    regions: Regions
    pose_faces: list[Face] | None
    pose_size: tuple[int, int] | None



class IdentityTokensMixin:
    """Photos or ``id_embeds`` -> the tokens the identity attention reads, per call."""

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
            clip = self._batch_id_embeds(as_tensor(face_clip_embeds), batch_size, "face_clip_embeds", 2)
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
                                           cast(int, face_index), face_weights, face_clip_embeds, s_scale), None)
        if face_weights is not None:
            raise ValueError("face_weights= weighs photos of one person; with regions= each face_image entry is a person")
        people = cast("Sequence[FaceImages] | None", face_image)  # one entry per person
        layout = PeopleLayout(*self.people_regions(regions, self.count_people(people, id_embeds), kps_image, face_order))
        tokens = self.encode_people_tokens(people, id_embeds, negative_face_image, negative_id_embeds, batch_size,
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
                None if id_embeds is None else cast(torch.Tensor, as_tensor(id_embeds))[p], negative_face_image, negative_id_embeds,
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
        people = len(face_image) if face_image is not None else len(cast(torch.Tensor, as_tensor(id_embeds)))
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
            width, height = cast(tuple[int, int], size)  # the size of kps_image, which has the faces
            centres = [((f.bbox[0] + f.bbox[2]) / 2 / width, (f.bbox[1] + f.bbox[3]) / 2 / height) for f in faces]
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
