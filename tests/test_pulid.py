"""PuLID on SDXL: its checkpoint layouts, EVA02-CLIP tower, face parser, ID encoders and identity
attention, on the tiny-pulid preset; parity with the reference code when a local copy is given."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from idgen.adapters.attention import IdentityCall
from idgen.adapters.context import open_identity
from idgen.adapters.eva_clip import EVA_MEAN, EVA_STD, build_eva_tower, eva_state_dict, load_eva_tower
from idgen.adapters.face_parsing import BiSeNet, load_face_parser
from idgen.adapters.pulid import PuLIDEncoder, PuLIDEncoderV1, build_pulid_encoder, eva_face_pixels, pulid_format
from idgen.errors import CheckpointError, IdentityInputError, ModelNotFoundError
from idgen.pipelines import IDStableDiffusionPipeline, IDStableDiffusionXLPipeline
from idgen.testing.presets import get_preset, random_pulid_state_dict, tiny_eva_tower

from .conftest import FP32_ATOL, reference_modules

#: Local copies of https://github.com/ToTheBeginning/PuLID and https://github.com/xinntao/facexlib
#: for the parity tests (skipped without).
REFERENCE = os.environ.get("IDGEN_PULID_REPO")
FACEXLIB = os.environ.get("IDGEN_FACEXLIB_REPO")


@pytest.fixture(scope="module")
def pulid_preset(cache):
    return get_preset("tiny-pulid", root=str(cache))


@pytest.fixture(scope="module")
def pipe(pulid_preset, analyzer):
    pipe = IDStableDiffusionXLPipeline.from_pretrained(pulid_preset.base, controlnet=None)
    pipe.load_identity_adapter(pulid_preset.adapter, image_encoder=pulid_preset.image_encoder,
                               face_parser=pulid_preset.face_parser)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, face_image, **kwargs):
    return pipe("a photo of a person", face_image=face_image, num_inference_steps=3, height=64, width=64,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_loads_both_official_layouts(pipe, pulid_preset, tmp_path):
    """v1.1's flat safetensors (the preset's) and v1's nested ``.bin`` are recognised by their keys."""
    assert (pipe.adapter_spec.format, pipe.adapter_spec.num_tokens, pipe.adapter_spec.lora_rank) == ("pulid", 8, None)
    assert isinstance(pipe.identity_adapter.projection, PuLIDEncoder) and pipe.eva_encoder is not None
    eva = tiny_eva_tower()
    v1 = PuLIDEncoderV1(context_dim=64, num_token=5, clip_dim=eva.config.embed_dim, vit_dim=eva.config.width, hidden_dim=64)
    layers = {k.split(".", 1)[1]: v for k, v in random_pulid_state_dict(pipe.unet, eva).items()
              if k.startswith("id_adapter_attn_layers.")}
    torch.save({"id_adapter": v1.state_dict(), "id_adapter_attn_layers": layers}, tmp_path / "pulid_v1.bin")
    other = IDStableDiffusionXLPipeline.from_pretrained(pulid_preset.base, controlnet=None)
    other.load_identity_adapter(str(tmp_path / "pulid_v1.bin"), image_encoder=eva, face_parser=pulid_preset.face_parser)
    assert (other.adapter_spec.format, other.adapter_spec.num_tokens) == ("pulid_v1", 10)
    assert other.pulid_settings(None, None) == (8, "v2") and pipe.pulid_settings(None, None) == (20, "v2")


@pytest.mark.slow
def test_identity_and_settings_change_the_image(pipe, astronaut, group_photo):
    base = latents(pipe, str(astronaut))
    assert torch.isfinite(base).all()  # the empty negative prompt's zero text output does not divide by zero
    assert torch.equal(base, latents(pipe, str(astronaut)))
    for change in (dict(id_scale=0.0), dict(ortho="off"), dict(ortho="v1"), dict(num_zero=0)):
        assert (latents(pipe, str(astronaut), **change) - base).abs().max() > 1e-3, change
    two = latents(pipe, [str(astronaut), str(group_photo)])  # v1.1 reads several photos together
    assert (two - base).abs().max() > 1e-3


