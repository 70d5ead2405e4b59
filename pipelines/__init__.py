"""diffusers pipelines with identity conditioning."""

from .identity import IdentityPipelineMixin
from .stable_diffusion import IDStableDiffusionPipeline

__all__ = ["IDStableDiffusionPipeline", "IdentityPipelineMixin"]
