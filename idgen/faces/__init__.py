"""Face analysis, on its own: image loading, detection, 5 keypoints, ArcFace alignment and
recognition (insightface's ONNX models, and the same models in torch for gradients).

Needs numpy, OpenCV, onnxruntime, insightface and dlib; never diffusers. The torch recognizer
(``DifferentiableArcFace`` and friends, in ``arcface``) imports torch on first use.
"""

from .alignment import ARCFACE_TEMPLATE, KPS_COLORS, KPS_NAMES, align_face, arcface_template, draw_kps, similarity_transform
from .analyzer import RANDOM_WEIGHTS_KEY, Face, FaceAnalyzer, insightface_root, onnx_metadata, resolve_pack
from .detection import DlibDetector, ScrfdDetector, dlib_models_dir
from .images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageInput, load_image

_TORCH_NAMES = ("DifferentiableArcFace", "IResNet", "OnnxRecognizer", "align_faces", "iresnet", "similarity_matrices")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from . import arcface  # lazy: the torch recognizer; face analysis runs without torch

        return getattr(arcface, name)
    raise AttributeError(f"module 'idgen.faces' has no attribute {name!r}")


__all__ = [
    "ARCFACE_TEMPLATE",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "KPS_COLORS",
    "KPS_NAMES",
    "RANDOM_WEIGHTS_KEY",
    "DlibDetector",
    "Face",
    "FaceAnalyzer",
    "ImageInput",
    "ScrfdDetector",
    "align_face",
    "arcface_template",
    "dlib_models_dir",
    "draw_kps",
    "insightface_root",
    "load_image",
    "onnx_metadata",
    "resolve_pack",
    "similarity_transform",
    *_TORCH_NAMES,
]
