"""FLUX.1 with PuLID-FLUX and InfiniteYou: loading by keys, the identity arguments, errors, the
CLI, on the tiny-flux and tiny-infiniteyou presets; parity with each reference implementation on
the same tiny random weights when a local copy of its code is given."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from idgen.adapters.flux import PuLIDFluxAdapter, ca_block_positions, infiniteyou_projection
from idgen.errors import CheckpointError, ModelNotFoundError, NoFaceError
from idgen.pipelines import IDFluxPipeline, IDStableDiffusionXLPipeline
from idgen.testing.presets import get_preset, random_infiniteyou, random_pulid_flux_state_dict, tiny_eva_tower, tiny_flux_pipeline

from .conftest import FP32_ATOL, reference_modules

#: Local copies of https://github.com/ToTheBeginning/PuLID, https://github.com/bytedance/InfiniteYou and
#: https://github.com/xinntao/facexlib.
PULID_REFERENCE = os.environ.get("IDGEN_PULID_REPO")
INFINITEYOU_REFERENCE = os.environ.get("IDGEN_INFINITEYOU_REPO")
FACEXLIB_REFERENCE = os.environ.get("IDGEN_FACEXLIB_REPO")
PROMPT = "a photo of a person"


@pytest.fixture(scope="module")
def presets(cache):
    return get_preset("tiny-flux", root=str(cache)), get_preset("tiny-infiniteyou", root=str(cache))


def _load(preset, analyzer) -> IDFluxPipeline:
    pipe = IDFluxPipeline.from_pretrained(preset.base)
    extra = dict(image_encoder=preset.image_encoder, face_parser=preset.face_parser) if preset.image_encoder else \
        dict(face_recognizer=preset.face_recognizer)
    pipe.load_identity_adapter(preset.adapter, **extra)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pulid(presets, analyzer):
    return _load(presets[0], analyzer)


@pytest.fixture(scope="module")
def infiniteyou(presets, analyzer):
    return _load(presets[1], analyzer)


def run(pipe, **kwargs):
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, **kwargs}
    return pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images


def plain(pipe, **kwargs):
    return FluxPipeline.__call__(pipe, PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
                                 generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.slow
def test_both_methods_load_by_keys_and_change_the_image(pulid, infiniteyou, astronaut):
    assert (pulid.adapter_format, infiniteyou.adapter_format) == ("pulid_flux", "infiniteyou")
    assert pulid.default_sample_size * pulid.vae_scale_factor == 128  # the VAE's size, not FLUX's 1024 on a tiny base
    for pipe in (pulid, infiniteyou):
        first = run(pipe, face_image=astronaut)
        assert torch.equal(first, run(pipe, face_image=astronaut))  # the same call twice
        assert not torch.allclose(first, plain(pipe), atol=1e-3)
    assert torch.equal(run(pulid, face_image=astronaut, id_scale=0.0), plain(pulid))
    assert pulid.transformer._diffusers_hook.get_hook("idgen_identity") is None  # plain again after the call


@pytest.mark.slow
def test_pulid_scales_windows_and_true_cfg(pulid, astronaut):
    full = run(pulid, face_image=astronaut)
    double = run(pulid, face_image=astronaut, id_scale={"double": 1.0})
    assert not torch.allclose(double, full, atol=1e-4) and not torch.allclose(double, plain(pulid), atol=1e-4)
    assert torch.equal(run(pulid, face_image=astronaut, id_scale={"double": 1.0, "single": 1.0}), full)
    assert torch.equal(run(pulid, face_image=astronaut, id_start_step=2), plain(pulid))  # 2 steps: never joins
    late = run(pulid, face_image=astronaut, id_start_step=1)
    assert not torch.allclose(late, full, atol=1e-4) and not torch.allclose(late, plain(pulid), atol=1e-4)
    assert torch.equal(run(pulid, face_image=astronaut, id_guidance_start=0.5), late)  # the same step, as a fraction
    cfg = dict(negative_prompt="blurry", true_cfg_scale=3.0)
    zero_negative = run(pulid, face_image=astronaut, **cfg)
    assert not torch.allclose(zero_negative, full, atol=1e-4)
    assert not torch.allclose(run(pulid, face_image=astronaut, negative_face_image=astronaut, **cfg), zero_negative,
                              atol=1e-4)  # the negative identity acts in the negative branch
    with pytest.raises(ValueError, match="use double, single or a layer prefix"):
        run(pulid, face_image=astronaut, id_scale={"down": 1.0})
    with pytest.raises(ValueError, match="InfiniteYou's"):
        run(pulid, face_image=astronaut, infusenet_conditioning_scale=0.5)


@pytest.mark.slow
def test_several_photos_and_one_identity_per_prompt(pulid, astronaut, group_photo):
    two = pulid([PROMPT, PROMPT], face_image=[astronaut, group_photo], num_inference_steps=2, height=64, width=64,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(two[0], two[1], atol=1e-4)  # the same noise seed per row would not tell them apart...
    one = run(pulid, face_image=[astronaut, group_photo])  # ...several photos of one person read together
    assert one.shape == two[:1].shape and not torch.allclose(one, run(pulid, face_image=astronaut), atol=1e-4)


@pytest.mark.slow
def test_infiniteyou_control_and_scales(infiniteyou, astronaut, tmp_path):
    free = run(infiniteyou, face_image=astronaut)
    posed = run(infiniteyou, face_image=astronaut, control_image=astronaut)
    assert not torch.allclose(free, posed, atol=1e-4)
    control = infiniteyou.kps_control(astronaut, 96, 64)  # a square photo fitted into a wide frame, centred
    lit = np.argwhere(np.asarray(control).max(axis=2) > 0)
    assert control.size == (96, 64) and 16 <= lit[:, 1].min() and lit[:, 1].max() < 80
    weak = run(infiniteyou, face_image=astronaut, infusenet_conditioning_scale=0.3)
    assert not torch.allclose(weak, free, atol=1e-4)
    assert torch.allclose(run(infiniteyou, face_image=astronaut, id_scale=0.3), weak, atol=FP32_ATOL)
    assert not torch.allclose(run(infiniteyou, face_image=astronaut, infusenet_guidance_end=0.5), free, atol=1e-4)
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.new("RGB", (256, 256), (90, 90, 90)).save(blank)
    with pytest.raises(NoFaceError, match="control_image has 0 face"):
        run(infiniteyou, face_image=astronaut, control_image=blank)
    with pytest.raises(ValueError, match="do not overlap"):
        run(infiniteyou, face_image=astronaut, id_guidance_end=0.4, infusenet_guidance_start=0.5)
    with pytest.raises(ValueError, match="InfiniteYou defines no negative identity"):
        run(infiniteyou, face_image=astronaut, negative_face_image=astronaut)


@pytest.mark.slow
def test_infiniteyou_reads_photos_with_its_own_arcface(infiniteyou, analyzer, astronaut, group_photo, tmp_path):
    """InfiniteYou's identity comes from the recognizer it was trained on (facexlib's IR-SE, on the
    face aligned at 112 px, in BGR), not from the face pack's; several photos are averaged."""
    from idgen.adapters.face_recognition import build_irse, load_irse_recognizer

    crops = analyzer.face_crops([astronaut, group_photo], 0, 112)
    # a batch of one photo against a batch of two, averaged in numpy: two code paths
    expected = infiniteyou.face_recognizer(torch.from_numpy(crops[..., ::-1].copy()).permute(0, 3, 1, 2) / 127.5 - 1)
    assert torch.allclose(infiniteyou.encode_identity(astronaut)[0], expected[0], atol=FP32_ATOL)
    both = infiniteyou.encode_identity([astronaut, group_photo])[0]
    assert torch.allclose(both, torch.nn.functional.normalize(expected.sum(0), dim=0), atol=FP32_ATOL)
    pack = torch.from_numpy(analyzer.identity([astronaut]))
    assert not torch.allclose(infiniteyou.encode_identity(astronaut)[0], pack, atol=1e-2)
    assert torch.equal(run(infiniteyou, face_image=astronaut),
                       run(infiniteyou, id_embeds=infiniteyou.encode_identity(astronaut)))
    broken = tmp_path / "not-arcface.pth"
    torch.save({"conv.weight": torch.zeros(1)}, broken)
    with pytest.raises(CheckpointError, match="is not facexlib's IR-SE ArcFace recognizer"):
        load_irse_recognizer(broken)
    with pytest.raises(ModelNotFoundError, match="does not exist: pass facexlib's recognition_arcface_ir_se50.pth"):
        load_irse_recognizer(tmp_path / "missing.pth")
    assert len(build_irse(infiniteyou.face_recognizer.state_dict()).body) == 4


