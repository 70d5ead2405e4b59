"""Identity img2img and inpainting (SD1.5): diffusers' pipelines with the identity arguments."""

import numpy as np
import pytest
import torch
from PIL import Image

from idgen import IDStableDiffusionImg2ImgPipeline, IDStableDiffusionInpaintPipeline, IDStableDiffusionPipeline

from .conftest import FP32_ATOL, assert_close, embedding

COMMON = dict(num_inference_steps=4, output_type="np")  # the output has the input image's size


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
    with pytest.raises(TypeError, match="unexpected keyword argument.*control_image"):
        run(face_image=str(astronaut), control_image=photo)  # IdentityNet is SDXL's
    with pytest.raises(ValueError, match="pass regions="):  # on SD1.5 a pose photo only places several people
        run(face_image=str(astronaut), kps_image=str(astronaut))
    # Outside the window the identity is off: a window past the last step equals id_scale 0.
    assert_close(run(face_image=str(astronaut), id_scale=0.0), run(face_image=str(astronaut), id_guidance_start=0.99))


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_faceid_sdxl_matches_diffusers(kind, cache, tmp_path, photo, mask):
    """FaceID-SDXL through diffusers' own SDXL img2img / inpaint pipeline (``load_ip_adapter``)
    gives the same images."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    from idgen import IDStableDiffusionXLImg2ImgPipeline, IDStableDiffusionXLInpaintPipeline, IDStableDiffusionXLPipeline
    from idgen.adapters import save_adapter_checkpoint
    from idgen.testing.presets import get_preset, random_faceid_state_dict

    base = get_preset("tiny-faceid-sdxl").base
    text_to_image = IDStableDiffusionXLPipeline.from_pretrained(base, controlnet=None)
    path = tmp_path / "ip-adapter-faceid_sdxl.safetensors"
    save_adapter_checkpoint(random_faceid_state_dict(text_to_image.unet, seed=4), str(path))
    text_to_image.load_identity_adapter(str(path))
    ours_cls, reference_cls = {"img2img": (IDStableDiffusionXLImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline),
                               "inpaint": (IDStableDiffusionXLInpaintPipeline, StableDiffusionXLInpaintPipeline)}[kind]
    ours = ours_cls.from_pipe(text_to_image)
    assert ours.identity_adapter is text_to_image.identity_adapter
    reference = reference_cls.from_pretrained(base)
    reference.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    inputs = dict(image=photo, strength=0.7, num_inference_steps=4, guidance_scale=5.0, output_type="np",
                  **({"mask_image": mask} if kind == "inpaint" else {}))
    emb = embedding(3)
    images = ours("a portrait", id_embeds=emb, generator=torch.Generator().manual_seed(0), **inputs).images
    expected = reference("a portrait", ip_adapter_image_embeds=[torch.stack([torch.zeros(512), emb])[:, None]],
                         generator=torch.Generator().manual_seed(0), **inputs).images
    assert images.shape == (1, 128, 128, 3)
    assert_close(images, expected, FP32_ATOL)
    other = ours("a portrait", id_embeds=embedding(5), generator=torch.Generator().manual_seed(0), **inputs).images
    assert np.abs(other - images).max() > 1e-2


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.slow
def test_instantid_redraws_with_identitynet(kind, cache, analyzer, astronaut, photo, mask):
    """InstantID img2img / inpainting: IdentityNet gets the keypoints drawn at the input image's
    size; the identity and the keypoints both change the image; an argument the loop does not
    take is refused by name."""
    from idgen import (
        IDStableDiffusionXLImg2ImgPipeline,
        IDStableDiffusionXLInpaintPipeline,
        IDStableDiffusionXLPipeline,
        load_identitynet,
    )
    from idgen.testing.presets import INSTANTID_FILE, get_preset

    xl = get_preset("tiny-sdxl")
    text_to_image = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
    text_to_image.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    text_to_image.set_face_analyzer(analyzer)
    pipe = {"img2img": IDStableDiffusionXLImg2ImgPipeline, "inpaint": IDStableDiffusionXLInpaintPipeline}[kind].from_pipe(
        text_to_image)
    pipe.set_progress_bar_config(disable=True)
    inputs = dict(image=photo, strength=0.7, num_inference_steps=4, output_type="np",
                  **({"mask_image": mask} if kind == "inpaint" else {}))
    raw = embedding(0, 20.0)
    run = lambda **kw: pipe("a portrait", generator=torch.Generator().manual_seed(0), **inputs, **kw).images
    kps = np.asarray(analyzer.get_face(astronaut).kps, np.float64) * (128 / 512)  # in the 128 px input's pixels
    base = run(id_embeds=raw, face_kps=kps)
    assert base.shape == (1, 128, 128, 3)
    assert np.abs(run(id_embeds=embedding(1, 20.0), face_kps=kps) - base).max() > 1e-3
    assert np.abs(run(id_embeds=raw, face_kps=kps[:, ::-1].copy()) - base).max() > 1e-3
    # The pose photo's keypoints are drawn at the input image's size (128 px), not the photo's (512 px).
    assert np.array_equal(run(face_image=str(astronaut), kps_image=str(astronaut)),
                          run(id_embeds=torch.from_numpy(analyzer.identity([astronaut], raw=True)), face_kps=kps))
    if kind == "img2img":
        with pytest.raises(ValueError, match="timesteps not supported by diffusers' StableDiffusionXLControlNetImg2Img"):
            run(id_embeds=raw, face_kps=kps, timesteps=[999, 500])
