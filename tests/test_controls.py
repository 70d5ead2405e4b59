"""Identity controls: several photos, one identity per sample, negative identity, scales,
step window and identity K/V computed once per call."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from idgen import NoFaceError
from idgen.adapters import IdentityAttention
from idgen.adapters.context import current
from idgen.pipelines.identity import layer_id_scales

from .conftest import assert_close, embedding

STEPS = 3


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", "a photo of a person")
    kwargs.setdefault("output_type", "np")
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(num_inference_steps=STEPS, generator=generator, **kwargs).images


def differ(a, b, by=1e-3):
    return np.abs(np.asarray(a) - np.asarray(b)).max() > by


@pytest.fixture(scope="module")
def mirrored(astronaut):
    return ImageOps.mirror(Image.open(astronaut))


@pytest.mark.slow
def test_several_photos_of_one_person(pipe, analyzer, astronaut, mirrored):
    photos = [str(astronaut), mirrored]
    a, b = analyzer.get_face(astronaut).embedding, analyzer.get_face(mirrored).embedding
    assert np.abs(a - b).max() > 1e-3  # the two photos give different vectors
    mean = (a + b) / np.linalg.norm(a + b)
    assert_close(run(pipe, face_image=photos), run(pipe, id_embeds=torch.from_numpy(mean)))
    weighted = run(pipe, face_image=photos, face_weights=[1.0, 0.0])
    assert_close(weighted, run(pipe, face_image=str(astronaut)))
    with pytest.raises(NoFaceError, match="face image 1"):
        run(pipe, face_image=[str(astronaut), Image.new("RGB", (200, 200))])


def test_one_identity_per_sample_equals_single_runs(pipe):
    ids = torch.stack([embedding(1), embedding(2)])
    generators = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batch = run(pipe, prompt=["a photo", "a photo"], id_embeds=ids, generator=generators)
    single = [run(pipe, prompt="a photo", id_embeds=ids[i], seed=10 + i)[0] for i in range(2)]
    for i in range(2):
        assert np.abs(batch[i] - single[i]).max() < 1e-4
    assert differ(batch[0], batch[1], 1e-2)
    # num_images_per_prompt repeats each prompt's own identity.
    four = run(pipe, prompt=["a photo", "a photo"], id_embeds=ids, num_images_per_prompt=2, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in (10, 10, 11, 11)])
    assert torch.allclose(four[0], four[1]) and torch.allclose(four[2], four[3]) and not torch.allclose(four[0], four[2])


def test_one_photo_per_prompt(pipe, analyzer, astronaut, mirrored):
    images = run(pipe, prompt=["a", "b"], face_image=[str(astronaut), mirrored])
    ids = torch.from_numpy(np.stack([analyzer.get_face(astronaut).embedding, analyzer.get_face(mirrored).embedding]))
    assert_close(images, run(pipe, prompt=["a", "b"], id_embeds=ids))


def test_negative_identity(pipe, analyzer, astronaut, mirrored):
    plain = run(pipe, id_embeds=embedding(1))
    away = run(pipe, id_embeds=embedding(1), negative_face_image=mirrored)
    assert differ(plain, away)
    as_embeds = run(pipe, id_embeds=embedding(1), negative_id_embeds=torch.from_numpy(analyzer.get_face(mirrored).embedding))
    assert_close(away, as_embeds)
    with pytest.raises(ValueError, match="at most one"):
        run(pipe, id_embeds=embedding(1), negative_face_image=mirrored, negative_id_embeds=embedding(2))


def test_scale_dicts(pipe):
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2",
             "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    assert list(layer_id_scales(names, {"up": 0.5, "up_blocks.1.attentions.1": 0.9}).values()) == [0.0, 0.0, 0.5, 0.9]
    with pytest.raises(ValueError, match="matches no identity layer"):
        layer_id_scales(names, {"side": 1.0})
    for bad in (float("nan"), -0.5, {"up": float("inf")}, {"down": -1.0}):  # a black image, or an unsaid inversion
        with pytest.raises(ValueError, match="identity strengths are finite and not negative"):
            layer_id_scales(names, bad)

    full = run(pipe, id_embeds=embedding(1))
    assert np.array_equal(run(pipe, id_embeds=embedding(1), id_scale={"down": 1, "mid": 1, "up": 1}), full)
    none = run(pipe, id_embeds=embedding(1), id_scale=0.0)
    assert np.array_equal(run(pipe, id_embeds=embedding(1), id_scale={"down": 0, "mid": 0, "up": 0}), none)
    up_only = run(pipe, id_embeds=embedding(1), id_scale={"up": 1.0})
    assert differ(up_only, full) and differ(up_only, none)
    real = pipe.identity_adapter.names
    scales = layer_id_scales(real, {"up_blocks.0": 0.25})
    assert {n for n, v in scales.items() if v == 0.25} == {n for n in real if n.startswith("up_blocks.0.")}


def test_step_window(pipe, monkeypatch):
    seen = []
    original = IdentityAttention.attend

    def recording(self, call, name, *args, **kwargs):
        seen.append(float(call.layers[name][2]))
        return original(self, call, name, *args, **kwargs)

    monkeypatch.setattr(IdentityAttention, "attend", recording)
    user_steps = []

    def user_callback(p, step, timestep, tensors):
        user_steps.append(step)
        return tensors

    windowed = run(pipe, id_embeds=embedding(1), id_scale=0.7, id_guidance_start=0.34, callback_on_step_end=user_callback)
    per_step = np.array(seen).reshape(STEPS, -1)  # one call per identity layer per step
    assert (per_step[:2] == 0).all() and np.allclose(per_step[2], 0.7)  # a float32 gate
    assert user_steps == [0, 1, 2]
    assert np.array_equal(run(pipe, id_embeds=embedding(1), id_scale=0.7, id_guidance_start=0.0, id_guidance_end=1.0),
                          run(pipe, id_embeds=embedding(1), id_scale=0.7))
    assert differ(windowed, run(pipe, id_embeds=embedding(1), id_scale=0.7))
    # A window that holds no whole step is the same as no identity at all.
    assert np.array_equal(run(pipe, id_embeds=embedding(1), id_guidance_start=0.99),
                          run(pipe, id_embeds=embedding(1), id_scale=0.0))
    with pytest.raises(ValueError, match="id_guidance_start"):
        run(pipe, id_embeds=embedding(1), id_guidance_start=0.5, id_guidance_end=0.5)


def test_identity_kv_computed_once_per_call(pipe):
    layers = list(pipe.identity_adapter.layers)
    calls = []
    hooks = [layer.to_k_id.register_forward_hook(lambda *a: calls.append(1)) for layer in layers]
    try:
        run(pipe, id_embeds=embedding(1))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == len(layers) == 7  # once per layer, not once per layer per step
    # nothing outlives the call: the layers hold only their weights, and no identity is open
    assert all(set(vars(layer)) & {"key", "value", "scale", "regions"} == set() for layer in layers)
    assert current(pipe.identity_adapter) is None
