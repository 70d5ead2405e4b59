"""``idgen synth``: a synthetic face dataset for training and testing face recognition.

Identities are vectors in the recognizer's space: sampled on the unit sphere with a minimum
pairwise angle (Vec2Face's way of keeping them apart), or read from reference photos. Each is
rendered K times with a method whose identity is that vector alone (Arc2Face by default; FaceID),
varied by seed and, where the method reads a prompt, by attribute prompts (expression, age,
lighting, head pose: SIG's way of balancing them). Each image is filtered (a face is found; its
FaceSim to its identity is high enough; its nearest other identity is far enough) and kept in the
standard layout: ``identities/ID/K.jpg``, WebDataset shards (``.jpg``, ``.json`` with attributes and
scores, ``.npy`` the identity vector), ``records.jsonl`` and ``rejected.jsonl``, and a dataset card
(``card.md``, ``card.json`` and histograms) with an independent recognizer's (dlib's) similarities.

Identities are rendered by workers (idgen.workers); each finished identity is journalled, so a
run started again renders only the rest, and the shards and card are rebuilt from the files.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from idgen import workers
from idgen.errors import IDGenError
from idgen.files import atomic_path, remove_stale_temporaries
from idgen.train.data import find_images

from .eval.metrics import DlibRecognizer
from .guard import finite_call
from .options import SessionOptions
from .session import Session, start_session

JOURNAL, RECORDS, REJECTED, CARD = "journal.jsonl", "records.jsonl", "rejected.jsonl", "card.json"
#: SIG-style attributes, one value of each drawn per image (for methods that read a prompt).
ATTRIBUTES = {
    "expression": ("neutral expression", "smiling", "laughing", "serious", "surprised"),
    "age": ("young adult", "middle-aged", "elderly"),
    "lighting": ("soft studio lighting", "natural daylight", "dim indoor light", "hard side light"),
    "pose": ("facing the camera", "head turned slightly left", "head turned slightly right", "looking up"),
}


@dataclass(frozen=True)
class SynthSettings:
    identities: int
    images_per_identity: int
    min_angle: float = 75.0  # degrees between any two sampled identities
    seed: int = 0
    filter: bool = True
    min_face_sim: float = 0.5  # FaceSim of an image to its own identity, at least
    max_other_sim: float = 0.4  # FaceSim of an image to its nearest other identity, at most
    shard_size: int = 1000  # samples per WebDataset shard


def sample_identities(count: int, min_angle: float, seed: int, dim: int = 512, tries: int = 100) -> np.ndarray:
    """``count`` unit vectors, each pair at least ``min_angle`` degrees apart (rejection sampling
    of uniform directions)."""
    rng = np.random.default_rng(seed)
    limit = math.cos(math.radians(min_angle))
    kept: list[np.ndarray] = []
    for _ in range(count * tries):
        if len(kept) == count:
            break
        vector = rng.standard_normal(dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        if not kept or float(np.max(np.stack(kept) @ vector)) < limit:
            kept.append(vector)
    if len(kept) < count:
        raise IDGenError(f"only {len(kept)} identities found {min_angle} degrees apart in {count * tries} tries: "
                         "lower --min-angle, or ask for fewer --identities")
    return np.stack(kept)


def identities_from_photos(session: Session, folder: str) -> tuple[np.ndarray, list[str]]:
    """One identity per photo of ``folder`` (or per subfolder of photos): its normalised ArcFace
    vector, and the name it came from."""
    files = find_images(folder)
    groups: dict[str, list[str]] = {}
    for file in files:
        groups.setdefault(os.path.dirname(file) or file, []).append(os.path.join(folder, file))
    if not groups:
        raise IDGenError(f"--from-photos {folder} holds no photo: give a folder of face photos (or of folders)")
    vectors = [session.analyzer.identity(photos) for photos in groups.values()]
    return np.stack(vectors).astype(np.float32), list(groups)


def check_method(session: Session) -> None:
    method = session.method
    if method.raw_id_embeds or method.per_photo or method.face_clip or method.face_eva or method.own_recognizer \
            or method.identitynet:
        raise IDGenError(f"synth renders identity vectors; {method.name} reads face photos or raw embeddings: use "
                         "Arc2Face (the default, --base tiny-arc2face offline) or FaceID")


def _attributes(seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {name: str(values[rng.integers(len(values))]) for name, values in ATTRIBUTES.items()}


class IdentityRenderer:
    """A worker's setup: the pipeline, the analyzer and dlib's recognizer, once; it returns the
    function that renders, scores and writes one identity."""

    def __init__(self, options: SessionOptions, settings: SynthSettings, vectors: np.ndarray, out: str):
        self.options, self.settings, self.vectors, self.out = options, settings, vectors, out

    def __call__(self) -> Callable[[int], list[dict]]:
        session = start_session(self.options)
        check_method(session)
        pipe = session.load()
        pipe.set_progress_bar_config(disable=True)
        return partial(render_identity, session, pipe, DlibRecognizer(), self.settings, self.vectors, self.out)


def render_identity(session: Session, pipe: Any, dlib: DlibRecognizer, settings: SynthSettings, vectors: np.ndarray,
                    out: str, identity: int) -> list[dict]:
    """Render identity ``identity``'s images; write the kept ones to its folder; a record per image
    (kept or rejected, with why)."""
    folder = os.path.join(out, "identities", f"{identity:06d}")
    os.makedirs(folder, exist_ok=True)
    records = []
    for k in range(settings.images_per_identity):
        seed = settings.seed + identity * settings.images_per_identity + k
        attributes = _attributes(seed) if session.method.uses_prompt else {}
        prompt = ("a photo of a person, " + ", ".join(attributes.values())) if attributes else None
        call = session.call_kwargs(prompt)
        if session.method.uses_prompt:
            call.update(negative_prompt="blurry, deformed, several people")
        image = finite_call(pipe, **call, id_embeds=torch.from_numpy(vectors[identity]),
                            generator=session.generators(seed, 1)).images[0]
        record = {"identity": identity, "image": k, "key": f"{identity:06d}_{k:02d}", "seed": seed,
                  "prompt": prompt, "attributes": attributes, **_scores(session, dlib, image, vectors, identity)}
        record["rejected"] = _rejection(record, settings)
        if record["rejected"] is None:
            record["file"] = os.path.join("identities", f"{identity:06d}", f"{k:02d}.jpg")
            with atomic_path(os.path.join(out, record["file"])) as staging:
                image.save(staging, format="JPEG", quality=95)
        records.append(record)
    return records


def _scores(session: Session, dlib: DlibRecognizer, image: Image.Image, vectors: np.ndarray, identity: int) -> dict:
    """FaceSim to its identity and to the nearest other one (ArcFace), and dlib's descriptor."""
    faces = session.analyzer.analyze(image)
    if not faces:
        return {"face": False, "face_sim": None, "other_sim": None, "dlib": None}
    similarities = vectors @ max(faces, key=lambda f: f.bbox[2] - f.bbox[0]).embedding
    others = np.delete(similarities, identity)
    descriptor = dlib.descriptor(image)
    return {"face": True, "face_sim": float(similarities[identity]),
            "other_sim": float(others.max()) if len(others) else None,
            "dlib": None if descriptor is None else [float(v) for v in descriptor]}


