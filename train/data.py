"""Training data: detect, align and embed every face photo of a folder once.

``prepare_data(folder, out)`` writes ``out/index.jsonl`` (one line per usable photo),
``out/skipped.jsonl`` (every photo left out, and why) and safetensors shards with the
identity embedding, its raw norm, the 5 keypoints, the box and the aligned 112x112 crop.
Re-running processes only photos not seen before (same path, size and modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from idgen.errors import IDGenError
from idgen.faces import IMAGE_SUFFIXES, FaceAnalyzer, load_image
from idgen.files import atomic_path, remove_stale_temporaries

INDEX, SKIPPED, INFO = "index.jsonl", "skipped.jsonl", "dataset.json"


@dataclass
class Record:
    file: str  # relative to its source folder
    caption: str
    shard: str
    row: int
    signature: str
    path: str  # the photo itself (absolute): a dataset may gather several folders
    face_size: float  # the face box's shorter side, in pixels


def _recognizer_sha256(analyzer: FaceAnalyzer) -> str:
    """What makes embeddings comparable: the recognizer model itself (its file's SHA-256)."""
    digest = hashlib.sha256()
    with open(analyzer.recognizer.model_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_recognizer(out: str, info: dict, analyzer: FaceAnalyzer, sha256: str) -> None:
    """One dataset, one recognizer: embeddings of two models are not comparable."""
    if "recognizer" not in info:
        return
    same = (info["recognizer_sha256"] == sha256 if "recognizer_sha256" in info
            else info["recognizer"] == analyzer.info["recognizer"])  # datasets written before the hash was kept
    if not same:
        raise IDGenError(
            f"{out} was embedded with {info['recognizer']} (pack {info.get('pack')}), this run uses "
            f"{analyzer.info['recognizer']} (pack {analyzer.pack_dir}): embeddings of two recognizers do not mix; "
            "use the same --face-model, or another --out"
        )


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
    """The JSON objects of a ``.jsonl`` file, one per line; one line naming the line if one is not."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise IDGenError(f"{path} line {number} is not JSON ({getattr(err, 'msg', err)}): fix or remove that line") from None
            if not isinstance(row, dict):
                raise IDGenError(f"{path} line {number} is not a JSON object: fix or remove that line")
            rows.append(row)
    return rows


def _inside(folder: str, path: str) -> bool:
    """Whether ``path``, links followed, lies inside ``folder`` (links followed too)."""
    root = os.path.realpath(folder)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def find_images(folder: str) -> list[str]:
    """Image files below ``folder``, as sorted relative paths; a link that leads out of the folder
    is not followed (a dataset is what lies in its folder)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _inside(folder, os.path.join(root, d)))
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files
                  if f.lower().endswith(IMAGE_SUFFIXES) and _inside(folder, os.path.join(root, f))]
    return sorted(found)


