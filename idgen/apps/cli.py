"""The ``idgen`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from idgen.errors import IDGenError
from idgen.faces import DEFAULT_MAX_PIXELS, FaceAnalyzer, load_image
from idgen.files import remove_stale_temporaries, save_png
from idgen.formats import DEFAULT_FACE_PACK, METHODS
from idgen.version import __version__
from idgen.workers import Engine

from .loras import parse_lora
from .options import (
    COMPILE,
    FBC_THRESHOLD,
    OFFLOAD,
    QUANTIZE,
    SessionOptions,
    check_call_options,
    check_id_window,
    check_timesteps,
    parse_cache,
)

#: Request bounds, checked before any model loads (--max-side and --max-images raise theirs).
MAX_STEPS = 999
MAX_SIDE = 4096
MAX_IMAGES = 64


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _steps(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"at most {MAX_STEPS} (SD schedulers trained on 1000 timesteps, with their "
                                         f"offset of 1, step past the last one at 1000), got {value}")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1 (a torch generator's seed), got {value}")
    return value


def _dimension(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {value}")
    return value


def _id_scale(text: str) -> float | dict[str, float]:
    """``0.8`` or ``down=0,mid=1,up=0.8`` (keys: down, mid, up or a layer-name prefix)."""
    if "=" not in text:
        return _id_strength(text)
    scales = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        try:
            scales[key.strip()] = _id_strength(value)
        except ValueError:
            sep = ""
        block = key.strip().split(".")[0]
        if not sep or block not in ("down", "mid", "up", "down_blocks", "mid_block", "up_blocks"):
            raise argparse.ArgumentTypeError(f"expected a number or down=..,mid=..,up=.., got {text!r}")
    return scales


def _id_strength(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"identity strengths are finite and not negative (0 turns it off), got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction of the schedule between 0 and 1, got {value}")
    return value


def _cache(text: str) -> str:
    try:
        return parse_cache(text)
    except IDGenError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--cache {text}: ")) from None


def _timesteps(text: str) -> list[int]:
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 999,749,499,249, got {text!r}") from None


def _box(text: str) -> tuple[int, int, int, int]:
    """``X0,Y0,X1,Y1`` in output pixels, a non-empty box."""
    try:
        x0, y0, x1, y1 = (int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 in output pixels such as 0,0,512,1024, got {text!r}") from None
    if x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
        raise argparse.ArgumentTypeError(f"the box {text} is empty or negative: need 0 <= X0 < X1 and 0 <= Y0 < Y1")
    return x0, y0, x1, y1


def _indices(text: str) -> list[int]:
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated face numbers such as 1,0, got {text!r}") from None


def _strength(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {value}")
    return value


def _method_defaults(setting: str) -> str:
    """Each method's default of ``setting`` (steps, guidance), from the method registry, for --help."""
    return ", ".join(f"{name} {getattr(method, setting):g}" for name, method in METHODS.items()).replace("%", "%%")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which models run and how: shared by generate and eval."""
    parser.add_argument("--base", default="tiny",
                        help="base model: 'tiny', 'tiny-sdxl', 'tiny-faceid-sdxl', 'tiny-photomaker', 'tiny-pulid', 'tiny-flux', "
                        "'tiny-infiniteyou' or 'tiny-arc2face' (offline presets), a hub id or a local diffusers folder; "
                        "SD1.5, SDXL or FLUX.1 is read from it")
    parser.add_argument("--adapter", default=None,
                        help=f"identity adapter: hub id, folder or file (default: {METHODS['faceid'].default_adapter} for "
                        f"SD1.5, {METHODS['instantid'].default_adapter} for SDXL; the preset's for the tiny bases); "
                        "an Arc2Face repo or folder (FoivosPar/Arc2Face) selects Arc2Face")
    parser.add_argument("--weight-name", default=None, help="file inside --adapter (default: the method's usual file, e.g. "
                        f"{METHODS['faceid'].default_weight_name})")
    parser.add_argument("--subfolder", default=None, help="subfolder of --adapter")
    parser.add_argument("--identitynet", default=None, metavar="PATH",
                        help="InstantID's IdentityNet (a folder or repo with ControlNetModel/, or the ControlNet folder), "
                        "for an adapter that has none beside it, e.g. one you trained; 'none' runs without it")
    parser.add_argument("--image-encoder", default=None, metavar="PATH",
                        help="FaceID-Plus: its CLIP image encoder, a folder or hub id (default: h94/IP-Adapter's "
                        "models/image_encoder); PuLID: EVA02-CLIP-L, a folder, file or hub id (default: QuanSun/EVA-CLIP's "
                        "EVA02_CLIP_L_336_psz14_s6B.pt)")
    parser.add_argument("--face-parser", default=None, metavar="PATH",
                        help="PuLID: facexlib's face parser parsing_bisenet.pth (default: downloaded from facexlib's release)")
    parser.add_argument("--num-zero", type=int, default=None, metavar="N",
                        help="PuLID: zero identity tokens; more gives more editable, less alike faces (default 20; v1: 8)")
    parser.add_argument("--ortho", choices=("off", "v1", "v2"), default=None,
                        help="PuLID: keep only the identity's part orthogonal to the prompt's (v1), or weigh it (v2, default)")
    parser.add_argument("--infusenet", default=None, metavar="PATH",
                        help="InfiniteYou: its InfuseNet, a folder or hub id (default: InfuseNetModel/ beside the adapter)")
    parser.add_argument("--face-recognizer", default=None, metavar="PATH",
                        help="InfiniteYou: the ArcFace it was trained on, facexlib's recognition_arcface_ir_se50.pth "
                        "(default: downloaded from facexlib's release)")
    parser.add_argument("--id-start-step", type=_non_negative_int, default=0, metavar="N",
                        help="FLUX: loop steps before the identity joins (PuLID-FLUX: 0 realistic, 4 stylised)")
    parser.add_argument("--true-cfg-scale", type=_finite, default=1.0, metavar="X",
                        help="FLUX: true classifier-free guidance with --negative-prompt when above 1 (then set --guidance 1)")
    parser.add_argument("--face-model", default=None,
                        help=f"insightface pack name or folder, or 'tiny' (default: {DEFAULT_FACE_PACK}; the preset's for tiny)")
    parser.add_argument("--detector", choices=("auto", "scrfd", "dlib"), default="auto")
    parser.add_argument("--face-index", type=int, action="append", default=None, metavar="N",
                        help="which face of each face photo, 0 = largest; repeat it to give one per --face photo")
    parser.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"largest photo accepted, in pixels (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--steps", type=_steps, default=None,
                        help="denoising steps (default: the method's, " + _method_defaults("steps") + ")")
    parser.add_argument("--guidance", type=_finite, default=None,
                        help="guidance scale (default: the method's, " + _method_defaults("guidance") + ")")
    parser.add_argument("--id-scale", type=_id_scale, default=None,
                        help="identity strength: a number, or per block as down=0,mid=1,up=0.8 "
                        "(default 1.0; InstantID and PuLID 0.8, as their references run them)")
    parser.add_argument("--id-start", type=_fraction, default=0.0, help="fraction of the steps before the identity applies")
    parser.add_argument("--id-end", type=_fraction, default=1.0, help="fraction of the steps after which it stops")
    parser.add_argument("--trigger-word", default="img",
                        help="PhotoMaker: the word after the class word that marks the person (default img: "
                        "'a photo of a woman img')")
    parser.add_argument("--start-merge-step", type=int, default=None, metavar="N",
                        help="PhotoMaker: steps denoised with the prompt alone before the identity joins (default: "
                        "20%% of the steps, as its demo)")
    parser.add_argument("--lora", action="append", default=None, metavar="PATH_OR_ID[:WEIGHT]",
                        help="a LoRA to add (repeatable): a .safetensors file, a folder, a hub id or "
                        "owner/name/file.safetensors, with an optional weight (default 1), e.g. "
                        "latent-consistency/lcm-lora-sdv1-5:1.0; fused into the weights, so it costs no time per step")
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help="sampler: lcm, tcd, euler, euler-a, euler-trailing, dpm++-2m, dpm++-2m-karras, "
                        "dpm++-2m-sde-karras, unipc, ddim, ddpm, pndm, lms, heun, or a diffusers class name "
                        "(default: the base model's)")
    parser.add_argument("--timesteps", type=_timesteps, default=None, metavar="T1,T2,...",
                        help="sample at exactly these timesteps, noisiest first (DMD2: 999,749,499,249); "
                        "sets the number of steps")
    _add_tier_arguments(parser)
    parser.add_argument("--height", type=_dimension, default=None)
    parser.add_argument("--width", type=_dimension, default=None)
    parser.add_argument("--max-side", type=_positive_int, default=MAX_SIDE, metavar="PIXELS",
                        help=f"largest --height/--width accepted (default {MAX_SIDE}): a larger image needs more memory "
                        "than most machines have")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    _add_marking_arguments(parser)


def _add_marking_arguments(parser: argparse.ArgumentParser) -> None:
    """What marks each image: idgen's watermark, Content Credentials."""
    parser.add_argument("--c2pa-cert", default=None, metavar="PEM",
                        help="sign each image with Content Credentials (C2PA): your certificate chain, signer first "
                        '(needs pip install "idgen[c2pa]")')
    parser.add_argument("--c2pa-key", default=None, metavar="PEM", help="the private key of --c2pa-cert")
    parser.add_argument("--no-watermark", dest="watermark", action="store_false",
                        help="write no invisible watermark (it marks every image as made by idgen; `idgen verify` reads it)")


