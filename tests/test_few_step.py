"""Few-step generation: style/speed LoRAs (--lora), schedulers by name (--scheduler), exact
timesteps (--timesteps) and a compiled UNet (--compile), on every identity method."""

import numpy as np
import pytest
import torch
from PIL import Image

from idgen import start_session
from idgen.apps.cli import main
from idgen.apps.loras import LoRASpec, parse_lora
from idgen.apps.schedulers import SCHEDULERS, make_scheduler, scheduler_spec
from idgen.errors import IDGenError

from .conftest import FP32_ATOL, assert_close, embedding, write_lora

DMD2_TIMESTEPS = [999, 749, 499, 249]
RANK = 4


def _generate(session, pipe, face, **extra):
    call = dict(session.call_kwargs("a photo of a person"), id_embeds=session.identity([face]), output_type="np",
                generator=torch.Generator().manual_seed(0))
    if session.identitynet:
        call.update(kps_image=face)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**{**call, **extra}).images


def _session(base, **options):
    return start_session(base=base, scheduler="lcm", timesteps=DMD2_TIMESTEPS, guidance=1.0, height=64, width=64,
                         **options)


def _write_lora(base: str, path, **kwargs) -> str:
    """A random LoRA for the UNet of tiny preset ``base``."""
    from diffusers import UNet2DConditionModel

    from idgen.testing.presets import get_preset

    unet = UNet2DConditionModel.from_pretrained(get_preset(base).base, subfolder="unet")
    return write_lora(unet, path, RANK, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny", "tiny-faceid-sdxl", "tiny-sdxl", "tiny-arc2face"])
def test_lora_is_fused_at_its_weight_beside_the_identity(base, cache, astronaut, tmp_path):
    """A kohya LoRA (alpha = rank/2) at weight 1.4, fused with the identity's own LoRA, gives the
    image of the same weights in peft format at weight 0.7, run unfused through peft."""
    plain = _session(base)
    reference_pipe = plain.load()
    without = _generate(plain, reference_pipe, astronaut)
    kohya = write_lora(reference_pipe.unet, tmp_path / "kohya.safetensors", RANK, fmt="kohya", alpha=RANK / 2, conv=True)
    peft = write_lora(reference_pipe.unet, tmp_path / "peft.safetensors", RANK, fmt="peft", conv=True)

    session = _session(base, lora=[f"{kohya}:1.4"])
    assert session.loras == [LoRASpec(str(tmp_path), "kohya.safetensors", 1.4)]
    pipe = session.load()
    wrapped = [module for name, module in pipe.unet.named_modules() if name.endswith("to_q") and hasattr(module, "merged")]
    assert wrapped and all(module.merged for module in wrapped)  # fused: no LoRA products per step
    fused = _generate(session, pipe, astronaut)

    if plain.adapter_file is not None:  # the same adapter in peft, unfused, as diffusers runs it
        reference_pipe.load_identity_adapter(plain.adapter_file, fuse_lora=False)
    reference_pipe.load_lora_weights(peft, adapter_name="style")
    names = list(reference_pipe.unet.peft_config)
    reference_pipe.set_adapters(names, [0.7 if name == "style" else 1.0 for name in names])
    reference = _generate(plain, reference_pipe, astronaut)

    assert_close(fused, reference, FP32_ATOL)
    assert np.abs(fused - without).max() > 1e-2  # the LoRA acted


@pytest.mark.slow
def test_cli_few_step_recipe_is_recorded(cache, astronaut, tmp_path, capsys):
    """The DMD2 recipe on SDXL InstantID, from the command line: LCM scheduler, 4 fixed timesteps,
    no guidance; the image records the LoRA, sampler and timesteps."""
    lora = _write_lora("tiny-sdxl", tmp_path / "dmd2.safetensors", fmt="kohya")
    common = ["generate", "--base", "tiny-sdxl", "--face", str(astronaut), "--prompt", "p", "--height", "64",
              "--width", "64", "--guidance", "0", "--scheduler", "LCM", "--timesteps", "999,749,499,249"]
    assert main([*common, "--lora", f"{lora}:0.8", "--out", str(tmp_path / "dmd2.png")]) == 0, capsys.readouterr().err
    assert "4/4" in capsys.readouterr().err  # four steps
    meta = Image.open(tmp_path / "dmd2.png").text
    assert meta["loras"] == f"{lora}:0.8" and meta["timesteps"] == "999,749,499,249" and meta["steps"] == "4"
    assert meta["scheduler"] == "LCMScheduler (LCM)" and meta["guidance"] == "0.0" and meta["method"] == "instantid"
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert "loras" not in Image.open(tmp_path / "plain.png").text
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "dmd2.png")), np.asarray(Image.open(tmp_path / "plain.png")))


