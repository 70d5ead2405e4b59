"""IP-Adapter-FaceID-Portrait: the FaceID layout with 16 tokens per face and no LoRA; each photo
of the person gives its own tokens (up to 5), side by side."""

import pytest
import torch
from PIL import Image

from idgen import IDStableDiffusionPipeline, IDStableDiffusionXLPipeline
from idgen.adapters import detect_format, save_adapter_checkpoint
from idgen.apps.cli import main
from idgen.errors import IdentityInputError
from idgen.formats import FACEID_REPO, resolve_method
from idgen.testing.presets import get_preset, random_faceid_state_dict

from .conftest import FP32_ATOL, assert_close


def _embeds(count: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(count, 512, generator=torch.Generator().manual_seed(3)), dim=-1)


@pytest.mark.parametrize("base", ["tiny", "tiny-faceid-sdxl"])
def test_portrait_matches_diffusers_faceid_path(base, cache):
    """Three faces of one person: idgen equals diffusers' ``load_ip_adapter`` on the same random
    Portrait checkpoint (diffusers concatenates each face's 16 tokens, as the reference does)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = get_preset(base).base
    sdxl = base != "tiny"
    ours = (IDStableDiffusionXLPipeline.from_pretrained(folder, controlnet=None) if sdxl
            else IDStableDiffusionPipeline.from_pretrained(folder))
    reference = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(folder)
    checkpoint = random_faceid_state_dict(ours.unet, lora_rank=None, num_tokens=16)
    ours.load_identity_adapter(checkpoint)
    reference.load_ip_adapter(checkpoint, subfolder="", weight_name="", image_encoder_folder=None)
    assert ours.adapter_spec.format == "faceid_portrait" and ours.adapter_spec.num_tokens == 16
    embeds = _embeds(3)
    common = dict(num_inference_steps=3, output_type="latent", height=64, width=64)
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    latents = ours("a photo", id_embeds=embeds, generator=torch.Generator().manual_seed(0), **common).images
    expected = reference("a photo", ip_adapter_image_embeds=[torch.stack([torch.zeros_like(embeds), embeds])],
                         generator=torch.Generator().manual_seed(0), **common).images
    assert_close(latents, expected, FP32_ATOL)
    one_face = ours("a photo", id_embeds=embeds[:1], generator=torch.Generator().manual_seed(0), **common).images
    assert (one_face - latents).abs().max() > 1e-2  # every face's tokens count


@pytest.mark.slow
def test_portrait_photos_stay_apart(cache, analyzer, astronaut, group_photo):
    pipe = IDStableDiffusionPipeline.from_pretrained(get_preset("tiny").base)
    pipe.load_identity_adapter(random_faceid_state_dict(pipe.unet, lora_rank=None, num_tokens=16))
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    photos, indices = [astronaut, group_photo], [0, 2]
    embeds = pipe.encode_identity(photos, face_index=indices)
    assert embeds.shape == (1, 2, 512)
    assert torch.equal(embeds[0], torch.from_numpy(analyzer.embeddings(photos, indices)))
    common = dict(num_inference_steps=2, output_type="latent", height=64, width=64)
    from_photos = pipe("p", face_image=photos, face_index=indices, generator=torch.Generator().manual_seed(0),
                       **common).images
    from_embeds = pipe("p", id_embeds=embeds[0], generator=torch.Generator().manual_seed(0), **common).images
    assert torch.equal(from_photos, from_embeds)
    with pytest.raises(IdentityInputError, match="FaceID-Portrait takes 1 to 5 photos of one person"):
        pipe("p", id_embeds=_embeds(6), **common)
    with pytest.raises(ValueError, match="face_weights= weighs photos that are averaged"):
        pipe("p", face_image=photos, face_index=indices, face_weights=[1, 2], **common)


def test_portrait_is_told_from_faceid_by_its_keys(preset):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(preset.base, subfolder="unet")
    assert detect_format(random_faceid_state_dict(unet, lora_rank=None, num_tokens=16)).format == "faceid_portrait"
    assert detect_format(random_faceid_state_dict(unet)).format == "faceid"
    assert detect_format(random_faceid_state_dict(unet, lora_rank=None)).format == "faceid"  # 4 tokens: FaceID
    method = resolve_method(preset.base, FACEID_REPO, "ip-adapter-faceid-portrait_sd15.bin")[0]
    assert method.name == "faceid-portrait" and method.per_photo
    assert resolve_method(preset.base, FACEID_REPO, None)[0].name == "faceid"


@pytest.mark.slow
def test_portrait_from_the_command_line(tmp_path, preset, astronaut, group_photo, capsys):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(preset.base, subfolder="unet")
    adapter = tmp_path / "ip-adapter-faceid-portrait_sd15.safetensors"
    save_adapter_checkpoint(random_faceid_state_dict(unet, lora_rank=None, num_tokens=16), str(adapter))
    common = ["generate", "--adapter", str(adapter), "--prompt", "p", "--steps", "1", "--height", "64", "--width", "64"]
    out = tmp_path / "portrait.png"
    assert main([*common, "--face", str(astronaut), "--face", str(astronaut), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    meta = Image.open(out).text
    assert meta["method"] == "faceid-portrait" and meta["faces"] == f"{astronaut}, {astronaut}"
    capsys.readouterr()
    assert main([*common, *[arg for _ in range(6) for arg in ("--face", str(astronaut))],
                 "--out", str(tmp_path / "six.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FaceID-Portrait takes 1 to 5 photos of one person (it was trained on 5), got 6" in err[0]
