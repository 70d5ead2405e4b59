"""The identity methods: one row each, read by the pipelines, the loader, the CLI and training.

A row (``Method``) says how a method's adapter is recognised (hub id, weight name or folder
layout), which checkpoint format ``idgen.adapters.detect_format`` names it, which base family and
pipeline run it, what it reads from the photos (raw or normalised ArcFace, one identity or one per
photo, CLIP or EVA features, IdentityNet) and its defaults (those of its reference demo: steps,
guidance, ``id_scale``, face pack). A Python call and the CLI take their defaults from the same row.
Foundation layer: no torch, no diffusers at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from idgen.errors import ModelNotFoundError

DEFAULT_FACE_PACK = "buffalo_l"
FACEID_REPO = "h94/IP-Adapter-FaceID"
INSTANTID_REPO = "InstantX/InstantID"
INSTANTID_WEIGHT_NAME = "ip-adapter.bin"
INFINITEYOU_REPO = "ByteDance/InfiniteYou"
#: Base families as users name them.
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX.1", "arc2face": "SD1.5"}
#: Checkpoint formats (``idgen.adapters.detect_format``'s names) as users name them.
FORMAT_TITLES = {"faceid": "FaceID", "faceid_plus": "FaceID-Plus", "faceid_portrait": "FaceID-Portrait",
                 "instantid": "InstantID", "pulid": "PuLID", "pulid_v1": "PuLID", "photomaker": "PhotoMaker",
                 "pulid_flux": "PuLID-FLUX", "infiniteyou": "InfiniteYou"}
#: Name of the peft adapter that holds an identity adapter's own LoRA (FaceID).
ID_LORA_NAME = "faceid"


def _is_arc2face(adapter: str, weight_name: str | None) -> bool:
    return os.path.isdir(os.path.join(adapter, "arc2face")) or "arc2face" in adapter.lower()


def is_instantid(adapter: str, weight_name: str | None) -> bool:
    """InstantID's layout: a repo or folder with ``ControlNetModel/`` beside ``ip-adapter.bin``."""
    return weight_name == INSTANTID_WEIGHT_NAME or adapter == INSTANTID_REPO or os.path.isdir(
        os.path.join(adapter, "ControlNetModel")
    )


def _is_faceid_repo(adapter: str, weight_name: str | None) -> bool:
    return adapter == FACEID_REPO


def _is_portrait(adapter: str, weight_name: str | None) -> bool:
    return adapter == FACEID_REPO and "portrait" in (weight_name or "")


def _is_plus(adapter: str, weight_name: str | None) -> bool:
    return adapter == FACEID_REPO and "plus" in (weight_name or "")


def _is_pulid(adapter: str, weight_name: str | None) -> bool:
    return "pulid" in f"{adapter}/{weight_name or ''}".lower()


def _is_infiniteyou(adapter: str, weight_name: str | None) -> bool:
    """InfiniteYou's layout: its hub repo, or a folder with ``InfuseNetModel/`` beside the projection."""
    folder = os.path.dirname(adapter) if os.path.isfile(adapter) else adapter
    return "infiniteyou" in adapter.lower() or os.path.isdir(os.path.join(folder, "InfuseNetModel"))


def _is_photomaker(adapter: str, weight_name: str | None) -> bool:
    return "photomaker" in f"{adapter}/{weight_name or ''}".lower()


