"""idgen pipelines keep the contract diffusers holds its own pipelines to, with an identity loaded:
save/load, unload, batching, dtypes, callbacks, attention processors, custom schedules, signatures."""

import inspect
import os
import stat

import numpy as np
import pytest
import torch

from idgen import IDStableDiffusionPipeline, IDStableDiffusionXLPipeline
from idgen.adapters import save_adapter_checkpoint
from idgen.testing.presets import get_preset, random_faceid_state_dict

from .conftest import assert_close, embedding

STEPS = 3


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", "a photo of a person")
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def fresh(preset):
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl(cache):
    return get_preset("tiny-sdxl", root=str(cache))


@pytest.fixture(scope="module")
def faceid_xl_file(tmp_path_factory, xl):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(xl.base, subfolder="unet")
    path = tmp_path_factory.mktemp("faceid-xl") / "ip-adapter-faceid_sdxl.safetensors"
    save_adapter_checkpoint(random_faceid_state_dict(unet, seed=4), str(path))
    return str(path)


def faceid_xl(xl, faceid_xl_file, **kwargs):
    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, **kwargs)
    pipe.load_identity_adapter(faceid_xl_file)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_save_pretrained_writes_a_plain_base_and_unload_restores_it(tmp_path, preset):
    from diffusers import StableDiffusionPipeline

    pipe = fresh(preset)
    plain_keys = set(pipe.unet.state_dict())
    plain = run(StableDiffusionPipeline.from_pipe(pipe), prompt="a photo")
    pipe.load_identity_adapter(preset.adapter)
    with_id = run(pipe, id_embeds=embedding(1))
    pipe.save_pretrained(tmp_path / "saved")
    assert run(pipe, id_embeds=embedding(1)).tobytes() == with_id.tobytes()  # the adapter is back after saving

    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert set(reloaded.unet.state_dict()) == plain_keys
    assert all(p.device.type == "cpu" for p in reloaded.unet.parameters())  # nothing left on "meta"
    assert run(reloaded, prompt="a photo").tobytes() == plain.tobytes()

    pipe.unload_identity_adapter()
    assert set(pipe.unet.state_dict()) == plain_keys and not getattr(pipe.unet, "peft_config", {})
    assert run(StableDiffusionPipeline.from_pipe(pipe), prompt="a photo").tobytes() == plain.tobytes()
    with pytest.raises(RuntimeError, match="load_identity_adapter"):
        run(pipe, id_embeds=embedding(1))


def test_batch_and_num_images_per_prompt_equal_single_runs(pipe):
    size = 64 // pipe.vae_scale_factor
    shape = (4, pipe.unet.config.in_channels, size, size)  # 2 prompts x 2 images
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ids = torch.stack([embedding(1), embedding(2)])
    both = run(pipe, prompt=["a", "b"], id_embeds=ids, num_images_per_prompt=2, latents=latents, height=64, width=64)
    assert both.shape[0] == 4
    for i, prompt in enumerate(["a", "b"]):
        single = run(pipe, prompt=prompt, id_embeds=ids[i], num_images_per_prompt=2, latents=latents[2 * i : 2 * i + 2],
                     height=64, width=64)
        assert_close(both[2 * i : 2 * i + 2], single)


