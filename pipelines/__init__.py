"""diffusers pipelines with identity conditioning."""

from .arc2face import IDArc2FacePipeline
from .identity import FaceInputMixin, IdentityPipelineMixin
from .stable_diffusion import IDStableDiffusionPipeline

__all__ = ["FaceInputMixin", "IDArc2FacePipeline", "IDStableDiffusionPipeline", "IdentityPipelineMixin"]
