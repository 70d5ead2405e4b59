"""Face fix: repaint the faces of a photo as a given person, leaving the rest of it untouched.

Each face is cropped with a margin, scaled to the model's native size, inpainted under a
feathered oval with the identity (InstantID's IdentityNet gets the face's own keypoints), scaled
back and blended in. Pixels outside the oval's feather are the input's, exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from idgen import pipelines
from idgen.errors import IDGenError, NoFaceError
from idgen.faces import Face, FaceAnalyzer, ImageInput, load_image

from .guard import finite_call


@dataclass(frozen=True)
class FaceFixOptions:
    """How faces are repainted."""

    strength: float = 0.6  # how much of the face is redrawn (1: from noise)
    margin: float = 0.5  # context around the face box on each side, as a fraction of its size
    feather: float = 0.06  # blur of the oval's edge, as a fraction of the crop size

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise IDGenError(f"face fix strength must be in (0, 1], got {self.strength}")
        if self.margin < 0 or self.feather < 0:
            raise IDGenError("face fix margin and feather must not be negative")


def inpaint_pipeline(pipe):
    """The inpainting variant of an idgen pipeline, sharing its modules and identity adapter."""
    for source, target in ((pipelines.IDStableDiffusionXLPipeline, pipelines.IDStableDiffusionXLInpaintPipeline),
                           (pipelines.IDStableDiffusionPipeline, pipelines.IDStableDiffusionInpaintPipeline)):
        if isinstance(pipe, target):
            return pipe
        if isinstance(pipe, source):
            inpaint = target.from_pipe(pipe)
            inpaint.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
            return inpaint
    raise IDGenError(f"face fix inpaints with an identity adapter; {type(pipe).__name__} has no inpainting variant: "
                     "use FaceID or InstantID (Arc2Face generates whole portraits only)")


def _face_number(face: int | Face, found: list[Face]) -> int:
    """A face given by number, or as one of the ``Face`` objects found in the photo (its number)."""
    if isinstance(face, Face):
        same = [i for i, other in enumerate(found) if np.allclose(other.bbox, face.bbox, atol=1.0)]
        if not same:
            raise NoFaceError("a Face given to face_fix is not one found in this photo: pass analyzer.analyze(photo)'s "
                              "faces, or their numbers")
        return same[0]
    if isinstance(face, (int, np.integer)) and not isinstance(face, bool):
        return int(face)
    raise TypeError(f"face_fix takes face numbers or Face objects, not {type(face).__name__}")


def _crop_box(bbox: np.ndarray, margin: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A square around the face box, ``margin`` of its side added on each side, inside the image."""
    x1, y1, x2, y2 = bbox
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    side = int(min(side, *size))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(round(min(max(cx - side / 2, 0), size[0] - side)))
    top = int(round(min(max(cy - side / 2, 0), size[1] - side)))
    return left, top, left + side, top + side


