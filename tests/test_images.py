import io

import numpy as np
import pytest
from PIL import Image

from idgen import ImageError, load_image


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def test_inputs_of_every_kind_give_the_same_rgb(astronaut):
    reference = load_image(astronaut)
    assert reference.mode == "RGB" and reference.size == (512, 512)
    array = np.asarray(reference)
    for source in (str(astronaut), reference, array, astronaut.read_bytes()):
        assert np.array_equal(np.asarray(load_image(source)), array)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    loaded = load_image(_png_bytes(image, format="JPEG", exif=exif.tobytes()))
    assert loaded.size == (20, 40)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (8, 8), 128),
        Image.new("RGBA", (8, 8), (10, 20, 30, 0)),
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
        Image.new("P", (8, 8)),
        Image.fromarray(np.full((8, 8), 65535, np.uint16)),
    ],
    ids=["grey", "rgba", "cmyk", "palette", "16-bit"],
)
def test_modes_convert_to_rgb(image):
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (8, 8)


def test_conversions_keep_values():
    assert load_image(Image.fromarray(np.full((4, 4), 65535, np.uint16))).getpixel((0, 0)) == (255, 255, 255)
    # Fully transparent RGBA composites onto white.
    assert load_image(Image.new("RGBA", (4, 4), (10, 20, 30, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(np.full((4, 4, 3), 1.0, np.float32)).getpixel((0, 0)) == (255, 255, 255)


def test_pixel_limit_refuses_before_decoding():
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_png_bytes(Image.new("RGB", (100, 100))), max_pixels=5000)


def test_corrupt_truncated_missing(tmp_path, astronaut):
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"this is not an image")
    data = astronaut.read_bytes()
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="truncated"):
        load_image(truncated)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 5), np.uint8))
