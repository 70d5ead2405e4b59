"""IP-Adapter-FaceID-Plus and PlusV2: FaceID's tokens refined by a perceiver over CLIP features of
the aligned face crop, with FaceID's LoRA; PlusV2 adds the MLP tokens back at ``s_scale``."""

import pytest
import torch
from PIL import Image

from idgen import FaceAnalyzer, IDStableDiffusionPipeline, IDStableDiffusionXLPipeline
from idgen.adapters import save_adapter_checkpoint
from idgen.apps.cli import main
from idgen.errors import IdentityInputError, ModelNotFoundError
from idgen.testing.presets import get_preset, random_faceid_plus_state_dict, tiny_clip_vision

from .conftest import FP32_ATOL, assert_close

COMMON = dict(num_inference_steps=3, output_type="latent", height=64, width=64)


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip_vision()


def _pipe(base: str, encoder, shortcut: bool, fuse_lora: bool = True):
    folder = get_preset(base).base
    sdxl = base != "tiny"
    pipe = (IDStableDiffusionXLPipeline.from_pretrained(folder, controlnet=None) if sdxl
            else IDStableDiffusionPipeline.from_pretrained(folder))
    checkpoint = random_faceid_plus_state_dict(pipe.unet, encoder.config.hidden_size)
    pipe.load_identity_adapter(checkpoint, image_encoder=encoder, shortcut=shortcut, fuse_lora=fuse_lora)
    pipe.set_face_analyzer(FaceAnalyzer(get_preset("tiny").face_pack))
    pipe.set_progress_bar_config(disable=True)
    return pipe, checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("base, shortcut", [("tiny", False), ("tiny", True), ("tiny-faceid-sdxl", True)])
