"""Memory and speed tiers (idgen.apps.tiers) on the tiny presets: each quantization that runs on a
CPU, each offload, the FLUX caches, and --memory auto's choice; the image stays within each tier's
rounding of the plain one, and the identity still acts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from idgen.apps.cli import main
from idgen.apps.session import start_session
from idgen.apps.tiers import GIB, Tier, choose_tier, component_sizes
from idgen.testing.gguf_files import write_gguf
from idgen.testing.presets import TINY_PRESETS

from .conftest import FP32_ATOL

#: Largest pixel difference (images in [0, 1]) each tier may make, and why. int8 weight-only keeps
#: each output channel to 1/254 of its range, float8 e4m3 each weight to 1/16 of itself (3
#: mantissa bits), GGUF Q8_0 each block of 32 to 1/254 of its range; the tiny presets' random
#: weights amplify that less than tenfold over 2 steps (measured: int8 0.005, fp8 0.06, Q8_0 0.005).
#: Offloading moves weights and does no arithmetic: float32 noise only.
TOLERANCE = {"int8": 0.05, "fp8": 0.2, "gguf": 0.05, "offload": FP32_ATOL}


def _image(session, pipe, face, **call):
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(session.call_kwargs("a photo of a person"), face_image=str(face), output_type="np",
                  generator=torch.Generator().manual_seed(0))
    return pipe(**{**kwargs, **call}).images


def _tier_and_plain(base, face, **tier):
    plain_session = start_session(base=base, steps=2, device="cpu")
    plain = _image(plain_session, plain_session.load(), face)
    session = start_session(base=base, steps=2, device="cpu", **tier)
    pipe = session.load()
    return session, pipe, plain


@pytest.mark.parametrize("base", ["tiny", "tiny-flux"])
@pytest.mark.parametrize("tier, tolerance", [
    ({"quantize": "int8"}, TOLERANCE["int8"]),
    ({"quantize": "fp8"}, TOLERANCE["fp8"]),
    ({"offload": "model"}, TOLERANCE["offload"]),
    ({"offload": "group"}, TOLERANCE["offload"]),
])
@pytest.mark.slow
def test_tier_keeps_the_identity(base, tier, tolerance, cache, astronaut):
    session, pipe, plain = _tier_and_plain(base, astronaut, **tier)
    image = _image(session, pipe, astronaut)
    assert np.abs(image - plain).max() <= tolerance
    assert np.abs(image - _image(session, pipe, astronaut, id_scale=0.0)).max() > 0.05  # the identity acts
    if tier.get("quantize") == "int8":  # torchao's int8 tensors take no sum: FaceID's LoRA runs in peft
        weight = (pipe.transformer if base == "tiny-flux" else pipe.unet).state_dict()
        assert any(type(w).__name__ == "Int8Tensor" for w in weight.values())
        if base == "tiny":
            assert pipe._fused_id_lora is None and "faceid" in pipe.unet.peft_config
    if tier.get("quantize") == "fp8":
        assert any(p.dtype == torch.float8_e4m3fn for p in pipe.unet.parameters()) if base == "tiny" else True


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny", "tiny-flux"])
def test_gguf_denoiser(base, cache, astronaut, tmp_path):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    folder = start_session(base=base).base
    cls, sub = (FluxTransformer2DModel, "transformer") if base == "tiny-flux" else (UNet2DConditionModel, "unet")
    path = str(tmp_path / f"{sub}-Q8_0.gguf")
    assert write_gguf(cls.from_pretrained(folder, subfolder=sub), path) > 10
    session, pipe, plain = _tier_and_plain(base, astronaut, gguf=path)
    denoiser = getattr(pipe, sub)
    assert any(type(p).__name__ == "GGUFParameter" for p in denoiser.parameters())
    image = _image(session, pipe, astronaut)
    assert np.abs(image - plain).max() <= TOLERANCE["gguf"]
    assert np.abs(image - _image(session, pipe, astronaut, id_scale=0.0)).max() > 0.05


@pytest.mark.slow
def test_flux_caches(cache, astronaut, tmp_path):
    """--cache on PuLID-FLUX and (TaylorSeer) InfiniteYou: the images are written, the tier is
    recorded, and a cache that never skips gives the plain image."""
    for base, tier in (("tiny-flux", "fbc"), ("tiny-flux", "taylorseer"), ("tiny-infiniteyou", "taylorseer")):
        out = tmp_path / f"{base}-{tier}.png"
        assert main(["generate", "--base", base, "--face", "idgen/assets/astronaut.jpg", "--prompt", "p", "--steps", "3",
                     "--cache", tier, "--out", str(out), "--no-watermark"]) == 0
        assert Image.open(out).text["tier"] == f"{tier} cache"
    session, pipe, plain = _tier_and_plain("tiny-flux", astronaut, cache="fbc:1e-9")
    assert np.abs(_image(session, pipe, astronaut) - plain).max() <= FP32_ATOL


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "nf4"], "needs a CUDA GPU"),
    (["--offload", "sequential"], "this run is on the CPU"),
    (["--cache", "fbc"], "--cache is for FLUX"),
    (["--memory", "auto", "--quantize", "int8"], "--memory auto picks --quantize and --offload itself"),
    (["--gguf", "missing.gguf"], "is not a .gguf file"),
    (["--gguf", "idgen/assets/astronaut.jpg", "--quantize", "int8"], "leave --quantize out"),
    (["--base", "tiny-infiniteyou", "--cache", "fbc"], "use --cache taylorseer"),
    (["--base", "tiny-arc2face", "--quantize", "int8"], "Arc2Face's UNet loads from its own repo"),
])
def test_tiers_that_cannot_run_are_one_line(flags, message, cache, capsys, tmp_path):
    args = ["generate", "--face", "idgen/assets/astronaut.jpg", "--prompt", "p", "--device", "cpu",
            "--out", str(tmp_path / "x.png"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("idgen: error:")]
    assert len(errors) == 1 and message in errors[0]


def test_cache_flag_is_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--face", "f.jpg", "--prompt", "p", "--cache", "fbc:-1"])
    assert "positive number" in capsys.readouterr().err


def test_component_sizes_read_the_headers(cache):
    from diffusers import UNet2DConditionModel

    folder = start_session(base="tiny").base
    sizes = component_sizes(folder, torch.float16)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert sizes["unet"] == sum(p.numel() for p in unet.parameters()) * 2
    assert set(sizes) >= {"unet", "vae", "text_encoder"}


#: FLUX.1-dev's components in bfloat16 (bytes, from its safetensors headers).
FLUX_DEV = {"transformer": 23_802_932_224, "text_encoder_2": 9_524_621_312, "text_encoder": 246_144_352,
            "vae": 167_666_902}


@pytest.mark.parametrize("free_gib, expected", [
    (80, Tier()),
    (30, Tier(offload="model")),
    (16, Tier(quantize="int8", offload="model")),
    (10, Tier(quantize="nf4", offload="model")),
    (5, Tier(quantize="int8", offload="group")),
])
def test_memory_auto_picks_the_fastest_tier_that_fits(free_gib, expected):
    chosen = choose_tier(FLUX_DEV, free_gib * GIB, "flux", int(3.5 * GIB), ("int8", "nf4"))
    assert dataclasses.replace(chosen, chosen=None) == expected
    assert f"of {free_gib:.1f} GiB free" in str(chosen)


def test_memory_auto_without_bitsandbytes_and_too_little_memory():
    chosen = choose_tier(FLUX_DEV, 1 * GIB, "flux", int(3.5 * GIB), ("int8",))
    assert (chosen.quantize, chosen.offload) == ("int8", "group") and "may not fit" in str(chosen)
    assert choose_tier(FLUX_DEV, 1 * GIB, "flux", 0, ()).quantize is None


#: A combination of switches for each tiny preset: what its family can run on a CPU.
PRESET_TIERS = {"tiny-arc2face": ["--quantize", "fp8", "--offload", "group"],
                "tiny-flux": ["--quantize", "int8", "--offload", "model", "--cache", "fbc"],
                "tiny-infiniteyou": ["--quantize", "int8", "--offload", "group", "--cache", "taylorseer"]}


@pytest.mark.slow
@pytest.mark.parametrize("base", TINY_PRESETS)
def test_switches_on_every_tiny_preset(base, cache, astronaut, tmp_path):
    flags = PRESET_TIERS.get(base, ["--quantize", "int8", "--offload", "model"])
    out = tmp_path / "tier.png"
    prompt = "a photo of a woman img" if base == "tiny-photomaker" else "a photo"
    assert main(["generate", "--base", base, "--face", str(astronaut), "--prompt", prompt, "--steps", "2",
                 "--out", str(out), "--no-watermark", *flags]) == 0
    recorded = Image.open(out).text["tier"]
    assert recorded.startswith(f"{flags[1]} weights, {flags[3]} offload")
