"""A call's identity belongs to the call: threads sharing a UNet, diffusers' caches and offloading
with an identity loaded, and the hooks left on the models outside a call."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig, FluxPipeline, StableDiffusionPipeline, TaylorSeerCacheConfig

from idgen.adapters.context import HOOK_NAME
from idgen.errors import IdentityInputError
from idgen.pipelines import IDFluxPipeline, IDStableDiffusionPipeline
from idgen.testing.presets import get_preset

from .conftest import FP32_ATOL, assert_close, embedding
from .test_flux import _load as _flux

STEPS = 3


def _own_scheduler(pipe):
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


def _per_thread(pipe) -> dict:
    """What each thread's pipeline needs of its own: a scheduler (it steps) and the tokenizers
    (transformers' fast tokenizers set their padding on every call, so one shared by two threads
    can pad one thread's prompt as the other asked)."""
    own = {"scheduler": _own_scheduler(pipe)}
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            own[name] = copy.deepcopy(getattr(pipe, name))
    return own


def _sd(pipe, seed: int | None, **kwargs) -> np.ndarray:
    identity = {} if seed is None else {"id_embeds": embedding(seed)}
    return pipe("a photo of a person", num_inference_steps=STEPS, output_type="np",
                generator=torch.Generator().manual_seed(0), **identity, **kwargs).images


@pytest.mark.slow
def test_threads_sharing_a_unet_get_their_own_identity(pipe):
    """Two idgen pipelines sharing one UNet and adapter (each with its own scheduler and tokenizer,
    ``_per_thread``) and a plain diffusers pipeline sharing them too, called at once from three
    threads, three times: each image equals the one the same call gives alone."""
    other = IDStableDiffusionPipeline.from_pipe(pipe, **_per_thread(pipe))
    plain = StableDiffusionPipeline(**{**pipe.components, **_per_thread(pipe)})
    plain.set_progress_bar_config(disable=True)
    jobs = {"a": lambda: _sd(pipe, 1), "b": lambda: _sd(other, 2), "plain": lambda: _sd(plain, None)}
    alone = {name: job() for name, job in jobs.items()}
    assert np.abs(alone["a"] - alone["b"]).max() > 1e-2 and np.abs(alone["a"] - alone["plain"]).max() > 1e-2
    for _ in range(3):
        start, results, errors = threading.Barrier(len(jobs)), {}, []

        def work(name, start=start, results=results, errors=errors):
            try:
                start.wait()
                results[name] = jobs[name]()
            except Exception as err:  # reported below, with the thread's name
                errors.append((name, err))

        threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert {name: float(np.abs(results[name] - alone[name]).max()) for name in jobs} == \
            pytest.approx({name: 0.0 for name in jobs}, abs=FP32_ATOL)


def test_outside_a_call_the_unet_runs_plain(pipe):
    """The hooks stay on the UNet between calls and pass every forward through: a UNet call outside
    a pipeline call equals the same call with the hooks taken off."""
    unet = pipe.unet
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    assert unet.get_submodule(pipe.identity_adapter.names[0]).to_q._diffusers_hook.get_hook(HOOK_NAME)
    with torch.no_grad():
        hooked = unet(sample, 10, text).sample
        pipe.identity_adapter.detach()
        try:
            bare = unet(sample, 10, text).sample
        finally:
            pipe.identity_adapter.attach(unet)
    assert torch.equal(hooked, bare)


@pytest.mark.parametrize("offload", ["block_level", "leaf_level"])
@pytest.mark.slow
def test_group_offloading_keeps_the_identity(preset, offload):
    """diffusers' group offloading (onto the same CPU here) with an identity: the image is the one
    without offloading."""
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter)
    pipe.set_progress_bar_config(disable=True)
    expected = _sd(pipe, 1)
    options = {"num_blocks_per_group": 1} if offload == "block_level" else {}
    pipe.unet.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload,
                                   **options)
    assert_close(_sd(pipe, 1), expected)
    assert np.abs(_sd(pipe, 1) - _sd(pipe, 2)).max() > 1e-2  # the identity still acts