def read_captions(folder: str, files: list[str]) -> dict[str, str]:
    """Captions from ``metadata.jsonl`` (``file_name`` + ``text``, as diffusers' ImageFolder) or a
    ``.txt`` beside each image (the ``.txt`` wins)."""
    captions = {}
    metadata = os.path.join(folder, "metadata.jsonl")
    if os.path.exists(metadata) and not _inside(folder, metadata):
        raise IDGenError(f"{metadata} links out of {folder}: a dataset's captions live in its folder; copy the file in")
    for line_number, row in enumerate(_read_jsonl(metadata), 1):
        if "file_name" not in row:
            raise IDGenError(f"{metadata} line {line_number} has no 'file_name': write {{\"file_name\": ..., \"text\": ...}}")
        captions[os.path.normpath(row["file_name"])] = str(row.get("text", ""))
    for file in files:
        sidecar = os.path.join(folder, os.path.splitext(file)[0] + ".txt")
        if os.path.exists(sidecar) and _inside(folder, sidecar):  # a link out of the folder is no caption
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
    info, sha256 = _read_info(out), _recognizer_sha256(analyzer)
    _check_recognizer(out, info, analyzer, sha256)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    for written in (out, os.path.join(out, "shards")):  # what a killed run left half-written
        remove_stale_temporaries(written)
    source = os.path.abspath(folder)
    records = [_with_path(r, info) for r in _read_jsonl(os.path.join(out, INDEX))]
    skipped = [_with_path(r, info) for r in _read_jsonl(os.path.join(out, SKIPPED))]
    if info.get("min_face_size") != min_face_size:  # a new threshold applies to every photo, old ones too
        sizes = _face_sizes(out, records)
        small = [r for r, size in zip(records, sizes) if size < min_face_size]
        records = [r for r, size in zip(records, sizes) if size >= min_face_size]
        # this folder's photos skipped as too small are looked at again below
        skipped = [r for r in skipped if not (r["reason"].startswith("face too small")
                                              and os.path.commonpath([r["path"], source]) == source)]
        skipped += [{"file": r["file"], "path": r["path"], "signature": r["signature"],
                     "reason": f"face too small (under {min_face_size} px)"} for r in small]
    seen = {(r["path"], r["signature"]) for r in records + skipped}
    files = find_images(folder)
    captions = read_captions(folder, files)
    todo = [f for f in files if (os.path.join(source, f), _signature(os.path.join(folder, f))) not in seen]

    rows: dict[str, list] = {"id_embeds": [], "embedding_norm": [], "kps": [], "bbox": [], "aligned": []}
    new_records: list[Record] = []
    new_skipped: list[dict] = []
    shard = f"shard-{len({r['shard'] for r in records}):05d}"
    for file in tqdm(todo, desc="preparing faces", unit="image", disable=not progress):
        path = os.path.join(folder, file)
        signature = _signature(path)
        try:
            faces = analyzer.analyze(load_image(path, analyzer.max_pixels))
        except IDGenError as err:
            new_skipped.append({"file": file, "path": os.path.join(source, file), "signature": signature,
                                "reason": f"unreadable: {err}"})
            continue
        reason = None
        if not faces:
            reason = "no face"
        elif len(faces) > 1:
            reason = f"several faces ({len(faces)})"
        elif _box_side(faces[0].bbox) < min_face_size:
            reason = f"face too small (under {min_face_size} px)"
        if reason:
            new_skipped.append({"file": file, "path": os.path.join(source, file), "signature": signature,
                                "reason": reason})
            continue
        face = faces[0]
        rows["id_embeds"].append(face.embedding)
        rows["embedding_norm"].append(np.float32(face.embedding_norm))
        rows["kps"].append(face.kps.astype(np.float32))
        rows["bbox"].append(face.bbox.astype(np.float32))
        rows["aligned"].append(face.aligned)
        new_records.append(Record(file, captions.get(os.path.normpath(file), ""), shard, len(new_records), signature,
                                  os.path.join(source, file), _box_side(face.bbox)))

    if new_records:  # the shard first, then the index that points at it: a crash loses no index entry
        tensors = {key: torch.from_numpy(np.stack(value)) for key, value in rows.items()}
        with atomic_path(os.path.join(out, "shards", f"{shard}.safetensors")) as staging:
            save_file(tensors, staging)
    records += [asdict(r) for r in new_records]
    skipped += new_skipped
    _write_atomic(os.path.join(out, INDEX), "".join(json.dumps(r) + "\n" for r in records))
    _write_atomic(os.path.join(out, SKIPPED), "".join(json.dumps(r) + "\n" for r in skipped))
    sources = [*info.get("sources", [info["source"]] if "source" in info else []), source]
    _write_atomic(os.path.join(out, INFO), json.dumps({
        "sources": list(dict.fromkeys(sources)), "min_face_size": min_face_size, **analyzer.info,
        "recognizer_sha256": sha256}, indent=1))
    return PrepareReport(added=len(new_records), skipped=new_skipped, total=len(records))


def _read_info(out: str) -> dict:
    path = os.path.join(out, INFO)
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def _with_path(record: dict, info: dict) -> dict:
    """Datasets written before records (and skipped entries) held their own path: the one source
    folder they had."""
    if "path" not in record:
        record = {**record, "path": os.path.join(info["source"], record["file"])}
    return record


_SHARD = re.compile(r"^shard-\d{5}$")
_RECORD_KEYS = ("file", "caption", "shard", "row")


