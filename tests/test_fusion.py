"""Training-free fusion of the identity with the base model's take on the prompt: Infinite-ID's
AdaIN-mean mixed attention and FreeCure's attribute recovery (``id_fusion=``)."""

import pytest
import torch

from idgen.adapters.fusion import StreamFusion, adain_mean, attribute_tokens

from .conftest import FP32_ATOL, embedding

PROMPT = "a photo of a person with red hair, smiling"


def latents(pipe, **kwargs):
    kwargs.setdefault("id_embeds", embedding(0))
    return pipe(kwargs.pop("prompt", PROMPT), num_inference_steps=4, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("mode", ["adain", "freecure"])
@pytest.mark.slow
def test_fusion_acts_through_the_identity_only(pipe, mode):
    """Off is today's call exactly; on changes the image; with the identity off (id_scale 0) both
    streams are the same model, so fusing them changes nothing but rounding."""
    plain = latents(pipe)
    assert torch.equal(latents(pipe, id_fusion=None), plain)
    fused = latents(pipe, id_fusion=mode)
    assert (fused - plain).abs().max() > 0.05
    difference = (latents(pipe, id_fusion=mode, id_scale=0.0) - latents(pipe, id_scale=0.0)).abs().max()
    assert difference <= FP32_ATOL, float(difference)
    # CFG off and two images per prompt: the same rows come back
    assert latents(pipe, id_fusion=mode, guidance_scale=1.0, num_images_per_prompt=2).shape == (2, 4, 16, 16)


def test_adain_mean_and_mixed_keys(pipe):
    x, reference = torch.randn(2, 10, 8), torch.randn(2, 6, 8) * 3 + 1
    shifted = adain_mean(x, reference)
    assert torch.allclose(shifted.mean(1), reference.mean(1), atol=1e-6)
    assert torch.allclose(shifted - shifted.mean(1, keepdim=True), x - x.mean(1, keepdim=True), atol=1e-6)
    fusion = StreamFusion(pipe.unet, "adain")
    fusion.rows = 2
    own, base = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mixed = fusion.mix(torch.cat([own, base]))
    assert mixed.shape == (4, 10, 8)
    assert torch.allclose(mixed[:2, :5], adain_mean(own, base)) and torch.equal(mixed[:2, 5:], base)
    assert torch.equal(mixed[2:], torch.cat([base, base], 1))  # the base stream's attention is unchanged


def test_freecure_recovers_inside_the_attribute_mask_only(pipe):
    """The attribute words' tokens are found in the prompt; the identity stream's self-attention
    output becomes the base stream's inside the mask and stays its own outside, exactly; a prompt
    naming no attribute is today's call (to rounding)."""
    positions = attribute_tokens(pipe.tokenizer, PROMPT, None)
    assert positions and positions == sorted(set(attribute_tokens(pipe.tokenizer, PROMPT, ["hair"])
                                                 + attribute_tokens(pipe.tokenizer, PROMPT, ["smiling"])))
    assert attribute_tokens(pipe.tokenizer, "a photo of a person", None) == []
    fusion = StreamFusion(pipe.unet, "freecure", [positions])
    fusion.rows, fusion.latent_size = 2, (4, 4)
    fusion.masks = torch.zeros(1, 4, 4)
    fusion.masks[0, :2] = 1.0  # the top half
    own, base = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    out = fusion.recover((torch.cat([own, base]),))[0]
    top = torch.arange(16) < 8
    assert torch.equal(out[:2, top], base[:, top]) and torch.equal(out[:2, ~top], own[:, ~top])
    assert torch.equal(out[2:], base)
    plain = latents(pipe, prompt="a photo of a person")
    nothing = latents(pipe, prompt="a photo of a person", id_fusion="freecure")
    assert (nothing - plain).abs().max() <= FP32_ATOL
    named = latents(pipe, prompt="a photo of a person", id_fusion="freecure", recover_words=["person"])
    assert (named - plain).abs().max() > 0.01  # recover_words names what to recover


def test_fusion_errors(pipe):
    with pytest.raises(ValueError, match="id_fusion='blend'"):
        latents(pipe, id_fusion="blend")
    with pytest.raises(ValueError, match="recover_words= names what id_fusion='freecure' recovers"):
        latents(pipe, recover_words=["hair"])
    with pytest.raises(ValueError, match="pass prompt= as text"):
        pipe(prompt_embeds=torch.randn(1, 77, 32), id_embeds=embedding(0), id_fusion="freecure", num_inference_steps=1)
    pipe.fuse_qkv_projections()
    try:
        with pytest.raises(ValueError, match="unfuse_qkv_projections"):
            latents(pipe, id_fusion="adain")
    finally:
        pipe.unfuse_qkv_projections()


@pytest.mark.slow
def test_instantid_fusion(cache, analyzer):
    """SDXL InstantID: IdentityNet acts in the identity stream only; with the identity attention and
    IdentityNet off, fusing changes nothing but rounding."""
    import numpy as np

    from idgen import IDStableDiffusionXLPipeline, load_identitynet
    from idgen.testing.presets import INSTANTID_FILE, get_preset

    xl = get_preset("tiny-sdxl", root=str(cache))
    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
    pipe.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    pipe.set_progress_bar_config(disable=True)
    kps = np.array([[40.0, 50.0], [88.0, 50.0], [64.0, 75.0], [46.0, 98.0], [82.0, 98.0]])
    run = lambda **kw: pipe(PROMPT, id_embeds=embedding(0, 20.0), face_kps=kps, height=128, width=128,
                            num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0),
                            **kw).images
    off = dict(id_scale=0.0, controlnet_conditioning_scale=0.0)
    for mode in ("adain", "freecure"):
        assert (run(id_fusion=mode, **off) - run(**off)).abs().max() <= FP32_ATOL
        assert (run(id_fusion=mode) - run()).abs().max() > 10 * FP32_ATOL


@pytest.mark.slow
def test_cli_id_fusion(tmp_path, astronaut, capsys):
    from PIL import Image

    from idgen.apps.cli import main

    out = tmp_path / "fused.png"
    assert main(["generate", "--face", str(astronaut), "--prompt", PROMPT, "--id-fusion", "freecure",
                 "--recover-words", "hair", "--out", str(out), "--overwrite", "--steps", "2"]) == 0
    meta = Image.open(out).text
    assert meta["id_fusion"] == "freecure" and meta["recover_words"] == "hair"
    assert main(["generate", "--face", str(astronaut), "--prompt", "p", "--recover-words", "hair", "--out", str(out), "--overwrite"]) == 2
    assert "--recover-words names what --id-fusion freecure recovers" in capsys.readouterr().err
