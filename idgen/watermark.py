"""An invisible watermark that says "made by idgen", and survives JPEG and resizing.

The mark is 40 bits: a fixed tag, the idgen version, a 12-bit hash of the generation settings
and a CRC-8. It lives in the luminance of the image, seen at a fixed size (256 px, or 128 or 64
for small images): each bit is spread over a few hundred mid-frequency DCT coefficients,
multiplied by a keyed +-1 sequence, and only as much is added as that image needs for the bit to
read back with a margin ("informed embedding"), scaled to each coefficient's neighbourhood so
that busy regions carry more of it. Reading needs no original: the image is brought to the same
size and each bit's normalised correlation is read.

What it proves: an image that reads back as an idgen mark went through idgen's writer (a chance
match needs a 16-bit tag and CRC to agree, within 16 tries of flipping the 4 least certain bits,
and a strong correlation). What it does not: its
absence proves nothing (crops and rotations lose the mark, and anyone can remove it), and the
key is public, so anyone can also forge it. The robustness figures are in ``bench/README.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .credentials import read
from .errors import IDGenError
from .faces import ImageInput, load_image
from .version import __version__

TAG = 0xA7  # 8 bits
BITS = 40  # tag 8 + version 12 + settings hash 12 + CRC 8
KEY = 0x1D6E
#: Target normalised correlation of every bit after embedding: the margin the mark has.
STRENGTH = 2.0
#: Mean |correlation| above which a mark is surely there (unmarked images: 0.8 +- 0.1), and the
#: lower one at which bits that check out (tag and CRC) are accepted.
PRESENT = 1.3
ACCEPT = 1.05


@dataclass(frozen=True)
class Mark:
    """What ``detect`` read. ``status``: "idgen" (a valid mark), "damaged" (a mark is there but
    its bits do not check out) or "none"."""

    status: str
    version: str | None = None
    settings_hash: str | None = None
    score: float = 0.0  # mean |normalised correlation| of the bits


def settings_hash(settings: Mapping[str, str]) -> str:
    """The 12-bit hash (3 hex digits) of generation settings, as the mark carries it."""
    text = json.dumps({str(k): str(v) for k, v in settings.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:3]


def _crc8(bits: list[int]) -> list[int]:
    value = 0
    for bit in bits:
        feedback = ((value >> 7) & 1) ^ bit
        value = ((value << 1) & 0xFF) ^ (0x07 if feedback else 0)
    return _to_bits(value, 8)


def _to_bits(value: int, count: int) -> list[int]:
    return [(value >> (count - 1 - i)) & 1 for i in range(count)]


def _from_bits(bits) -> int:
    return int("".join(str(int(b)) for b in bits), 2)


def _version_code(version: str) -> int:
    major, minor, patch = (int("".join(c for c in part if c.isdigit()) or 0) for part in (version.split(".") + ["0"] * 3)[:3])
    return (min(major, 15) << 8) | (min(minor, 15) << 4) | min(patch, 15)


def payload(settings: Mapping[str, str] | None = None, version: str | None = None) -> list[int]:
    """The 40 bits for this idgen ``version`` and ``settings``."""
    if version is None:
        version = __version__
    body = _to_bits(TAG, 8) + _to_bits(_version_code(version), 12) + _to_bits(int(settings_hash(settings or {}), 16), 12)
    return body + _crc8(body)


def _canonical(width: int, height: int) -> int:
    side = min(width, height)
    return 256 if side >= 256 else 128 if side >= 128 else 64


@functools.cache
def _layout(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which DCT coefficients of a ``size`` x ``size`` luminance carry each bit, and their +-1 signs."""
    scale = size / 256
    u, v = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    band = (u + v >= 40 * scale) & (u + v <= 170 * scale) & (u < 120 * scale) & (v < 120 * scale)
    rng = np.random.default_rng(KEY + size)
    index = np.flatnonzero(band)
    rng.shuffle(index)
    per_bit = len(index) // BITS
    groups = index[: per_bit * BITS].reshape(BITS, per_bit)
    return groups, rng.choice([-1.0, 1.0], size=groups.shape)