def test_layerwise_casting_keeps_the_identity(preset):
    """diffusers' layerwise casting (weights stored in bfloat16, computed in float32) with an
    identity: the identity acts, and the image stays within bfloat16's rounding of the uncast one."""
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter)
    pipe.set_progress_bar_config(disable=True)
    expected = _sd(pipe, 1)
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    cast = _sd(pipe, 1)
    assert np.abs(cast - expected).max() < 0.1  # bfloat16 keeps 8 bits: ~0.4% per weight
    assert np.abs(cast - _sd(pipe, 2)).max() > 1e-2


def test_sd_unets_take_no_diffusers_cache(pipe):
    """diffusers' caches (first-block, TaylorSeer, MagCache, FasterCache) are for its transformers;
    a UNet has no enable_cache, so nothing can skip the identity there."""
    assert not hasattr(pipe.unet, "enable_cache")


# ---------------------------------------------------------------- FLUX
@pytest.fixture(scope="module")
def flux_presets(cache):
    return get_preset("tiny-flux", root=str(cache)), get_preset("tiny-infiniteyou", root=str(cache))


def _flux_run(pipe, **kwargs) -> torch.Tensor:
    return pipe("a photo of a person", num_inference_steps=4, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


class _Counter:
    """Counts forwards of modules: each PuLID cross-attention, and a first submodule of each block
    it follows (which runs only when the block is computed, not skipped by a cache)."""

    def __init__(self, pipe):
        adapter = pipe.identity_adapter
        names = adapter.positions(pipe.transformer)
        self.cross, self.blocks = 0, 0
        self.handles = [ca.register_forward_hook(self._count("cross")) for ca in adapter.pulid_ca]
        for name in names:
            block = pipe.transformer.get_submodule(name)
            first = block.norm1 if hasattr(block, "norm1") else block.norm
            self.handles.append(first.register_forward_hook(self._count("blocks")))

    def _count(self, what):
        def hook(module, args, output):
            setattr(self, what, getattr(self, what) + 1)
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.slow
def test_first_block_cache_skips_pulid_with_its_blocks(flux_presets, analyzer, astronaut):
    """With diffusers' first-block cache on PuLID-FLUX, PuLID's cross-attention runs exactly when
    the block it follows is computed (and is restored with the cached output otherwise); with a
    threshold that never skips, the image is the uncached one."""
    pipe = _flux(flux_presets[0], analyzer)
    photo = {"face_image": str(astronaut)}
    uncached = _flux_run(pipe, **photo)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e-12))
    try:
        torch.testing.assert_close(_flux_run(pipe, **photo), uncached, atol=FP32_ATOL, rtol=0)
    finally:
        pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # skips every step it may
    counter = _Counter(pipe)
    try:
        _flux_run(pipe, **photo)
    finally:
        counter.close()
        pipe.transformer.disable_cache()
    positions = len(pipe.identity_adapter.pulid_ca)
    assert counter.cross == counter.blocks < 4 * positions  # some blocks were skipped, their identity with them


@pytest.mark.slow
def test_a_cache_enabled_before_loading_is_refused(flux_presets, analyzer, astronaut):
    """A block cache registered before PuLID's hooks would sit inside them and skip the blocks but
    not the identity: refused in one line, which says to enable it after loading."""
    preset = flux_presets[0]
    pipe = IDFluxPipeline.from_pretrained(preset.base)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match="enable the cache"):
        pipe.load_identity_adapter(preset.adapter, image_encoder=preset.image_encoder, face_parser=preset.face_parser)
    assert pipe.identity_adapter is None and not any(  # nothing of it stayed
        "idgen_identity" in block._diffusers_hook.hooks for block in pipe.transformer.transformer_blocks)
    pipe.transformer.disable_cache()
    pipe.load_identity_adapter(preset.adapter, image_encoder=preset.image_encoder, face_parser=preset.face_parser)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))  # the order that works
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    _flux_run(pipe, face_image=str(astronaut))


