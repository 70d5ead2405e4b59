"""Shared fixtures: the tiny preset (built once per run), the face analyzer and real photos."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASTRONAUT = REPO / "idgen" / "assets" / "astronaut.jpg"


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(list(spec.submodule_search_locations)[0], *parts)


@pytest.fixture(scope="session")
def astronaut() -> Path:
    """Eileen Collins (NASA, public domain): one frontal face, 512x512."""
    return ASTRONAUT


@pytest.fixture(scope="session")
def group_photo() -> Path:
    """insightface's t1.jpg: a real group photo with 6 people (read from the installed package)."""
    return package_file("insightface", "data", "images", "t1.jpg")


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("idgen-cache")
    os.environ["IDGEN_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def preset(cache):
    from idgen.testing.presets import get_preset

    return get_preset("tiny", seed=0, root=str(cache))


@pytest.fixture(scope="session")
def analyzer(preset):
    from idgen import FaceAnalyzer

    return FaceAnalyzer(preset.face_pack)


#: Tolerance for float32 images reached by two code paths that compute the same values with
#: different arithmetic (e.g. an embedding averaged in the pipeline or in the test): they agree to
#: about 1e-6; exact equality is kept for the same arithmetic run twice.
FP32_ATOL = 1e-4


def assert_close(a, b, atol: float = FP32_ATOL) -> None:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= atol, f"max difference {np.abs(a - b).max():.3g} > {atol}"


def embedding(seed: int, scale: float = 1.0) -> torch.Tensor:
    """A seeded random identity vector of norm ``scale`` (InstantID takes raw vectors, norm ~20)."""
    return torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(seed)), dim=0) * scale


@pytest.fixture(scope="module")
def pipe(preset, analyzer):
    """The tiny SD1.5 pipeline with the preset's FaceID adapter and face analyzer."""
    from idgen import IDStableDiffusionPipeline

    pipe = IDStableDiffusionPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(preset.adapter)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora_layers(unet, rank: int = 4, seed: int = 0, conv: bool = False) -> dict:
    """A random LoRA ``{path: (down, up)}`` on ``unet``'s attention projections (and, with
    ``conv``, its resnets' 3x3 ``conv1``, as LCM-LoRA and SDXL-Lightning adapt them), strong
    enough to change an image visibly."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for path, module in unet.named_modules():
        if "lora_" in path or "base_layer" in path:
            continue
        module = getattr(module, "base_layer", module)  # under a peft wrapper: the layer it adapts
        if isinstance(module, torch.nn.Linear) and path.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            shapes = (rank, module.in_features), (module.out_features, rank)
        elif conv and isinstance(module, torch.nn.Conv2d) and path.endswith("conv1") and "resnets" in path:
            shapes = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            continue
        down = torch.randn(*shapes[0], generator=gen) / shapes[0][1] ** 0.5
        up = torch.randn(*shapes[1], generator=gen) * 0.5 / rank ** 0.5
        layers[path] = (down, up)
    return layers


def write_lora(unet, path: Path, rank: int = 4, seed: int = 0, fmt: str = "peft", alpha: float | None = None,
               conv: bool = False) -> str:
    """A random LoRA (``random_lora_layers``) written to ``path`` in one of the published formats:
    ``peft`` (diffusers' ``save_lora_weights`` keys, ``unet.<path>.lora_A.weight``) or ``kohya``
    (``lora_unet_<path_with_underscores>.lora_down.weight`` with ``.alpha``, as LCM-LoRA,
    SDXL-Lightning and DMD2 LoRAs ship); returns the path."""
    from safetensors.torch import save_file

    from idgen.adapters.lora import peft_lora_state_dict

    layers = random_lora_layers(unet, rank, seed, conv)
    if fmt == "peft":
        state = peft_lora_state_dict(layers)
    else:
        state = {}
        for layer, (down, up) in layers.items():
            key = "lora_unet_" + layer.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": torch.tensor(float(rank if alpha is None else alpha))})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return str(path)


def reference_modules(monkeypatch, folder: str, package: str, modules: list[str]) -> list[types.ModuleType]:
    """Modules of a reference package imported from its files, without running its ``__init__``.
    EVA-CLIP imports helpers from timm and torchvision that only its training and weight
    initialisation use; they are stood in for while importing (neither installs here)."""
    pytest.importorskip("einops", reason="the reference's rotary embedding imports einops (pip install einops)")
    stubs = {"timm": {}, "timm.models": {}, "torchvision": {}, "torchvision.ops": {},
             "timm.models.layers": dict(drop_path=lambda x, *a: x, to_2tuple=lambda x: x if isinstance(x, tuple) else (x, x),
                                        trunc_normal_=lambda t, std=1.0: torch.nn.init.normal_(t, std=std)),
             "torchvision.ops.misc": dict(FrozenBatchNorm2d=None)}
    for name, attributes in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    root = types.ModuleType(package)
    root.__path__ = [folder]
    monkeypatch.setitem(sys.modules, package, root)
    return [importlib.import_module(f"{package}.{name}") for name in modules]
