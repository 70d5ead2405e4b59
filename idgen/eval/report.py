"""The evaluation report: reference identities in, ``report.json``, ``report.md`` and
``grid.png`` out."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..errors import IDGenError
from ..faces import IMAGE_SUFFIXES

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