def _spectrum(rgb: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """DCT of the luminance at ``size`` x ``size``, and each coefficient's neighbourhood magnitude."""
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    coefficients = cv2.dct(cv2.resize(luma, (size, size), interpolation=cv2.INTER_AREA))
    return coefficients, cv2.blur(np.abs(coefficients), (9, 9)) + 1e-3


def _projections(rgb: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each bit's coefficients (BITS, n), divided by their neighbourhood magnitude and signed by
    the key; and that magnitude."""
    groups, signs = _layout(size)
    coefficients, magnitude = _spectrum(rgb, size)
    scale = magnitude.ravel()[groups]
    return coefficients.ravel()[groups] / scale * signs, scale


def _correlation(x: np.ndarray) -> np.ndarray:
    """Each row's normalised correlation with all-ones: what a bit reads as."""
    return x.sum(1) / np.sqrt((x**2).sum(1) + 1e-12)


def _correlations(rgb: np.ndarray, size: int) -> np.ndarray:
    return _correlation(_projections(rgb, size)[0])


def embed(image: ImageInput, settings: Mapping[str, str] | None = None, strength: float = STRENGTH,
          passes: int = 3) -> Image.Image:
    """``image`` with the idgen mark (this version, ``settings``' hash) added to its luminance.
    Each pass adds what the 8-bit result still lacks (clipping in dark and bright areas, rounding)."""
    marked = load_image(image)
    bit_signs = np.where(np.asarray(payload(settings)) > 0, 1.0, -1.0)[:, None]
    for _ in range(passes):
        marked, reached = _embed_pass(np.asarray(marked, dtype=np.float32), bit_signs, strength)
        if reached:
            break
    return marked


def _embed_pass(rgb: np.ndarray, bit_signs: np.ndarray, strength: float) -> tuple[Image.Image, bool]:
    """One informed-embedding pass; also says whether every bit already had its margin."""
    height, width = rgb.shape[:2]
    size = _canonical(width, height)
    groups, signs = _layout(size)
    x, scale = _projections(rgb, size)
    x = x * bit_signs
    if _correlation(x).min() >= 0.9 * strength:
        return Image.fromarray(rgb.round().astype(np.uint8)), True
    shift = np.zeros((BITS, 1))
    for _ in range(3):  # reach the target correlation; the norm grows with the shift
        moved = x + shift
        norm = np.sqrt((moved**2).sum(1, keepdims=True))
        shift += np.maximum(0.0, strength - moved.sum(1, keepdims=True) / norm) * norm / x.shape[1]
    delta = np.zeros(size * size, np.float32)
    delta[groups] = shift * bit_signs * signs * scale
    spatial = cv2.resize(cv2.idct(delta.reshape(size, size)), (width, height), interpolation=cv2.INTER_CUBIC)
    return Image.fromarray(np.clip(rgb + spatial[..., None], 0, 255).round().astype(np.uint8)), False


#: Soft decoding: the weakest bits that may be flipped to find a valid tag and CRC (2^N tries).
FLIPPABLE = 4


def _decode(z: np.ndarray) -> list[int] | None:
    """The payload bits whose tag and CRC check out, trying flips of the ``FLIPPABLE`` least
    certain bits (fewest flips first), or None."""
    hard = [int(b) for b in z > 0]
    weakest = np.argsort(np.abs(z))[:FLIPPABLE]
    for flips in sorted(range(2**FLIPPABLE), key=lambda m: bin(m).count("1")):
        bits = list(hard)
        for k, index in enumerate(weakest):
            if flips >> k & 1:
                bits[index] ^= 1
        if _from_bits(bits[:8]) == TAG and _crc8(bits[:32]) == bits[32:]:
            return bits
    return None


def detect(image: ImageInput) -> Mark:
    """Read the mark of ``image``, at each size it may have been written at."""
    rgb = np.asarray(load_image(image))
    best = Mark("none")
    for size in (256, 128, 64):
        if size > 2 * min(rgb.shape[:2]):
            continue
        z = _correlations(rgb, size)
        score = float(np.abs(z).mean())
        bits = _decode(z) if score >= ACCEPT else None
        if bits is not None:
            code = _from_bits(bits[8:20])
            version = f"{code >> 8}.{(code >> 4) & 15}.{code & 15}"
            return Mark("idgen", version, f"{_from_bits(bits[20:32]):03x}", score)
        if score >= PRESENT and score > best.score:
            best = Mark("damaged", score=score)
        elif best.status == "none" and score > best.score:
            best = Mark("none", score=score)
    return best


def verify(path: str) -> dict:
    """What a file says about its origin: ``status`` ("idgen", "damaged", "none" or "unreadable"),
    the mark's version and settings hash, and whether the PNG metadata (when there is any) hashes
    to the mark's settings hash, i.e. is the metadata it was written with."""
    report: dict = {"file": path}
    try:
        image = load_image(path)
    except IDGenError as err:
        return {**report, "status": "unreadable", "error": str(err)}

    mark = detect(image)
    report.update(status=mark.status, score=round(mark.score, 3))
    credentials = read(path)
    if credentials is not None:
        report["c2pa"] = credentials
    if mark.status == "idgen":
        report.update(version=mark.version, settings_hash=mark.settings_hash)
        text = dict(getattr(Image.open(path), "text", {}) or {})
        if text.pop("watermark", None) is not None:
            report["metadata_matches"] = settings_hash(text) == mark.settings_hash
    return report


def describe(report: dict) -> str:
    """One line for ``idgen verify``."""
    line = _describe_mark(report)
    credentials = report.get("c2pa")
    if credentials:
        trusted = "untrusted" if "signingCredential.untrusted" in credentials["validation_status"] else "trusted"
        line += (f"; Content Credentials: created by {credentials['claim_generator']} "
                 f"({credentials['digital_source_type']}), signed by {credentials['signer']} ({credentials['issuer']}), "
                 f"{credentials['validation_state']}, certificate {trusted}")
    return line


def _describe_mark(report: dict) -> str:
    status = report["status"]
    if status == "idgen":
        line = f"generated by idgen {report['version']} (settings hash {report['settings_hash']}"
        if "metadata_matches" in report:
            line += "; its PNG metadata is the one it was made with" if report["metadata_matches"] else (
                "; its PNG metadata was changed since")
        return line + ")"
    if status == "damaged":
        return f"damaged idgen mark (correlation {report['score']:.2f}; its bits do not check out)"
    if status == "unreadable":
        return f"unreadable: {report['error']}"
    return "no idgen mark found (this does not prove it was not generated: crops and edits remove the mark)"
