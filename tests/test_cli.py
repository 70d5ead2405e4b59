import os
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from idgen.adapters import save_adapter_checkpoint
from idgen.cli import main
from idgen.presets import random_faceid_state_dict


def test_generate_end_to_end(tmp_path, preset, astronaut):
    """The console script, as a user runs it: progress bar, PNGs with metadata."""
    out = tmp_path / "out.png"
    env = dict(os.environ, IDGEN_CACHE=os.environ["IDGEN_CACHE"])
    result = subprocess.run(
        [sys.executable, "-m", "idgen", "generate", "--face", str(astronaut), "--prompt", "a photo of a person as an astronaut",
         "--out", str(out), "--steps", "4", "--num-images", "2", "--seed", "7", "--height", "64", "--width", "64"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "denoising" in result.stderr and "4/4" in result.stderr  # tqdm bar over the steps
    paths = [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    assert result.stdout.split() == [str(p) for p in paths]
    images = [Image.open(p) for p in paths]
    assert images[0].size == (64, 64)
    meta = images[0].text
    assert meta["prompt"] == "a photo of a person as an astronaut" and meta["seed"] == "7"
    assert meta["base_model"] == "tiny" and meta["adapter"].endswith(".safetensors")
    assert meta["idgen_version"] and "random" in meta["random_weights"]
    assert images[0].tobytes() != images[1].tobytes()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def _huge_png(path, width=20000, height=20000):
    """A valid PNG header that declares a huge image (the pixel data never gets decoded)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(open(path, "rb").read())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def bad_adapter(tmp_path_factory, preset, astronaut):
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("bad")
    good = folder / "good.safetensors"
    save_adapter_checkpoint(random_faceid_state_dict(UNet2DConditionModel.from_pretrained(preset.base, subfolder="unet")), str(good))
    cut = folder / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    return cut


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("corrupt", "not a readable image"),
        ("truncated", "truncated"),
        ("huge", "over the limit"),
        ("no-face", "no face found"),
        ("bad-checkpoint", "cut.safetensors could not be read"),
        ("bad-base", "could not load base model"),
        ("bad-out", "must end in .png"),
    ],
)
def test_bad_input_gives_one_clear_line(case, expected, tmp_path, preset, astronaut, bad_adapter, capsys):
    face, extra = str(astronaut), []
    if case == "missing":
        face = str(tmp_path / "nope.jpg")
    elif case == "corrupt":
        face = str(tmp_path / "corrupt.jpg")
        open(face, "wb").write(b"\xff\xd8 garbage " * 50)
    elif case == "truncated":
        face = str(tmp_path / "cut.jpg")
        open(face, "wb").write(astronaut.read_bytes()[:20000])
    elif case == "huge":
        face = str(tmp_path / "huge.png")
        _huge_png(face)
    elif case == "no-face":
        face = str(tmp_path / "blank.png")
        Image.new("RGB", (300, 300), (90, 140, 200)).save(face)
    elif case == "bad-checkpoint":
        extra = ["--adapter", str(bad_adapter)]
    elif case == "bad-base":
        extra = ["--base", str(tmp_path / "no-such-model"), "--face-model", preset.face_pack, "--adapter", preset.adapter]
    out = str(tmp_path / ("out.jpg" if case == "bad-out" else "out.png"))
    code = main(["generate", "--face", face, "--prompt", "p", "--out", out, "--steps", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("idgen: error:") and expected in err[0], err
    assert "Traceback" not in err[0]
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_help_lists_the_flags():
    result = subprocess.run([sys.executable, "-m", "idgen.cli", "generate", "--help"], capture_output=True, text=True)
    for flag in ("--seed", "--steps", "--guidance", "--id-scale", "--num-images", "--height", "--width", "--device", "--dtype", "--out"):
        assert flag in result.stdout


def test_identity_control_flags(tmp_path, preset, astronaut, capsys):
    mirrored = tmp_path / "mirrored.jpg"
    Image.open(astronaut).transpose(Image.FLIP_LEFT_RIGHT).save(mirrored)
    out = tmp_path / "ctl.png"
    code = main(["generate", "--face", str(astronaut), "--face", str(mirrored), "--negative-face", str(mirrored),
                 "--prompt", "p", "--out", str(out), "--steps", "3", "--height", "64", "--width", "64",
                 "--id-scale", "down=0,mid=1,up=0.8", "--id-start", "0.2", "--id-end", "0.9"])
    assert code == 0, capsys.readouterr().err
    meta = Image.open(out).text
    assert meta["id_scale"] == str({"down": 0.0, "mid": 1.0, "up": 0.8}) and meta["id_window"] == "0.2-0.9"
    assert meta["faces"] == f"{astronaut}, {mirrored}" and meta["negative_faces"] == str(mirrored)
    for bad in (["--id-scale", "side=1"], ["--id-start", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--face", str(astronaut), "--prompt", "p", *bad])
        assert exit_info.value.code == 2
    assert main(["generate", "--face", str(astronaut), "--prompt", "p", "--out", str(out),
                 "--id-start", "0.6", "--id-end", "0.5"]) == 2
    assert "--id-start (0.6) must be below --id-end (0.5)" in capsys.readouterr().err