def test_wrong_checkpoints_fail_with_one_line(pulid, presets, cache, tmp_path):
    with pytest.raises(CheckpointError, match="is not a FLUX identity adapter"):
        pulid.load_identity_adapter(get_preset("tiny-sdxl", root=str(cache)).adapter + "/ip-adapter.bin")
    sdxl = IDStableDiffusionXLPipeline.from_pretrained(get_preset("tiny-sdxl", root=str(cache)).base, controlnet=None)
    for adapter in (presets[0].adapter, os.path.join(presets[1].adapter, "image_proj_model.bin")):
        with pytest.raises(CheckpointError, match="IDFluxPipeline"):
            sdxl.load_identity_adapter(adapter)
    deeper = tiny_flux_pipeline(0)
    deeper.transformer = type(deeper.transformer)(**{**deeper.transformer.config, "num_layers": 5})
    state = random_pulid_flux_state_dict(deeper.transformer, tiny_eva_tower(0))
    with pytest.raises(CheckpointError, match="has 5 cross-attention blocks, but a transformer with 3 double"):
        pulid.load_identity_adapter(state)
    assert pulid.adapter_format == "pulid_flux"  # the loaded adapter is kept
    with pytest.raises(ValueError, match="infusenet= and face_recognizer= are InfiniteYou's"):
        pulid.load_identity_adapter(presets[0].adapter, infusenet="somewhere", image_encoder=presets[0].image_encoder,
                                    face_parser=presets[0].face_parser)