def test_callbacks_get_the_pipeline_and_its_tensors(pipe, xl, faceid_xl_file):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((p, p.num_timesteps, sorted(tensors)))
        return tensors

    run(pipe, id_embeds=embedding(1), callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [s[0] for s in seen] == [pipe] * STEPS and seen[0][1] == STEPS
    assert seen[0][2] == ["latents", "prompt_embeds"]

    seen.clear()
    xl_pipe = faceid_xl(xl, faceid_xl_file)
    inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    run(xl_pipe, id_embeds=embedding(1), height=64, width=64, callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=inputs)
    assert [s[0] for s in seen] == [xl_pipe] * STEPS and seen[0][1] == STEPS and seen[0][2] == sorted(inputs)


def test_sdxl_callback_tensor_inputs_follow_the_loop(xl, faceid_xl_file):
    """``pipe._callback_tensor_inputs`` lists what the loop that runs the call can hand a callback:
    plain SDXL's without a ControlNet (no ``image``), the ControlNet loop's with one; img2img and
    inpainting too. Asking for all of them works."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from idgen import IDStableDiffusionXLImg2ImgPipeline

    pipe = faceid_xl(xl, faceid_xl_file)
    assert pipe._callback_tensor_inputs == StableDiffusionXLPipeline._callback_tensor_inputs
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append(sorted(tensors))
        return tensors

    run(pipe, id_embeds=embedding(1), height=64, width=64, callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    assert seen[0] == sorted(pipe._callback_tensor_inputs)
    img2img = IDStableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    assert img2img._callback_tensor_inputs == StableDiffusionXLImg2ImgPipeline._callback_tensor_inputs
    seen.clear()
    run(img2img, id_embeds=embedding(1), image=np.full((64, 64, 3), 0.5, np.float32), strength=0.7,
        callback_on_step_end=callback, callback_on_step_end_tensor_inputs=img2img._callback_tensor_inputs)
    assert seen and seen[0] == sorted(img2img._callback_tensor_inputs)
    from idgen import load_identitynet

    instantid = IDStableDiffusionXLPipeline(**{**pipe.components, "controlnet": load_identitynet(xl.adapter)})
    assert instantid._callback_tensor_inputs == StableDiffusionXLControlNetPipeline._callback_tensor_inputs


def test_sdxl_of_text_encoders_alone(xl):
    """diffusers builds a pipeline without its UNet to encode prompts in isolation: so does idgen."""
    full = IDStableDiffusionXLPipeline.from_pretrained(xl.base)
    encoders = IDStableDiffusionXLPipeline(**{**full.components, "unet": None, "vae": None})
    assert encoders.identity_adapter is None
    embeds = encoders.encode_prompt("a photo of a person", device=torch.device("cpu"))[0]
    assert torch.equal(embeds, full.encode_prompt("a photo of a person", device=torch.device("cpu"))[0])


def test_sdxl_img2img_and_inpaint_take_any_vae_and_the_callers_image_processor(xl, faceid_xl_file):
    """SDXL img2img and inpainting run their diffusers loop with the pipeline's own modules, a VAE
    of another class (TAESD) included, and with the image processor the caller set."""
    from diffusers import AutoencoderTiny
    from diffusers.image_processor import VaeImageProcessor

    from idgen import IDStableDiffusionXLImg2ImgPipeline, IDStableDiffusionXLInpaintPipeline

    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    photo = np.full((64, 64, 3), 0.5, np.float32)
    photo[16:48, 16:48] = 0.9
    for cls, extra in ((IDStableDiffusionXLImg2ImgPipeline, {}),
                       (IDStableDiffusionXLInpaintPipeline, {"mask_image": np.ones((64, 64), np.float32)})):
        pipe = cls.from_pipe(faceid_xl(xl, faceid_xl_file, vae=taesd))
        image = run(pipe, id_embeds=embedding(1), image=photo, strength=0.7, **extra)
        assert len(image) == 1 and np.isfinite(image).all()  # (the tiny TAESD's own scale sets the size)
    img2img = IDStableDiffusionXLImg2ImgPipeline.from_pipe(faceid_xl(xl, faceid_xl_file))
    default = run(img2img, id_embeds=embedding(1), image=photo, strength=0.5, output_type="latent")
    img2img.image_processor = VaeImageProcessor(vae_scale_factor=img2img.vae_scale_factor, do_normalize=False)
    own = run(img2img, id_embeds=embedding(1), image=photo, strength=0.5, output_type="latent")
    assert (own - default).abs().max() > 1e-3  # the caller's processor read the photo


def test_sdxl_without_controlnet_keeps_dtype_and_takes_any_vae(xl, faceid_xl_file):
    from diffusers import AutoencoderTiny

    pipe = faceid_xl(xl, faceid_xl_file, dtype=torch.bfloat16)
    run(pipe, id_embeds=embedding(1), height=64, width=64)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.bfloat16}

    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    tiny_vae = faceid_xl(xl, faceid_xl_file, vae=taesd)
    image = run(tiny_vae, id_embeds=embedding(1), height=64, width=64)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("change", ["fuse_qkv_projections", "attention_slicing", "set_attn_processor"])
def test_identity_survives_attention_changes(tmp_path, preset, change):
    from diffusers.models.attention_processor import AttnProcessor

    pipe = fresh(preset)
    pipe.load_identity_adapter(preset.adapter)
    reference = run(pipe, id_embeds=embedding(1))
    plain = run(pipe, id_embeds=embedding(1), id_scale=0.0)
    if change == "fuse_qkv_projections":
        pipe.fuse_qkv_projections()
    elif change == "attention_slicing":
        pipe.enable_attention_slicing(1)
    else:
        pipe.unet.set_attn_processor(AttnProcessor())
    changed = run(pipe, id_embeds=embedding(1))
    assert_close(changed, reference)
    assert np.abs(changed - plain).max() > 1e-2  # the identity still acts
    if change == "fuse_qkv_projections":  # the FaceID LoRA is merged: taking it out now would bake it in
        for action in (lambda: pipe.save_pretrained(tmp_path), pipe.unload_identity_adapter):
            with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):
                action()
        assert not os.listdir(tmp_path)
        pipe.unfuse_qkv_projections()
        assert_close(run(pipe, id_embeds=embedding(1)), reference)
        pipe.unload_identity_adapter()


def test_custom_timesteps_and_sigmas_follow_the_real_schedule(pipe):
    from diffusers import EulerDiscreteScheduler

    ts = [999, 666, 333, 1]
    default = pipe.scheduler
    try:
        pipe.scheduler = EulerDiscreteScheduler.from_config(default.config)
        with_ts = run(pipe, id_embeds=embedding(1), num_inference_steps=None, timesteps=ts)
        assert np.isfinite(with_ts).all()
        # Window over the real 4-step schedule: start 0.5 leaves the identity out of steps 0 and 1.
        late = run(pipe, id_embeds=embedding(1), num_inference_steps=None, timesteps=ts, id_guidance_start=0.5)
        assert np.abs(late - with_ts).max() > 1e-3
        with_sigmas = run(pipe, id_embeds=embedding(1), num_inference_steps=None, sigmas=[14.6, 5.0, 1.0, 0.1])
        assert np.isfinite(with_sigmas).all()
    finally:
        pipe.scheduler = default


def test_output_files_follow_the_umask(tmp_path):
    from idgen.files import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(str(tmp_path / "out.png")) as staging:
            open(staging, "wb").write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out.png").st_mode) == 0o644


def test_other_pipelines_sharing_the_unet_run_it_plain(preset, pipe):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    init = Image.new("RGB", (64, 64), (120, 90, 60))
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    shared = run(img2img, image=init, strength=0.9)
    pipe.identity_adapter.detach()  # no identity hooks at all
    try:
        assert run(img2img, image=init, strength=0.9).tobytes() == shared.tobytes()
    finally:
        pipe.identity_adapter.attach(pipe.unet)


@pytest.mark.slow
def test_unload_lora_weights_keeps_the_identity_lora(tmp_path, preset):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = fresh(preset)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(donor.unet))

    pipe = fresh(preset)
    pipe.load_identity_adapter(preset.adapter)
    before = run(pipe, id_embeds=embedding(1))
    pipe.load_lora_weights(str(tmp_path), adapter_name="style")
    assert np.abs(run(pipe, id_embeds=embedding(1)) - before).max() > 1e-3
    pipe.unload_lora_weights()
    assert "faceid" in pipe.unet.peft_config and "style" not in pipe.unet.peft_config
    assert_close(run(pipe, id_embeds=embedding(1)), before)


def test_sdxl_refiner_layout_loads_and_takes_aesthetic_scores(xl, tmp_path):
    """A refiner-shaped SDXL folder (no first text encoder, aesthetic-score time ids,
    ``requires_aesthetics_score: true``) loads into the img2img pipeline, takes a FaceID adapter,
    and its loop reads ``aesthetic_score``; ``denoising_start`` picks up where a base model stopped."""
    from diffusers import UNet2DConditionModel

    from idgen import IDStableDiffusionXLImg2ImgPipeline

    base = IDStableDiffusionXLPipeline.from_pretrained(xl.base)
    encoder = base.text_encoder_2
    config = {**base.unet.config, "cross_attention_dim": encoder.config.hidden_size,
              "projection_class_embeddings_input_dim": base.unet.config.addition_time_embed_dim * 5
              + encoder.config.projection_dim}
    torch.manual_seed(0)
    refiner = IDStableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=encoder, tokenizer=None, tokenizer_2=base.tokenizer_2,
        unet=UNet2DConditionModel.from_config(config), scheduler=base.scheduler, requires_aesthetics_score=True)
    refiner.save_pretrained(tmp_path / "refiner")
    refiner = IDStableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "refiner")
    assert refiner.config.requires_aesthetics_score and refiner.text_encoder is None
    refiner.load_identity_adapter(random_faceid_state_dict(refiner.unet, seed=5), weight_name="faceid-refiner.bin")
    refiner.set_progress_bar_config(disable=True)
    photo = np.full((64, 64, 3), 0.5, np.float32)
    kwargs = dict(id_embeds=embedding(1), image=photo, strength=0.6, output_type="latent")
    high, low = (run(refiner, aesthetic_score=score, **kwargs) for score in (6.0, 2.0))
    assert (high - low).abs().max() > 1e-4  # the aesthetic score conditions the refiner's UNet
    assert not torch.equal(run(refiner, denoising_start=0.5, **kwargs), high)


def test_sdxl_inpaint_takes_diffusers_inpaint_arguments(xl, faceid_xl_file):
    """SDXL inpainting has diffusers' mask processor and takes ``masked_image_latents`` and
    ``padding_mask_crop`` (the repainted crop pasted back: outside it the photo stays)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from idgen import IDStableDiffusionXLInpaintPipeline

    pipe = IDStableDiffusionXLInpaintPipeline.from_pipe(faceid_xl(xl, faceid_xl_file))
    reference = StableDiffusionXLInpaintPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"})
    assert pipe.mask_processor.config == reference.mask_processor.config
    photo = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64), np.float32)
    mask[24:40, 24:40] = 1.0
    from PIL import Image

    pil_photo, pil_mask = Image.fromarray((photo * 255).round().astype(np.uint8)), Image.fromarray((mask * 255).astype(np.uint8))
    cropped = run(pipe, id_embeds=embedding(1), image=pil_photo, mask_image=pil_mask, padding_mask_crop=4,
                  output_type="pil")[0]
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    difference = np.abs(np.asarray(cropped, np.int16) - np.asarray(pil_photo, np.int16))[outside]
    assert difference.max() <= 2  # pasted back into the photo (8-bit rounding)
    image = pipe.image_processor.preprocess(photo)
    masked = image * (pipe.mask_processor.preprocess(mask) < 0.5)
    latents = pipe.vae.encode(masked).latent_dist.mode() * pipe.vae.config.scaling_factor
    given = run(pipe, id_embeds=embedding(1), image=photo, mask_image=mask, masked_image_latents=latents,
                output_type="latent")
    assert given.shape[0] == 1 and torch.isfinite(given).all()


