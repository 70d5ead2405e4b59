"""The evaluation report: reference identities in, ``report.json``, ``report.md`` and
``grid.png`` out."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from idgen.errors import IDGenError
from idgen.faces import IMAGE_SUFFIXES, load_image


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


def write_report(report: Report, out: str, prompts: list[str], references: dict[str, str] | None = None) -> None:
    """``report.json``, ``report.md`` and ``grid.png`` (see ``write_grid``; ``references``: a photo
    per identity for its first column)."""
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
    write_grid(report, out, prompts, references or {})


def write_grid(report: Report, out: str, prompts: list[str], references: dict[str, str], cell: int = 192) -> None:
    """``grid.png``: a row per identity, its reference photo first, then every prompt x seed with
    its FaceSim; prompts are wrapped over their seeds' columns."""
    identities = sorted({s.identity for s in report.samples})
    seeds = sorted({s.seed for s in report.samples})
    cells = {(s.identity, s.prompt, s.seed): s for s in report.samples}
    span = cell * len(seeds)  # one prompt's columns
    wrapped = [textwrap.wrap(prompt, max(8, span // 7)) or [""] for prompt in prompts]
    line = 12
    header = line * (max(map(len, wrapped)) + 1) + 8
    label = 112
    grid = Image.new("RGB", (label + cell + span * len(prompts), header + cell * len(identities)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label + 4, header - line - 4), "reference", fill="black")
    for j, lines in enumerate(wrapped):
        left = label + cell + j * span
        for k, text in enumerate(lines):
            draw.text((left + 4, 4 + k * line), text, fill="black")
        for k, seed in enumerate(seeds):
            draw.text((left + k * cell + 4, header - line - 4), f"seed {seed}", fill="gray")
    for i, name in enumerate(identities):
        top = header + i * cell
        for k, text in enumerate(textwrap.wrap(name, 16)[:6]):
            draw.text((4, top + cell // 2 - line + k * line), text, fill="black")
        if name in references:
            grid.paste(ImageOps.fit(load_image(references[name]), (cell, cell)), (label, top))
        for j, prompt in enumerate(prompts):
            for k, seed in enumerate(seeds):
                sample = cells.get((name, prompt, seed))
                if sample is None:
                    continue
                left = label + cell + j * span + k * cell
                image = Image.open(os.path.join(out, sample.file)).convert("RGB").resize((cell, cell))
                grid.paste(image, (left, top))
                draw.text((left + 4, top + 4), f"sim {_format(sample.facesim)}", fill="yellow")
    grid.save(os.path.join(out, "grid.png"))
