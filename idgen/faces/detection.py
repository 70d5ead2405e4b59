"""Face detectors: ``detect(rgb) -> [(bbox (4,), score, kps (5, 2)), ...]``.

* ``scrfd``: the detection model of an insightface pack (``buffalo_l``, ``antelopev2``),
  the production path, exactly as the reference repos run it;
* ``dlib``: dlib's HOG detector and 68-point landmarks reduced to the 5 ArcFace points
  (weights ship in the ``face_recognition_models`` package, so it works offline).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import cv2
import dlib
import numpy as np

from ..errors import ModelNotFoundError

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