def _rejection(record: dict, settings: SynthSettings) -> str | None:
    """Why the filter leaves the image out, or None to keep it."""
    if not settings.filter:
        return None
    if not record["face"]:
        return "no face"
    if record["face_sim"] < settings.min_face_sim:
        return f"FaceSim to its identity under {settings.min_face_sim}"
    if record["other_sim"] is not None and record["other_sim"] > settings.max_other_sim:
        return f"FaceSim to another identity over {settings.max_other_sim}"
    return None


def _journal(out: str) -> dict[int, list[dict]]:
    done: dict[int, list[dict]] = {}
    path = os.path.join(out, JOURNAL)
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:  # cut short by a kill: that identity is rendered again
                    continue
                done[entry["identity"]] = entry["records"]
    return {i: records for i, records in done.items() if all(
        r["rejected"] is not None or os.path.exists(os.path.join(out, r["file"])) for r in records)}


def synthesize(options: SessionOptions, settings: SynthSettings, out: str, engine: workers.Engine,
               from_photos: str | None = None, progress: bool = True) -> dict:
    """Render the dataset into ``out`` (see the module); the card's numbers."""
    session = start_session(options)
    check_method(session)
    os.makedirs(out, exist_ok=True)
    remove_stale_temporaries(out)
    names: list[str] | None = None
    if from_photos:
        vectors, names = identities_from_photos(session, from_photos)
    else:
        vectors = sample_identities(settings.identities, settings.min_angle, settings.seed)
    np.save(os.path.join(out, "identities.npy"), vectors)
    done = _journal(out)
    todo = [i for i in range(len(vectors)) if i not in done]
    with open(os.path.join(out, JOURNAL), "a") as journal:
        for identity, result in tqdm(workers.run(IdentityRenderer(options, settings, vectors, out), todo, engine),
                                     total=len(todo), desc="identities", unit="identity", disable=not progress):
            if not isinstance(result, list):  # a model or worker failure is the run's: what is done stays
                raise IDGenError(f"identity {identity} failed: {result}")
            done[identity] = result
            journal.write(json.dumps({"identity": identity, "records": result}) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
    records = [r for i in range(len(vectors)) for r in done[i]]
    kept = [r for r in records if r["rejected"] is None]
    _write_lines(os.path.join(out, RECORDS), kept)
    _write_lines(os.path.join(out, REJECTED), [r for r in records if r["rejected"] is not None])
    write_shards(out, kept, vectors, settings.shard_size)
    card = card_numbers(records, len(vectors))
    write_card(out, card, settings, session, names)
    return card


def _write_lines(path: str, rows: Sequence[dict]) -> None:
    with atomic_path(path) as staging, open(staging, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def write_shards(out: str, kept: Sequence[dict], vectors: np.ndarray, shard_size: int) -> list[str]:
    """WebDataset tar shards of the kept images: per sample ``KEY.jpg``, ``KEY.json`` (its record)
    and ``KEY.npy`` (its identity vector)."""
    folder = os.path.join(out, "shards")
    os.makedirs(folder, exist_ok=True)
    for stale in os.listdir(folder):  # rebuilt from the files every run
        os.remove(os.path.join(folder, stale))
    paths = []
    for number, start in enumerate(range(0, len(kept), shard_size)):
        path = os.path.join(folder, f"shard-{number:05d}.tar")
        with atomic_path(path) as staging, tarfile.open(staging, "w") as tar:
            for record in kept[start:start + shard_size]:
                array = io.BytesIO()
                np.save(array, vectors[record["identity"]])
                with open(os.path.join(out, record["file"]), "rb") as handle:
                    members = {"jpg": handle.read(), "json": json.dumps(record).encode(), "npy": array.getvalue()}
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{record['key']}.{extension}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _pairs(records: Sequence[dict], same: bool, limit: int = 20000) -> list[float]:
    """dlib similarities of pairs of kept images of the same identity (or of different ones), the
    first ``limit`` pairs in order."""
    described = [r for r in records if r["rejected"] is None and r["dlib"] is not None]
    values: list[float] = []
    for i, a in enumerate(described):
        for b in described[i + 1:]:
            if (a["identity"] == b["identity"]) == same and len(values) < limit:
                va, vb = np.asarray(a["dlib"]), np.asarray(b["dlib"])
                values.append(float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))))
    return values