def test_identity_scale_zero_with_ortho_off_is_the_base_model(pipe, astronaut):
    """Without zero tokens or orthogonalisation, id_scale=0 adds exactly nothing: the plain UNet."""
    plain = latents(pipe, str(astronaut), id_scale=0.0, ortho="off", num_zero=0)
    pipe.identity_adapter.detach()
    try:
        from diffusers import StableDiffusionXLPipeline

        base = StableDiffusionXLPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"})
        base.set_progress_bar_config(disable=True)
        expected = base("a photo of a person", num_inference_steps=3, height=64, width=64, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.identity_adapter.attach(pipe.unet)
    torch.testing.assert_close(plain, expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.slow
def test_wrong_uses_fail_with_one_line(pipe, pulid_preset, astronaut, cache):
    with pytest.raises(IdentityInputError, match="pass face_image="):
        pipe("x", id_embeds=torch.randn(1, 512), num_inference_steps=1)
    with pytest.raises(ValueError, match="ortho in"):
        latents(pipe, str(astronaut), ortho="v3")
    sd15 = IDStableDiffusionPipeline.from_pretrained(get_preset("tiny", root=str(cache)).base)
    with pytest.raises(CheckpointError, match="PuLID adapter, made for SDXL"):
        sd15.load_identity_adapter(pulid_preset.adapter)
    faceid = IDStableDiffusionXLPipeline.from_pretrained(pulid_preset.base, controlnet=None)
    faceid.load_identity_adapter(get_preset("tiny-faceid-sdxl", root=str(cache)).adapter)
    with pytest.raises(ValueError, match="PuLID's settings"):
        faceid("x", id_embeds=torch.randn(512), num_zero=4, num_inference_steps=1)
    with pytest.raises(ValueError, match="face_parser= is PuLID's"):
        faceid.load_identity_adapter(get_preset("tiny-faceid-sdxl", root=str(cache)).adapter, face_parser=pulid_preset.face_parser)
    with pytest.raises(CheckpointError, match="not facexlib's BiSeNet"):
        load_face_parser(pulid_preset.adapter)
    with pytest.raises(ValueError, match="one photo per identity"):
        PuLIDEncoderV1(context_dim=8, vit_dim=4, clip_dim=4, hidden_dim=8)(torch.zeros(1, 2, 516), [torch.zeros(1, 3, 4)] * 5)


def test_unload_drops_the_face_encoders(pulid_preset, analyzer):
    pipe = IDStableDiffusionXLPipeline.from_pretrained(pulid_preset.base, controlnet=None)
    pipe.load_identity_adapter(pulid_preset.adapter, image_encoder=pulid_preset.image_encoder, face_parser=pulid_preset.face_parser)
    pipe.unload_identity_adapter()
    assert pipe.eva_encoder is None and pipe.face_parser is None and pipe.identity_adapter is None


def test_eva_input_keeps_only_the_face_in_grey():
    """What the parser calls background (label 0 here: the left half) turns white; the rest grey."""

    class HalfParser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(len(x), 19, *x.shape[2:])
            logits[:, 0, :, : x.shape[3] // 2] = 1  # background
            logits[:, 1, :, x.shape[3] // 2:] = 1  # skin
            return (logits,)

    crops = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    pixels = eva_face_pixels(crops, HalfParser(), 64)  # same size: no resampling blur
    mean, std = torch.tensor(EVA_MEAN)[:, None, None], torch.tensor(EVA_STD)[:, None, None]
    image = pixels[0] * std + mean
    torch.testing.assert_close(image[:, :, :28], torch.ones(3, 64, 28), atol=1e-5, rtol=0)
    rgb = torch.from_numpy(crops[0]).permute(2, 0, 1).float() / 255
    grey = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    for channel in range(3):
        torch.testing.assert_close(image[channel, :, 36:], grey[:, 36:], atol=1e-5, rtol=0)


def test_eva_tower_loads_an_official_checkpoint(tmp_path):
    """The whole-CLIP ``.pt`` (``visual.*`` beside ``text.*``, rotary tables in every block) gives
    the tower back exactly; a file of something else fails naming it."""
    tower = tiny_eva_tower()
    official = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    official.update({f"visual.blocks.{i}.attn.rope.freqs_cos": tower.rope.freqs_cos for i in range(5)})
    official["text.token_embedding.weight"] = torch.zeros(4, 4)
    torch.save({"state_dict": official}, tmp_path / "EVA02_CLIP.pt")
    loaded = load_eva_tower(tmp_path / "EVA02_CLIP.pt")
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        (a, _), (b, _) = tower(pixels), loaded(pixels)
    assert torch.equal(a, b) and loaded.config.hidden_layers == (4,)  # the reference's choice for 5 blocks
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an EVA02-CLIP vision tower"):
        load_eva_tower(tmp_path / "other.pt")
    with pytest.raises(ModelNotFoundError, match="PuLID reads EVA02-CLIP-L features.*pass image_encoder="):
        load_eva_tower(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.skipif(REFERENCE is None, reason="set IDGEN_PULID_REPO to a local copy of ToTheBeginning/PuLID")
def test_parity_with_thereference_modules(monkeypatch, pipe):
    """On the same random weights: EVA02-CLIP's tower (21 blocks, so the reference returns its five
    hidden states), v1.1's IDFormer and v1's IDEncoder, and the UNet with PuLID's attention
    processors in each of its modes against ours, with the same identity tokens."""
    from functools import partial

    eva_vit, transformer = reference_modules(monkeypatch, os.path.join(REFERENCE, "eva_clip"), "ref_eva_clip",
                                      ["eva_vit_model", "transformer"])
    encoders, encoders_v1, attention = reference_modules(monkeypatch, os.path.join(REFERENCE, "pulid"), "ref_pulid",
                                                  ["encoders_transformer", "encoders", "attention_processor"])
    torch.manual_seed(0)
    tower = eva_vit.EVAVisionTransformer(
        img_size=56, patch_size=14, num_classes=24, use_mean_pooling=False, embed_dim=64, depth=21, num_heads=2,
        mlp_ratio=2.6667, qkv_bias=True, norm_layer=partial(transformer.LayerNorm, eps=1e-6), rope=True,
        pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True).eval()
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    ours = build_eva_tower(eva_state_dict({f"visual.{k}": v for k, v in tower.state_dict().items()}))
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        (embed, hidden), (our_embed, our_hidden) = tower(pixels, return_hidden=True), ours(pixels)
    torch.testing.assert_close(our_embed, embed, atol=FP32_ATOL, rtol=0)
    for level, our_level in zip(hidden, our_hidden, strict=True):
        torch.testing.assert_close(our_level, level, atol=FP32_ATOL, rtol=1e-5)

    cond, vit = torch.randn(2, 3, 1280), [torch.randn(2, 3 * 17, 1024) for _ in range(5)]
    for reference in (encoders.IDFormer(dim=64, depth=5, dim_head=64, heads=1, num_queries=8, output_dim=32),
                      encoders_v1.IDEncoder(context_dim=32)):
        reference.eval()
        state = reference.state_dict()
        mine = build_pulid_encoder(state, pulid_format(state)).eval()
        inputs = (cond, vit) if isinstance(mine, PuLIDEncoder) else (cond[:, :1], [v[:, :17] for v in vit])
        with torch.no_grad():
            expected = reference(*inputs) if isinstance(mine, PuLIDEncoder) else reference(cond[:, 0], inputs[1])
            torch.testing.assert_close(mine(*inputs), expected, atol=FP32_ATOL, rtol=0)

    unet = pipe.unet
    adapter = pipe.identity_adapter
    tokens = torch.randn(2, 8, unet.config.cross_attention_dim)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, unet.config.cross_attention_dim)
    text[0] = 0  # an empty negative prompt's zeroed text: the reference divides by zero there
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    processors = {}
    layers = dict(adapter.items())
    for name in unet.attn_processors:
        module = name.rsplit(".processor", 1)[0]
        if module in layers:
            processor = attention.IDAttnProcessor2_0(layers[module].hidden_size, unet.config.cross_attention_dim)
            processor.id_to_k.weight.data.copy_(layers[module].to_k_id.weight)
            processor.id_to_v.weight.data.copy_(layers[module].to_v_id.weight)
            processors[name] = processor
        else:
            processors[name] = attention.AttnProcessor2_0()
    original = dict(unet.attn_processors)
    with torch.no_grad():
        for num_zero, ortho in ((0, "off"), (8, "v1"), (20, "v2")):
            monkeypatch.setattr(attention, "NUM_ZERO", num_zero)
            monkeypatch.setattr(attention, "ORTHO", ortho == "v1")
            monkeypatch.setattr(attention, "ORTHO_v2", ortho == "v2")
            unet.set_attn_processor(dict(processors))
            adapter.detach()
            expected = unet(sample[1:], 500, text[1:], added_cond_kwargs={k: v[1:] for k, v in added.items()},
                            cross_attention_kwargs={"id_embedding": tokens[1:], "id_scale": 0.7}).sample
            unet.set_attn_processor(dict(original))
            adapter.attach(unet)
            call = IdentityCall(adapter)
            call.set_tokens(tokens[1:], {name: torch.tensor(0.7) for name in adapter.names}, None, num_zero, ortho)
            with open_identity(call):
                mine = unet(sample[1:], 500, text[1:], added_cond_kwargs={k: v[1:] for k, v in added.items()}).sample
            torch.testing.assert_close(mine, expected, atol=FP32_ATOL, rtol=0)
        call = IdentityCall(adapter)
        call.set_tokens(tokens, {name: torch.tensor(0.7) for name in adapter.names}, None, 20, "v2")
        with open_identity(call):
            assert torch.isfinite(unet(sample, 500, text, added_cond_kwargs=added).sample).all()


@pytest.mark.skipif(FACEXLIB is None, reason="set IDGEN_FACEXLIB_REPO to a local copy of xinntao/facexlib")
def test_face_parser_parity_with_facexlib(monkeypatch, tmp_path):
    """facexlib's BiSeNet and ours on the same random weights (with non-trivial batch-norm
    statistics), loaded from a file in its format."""
    (bisenet,) = reference_modules(monkeypatch, os.path.join(FACEXLIB, "facexlib", "parsing"), "ref_parsing", ["bisenet"])
    torch.manual_seed(0)
    reference = bisenet.BiSeNet(num_class=19)
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
    torch.save(reference.state_dict(), tmp_path / "parsing_bisenet.pth")
    ours = load_face_parser(tmp_path / "parsing_bisenet.pth")
    assert isinstance(ours, BiSeNet)
    image = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for mine, expected in zip(ours(image), reference.eval()(image), strict=True):
            torch.testing.assert_close(mine, expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.slow
def test_cli_and_demo(cache, astronaut, tmp_path, capsys):
    """The offline preset from the command line (its own random EVA tower and face parser, named in
    the metadata with the settings run), PuLID's flags refused for other methods, and the demo."""
    from PIL import Image

    from idgen.apps.cli import main
    from idgen.apps.demo import DemoApp
    from idgen.apps.session import start_session

    out = tmp_path / "pulid.png"
    common = ["--face", str(astronaut), "--prompt", "a portrait", "--steps", "2", "--height", "64", "--width", "64"]
    assert main(["generate", "--base", "tiny-pulid", *common, "--num-zero", "4", "--ortho", "v1", "--out", str(out), "--overwrite"]) == 0
    meta = Image.open(out).text
    assert (meta["method"], meta["num_zero"], meta["ortho"], meta["id_scale"]) == ("pulid", "4", "v1", "0.8")
    assert meta["random_weights"].startswith("random weights in: base, adapter, image encoder, face parser")
    assert main(["generate", "--base", "tiny-pulid", *common, "--num-zero", "-1", "--out", str(out), "--overwrite"]) == 2
    assert "PuLID takes num_zero >= 0" in capsys.readouterr().err
    assert main(["generate", "--base", "tiny", *common, "--num-zero", "4", "--out", str(out), "--overwrite"]) == 2
    assert "--num-zero is PuLID's" in capsys.readouterr().err
    people = tmp_path / "people.png"
    assert main(["generate", "--base", "tiny-pulid", *common[:-4], "--face", str(astronaut), "--people", "--height", "64",
                 "--width", "128", "--out", str(people)]) == 0  # two people, each read by EVA from their own photo
    assert Image.open(people).size == (128, 64)
    preset = get_preset("tiny-pulid", root=str(cache))
    assert main(["generate", "--base", "tiny", "--adapter", preset.adapter, *common, "--out", str(out), "--overwrite"]) == 2
    assert "made for SDXL" in capsys.readouterr().err

    session = start_session(base="tiny-pulid", height=64, width=64)
    app = DemoApp(session, session.load())
    path, caption = app.generate([str(astronaut)], None, "a portrait", "", "none", 0.9, 0.8, 2, 5.0, 0, 1)[0]
    assert Image.open(path).text["method"] == "pulid" and "id_scale 0.90" in caption
