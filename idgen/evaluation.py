"""Evaluation: how well an identity is kept (FaceSim, face detection rate, an independent
recognizer's FaceSim) and how well the prompt is followed (CLIP-T), with a report a person reads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .errors import IDGenError, NoFaceError
from .faces import FaceAnalyzer, dlib_models_dir
from .images import IMAGE_SUFFIXES, ImageInput, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's preprocessing, differentiable: centre square, bicubic resize, normalise.
    ``images`` (B, 3, H, W) in [0, 1]."""
    side = min(images.shape[-2:])
    top, left = (images.shape[-2] - side) // 2, (images.shape[-1] - side) // 2
    square = images[..., top : top + side, left : left + side]
    pixels = F.interpolate(square, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1) for im in images])


class ClipScorer:
    """CLIP-T: cosine between a prompt's and an image's CLIP embeddings."""

    def __init__(self, model_name_or_path: str):
        from transformers import CLIPModel, CLIPTokenizer

        self.name = model_name_or_path
        self.model = CLIPModel.from_pretrained(model_name_or_path).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(model_name_or_path)

    @torch.no_grad()
    def score(self, image: Image.Image, prompt: str) -> float:
        pixels = clip_preprocess(pil_to_tensor([image]), self.model.config.vision_config.image_size)
        tokens = self.tokenizer([prompt], padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        out = self.model(input_ids=tokens.input_ids, pixel_values=pixels)
        return float((F.normalize(out.image_embeds, dim=-1) * F.normalize(out.text_embeds, dim=-1)).sum())


class DlibRecognizer:
    """An independent recognizer: dlib's detector, 5-point model and 128-d ResNet (its own
    pipeline end to end, sharing nothing with the ArcFace path)."""

    name = "dlib_resnet_v1"

    def __init__(self):
        import dlib

        models = dlib_models_dir()
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))

    def descriptor(self, image: ImageInput) -> np.ndarray | None:
        """(128,) descriptor of the largest face, or None."""
        rgb = np.ascontiguousarray(np.asarray(load_image(image)))
        rects, _, _ = self._detector.run(rgb, 1, 0.2)
        if not rects:
            return None
        rect = max(rects, key=lambda r: r.width() * r.height())
        return np.asarray(self._net.compute_face_descriptor(rgb, self._shape(rgb, rect)), dtype=np.float32)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def face_similarity(analyzer: FaceAnalyzer, image: ImageInput, reference: np.ndarray) -> float | None:
    """FaceSim: cosine between the ArcFace embedding of the largest face in ``image`` and
    ``reference``; None when no face is found."""
    try:
        return float(analyzer.get_face(image).embedding @ reference)
    except NoFaceError:
        return None


def load_identities(folder: str) -> dict[str, list[str]]:
    """Reference photos, one sub-folder per identity."""
    if not os.path.isdir(folder):
        raise IDGenError(f"{folder} is not a folder: pass a folder with one sub-folder of photos per identity")
    identities = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            photos = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
            if photos:
                identities[name] = photos
    if not identities:
        raise IDGenError(f"{folder} has no sub-folder with photos: put each identity's photos in {folder}/<name>/")
    return identities


@dataclass
class Sample:
    identity: str
    prompt: str
    seed: int
    file: str
    face_detected: bool
    facesim: float | None
    facesim_second: float | None = None
    clip_t: float | None = None


@dataclass
class Report:
    config: dict
    samples: list[Sample] = field(default_factory=list)

    def summary(self, identity: str | None = None) -> dict[str, float | None]:
        rows = [s for s in self.samples if identity is None or s.identity == identity]

        def mean(values):
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        return {
            "images": len(rows),
            "face_detection_rate": mean([float(s.face_detected) for s in rows]),
            "facesim": mean([s.facesim for s in rows]),
            "facesim_second": mean([s.facesim_second for s in rows]),
            "clip_t": mean([s.clip_t for s in rows]),
        }

    def to_dict(self) -> dict:
        identities = sorted({s.identity for s in self.samples})
        return {"config": self.config, "summary": self.summary(),
                "per_identity": {name: self.summary(name) for name in identities},
                "samples": [asdict(s) for s in self.samples]}


def _format(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(report: Report, out: str, prompts: list[str]) -> None:
    """``report.json``, ``report.md`` and ``grid.png`` (identities x prompts, first seed)."""
    data = report.to_dict()
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(data, handle, indent=1)
    columns = ["images", "face_detection_rate", "facesim", "facesim_second", "clip_t"]
    lines = ["# idgen evaluation", "", "| identity | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in [*data["per_identity"].items(), ("**all**", data["summary"])]:
        lines.append(f"| {name} | " + " | ".join(_format(row[c]) for c in columns) + " |")
    lines += ["", "FaceSim: cosine of ArcFace embeddings, generated face vs the identity's reference photos "
              "(detected faces only). facesim_second: the same with an independent recognizer "
              f"({report.config.get('second_recognizer') or 'none installed'}). CLIP-T: prompt-image CLIP cosine "
              f"({report.config.get('clip_model') or 'not computed'}).", "", "## Configuration", ""]
    lines += [f"- {key}: {value}" for key, value in report.config.items()]
    lines += ["", "![grid](grid.png)", ""]
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write("\n".join(lines))
    identities = sorted({s.identity for s in report.samples})
    first = min(s.seed for s in report.samples)
    cells = {(s.identity, s.prompt): s for s in report.samples if s.seed == first}
    cell, label = 192, 28
    grid = Image.new("RGB", (label * 4 + cell * len(prompts), label + cell * len(identities)), "white")
    draw = ImageDraw.Draw(grid)
    for j, prompt in enumerate(prompts):
        draw.text((label * 4 + j * cell + 4, 6), prompt[:28], fill="black")
    for i, name in enumerate(identities):
        draw.text((4, label + i * cell + cell // 2), name[:14], fill="black")
        for j, prompt in enumerate(prompts):
            sample = cells[(name, prompt)]
            image = Image.open(os.path.join(out, sample.file)).convert("RGB").resize((cell, cell))
            grid.paste(image, (label * 4 + j * cell, label + i * cell))
            draw.text((label * 4 + j * cell + 4, label + i * cell + 4), f"sim {_format(sample.facesim)}", fill="yellow")
    grid.save(os.path.join(out, "grid.png"))
