"""FaceID's LoRA is fused into the UNet's weights (steps cost what the base model's do) and
unfused exactly: the original weights come back bit for bit, in any dtype."""

import numpy as np
import pytest
import torch

from idgen import IDStableDiffusionPipeline

from .conftest import FP32_ATOL, assert_close, embedding

#: Images from the fused and the peft path (same weights, other rounding), by dtype: fp32 agrees to
#: rounding; in half precision each of the 3 steps adds a few units of the dtype's epsilon
#: (float16 9.8e-4, bfloat16 7.8e-3); measured 5.4e-3 and 3.9e-2 on the tiny preset.
TOLERANCE = {torch.float32: FP32_ATOL, torch.bfloat16: 8e-2, torch.float16: 2e-2}


def run(pipe, **kwargs):
    return pipe("a photo", id_embeds=embedding(1), num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights, under peft's wrappers if there are any."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.slow
def test_fused_equals_peft_and_unfuses_exactly(preset, dtype):
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    original = base_weights(pipe.unet)
    pipe.load_identity_adapter(preset.adapter)
    assert not getattr(pipe.unet, "peft_config", {})  # fused: no LoRA layers run at all
    fused = base_weights(pipe.unet)
    changed = [k for k in original if not torch.equal(original[k], fused[k])]
    assert len(changed) == 4 * len(pipe.unet.attn_processors)  # to_q, to_k, to_v, to_out.0 of every attention
    fused_image = run(pipe)

    pipe.set_adapters(["faceid"], [1.0])  # weighing it moves it into peft: originals back, exactly
    assert list(pipe.unet.peft_config) == ["faceid"]
    assert all(torch.equal(v, original[k]) for k, v in base_weights(pipe.unet).items())
    peft_image = run(pipe)
    assert_close(fused_image, peft_image, TOLERANCE[dtype])
    assert np.abs(run(pipe, id_scale=0.0) - peft_image).max() > 2 * TOLERANCE[dtype]  # the identity acts

    pipe.unload_identity_adapter()
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())


def test_dtype_change_after_fusing_unfuses_to_the_cast_base(preset):
    plain = IDStableDiffusionPipeline.from_pretrained(preset.base).to(torch.float16)
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter)
    pipe.to(torch.float16)
    pipe.unload_identity_adapter()
    expected = plain.unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pipe.unet.state_dict().items())


def test_unfused_loading_for_training(preset):
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter, fuse_lora=False)
    assert pipe.get_active_adapters() == ["faceid"] and pipe._fused_id_lora is None
