"""Shared fixtures: the tiny preset (built once per run), the face analyzer and real photos."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

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