def test_infiniteyou_from_its_hub_layout(infiniteyou, presets, monkeypatch, tmp_path):
    """``ByteDance/InfiniteYou`` with a model subfolder: the projection and InfuseNet come from the
    same folder of the repo (the hub stood in for by the preset's files)."""
    from diffusers import FluxControlNetModel

    from idgen.adapters import checkpoints

    asked, cached = [], tmp_path / "image_proj_model.bin"  # a download holds the file alone
    cached.write_bytes((Path(presets[1].adapter) / "image_proj_model.bin").read_bytes())
    monkeypatch.setattr(checkpoints, "hf_hub_download", lambda repo, name, subfolder=None, **kw: asked.append(
        (repo, subfolder, name)) or str(cached))
    loader = FluxControlNetModel.from_pretrained.__func__
    monkeypatch.setattr(FluxControlNetModel, "from_pretrained", classmethod(
        lambda cls, repo, subfolder=None, **kw: asked.append((repo, subfolder)) or loader(
            cls, os.path.join(presets[1].adapter, "InfuseNetModel"))))
    for kwargs in (dict(subfolder="infu_flux_v1.0/aes_stage2"), dict(weight_name="infu_flux_v1.0/aes_stage2/image_proj_model.bin")):
        asked.clear()
        infiniteyou.load_identity_adapter("ByteDance/InfiniteYou", face_recognizer=infiniteyou.face_recognizer, **kwargs)
        assert asked[-1] == ("ByteDance/InfiniteYou", "infu_flux_v1.0/aes_stage2/InfuseNetModel")
        assert asked[0][0] == "ByteDance/InfiniteYou" and infiniteyou.adapter_format == "infiniteyou"