def _add_tier_arguments(parser: argparse.ArgumentParser) -> None:
    """The memory and speed switches (idgen.apps.tiers)."""
    tiers = parser.add_argument_group("memory and speed (README: Memory and speed tiers)")
    tiers.add_argument("--compile", nargs="?", const="full", choices=COMPILE, default=None,
                       help="torch.compile the UNet or FLUX transformer (and IdentityNet/InfuseNet), for GPUs: full "
                       "(the default) compiles the whole model, regional its repeated block once, in a fraction of "
                       "the time; the first image waits for the compiler (on CPU it is not faster: bench/README.md)")
    tiers.add_argument("--quantize", choices=QUANTIZE, default=None,
                       help="quantized denoiser weights (and FLUX's T5): int8 (torchao, weight-only), fp8 (float8 "
                       "storage, computed in --dtype), nf4 (bitsandbytes, CUDA only); identity modules stay unquantized")
    tiers.add_argument("--gguf", default=None, metavar="FILE",
                       help="load the denoiser (FLUX transformer or UNet) from a GGUF file, e.g. flux1-dev-Q8_0.gguf")
    tiers.add_argument("--offload", choices=OFFLOAD, default=None,
                       help="keep models on the CPU between uses: model (one model at a time on the GPU), group "
                       "(one block at a time, streamed), sequential (one layer at a time: least memory, slowest)")
    tiers.add_argument("--cache", type=_cache, default=None, metavar="fbc[:THRESHOLD]|taylorseer",
                       help=f"FLUX: skip work on steps that change little: fbc (first-block cache, threshold "
                       f"{FBC_THRESHOLD}: higher is faster and drifts further) or taylorseer")
    tiers.add_argument("--memory", choices=("auto",), default=None,
                       help="auto: pick the fastest --quantize/--offload that fits the GPU's free memory (printed, "
                       "and recorded in each image)")


