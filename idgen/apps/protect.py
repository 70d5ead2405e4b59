"""Protect a photo against identity generation: a small, bounded perturbation of the face that
moves what a face encoder reads away from the person, while the photo looks the same to people.

Projected gradient steps (Madry et al.) lower the cosine between the encoder's embedding of the
protected face and of the original, averaged over the changes a shared photo meets (expectation
over transformations: JPEG at quality 75, resizing down to half and back, shifts of a few pixels),
inside the face's box and within a budget: an L-inf bound (default 8/255) or a PSNR floor. The
encoder is idgen's differentiable ArcFace (the analyzer's own recognizer, from its ONNX file).

It is a mitigation, not a guarantee: a recognizer it was not optimised against may still read the
person (``bench/protect.py`` measures dlib's, held out), and a determined attacker can denoise.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from idgen.errors import IDGenError
from idgen.faces import FaceAnalyzer, ImageInput, load_image
from idgen.faces.arcface import DifferentiableArcFace

ENCODERS = ("arcface",)
#: Each shared copy of a photo meets some of these: a step averages the encoder's view over them.
TRANSFORMS = ("none", "jpeg", "resize", "shift")


@dataclass(frozen=True)
class ProtectSettings:
    """``budget``: the largest change of a pixel (of 1); or ``psnr``: the smallest PSNR in dB
    (then the change is bounded in L2 instead). ``steps`` of projected gradient descent, each
    averaging ``samples`` transformed copies; ``seed`` makes it reproducible."""

    budget: float = 8 / 255
    psnr: float | None = None
    steps: int = 60
    samples: int = 4
    seed: int = 0
    against: tuple[str, ...] = ("arcface",)
    margin: float = 0.2  # the face box grows by this share of its size on each side

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 32 / 255:
            raise IDGenError(f"--budget {self.budget:.4f} is out of range: give a change per pixel above 0 and at most "
                             "32/255 (default 8/255)")
        if self.psnr is not None and not 20 <= self.psnr <= 60:
            raise IDGenError(f"--psnr {self.psnr} is out of range: give 20 to 60 dB (higher changes less)")
        unknown = [name for name in self.against if name not in ENCODERS]
        if unknown or not self.against:
            raise IDGenError(f"--against {','.join(unknown) or '(none)'}: give one or more of {', '.join(ENCODERS)}")


@dataclass
class ProtectResult:
    image: Image.Image
    linf: float  # the largest change of a pixel, of 255
    psnr: float
    ssim: float
    cosine: dict[str, float]  # per encoder: the protected face's embedding against the original's

    def summary(self) -> dict[str, str]:
        return {"linf": f"{self.linf:.0f}/255", "psnr": f"{self.psnr:.2f} dB", "ssim": f"{self.ssim:.4f}",
                **{f"cosine_{name}": f"{value:.4f}" for name, value in self.cosine.items()}}


def parse_budget(text: str) -> float:
    """``8/255``, ``0.03``: a change per pixel, of 1."""
    try:
        top, _, bottom = text.partition("/")
        value = float(top) / (float(bottom) if bottom else 1.0)
    except (ValueError, ZeroDivisionError):
        raise IDGenError(f"--budget {text}: write it as a fraction of the pixel range, e.g. 8/255 or 0.03") from None
    if not math.isfinite(value):
        raise IDGenError(f"--budget {text}: write a finite number, e.g. 8/255")
    return value


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray((pixels[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def _jpeg(pixels: torch.Tensor, quality: int = 75) -> torch.Tensor:
    buffer = io.BytesIO()
    _image(pixels).save(buffer, format="JPEG", quality=quality)
    return _tensor(Image.open(buffer).convert("RGB"))


def _resized(pixels: torch.Tensor, scale: float) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    small = F.interpolate(pixels, size=(max(8, round(height * scale)), max(8, round(width * scale))), mode="bilinear",
                          antialias=True, align_corners=False)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def transformed(pixels: torch.Tensor, kps: torch.Tensor, name: str, rng: np.random.Generator) -> tuple[torch.Tensor,
                                                                                                         torch.Tensor]:
    """One transformed copy and its keypoints. JPEG passes the gradient straight through (its
    rounding has none); resizing and shifts are differentiable."""
    if name == "jpeg":
        return pixels + (_jpeg(pixels.detach()) - pixels).detach(), kps
    if name == "resize":
        return _resized(pixels, float(rng.uniform(0.5, 1.0))), kps
    if name == "shift":
        dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
        return torch.roll(pixels, (dy, dx), dims=(2, 3)), kps + torch.tensor([dx, dy], dtype=kps.dtype)
    return pixels, kps


def face_mask(shape: tuple[int, int], bbox: np.ndarray, margin: float) -> torch.Tensor:
    """1 inside the face box grown by ``margin`` of its size on each side, 0 elsewhere."""
    height, width = shape
    x0, y0, x1, y1 = bbox
    grow_x, grow_y = (x1 - x0) * margin, (y1 - y0) * margin
    mask = torch.zeros(1, 1, height, width)
    mask[..., max(0, int(y0 - grow_y)):min(height, int(math.ceil(y1 + grow_y))),
         max(0, int(x0 - grow_x)):min(width, int(math.ceil(x1 + grow_x)))] = 1
    return mask


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of two (1, 3, H, W) images in
    [0, 1], over the luma."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    a, b = (a * weights).sum(1, keepdim=True), (b * weights).sum(1, keepdim=True)
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    mean_a, mean_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mean_a**2
    var_b = F.conv2d(b * b, window) - mean_b**2
    cov = F.conv2d(a * b, window) - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def encoders(analyzer: FaceAnalyzer, names: tuple[str, ...]) -> dict[str, Any]:
    """The differentiable encoders by name (``arcface``: the analyzer's recognizer)."""
    return {name: DifferentiableArcFace.from_onnx(analyzer.recognizer.model_file) for name in names if name == "arcface"}


def protect(image: ImageInput, analyzer: FaceAnalyzer, settings: ProtectSettings | None = None,
            progress: bool = True) -> ProtectResult:
    """The protected photo (its largest face), the budget it used and each encoder's cosine to the
    original (on the photo as saved, 8 bits per channel)."""
    settings = settings or ProtectSettings()
    original = load_image(image, analyzer.max_pixels)
    face = analyzer.get_face(original)
    models = encoders(analyzer, settings.against)
    x0 = _tensor(original)
    kps = torch.from_numpy(np.asarray(face.kps, np.float32))[None]
    mask = face_mask((x0.shape[-2], x0.shape[-1]), face.bbox, settings.margin)
    with torch.no_grad():
        targets = {name: model(x0, kps) for name, model in models.items()}
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    delta = (torch.rand(x0.shape, generator=generator) * 2 - 1) * settings.budget * mask
    l2_limit = None if settings.psnr is None else math.sqrt(x0.numel() * 10 ** (-settings.psnr / 10))
    step = settings.budget / 4 if l2_limit is None else l2_limit / 8
    for _ in tqdm(range(settings.steps), desc="protecting", unit="step", disable=not progress):
        delta.requires_grad_(True)
        loss = torch.zeros(())
        for _ in range(settings.samples):
            name = TRANSFORMS[int(rng.integers(len(TRANSFORMS)))]
            pixels, moved = transformed((x0 + delta).clamp(0, 1), kps, name, rng)
            for encoder, model in models.items():
                loss = loss + (model(pixels, moved) * targets[encoder]).sum() / settings.samples
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if l2_limit is None:  # L-inf: signed steps, clipped to the budget
                delta = (delta - step * grad.sign() * mask).clamp(-settings.budget, settings.budget)
            else:  # PSNR: normalised steps, projected on the L2 ball it allows
                delta = delta - step * grad * mask / grad.norm().clamp_min(1e-12)
                delta = delta * min(1.0, l2_limit / float(delta.norm().clamp_min(1e-12)))
            delta = ((x0 + delta).clamp(0, 1) - x0) * mask
    protected = _image(x0 + delta)
    x1 = _tensor(protected)
    with torch.no_grad():
        cosine = {name: float((model(x1, kps) * targets[name]).sum()) for name, model in models.items()}
    linf = int(np.abs(np.asarray(protected, np.int16) - np.asarray(original, np.int16)).max())
    return ProtectResult(protected, float(linf), psnr(x1, x0), ssim(x1, x0), cosine)


def _same_face(analyzer: FaceAnalyzer, image: Image.Image, kps: np.ndarray) -> np.ndarray:
    """The keypoints of the face of ``image`` nearest ``kps`` (where the original face lies, in
    this image's pixels): in a group photo, the same person."""
    faces = analyzer.analyze(image)
    if not faces:
        raise IDGenError("no face found in the photo to check: it may be too small or cut off")
    nearest = min(faces, key=lambda f: float(np.linalg.norm(f.kps.mean(0) - kps.mean(0))))
    return np.asarray(nearest.kps, np.float32)


def check(photo: ImageInput, reference: ImageInput, analyzer: FaceAnalyzer,
          against: tuple[str, ...] = ENCODERS) -> dict[str, dict[str, float]]:
    """How protected ``photo`` is against the identity of ``reference`` (its original): per encoder,
    the cosine between the two faces as they are, after JPEG 75 and after a 0.5 resize (the face
    found anew in each, the one where the original's is)."""
    original = load_image(reference, analyzer.max_pixels)
    shared = load_image(photo, analyzer.max_pixels)
    models = encoders(analyzer, against)
    face = analyzer.get_face(original)
    x0, kps0 = _tensor(original), torch.from_numpy(np.asarray(face.kps, np.float32))[None]
    variants = {"as is": shared, "jpeg 75": _image(_jpeg(_tensor(shared))),
                "resize 0.5": shared.resize((max(1, shared.width // 2), max(1, shared.height // 2)), Image.Resampling.BILINEAR)}
    report: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, model in models.items():
            target = model(x0, kps0)
            report[name] = {}
            for variant, image in variants.items():
                kps = torch.from_numpy(_same_face(analyzer, image, face.kps * image.width / original.width))[None]
                report[name][variant] = float((model(_tensor(image), kps) * target).sum())
    return report
