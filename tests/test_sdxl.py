"""SDXL: InstantID (Resampler adapter + IdentityNet) and FaceID-SDXL on the tiny SDXL preset."""

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from idgen import CheckpointError, IDStableDiffusionPipeline, IDStableDiffusionXLPipeline, draw_kps, load_identitynet
from idgen.adapters import InstantIDResampler, load_adapter_state_dict, save_adapter_checkpoint
from idgen.faces import KPS_COLORS
from idgen.testing.presets import INSTANTID_FILE, get_preset, random_faceid_state_dict, tiny_identitynet

from .conftest import assert_close
from .conftest import embedding as unit_embedding

STEPS = 2
KPS = np.array([[40.0, 50.0], [88.0, 50.0], [64.0, 75.0], [46.0, 98.0], [82.0, 98.0]])


def embedding(seed, scale=20.0):
    return unit_embedding(seed, scale)


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", "a photo of a person")
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("height", 128)
    kwargs.setdefault("width", 128)
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs).images


def differ(a, b, by=1e-3):
    return np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max() > by


@pytest.fixture(scope="module")
def xl(cache):
    return get_preset("tiny-sdxl", root=str(cache))


@pytest.fixture(scope="module")
def instantid(xl, analyzer):
    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
    pipe.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_draw_kps_pixels():
    image = np.asarray(draw_kps((128, 128), KPS))
    assert image.shape == (128, 128, 3)
    for (x, y), colour in zip(KPS.astype(int), KPS_COLORS):
        assert tuple(image[y, x]) == colour  # full-colour disc on every keypoint
        assert tuple(image[y + 9, x]) == colour and tuple(image[y + 12, x]) != colour  # radius 10
    # Limbs: 60% of their first point's colour, halfway to the nose, outside the discs.
    for start in (0, 1, 3, 4):
        x, y = ((KPS[start] + KPS[2]) / 2).astype(int)
        assert tuple(image[y, x]) == tuple(int(c * 0.6) for c in KPS_COLORS[start])
    assert tuple(image[5, 5]) == (0, 0, 0) and tuple(image[120, 64]) == (0, 0, 0)


def test_instantid_checkpoint_round_trip(xl, instantid):
    state = load_adapter_state_dict(os.path.join(xl.adapter, INSTANTID_FILE))
    assert isinstance(instantid.id_projection, InstantIDResampler)
    got = instantid.id_projection.state_dict()
    assert got.keys() == state["image_proj"].keys()
    assert all(torch.equal(got[k], state["image_proj"][k]) for k in got)
    names = [name.rsplit(".processor", 1)[0] for name in instantid.unet.attn_processors]
    layers = dict(instantid.identity_adapter.items())
    for key, tensor in state["ip_adapter"].items():
        index, part = key.split(".")[:2]
        assert torch.equal(getattr(layers[names[int(index)]], part.replace("_ip", "_id")).weight, tensor)
    assert len(layers) == len(state["ip_adapter"]) // 2


def test_resampler_matches_diffusers_ip_adapter_plus_projection(xl, instantid):
    """diffusers' own Resampler port, converted from the same official keys, gives the same tokens."""
    state = load_adapter_state_dict(os.path.join(xl.adapter, INSTANTID_FILE))
    reference = instantid.unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    x = torch.stack([embedding(1), embedding(2)])[:, None]
    assert torch.allclose(reference(x), instantid.id_projection(x), atol=1e-5)


def test_identitynet_sees_identity_tokens_and_keypoints(instantid, analyzer, astronaut):
    seen, conds = [], []
    net = instantid.controlnet
    cross = next(m for name, m in net.named_modules() if name.endswith("attn2"))  # reads encoder_hidden_states
    handles = [cross.to_k.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape)),
               net.controlnet_cond_embedding.register_forward_pre_hook(lambda m, args: conds.append(args[0].clone()))]
    try:
        run(instantid, face_image=str(astronaut))
    finally:
        for handle in handles:
            handle.remove()
    shape, cond = seen[0], conds[0]
    assert len(seen) == STEPS and tuple(shape) == (2, 16, 64)  # CFG batch x 16 identity tokens, no text
    face = analyzer.get_face(astronaut)
    expected = np.asarray(draw_kps((128, 128), face.kps * 128 / 512), dtype=np.float32) / 255
    assert np.abs(cond[1].permute(1, 2, 0).numpy() - expected).max() < 1e-6


@pytest.mark.slow
def test_pose_from_another_photo_and_explicit_kps(instantid, analyzer, astronaut, tmp_path):
    mirrored = ImageOps.mirror(Image.open(astronaut))
    own = run(instantid, face_image=str(astronaut))
    posed = run(instantid, face_image=str(astronaut), kps_image=mirrored)
    assert differ(own, posed)
    kps = analyzer.get_face(mirrored).kps * 128 / 512
    assert_close(posed, run(instantid, face_image=str(astronaut), face_kps=kps))
    # The identity comes from face_image only: the same embedding gives the same image.
    emb = torch.from_numpy(analyzer.get_face(astronaut).raw_embedding)
    assert_close(posed, run(instantid, id_embeds=emb, kps_image=mirrored))
    assert abs(float(emb.norm()) - analyzer.get_face(astronaut).embedding_norm) < 1e-3