@pytest.mark.slow
def test_taylorseer_runs_pulid_every_step(flux_presets, analyzer, astronaut):
    """TaylorSeer caches attention inside the blocks, never the blocks: PuLID's cross-attention
    runs after every block call, and the identity still changes the image."""
    pipe = _flux(flux_presets[0], analyzer)
    photo = {"face_image": str(astronaut)}
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
    counter = _Counter(pipe)
    try:
        with_identity = _flux_run(pipe, **photo)
        without = _flux_run(pipe, **photo, id_scale=0.0)
    finally:
        counter.close()
        pipe.transformer.disable_cache()
    assert counter.cross == 4 * len(pipe.identity_adapter.pulid_ca)  # the first call's: 4 steps
    assert (with_identity - without).abs().max() > 1e-3


def test_infiniteyou_refuses_a_block_cache(flux_presets, analyzer):
    pipe = _flux(flux_presets[1], analyzer)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with pytest.raises(ValueError, match="disable_cache"):
            _flux_run(pipe, id_embeds=embedding(1))
    finally:
        pipe.transformer.disable_cache()


@pytest.mark.slow
def test_flux_threads_and_plain_pipeline(flux_presets, analyzer, astronaut):
    """A PuLID-FLUX call and a plain FluxPipeline sharing the transformer, at once in two threads:
    each equals its call alone."""
    pipe = _flux(flux_presets[0], analyzer)
    plain = FluxPipeline(**{**pipe.components, **_per_thread(pipe)})
    plain.set_progress_bar_config(disable=True)
    jobs = {"id": lambda: _flux_run(pipe, face_image=str(astronaut)), "plain": lambda: _flux_run(plain)}
    alone = {name: job() for name, job in jobs.items()}
    assert (alone["id"] - alone["plain"]).abs().max() > 1e-3
    results, start = {}, threading.Barrier(len(jobs))

    def work(name):
        start.wait()
        results[name] = jobs[name]()

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in jobs:
        torch.testing.assert_close(results[name], alone[name], atol=FP32_ATOL, rtol=0)


