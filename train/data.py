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
from functools import partial
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from idgen import workers
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
    shard_size: int = 256,
    progress: bool = True,
    engine: workers.Engine | None = None,
) -> PrepareReport:
    """Embed the new photos of ``folder`` into ``out``; photos with no face, several faces, a face
    under ``min_face_size`` pixels or no readable image are reported in ``skipped.jsonl``.

    The new photos go in shards of ``shard_size``, each analysed by a worker of ``engine`` (local
    processes or Ray; default: this process) and added to the index as it finishes, so a killed
    run keeps its finished shards. The records do not depend on how many workers there are."""
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
        records, skipped = _apply_min_face_size(out, records, skipped, source, min_face_size)
    seen = {(r["path"], r["signature"]) for r in records + skipped}
    files = find_images(folder)
    captions = read_captions(folder, files)
    todo = [f for f in files if (os.path.join(source, f), _signature(os.path.join(folder, f))) not in seen]
    first = _next_shard(out, records)
    chunks = [_Chunk(f"shard-{first + i:05d}", todo[start:start + shard_size])
              for i, start in enumerate(range(0, len(todo), shard_size))]
    work = partial(_analyze_chunk, analyzer, folder, source, out, min_face_size, captions)
    added, new_skipped = 0, list[dict]()
    sources = list(dict.fromkeys([*info.get("sources", [info["source"]] if "source" in info else []), source]))
    info = {"sources": sources, "min_face_size": min_face_size, **analyzer.info, "recognizer_sha256": sha256}
    bar = tqdm(total=len(todo), desc="preparing faces", unit="image", disable=not progress)
    for chunk, result in workers.run(workers.given(work), chunks, engine or workers.Engine()):
        if not isinstance(result, tuple):  # a worker's failure is the run's: the finished shards stay
            raise IDGenError(f"preparing {chunk.name} failed: {result}")
        chunk_records, chunk_skipped = result
        records += chunk_records
        skipped += chunk_skipped
        added, new_skipped = added + len(chunk_records), new_skipped + chunk_skipped
        _write_index(out, records, skipped, info)  # after its shard: a crash loses no index entry
        bar.update(len(chunk.files))
    bar.close()
    _write_index(out, records, skipped, info)
    return PrepareReport(added=added, skipped=new_skipped, total=len(records))


@dataclass(frozen=True)
class _Chunk:
    name: str  # the shard it becomes
    files: list[str]


def _next_shard(out: str, records: list[dict]) -> int:
    """The number of the next shard: past those the index names; a shard file it does not name is
    what a killed run wrote after its last index, and goes."""
    named = {r["shard"] for r in records}
    for file in os.listdir(os.path.join(out, "shards")):
        if file.endswith(".safetensors") and file[: -len(".safetensors")] not in named:
            os.remove(os.path.join(out, "shards", file))
    return 1 + max((int(name.split("-")[1]) for name in named if _SHARD.match(name)), default=-1)


def _apply_min_face_size(out: str, records: list[dict], skipped: list[dict], source: str,
                         min_face_size: int) -> tuple[list[dict], list[dict]]:
    """A new ``min_face_size``: records under it are skipped, and this folder's photos skipped as
    too small are looked at again."""
    sizes = _face_sizes(out, records)
    small = [r for r, size in zip(records, sizes) if size < min_face_size]
    records = [r for r, size in zip(records, sizes) if size >= min_face_size]
    skipped = [r for r in skipped if not (r["reason"].startswith("face too small")
                                          and os.path.commonpath([r["path"], source]) == source)]
    skipped += [{"file": r["file"], "path": r["path"], "signature": r["signature"],
                 "reason": f"face too small (under {min_face_size} px)"} for r in small]
    return records, skipped


