"""What to run and how (``SessionOptions``), and the checks on it that need no model: the light
half of the loader, read by the command line before anything heavy is imported."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from idgen.errors import IDGenError
from idgen.faces import DEFAULT_MAX_PIXELS

#: The memory and speed switches (idgen.apps.tiers applies them).
QUANTIZE = ("int8", "fp8", "nf4")
OFFLOAD = ("model", "group", "sequential")
CACHES = ("fbc", "taylorseer")
COMPILE = ("full", "regional")
#: First-block cache: a step reuses the last residual of the other blocks while the first block's
#: output changes by less than this (relative L1). Higher skips more steps, and drifts further.
FBC_THRESHOLD = 0.12


#: The options one call may set for itself (each job of a batch); the others choose and place the
#: models, once per worker.
CALL_OPTIONS = ("num_zero", "ortho", "id_start_step", "true_cfg_scale", "face_index", "steps", "guidance", "id_scale",
                "id_start", "id_end", "height", "width", "timesteps", "trigger_word", "start_merge_step")


@dataclass
class SessionOptions:
    """What to run and how: the flags ``idgen generate``, ``eval`` and ``demo`` share."""

    base: str = "tiny"
    adapter: str | None = None
    weight_name: str | None = None
    subfolder: str | None = None
    identitynet: str | None = None  # InstantID's IdentityNet: folder or hub id ("none": without it)
    image_encoder: str | None = None  # FaceID-Plus's CLIP (default h94/IP-Adapter's) or PuLID's EVA02-CLIP (QuanSun/EVA-CLIP's)
    face_parser: str | None = None  # PuLID's face parser, facexlib's parsing_bisenet.pth (default: its release)
    num_zero: int | None = None  # PuLID: zero identity tokens (default 20; v1: 8)
    ortho: str | None = None  # PuLID: "off", "v1" or "v2" (default v2)
    infusenet: str | None = None  # InfiniteYou's InfuseNet folder or hub id (default: beside its projection)
    face_recognizer: str | None = None  # InfiniteYou's ArcFace, recognition_arcface_ir_se50.pth (default: facexlib's)
    id_start_step: int = 0  # FLUX: loop steps before the identity joins (PuLID-FLUX's "start step")
    true_cfg_scale: float = 1.0  # FLUX: true classifier-free guidance with the negative prompt when > 1
    face_model: str | None = None
    detector: Literal["auto", "scrfd", "dlib"] = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    face_index: int | list[int] = 0
    steps: int | None = None
    guidance: float | None = None
    id_scale: float | dict[str, float] | None = None
    id_start: float = 0.0
    id_end: float = 1.0
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    watermark: bool = True  # idgen's invisible mark on every image written (idgen.watermark)
    c2pa_cert: str | None = None  # Content Credentials: certificate chain (PEM) to sign with
    c2pa_key: str | None = None  # ... and its private key (PEM)
    lora: list[str] = field(default_factory=list)  # style/speed LoRAs, each PATH_OR_ID[:WEIGHT] (idgen.apps.loras)
    scheduler: str | None = None  # a name of idgen.apps.schedulers (default: the base model's)
    timesteps: list[int] | None = None  # the exact timesteps to sample at (DMD2: 999,749,499,249)
    compile: str | None = None  # "full" or "regional": torch.compile the denoiser and ControlNet (idgen.apps.tiers)
    quantize: str | None = None  # "int8" (torchao), "fp8" (float8 storage) or "nf4" (bitsandbytes, CUDA)
    gguf: str | None = None  # a GGUF file of the denoiser (FLUX transformer or UNet), quantized
    offload: str | None = None  # "model", "group" or "sequential": models on the CPU between uses
    cache: str | None = None  # FLUX: "fbc", "fbc:THRESHOLD" or "taylorseer"
    memory: str | None = None  # "auto": the fastest quantization and offload that fit the GPU's free memory
    trigger_word: str = "img"  # PhotoMaker: the word after the class word that marks the person
    start_merge_step: int | None = None  # PhotoMaker: steps with the prompt alone (default: 20% of the steps)

    @classmethod
    def from_namespace(cls, args: Any) -> SessionOptions:
        """The options found on a parsed argparse namespace."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def check_call_options(options: SessionOptions, call: SessionOptions) -> None:
    """A call (a batch's job) may change ``CALL_OPTIONS`` only: the others pick and place the models."""
    changed = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(options)
               if f.name not in CALL_OPTIONS and getattr(options, f.name) != getattr(call, f.name)]
    if changed:
        raise IDGenError(f"{', '.join(changed)}: the models are the batch's; set them on the command line, not per job")


def parse_cache(text: str) -> str:
    """``--cache``: ``fbc``, ``fbc:THRESHOLD`` (a positive number) or ``taylorseer``."""
    name, _, threshold = text.partition(":")
    if name not in CACHES or (threshold and name != "fbc"):
        raise IDGenError(f"--cache {text}: use fbc, fbc:THRESHOLD (e.g. fbc:{FBC_THRESHOLD}) or taylorseer")
    if threshold:
        try:
            value = float(threshold)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise IDGenError(f"--cache {text}: the threshold is a positive number, e.g. fbc:{FBC_THRESHOLD}")
    return text


def check_id_window(start: float, end: float) -> None:
    if not start < end:
        raise IDGenError(f"--id-start ({start}) must be below --id-end ({end})")


def check_timesteps(timesteps: Sequence[int], steps: int | None) -> None:
    """``--timesteps``: integers, strictly decreasing, not below 0, agreeing with ``--steps``."""
    if min(timesteps) < 0 or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise IDGenError(f"--timesteps {','.join(map(str, timesteps))} must decrease strictly from the noisiest "
                         "step, and not go below 0: e.g. 999,749,499,249")
    if steps is not None and steps != len(timesteps):
        raise IDGenError(f"--steps {steps} and --timesteps ({len(timesteps)} values) disagree: leave --steps out")
