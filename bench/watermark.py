"""How robust idgen's watermark is: bit accuracy and detection rate after common edits, the PSNR
it costs, and false positives on unmarked photos.

    python bench/watermark.py [--generated 10] [--unmarked 100]

Marked images: the real photos that ship in installed packages (scikit-image's data, insightface's
group photo, idgen's astronaut) and images from the offline tiny preset (random weights: noise-like
pictures, not likenesses). Unmarked: random crops and flips of the same real photos, so the 100
are variants of a few originals.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import skimage
import torch

from idgen import (
    IDStableDiffusionPipeline,
    watermark,  # noqa: E402
)
from idgen.testing.presets import get_preset


def real_photos() -> list[tuple[str, Image.Image]]:
    import insightface  # lazy: 4 s to import, for one probe only

    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    # photographs (drawings, charts and synthetic test patterns left out)
    names = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
             "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
             "retina.jpg", "rocket.jpg")
    files = [os.path.join(data, name) for name in names]
    files += [os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"),
              os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "idgen", "assets", "astronaut.jpg")]
    photos = []
    for path in files:
        image = Image.open(path)
        photos.append((os.path.basename(path), image.convert("RGB")))
    return photos


def generated(count: int) -> list[tuple[str, Image.Image]]:
    preset = get_preset("tiny")
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for seed in range(count):
        embeds = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(seed)), dim=0)
        image = pipe("a photo of a person", id_embeds=embeds, num_inference_steps=4, height=256, width=256,
                     generator=torch.Generator().manual_seed(seed)).images[0]
        images.append((f"tiny-seed{seed}", image))
    return images


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.BICUBIC)


ATTACKS = {
    "none": lambda im: im,
    "JPEG q=90": lambda im: jpeg(im, 90),
    "JPEG q=75": lambda im: jpeg(im, 75),
    "JPEG q=50": lambda im: jpeg(im, 50),
    "resize 0.5x": half,
    "resize 0.5x + JPEG q=75": lambda im: jpeg(half(im), 75),
    "crop 10 %": lambda im: im.crop((im.width // 20, im.height // 20, im.width - im.width // 20, im.height - im.height // 20)),
    "rotate 1 deg": lambda im: im.rotate(1, resample=Image.BICUBIC),
    "rotate 2 deg": lambda im: im.rotate(2, resample=Image.BICUBIC),
}


def bit_accuracy(image: Image.Image, bits: list[int]) -> float:
    """Share of the 40 bits read right at the size the mark was written at."""
    size = watermark._canonical(*image.size)
    return float(np.mean((watermark._correlations(np.asarray(image), size) > 0) == np.asarray(bits, bool)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=int, default=10)
    parser.add_argument("--unmarked", type=int, default=100)
    args = parser.parse_args()

    photos = real_photos()
    images = photos + generated(args.generated)
    psnr, rows = [], {name: {"bits": [], "found": [], "damaged": []} for name in ATTACKS}
    for name, image in images:
        settings = {"image": name}
        marked = watermark.embed(image, settings)
        error = np.asarray(marked, np.float64) - np.asarray(image, np.float64)
        psnr.append(10 * np.log10(255**2 / max(np.mean(error**2), 1e-12)))
        bits = watermark.payload(settings)
        for attack, edit in ATTACKS.items():
            edited = edit(marked)
            mark = watermark.detect(edited)
            # bit accuracy at the mark's own size: resizing keeps it, crops and rotations shift it
            reference = edited if attack.startswith(("none", "JPEG")) else edited.resize(marked.size, Image.BICUBIC)
            rows[attack]["bits"].append(bit_accuracy(reference, bits))
            rows[attack]["found"].append(mark.status == "idgen")
            rows[attack]["damaged"].append(mark.status == "damaged")

    rng = np.random.default_rng(0)
    false_marks = damaged = 0
    for k in range(args.unmarked):
        _, photo = photos[k % len(photos)]
        scale = rng.uniform(0.5, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        left, top = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        variant = photo.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            variant = variant.transpose(Image.FLIP_LEFT_RIGHT)
        status = watermark.detect(variant).status
        false_marks += status == "idgen"
        damaged += status == "damaged"

    print(json.dumps({
        "images": {"real photos": len(photos), "tiny-preset images (random weights)": args.generated},
        "psnr_db": {"mean": round(float(np.mean(psnr)), 1), "min": round(float(np.min(psnr)), 1)},
        "attacks": {attack: {"bit_accuracy": round(float(np.mean(r["bits"])), 3),
                             "detected": round(float(np.mean(r["found"])), 3),
                             "damaged": round(float(np.mean(r["damaged"])), 3)} for attack, r in rows.items()},
        "unmarked": {"photos": args.unmarked, "false_idgen": false_marks, "damaged": damaged},
    }, indent=1))


if __name__ == "__main__":
    main()
