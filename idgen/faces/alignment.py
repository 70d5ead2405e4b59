"""ArcFace alignment: the 5-keypoint template, the similarity transform onto it, and the
keypoint drawing InstantID's IdentityNet takes as its condition."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from PIL import Image

#: insightface's ArcFace template: where the 5 keypoints land in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

KPS_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


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


#: FFHQ's 5-keypoint template at 512 px (facexlib's): a looser crop with hair and chin, which
#: face restoration and PuLID's face parsing take.
FFHQ_TEMPLATE = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float32,
)
#: facexlib's grey outside the photo in an FFHQ crop.
FFHQ_BORDER = (135, 133, 132)


def align_face(rgb: np.ndarray, kps: np.ndarray, size: int = 112, template: str = "arcface") -> np.ndarray:
    """Warp the face with keypoints ``kps`` onto the ArcFace template (insightface ``norm_crop``),
    or with ``template="ffhq"`` onto FFHQ's (facexlib's ``align_warp_face``)."""
    if template == "ffhq":
        matrix = similarity_transform(kps, FFHQ_TEMPLATE * (size / 512.0))
        return cv2.warpAffine(rgb, matrix, (size, size), borderValue=FFHQ_BORDER)
    if template != "arcface":
        raise ValueError(f"template is 'arcface' or 'ffhq', got {template!r}")
    matrix = similarity_transform(kps, arcface_template(size))
    return cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)


#: InstantID's keypoint colours (RGB), by keypoint index.
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))


def draw_kps(image_size: tuple[int, int], kps: np.ndarray, stickwidth: int = 4) -> Image.Image:
    """The IdentityNet condition image, drawn as InstantID's was trained on.

    Black canvas of ``image_size`` (width, height); an ellipse from each eye and mouth corner to
    the nose in that point's colour, dimmed to 60%; then a full-colour disc of radius 10 on each
    keypoint. ``kps`` is one face's (5, 2) or several faces' (N, 5, 2), all drawn on one canvas.
    """
    width, height = image_size
    faces = np.asarray(kps, dtype=np.float64).reshape(-1, 5, 2)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for kps in faces:
        for start in (0, 1, 3, 4):
            (x0, y0), (x1, y1) = kps[start], kps[2]
            length = float(np.hypot(x0 - x1, y0 - y1))
            angle = int(np.degrees(np.arctan2(y0 - y1, x0 - x1)))
            centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
            polygon = cv2.ellipse2Poly(centre, (int(length / 2), stickwidth), angle, 0, 360, 1)
            cv2.fillConvexPoly(canvas, np.asarray(polygon), KPS_COLORS[start])
    canvas = (canvas * 0.6).astype(np.uint8)
    for kps in faces:
        for index, (x, y) in enumerate(kps):
            cv2.circle(canvas, (int(x), int(y)), 10, KPS_COLORS[index], -1)
    return Image.fromarray(canvas)