def _ip_adapter_state_dict(unet, clip_dim: int = 16, tokens: int = 4, seed: int = 0) -> dict:
    """A random IP-Adapter (base layout: a linear projection to ``tokens`` tokens) for ``unet``."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    state = {"image_proj": {"proj.weight": torch.randn(cross * tokens, clip_dim, generator=generator) * 0.2,
                            "proj.bias": torch.zeros(cross * tokens), "norm.weight": torch.ones(cross),
                            "norm.bias": torch.zeros(cross)}, "ip_adapter": {}}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_out[0].out_features
            for part in ("to_k_ip", "to_v_ip"):
                state["ip_adapter"][f"{index}.{part}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.3
    return state


@pytest.mark.parametrize("family", ["sd15-faceid", "sdxl-instantid"])
def test_diffusers_ip_adapter_beside_the_identity(preset, xl, family):
    """diffusers' IP-Adapter (a style or image reference) loads beside the identity adapter and
    both act, each at its own scale: IP-Adapter scale 0 is the identity alone (to float32
    rounding); either scale changes the image without the other; unloading it gives the identity
    alone exactly."""
    from idgen import load_identitynet
    from idgen.testing.presets import INSTANTID_FILE

    if family == "sd15-faceid":
        pipe = fresh(preset)
        pipe.load_identity_adapter(preset.adapter)
        identity, size = embedding(1), {}
    else:
        pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
        pipe.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
        pipe.set_progress_bar_config(disable=True)
        identity = embedding(1, 20.0)
        size = dict(height=64, width=64, face_kps=np.array([[20.0, 25], [44, 25], [32, 37], [23, 49], [41, 49]]))
    alone = run(pipe, id_embeds=identity, **size)
    with pytest.raises(ValueError, match="none is loaded"):
        run(pipe, id_embeds=identity, ip_adapter_image_embeds=[torch.zeros(2, 1, 16)], **size)
    pipe.load_ip_adapter(_ip_adapter_state_dict(pipe.unet), subfolder=None, weight_name=None, image_encoder_folder=None)
    reference = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(2))
    embeds = [torch.cat([torch.zeros_like(reference), reference])]  # unconditional (zeros), then the reference
    pipe.set_ip_adapter_scale(0.0)  # diffusers' IP processor computes the text attention: another code path
    assert_close(run(pipe, id_embeds=identity, ip_adapter_image_embeds=embeds, **size), alone)
    pipe.set_ip_adapter_scale(1.0)
    both = run(pipe, id_embeds=identity, ip_adapter_image_embeds=embeds, **size)
    style_only = run(pipe, id_embeds=identity, id_scale=0.0, ip_adapter_image_embeds=embeds, **size)
    assert np.abs(both - alone).max() > 1e-3 and np.abs(both - style_only).max() > 1e-3
    pipe.unload_ip_adapter()
    assert np.array_equal(run(pipe, id_embeds=identity, **size), alone)


#: Each idgen pipeline: the diffusers pipeline whose arguments and defaults its ``__call__`` takes,
#: the ones whose argument names it takes too (its ControlNet loop), and the defaults it sets on
#: purpose (its method's own).
STANDS_FOR = {
    "IDStableDiffusionPipeline": ("StableDiffusionPipeline", (), {}),
    "IDStableDiffusionImg2ImgPipeline": ("StableDiffusionImg2ImgPipeline", (), {}),
    "IDStableDiffusionInpaintPipeline": ("StableDiffusionInpaintPipeline", (), {}),
    "IDStableDiffusionXLPipeline": ("StableDiffusionXLPipeline", ("StableDiffusionXLControlNetPipeline",),
                                    {"num_inference_steps": 30}),
    "IDStableDiffusionXLImg2ImgPipeline": ("StableDiffusionXLImg2ImgPipeline",
                                           ("StableDiffusionXLControlNetImg2ImgPipeline",), {}),
    "IDStableDiffusionXLInpaintPipeline": ("StableDiffusionXLInpaintPipeline",
                                           ("StableDiffusionXLControlNetInpaintPipeline",), {}),
    "IDFluxPipeline": ("FluxPipeline", (), {}),
    "IDArc2FacePipeline": ("StableDiffusionPipeline", (), {"num_inference_steps": 25, "guidance_scale": 3.0}),
    "IDPhotoMakerPipeline": ("StableDiffusionXLPipeline", (), {}),
}


@pytest.mark.parametrize("ours", list(STANDS_FOR))
def test_signatures_spell_out_every_diffusers_argument(ours):
    """Every argument of the diffusers pipeline an idgen pipeline stands for is in its ``__call__``,
    with diffusers' default unless the method sets its own, and nothing hides behind ``**kwargs``
    (diffusers' signature tests read it)."""
    import diffusers

    from idgen import pipelines

    parent, others, own = STANDS_FOR[ours]
    mine = inspect.signature(getattr(pipelines, ours).__call__).parameters

    def arguments(name: str) -> dict[str, inspect.Parameter]:
        parameters = inspect.signature(getattr(diffusers, name).__call__).parameters
        return {key: p for key, p in parameters.items() if p.kind is not p.VAR_KEYWORD}

    assert not [p for p in mine.values() if p.kind is p.VAR_KEYWORD]
    theirs = arguments(parent)
    assert {name: mine[name].default for name in theirs if name in mine} == \
        {name: own.get(name, p.default) for name, p in theirs.items()}
    for other in others:
        assert set(arguments(other)) - set(mine) == set()