def _add_generate(commands: argparse._SubParsersAction) -> None:
    """The ``generate`` command's arguments."""
    gen = commands.add_parser(
        "generate",
        help="make images of the person in a face photo",
        description="Make images of the person in --face. With no --base, runs the offline tiny preset "
        "(random weights: it checks the stack, its images are noise).",
    )
    gen.add_argument("--overwrite", action="store_true", help="replace the --out files if they exist")
    gen.add_argument("--out", default="out.png",
                     help="output PNG; with --num-images N, OUT-0.png ... are written, image i with seed SEED+i")
    _add_request_arguments(gen, face_required=True)
    _add_model_arguments(gen)
    gen.set_defaults(run=run_generate)


def _add_request_arguments(gen: argparse.ArgumentParser, face_required: bool) -> None:
    """What one generate request makes (the photos, prompt, seed, count): generate's, and each job's
    of a batch."""
    gen.add_argument("--face", action="append", required=face_required, metavar="PHOTO",
                     help="face photo; repeat for several photos of the same person (with --people: one per person)")
    gen.add_argument("--people", action="store_true",
                     help="each --face is a different person in the same image, placed by --face-region, else around "
                          "the faces of --kps-image (left to right), else in equal columns left to right")
    gen.add_argument("--face-region", type=_box, action="append", default=None, metavar="X0,Y0,X1,Y1",
                     help="where the person of the matching --face goes, in output pixels; one per --face (implies --people)")
    gen.add_argument("--face-order", type=_indices, default=None, metavar="I,J,...",
                     help="with --people and --kps-image: the face of the pose photo each --face takes, counting its "
                          "faces left to right (default: the largest faces, left to right)")
    gen.add_argument("--negative-face", action="append", default=None, metavar="PHOTO",
                     help="a face to steer away from (through the unconditional branch); repeatable")
    gen.add_argument("--negative-face-index", type=int, default=0, metavar="N",
                     help="which face of the --negative-face photos, 0 = largest")
    gen.add_argument("--prompt", default=None, help="what to make (required, except for Arc2Face)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--kps-image", default=None, metavar="PHOTO",
                     help="InstantID: take the face position and pose from this photo; with --people, a photo with a "
                          "face per person that places them (any method)")
    gen.add_argument("--identitynet-scale", type=_finite, default=0.8, help="InstantID: IdentityNet strength")
    gen.add_argument("--id-fusion", choices=("adain", "freecure"), default=None,
                     help="merge the identity with the base model's own take on the prompt: Infinite-ID's AdaIN-mean "
                          "mixed attention, or FreeCure's recovery of the attributes the prompt names (hair, smile, ...)")
    gen.add_argument("--recover-words", default=None, metavar="WORD,WORD",
                     help="with --id-fusion freecure: the prompt's words to recover (default: its attribute words)")
    gen.add_argument("--seed", type=_seed, default=0, help="image i has seed + i (default 0)")
    gen.add_argument("--num-images", type=_positive_int, default=1)
    gen.add_argument("--max-images", type=_positive_int, default=MAX_IMAGES, metavar="N",
                     help=f"largest --num-images accepted (default {MAX_IMAGES})")
    gen.add_argument("--batch-size", type=_positive_int, default=4, metavar="N",
                     help="images rendered together (default 4): memory follows it, not --num-images")
    gen.add_argument("--fix-faces", action="store_true",
                     help="then repaint every face found in each image with the identity (small faces in full-body "
                     "images), as `idgen fix` does")
    gen.add_argument("--fix-strength", type=_strength, default=0.6, help="strength of --fix-faces (default 0.6)")


def _add_batch(commands: argparse._SubParsersAction) -> None:
    """The ``batch`` command's arguments: generate's, as every job's defaults, and the engine's."""
    batch = commands.add_parser(
        "batch", help="render many generate requests, one per row of a CSV or JSONL file",
        description="Render each row of JOBS (face, prompt, seed and any generate option, e.g. id_scale; the "
        "command line's options are every row's defaults) into DIR, with DIR/manifest.parquet (one row per image: "
        "job, file, seed, settings, FaceSim, status, error). Run it again to resume: finished jobs are kept, the "
        "rest rendered. Exit 1 when some jobs failed (their errors are in the manifest).")
    batch.add_argument("jobs", metavar="JOBS", help="a .csv (header row) or .jsonl file, one job per row; relative "
                       "photo paths are read from its folder; a face may be a photo, several (';' in CSV, a list in "
                       "JSONL) or a folder")
    batch.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/ID.png per job (ID-0.png ... "
                       "with num_images), and the manifest")
    _add_engine_arguments(batch)
    _add_request_arguments(batch, face_required=False)
    _add_model_arguments(batch)
    batch.set_defaults(run=run_batch)


