"""torch.compile: the identity attention traces into the UNet's graph with no break
(``fullgraph=True``), and a call with another identity, ``id_scale`` (per block) or step window
reuses that graph instead of compiling again."""

import numpy as np
import pytest
import torch

from idgen import IDStableDiffusionPipeline, IDStableDiffusionXLPipeline, load_identitynet
from idgen.testing.presets import INSTANTID_FILE, get_preset

from .conftest import assert_close, embedding

KPS = np.array([[40.0, 50.0], [88.0, 50.0], [64.0, 75.0], [46.0, 98.0], [82.0, 98.0]])
#: Two calls that differ in everything a user changes between images: identity, per-block scale,
#: step window. AOTAutograd's tracer (``aot_eager``) catches what inductor would, without compiling C++.
CALLS = ({"seed": 1}, {"seed": 2, "id_scale": {"down": 0.0, "up": 0.7}, "id_guidance_start": 0.3})


def compiled_calls(pipe, run) -> tuple[list, list]:
    """Images of ``CALLS`` eager and with the UNet compiled; asserts one graph, no recompile."""
    from torch._dynamo.utils import counters

    eager = [run(pipe, **call) for call in CALLS]
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="aot_eager")
    try:
        compiled = [run(pipe, **CALLS[0])]
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled.append(run(pipe, **CALLS[1]))
    finally:
        pipe.unet = pipe.unet._orig_mod
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    return eager, compiled


@pytest.mark.slow
@pytest.mark.parametrize("fused_qkv", [False, True], ids=["plain", "fused_qkv"])
def test_sd15_faceid_compiles_to_one_graph(preset, fused_qkv):
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter)
    pipe.set_progress_bar_config(disable=True)
    if fused_qkv:
        pipe.fuse_qkv_projections()

    def run(pipe, seed, **kwargs):
        return pipe("a photo", id_embeds=embedding(seed), num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    eager, compiled = compiled_calls(pipe, run)
    for a, b in zip(eager, compiled):
        assert_close(a, b)
    assert np.abs(compiled[0] - compiled[1]).max() > 1e-2  # the second call's settings acted


@pytest.mark.slow
def test_sdxl_instantid_compiles_to_one_graph(cache):
    xl = get_preset("tiny-sdxl", root=str(cache))
    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
    pipe.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    pipe.set_progress_bar_config(disable=True)

    def run(pipe, seed, **kwargs):
        return pipe("a photo", id_embeds=embedding(seed, 20.0), face_kps=KPS, height=128, width=128,
                    num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0),
                    **kwargs).images

    eager, compiled = compiled_calls(pipe, run)
    for a, b in zip(eager, compiled):
        assert_close(a, b)