@pytest.mark.slow
def test_from_pipe_keeps_the_identity(pulid, astronaut):
    again = IDFluxPipeline.from_pipe(pulid)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(run(again, face_image=astronaut), run(pulid, face_image=astronaut))
    plain_pipe = FluxPipeline.from_pipe(pulid)  # diffusers' own pipeline on the same transformer runs it plain
    plain_pipe.set_progress_bar_config(disable=True)
    assert torch.equal(plain(plain_pipe), plain(pulid))


def test_save_pretrained_writes_the_plain_base(pulid, tmp_path):
    pulid.save_pretrained(tmp_path / "saved")
    again = FluxPipeline.from_pretrained(tmp_path / "saved")
    for name, tensor in pulid.transformer.state_dict().items():
        assert torch.equal(again.transformer.state_dict()[name], tensor), name
    assert not any("pulid" in name for name in os.listdir(tmp_path / "saved"))


@pytest.mark.slow
def test_cli_eval_and_demo(cache, astronaut, tmp_path, capsys):
    from PIL import Image

    from idgen.apps.cli import main

    common = ["--face", str(astronaut), "--prompt", "a portrait", "--steps", "2", "--height", "64", "--width", "64"]
    out = tmp_path / "flux.png"
    assert main(["generate", "--base", "tiny-flux", *common, "--id-start-step", "1", "--out", str(out), "--overwrite"]) == 0
    meta = Image.open(out).text
    assert (meta["method"], meta["id_start_step"], meta["steps"], meta["guidance"]) == ("pulid-flux", "1", "2", "4.0")
    assert meta["random_weights"].startswith("random weights in: base, adapter, image encoder, face parser")
    assert main(["generate", "--base", "tiny-infiniteyou", *common, "--kps-image", str(astronaut), "--out", str(out), "--overwrite"]) == 0
    meta = Image.open(out).text
    assert (meta["method"], meta["kps_image"]) == ("infiniteyou", str(astronaut))
    assert meta["face_model"].startswith("facexlib IR-SE50 (") and "InfiniteYou's face recognizer" in meta["random_weights"]
    assert main(["generate", "--base", "tiny-flux", *common, "--num-zero", "4", "--out", str(out), "--overwrite"]) == 2
    assert "--num-zero is PuLID's on SDXL" in capsys.readouterr().err
    assert main(["generate", "--base", "tiny-sdxl", *common, "--id-start-step", "2", "--out", str(out), "--overwrite"]) == 2
    assert "--id-start-step is FLUX's" in capsys.readouterr().err
    sdxl_adapter = get_preset("tiny-faceid-sdxl", root=str(cache)).adapter
    assert main(["generate", "--base", "tiny-flux", "--adapter", sdxl_adapter, *common, "--out", str(out), "--overwrite"]) == 2
    assert "is not a FLUX identity adapter" in capsys.readouterr().err

    refs = tmp_path / "refs" / "eileen"
    refs.mkdir(parents=True)
    (refs / "a.jpg").write_bytes(astronaut.read_bytes())
    assert main(["eval", "--base", "tiny-infiniteyou", "--refs", str(tmp_path / "refs"), "--prompt", "a portrait",
                 "--steps", "2", "--height", "64", "--width", "64", "--out", str(tmp_path / "report")]) == 0
    assert "1 images" in capsys.readouterr().out

    from idgen.apps.demo import DemoApp
    from idgen.apps.session import start_session

    session = start_session(base="tiny-flux", height=64, width=64)
    app = DemoApp(session, session.load())
    path, caption = app.generate([str(astronaut)], None, "a portrait", "", "none", 0.9, 0.8, 2, 4.0, 0, 1)[0]
    assert Image.open(path).text["method"] == "pulid-flux" and "id_scale 0.90" in caption