def _add_synth(commands: argparse._SubParsersAction) -> None:
    """The ``synth`` command's arguments."""
    synth = commands.add_parser(
        "synth", help="make a synthetic face dataset: many identities, several images each",
        description="Sample identity vectors (or read them from --from-photos), render each with Arc2Face (or "
        "FaceID), filter the images, and write DIR/identities/ID/K.jpg, WebDataset shards, records and a dataset "
        "card. Offline default: --base tiny-arc2face (random weights: it checks the pipeline). Real data: --adapter "
        "FoivosPar/Arc2Face --base stable-diffusion-v1-5/stable-diffusion-v1-5. Run it again to resume.")
    synth.add_argument("--identities", type=_positive_int, default=None, metavar="N",
                       help="identities to sample (not with --from-photos)")
    synth.add_argument("--images-per-identity", type=_positive_int, required=True, metavar="K")
    synth.add_argument("--out", required=True, metavar="DIR")
    synth.add_argument("--from-photos", default=None, metavar="FOLDER",
                       help="an identity per photo of FOLDER (or per subfolder of photos), instead of sampled ones")
    synth.add_argument("--min-angle", type=_finite, default=75.0, metavar="DEGREES",
                       help="smallest angle between two sampled identities (default 75)")
    synth.add_argument("--seed", type=_seed, default=0, help="of the identities and of every image (default 0)")
    synth.add_argument("--min-face-sim", type=_finite, default=0.5, metavar="X",
                       help="keep an image whose FaceSim to its identity is at least X (default 0.5)")
    synth.add_argument("--max-other-sim", type=_finite, default=0.4, metavar="X",
                       help="and whose FaceSim to every other identity is at most X (default 0.4)")
    synth.add_argument("--no-filter", dest="filter", action="store_false", help="keep every image")
    synth.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N", help="samples per shard")
    _add_engine_arguments(synth)
    _add_model_arguments(synth)
    synth.set_defaults(run=run_synth, base="tiny-arc2face")


def _add_protect(commands: argparse._SubParsersAction) -> None:
    """The ``protect`` command's arguments."""
    protect = commands.add_parser(
        "protect", help="perturb a photo so face encoders no longer read the person (a mitigation, not a guarantee)",
        description="Write a copy of PHOTO whose face is changed within a budget so that ArcFace (what identity "
        "adapters read) reads another person, robust to JPEG, resizing and small shifts; or, with --check, measure "
        "how protected PHOTO is against its --reference original.")
    protect.add_argument("photo", metavar="PHOTO")
    protect.add_argument("--out", default=None, help="the protected PNG (required unless --check)")
    protect.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    bound = protect.add_mutually_exclusive_group()
    bound.add_argument("--budget", default="8/255", help="largest change of a pixel, e.g. 8/255 (default) or 0.03")
    bound.add_argument("--psnr", type=_finite, default=None, metavar="DB",
                       help="instead of --budget: the smallest PSNR of the protected photo, in dB (20-60)")
    protect.add_argument("--against", default="arcface", help="encoders to fool, comma-separated (arcface)")
    protect.add_argument("--steps", type=_positive_int, default=60, help="gradient steps (default 60)")
    protect.add_argument("--seed", type=_seed, default=0)
    protect.add_argument("--check", action="store_true", help="measure PHOTO against --reference instead")
    protect.add_argument("--reference", default=None, metavar="ORIGINAL", help="with --check: the original photo")
    protect.add_argument("--face-model", default=DEFAULT_FACE_PACK,
                         help=f"insightface pack name or folder, or 'tiny' (default {DEFAULT_FACE_PACK})")
    protect.add_argument("--detector", choices=("auto", "scrfd", "dlib"), default="auto")
    protect.set_defaults(run=run_protect)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the work runs (idgen.workers)."""
    engine = parser.add_argument_group("workers (README: Beyond one machine)")
    engine.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                        help="worker processes, each loading the models once (default 1; with several GPUs, one per GPU)")
    engine.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads per worker (default: the cores shared out); images are identical for the same "
                        "--threads whatever --workers is")
    engine.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run the workers as Ray actors: on a cluster (its address, e.g. auto or "
                        "ray://HOST:10001), or on an instance started here when no address is given "
                        '(pip install "idgen[ray]")')


def _add_fix(commands: argparse._SubParsersAction) -> None:
    """The ``fix`` command's arguments."""
    fix = commands.add_parser(
        "fix",
        help="repaint the faces of a photo as the person in --face",
        description="Find the faces in --image, repaint each (or those of --fix-index) as the person in --face, and "
        "blend them back under a feathered oval: every pixel outside it stays as it was.",
    )
    fix.add_argument("--image", required=True, metavar="PHOTO", help="the photo whose faces to repaint")
    fix.add_argument("--face", action="append", required=True, metavar="PHOTO",
                     help="photo of the person to put in; repeat for several photos of the same person")
    fix.add_argument("--prompt", default="a photo of a person", help="what each face crop shows")
    fix.add_argument("--negative-prompt", default=None)
    fix.add_argument("--out", default="fixed.png", help="output PNG (default fixed.png)")
    fix.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    fix.add_argument("--fix-index", type=int, action="append", default=None, metavar="N",
                     help="which face of --image to repaint, 0 = largest; repeatable (default: every face)")
    fix.add_argument("--strength", type=_strength, default=0.6, help="how much of each face is redrawn (default 0.6)")
    fix.add_argument("--seed", type=int, default=0)
    _add_model_arguments(fix)
    fix.set_defaults(run=run_fix)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    """The ``eval`` command's arguments."""
    ev = commands.add_parser(
        "eval",
        help="generate for reference identities and prompts, and report FaceSim, detection rate and CLIP-T",
        description="For each identity (a sub-folder of --refs with its photos), each prompt and each seed, "
        "generate an image and measure it. Writes OUT/images/, OUT/report.json, OUT/report.md and OUT/grid.png.",
    )
    ev.add_argument("--refs", required=True, help="folder with one sub-folder of reference photos per identity")
    ev.add_argument("--prompts", default=None, help="text file, one prompt per line")
    ev.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; with or instead of --prompts)")
    ev.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument("--clip-model", default=None,
                    help="CLIP for CLIP-T: hub id or folder (default openai/clip-vit-large-patch14; the tiny preset's "
                    "offline), or 'none'")
    _add_model_arguments(ev)
    ev.set_defaults(run=run_eval)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    """The ``demo`` command's arguments."""
    demo = commands.add_parser("demo", help="serve the Gradio demo (http://127.0.0.1:7860)",
                               description="Serve the Gradio demo; the models load once, at start.")
    _add_model_arguments(demo)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.set_defaults(run=run_demo)


