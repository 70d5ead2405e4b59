import os

import numpy as np
import pytest
import torch

from idgen import CheckpointError, IDStableDiffusionPipeline, ModelNotFoundError
from idgen.adapters import save_adapter_checkpoint
from idgen.testing.presets import random_faceid_state_dict

from .conftest import FP32_ATOL, assert_close, embedding, write_lora

STEPS = 3


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", "a photo of a person")
    kwargs.setdefault("output_type", "np")
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.slow
def test_parity_with_diffusers_faceid(preset, pipe):
    """The same official-format checkpoint in diffusers' load_ip_adapter and in idgen gives
    the same images: our proof of compatibility with the format."""
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(preset.base)
    reference.set_progress_bar_config(disable=True)
    reference.load_ip_adapter(
        os.path.dirname(preset.adapter), subfolder="", weight_name=os.path.basename(preset.adapter),
        image_encoder_folder=None,
    )
    reference.set_ip_adapter_scale(0.7)
    emb = embedding(1)
    embeds = torch.stack([torch.zeros(512), emb])[:, None]  # (negative, positive) x 1 image x 512
    for output_type in ("latent", "np"):
        expected = run(reference, ip_adapter_image_embeds=[embeds], output_type=output_type).images
        ours = run(pipe, id_embeds=emb, id_scale=0.7, output_type=output_type).images
        # idgen fuses the LoRA into the weights, diffusers runs it beside them: fp32 rounding apart
        assert np.abs(np.asarray(expected) - np.asarray(ours)).max() <= FP32_ATOL
    # ... and the identity matters: another identity changes the image.
    other = run(pipe, id_embeds=embedding(2), id_scale=0.7).images
    assert np.abs(other - ours).max() > 1e-2


@pytest.mark.slow
def test_id_scale_and_lora_each_change_the_output(pipe):
    base = run(pipe, id_embeds=embedding(1)).images
    assert np.abs(run(pipe, id_embeds=embedding(1), id_scale=0.0).images - base).max() > 1e-2
    pipe.set_adapters(["faceid"], [0.0])
    try:
        assert np.abs(run(pipe, id_embeds=embedding(1)).images - base).max() > 1e-3
    finally:
        pipe.set_adapters(["faceid"], [1.0])
    assert_close(run(pipe, id_embeds=embedding(1)).images, base)  # now through peft, no longer fused


@pytest.mark.slow
def test_face_image_equals_its_embedding(pipe, analyzer, astronaut):
    from_photo = run(pipe, face_image=str(astronaut)).images
    emb = torch.from_numpy(analyzer.get_face(astronaut).embedding)
    assert_close(from_photo, run(pipe, id_embeds=emb).images)
    negative = run(pipe, face_image=str(astronaut), negative_id_embeds=embedding(5)).images
    assert np.abs(negative - from_photo).max() > 1e-3


@pytest.mark.slow
def test_batches_and_per_prompt_identities(pipe):
    ids = torch.stack([embedding(1), embedding(2)])
    batch = run(pipe, prompt=["a photo", "a photo"], id_embeds=ids).images
    assert batch.shape[0] == 2 and np.abs(batch[0] - batch[1]).max() > 1e-2
    many = run(pipe, id_embeds=embedding(1), num_images_per_prompt=3, output_type="latent").images
    assert many.shape == (3, 4, 16, 16)
    with pytest.raises(ValueError, match="3 identities for 2 prompts"):
        run(pipe, prompt=["a", "b"], id_embeds=torch.randn(3, 512))


def test_callback_and_size(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return tensors

    image = run(pipe, id_embeds=embedding(1), height=64, width=96, callback_on_step_end=callback, output_type="pil").images[0]
    assert image.size == (96, 64)
    assert seen == [(i, (1, 4, 8, 12)) for i in range(STEPS)]


def test_adapter_loads_without_notices_that_do_not_apply(preset):
    """diffusers' "no LoRA keys for CLIPTextModel" (FaceID's LoRA is the UNet's) and "kept in
    float32: []" (there are no such modules) are dropped; its other warnings still show."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever DIFFUSERS_VERBOSITY said
    try:
        fresh = IDStableDiffusionPipeline.from_pretrained(preset.base)
        fresh.load_identity_adapter(preset.adapter)
        fresh.unet.to(dtype=torch.float32)
        logging.getLogger("diffusers.models.modeling_utils").warning("another warning")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [record.getMessage() for record in records]
    assert not [m for m in messages if "No LoRA keys associated" in m or "kept in float32: []" in m], messages
    assert "another warning" in messages


def test_bad_calls(preset, pipe):
    with pytest.raises(ValueError, match="exactly one"):
        run(pipe)
    with pytest.raises(ValueError, match="512-d"):
        run(pipe, id_embeds=torch.randn(128))
    fresh = IDStableDiffusionPipeline.from_pretrained(preset.base)
    with pytest.raises(RuntimeError, match="load_identity_adapter"):
        run(fresh, id_embeds=embedding(1))


def test_mismatched_adapters_are_refused(tmp_path, preset, pipe):
    state = random_faceid_state_dict(pipe.unet)
    sdxl = {"image_proj": {k: v for k, v in state["image_proj"].items()}, "ip_adapter": state["ip_adapter"]}
    sdxl["image_proj"]["norm.weight"] = torch.ones(2048)
    sdxl["image_proj"]["norm.bias"] = torch.zeros(2048)
    sdxl["image_proj"]["proj.2.weight"] = torch.zeros(8192, 1024)
    save_adapter_checkpoint(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="sdxl.safetensors is an adapter for SDXL"):
        pipe.load_identity_adapter(str(tmp_path / "sdxl.safetensors"))

    extra = {"image_proj": state["image_proj"], "ip_adapter": dict(state["ip_adapter"])}
    extra["ip_adapter"]["99.to_k_ip.weight"] = torch.zeros(1)
    save_adapter_checkpoint(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="layer 99 but the UNet has 14"):
        pipe.load_identity_adapter(str(tmp_path / "extra.safetensors"))

    unknown = {"image_proj": state["image_proj"], "ip_adapter": {**state["ip_adapter"], "1.to_x.weight": torch.zeros(1)}}
    save_adapter_checkpoint(unknown, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected key ip_adapter.1.to_x.weight"):
        pipe.load_identity_adapter(str(tmp_path / "unknown.safetensors"))

    with pytest.raises(ModelNotFoundError, match="could not get"):
        pipe.load_identity_adapter("h94/IP-Adapter-FaceID", weight_name="ip-adapter-faceid_sd15.bin", local_files_only=True)
    # The pipeline still works with the adapter it had.
    assert len(pipe.identity_adapter.layers) == 7
    run(pipe, id_embeds=embedding(1))


def test_reloading_fuses_once_and_keeps_other_loras_active(tmp_path, preset):
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter)
    once = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_identity_adapter(preset.adapter)
    assert not pipe.get_active_adapters()  # fused: no peft adapter
    assert all(torch.equal(v, once[k]) for k, v in pipe.unet.state_dict().items())  # fused once, not twice

    pipe.load_lora_weights(write_lora(pipe.unet, tmp_path / "style.safetensors"), adapter_name="style")
    assert sorted(pipe.get_active_adapters()) == ["faceid", "style"]
    pipe.load_identity_adapter(preset.adapter)
    assert sorted(pipe.get_active_adapters()) == ["faceid", "style"]
