"""idgen: identity-preserving image generation with diffusers."""

from .errors import CheckpointError, IdentityInputError, IDGenError, ImageError, ModelNotFoundError, NoFaceError
from .faces import Face, FaceAnalyzer, draw_kps, load_image
from .session import Session, SessionOptions, start_session
from .version import __version__


_PIPELINES = ("IDStableDiffusionPipeline", "IDStableDiffusionImg2ImgPipeline", "IDStableDiffusionInpaintPipeline",
              "IDStableDiffusionXLPipeline", "IDStableDiffusionXLImg2ImgPipeline", "IDStableDiffusionXLInpaintPipeline",
              "IDArc2FacePipeline", "IDFluxPipeline", "IDPhotoMakerPipeline", "load_identitynet")


def __getattr__(name: str):
    # Pipelines import diffusers and torch: load them on first use so `idgen --help`
    # and face analysis stay fast.
    if name in _PIPELINES:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'idgen' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Face",
    "FaceAnalyzer",
    "IDArc2FacePipeline",
    "IDFluxPipeline",
    "IDGenError",
    "IDPhotoMakerPipeline",
    "IdentityInputError",
    "IDStableDiffusionImg2ImgPipeline",
    "IDStableDiffusionInpaintPipeline",
    "IDStableDiffusionPipeline",
    "IDStableDiffusionXLImg2ImgPipeline",
    "IDStableDiffusionXLInpaintPipeline",
    "IDStableDiffusionXLPipeline",
    "ImageError",
    "ModelNotFoundError",
    "NoFaceError",
    "Session",
    "SessionOptions",
    "__version__",
    "draw_kps",
    "load_identitynet",
    "load_image",
    "start_session",
]
