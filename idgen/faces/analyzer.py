"""Face analysis: detection, 5 keypoints, ArcFace alignment and the 512-d identity embedding.

Two detectors (``detection.py``) feed one recognizer code path: the first ArcFace ONNX model
of the pack (``w600k_r50.onnx``, ``glintr100.onnx`` or any model with the same inputs and
outputs), run by insightface.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnxruntime

from ..errors import ModelNotFoundError, NoFaceError
from ..network import download
from .alignment import align_face
from .detection import DlibDetector, ScrfdDetector
from .images import DEFAULT_MAX_PIXELS, ImageInput, load_image

#: Metadata key the project writes into ONNX files whose weights are random.
RANDOM_WEIGHTS_KEY = "idgen.random_weights"
#: Where insightface publishes its model packs (``<name>.zip``).
INSIGHTFACE_RELEASES = "https://github.com/deepinsight/insightface/releases/download/v0.7"


@dataclass
class Face:
    """One detected face. Coordinates are pixels of the input image; left/right are as seen."""

    bbox: np.ndarray  # (4,) x1, y1, x2, y2
    det_score: float
    kps: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth corner, right mouth corner
    aligned: np.ndarray = field(repr=False)  # (112, 112, 3) uint8 RGB, ArcFace template
    embedding: np.ndarray = field(repr=False)  # (512,) float32, L2-normalised ArcFace vector
    embedding_norm: float = 1.0  # L2 norm of the raw recognizer output (InstantID takes the raw vector)

    @property
    def raw_embedding(self) -> np.ndarray:
        return self.embedding * self.embedding_norm

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


def insightface_root() -> str:
    return os.path.expanduser(os.environ.get("INSIGHTFACE_HOME", "~/.insightface"))


def resolve_pack(name_or_path: str, root: str | None = None, download: bool = True) -> str:
    """Folder of an insightface model pack: a folder path, or ``<root>/models/<name>``.

    A missing named pack is downloaded from insightface's release, as ``FaceAnalysis`` does (with
    a timeout, never under ``HF_HUB_OFFLINE``); a zip that unpacked one level too deep
    (``<name>/<name>/*.onnx``) is found as well.
    """
    if os.path.isdir(name_or_path):
        folder = name_or_path
    else:
        root = os.path.expanduser(root) if root else insightface_root()
        folder = os.path.join(root, "models", name_or_path)
        if not os.path.isdir(folder) and download and os.sep not in name_or_path:
            _download_pack(name_or_path, folder)
        if not os.path.isdir(folder):
            raise ModelNotFoundError(
                f"face model pack '{name_or_path}' not found at {folder}: pass an existing pack folder or name"
            )
    if not glob.glob(os.path.join(folder, "*.onnx")):
        nested = sorted(glob.glob(os.path.join(folder, "*", "*.onnx")))
        if not nested:
            raise ModelNotFoundError(f"face model pack folder {folder} holds no .onnx model: re-download the pack")
        folder = os.path.dirname(nested[0])
    return folder


def _download_pack(name: str, folder: str) -> None:
    """insightface's ``<name>.zip`` from its release, unpacked into ``folder`` (whole or not at all)."""
    fix = f"unpack it so that {folder}/*.onnx exist, or pass the pack folder"
    archive = download(f"{INSIGHTFACE_RELEASES}/{name}.zip", f"{folder}.zip", f"face model pack '{name}'", fix)
    staging = f"{folder}.tmp-unpack"
    try:
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(staging)  # member names are kept inside staging
        os.replace(staging, folder)
    except (zipfile.BadZipFile, OSError) as err:
        os.remove(archive)
        raise ModelNotFoundError(f"face model pack '{name}': {archive} could not be unpacked ({type(err).__name__}): "
                                 f"download it again, or {fix}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_pack_models(folder: str, providers: Sequence[str]) -> dict[str, Any]:
    """Route every ONNX file of a pack by task, in file-name order; the first model per task wins."""
    from insightface.model_zoo import model_zoo  # lazy: insightface takes 4 s to import

    models: dict[str, Any] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.onnx"))):
        with contextlib.redirect_stdout(io.StringIO()):  # insightface prints the providers
            model = model_zoo.get_model(path, providers=list(providers))
        if model is not None and model.taskname not in models:
            models[model.taskname] = model
    return models


def onnx_metadata(path: str) -> dict[str, str]:
    import onnx  # lazy: 0.8 s to import, for model metadata only

    return {prop.key: prop.value for prop in onnx.load(path, load_external_data=False).metadata_props}


def check_face_weights(weights: Sequence[float] | None, count: int) -> None:
    """``weights`` of ``count`` photos of one person: None, or one non-negative weight each with a positive sum."""
    if weights is not None and (len(weights) != count or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"need {count} non-negative weights with a positive sum, one per photo, got {list(weights)}")


def mean_identity(embeddings: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """One identity from unit embeddings (n, d) of one person's photos: their (weighted) mean,
    normalised again."""
    mean = np.average(embeddings, axis=0, weights=weights)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


class FaceAnalyzer:
    """Find faces, their 5 keypoints, aligned crops and ArcFace embeddings.

    Args:
        pack: insightface pack name (``buffalo_l``, ``antelopev2``; looked up in
            ``$INSIGHTFACE_HOME/models``, default ``~/.insightface/models``) or a pack folder.
        root: insightface root folder, for pack names.
        detector: ``"auto"`` (the pack's SCRFD if it has one, else dlib), ``"scrfd"`` or ``"dlib"``.
        providers: onnxruntime execution providers (default: CUDA when available, else CPU).
        det_size: SCRFD input size.
        det_thresh: minimum detection score (SCRFD).
        max_pixels: the largest image accepted.
    """

    def __init__(
        self,
        pack: str = "buffalo_l",
        root: str | None = None,
        detector: Literal["auto", "scrfd", "dlib"] = "auto",
        providers: Sequence[str] | None = None,
        det_size: int = 640,
        det_thresh: float = 0.5,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if detector not in ("auto", "scrfd", "dlib"):
            raise ValueError(f"detector must be 'auto', 'scrfd' or 'dlib', got {detector!r}")
        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.pack_dir = resolve_pack(pack, root)
        self.max_pixels = max_pixels
        models = _load_pack_models(self.pack_dir, providers)
        if "recognition" not in models:
            raise ModelNotFoundError(
                f"face model pack {self.pack_dir} has no ArcFace recognition model (112x112 input, one 512-d "
                "output): add w600k_r50.onnx or glintr100.onnx"
            )
        self.recognizer = models["recognition"]
        if detector == "auto":
            detector = "scrfd" if "detection" in models else "dlib"
        if detector == "scrfd":
            if "detection" not in models:
                raise ModelNotFoundError(
                    f"face model pack {self.pack_dir} has no SCRFD detection model: use detector='dlib' "
                    "or a full pack such as buffalo_l"
                )
            on_gpu = "CUDAExecutionProvider" in providers
            self.detector: DlibDetector | ScrfdDetector = ScrfdDetector(models["detection"], det_size, det_thresh, on_gpu)
        else:
            self.detector = DlibDetector()
        self.recognizer_random = onnx_metadata(self.recognizer.model_file).get(RANDOM_WEIGHTS_KEY) == "true"
        self._recipe = (self.pack_dir, None, detector, list(providers), det_size, det_thresh, max_pixels)

    def __reduce__(self) -> tuple:
        """Pickled as its recipe, and built anew where it lands (a worker process): ONNX sessions do
        not travel."""
        return (FaceAnalyzer, self._recipe)

    @property
    def info(self) -> dict[str, Any]:
        """What produced the embeddings: goes into output metadata."""
        return {
            "pack": self.pack_dir,
            "detector": self.detector.name,
            "recognizer": os.path.basename(self.recognizer.model_file),
            "recognizer_random_weights": self.recognizer_random,
        }

    def embed_aligned(self, aligned: Sequence[np.ndarray]) -> np.ndarray:
        """Raw ArcFace outputs (N, 512) of RGB crops aligned to the template (insightface wants BGR)."""
        bgr = [np.ascontiguousarray(crop[:, :, ::-1]) for crop in aligned]
        return np.asarray(self.recognizer.get_feat(bgr), dtype=np.float32).reshape(len(bgr), -1)

    def analyze(self, image: ImageInput) -> list[Face]:
        """All faces in ``image``, largest first."""
        rgb = np.asarray(load_image(image, self.max_pixels))
        detections = self.detector.detect(rgb)
        if not detections:
            return []
        size = self.recognizer.input_size[0]
        crops = [align_face(rgb, kps, size) for _, _, kps in detections]
        raw = self.embed_aligned(crops)
        norms = np.maximum(np.linalg.norm(raw, axis=1), 1e-12)
        faces = [
            Face(bbox=bbox, det_score=score, kps=kps, aligned=crop, embedding=emb / norm, embedding_norm=float(norm))
            for (bbox, score, kps), crop, emb, norm in zip(detections, crops, raw, norms)
        ]
        return sorted(faces, key=lambda face: -face.area)

    def get_face(self, image: ImageInput, face_index: int = 0) -> Face:
        """One face: the largest by default, or the ``face_index``-th largest."""
        faces = self.analyze(image)
        name = str(image) if isinstance(image, (str, os.PathLike)) else "the image"
        if not faces:
            raise NoFaceError(
                f"no face found in {name}: use a photo with a clear, frontal face at least "
                f"{self.detector.min_face_size} pixels wide"
            )
        if not -len(faces) <= face_index < len(faces):
            raise NoFaceError(
                f"face_index={face_index} but {name} has {len(faces)} face(s): choose an index below {len(faces)}"
            )
        return faces[face_index]

    def faces(self, images: Sequence[ImageInput], face_index: int | Sequence[int] = 0) -> list[Face]:
        """The chosen face of each photo: ``face_index`` in every photo, or one index per photo. A
        photo with no face raises, naming its index: it is never silently dropped."""
        indices = [face_index] * len(images) if isinstance(face_index, (int, np.integer)) else list(face_index)
        if len(indices) != len(images):
            raise ValueError(f"face_index has {len(indices)} values for {len(images)} photos: give one, or one per photo")
        faces = []
        for i, (image, index) in enumerate(zip(images, indices)):
            try:
                faces.append(self.get_face(image, index))
            except NoFaceError as err:
                if len(images) == 1:
                    raise
                raise NoFaceError(f"face image {i}: {err}") from None
        return faces

    def embeddings(self, images: Sequence[ImageInput], face_index: int | Sequence[int] = 0, raw: bool = False) -> np.ndarray:
        """(N, 512): the normalised embedding of the chosen face of each photo (``faces``), kept
        apart (FaceID-Portrait makes tokens from each); with ``raw``, the recognizer's raw vectors
        (PhotoMaker's input)."""
        faces = self.faces(images, face_index)
        return np.stack([face.raw_embedding if raw else face.embedding for face in faces]).astype(np.float32)

    def face_crops(self, images: Sequence[ImageInput], face_index: int | Sequence[int] = 0, size: int = 224,
                   template: str = "arcface") -> np.ndarray:
        """(N, size, size, 3) uint8 RGB: the chosen face of each photo (``faces``) aligned to the
        ArcFace template at ``size`` (FaceID-Plus's CLIP input), or FFHQ's (PuLID's)."""
        loaded = [load_image(image, self.max_pixels) for image in images]
        return np.stack([align_face(np.asarray(image), face.kps, size, template)
                         for image, face in zip(loaded, self.faces(loaded, face_index))])

    def identity(
        self,
        images: Sequence[ImageInput],
        face_index: int | Sequence[int] = 0,
        weights: Sequence[float] | None = None,
        raw: bool = False,
    ) -> np.ndarray:
        """One identity from one or several photos of the same person (``faces``): the
        (optionally weighted) mean of their normalised embeddings, normalised again; with ``raw``,
        scaled to the mean raw norm (InstantID was trained on un-normalised vectors)."""
        check_face_weights(weights, len(images))
        faces = self.faces(images, face_index)
        mean = mean_identity(np.stack([face.embedding for face in faces]), weights)
        if raw:
            mean = mean * np.average([face.embedding_norm for face in faces], weights=weights)
        return mean.astype(np.float32)
