"""Image input: one function that turns anything a user may pass into an RGB PIL image."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray

#: File suffixes read as images when a folder of photos is given.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

#: Largest image accepted, in pixels (about 8000 x 8000). Face photos never need more,
#: and decoding far larger files is how decompression bombs exhaust memory.
DEFAULT_MAX_PIXELS = 64_000_000


def _describe(src: ImageInput) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return f"the given {type(src).__name__}"


def _check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}: "
            "resize it (a face photo needs no more than a few megapixels) or raise the limit (max_pixels=, --max-pixels)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (grey, palette, RGBA, CMYK, 16-bit, float) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            peak = 1.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(
            f"a numpy image must be HxW, HxWx3 (RGB) or HxWx4 (RGBA), got shape {array.shape}"
        )
    if array.dtype == np.uint16:
        array = (array.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale + 0.5, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def load_image(src: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read a path, bytes, PIL image or numpy array (RGB) into an 8-bit RGB PIL image.

    EXIF orientation is applied, grey/RGBA/CMYK/16-bit inputs are converted, and images
    over ``max_pixels`` are refused before they are decoded.
    """
    name = _describe(src)
    if isinstance(src, np.ndarray):
        _check_size(src.shape[1] if src.ndim > 1 else 0, src.shape[0], max_pixels, name)
        return _array_to_image(src)
    if isinstance(src, Image.Image):
        _check_size(*src.size, max_pixels, name)
        return _to_rgb(ImageOps.exif_transpose(src))
    if isinstance(src, (bytes, bytearray)):
        stream: BinaryIO = io.BytesIO(src)
    elif isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise ImageError(f"image file {name} does not exist: check the path")
        if os.path.isdir(src):
            raise ImageError(f"{name} is a folder, not an image: pass an image file")
        stream = open(src, "rb")
    else:
        raise ImageError(
            f"cannot read an image from a {type(src).__name__}: pass a path, bytes, a PIL image or an RGB numpy array"
        )
    try:
        with stream:
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # our own limit below gives the clearer message
            try:
                image = Image.open(stream)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
            _check_size(*image.size, max_pixels, name)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        raise ImageError(
            f"{name} is not a readable image (corrupt, or not an image format): use a JPEG, PNG or WebP file"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(
            f"{name} could not be decoded ({err}); the file is probably truncated or corrupt: re-export or re-download it"
        ) from None