# ---------------------------------------------------------------------------------------- parity
def _flux_to_diffusers(state: dict, width: int) -> dict:
    """diffusers' own converter of BFL's FLUX checkpoints, at the tiny width (it assumes 3072)."""
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {width}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"](dict(state))


@pytest.mark.skipif(PULID_REFERENCE is None, reason="set IDGEN_PULID_REPO to a local copy of ToTheBeginning/PuLID")
def test_pulid_flux_parity_with_the_reference(monkeypatch):
    """The reference's FLUX (its flux/ package, with PuLID's cross-attention after every 2nd double and
    4th single block) and its sampling loop, against diffusers' transformer (weights converted by
    diffusers) with our hooks in FluxPipeline's loop: same latents, prompt embeddings and identity
    tokens, with and without true CFG and a late start."""
    pytest.importorskip("einops", reason="the reference's FLUX layers import einops (pip install einops)")
    monkeypatch.syspath_prepend(PULID_REFERENCE)
    for name in [m for m in sys.modules if m == "flux" or m.startswith("flux.")]:
        monkeypatch.delitem(sys.modules, name)
    from flux.model import Flux, FluxParams
    from flux.sampling import denoise, get_schedule

    (encoders,) = reference_modules(monkeypatch, os.path.join(PULID_REFERENCE, "pulid"), "ref_pulid",
                                    ["encoders_transformer"])
    pipe = tiny_flux_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    torch.manual_seed(1)
    reference = Flux(FluxParams(in_channels=config.in_channels, vec_in_dim=config.pooled_projection_dim,
                                context_in_dim=config.joint_attention_dim, hidden_size=width, mlp_ratio=4.0,
                                num_heads=config.num_attention_heads, depth=config.num_layers,
                                depth_single_blocks=config.num_single_layers, axes_dim=list(config.axes_dims_rope),
                                theta=10000, qkv_bias=True, guidance_embed=True)).eval()
    num_ca = len(ca_block_positions(config.num_layers, config.num_single_layers))
    reference.pulid_ca = torch.nn.ModuleList(encoders.PerceiverAttentionCA(dim=width, kv_dim=16, heads=1, dim_head=128)
                                             for _ in range(num_ca))
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.2)
    pipe.transformer.load_state_dict(_flux_to_diffusers(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("pulid_ca")}, width), strict=True)
    adapter = PuLIDFluxAdapter(encoder_config=dict(dim=64, depth=5, heads=1, num_id_token=2, num_queries=8, output_dim=16,
                                                   clip_dim=16, vit_dim=32, hidden_dim=64),
                               num_ca=num_ca, dim=width, kv_dim=16, heads=1)
    adapter.pulid_ca.load_state_dict(reference.pulid_ca.state_dict())
    pipe.identity_adapter, pipe.adapter_format = adapter, "pulid_flux"

    generator = torch.Generator().manual_seed(3)
    latents, text, pooled, negative_text, negative_pooled = (
        torch.randn(shape, generator=generator) for shape in ((1, 16, 64), (1, 7, 32), (1, 32), (1, 7, 32), (1, 32)))
    tokens, negative_tokens = torch.randn(1, 8, 16, generator=generator), torch.randn(1, 8, 16, generator=generator)
    image_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)[None]
    text_ids = torch.zeros(1, 7, 3)
    for start_step, true_cfg, id_scale in ((0, 1.0, 1.0), (1, 3.0, 0.7)):
        with torch.no_grad():
            expected = denoise(reference, latents, image_ids, text, text_ids, pooled, get_schedule(4, 16), guidance=3.5,
                               id_weight=id_scale, id=tokens, start_step=start_step, uncond_id=negative_tokens,
                               true_cfg=true_cfg, timestep_to_start_cfg=0, neg_txt=negative_text, neg_txt_ids=text_ids,
                               neg_vec=negative_pooled)
            with pipe.identity_conditioning(tokens, negative_tokens, 1, id_scale, id_start_step=start_step):
                ours = FluxPipeline.__call__(pipe, prompt_embeds=text, pooled_prompt_embeds=pooled, latents=latents,
                                             negative_prompt_embeds=negative_text, true_cfg_scale=true_cfg,
                                             negative_pooled_prompt_embeds=negative_pooled, height=64, width=64,
                                             num_inference_steps=4, guidance_scale=3.5, output_type="latent").images
        error = (ours - expected).abs().max().item()
        print(f"PuLID-FLUX start_step={start_step} true_cfg={true_cfg}: max |diff| {error:.2e} "
              f"(values up to {expected.abs().max().item():.1f})")
        assert error <= 1e-4