def _oval(bbox: np.ndarray, box: tuple[int, int, int, int], feather: float) -> Image.Image:
    """The feathered oval over the face box (slightly enlarged), in the crop's pixels (mode L)."""
    side = box[2] - box[0]
    mask = Image.new("L", (side, side), 0)
    x1, y1, x2, y2 = bbox - np.array([box[0], box[1], box[0], box[1]])
    pad_x, pad_y = (x2 - x1) * 0.1, (y2 - y1) * 0.15
    ImageDraw.Draw(mask).ellipse([x1 - pad_x, y1 - pad_y, x2 + pad_x, y2 + pad_y * 0.5], fill=255)
    radius = feather * side
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def face_fix(
    pipe,
    image: ImageInput,
    analyzer: FaceAnalyzer,
    faces: Sequence[int | Face] | None = None,
    options: FaceFixOptions = FaceFixOptions(),
    identity_of: Callable[[Face], dict[str, Any] | None] | None = None,
    **call: Any,
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Repaint faces ``faces`` (indices, largest first, or the ``Face`` objects ``analyzer.analyze``
    found in ``image``; default all) of ``image``. ``call`` is the
    pipeline call for one face: the prompt, the identity (``face_image=`` or ``id_embeds=`` ...),
    steps, guidance, generator; the crop, mask, strength and size are set here. With several
    people, ``identity_of(face)`` gives each face's identity arguments (None: leave it). Returns
    the image and the crop box of each face repainted."""
    pipe = inpaint_pipeline(pipe)
    photo = load_image(image, analyzer.max_pixels)
    found = analyzer.analyze(photo)
    if not found:
        raise NoFaceError("no face found to fix: use a photo with a clear face at least "
                          f"{analyzer.detector.min_face_size} pixels wide")
    chosen = list(range(len(found))) if faces is None else [_face_number(face, found) for face in faces]
    bad = [i for i in chosen if not 0 <= i < len(found)]
    if bad:
        raise NoFaceError(f"face {bad[0]} asked for, but the photo has {len(found)} face(s): use indices below {len(found)}")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = np.asarray(photo).copy()
    boxes = []
    for index in chosen:
        face = found[index]
        person = {} if identity_of is None else identity_of(face)
        if person is None:
            continue
        box = _crop_box(face.bbox, options.margin, photo.size)
        side = box[2] - box[0]
        oval = _oval(face.bbox, box, options.feather)
        crop = Image.fromarray(out[box[1]:box[3], box[0]:box[2]])
        kwargs = {key: value for key, value in {**call, **person}.items() if key not in ("height", "width")}
        if getattr(pipe, "has_identitynet", False):
            kwargs["face_kps"] = (face.kps - np.array(box[:2])) * (size / side)
        result = finite_call(pipe, image=crop.resize((size, size), Image.Resampling.LANCZOS), mask_image=oval.resize((size, size)),
                      strength=options.strength, height=size, width=size, **kwargs).images[0]
        result = np.asarray(result.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32)
        alpha = np.asarray(oval, dtype=np.float32)[..., None] / 255
        region = out[box[1]:box[3], box[0]:box[2]]
        blended = np.round(region * (1 - alpha) + result * alpha).astype(np.uint8)
        out[box[1]:box[3], box[0]:box[2]] = np.where(alpha > 0, blended, region)
        boxes.append(box)
    return Image.fromarray(out), boxes


def fix_faces(session, pipe, image: ImageInput, identity: dict[str, Any] | list[dict[str, Any]], prompt: str | None,
              seed: int, strength: float = 0.6, faces: Sequence[int] | None = None, negative_prompt: str | None = None,
              keep_faceless: bool = False, regions: Any = None) -> tuple[Image.Image, dict[str, str]]:
    """``face_fix`` with a session's method and settings: the faces of ``image`` repainted with
    ``identity`` (the call's identity arguments, ``id_embeds=`` and any method inputs, computed once
    by the caller); also the PNG settings that say so. With ``keep_faceless``, an image without a
    face comes back as it is, its settings saying so (a generated image); else that raises.

    Several people: ``identity`` is a list with each person's arguments and ``regions``
    (``idgen.adapters.regions.Regions``) where each is; a face takes the identity of the region its
    centre lies in, and a face outside every region is left as it is."""
    call = dict(session.call_kwargs(prompt), negative_prompt=negative_prompt, generator=torch.Generator().manual_seed(seed))
    identity_of = None
    if regions is None:
        call.update(cast(dict[str, Any], identity))
    else:
        photo = load_image(image, session.analyzer.max_pixels)
        masks = regions.render(*photo.size)

        def identity_of(face) -> dict[str, Any] | None:
            x, y = ((face.bbox[:2] + face.bbox[2:]) / 2).astype(int).clip(0, [photo.width - 1, photo.height - 1])
            return cast(list[dict[str, Any]], identity)[int(masks[:, y, x].argmax())] if masks[:, y, x].max() > 0 else None

        image = photo
    try:
        fixed, boxes = face_fix(pipe, image, session.analyzer, faces, FaceFixOptions(strength=strength), identity_of,
                                **call)
    except NoFaceError:
        if not keep_faceless:
            raise
        return load_image(image), {"face_fix": "no face found"}
    crops = "; ".join(",".join(map(str, box)) for box in boxes)
    return fixed, {"face_fix": f"{len(boxes)} face(s) repainted at strength {strength} (crops {crops})"}


def people_identities(pipe, identity: dict[str, Any], regions: Any, count: int, kps_image: ImageInput | None = None,
                      face_order: Sequence[int] | None = None) -> tuple[list[dict[str, Any]], Any]:
    """For ``fix_faces`` on an image of several people: each person's identity arguments (row ``p``
    of ``identity``'s, one row per person) and their regions, from the generation's ``regions``."""
    spec = pipe.people_regions(regions, count, kps_image, face_order)[0]
    return [{key: value[p] for key, value in identity.items()} for p in range(count)], spec
