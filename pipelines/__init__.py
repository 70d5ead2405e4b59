"""diffusers pipelines with identity conditioning."""

from .arc2face import IDArc2FacePipeline
from .face_inputs import FaceInputMixin
from .flux import IDFluxPipeline
from .identity import IdentityPipelineMixin
from .photomaker import IDPhotoMakerPipeline
from .stable_diffusion import IDStableDiffusionImg2ImgPipeline, IDStableDiffusionInpaintPipeline, IDStableDiffusionPipeline
from .stable_diffusion_xl import (
    IDStableDiffusionXLImg2ImgPipeline,
    IDStableDiffusionXLInpaintPipeline,
    IDStableDiffusionXLPipeline,
    load_identitynet,
)

__all__ = ["FaceInputMixin", "IDArc2FacePipeline", "IDFluxPipeline", "IDPhotoMakerPipeline", "IDStableDiffusionImg2ImgPipeline",
           "IDStableDiffusionInpaintPipeline",
           "IDStableDiffusionPipeline",
           "IDStableDiffusionXLImg2ImgPipeline", "IDStableDiffusionXLInpaintPipeline", "IDStableDiffusionXLPipeline",
           "IdentityPipelineMixin", "load_identitynet"]