@pytest.mark.slow
@pytest.mark.parametrize("base, mode", [("tiny", "full"), ("tiny-sdxl", "full"), ("tiny", "regional")])
def test_compiled_models_give_the_eager_image_without_recompiling(base, mode, cache, astronaut, tmp_path, monkeypatch):
    """--compile full: one graph for the UNet (and IdentityNet) with identity attention and a fused
    LoRA; --compile regional: one graph for the UNet's repeated transformer block, reused by each
    of them. Another identity reuses the graphs; the image is the eager one."""
    import torch._dynamo

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "aot_eager"}))  # no C compiler
    torch._dynamo.reset()
    lora = [f"{_write_lora(base, tmp_path / 'style.safetensors')}:0.5"]
    eager_session = _session(base, lora=lora)
    eager_pipe = eager_session.load()
    eager = _generate(eager_session, eager_pipe, astronaut)
    other_id = embedding(1, float(eager_session.identity([astronaut]).norm()))
    eager_other = _generate(eager_session, eager_pipe, astronaut, id_embeds=other_id)
    session = _session(base, lora=lora, compile=mode)
    pipe = session.load()
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in pipe.unet._repeated_blocks]
    if mode == "full":
        assert pipe.unet._compiled_call_impl is not None
    else:
        assert pipe.unet._compiled_call_impl is None and blocks and all(b._compiled_call_impl for b in blocks)
    if base == "tiny-sdxl":  # InstantID: IdentityNet too
        assert pipe.controlnet._compiled_call_impl is not None
    compiled = _generate(session, pipe, astronaut)
    assert_close(compiled, eager, FP32_ATOL)
    with torch._dynamo.config.patch(error_on_recompile=True):
        other = _generate(session, pipe, astronaut, id_embeds=other_id)
    assert_close(other, eager_other, FP32_ATOL)  # the new identity acted, not the one compiled first
    assert np.abs(eager_other - eager).max() > 3 * FP32_ATOL
    torch._dynamo.reset()


@pytest.mark.parametrize("name, cls, overrides", [
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("dpm++_2m_sde_karras", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("LCM", "LCMScheduler", {}),
    ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
])
def test_scheduler_names(name, cls, overrides):
    assert scheduler_spec(name)[0] == cls
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction")
    scheduler = make_scheduler(name, config)
    assert type(scheduler).__name__ == cls
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "scaled_linear"
    assert all(scheduler.config[key] == value for key, value in overrides.items())


def test_every_named_scheduler_builds_and_lightning_spacing():
    config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for name in SCHEDULERS:
        make_scheduler(name, config).set_timesteps(4)
    lightning = make_scheduler("euler-trailing", config)
    lightning.set_timesteps(4)
    assert lightning.timesteps.round().long().tolist() == DMD2_TIMESTEPS  # SDXL-Lightning's 4 steps
    with pytest.raises(IDGenError, match="not a scheduler idgen knows: use one of ddim"):
        scheduler_spec("fastest")


def test_lora_specs(tmp_path):
    file = tmp_path / "style.safetensors"
    file.write_bytes(b"")
    assert parse_lora(f"{file}:0.6") == LoRASpec(str(tmp_path), "style.safetensors", 0.6)
    assert parse_lora(str(tmp_path)) == LoRASpec(str(tmp_path), "style.safetensors", 1.0)  # its only file
    assert parse_lora("latent-consistency/lcm-lora-sdv1-5") == LoRASpec("latent-consistency/lcm-lora-sdv1-5")
    assert parse_lora("ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors:1") == LoRASpec(
        "ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors", 1.0)
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(IDGenError, match="expected one .safetensors LoRA file in this folder"):
        parse_lora(str(tmp_path))
    for bad in ("loras/missing.safetensors", "./x", "style:nan"):
        with pytest.raises(IDGenError, match="--lora"):
            parse_lora(bad)