@pytest.mark.skipif(FACEXLIB_REFERENCE is None, reason="set IDGEN_FACEXLIB_REPO to a local copy of xinntao/facexlib")
def test_irse_arcface_parity_with_facexlib(monkeypatch):
    """facexlib's IR-SE50 (InfiniteYou's recognizer) with random weights and batch-norm statistics,
    loaded into ours from its state dict: the same embeddings."""
    from idgen.adapters.face_recognition import build_irse

    (arch,) = reference_modules(monkeypatch, os.path.join(FACEXLIB_REFERENCE, "facexlib", "recognition"),
                                "ref_recognition", ["arcface_arch"])
    torch.manual_seed(0)
    reference = arch.Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se").eval()
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():  # batch norms and PReLUs off their defaults
            if tensor.ndim == 1 and tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith("running_var") else torch.randn_like(tensor) * 0.1)
    ours = build_irse(reference.state_dict())
    assert len(ours.body) == 24
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        error = (ours(faces) - reference(faces)).abs().max().item()
    print(f"IR-SE50: max |diff| {error:.2e}")
    assert error <= 1e-5


@pytest.mark.skipif(INFINITEYOU_REFERENCE is None,
                    reason="set IDGEN_INFINITEYOU_REPO to a local copy of bytedance/InfiniteYou")
def test_infiniteyou_parity_with_the_reference(monkeypatch):
    """The reference's Resampler and its FluxInfuseNetPipeline (on diffusers' FluxControlNetPipeline),
    seeded as its app seeds (the global generator), against our projection and IDFluxPipeline, with
    the same tiny random weights, at two conditioning scales and step windows."""
    import diffusers.models.controlnets.controlnet_flux as controlnet_flux
    from PIL import Image

    monkeypatch.setitem(sys.modules, "diffusers.models.controlnet_flux", controlnet_flux)  # its older import path
    reference_pipeline, resampler = reference_modules(monkeypatch, os.path.join(INFINITEYOU_REFERENCE, "pipelines"),
                                                      "ref_infiniteyou", ["pipeline_flux_infusenet", "resampler"])
    pipe = tiny_flux_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    image_proj, infusenet = random_infiniteyou(pipe.transformer, 0)
    reference = resampler.Resampler(dim=64, depth=2, dim_head=64, heads=1, num_queries=8, embedding_dim=512,
                                    output_dim=32, ff_mult=4)
    reference.load_state_dict(image_proj["image_proj"])
    pipe.identity_adapter, pipe.adapter_format, pipe.infusenet = infiniteyou_projection(image_proj), "infiniteyou", infusenet
    id_embeds = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(4)), dim=-1)
    with torch.no_grad():
        tokens = reference(id_embeds[:, None])
        assert (pipe.identity_adapter(id_embeds[:, None]) - tokens).abs().max().item() <= 1e-6
        ref = reference_pipeline.FluxInfuseNetPipeline(controlnet=infusenet, **pipe.components)
        ref.set_progress_bar_config(disable=True)
        for scale, start, end in ((1.0, 0.0, 1.0), (0.6, 0.25, 0.75)):
            torch.manual_seed(0)
            expected = ref(PROMPT, controlnet_prompt_embeds=tokens, control_image=Image.new("RGB", (64, 64)), height=64,
                           width=64, num_inference_steps=4, guidance_scale=3.5, controlnet_conditioning_scale=scale,
                           control_guidance_start=start, control_guidance_end=end, output_type="latent").images
            ours = pipe(PROMPT, id_embeds=id_embeds, height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
                        infusenet_conditioning_scale=scale, infusenet_guidance_start=start, infusenet_guidance_end=end,
                        generator=torch.Generator().manual_seed(0), output_type="latent").images
            error = (ours - expected).abs().max().item()
            print(f"InfiniteYou scale={scale} window={start}-{end}: max |diff| {error:.2e}")
            assert error <= 1e-4