def _shard_file(prepared: str, name: object) -> str:
    """A shard's file inside the dataset; a name prepare-data does not write (a path, say) is refused."""
    if not isinstance(name, str) or not _SHARD.match(name):
        raise IDGenError(f"{os.path.join(prepared, INDEX)} names the shard {name!r}, not one prepare-data writes "
                         "(shard-NNNNN): the index was edited or damaged; prepare the dataset again")
    return os.path.join(prepared, "shards", f"{name}.safetensors")


def _checked_record(prepared: str, record: dict, number: int) -> dict:
    missing = [key for key in _RECORD_KEYS if key not in record]
    if missing or not isinstance(record.get("row"), int):
        raise IDGenError(f"{os.path.join(prepared, INDEX)} record {number} lacks {', '.join(missing) or 'a whole row'}: "
                         "the index was edited or damaged; prepare the dataset again")
    _shard_file(prepared, record["shard"])
    return record


def _box_side(bbox) -> float:
    """A face box's shorter side, in pixels."""
    return float(min(bbox[2] - bbox[0], bbox[3] - bbox[1]))


def _face_sizes(out: str, records: list[dict]) -> list[float]:
    """Each record's face size; records written before it was kept read it from their shard's
    boxes (each shard once)."""
    boxes: dict[str, torch.Tensor] = {}
    sizes = []
    for record in records:
        if "face_size" not in record and record["shard"] not in boxes:
            boxes[record["shard"]] = load_file(_shard_file(out, record["shard"]))["bbox"]
        sizes.append(record["face_size"] if "face_size" in record else _box_side(boxes[record["shard"]][record["row"]]))
    return sizes


class FaceDataset(torch.utils.data.Dataset):
    """Prepared photos for training: pixels (C, H, W) in [-1, 1], caption and identity."""

    def __init__(self, prepared: str, resolution: int):
        index = _read_jsonl(os.path.join(prepared, INDEX))
        if not index:
            raise IDGenError(
                f"{prepared} holds no usable face photo: run `idgen prepare-data PHOTOS --out {prepared}` "
                f"on a folder with one clear face per photo (see {os.path.join(prepared, SKIPPED)})"
            )
        info = _read_info(prepared)
        index = [_with_path(_checked_record(prepared, r, number), info) for number, r in enumerate(index, 1)]
        shards = {name: load_file(_shard_file(prepared, name)) for name in {r["shard"] for r in index}}
        for number, record in enumerate(index, 1):
            if not 0 <= record["row"] < len(shards[record["shard"]]["id_embeds"]):
                raise IDGenError(f"{os.path.join(prepared, INDEX)} record {number} points past the end of its shard "
                                 f"{record['shard']}: the dataset is damaged; prepare it again")
        self.records = index
        self.id_embeds = torch.stack([shards[r["shard"]]["id_embeds"][r["row"]] for r in index])
        self.embedding_norm = torch.stack([shards[r["shard"]]["embedding_norm"][r["row"]] for r in index])
        self.kps = torch.stack([shards[r["shard"]]["kps"][r["row"]] for r in index])
        self.bbox = torch.stack([shards[r["shard"]]["bbox"][r["row"]] for r in index])
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The photo resized and centre-cropped to ``resolution`` (C, H, W in [-1, 1]), and its
        keypoints and face box moved with it."""
        image = load_image(self.records[index]["path"])
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        scale_xy = torch.tensor([size[0] / image.width, size[1] / image.height])
        kps, bbox = self.kps[index] * scale_xy, self.bbox[index] * scale_xy.repeat(2)
        image = image.resize(size)
        left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        shift = torch.tensor([left, top], dtype=kps.dtype)
        return pixels, kps - shift, (bbox - shift.repeat(2)).clamp(0, self.resolution)

    def __getitem__(self, index: int) -> dict:
        pixels, kps, bbox = self.pixels(index)
        return {
            "pixels": pixels,
            "kps": kps,
            "face_box": bbox,
            "caption": self.records[index]["caption"],
            "id_embeds": self.id_embeds[index],
            "embedding_norm": self.embedding_norm[index],
        }