@dataclass(frozen=True)
class Method:
    """One identity method: how its adapter is recognised, what runs it, and its defaults
    (those of its reference implementation)."""

    name: str  # recorded in the images' metadata
    family: str  # "sd15", "sdxl", "flux" or "arc2face": the base models it runs on
    pipeline: str  # class name in idgen.pipelines
    recognises: Callable[[str, str | None], bool]  # (adapter, weight_name) -> is this method's
    checkpoint_format: str | None = None  # adapters.detect_format's name for its checkpoints
    steps: int = 30
    guidance: float = 7.5
    id_scale: float = 1.0
    face_pack: str = DEFAULT_FACE_PACK
    default_adapter: str | None = None  # used when no adapter is given for this family
    default_weight_name: str | None = None  # file inside a recognised repo
    raw_id_embeds: bool = False  # the recognizer's raw (un-normalised) vector, as InstantID was trained
    identitynet: bool = False  # InstantID's ControlNet, from the adapter repo's ControlNetModel/
    uses_prompt: bool = True  # Arc2Face generates from the identity alone
    per_photo: bool = False  # each face photo gives its own tokens (FaceID-Portrait), not one mean
    face_clip: bool = False  # also CLIP features of the face crop (FaceID-Plus), from an image encoder
    prompt_identity: bool = False  # the identity enters the prompt (PhotoMaker): no id_scale, no negative identity
    face_eva: bool = False  # also EVA02-CLIP features of the parsed face (PuLID), read from the photos
    own_recognizer: bool = False  # its ArcFace is the pipeline's own (InfiniteYou's IR-SE50), read from the photos

    @property
    def pulid_attention(self) -> bool:
        """Whether it takes PuLID's UNet attention settings (num_zero, ortho): PuLID on SDXL."""
        return self.checkpoint_format in ("pulid", "pulid_v1")


#: Identity methods, in the order they are tried; the last of each family is its fallback.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("arc2face", "arc2face", "IDArc2FacePipeline", _is_arc2face, steps=25, guidance=3.0,
               face_pack="antelopev2", uses_prompt=False),  # antelopev2 with Arc2Face's arcface.onnx added
        Method("faceid-plus", "sd15", "IDStableDiffusionPipeline", _is_plus, "faceid_plus", face_clip=True),
        Method("faceid-portrait", "sd15", "IDStableDiffusionPipeline", _is_portrait, "faceid_portrait", per_photo=True),
        Method("faceid", "sd15", "IDStableDiffusionPipeline", _is_faceid_repo, "faceid", default_adapter=FACEID_REPO,
               default_weight_name="ip-adapter-faceid_sd15.bin"),
        Method("instantid", "sdxl", "IDStableDiffusionXLPipeline", is_instantid, "instantid", guidance=5.0,
               id_scale=0.8, face_pack="antelopev2", default_adapter=INSTANTID_REPO,
               default_weight_name=INSTANTID_WEIGHT_NAME, raw_id_embeds=True, identitynet=True),
        Method("faceid-plus-sdxl", "sdxl", "IDStableDiffusionXLPipeline", _is_plus, "faceid_plus", guidance=5.0,
               face_clip=True),
        Method("faceid-portrait-sdxl", "sdxl", "IDStableDiffusionXLPipeline", _is_portrait, "faceid_portrait",
               guidance=5.0, per_photo=True),
        # PuLID: its demo's settings for a non-Lightning base (Lightning: --steps 5 --guidance 2)
        Method("pulid", "sdxl", "IDStableDiffusionXLPipeline", _is_pulid, "pulid", steps=25, guidance=7.0, id_scale=0.8,
               face_pack="antelopev2", default_weight_name="pulid_v1.1.safetensors", raw_id_embeds=True, per_photo=True,
               face_eva=True),
        Method("pulid-v1", "sdxl", "IDStableDiffusionXLPipeline", _is_pulid, "pulid_v1", steps=25, guidance=7.0,
               id_scale=0.8, face_pack="antelopev2", default_weight_name="pulid_v1.bin", raw_id_embeds=True,
               per_photo=True, face_eva=True),
        Method("photomaker", "sdxl", "IDPhotoMakerPipeline", _is_photomaker, "photomaker", steps=50, guidance=5.0,
               default_weight_name="photomaker-v2.bin", raw_id_embeds=True, per_photo=True, prompt_identity=True),
        Method("faceid-sdxl", "sdxl", "IDStableDiffusionXLPipeline", _is_faceid_repo, "faceid", guidance=5.0,
               default_weight_name="ip-adapter-faceid_sdxl.bin"),
        # FLUX.1: each reference demo's settings (PuLID-FLUX: 20 steps, guidance 4; InfiniteYou: 30, 3.5)
        Method("infiniteyou", "flux", "IDFluxPipeline", _is_infiniteyou, "infiniteyou", steps=30, guidance=3.5,
               face_pack="antelopev2", default_adapter=INFINITEYOU_REPO,
               default_weight_name="infu_flux_v1.0/aes_stage2/image_proj_model.bin", own_recognizer=True),
        Method("pulid-flux", "flux", "IDFluxPipeline", _is_pulid, "pulid_flux", steps=20, guidance=4.0,
               face_pack="antelopev2", default_weight_name="pulid_flux_v0.9.1.safetensors", raw_id_embeds=True,
               per_photo=True, face_eva=True),
    )
}