def card_numbers(records: Sequence[dict], identities: int) -> dict:
    """The dataset card's numbers, from the records alone (so they can be recomputed from the files)."""
    kept = [r for r in records if r["rejected"] is None]
    reasons = Counter(r["rejected"] for r in records if r["rejected"] is not None)
    intra, inter = _pairs(records, True), _pairs(records, False)
    attributes = {name: dict(sorted(Counter(r["attributes"][name] for r in kept if name in r["attributes"]).items()))
                  for name in ATTRIBUTES}
    return {
        "identities": identities,
        "images_rendered": len(records),
        "images_kept": len(kept),
        "identities_kept": len({r["identity"] for r in kept}),
        "rejection_rate": {reason: count / len(records) for reason, count in sorted(reasons.items())} if records else {},
        "face_sim_mean": _mean([r["face_sim"] for r in kept if r["face_sim"] is not None]),
        "dlib_intra": {"pairs": len(intra), "mean": _mean(intra), "histogram": _histogram(intra)},
        "dlib_inter": {"pairs": len(inter), "mean": _mean(inter), "histogram": _histogram(inter)},
        "attributes": {name: counts for name, counts in attributes.items() if counts},
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _number(value: float | None) -> str:
    return "n/a (no face measured)" if value is None else f"{value:.3f}"


def _histogram(values: Sequence[float], bins: int = 20) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over [-1, 1]."""
    return [int(c) for c in np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=(-1.0, 1.0))[0]]


def _plot(histograms: dict[str, list[int]], path: str) -> None:
    """The similarity histograms as bars, one colour each, over [-1, 1]."""
    width, height, colours = 440, 200, ((40, 110, 200), (220, 90, 40))
    image = Image.new("RGB", (width, height + 30), "white")
    draw = ImageDraw.Draw(image)
    top = max([1, *(c for counts in histograms.values() for c in counts)])
    for (name, counts), colour in zip(histograms.items(), colours):
        bar = width / len(counts)
        for i, count in enumerate(counts):
            h = height * count / top
            draw.rectangle([i * bar + 1, height - h, (i + 1) * bar - 1, height], outline=colour)
        draw.text((8 + 220 * list(histograms).index(name), height + 10), name, fill=colour)
    with atomic_path(path) as staging:
        image.save(staging, format="PNG")


def write_card(out: str, card: dict, settings: SynthSettings, session: Session, names: list[str] | None) -> None:
    """``card.json`` (the numbers), ``card.md`` (them, read by people) and ``similarity.png``."""
    with atomic_path(os.path.join(out, CARD)) as staging, open(staging, "w") as handle:
        json.dump(card, handle, indent=1)
    _plot({"dlib same identity": card["dlib_intra"]["histogram"],
           "dlib other identities": card["dlib_inter"]["histogram"]}, os.path.join(out, "similarity.png"))
    lines = [
        "# Synthetic identity dataset", "",
        f"Made by idgen with {session.method.name} on {session.options.base}; identities "
        + (f"from the photos of {len(names)} people" if names else
           f"sampled at least {settings.min_angle} degrees apart (seed {settings.seed})") + ".", "",
        f"- identities: {card['identities']} ({card['identities_kept']} with a kept image)",
        f"- images: {card['images_rendered']} rendered, {card['images_kept']} kept",
        "- filter: " + (f"a face; FaceSim to its identity >= {settings.min_face_sim}; to any other <= "
                        f"{settings.max_other_sim}" if settings.filter else "off (every image kept)"),
        *(f"- rejected, {reason}: {rate:.1%}" for reason, rate in card["rejection_rate"].items()),
        f"- ArcFace FaceSim of kept images to their identity, mean: {_number(card['face_sim_mean'])}",
        f"- dlib similarity, same identity: {card['dlib_intra']['pairs']} pairs, mean {_number(card['dlib_intra']['mean'])}",
        f"- dlib similarity, other identities: {card['dlib_inter']['pairs']} pairs, mean "
        f"{_number(card['dlib_inter']['mean'])}",
        "", "![similarity histograms](similarity.png)", "",
        "## Attributes of the kept images", "",
        *(f"- {name}: " + ", ".join(f"{value} {count}" for value, count in counts.items())
          for name, counts in card["attributes"].items()),
        *([] if card["attributes"] else [f"(none: {session.method.name} reads no prompt; images vary by seed)"]),
    ]
    if session.random_parts:
        lines += ["", f"Random weights in: {', '.join(session.random_parts)} (offline preset): the images carry no "
                  "likeness; this card checks the pipeline, not the data."]
    with atomic_path(os.path.join(out, "card.md")) as staging, open(staging, "w") as handle:
        handle.write("\n".join(lines) + "\n")
