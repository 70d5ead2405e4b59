"""idgen: identity-preserving image generation with diffusers."""

from . import network  # noqa: F401  # first: it switches the libraries' phoning home off before they load
from .apps.options import SessionOptions
from .errors import CheckpointError, IdentityInputError, IDGenError, ImageError, ModelNotFoundError, NoFaceError
from .faces import Face, FaceAnalyzer, draw_kps, load_image
from .version import __version__

# The foundation (errors, faces) loads here; the session and the pipelines import diffusers and
# torch, so they load on first use and `idgen --help` and face analysis stay fast.
_SESSION = ("Session", "start_session")
_PIPELINES = ("IDStableDiffusionPipeline", "IDStableDiffusionImg2ImgPipeline", "IDStableDiffusionInpaintPipeline",
              "IDStableDiffusionXLPipeline", "IDStableDiffusionXLImg2ImgPipeline", "IDStableDiffusionXLInpaintPipeline",
              "IDArc2FacePipeline", "IDFluxPipeline", "IDPhotoMakerPipeline", "load_identitynet")


def __getattr__(name: str):
    if name in _PIPELINES:
        from . import pipelines  # lazy: diffusers and torch load on first use

        return getattr(pipelines, name)
    if name in _SESSION:
        from .apps import session  # lazy: as the pipelines

        return getattr(session, name)
    if name == "protect":  # idgen.protect.protect(image, analyzer, ...)
        from .apps import protect  # lazy: as the pipelines

        return protect
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