def test_identity_scale_and_identitynet_scale_matter(instantid):
    base = run(instantid, id_embeds=embedding(1), face_kps=KPS)
    assert differ(base, run(instantid, id_embeds=embedding(1), face_kps=KPS, id_scale=0.0))
    assert differ(base, run(instantid, id_embeds=embedding(1), face_kps=KPS, controlnet_conditioning_scale=0.0))
    assert differ(base, run(instantid, id_embeds=embedding(2), face_kps=KPS))


def test_multi_controlnet(xl, instantid):
    from diffusers import UNet2DConditionModel

    second = tiny_identitynet(UNet2DConditionModel.from_pretrained(xl.base, subfolder="unet"), seed=7)
    multi = IDStableDiffusionXLPipeline.from_pipe(instantid, controlnet=[instantid.controlnet, second])
    assert multi.id_projection is instantid.id_projection  # from_pipe keeps the identity adapter
    multi.set_progress_bar_config(disable=True)
    seen = []
    handle = second.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    pose = Image.new("RGB", (128, 128), (200, 10, 10))
    try:
        both = run(multi, id_embeds=embedding(1), face_kps=KPS, image=pose, controlnet_conditioning_scale=[0.8, 0.8])
    finally:
        handle.remove()
    assert seen and set(seen) == {77}  # the second ControlNet sees the text, not the identity
    only_identitynet = run(multi, id_embeds=embedding(1), face_kps=KPS, image=pose, controlnet_conditioning_scale=[0.8, 0.0])
    assert differ(both, only_identitynet)
    assert np.abs(only_identitynet - run(instantid, id_embeds=embedding(1), face_kps=KPS)).max() < 1e-5
    with pytest.raises(ValueError, match="one image per extra ControlNet"):
        run(multi, id_embeds=embedding(1), face_kps=KPS)


def test_lora_with_its_scheduler(tmp_path, xl, instantid):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = IDStableDiffusionXLPipeline.from_pretrained(xl.base)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(donor.unet))
    pipe = IDStableDiffusionXLPipeline.from_pipe(instantid)
    pipe.set_progress_bar_config(disable=True)
    before = run(pipe, id_embeds=embedding(1), face_kps=KPS)
    pipe.load_lora_weights(str(tmp_path), adapter_name="lcm")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    with_lora = run(pipe, id_embeds=embedding(1), face_kps=KPS, guidance_scale=1.0)
    assert differ(before, with_lora) and np.isfinite(with_lora).all()
    assert differ(with_lora, run(pipe, id_embeds=embedding(1), face_kps=KPS, guidance_scale=1.0, id_scale=0.0))
    pipe.unload_lora_weights()


@pytest.mark.slow
def test_cpu_offload_and_half_precision(xl, instantid):
    reference = run(instantid, id_embeds=embedding(1), face_kps=KPS)
    offloaded = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
    offloaded.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload(device="cpu")  # the accelerate hooks; CPU stands in for the GPU here
    assert np.abs(run(offloaded, id_embeds=embedding(1), face_kps=KPS) - reference).max() < 1e-5
    for dtype, tolerance in ((torch.float16, 0.02), (torch.bfloat16, 0.1)):
        half = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter, dtype=dtype), dtype=dtype)
        half.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
        half.set_progress_bar_config(disable=True)
        assert half.id_projection.dtype == dtype
        images = run(half, id_embeds=embedding(1), face_kps=KPS)
        assert np.isfinite(images).all() and np.abs(images - reference).max() < tolerance


def test_faceid_sdxl_parity_with_diffusers(tmp_path, xl):
    from diffusers import StableDiffusionXLPipeline

    ours = IDStableDiffusionXLPipeline.from_pretrained(xl.base)
    ours.set_progress_bar_config(disable=True)
    path = tmp_path / "ip-adapter-faceid_sdxl.safetensors"
    save_adapter_checkpoint(random_faceid_state_dict(ours.unet, seed=4), str(path))
    ours.load_identity_adapter(str(path))
    reference = StableDiffusionXLPipeline.from_pretrained(xl.base)
    reference.set_progress_bar_config(disable=True)
    reference.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    reference.set_ip_adapter_scale(0.6)
    emb = embedding(3, scale=1.0)
    expected = run(reference, ip_adapter_image_embeds=[torch.stack([torch.zeros(512), emb])[:, None]])
    got = run(ours, id_embeds=emb, id_scale=0.6)
    assert np.abs(expected - got).max() <= 1e-5
    assert differ(got, run(ours, id_embeds=embedding(5, scale=1.0), id_scale=0.6), 1e-2)
    # No ControlNet and no size: plain SDXL's loop renders at the base model's native size.
    native = ours.unet.config.sample_size * ours.vae_scale_factor
    assert ours("a person", id_embeds=emb, num_inference_steps=1).images[0].size == (native, native)
    # Keypoints drive IdentityNet, which FaceID-SDXL does not have: refused, as on the command line.
    with pytest.raises(ValueError, match="kps_image= and face_kps= drive InstantID's IdentityNet"):
        run(ours, id_embeds=emb, kps_image="pose.jpg")