# ---------------------------------------------------------------- the identity lives on the UNet
def _fresh(preset) -> IDStableDiffusionPipeline:
    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_round_trip_through_a_plain_pipeline_keeps_the_identity(preset, caplog):
    """ID pipeline -> diffusers img2img (from_pipe) -> ID pipeline (from_pipe): the identity comes
    back from the UNet; loading it again replaces it (FaceID's LoRA is never fused twice); a plain
    pipeline sharing the UNet is told once that the LoRA is fused, and after unloading it runs the
    base model."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = _fresh(preset)
    base_plain = _sd(StableDiffusionPipeline(**pipe.components), None)
    pipe.load_identity_adapter(preset.adapter)
    expected = _sd(pipe, 1)
    middle = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    back = IDStableDiffusionPipeline.from_pipe(middle)
    assert back.identity_adapter is pipe.identity_adapter
    assert_close(_sd(back, 1), expected)
    back.load_identity_adapter(preset.adapter)  # the same adapter again: replaced, not fused on top
    assert_close(_sd(back, 1), expected)
    assert_close(_sd(pipe, 1), expected)  # the first pipeline shares it all
    plain = StableDiffusionPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING", logger="idgen"):
        fused = _sd(plain, None)
        _sd(plain, None)
    notices = [r for r in caplog.records if "holds FaceID's LoRA" in r.getMessage()]
    assert len(notices) == 1 and "unload_identity_adapter()" in notices[0].getMessage()
    assert np.abs(fused - base_plain).max() > 1e-3  # the fused LoRA is in the UNet, as the notice says
    back.unload_identity_adapter()
    assert pipe.identity_adapter is None  # gone for every pipeline sharing the UNet
    assert_close(_sd(plain, None), base_plain)


def _second_adapter(pipe) -> dict:
    from idgen.testing.presets import random_faceid_state_dict

    return random_faceid_state_dict(pipe.unet, seed=7, lora_rank=4)


def _unet_state(pipe) -> dict:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize("stage", ["build", "lora plan", "hooks", "fuse", "peft lora"])
def test_a_failed_load_leaves_the_pipeline_as_it_was(preset, monkeypatch, stage):
    """Each step of loading an adapter made to fail in turn: the error comes through, and the
    pipeline keeps its adapter, its UNet's weights and its images exactly."""
    import idgen.pipelines.identity as identity
    from idgen.adapters import IdentityAdapter

    pipe = _fresh(preset)
    pipe.load_identity_adapter(preset.adapter)
    adapter, weights, image = pipe.identity_adapter, _unet_state(pipe), _sd(pipe, 1)
    new = _second_adapter(pipe)

    def fail(*args, **kwargs):
        raise RuntimeError(f"{stage} failed")

    fuse_lora = stage != "peft lora"
    if stage == "build":
        monkeypatch.setattr(identity, "build_identity_adapter", fail)
    elif stage == "lora plan":
        monkeypatch.setattr(identity, "faceid_lora_layers", fail)
    elif stage == "hooks":
        original = IdentityAdapter.attach
        monkeypatch.setattr(IdentityAdapter, "attach",
                            lambda self, *a, **k: fail() if self is not adapter else original(self, *a, **k))
    elif stage == "fuse":  # the new LoRA's third layer fails, after two were fused
        import idgen.adapters.lora as lora

        weight, calls = lora._weight, []

        def third_fails(model, path):
            calls.append(path)
            return fail() if len(calls) == 3 else weight(model, path)

        class FailingFuse(identity.FusedLoRA):
            def __init__(self, model, layers, scale=1.0):
                if layers is not old_lora:
                    monkeypatch.setattr(lora, "_weight", third_fails)
                super().__init__(model, layers, scale)
                monkeypatch.setattr(lora, "_weight", weight)

        old_lora = pipe._id_lora
        monkeypatch.setattr(identity, "FusedLoRA", FailingFuse)
    else:
        monkeypatch.setattr(IDStableDiffusionPipeline, "_load_id_lora", fail)
    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        pipe.load_identity_adapter(new, weight_name="second.bin", fuse_lora=fuse_lora)
    assert pipe.identity_adapter is adapter and pipe._fused_id_lora is not None
    after = _unet_state(pipe)
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert np.array_equal(_sd(pipe, 1), image)
    monkeypatch.undo()
    pipe.load_identity_adapter(new, weight_name="second.bin")  # and the pipeline still loads
    assert np.abs(_sd(pipe, 1) - image).max() > 1e-3


def test_malformed_state_dicts_name_what_is_missing(pipe):
    from idgen.errors import CheckpointError

    image_proj = _second_adapter(pipe)["image_proj"]
    with pytest.raises(CheckpointError, match="mine.bin has no 'ip_adapter'"):
        pipe.load_identity_adapter({"image_proj": image_proj}, weight_name="mine.bin")
    with pytest.raises(CheckpointError, match="no 'image_proj' and no 'ip_adapter'"):
        pipe.load_identity_adapter({})


# ---------------------------------------------------------------- batches equal single runs
def _two_people(astronaut):
    """Two face photos whose faces differ in identity and pose: the astronaut, and mirrored."""
    from PIL import Image, ImageOps

    photo = Image.open(astronaut).convert("RGB")
    return [photo, ImageOps.mirror(photo)]


def _batch_and_singles(pipe, photos, prompts, **kwargs):
    """One call with a photo per prompt and per-sample generators, and each prompt run alone."""
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    batch = pipe(prompts, face_image=photos, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
                 **kwargs).images
    singles = [pipe(prompt, face_image=photo, generator=torch.Generator().manual_seed(i), **kwargs).images[0]
               for i, (prompt, photo) in enumerate(zip(prompts, photos))]
    return np.asarray(batch), np.stack(singles)


