"""How much `idgen protect` protects, on real photos: the cosine of each face to its original for
the encoder it is optimised against (the analyzer's ArcFace) and for dlib's real recognizer, held
out (never optimised against), as saved, after JPEG 75 and after a 0.5 resize; PSNR, SSIM and
seconds per photo.

    python bench/protect.py [--face-model tiny] [--steps 60] [--budget 8/255]

Offline the ArcFace is the tiny preset's random one (the table title says so); dlib's is real.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import time

from PIL import Image

from idgen import FaceAnalyzer
from idgen.apps.eval.metrics import DlibRecognizer
from idgen.apps.protect import ProtectSettings, check, parse_budget, protect
from idgen.apps.session import face_pack

HERE = os.path.dirname(os.path.abspath(__file__))


def photos() -> list[str]:
    insightface = list(importlib.util.find_spec("insightface").submodule_search_locations)[0]
    return [os.path.join(HERE, "..", "idgen", "assets", "astronaut.jpg"),
            os.path.join(insightface, "data", "images", "t1.jpg")]


def _variants(image: Image.Image) -> dict[str, Image.Image]:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return {"as is": image, "jpeg 75": Image.open(buffer).convert("RGB"),
            "resize 0.5": image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--face-model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--budget", default="8/255")
    args = parser.parse_args()
    analyzer = FaceAnalyzer(face_pack(args.face_model))
    dlib = DlibRecognizer()
    random = " (ArcFace: the tiny preset's random weights)" if analyzer.recognizer_random else ""
    print(f"| photo | encoder | as is | jpeg 75 | resize 0.5 | PSNR dB | SSIM | s/photo |{random}")
    print("|---|---|---|---|---|---|---|---|")
    for path in photos():
        original = Image.open(path).convert("RGB")
        start = time.perf_counter()
        result = protect(original, analyzer, ProtectSettings(budget=parse_budget(args.budget), steps=args.steps),
                         progress=False)
        seconds = time.perf_counter() - start
        name = os.path.basename(path)
        for encoder, cosines in check(result.image, original, analyzer).items():
            print(f"| {name} | {encoder} (optimised against) | " + " | ".join(f"{v:.3f}" for v in cosines.values())
                  + f" | {result.psnr:.1f} | {result.ssim:.4f} | {seconds:.1f} |")
        reference = dlib.descriptor(original)
        held_out = []
        for image in _variants(result.image).values():
            descriptor = dlib.descriptor(image)
            held_out.append("no face" if descriptor is None or reference is None else
                            f"{DlibRecognizer.similarity(descriptor, reference):.3f}")
        print(f"| {name} | dlib (held out) | " + " | ".join(held_out) + " | | | |")
    unprotected = [DlibRecognizer.similarity(dlib.descriptor(v), dlib.descriptor(Image.open(photos()[0]).convert("RGB")))
                   for v in _variants(Image.open(photos()[0]).convert("RGB")).values()]
    print(f"\nUnprotected astronaut.jpg, dlib: as is {unprotected[0]:.3f}, jpeg 75 {unprotected[1]:.3f}, resize 0.5 "
          f"{unprotected[2]:.3f}; {args.steps} steps, budget {args.budget}; "
          f"{os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
