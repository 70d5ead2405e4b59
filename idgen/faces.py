"""Face analysis: detection, 5 keypoints, ArcFace alignment and the 512-d identity embedding.

Two detectors feed one recognizer code path:

* ``scrfd``: the detection model of an insightface pack (``buffalo_l``, ``antelopev2``),
  the production path, exactly as the reference repos run it;
* ``dlib``: dlib's HOG detector and 68-point landmarks reduced to the 5 ArcFace points
  (weights ship in the ``face_recognition_models`` package, so it works offline).

The recognizer is always the first ArcFace ONNX model of the pack (``w600k_r50.onnx``,
``glintr100.onnx`` or any model with the same inputs and outputs), run by insightface.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

import cv2
import numpy as np

from .errors import ModelNotFoundError, NoFaceError
from .images import DEFAULT_MAX_PIXELS, ImageInput, load_image

if TYPE_CHECKING:
    from PIL import Image

#: insightface's ArcFace template: where the 5 keypoints land in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

KPS_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

#: Metadata key the project writes into ONNX files whose weights are random.
RANDOM_WEIGHTS_KEY = "idgen.random_weights"


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


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping ``src`` points onto ``dst``.

    Umeyama's closed form, the estimate insightface's ``norm_crop`` uses. Returns a 2x3 matrix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]]).astype(np.float32)


def arcface_template(size: int = 112) -> np.ndarray:
    """The ArcFace template for a ``size`` crop (multiples of 112 scale it; of 128 also shift it)."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112.0)
    if size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0], dtype=np.float32)
    raise ValueError(f"ArcFace crops are multiples of 112 or 128 pixels, got {size}")


