"""PhotoMaker V2: the checkpoint layout, the identity fused into the prompt's class word, the
merge step, and parity with TencentARC/PhotoMaker's own pipeline on the same random weights."""

import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from idgen import CheckpointError, IdentityInputError, IDPhotoMakerPipeline, IDStableDiffusionPipeline
from idgen.testing.presets import get_preset, random_photomaker_state_dict

from .conftest import FP32_ATOL

#: A local copy of https://github.com/TencentARC/PhotoMaker for the parity test (skipped without).
REFERENCE = os.environ.get("IDGEN_PHOTOMAKER_REPO")
PROMPT = "a photo of a woman img in a garden"


@pytest.fixture(scope="module")
def checkpoint(cache, tmp_path_factory):
    xl = get_preset("tiny-sdxl", root=str(cache))
    pipe = IDPhotoMakerPipeline.from_pretrained(xl.base)
    path = tmp_path_factory.mktemp("photomaker") / "photomaker-v2.bin"
    torch.save(random_photomaker_state_dict(pipe.unet), path)
    return path


@pytest.fixture(scope="module")
def pipe(cache, checkpoint, analyzer):
    xl = get_preset("tiny-sdxl", root=str(cache))
    pipe = IDPhotoMakerPipeline.from_pretrained(xl.base)
    pipe.load_identity_adapter(str(checkpoint))
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, **kwargs):
    return pipe(kwargs.pop("prompt", PROMPT), num_inference_steps=4, height=128, width=128, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_loads_the_official_layout(pipe, checkpoint):
    from idgen.adapters.photomaker import photomaker_state_dicts

    ours, clip, lora = photomaker_state_dicts(str(checkpoint))
    assert {k for k in pipe.id_encoder.state_dict()} == set(ours)
    assert all(torch.equal(pipe.id_encoder.state_dict()[k], v) for k, v in ours.items())
    assert all(torch.equal(pipe.image_encoder.state_dict()[k], v) for k, v in clip.items())
    assert "photomaker" in pipe.unet.peft_config and all(k.startswith("unet.") for k in lora)


@pytest.mark.slow
def test_class_word_copies_and_the_merge_step(pipe, astronaut):
    """"woman img" -> "woman" once per identity token (2 per photo); before the merge step the
    prompt without the trigger word denoises alone; each photo changes the result."""
    tokens = pipe.encode_photomaker_identity([astronaut])
    assert tokens.shape == (2, pipe.unet.config.cross_attention_dim)
    embeds, pooled, mask = pipe.encode_trigger_prompt([PROMPT], "img", 4, torch.device("cpu"))
    ids = pipe._class_ids(pipe.tokenizer, PROMPT, "img", 4)[0]
    woman = pipe.tokenizer("woman", add_special_tokens=False).input_ids[-1]
    assert mask.sum() == 4 and all(ids[i] == woman for i in np.flatnonzero(mask[0].numpy()))
    assert pipe.text_only_prompt(PROMPT, "img").split() == "a photo of a woman in a garden".split()
    merged, late = latents(pipe, face_image=[astronaut], start_merge_step=0), latents(pipe, face_image=[astronaut],
                                                                                       start_merge_step=3)
    assert (merged - late).abs().max() > 1e-3
    # start_merge_step past the last step: the identity never acts, any face gives the same image
    flipped = Image.open(astronaut).transpose(Image.FLIP_LEFT_RIGHT)
    assert torch.equal(late, latents(pipe, face_image=[flipped], start_merge_step=3))
    assert (latents(pipe, face_image=[astronaut, flipped], start_merge_step=0) - merged).abs().max() > 1e-3
    both = pipe(["a woman img", "a man img, smiling"], face_image=astronaut, num_inference_steps=2, height=64, width=64,
                num_images_per_prompt=2, output_type="np").images
    assert both.shape == (4, 64, 64, 3)


def test_errors(pipe, astronaut, checkpoint, preset):
    with pytest.raises(IdentityInputError, match="trigger word 'img' once"):
        latents(pipe, prompt="a photo of a woman", face_image=[astronaut])
    with pytest.raises(IdentityInputError, match="follows the class word"):
        latents(pipe, prompt="img in a garden", face_image=[astronaut])
    with pytest.raises(IdentityInputError, match="pass face_image="):
        latents(pipe)
    with pytest.raises(ValueError, match="prompt_2= is not taken by PhotoMaker"):
        latents(pipe, prompt="a photo of a woman img", face_image=[astronaut], prompt_2="a garden")
    sd15 = IDStableDiffusionPipeline.from_pretrained(preset.base)
    with pytest.raises(CheckpointError, match="PhotoMaker checkpoint.*IDPhotoMakerPipeline"):
        sd15.load_identity_adapter(str(checkpoint))
    v1 = {"id_encoder": {"fuse_module.mlp1.fc1.weight": torch.zeros(2, 2)}, "lora_weights": {}}
    with pytest.raises(CheckpointError, match="PhotoMaker V1"):
        pipe.load_identity_adapter(v1)


def test_unload_gives_back_plain_sdxl(cache, checkpoint):
    xl = get_preset("tiny-sdxl", root=str(cache))
    pipe = IDPhotoMakerPipeline.from_pretrained(xl.base)
    before = pipe.image_encoder
    pipe.load_identity_adapter(str(checkpoint))
    pipe.unload_identity_adapter()
    assert pipe.id_encoder is None and pipe.image_encoder is before and "photomaker" not in getattr(
        pipe.unet, "peft_config", {})


def _reference_package(folder, monkeypatch, request) -> types.ModuleType:
    """PhotoMaker's package from the local copy: its files as they are. It was written for an older
    diffusers (the module it takes MultiControlNetModel from has moved), and ``einops`` (imported
    by its resampler for the Resampler V2 does not use) is stood in for when it is not installed.
    Every stand-in, and the package itself, leaves ``sys.modules`` with the test."""
    import importlib.util

    from diffusers.models.controlnets import multicontrolnet

    monkeypatch.setitem(sys.modules, "diffusers.pipelines.controlnet.multicontrolnet", multicontrolnet)
    shutil.copytree(os.path.join(REFERENCE, "photomaker"), folder / "photomaker")
    monkeypatch.syspath_prepend(str(folder))
    if importlib.util.find_spec("einops") is None:
        stub = types.ModuleType("einops")
        stub.rearrange = None
        stub.layers = types.ModuleType("einops.layers")
        stub.layers.torch = types.ModuleType("einops.layers.torch")
        stub.layers.torch.Rearrange = None
        for name, module in {"einops": stub, "einops.layers": stub.layers, "einops.layers.torch": stub.layers.torch}.items():
            monkeypatch.setitem(sys.modules, name, module)
    request.addfinalizer(lambda: [sys.modules.pop(name) for name in list(sys.modules)
                                  if name == "photomaker" or name.startswith("photomaker.")])
    import photomaker

    return photomaker


@pytest.mark.skipif(REFERENCE is None, reason="set IDGEN_PHOTOMAKER_REPO to a local copy of TencentARC/PhotoMaker")
def test_parity_with_the_reference_pipeline(tmp_path, astronaut, monkeypatch, request):
    """The same random full-width checkpoint (CLIP ViT-L, 2048-wide fuse) through PhotoMaker's own
    pipeline and ours, on a tiny SDXL whose prompt embeddings are 768 + 1280 wide."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig

    from idgen.testing.presets import tiny_clip_tokenizer, tiny_vae

    reference = _reference_package(tmp_path, monkeypatch, request)
    from photomaker.model_v2 import VISION_CONFIG_DICT

    def build() -> dict:  # the same tiny SDXL each time: one for each pipeline (each adds its LoRA)
        torch.manual_seed(0)
        tokenizer = tiny_clip_tokenizer()
        text = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=1, max_position_embeddings=77,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        return dict(
            text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=768, num_attention_heads=12, projection_dim=768, **text)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, num_attention_heads=20,
                                                                      projection_dim=1280, **text)),
            tokenizer=tokenizer, tokenizer_2=tiny_clip_tokenizer(), vae=tiny_vae(),
            unet=UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                      use_linear_projection=True, addition_embed_type="text_time",
                                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=1280 + 6 * 8,
                                      cross_attention_dim=2048, norm_num_groups=16),
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             timestep_spacing="leading", steps_offset=1),
        )

    from transformers import CLIPVisionModelWithProjection

    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG_DICT))
    ref = reference.PhotoMakerStableDiffusionXLPipeline(**build())
    ours = IDPhotoMakerPipeline(**build())
    state = random_photomaker_state_dict(ours.unet, clip=clip)
    ref.load_photomaker_adapter(state, weight_name="", trigger_word="img", pm_version="v2")
    ours.load_identity_adapter(state)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    photo = Image.open(astronaut).convert("RGB")
    id_embeds = torch.randn(1, 512, generator=torch.Generator().manual_seed(1)) * 20
    common = dict(num_inference_steps=4, height=128, width=128, output_type="latent", guidance_scale=5.0)
    expected = ref(PROMPT, input_id_images=[photo], id_embeds=id_embeds, start_merge_step=1,
                   generator=torch.Generator().manual_seed(0), **common).images
    got = ours(PROMPT, face_image=[photo], id_embeds=id_embeds, start_merge_step=1,
               generator=torch.Generator().manual_seed(0), **common).images
    difference = float((expected - got).abs().max())
    print(f"PhotoMaker V2 parity: max latent difference {difference:.3g}")
    assert difference <= FP32_ATOL
    other = ours(PROMPT, face_image=[photo], id_embeds=torch.randn(1, 512, generator=torch.Generator().manual_seed(2)) * 20,
                 start_merge_step=1, generator=torch.Generator().manual_seed(0), **common).images
    assert float((expected - other).abs().max()) > 10 * FP32_ATOL  # another identity: the comparison can fail


@pytest.mark.slow
def test_cli(tmp_path, checkpoint, pipe, astronaut, capsys):
    """`idgen generate --adapter photomaker-v2.bin` on the tiny SDXL preset: the image equals the
    Python call; the file is recognised by its keys under any name; wrong pairings are one line."""
    from idgen.apps.cli import main

    out = tmp_path / "pm.png"
    common = ["--base", "tiny-sdxl", "--face", str(astronaut), "--steps", "4", "--out", str(out), "--overwrite", "--no-watermark"]
    assert main(["generate", "--adapter", str(checkpoint), "--prompt", PROMPT, *common]) == 0
    meta = Image.open(out).text
    assert meta["method"] == "photomaker" and meta["trigger_word"] == "img" and meta["start_merge_step"] == "0"
    assert "id_scale" not in meta and "base" in meta["random_weights"]
    id_embeds = torch.from_numpy(np.stack([f.raw_embedding for f in pipe.face_analyzer.faces([astronaut])]))
    expected = pipe(PROMPT, face_image=[str(astronaut)], id_embeds=id_embeds, start_merge_step=0, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    renamed = tmp_path / "my-adapter.bin"
    shutil.copy(checkpoint, renamed)
    assert main(["generate", "--adapter", str(renamed), "--prompt", PROMPT, "--start-merge-step", "2", *common]) == 0
    assert Image.open(out).text["method"] == "photomaker" and Image.open(out).text["start_merge_step"] == "2"
    for flags, message in (
        (["--adapter", str(checkpoint), "--prompt", "a photo of a woman"], "a class word followed by 'img'"),
        (["--adapter", str(checkpoint), "--prompt", PROMPT, "--id-scale", "0.5"], "--id-scale act on adapter attention"),
    ):
        assert main(["generate", *flags, *common]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--base", "tiny", "--adapter", str(checkpoint), "--face", str(astronaut), "--prompt",
                 PROMPT, "--out", str(tmp_path / "refused.png")]) == 2
    assert "made for SDXL" in capsys.readouterr().err
    # the offline preset: its own random PhotoMaker file
    assert main(["generate", "--base", "tiny-photomaker", "--face", str(astronaut), "--prompt", PROMPT, "--steps", "2",
                 "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out).text["method"] == "photomaker"
    assert Image.open(out).text["random_weights"].startswith("random weights in: base, adapter")


@pytest.mark.slow
def test_demo(cache, astronaut):
    """The demo runs PhotoMaker: its merge step follows the steps slider (20% of it)."""
    from idgen.apps.demo import DemoApp, build_demo
    from idgen.apps.session import start_session

    session = start_session(base="tiny-photomaker", height=64, width=64)
    app = DemoApp(session, session.load())
    assert not app.adapter_attention and build_demo(app) is not None
    path, caption = app.generate([str(astronaut)], None, PROMPT, "", "none", 1.0, 0.8, 10, 5.0, 0, 1)[0]
    meta = Image.open(path).text
    assert meta["method"] == "photomaker" and meta["start_merge_step"] == "2" and "id_scale" not in caption
