"""`idgen tune`: a person LoRA learned on a few photos, on top of the identity adapter."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from idgen import start_session
from idgen.apps.cli import main


def _photos(tmp_path, astronaut):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(astronaut, folder / "a.jpg")
    Image.open(astronaut).transpose(Image.FLIP_LEFT_RIGHT).save(folder / "b.jpg")
    return folder


@pytest.mark.slow
def test_tune_exports_a_lora_that_generate_loads(cache, tmp_path, astronaut, capsys):
    photos = _photos(tmp_path, astronaut)
    out = tmp_path / "person"
    common = ["tune", str(photos), "--rank", "4", "--learning-rate", "1e-2", "--resolution", "64"]
    assert main([*common, "--out", str(out), "--steps", "4"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "2 photo(s) of the person" in captured.err
    assert "steps/s" in captured.out and f"--lora {out}" in captured.out
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(key.startswith("unet.") and "lora_" in key for key in lora)

    session = start_session(steps=3, height=64, width=64)
    pipe = session.load()
    pipe.set_progress_bar_config(disable=True)
    call = dict(session.call_kwargs("a photo of a person"), id_embeds=session.identity([astronaut]), output_type="np")
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(out), adapter_name="person")
    tuned = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(tuned - plain).max() > 1e-3

    # A stopped run resumes to the weights of an uninterrupted one.
    assert main([*common, "--out", str(tmp_path / "part"), "--steps", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "part"), "--steps", "4", "--resume", "latest"]) == 0
    resumed = load_file(tmp_path / "part" / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(resumed[key], lora[key], atol=1e-6) for key in lora)
    # Running into a finished run again is refused, in one line.
    capsys.readouterr()
    assert main([*common, "--out", str(out), "--steps", "4"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_tune_needs_photos_of_a_person(cache, tmp_path, capsys):
    empty = tmp_path / "none"
    empty.mkdir()
    Image.new("RGB", (200, 200), (30, 90, 160)).save(empty / "sky.png")
    assert main(["tune", str(empty), "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "tuning takes 1 to 20 photos of one person" in err[-1]
