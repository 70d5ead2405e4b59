"""idgen: identity-preserving image generation with diffusers."""

from .errors import CheckpointError, IDGenError, ImageError, ModelNotFoundError, NoFaceError
from .faces import Face, FaceAnalyzer
from .images import load_image
from .version import __version__


def __getattr__(name: str):
    # Pipelines import diffusers and torch: load them on first use so `idgen --help`
    # and face analysis stay fast.
    if name in ("IDStableDiffusionPipeline", "IDArc2FacePipeline"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'idgen' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Face",
    "FaceAnalyzer",
    "IDArc2FacePipeline",
    "IDGenError",
    "IDStableDiffusionPipeline",
    "ImageError",
    "ModelNotFoundError",
    "NoFaceError",
    "__version__",
    "load_image",
]
