"""Shared fixtures: the tiny preset (built once per run), the face analyzer and real photos."""

from __future__ import annotations

import importlib.util
import os
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
    from idgen.presets import get_preset

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


def write_lora(unet, folder: Path, rank: int = 4, seed: int = 0, name: str = "pytorch_lora_weights.safetensors") -> str:
    """A random peft LoRA on ``unet``'s attention projections, written with diffusers'
    ``save_lora_weights`` (the file layout LoRAs are published in); returns its path."""
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    donor = copy.deepcopy(unet)
    donor.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(donor),
                                              weight_name=name)
    return str(Path(folder) / name)