def test_instantid_renders_at_the_native_resolution_not_the_photo_size(instantid, astronaut):
    """A 4:3 photo of 1536x1152 pixels gives a native-size 4:3 image (multiples of 8 latents),
    not a 1536x1152 one; the keypoints move with it."""
    photo = Image.new("RGB", (1536, 1152), (128, 128, 128))
    photo.paste(Image.open(astronaut).convert("RGB"), (512, 320))
    native = instantid.unet.config.sample_size * instantid.vae_scale_factor
    multiple = 8 * instantid.vae_scale_factor
    expected = (native, int(round(native * 0.75 / multiple)) * multiple)
    assert instantid.output_size((1536, 1152), None, None) == expected
    assert instantid.output_size((1536, 1152), None, 256) == (256, 192)  # one side given: the aspect is kept
    assert instantid.output_size((1152, 1536), 256, None) == (192, 256)
    assert instantid.output_size((1536, 1152), 72, 96) == (96, 72)  # both given: as given
    image = instantid("a person", id_embeds=embedding(0), kps_image=photo, num_inference_steps=1).images[0]
    assert image.size == expected
    condition = instantid.kps_condition(np.array([[700, 420], [800, 420], [750, 480], [710, 530], [790, 530]]),
                                        (1536, 1152), None, None)
    assert condition.size == expected and np.asarray(condition).any()


def test_mismatched_adapters(tmp_path, xl, preset, instantid):
    sd15 = IDStableDiffusionPipeline.from_pretrained(preset.base)
    with pytest.raises(CheckpointError, match="InstantID adapter, made for SDXL"):
        sd15.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    state = random_faceid_state_dict(instantid.unet)
    state["image_proj"]["norm.weight"], state["image_proj"]["norm.bias"] = torch.ones(768), torch.zeros(768)
    state["image_proj"]["proj.2.weight"] = torch.zeros(3072, 1024)
    save_adapter_checkpoint(state, str(tmp_path / "faceid_sd15.bin"))
    with pytest.raises(CheckpointError, match="faceid_sd15.bin is an adapter for SD1.5"):
        instantid.load_identity_adapter(str(tmp_path / "faceid_sd15.bin"))


@pytest.mark.slow
def test_cli_sdxl(tmp_path, xl, astronaut, capsys):
    from idgen.apps.cli import main

    out = tmp_path / "xl.png"
    pose = tmp_path / "pose.jpg"
    ImageOps.mirror(Image.open(astronaut)).save(pose)
    assert main(["generate", "--base", "tiny-sdxl", "--face", str(astronaut), "--kps-image", str(pose),
                 "--prompt", "a person", "--out", str(out), "--overwrite", "--steps", "2", "--height", "128", "--width", "128",
                 "--no-watermark"]) == 0
    meta = Image.open(out).text
    assert meta["method"] == "instantid" and meta["guidance"] == "5.0" and meta["id_scale"] == "0.8"
    # The CLI feeds InstantID the raw (un-normalised) embedding, as the Python API does.
    from idgen import FaceAnalyzer

    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
    pipe.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    pipe.set_face_analyzer(FaceAnalyzer(xl.face_pack))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a person", face_image=str(astronaut), kps_image=str(pose), id_scale=0.8, num_inference_steps=2, height=128,
                    width=128, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    assert main(["generate", "--face", str(astronaut), "--kps-image", str(pose), "--prompt", "p", "--out", str(out), "--overwrite"]) == 2
    assert "--kps-image needs InstantID" in capsys.readouterr().err


def test_plain_sdxl_loop_finds_everything_it_reads_on_our_pipeline(xl):
    """Without IdentityNet, ``StableDiffusionXLPipeline.__call__`` runs on our ControlNet-class
    pipeline: every ``self.`` attribute that loop reads exists here, and the ones we set for it
    (``default_sample_size``, ``check_inputs``, ``guidance_rescale``) are plain SDXL's in kind."""
    import inspect
    import re

    from diffusers import StableDiffusionXLPipeline

    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=None)
    source = inspect.getsource(StableDiffusionXLPipeline.__call__).split('"""', 2)[2]  # the code, not the docstring
    read = set(re.findall(r"self\.(\w+)", source)) - set(re.findall(r"self\.(\w+) = ", source))  # the loop sets these
    assert {"default_sample_size", "check_inputs", "guidance_rescale"} <= read
    missing = sorted(name for name in read if not (hasattr(type(pipe), name) or hasattr(pipe, name)))
    assert missing == []
    assert pipe.default_sample_size == pipe.unet.config.sample_size and pipe.guidance_rescale == 0.0
    assert pipe.check_inputs.__func__ is IDStableDiffusionXLPipeline.check_inputs