def _add_verify(commands: argparse._SubParsersAction) -> None:
    """The ``verify`` command's arguments."""
    verify = commands.add_parser(
        "verify",
        help="tell whether images carry idgen's invisible watermark",
        description="Read idgen's watermark (and the PNG metadata) of each image; one line per file. Exit code: "
        "0 every file carries an idgen mark, 1 some carry none, 3 some carry a damaged one, 2 some are unreadable.",
    )
    verify.add_argument("images", nargs="+", metavar="IMAGE")
    verify.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    verify.set_defaults(run=run_verify)


def _add_tune(commands: argparse._SubParsersAction) -> None:
    """The ``tune`` command's arguments."""
    tune_cmd = commands.add_parser(
        "tune",
        help="learn a small LoRA on a few photos of one person, on top of the identity adapter",
        description="Prepare the photos of FOLDER (one person, 1-20 photos) and train a LoRA on them with the "
        "identity adapter conditioning every step; OUT gets pytorch_lora_weights.safetensors, which "
        "`idgen generate --lora OUT` loads. --resume latest continues a stopped run.",
    )
    tune_cmd.add_argument("folder")
    tune_cmd.add_argument("--out", required=True, help="output folder (the LoRA, checkpoints and the prepared photos)")
    tune_cmd.add_argument("--base", default="tiny", help="base model, as for generate (default: the offline tiny preset)")
    tune_cmd.add_argument("--adapter", default=None, help="identity adapter to tune on, as for generate")
    tune_cmd.add_argument("--weight-name", default=None)
    tune_cmd.add_argument("--face-model", default=None, help="insightface pack (default: the method's)")
    tune_cmd.add_argument("--steps", type=_positive_int, default=200, help="training steps (default 200)")
    tune_cmd.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (default 8)")
    tune_cmd.add_argument("--learning-rate", type=float, default=1e-4)
    tune_cmd.add_argument("--resolution", type=_dimension, default=None,
                          help="training size in pixels (default: the base model's native size)")
    tune_cmd.add_argument("--resume", default=None, help="'latest' or a checkpoint-N folder")
    tune_cmd.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    tune_cmd.set_defaults(run=run_tune)