@pytest.mark.slow
def test_instantid_batch_takes_each_photos_pose(cache, analyzer, astronaut):
    """InstantID with one photo per prompt: each sample takes its own photo's identity and its own
    photo's keypoints for IdentityNet, as run alone; a kps_image list poses each prompt too."""
    from idgen import load_identitynet
    from idgen.pipelines import IDStableDiffusionXLPipeline
    from idgen.testing.presets import INSTANTID_FILE

    xl = get_preset("tiny-sdxl", root=str(cache))
    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
    pipe.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    photos, prompts = _two_people(astronaut), ["a photo of a person"] * 2
    batch, singles = _batch_and_singles(pipe, photos, prompts, height=128, width=128)
    assert_close(batch, singles)
    assert np.abs(singles[0] - singles[1]).max() > 1e-2
    posed = pipe(prompts, face_image=photos[0], kps_image=photos, num_inference_steps=2, output_type="np", height=128,
                 width=128, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert_close(posed[1], pipe(prompts[1], face_image=photos[0], kps_image=photos[1], num_inference_steps=2,
                                output_type="np", height=128, width=128,
                                generator=torch.Generator().manual_seed(1)).images[0])
    with pytest.raises(IdentityInputError, match="3 poses for 2 prompts"):
        pipe(prompts, face_image=photos[0], kps_image=photos + photos[:1], num_inference_steps=1, height=128, width=128)


@pytest.mark.slow
def test_pulid_batch_equals_single_runs(cache, analyzer, astronaut):
    from idgen.pipelines import IDStableDiffusionXLPipeline

    preset = get_preset("tiny-pulid", root=str(cache))
    pipe = IDStableDiffusionXLPipeline.from_pretrained(preset.base, controlnet=None)
    pipe.load_identity_adapter(preset.adapter, image_encoder=preset.image_encoder, face_parser=preset.face_parser)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    batch, singles = _batch_and_singles(pipe, _two_people(astronaut), ["a photo of a person"] * 2, height=64, width=64)
    assert_close(batch, singles)
    assert np.abs(singles[0] - singles[1]).max() > 1e-3


def test_photomaker_batch_equals_single_runs(cache, analyzer, astronaut, tmp_path):
    """PhotoMaker's identity is one person's, merged into every prompt's trigger word: a batch of
    prompts equals each prompt run alone."""
    from idgen.pipelines import IDPhotoMakerPipeline
    from idgen.testing.presets import random_photomaker_state_dict

    xl = get_preset("tiny-sdxl", root=str(cache))
    pipe = IDPhotoMakerPipeline.from_pretrained(xl.base)
    path = tmp_path / "photomaker-v2.bin"
    torch.save(random_photomaker_state_dict(pipe.unet), path)
    pipe.load_identity_adapter(str(path))
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a man img", "a painting of a man img smiling"]
    kwargs = dict(num_inference_steps=2, start_merge_step=0, output_type="np", height=64, width=64)
    batch = pipe(prompts, face_image=str(astronaut), generator=[torch.Generator().manual_seed(i) for i in range(2)],
                 **kwargs).images
    singles = [pipe(p, face_image=str(astronaut), generator=torch.Generator().manual_seed(i), **kwargs).images[0]
               for i, p in enumerate(prompts)]
    assert_close(np.asarray(batch), np.stack(singles))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pulid-flux", "infiniteyou"])
def test_flux_batch_equals_single_runs(flux_presets, analyzer, astronaut, method):
    pipe = _flux(flux_presets[method == "infiniteyou"], analyzer)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
    photos, prompts = _two_people(astronaut), ["a photo of a person"] * 2
    batch = pipe(prompts, face_image=photos, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                 **kwargs).images
    singles = [pipe(prompt, face_image=photo, generator=torch.Generator().manual_seed(i), **kwargs).images[0]
               for i, (prompt, photo) in enumerate(zip(prompts, photos))]
    torch.testing.assert_close(batch, torch.stack(singles), atol=FP32_ATOL, rtol=0)
    assert (singles[0] - singles[1]).abs().max() > 1e-3
