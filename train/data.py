"""Training data: detect, align and embed every face photo of a folder once.

``prepare_data(folder, out)`` writes ``out/index.jsonl`` (one line per usable photo),
``out/skipped.jsonl`` (every photo left out, and why) and safetensors shards with the
identity embedding, its raw norm, the 5 keypoints, the box and the aligned 112x112 crop.
Re-running processes only photos not seen before (same path, size and modification time).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from idgen.errors import IDGenError
from idgen.faces import IMAGE_SUFFIXES, FaceAnalyzer, load_image
from idgen.files import atomic_path

INDEX, SKIPPED, INFO = "index.jsonl", "skipped.jsonl", "dataset.json"


@dataclass
class Record:
    file: str  # relative to the source folder
    caption: str
    shard: str
    row: int
    signature: str


@dataclass
class PrepareReport:
    added: int
    skipped: list[dict]
    total: int


def _signature(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}-{int(stat.st_mtime)}"


def _write_atomic(path: str, text: str) -> None:
    with atomic_path(path) as staging, open(staging, "w") as handle:
        handle.write(text)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def find_images(folder: str) -> list[str]:
    """Image files below ``folder``, as sorted relative paths."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def read_captions(folder: str, files: list[str]) -> dict[str, str]:
    """Captions from ``metadata.jsonl`` (``file_name`` + ``text``, as diffusers' ImageFolder) or a
    ``.txt`` beside each image (the ``.txt`` wins)."""
    captions = {}
    metadata = os.path.join(folder, "metadata.jsonl")
    for line_number, row in enumerate(_read_jsonl(metadata), 1):
        if "file_name" not in row:
            raise IDGenError(f"{metadata} line {line_number} has no 'file_name': write {{\"file_name\": ..., \"text\": ...}}")
        captions[os.path.normpath(row["file_name"])] = str(row.get("text", ""))
    for file in files:
        sidecar = os.path.join(folder, os.path.splitext(file)[0] + ".txt")
        if os.path.exists(sidecar):
            with open(sidecar) as handle:
                captions[file] = handle.read().strip()
    return captions


def prepare_data(
    folder: str,
    out: str,
    analyzer: FaceAnalyzer,
    min_face_size: int = 64,
    shard_size: int = 1000,
    progress: bool = True,
) -> PrepareReport:
    """Embed the new photos of ``folder`` into ``out``; photos with no face, several faces, a face
    under ``min_face_size`` pixels or no readable image are reported in ``skipped.jsonl``."""
    if not os.path.isdir(folder):
        raise IDGenError(f"{folder} is not a folder: pass the folder of face photos")
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    records = _read_jsonl(os.path.join(out, INDEX))
    skipped = _read_jsonl(os.path.join(out, SKIPPED))
    seen = {(r["file"], r["signature"]) for r in records + skipped}
    files = find_images(folder)
    captions = read_captions(folder, files)
    todo = [f for f in files if (f, _signature(os.path.join(folder, f))) not in seen]

    rows: dict[str, list] = {"id_embeds": [], "embedding_norm": [], "kps": [], "bbox": [], "aligned": []}
    new_records, new_skipped = [], []
    shard = f"shard-{len({r['shard'] for r in records}):05d}"
    for file in tqdm(todo, desc="preparing faces", unit="image", disable=not progress):
        path = os.path.join(folder, file)
        signature = _signature(path)
        try:
            faces = analyzer.analyze(load_image(path, analyzer.max_pixels))
        except IDGenError as err:
            new_skipped.append({"file": file, "signature": signature, "reason": f"unreadable: {err}"})
            continue
        reason = None
        if not faces:
            reason = "no face"
        elif len(faces) > 1:
            reason = f"several faces ({len(faces)})"
        elif min(faces[0].bbox[2] - faces[0].bbox[0], faces[0].bbox[3] - faces[0].bbox[1]) < min_face_size:
            reason = f"face too small (under {min_face_size} px)"
        if reason:
            new_skipped.append({"file": file, "signature": signature, "reason": reason})
            continue
        face = faces[0]
        rows["id_embeds"].append(face.embedding)
        rows["embedding_norm"].append(np.float32(face.embedding_norm))
        rows["kps"].append(face.kps.astype(np.float32))
        rows["bbox"].append(face.bbox.astype(np.float32))
        rows["aligned"].append(face.aligned)
        new_records.append(Record(file, captions.get(os.path.normpath(file), ""), shard, len(new_records), signature))

    if new_records:  # the shard first, then the index that points at it: a crash loses no index entry
        tensors = {key: torch.from_numpy(np.stack(value)) for key, value in rows.items()}
        with atomic_path(os.path.join(out, "shards", f"{shard}.safetensors")) as staging:
            save_file(tensors, staging)
    records += [asdict(r) for r in new_records]
    skipped += new_skipped
    _write_atomic(os.path.join(out, INDEX), "".join(json.dumps(r) + "\n" for r in records))
    _write_atomic(os.path.join(out, SKIPPED), "".join(json.dumps(r) + "\n" for r in skipped))
    _write_atomic(os.path.join(out, INFO), json.dumps({"source": os.path.abspath(folder), **analyzer.info}, indent=1))
    return PrepareReport(added=len(new_records), skipped=new_skipped, total=len(records))


class FaceDataset(torch.utils.data.Dataset):
    """Prepared photos for training: pixels (C, H, W) in [-1, 1], caption and identity."""

    def __init__(self, prepared: str, resolution: int):
        index = _read_jsonl(os.path.join(prepared, INDEX))
        if not index:
            raise IDGenError(
                f"{prepared} holds no usable face photo: run `idgen prepare-data PHOTOS --out {prepared}` "
                f"on a folder with one clear face per photo (see {os.path.join(prepared, SKIPPED)})"
            )
        with open(os.path.join(prepared, INFO)) as handle:
            self.source = json.load(handle)["source"]
        shards = {name: load_file(os.path.join(prepared, "shards", f"{name}.safetensors")) for name in {r["shard"] for r in index}}
        self.records = index
        self.id_embeds = torch.stack([shards[r["shard"]]["id_embeds"][r["row"]] for r in index])
        self.embedding_norm = torch.stack([shards[r["shard"]]["embedding_norm"][r["row"]] for r in index])
        self.kps = torch.stack([shards[r["shard"]]["kps"][r["row"]] for r in index])
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The photo resized and centre-cropped to ``resolution`` (C, H, W in [-1, 1]) and its
        keypoints moved with it."""
        image = load_image(os.path.join(self.source, self.records[index]["file"]))
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        kps = self.kps[index] * torch.tensor([size[0] / image.width, size[1] / image.height])
        image = image.resize(size)
        left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return pixels, kps - torch.tensor([left, top], dtype=kps.dtype)

    def __getitem__(self, index: int) -> dict:
        pixels, kps = self.pixels(index)
        return {
            "pixels": pixels,
            "kps": kps,
            "caption": self.records[index]["caption"],
            "id_embeds": self.id_embeds[index],
            "embedding_norm": self.embedding_norm[index],
        }