def test_plus_matches_diffusers_faceid_plus_path(base, shortcut, encoder, cache, astronaut):
    """The same random checkpoint in diffusers' FaceID-Plus path (its projection's clip_embeds,
    shortcut and shortcut_scale set by hand, as diffusers documents) gives the same latents."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    ours, checkpoint = _pipe(base, encoder, shortcut)
    assert ours.adapter_spec.format == "faceid_plus" and ours.image_encoder is encoder
    reference = (StableDiffusionXLPipeline if base != "tiny" else StableDiffusionPipeline).from_pretrained(
        get_preset(base).base)
    reference.load_ip_adapter(checkpoint, subfolder="", weight_name="", image_encoder_folder=None)
    reference.set_progress_bar_config(disable=True)
    latents = ours("a photo", face_image=str(astronaut), s_scale=0.7, generator=torch.Generator().manual_seed(0),
                   **COMMON).images
    embeds, clip = ours.encode_identity(str(astronaut)), ours.encode_face_clip(str(astronaut))
    projection = reference.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = torch.stack([ours._blank_face_clip(), clip])
    projection.shortcut, projection.shortcut_scale = shortcut, 0.7
    expected = reference("a photo", ip_adapter_image_embeds=[torch.stack([torch.zeros_like(embeds), embeds])],
                         generator=torch.Generator().manual_seed(0), **COMMON).images
    assert_close(latents, expected, FP32_ATOL)
    # Given features give the same image as the photo; other features, another one.
    given = ours("a photo", id_embeds=embeds, face_clip_embeds=clip, s_scale=0.7,
                 generator=torch.Generator().manual_seed(0), **COMMON).images
    assert torch.equal(given, latents)
    other = ours("a photo", id_embeds=embeds, face_clip_embeds=ours._blank_face_clip(), s_scale=0.7,
                 generator=torch.Generator().manual_seed(0), **COMMON).images
    assert (other - latents).abs().max() > 1e-3


@pytest.mark.slow
def test_plus_needs_the_face_for_clip_and_an_encoder(encoder, cache, astronaut, monkeypatch):
    pipe, checkpoint = _pipe("tiny", encoder, False)
    with pytest.raises(IdentityInputError, match="FaceID-Plus also reads CLIP features of the face"):
        pipe("p", id_embeds=pipe.encode_identity(str(astronaut)), **COMMON)
    bare = IDStableDiffusionPipeline.from_pretrained(get_preset("tiny").base)
    monkeypatch.setattr("idgen.pipelines.id_tokens.PLUS_IMAGE_ENCODER", "/no/such/encoder")  # fails without network
    with pytest.raises(ModelNotFoundError, match="pass image_encoder="):
        bare.load_identity_adapter(checkpoint)


def test_plusv2_is_told_by_its_file_name(encoder, cache, tmp_path):
    unet = IDStableDiffusionPipeline.from_pretrained(get_preset("tiny").base).unet
    checkpoint = random_faceid_plus_state_dict(unet, encoder.config.hidden_size)
    for name, shortcut in (("ip-adapter-faceid-plusv2_sd15.safetensors", True),
                           ("ip-adapter-faceid-plus_sd15.safetensors", False)):
        save_adapter_checkpoint(checkpoint, str(tmp_path / name))
        pipe = IDStableDiffusionPipeline.from_pretrained(get_preset("tiny").base)
        pipe.load_identity_adapter(str(tmp_path / name), image_encoder=encoder)
        assert pipe.identity_adapter.projection.config.shortcut is shortcut


@pytest.mark.slow
def test_plus_from_the_command_line(encoder, cache, tmp_path, astronaut, capsys):
    unet = IDStableDiffusionPipeline.from_pretrained(get_preset("tiny").base).unet
    adapter = tmp_path / "ip-adapter-faceid-plusv2_sd15.safetensors"
    save_adapter_checkpoint(random_faceid_plus_state_dict(unet, encoder.config.hidden_size), str(adapter))
    encoder.save_pretrained(tmp_path / "encoder")
    common = ["generate", "--face", str(astronaut), "--prompt", "p", "--steps", "1", "--height", "64", "--width", "64"]
    out = tmp_path / "plus.png"
    assert main([*common, "--adapter", str(adapter), "--image-encoder", str(tmp_path / "encoder"),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert Image.open(out).text["method"] == "faceid-plus"
    capsys.readouterr()
    assert main([*common, "--image-encoder", str(tmp_path / "encoder"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-encoder is FaceID-Plus's and PuLID's; the faceid adapter" in err[0]
    weights = next((tmp_path / "encoder").glob("*.safetensors"))  # a damaged encoder folder: one line too
    weights.write_bytes(weights.read_bytes()[:500])
    assert main([*common, "--adapter", str(adapter), "--image-encoder", str(tmp_path / "encoder"),
                 "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"could not load the image encoder {tmp_path / 'encoder'}" in err[0], err


@pytest.mark.slow
def test_plus_in_the_demo(encoder, cache, tmp_path, astronaut):
    pytest.importorskip("gradio")
    from idgen.apps.demo import DemoApp
    from idgen.apps.session import start_session

    unet = IDStableDiffusionPipeline.from_pretrained(get_preset("tiny").base).unet
    adapter = tmp_path / "ip-adapter-faceid-plus_sd15.safetensors"
    save_adapter_checkpoint(random_faceid_plus_state_dict(unet, encoder.config.hidden_size), str(adapter))
    encoder.save_pretrained(tmp_path / "encoder")
    session = start_session(adapter=str(adapter), image_encoder=str(tmp_path / "encoder"), steps=2, height=64, width=64)
    app = DemoApp(session, session.load())
    results = app.generate([str(astronaut), str(astronaut)], None, "a person", "", "none", 1.0, 0.8, 2, 5.0, 0, 1)
    assert Image.open(results[0][0]).text["method"] == "faceid-plus"


@pytest.mark.slow
def test_unloading_plus_takes_its_image_encoder_out(encoder, cache):
    pipe, checkpoint = _pipe("tiny", encoder, False)
    assert pipe.image_encoder is encoder and pipe.components["image_encoder"] is encoder
    pipe.load_identity_adapter(checkpoint)  # again: the loaded encoder serves, and stays after the swap
    assert pipe.image_encoder is encoder
    pipe.unload_identity_adapter()
    assert pipe.image_encoder is None and pipe.identity_adapter is None