def _add_prepare_data(commands: argparse._SubParsersAction) -> None:
    """The ``prepare-data`` command's arguments."""
    prep = commands.add_parser(
        "prepare-data",
        help="detect, align and embed a folder of face photos once, for training",
        description="Embed every photo of FOLDER (captions from a .txt beside each image or metadata.jsonl) "
        "into OUT; photos without exactly one large enough face are listed in OUT/skipped.jsonl. "
        "Re-runs process only new photos.",
    )
    prep.add_argument("folder")
    prep.add_argument("--out", required=True)
    prep.add_argument("--face-model", default=DEFAULT_FACE_PACK,
                      help=f"insightface pack name or folder, or 'tiny' for the offline preset's (default {DEFAULT_FACE_PACK})")
    prep.add_argument("--detector", choices=("auto", "scrfd", "dlib"), default="auto")
    prep.add_argument("--min-face-size", type=_positive_int, default=64, help="smallest face side kept, in pixels")
    prep.add_argument("--shard-size", type=_positive_int, default=256, metavar="N",
                      help="photos per shard (default 256): each shard is one worker's task, added to the index as it "
                      "finishes")
    _add_engine_arguments(prep)
    prep.set_defaults(run=run_prepare_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idgen", description="Identity-preserving image generation.")
    parser.add_argument("--version", action="version", version=f"idgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_generate(commands)
    _add_batch(commands)
    _add_synth(commands)
    _add_protect(commands)
    _add_fix(commands)
    _add_eval(commands)
    _add_demo(commands)
    _add_verify(commands)
    _add_tune(commands)
    _add_prepare_data(commands)
    return parser


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise IDGenError(f"prompt file {args.prompts} does not exist: check the path")
        with open(args.prompts) as handle:
            prompts += [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise IDGenError("no prompt: pass --prompts FILE (one per line) or --prompt TEXT")
    return prompts


def _options(args: argparse.Namespace):
    """The session options of the parsed flags (one --face-index, or one per --face photo)."""
    import diffusers  # lazy: off `idgen --help`'s path
    import transformers  # lazy: off `idgen --help`'s path


    for library in (diffusers, transformers):  # model loading bars; the denoising bar stays
        library.utils.logging.disable_progress_bar()
    options = SessionOptions.from_namespace(args)
    options.face_index = _face_index(args)
    return options


def _session(args: argparse.Namespace):
    from .session import start_session  # lazy: off `idgen --help`'s path

    return start_session(_options(args))


def _face_index(args: argparse.Namespace) -> int | list[int]:
    """One --face-index for every photo, or one per --face photo."""
    indices = args.face_index or [0]
    if len(indices) == 1:
        return indices[0]
    photos = getattr(args, "face", None)
    if photos is None or len(indices) != len(photos):
        count = f"{len(photos)} --face photo(s)" if photos else "photos whose number varies"
        raise IDGenError(f"{len(indices)} --face-index values for {count}: give one, or one per --face photo")
    return indices


def _uses_prompt(args: argparse.Namespace) -> bool:
    """From the names alone (no model is read): whether the method takes a prompt (not Arc2Face)."""
    arc2face = METHODS["arc2face"]
    return not (args.base == "tiny-arc2face" or (args.adapter and arc2face.recognises(args.adapter, args.weight_name)))


def check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model: they run before the heavy imports, so a typo fails at once."""
    if hasattr(args, "id_start"):
        check_id_window(args.id_start, args.id_end)
    if hasattr(args, "face_index"):
        _face_index(args)
    if getattr(args, "timesteps", None):
        check_timesteps(args.timesteps, args.steps)
    for flag in ("height", "width"):
        if (getattr(args, flag, None) or 0) > getattr(args, "max_side", MAX_SIDE):
            raise IDGenError(f"--{flag} {getattr(args, flag)} is over --max-side {args.max_side}: pass --max-side "
                             f"{getattr(args, flag)} to allow it (memory grows with the pixels)")
    if args.command == "generate":
        if args.num_images > args.max_images:
            raise IDGenError(f"--num-images {args.num_images} is over --max-images {args.max_images}: pass --max-images "
                             f"{args.num_images} to allow it (images are rendered --batch-size at a time)")
        if args.seed + args.num_images > 2**64:
            raise IDGenError(f"--seed {args.seed} with --num-images {args.num_images} runs past the largest seed, "
                             "2**64 - 1 (image i has seed + i): choose a smaller --seed")
    for text in getattr(args, "lora", None) or []:
        parse_lora(text)
    if args.command == "fix":
        _output_paths(args.out, 1, args.overwrite)
    if args.command == "generate":
        _output_paths(args.out, args.num_images, args.overwrite)
        _check_people(args)
        if _uses_prompt(args) and not args.prompt:
            raise IDGenError("--prompt is required (only Arc2Face generates from the identity alone)")
        if args.fix_faces and not _uses_prompt(args):
            raise IDGenError("--fix-faces inpaints with FaceID or InstantID: Arc2Face generates whole portraits only")
        if not _uses_prompt(args):
            ignored = [flag for flag, given in (
                ("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt), ("--id-scale", args.id_scale),
                ("--id-start", args.id_start != 0.0), ("--id-end", args.id_end != 1.0)) if given]
            if ignored:
                print(f"idgen: warning: Arc2Face generates from the identity alone: ignoring {', '.join(ignored)}",
                      file=sys.stderr)


def _check_people(args: argparse.Namespace) -> None:
    if args.face_region:
        args.people = True
        if len(args.face_region) != len(args.face):
            raise IDGenError(f"{len(args.face_region)} --face-region for {len(args.face)} --face photo(s): give one region "
                             "per person, in the order of their --face")
    if args.face_order and not (args.people and args.kps_image):
        raise IDGenError("--face-order picks the faces of --kps-image for --people: add both, or leave it out")
    if args.people and not _uses_prompt(args):
        raise IDGenError("--people places several people with FaceID or InstantID; Arc2Face makes one portrait")
    if args.recover_words and args.id_fusion != "freecure":
        raise IDGenError("--recover-words names what --id-fusion freecure recovers: add it, or leave them out")
    if args.id_fusion and not _uses_prompt(args):
        raise IDGenError("--id-fusion merges the identity with the prompt: Arc2Face has no prompt")


def run_eval(args: argparse.Namespace) -> None:
    from .eval.run import evaluate  # lazy: off `idgen --help`'s path

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise IDGenError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    prompts = _prompts(args)
    report = evaluate(_session(args), args.refs, prompts, seeds, args.out, args.clip_model)
    summary = report.summary()
    print(f"{summary['images']} images, face detection rate {summary['face_detection_rate']:.2f}, "
          f"FaceSim {summary['facesim'] if summary['facesim'] is not None else 'n/a'}, report in {args.out}/report.md")


def run_demo(args: argparse.Namespace) -> None:
    from .demo import serve  # lazy: off `idgen --help`'s path

    serve(_options(args), args.host, args.port)


#: ``idgen verify`` exit codes, the most serious status of any file first.
VERIFY_EXIT = {"unreadable": 2, "damaged": 3, "none": 1, "idgen": 0}


def run_verify(args: argparse.Namespace) -> int:
    from idgen.watermark import describe, verify  # lazy: off `idgen --help`'s path

    reports = [verify(path) for path in args.images]
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        for report in reports:
            print(f"{report['file']}: {describe(report)}")
    return next((code for status, code in VERIFY_EXIT.items() if any(r["status"] == status for r in reports)), 0)


def run_tune(args: argparse.Namespace) -> None:
    from idgen.train.data import prepare_data  # lazy: off `idgen --help`'s path
    from idgen.train.tune import TuneConfig, tune  # lazy: off `idgen --help`'s path

    from .session import start_session  # lazy: off `idgen --help`'s path

    session = start_session(base=args.base, adapter=args.adapter, weight_name=args.weight_name,
                            face_model=args.face_model)
    session.adapter_state = None  # training reads its init_adapter itself: no copy kept meanwhile
    if session.method.checkpoint_format not in ("faceid", "instantid"):
        raise IDGenError(f"tuning runs on FaceID or InstantID adapters; {session.adapter} is {session.method.name}")
    data = os.path.join(args.out, "data")
    report = prepare_data(args.folder, data, session.analyzer)
    print(f"{report.total} photo(s) of the person in {data}, {len(report.skipped)} skipped", file=sys.stderr)
    if not 1 <= report.total <= 20:
        raise IDGenError(f"tuning takes 1 to 20 photos of one person; {args.folder} gave {report.total}")
    from diffusers import UNet2DConditionModel  # lazy: off `idgen --help`'s path

    native = UNet2DConditionModel.load_config(session.base, subfolder="unet")["sample_size"] * 8  # without loading it
    config = TuneConfig(base=session.base, data=data, output_dir=args.out, init_adapter=session.adapter_file,
                        adapter_format=session.method.checkpoint_format, tune_rank=args.rank,
                        learning_rate=args.learning_rate, max_train_steps=args.steps, resolution=args.resolution or native)
    tune(config, resume=args.resume, overwrite=args.overwrite)


def run_prepare_data(args: argparse.Namespace) -> None:
    from idgen.train.data import prepare_data  # lazy: off `idgen --help`'s path

    from .session import face_pack  # lazy: off `idgen --help`'s path

    report = prepare_data(args.folder, args.out, FaceAnalyzer(face_pack(args.face_model), detector=args.detector),
                          min_face_size=args.min_face_size, shard_size=args.shard_size, engine=_engine(args))
    for item in report.skipped:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    print(f"{report.added} photo(s) added, {len(report.skipped)} skipped, {report.total} in {args.out}")


def _output_paths(out: str, count: int, overwrite: bool = False) -> list[str]:
    """The PNG files ``--out`` names (``out-0.png`` ... for several images), checked: a folder that
    exists and can be written, no file replaced unless ``overwrite``. What a killed run left there
    half-written goes."""
    if not out.lower().endswith(".png"):
        raise IDGenError(f"--out {out} must end in .png: images are written as PNG with their settings as metadata")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise IDGenError(f"the folder of --out ({folder}) does not exist: create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise IDGenError(f"the folder of --out ({folder}) cannot be written: choose another path")
    paths = [out] if count == 1 else [f"{out[: -len('.png')]}-{i}.png" for i in range(count)]
    taken = [path for path in paths if os.path.exists(path)]
    if taken and not overwrite:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise IDGenError(f"{taken[0]}{more} exists: pass --overwrite to replace it, or choose another --out")
    remove_stale_temporaries(folder)
    return paths


def run_generate(args: argparse.Namespace) -> None:
    from .generate import identity_inputs, render  # lazy: off `idgen --help`'s path

    paths = _output_paths(args.out, args.num_images, args.overwrite)
    # Inputs first: a bad photo or adapter file fails in seconds, before the base model loads.
    session = _session(args)
    identity = identity_inputs(session, args)
    pipe = session.load()
    for path in render(session, pipe, args, paths, identity):
        print(path)


def _engine(args: argparse.Namespace, gpus: int = 0) -> Engine:
    """Where the work runs: --workers (default 1, or one per GPU), --threads, --ray."""
    return Engine(workers=args.workers or max(gpus, 1), ray=args.ray, gpus=gpus, threads=args.threads)


class _RowParser(argparse.ArgumentParser):
    """A jobs file row's options, parsed as generate's flags: an error is the row's, not an exit."""

    def error(self, message: str) -> NoReturn:
        raise IDGenError(message)


def _row_parser() -> _RowParser:
    """generate's request and model flags, with no defaults: a row's namespace holds what it sets."""
    parser = _RowParser(prog="job", add_help=False)
    _add_request_arguments(parser, face_required=False)
    _add_model_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def _row_argv(row: dict[str, Any], parser: argparse.ArgumentParser, folder: str) -> list[str]:
    """A row's options as generate's flags (``id_scale: 0.8`` -> ``--id-scale 0.8``; a list repeats
    its flag; a true switch is its flag)."""
    from .batch import PHOTO_KEYS, photos  # lazy: off `idgen --help`'s path

    argv: list[str] = []
    for key, value in row.items():
        if key == "id":
            continue
        flag = "--" + str(key).replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None or key in ("out", "overwrite"):
            raise IDGenError(f"unknown option {key!r} (a row takes generate's options, e.g. face, prompt, seed, id_scale)")
        if key in PHOTO_KEYS:
            value = photos(value, folder)
        if action.nargs == 0:  # a switch: --people
            argv += [flag] if str(value).lower() in ("true", "1", "yes") else []
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [flag, str(item)]
    return argv


def _jobs(args: argparse.Namespace, batch_options: SessionOptions) -> list:
    """The jobs of ``args.jobs``, each parsed and checked as a generate request (``--out`` in DIR);
    a row that is not one keeps its error."""
    from .batch import Job, job_id, read_rows  # lazy: off `idgen --help`'s path

    parser, folder, jobs, seen = _row_parser(), os.path.dirname(os.path.abspath(args.jobs)), [], set()
    for line, row in read_rows(args.jobs):
        if isinstance(row, str):
            jobs.append(Job(f"line-{line:06d}", line, {}, error=row))
            continue
        try:
            job = Job(job_id(row, line), line, row)
        except IDGenError as err:
            jobs.append(Job(f"line-{line:06d}", line, row, error=str(err)))
            continue
        if job.id in seen:
            job.error = f"id {job.id} is taken by an earlier row: give each row its own id"
        seen.add(job.id)
        jobs.append(job)
        if job.error:
            continue
        try:
            request = argparse.Namespace(**vars(args))
            vars(request).update(vars(parser.parse_args(_row_argv(row, parser, folder))))
            if not request.face:
                raise IDGenError("no face: give the row a face (a photo, several, or a folder)")
            vars(request).update(command="generate", out=os.path.join(args.out, f"{job.id}.png"), overwrite=True)
            check_arguments(request)
            options = _options(request)
            check_call_options(batch_options, options)
            job.args, job.options = request, options
        except IDGenError as err:
            job.error = str(err)
    return jobs


def run_batch(args: argparse.Namespace) -> int:
    import torch  # lazy: off `idgen --help`'s path

    from .batch import run_batch as render_batch  # lazy: off `idgen --help`'s path

    os.makedirs(args.out, exist_ok=True)
    options = _options(args)
    jobs = _jobs(args, options)
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") and torch.cuda.device_count() > 1 else 0
    report = render_batch(jobs, args.out, options, _engine(args, gpus))
    for row in report.failed:
        print(f"idgen: job {row['job']} (line {row['line']}) failed: {row['error']}", file=sys.stderr)
    print(f"{report.rendered} job(s) run, {report.skipped} done before, {len(report.failed)} failed; manifest in "
          f"{os.path.join(args.out, 'manifest.parquet')}")
    return 1 if report.failed else 0


def run_synth(args: argparse.Namespace) -> None:
    from .synth import SynthSettings, synthesize  # lazy: off `idgen --help`'s path

    if (args.identities is None) == (args.from_photos is None):
        raise IDGenError("give --identities N (sampled identities) or --from-photos FOLDER, one of them")
    settings = SynthSettings(args.identities or 0, args.images_per_identity, args.min_angle, args.seed, args.filter,
                             args.min_face_sim, args.max_other_sim, args.shard_size)
    card = synthesize(_options(args), settings, args.out, _engine(args), args.from_photos)
    print(f"{card['images_kept']} of {card['images_rendered']} images kept, {card['identities_kept']} of "
          f"{card['identities']} identities; card in {os.path.join(args.out, 'card.md')}")


def run_protect(args: argparse.Namespace) -> None:
    from .protect import ProtectSettings, check, parse_budget, protect  # lazy: off `idgen --help`'s path
    from .session import face_pack  # lazy: off `idgen --help`'s path

    against = tuple(name.strip() for name in args.against.split(",") if name.strip())
    settings = ProtectSettings(budget=parse_budget(args.budget), psnr=args.psnr, steps=args.steps, seed=args.seed,
                               against=against)
    analyzer = FaceAnalyzer(face_pack(args.face_model), detector=args.detector)
    if args.check:
        if not args.reference:
            raise IDGenError("--check measures PHOTO against its original: add --reference ORIGINAL")
        for encoder, cosines in check(args.photo, args.reference, analyzer, settings.against).items():
            print(f"{encoder}: cosine to the original " + ", ".join(f"{k} {v:.4f}" for k, v in cosines.items()))
        return
    if not args.out:
        raise IDGenError("--out is required: the protected photo is written there (or pass --check)")
    _output_paths(args.out, 1, args.overwrite)
    result = protect(args.photo, analyzer, settings)
    save_png(result.image, args.out, {"protected": "idgen protect", "against": ",".join(against), **result.summary()})
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in result.summary().items()))


def run_fix(args: argparse.Namespace) -> None:
    session = _session(args)
    if not session.method.uses_prompt:
        raise IDGenError("face fix inpaints with FaceID or InstantID: Arc2Face generates whole portraits only")
    from .facefix import fix_faces  # lazy: off `idgen --help`'s path

    photo = load_image(args.image, session.options.max_pixels)  # a bad photo fails before the models load
    id_embeds = session.identity(args.face)
    pipe = session.load()
    identity = dict(session.clip_inputs(pipe, args.face), id_embeds=id_embeds)
    fixed, settings = fix_faces(session, pipe, photo, identity, args.prompt, args.seed, args.strength, args.fix_index,
                                args.negative_prompt)
    session.save(fixed, args.out, pipe, args.seed, prompt=args.prompt, negative_prompt=args.negative_prompt,
                 faces=", ".join(args.face), source_image=args.image, **settings)
    print(args.out)


#: What the machine, not idgen, says no to: a full disk or quota, a read-only or forbidden place.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: Sequence[str] | None = None) -> int:
    # Quiet the libraries' own notices; the progress bar and errors are what a user needs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars; the denoising bar stays
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # no retry chatter: a failed download ends in one error line
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        code = args.run(args)
    except IDGenError as err:
        print(f"idgen: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _USER_OS_ERRORS:  # a bug, not the machine: the traceback says where
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"idgen: error: {err.strerror}{where}: free space on the disk, or use files and folders this user may "
              "read and write (--out, output_dir)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idgen: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
