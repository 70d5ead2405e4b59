import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from idgen.adapters import save_adapter_checkpoint
from idgen.apps.cli import main
from idgen.testing.presets import INSTANTID_FILE, get_preset, random_faceid_state_dict

from .conftest import write_lora


@pytest.mark.slow
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
    assert images[1].text["seed"] == "8"  # image i has seed + i, so it can be made again alone
    assert meta["scheduler"] == "DDIMScheduler" and meta["dtype"] == "float32" and meta["face_index"] == "0"
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


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory, cache) -> str:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(get_preset("tiny-sdxl").base, subfolder="unet")
    return write_lora(unet, tmp_path_factory.mktemp("lora") / "sdxl.safetensors", fmt="kohya")


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
        ("max-pixels", "raise the limit (max_pixels=, --max-pixels)"),
        ("device-cuda", "has no cuda device torch can use"),
        ("device-mps", "has no mps device torch can use"),
        ("device-bad", "--device bad is not a device"),
        ("instantid-alone", "no IdentityNet beside it (no ControlNetModel/ folder): pass --identitynet"),
        ("lora-missing", "--lora loras/style.safetensors: no such file or folder, and not a hub id"),
        ("lora-not-lora", "could not load LoRA"),
        ("lora-other-base", "does not fit this base model: its layer shapes differ from the UNet's"),
        ("scheduler-bad", "--scheduler 'fastest' is not a scheduler idgen knows"),
        ("timesteps-scheduler", "--timesteps needs a scheduler that samples at given timesteps"),
        ("timesteps-order", "must decrease strictly from the noisiest step"),
        ("timesteps-steps", "--steps 1 and --timesteps (2 values) disagree: leave --steps out"),
        ("timesteps-range", "--timesteps 1000 is past the scheduler's 1000 training timesteps"),
        ("too-many-images", "--num-images 100 is over --max-images 64: pass --max-images 100 to allow it"),
        ("too-large", "--height 80000 is over --max-side 4096: pass --max-side 80000 to allow it"),
        ("seed-overflow", "--seed 18446744073709551615 with --num-images 2 runs past the largest seed"),
    ],
)
@pytest.mark.slow
def test_bad_input_gives_one_clear_line(case, expected, tmp_path, preset, astronaut, bad_adapter, sdxl_lora, capsys):
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
    elif case == "max-pixels":
        extra = ["--max-pixels", "10000"]
    elif case.startswith("device-"):
        device = case.split("-")[1]
        if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
            pytest.skip(f"this machine has {device}")
        extra = ["--device", device]
    elif case == "instantid-alone":  # a trained InstantID adapter: a file with no IdentityNet beside it
        xl = get_preset("tiny-sdxl")
        shutil.copy(os.path.join(xl.adapter, INSTANTID_FILE), tmp_path / "trained.bin")
        extra = ["--base", "tiny-sdxl", "--adapter", str(tmp_path / "trained.bin")]
    elif case.startswith("lora-"):
        extra = ["--lora", {"lora-missing": "loras/style.safetensors", "lora-not-lora": f"{astronaut}:0.5",
                            "lora-other-base": sdxl_lora}[case]]
    elif case == "scheduler-bad":
        extra = ["--scheduler", "fastest"]
    elif case in ("too-many-images", "too-large", "seed-overflow"):
        extra = {"too-many-images": ["--num-images", "100"], "too-large": ["--height", "80000"],
                 "seed-overflow": ["--seed", str(2**64 - 1), "--num-images", "2"]}[case]
    elif case.startswith("timesteps-"):
        extra = {"timesteps-scheduler": ["--timesteps", "999"], "timesteps-order": ["--timesteps", "499,999"],
                 "timesteps-steps": ["--timesteps", "999,499"],
                 "timesteps-range": ["--scheduler", "lcm", "--timesteps", "1000"]}[case]
    out = str(tmp_path / ("out.jpg" if case == "bad-out" else "out.png"))
    code = main(["generate", "--face", face, "--prompt", "p", "--out", out, "--steps", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("idgen: error:") and expected in err[0], err
    assert "Traceback" not in err[0]
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_help_lists_the_flags():
    result = subprocess.run([sys.executable, "-m", "idgen.apps.cli", "generate", "--help"], capture_output=True, text=True)
    for flag in ("--seed", "--steps", "--guidance", "--id-scale", "--num-images", "--height", "--width", "--device", "--dtype", "--out"):
        assert flag in result.stdout


@pytest.mark.slow
def test_identity_control_flags(tmp_path, preset, astronaut, capsys):
    mirrored = tmp_path / "mirrored.jpg"
    Image.open(astronaut).transpose(Image.FLIP_LEFT_RIGHT).save(mirrored)
    out = tmp_path / "ctl.png"
    code = main(["generate", "--face", str(astronaut), "--face", str(mirrored), "--negative-face", str(mirrored),
                 "--prompt", "p", "--out", str(out), "--overwrite", "--steps", "3", "--height", "64", "--width", "64",
                 "--id-scale", "down=0,mid=1,up=0.8", "--id-start", "0.2", "--id-end", "0.9"])
    assert code == 0, capsys.readouterr().err
    meta = Image.open(out).text
    assert meta["id_scale"] == str({"down": 0.0, "mid": 1.0, "up": 0.8}) and meta["id_window"] == "0.2-0.9"
    assert meta["faces"] == f"{astronaut}, {mirrored}" and meta["negative_faces"] == str(mirrored)
    for bad in (["--id-scale", "side=1"], ["--id-start", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--face", str(astronaut), "--prompt", "p", *bad])
        assert exit_info.value.code == 2
    assert main(["generate", "--face", str(astronaut), "--prompt", "p", "--out", str(out), "--overwrite",
                 "--id-start", "0.6", "--id-end", "0.5"]) == 2
    assert "--id-start (0.6) must be below --id-end (0.5)" in capsys.readouterr().err


@pytest.mark.slow
def test_image_i_is_reproduced_alone_from_its_seed(tmp_path, preset, astronaut, capsys):
    common = ["generate", "--face", str(astronaut), "--prompt", "p", "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*common, "--out", str(tmp_path / "batch.png"), "--num-images", "3", "--seed", "10"]) == 0
    assert main([*common, "--out", str(tmp_path / "alone.png"), "--seed", "12"]) == 0
    batch, alone = Image.open(tmp_path / "batch-2.png"), Image.open(tmp_path / "alone.png")
    assert batch.text["seed"] == alone.text["seed"] == "12"
    # up to float32 rounding, which differs between a batch of 3 and a batch of 1 and which the random
    # tiny model amplifies to a level or two
    assert np.abs(np.asarray(batch, dtype=int) - np.asarray(alone, dtype=int)).max() <= 4
    assert np.abs(np.asarray(Image.open(tmp_path / "batch-1.png"), dtype=int) - np.asarray(alone, dtype=int)).max() > 10
    # --batch-size 1 renders each image alone: the same arithmetic, so the same image exactly; the
    # images come out of 3 calls of at most one image each (memory follows --batch-size)
    assert main([*common, "--out", str(tmp_path / "single.png"), "--num-images", "3", "--seed", "10",
                 "--batch-size", "1"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "single-2.png")), np.asarray(alone))
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("single")) == [f"single-{i}.png" for i in range(3)]


@pytest.mark.parametrize("flag, value, expected", [
    ("--id-scale", "nan", "identity strengths are finite and not negative"),
    ("--id-scale", "-0.5", "identity strengths are finite and not negative"),
    ("--id-scale", "down=0,up=inf", "identity strengths are finite and not negative"),
    ("--guidance", "inf", "must be a finite number, got inf"),
    ("--true-cfg-scale", "nan", "must be a finite number, got nan"),
    ("--identitynet-scale", "nan", "must be a finite number, got nan"),
    ("--seed", str(2**64), "must be between 0 and 2**64 - 1"),
    ("--seed", "-1", "must be between 0 and 2**64 - 1"),
    ("--steps", "1000", "at most 999"),
])
def test_unusable_numbers_are_refused_before_anything_loads(flag, value, expected, tmp_path, astronaut, capsys):
    """Values that would write an all-black image (NaN, Inf), overflow a seed or step past the
    scheduler's last timestep stop at the command line (argparse's exit 2), naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--face", str(astronaut), "--prompt", "p", "--out", str(tmp_path / "o.png"), f"{flag}={value}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag in err and expected in err, err
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_face_index_is_per_photo_and_not_applied_to_the_negative_face(tmp_path, preset, analyzer, astronaut, group_photo,
                                                                      capsys):
    out = tmp_path / "out.png"
    common = ["generate", "--prompt", "p", "--out", str(out), "--overwrite", "--steps", "1", "--height", "64", "--width", "64"]
    # The second-largest face of the group photo, with the (single-face) astronaut as the negative identity.
    assert main([*common, "--face", str(group_photo), "--face-index", "1", "--negative-face", str(astronaut)]) == 0, \
        capsys.readouterr().err
    assert Image.open(out).text["face_index"] == "1" and Image.open(out).text["negative_face_index"] == "0"
    # One index per photo: face 2 of the group photo, face 0 of the astronaut.
    assert main([*common, "--face", str(group_photo), "--face", str(astronaut), "--face-index", "2", "--face-index", "0"]) == 0
    assert Image.open(out).text["face_index"] == "[2, 0]"
    per_photo = analyzer.identity([group_photo, astronaut], [2, 0])
    expected = analyzer.identity([group_photo], 2) + analyzer.identity([astronaut], 0)
    assert np.allclose(per_photo, expected / np.linalg.norm(expected), atol=1e-6)
    capsys.readouterr()
    assert main([*common, "--face", str(astronaut), "--face-index", "0", "--face-index", "1"]) == 2
    assert "2 --face-index values for 1 --face photo(s)" in capsys.readouterr().err


def test_arguments_are_checked_before_the_models_are_imported(tmp_path, astronaut):
    """A missing --prompt fails at once: neither torch nor diffusers has been imported."""
    script = (
        "import sys\nfrom idgen.apps.cli import main\n"
        f"code = main(['generate', '--face', {str(astronaut)!r}, '--out', {str(tmp_path / 'o.png')!r}])\n"
        "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert result.stderr.strip() == "idgen: error: --prompt is required (only Arc2Face generates from the identity alone)"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--face", str(astronaut), "--prompt", "p", "--steps", "2000"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_trained_instantid_adapter_pairs_with_an_identitynet(tmp_path, cache, astronaut, capsys):
    xl = get_preset("tiny-sdxl")
    shutil.copy(os.path.join(xl.adapter, INSTANTID_FILE), tmp_path / "trained.bin")
    common = ["generate", "--base", "tiny-sdxl", "--adapter", str(tmp_path / "trained.bin"), "--face", str(astronaut),
              "--prompt", "p", "--steps", "1", "--height", "64", "--width", "64", "--no-watermark"]
    out = tmp_path / "paired.png"
    assert main([*common, "--identitynet", xl.adapter, "--out", str(out)]) == 0, capsys.readouterr().err
    meta = Image.open(out).text
    assert meta["method"] == "instantid" and meta["identitynet"] == xl.adapter and meta["identitynet_scale"] == "0.8"
    assert main([*common, "--identitynet", "none", "--out", str(tmp_path / "alone.png")]) == 0
    meta = Image.open(tmp_path / "alone.png").text
    assert meta["method"] == "instantid" and "identitynet" not in meta  # the adapter alone: raw embeddings still
    # The same as the original folder layout, which finds its IdentityNet itself.
    assert main(["generate", "--base", "tiny-sdxl", "--face", str(astronaut), "--prompt", "p", "--steps", "1",
                 "--height", "64", "--width", "64", "--out", str(tmp_path / "folder.png"), "--no-watermark"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "folder.png")))


@pytest.mark.slow
def test_tiny_faceid_sdxl_preset(tmp_path, cache, astronaut, capsys):
    out = tmp_path / "faceid-xl.png"
    assert main(["generate", "--base", "tiny-faceid-sdxl", "--face", str(astronaut), "--prompt", "p", "--steps", "1",
                 "--height", "64", "--width", "64", "--out", str(out)]) == 0, capsys.readouterr().err
    meta = Image.open(out).text
    assert meta["method"] == "faceid-sdxl" and meta["id_scale"] == "1.0" and "identitynet" not in meta
    assert main(["generate", "--base", "tiny-faceid-sdxl", "--face", str(astronaut), "--prompt", "p",
                 "--kps-image", str(astronaut), "--out", str(tmp_path / "refused.png")]) == 2
    assert "--kps-image needs InstantID" in capsys.readouterr().err


@pytest.mark.parametrize("part, expected", [
    ("unet", "the UNet made NaN or Inf latents at step 1 of 2, which would be a black image"),
    ("vae", "the VAE decoder made NaN or Inf values, which would be a black image"),
])
def test_nan_weights_stop_before_a_black_image_is_written(part, expected, tmp_path, preset, astronaut, capsys):
    """A base model whose UNet or VAE makes NaN stops the run with one line naming the part and the
    step; no image (black, as diffusers would write it) is left behind."""
    base = tmp_path / "base"
    shutil.copytree(preset.base, base)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls, layer = (UNet2DConditionModel, "conv_out") if part == "unet" else (AutoencoderKL, "decoder.conv_out")
    model = cls.from_pretrained(base, subfolder=part)
    with torch.no_grad():
        model.get_submodule(layer).bias.fill_(float("nan"))
    model.save_pretrained(base / part)
    out = tmp_path / "out.png"
    code = main(["generate", "--face", str(astronaut), "--prompt", "p", "--out", str(out), "--steps", "2", "--height", "64",
                 "--width", "64", "--base", str(base), "--adapter", preset.adapter, "--face-model", preset.face_pack])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("denoising")]
    assert code == 2 and len(err) == 1 and err[0].startswith("idgen: error:") and expected in err[0], err
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".png")]


@pytest.mark.slow
def test_out_files_are_never_replaced_silently(tmp_path, preset, astronaut, capsys, monkeypatch):
    """--out refuses to replace a file unless --overwrite; a killed run's half-written files go on
    the next start (a live writer's stay); a full disk is one line, exit 2, and no file."""
    import errno

    from idgen.files import temporary_prefix

    out = tmp_path / "out.png"
    common = ["generate", "--face", str(astronaut), "--prompt", "p", "--steps", "1", "--height", "64", "--width", "64"]
    out.write_bytes(b"mine")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = tmp_path / f".tmp-{dead.stdout.strip()}-abc-out.png", tmp_path / f"{temporary_prefix()}abc-out.png"
    stale.write_bytes(b"half")
    live.write_bytes(b"being written")
    assert main([*common, "--out", str(out)]) == 2
    assert f"{out} exists: pass --overwrite to replace it" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main([*common, "--out", str(tmp_path / "x.png"), "--num-images", "2"]) == 0
    assert not stale.exists() and live.exists()
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "x.png"), "--num-images", "2"]) == 2
    assert "x-0.png (and 1 more) exists: pass --overwrite" in capsys.readouterr().err
    assert main([*common, "--out", str(out), "--overwrite"]) == 0 and out.read_bytes()[:4] == b"\x89PNG"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full.png"))

    monkeypatch.setattr("idgen.apps.session.save_png", full)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "full.png")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("denoising")]
    assert err == [f"idgen: error: No space left on device ({tmp_path / 'full.png'}): free space on the disk, or use files "
                   "and folders this user may read and write (--out, output_dir)"]


@pytest.mark.slow
def test_a_prompt_past_the_text_encoder_is_said(tmp_path, preset, astronaut, capsys):
    """diffusers cuts a prompt at the CLIP text encoder's 77 tokens without a word: the CLI says how
    many tokens are left out; a prompt that fits says nothing."""
    common = ["generate", "--face", str(astronaut), "--steps", "1", "--height", "64", "--width", "64"]
    assert main([*common, "--prompt", "a photo " * 200, "--out", str(tmp_path / "long.png")]) == 0
    err = capsys.readouterr().err
    found = re.search(r"idgen: warning: the prompt has (\d+) tokens and the text encoder reads 77: the last (\d+) are "
                      r"left out; shorten it", err)
    assert found and int(found[1]) - int(found[2]) == 77, err
    assert main([*common, "--prompt", "a photo", "--out", str(tmp_path / "short.png")]) == 0
    assert "warning" not in capsys.readouterr().err