def _analyze_chunk(analyzer: FaceAnalyzer, folder: str, source: str, out: str, min_face_size: int,
                   captions: dict[str, str], chunk: _Chunk) -> tuple[list[dict], list[dict]]:
    """Detect, align and embed a chunk's photos; write its shard (atomically); its records and
    skipped entries."""
    rows: dict[str, list] = {"id_embeds": [], "embedding_norm": [], "kps": [], "bbox": [], "aligned": []}
    records: list[dict] = []
    skipped: list[dict] = []
    for file in chunk.files:
        path = os.path.join(folder, file)
        entry = {"file": file, "path": os.path.join(source, file), "signature": _signature(path)}
        try:
            faces = analyzer.analyze(load_image(path, analyzer.max_pixels))
        except IDGenError as err:
            skipped.append({**entry, "reason": f"unreadable: {err}"})
            continue
        reason = None
        if not faces:
            reason = "no face"
        elif len(faces) > 1:
            reason = f"several faces ({len(faces)})"
        elif _box_side(faces[0].bbox) < min_face_size:
            reason = f"face too small (under {min_face_size} px)"
        if reason:
            skipped.append({**entry, "reason": reason})
            continue
        face = faces[0]
        rows["id_embeds"].append(face.embedding)
        rows["embedding_norm"].append(np.float32(face.embedding_norm))
        rows["kps"].append(face.kps.astype(np.float32))
        rows["bbox"].append(face.bbox.astype(np.float32))
        rows["aligned"].append(face.aligned)
        records.append(asdict(Record(file, captions.get(os.path.normpath(file), ""), chunk.name, len(records),
                                     entry["signature"], entry["path"], _box_side(face.bbox))))
    if records:
        tensors = {key: torch.from_numpy(np.stack(value)) for key, value in rows.items()}
        with atomic_path(os.path.join(out, "shards", f"{chunk.name}.safetensors")) as staging:
            save_file(tensors, staging)
    return records, skipped


def _write_index(out: str, records: list[dict], skipped: list[dict], info: dict) -> None:
    _write_atomic(os.path.join(out, INDEX), "".join(json.dumps(r) + "\n" for r in records))
    _write_atomic(os.path.join(out, SKIPPED), "".join(json.dumps(r) + "\n" for r in skipped))
    _write_atomic(os.path.join(out, INFO), json.dumps(info, indent=1))


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
    """Prepared photos for training: pixels (C, H, W) in [-1, 1], caption and identity. Rows are
    read from the shards as they are asked for (memory-mapped), so memory does not grow with the
    dataset."""

    def __init__(self, prepared: str, resolution: int):
        index = _read_jsonl(os.path.join(prepared, INDEX))
        if not index:
            raise IDGenError(
                f"{prepared} holds no usable face photo: run `idgen prepare-data PHOTOS --out {prepared}` "
                f"on a folder with one clear face per photo (see {os.path.join(prepared, SKIPPED)})"
            )
        info = _read_info(prepared)
        index = [_with_path(_checked_record(prepared, r, number), info) for number, r in enumerate(index, 1)]
        lengths = {}
        for name in {r["shard"] for r in index}:
            with safe_open(_shard_file(prepared, name), "pt") as shard:
                lengths[name] = shard.get_slice("id_embeds").get_shape()[0]
        for number, record in enumerate(index, 1):
            if not 0 <= record["row"] < lengths[record["shard"]]:
                raise IDGenError(f"{os.path.join(prepared, INDEX)} record {number} points past the end of its shard "
                                 f"{record['shard']}: the dataset is damaged; prepare it again")
        self.prepared, self.records, self.resolution = prepared, index, resolution
        self._shards: dict[str, Any] = {}  # open shard files, per process (DataLoader workers open their own)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}

    def row(self, key: str, index: int) -> torch.Tensor:
        """``key`` (id_embeds, embedding_norm, kps, bbox, aligned) of record ``index``, from its shard."""
        record = self.records[index]
        if record["shard"] not in self._shards:
            self._shards[record["shard"]] = safe_open(_shard_file(self.prepared, record["shard"]), "pt")
        return self._shards[record["shard"]].get_slice(key)[record["row"]]

    def rows(self, key: str, count: int) -> torch.Tensor:
        """``key`` of the first ``count`` records, stacked."""
        return torch.stack([self.row(key, i) for i in range(count)])

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The photo resized and centre-cropped to ``resolution`` (C, H, W in [-1, 1]), and its
        keypoints and face box moved with it."""
        image = load_image(self.records[index]["path"])
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        scale_xy = torch.tensor([size[0] / image.width, size[1] / image.height])
        kps, bbox = self.row("kps", index) * scale_xy, self.row("bbox", index) * scale_xy.repeat(2)
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
            "id_embeds": self.row("id_embeds", index),
            "embedding_norm": self.row("embedding_norm", index),
        }