def align_face(rgb: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp the face with keypoints ``kps`` onto the ArcFace template (insightface ``norm_crop``)."""
    matrix = similarity_transform(kps, arcface_template(size))
    return cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)


# --------------------------------------------------------------------------------------------
# Detectors: detect(rgb) -> list of (bbox (4,), score, kps (5, 2))
# --------------------------------------------------------------------------------------------
Detection = tuple[np.ndarray, float, np.ndarray]


def dlib_models_dir() -> str:
    """Folder of the dlib model files shipped by the ``face_recognition_models`` package."""
    # Importing the package itself needs pkg_resources, gone from current setuptools: find it instead.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the dlib face models are not installed: pip install face_recognition_models dlib-bin"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


class DlibDetector:
    """dlib HOG face detector + 68-point landmarks reduced to the 5 ArcFace keypoints."""

    name = "dlib"
    #: HOG's 80-px window, upsampled once, finds faces down to about this width.
    min_face_size = 40

    def __init__(self, threshold: float = 0.2, upsample: int = 1, max_side: int = 2048):
        import dlib

        self.threshold = threshold
        self.upsample = upsample
        self.max_side = max_side
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(
            os.path.join(dlib_models_dir(), "shape_predictor_68_face_landmarks.dat")
        )

    def detect(self, rgb: np.ndarray) -> list[Detection]:

        scale = min(1.0, self.max_side / max(rgb.shape[:2]))
        work = rgb if scale == 1.0 else cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        rects, scores, _ = self._detector.run(np.ascontiguousarray(work), self.upsample, self.threshold)
        detections = []
        for rect, score in zip(rects, scores):
            points = np.array([[p.x, p.y] for p in self._landmarks(work, rect).parts()], dtype=np.float32)
            kps = np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
            bbox = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32)
            detections.append((bbox / scale, float(score), kps / scale))
        return detections


class ScrfdDetector:
    """The SCRFD detection model of an insightface pack (letterbox to ``det_size``, NMS 0.4)."""

    name = "scrfd"

    def __init__(self, model: Any, det_size: int = 640, det_thresh: float = 0.5, on_gpu: bool = False):
        self.model = model
        self.det_size = det_size
        self.min_face_size = 16
        # insightface's prepare() switches the session to CPU for a negative ctx_id.
        model.prepare(0 if on_gpu else -1, input_size=(det_size, det_size), det_thresh=det_thresh)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        bboxes, kpss = self.model.detect(np.ascontiguousarray(rgb[:, :, ::-1]), max_num=0)
        return [(b[:4].astype(np.float32), float(b[4]), k.astype(np.float32)) for b, k in zip(bboxes, kpss)]


# --------------------------------------------------------------------------------------------
# Packs
# --------------------------------------------------------------------------------------------
def insightface_root() -> str:
    return os.path.expanduser(os.environ.get("INSIGHTFACE_HOME", "~/.insightface"))


def resolve_pack(name_or_path: str, root: str | None = None, download: bool = True) -> str:
    """Folder of an insightface model pack: a folder path, or ``<root>/models/<name>``.

    A missing named pack is downloaded by insightface (as ``FaceAnalysis`` does); a zip that
    unpacked one level too deep (``<name>/<name>/*.onnx``) is found as well.
    """
    if os.path.isdir(name_or_path):
        folder = name_or_path
    else:
        root = os.path.expanduser(root) if root else insightface_root()
        folder = os.path.join(root, "models", name_or_path)
        if not os.path.isdir(folder) and download and os.sep not in name_or_path:
            from insightface.utils.storage import ensure_available

            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    ensure_available("models", name_or_path, root=root)
            except Exception as err:  # any network or zip failure
                raise ModelNotFoundError(
                    f"face model pack '{name_or_path}' is not in {folder} and could not be downloaded "
                    f"({type(err).__name__}): download {name_or_path}.zip from the insightface model zoo "
                    f"and unpack it so that {folder}/*.onnx exist, or pass the pack folder"
                ) from None
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


def _load_pack_models(folder: str, providers: Sequence[str]) -> dict[str, Any]:
    """Route every ONNX file of a pack by task, in file-name order; the first model per task wins."""
    from insightface.model_zoo import model_zoo

    models: dict[str, Any] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.onnx"))):
        with contextlib.redirect_stdout(io.StringIO()):  # insightface prints the providers
            model = model_zoo.get_model(path, providers=list(providers))
        if model is not None and model.taskname not in models:
            models[model.taskname] = model
    return models


def onnx_metadata(path: str) -> dict[str, str]:
    import onnx

    return {prop.key: prop.value for prop in onnx.load(path, load_external_data=False).metadata_props}


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
        import onnxruntime

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

    def identity(
        self,
        images: Sequence[ImageInput],
        face_index: int = 0,
        weights: Sequence[float] | None = None,
        raw: bool = False,
    ) -> np.ndarray:
        """One identity from one or several photos of the same person: the (optionally
        weighted) mean of their normalised embeddings, normalised again; with ``raw``, scaled
        to the mean raw norm (InstantID was trained on un-normalised vectors).

        A photo with no face raises, naming its index: it is never silently dropped.
        """
        if weights is not None and (len(weights) != len(images) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"need {len(images)} non-negative weights with a positive sum, one per photo, got {list(weights)}")
        faces = []
        for i, image in enumerate(images):
            try:
                faces.append(self.get_face(image, face_index))
            except NoFaceError as err:
                if len(images) == 1:
                    raise
                raise NoFaceError(f"face image {i}: {err}") from None
        mean = np.average([face.embedding for face in faces], axis=0, weights=weights)
        mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        if raw:
            mean = mean * np.average([face.embedding_norm for face in faces], weights=weights)
        return mean.astype(np.float32)


#: InstantID's keypoint colours (RGB), by keypoint index.
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))


def draw_kps(image_size: tuple[int, int], kps: np.ndarray, stickwidth: int = 4) -> "Image.Image":
    """The IdentityNet condition image, drawn as InstantID's was trained on.

    Black canvas of ``image_size`` (width, height); an ellipse from each eye and mouth corner to
    the nose in that point's colour, dimmed to 60%; then a full-colour disc of radius 10 on each
    keypoint.
    """
    from PIL import Image

    width, height = image_size
    kps = np.asarray(kps, dtype=np.float64)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for start in (0, 1, 3, 4):
        (x0, y0), (x1, y1) = kps[start], kps[2]
        length = float(np.hypot(x0 - x1, y0 - y1))
        angle = int(np.degrees(np.arctan2(y0 - y1, x0 - x1)))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), stickwidth), angle, 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KPS_COLORS[start])
    canvas = (canvas * 0.6).astype(np.uint8)
    for index, (x, y) in enumerate(kps):
        cv2.circle(canvas, (int(x), int(y)), 10, KPS_COLORS[index], -1)
    return Image.fromarray(canvas)