@pytest.mark.slow
def test_one_photo_for_a_batch_of_prompts(pulid, infiniteyou, astronaut):
    """One face photo and N prompts: every prompt gets that identity (diffusers' rule for one
    image and a batch of prompts), each sample as its prompt alone with that photo."""
    prompts = ["a photo of a person", "a painting of a person"]
    for pipe in (pulid, infiniteyou):
        kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="latent", face_image=str(astronaut))
        batch = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
        alone = torch.stack([pipe(prompt, generator=torch.Generator().manual_seed(i), **kwargs).images[0]
                             for i, prompt in enumerate(prompts)])
        torch.testing.assert_close(batch, alone, atol=FP32_ATOL, rtol=0)


def _flux_ip_adapter_state_dict(transformer, clip_dim: int = 16, seed: int = 0) -> dict:
    """A random FLUX IP-Adapter in XLabs' layout (the one ``load_ip_adapter`` reads): a linear
    projection to 4 tokens and image keys/values for every double-stream block."""
    generator = torch.Generator().manual_seed(seed)
    text, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    state = {"image_proj": {"proj.weight": torch.randn(text * 4, clip_dim, generator=generator) * 0.2,
                            "proj.bias": torch.zeros(text * 4), "norm.weight": torch.ones(text),
                            "norm.bias": torch.zeros(text)}, "ip_adapter": {}}
    for index in range(len(transformer.transformer_blocks)):
        for part in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{index}.{part}.weight"] = torch.randn(inner, text, generator=generator) * 0.3
            state["ip_adapter"][f"{index}.{part}.bias"] = torch.zeros(inner)
    return state


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["pulid-flux", "infiniteyou"])
def test_diffusers_ip_adapter_beside_the_identity(presets, analyzer, astronaut, which):
    """diffusers' FLUX IP-Adapter (a style or image reference) loads beside PuLID-FLUX or
    InfiniteYou and both act, each at its own scale: IP-Adapter scale 0 is the identity alone (to
    float32 rounding); either scale changes the image without the other; unloading it gives the
    identity alone exactly. Without an IP-Adapter its inputs are refused in one line."""
    pipe = _load(presets[which], analyzer)
    call = dict(face_image=astronaut)
    alone = run(pipe, **call)
    reference = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(2))
    embeds = dict(ip_adapter_image_embeds=[reference], negative_ip_adapter_image_embeds=[torch.zeros_like(reference)])
    with pytest.raises(ValueError, match="none is loaded"):
        run(pipe, **call, **embeds)
    pipe.load_ip_adapter(_flux_ip_adapter_state_dict(pipe.transformer), subfolder=None, weight_name=None,
                         image_encoder_pretrained_model_name_or_path=None)
    pipe.set_ip_adapter_scale(0.0)
    torch.testing.assert_close(run(pipe, **call, **embeds), alone, atol=FP32_ATOL, rtol=0)
    pipe.set_ip_adapter_scale(1.0)
    both = run(pipe, **call, **embeds)
    reference_only = run(pipe, **call, id_scale=0.0, **embeds)
    assert (both - alone).abs().max() > 1e-3 and (both - reference_only).abs().max() > 1e-3
    pipe.unload_ip_adapter()
    assert torch.equal(run(pipe, **call), alone)
