"""Identity img2img and inpainting (SD1.5): diffusers' pipelines with the identity arguments."""

import numpy as np
import pytest
import torch
from PIL import Image

from idgen import IDStableDiffusionImg2ImgPipeline, IDStableDiffusionInpaintPipeline, IDStableDiffusionPipeline

from .conftest import FP32_ATOL, assert_close, embedding

COMMON = dict(num_inference_steps=4, output_type="np", height=128, width=128)


@pytest.fixture(scope="module")
def text_to_image(preset):
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter)
    return pipe


@pytest.fixture(scope="module")
def photo(astronaut):
    return Image.open(astronaut).convert("RGB").resize((128, 128))


@pytest.fixture(scope="module")
def mask():
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    return mask


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_matches_diffusers_faceid_path(kind, preset, text_to_image, photo, mask):
    """The same FaceID checkpoint through diffusers' own img2img / inpaint pipeline
    (``load_ip_adapter``, LoRA in peft) gives the same images."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    ours_cls, reference_cls = {"img2img": (IDStableDiffusionImg2ImgPipeline, StableDiffusionImg2ImgPipeline),
                               "inpaint": (IDStableDiffusionInpaintPipeline, StableDiffusionInpaintPipeline)}[kind]
    ours = ours_cls.from_pipe(text_to_image)
    assert ours.identity_adapter is text_to_image.identity_adapter and ours.unet is text_to_image.unet  # no reload
    reference = reference_cls.from_pretrained(preset.base)
    reference.load_ip_adapter(preset.adapter.rsplit("/", 1)[0], subfolder="", weight_name=preset.adapter.rsplit("/", 1)[1],
                              image_encoder_folder=None)
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    inputs = dict(image=photo, strength=0.7, **({"mask_image": mask} if kind == "inpaint" else {}), **COMMON)
    emb = embedding(0)
    images = ours("a portrait", id_embeds=emb, generator=torch.Generator().manual_seed(0), **inputs).images
    expected = reference("a portrait", ip_adapter_image_embeds=[torch.stack([torch.zeros(512), emb])[:, None]],
                         generator=torch.Generator().manual_seed(0), **inputs).images
    assert_close(images, expected, FP32_ATOL)
    other = ours("a portrait", id_embeds=embedding(1), generator=torch.Generator().manual_seed(0), **inputs).images
    assert np.abs(other - images).max() > 1e-2  # the identity acts
    if kind == "inpaint":  # outside the mask the photo stays (up to the VAE round trip)
        outside = np.asarray(mask.resize((128, 128))) == 0
        assert np.abs(images[0][outside] - other[0][outside]).mean() < np.abs(images[0] - other[0]).mean()


def test_face_image_and_the_step_window(text_to_image, analyzer, astronaut, photo):
    pipe = IDStableDiffusionImg2ImgPipeline.from_pipe(text_to_image)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    run = lambda **kw: pipe("a portrait", image=photo, strength=0.75, generator=torch.Generator().manual_seed(0),
                            **COMMON, **kw).images
    from_photo = run(face_image=str(astronaut))
    assert np.array_equal(from_photo, run(id_embeds=torch.from_numpy(analyzer.identity([astronaut]))))
    # Outside the window the identity is off: a window past the last step equals id_scale 0.
    assert_close(run(face_image=str(astronaut), id_scale=0.0), run(face_image=str(astronaut), id_guidance_start=0.99))