def base_family(base: str) -> str:
    """"flux", "sdxl" or "sd15": a base model's (hub id or folder) family, from its model_index.json."""
    from diffusers import DiffusionPipeline  # lazy: diffusers takes seconds to import; `idgen --help` reads this module

    try:
        config = DiffusionPipeline.load_config(base)
    except Exception as err:  # offline, missing repo, bad folder
        raise base_model_error(base, err) from None
    name = config.get("_class_name", "")
    return "flux" if "Flux" in name else "sdxl" if "XL" in name else "sd15"


def base_model_error(base: str, err: Exception) -> ModelNotFoundError:
    first_line = str(err).splitlines()[0][:200] if str(err) else ""
    return ModelNotFoundError(
        f"could not load base model {base} ({type(err).__name__}: {first_line}): pass a diffusers folder, "
        "a reachable hub id, or leave --base out for the offline tiny preset"
    )


def resolve_method(base: str, adapter: str | None, weight_name: str | None) -> tuple[Method, str, str | None]:
    """The method that runs ``adapter`` on ``base``, with the adapter and weight name filled in."""
    arc2face = METHODS["arc2face"]
    if adapter is not None and arc2face.recognises(adapter, weight_name):
        return arc2face, adapter, weight_name
    family = [m for m in METHODS.values() if m.family == base_family(base)]
    if adapter is None:
        method = next(m for m in family if m.default_adapter)
        adapter = str(method.default_adapter)
    else:
        method = next((m for m in family if m.recognises(adapter, weight_name)), family[-1])
    if weight_name is None and method.recognises(adapter, None):
        weight_name = method.default_weight_name
        if weight_name and os.path.isdir(adapter) and not os.path.isfile(os.path.join(adapter, weight_name)):
            weight_name = os.path.basename(weight_name)  # a folder holding the file itself (InfiniteYou's model folder)
    return method, adapter, weight_name


def method_of(format: str, family: str | None = None) -> Method | None:
    """The row of checkpoint ``format`` on a base ``family`` ("sd15", "sdxl", "flux" or "arc2face"):
    what a pipeline holding such an adapter reads from the photos, and its defaults. Without a
    family: the format's first row (where it was made for)."""
    return next((m for m in METHODS.values() if m.checkpoint_format == format and family in (None, m.family)), None)


def formats_run_by(pipeline: str) -> tuple[str, ...]:
    """The checkpoint formats the pipeline class named ``pipeline`` runs."""
    return tuple(dict.fromkeys(m.checkpoint_format for m in METHODS.values() if m.pipeline == pipeline and m.checkpoint_format))


def wrong_pipeline_message(format: str, path: str, pipeline: str) -> str:
    """One line for a ``format`` checkpoint at ``path`` given to ``pipeline``, which does not run it."""
    home = method_of(format)
    if home is None:
        return f"{path} is a {format} adapter, which no idgen pipeline runs: pass an identity adapter checkpoint"
    title, family = FORMAT_TITLES.get(format, format), FAMILY_NAMES[home.family]
    return f"{path} is a {title} adapter, made for {family}: load it into {home.pipeline} with an {family} base"
