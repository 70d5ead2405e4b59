"""Memory and speed tiers: diffusers' quantization, offloading, caches and compile behind five
switches (``--quantize``, ``--gguf``, ``--offload``, ``--cache``, ``--compile``) and ``--memory auto``,
which picks the fastest tier that fits the GPU's free memory.

Each switch is diffusers' own machinery, applied in the one order that keeps the identity acting:
weights are quantized as the base loads, the identity adapter goes in next (FaceID's LoRA fused
into plain weights, run by peft on quantized ones), then float8 storage, placement (offload), the
cache (after the identity's hooks, so it skips them with their blocks) and the compiler last.
The identity modules are small and stay in the compute dtype: no switch quantizes them.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import transformers
from diffusers import (
    DiffusionPipeline,
    FirstBlockCacheConfig,
    FluxTransformer2DModel,
    GGUFQuantizationConfig,
    PipelineQuantizationConfig,
    TaylorSeerCacheConfig,
    UNet2DConditionModel,
)

from idgen.errors import IDGenError

from .options import COMPILE, FBC_THRESHOLD, OFFLOAD, QUANTIZE, SessionOptions, parse_cache

GIB = 1024**3


@dataclass(frozen=True)
class Tier:
    """How the models are held and run: quantized weights (``quantize`` or a ``gguf`` denoiser
    file), where they live between uses (``offload``), a step cache and the compiler."""

    quantize: str | None = None
    gguf: str | None = None
    offload: str | None = None
    cache: str | None = None  # "fbc", "fbc:THRESHOLD" or "taylorseer"
    compile: str | None = None
    chosen: str | None = None  # why --memory auto chose it

    def __str__(self) -> str:
        parts = [f"{self.quantize} weights" if self.quantize else None,
                 f"GGUF {os.path.basename(self.gguf)}" if self.gguf else None,
                 f"{self.offload} offload" if self.offload else None,
                 f"{self.cache} cache" if self.cache else None,
                 f"{self.compile} compile" if self.compile else None]
        text = ", ".join(part for part in parts if part) or "plain"
        return f"{text} ({self.chosen})" if self.chosen else text


def requested_tier(options: SessionOptions) -> Tier:
    """The tier the options name (``--memory auto`` is resolved at load, for the device)."""
    if options.memory == "auto" and (options.quantize or options.gguf or options.offload):
        raise IDGenError("--memory auto picks --quantize and --offload itself: leave them out, or leave out "
                         "--memory auto to choose them")
    tier = Tier(options.quantize, options.gguf, options.offload, options.cache,
                "full" if options.compile is True else options.compile or None)
    for flag, value, choices in (("--quantize", tier.quantize, QUANTIZE), ("--offload", tier.offload, OFFLOAD),
                                 ("--compile", tier.compile, COMPILE), ("--memory", options.memory, ("auto",))):
        if value is not None and value not in choices:
            raise IDGenError(f"{flag} {value}: use {', '.join(choices)}")
    if tier.cache:
        parse_cache(tier.cache)
    return tier


def check_tier(tier: Tier, family: str, checkpoint_format: str | None, device_type: str) -> None:
    """Each tier that cannot run here, or not with this method, is refused in one line before
    anything loads."""
    if tier.quantize and tier.gguf:
        raise IDGenError("--gguf holds quantized weights already: leave --quantize out")
    if family == "arc2face" and (tier.quantize in ("int8", "nf4") or tier.gguf):
        raise IDGenError("Arc2Face's UNet loads from its own repo, unquantized: leave out --gguf and --quantize "
                         "int8/nf4 (--quantize fp8 and --offload work)")
    if tier.quantize == "nf4" and device_type != "cuda":
        raise IDGenError("--quantize nf4 (bitsandbytes) needs a CUDA GPU: on this device use --quantize int8 or fp8")
    needs = {"int8": ("torchao", 'pip install "idgen[quantize]"'), "nf4": ("bitsandbytes", "pip install bitsandbytes")}
    if tier.quantize in needs:
        module, fix = needs[tier.quantize]
        if importlib.util.find_spec(module) is None:
            raise IDGenError(f"--quantize {tier.quantize} needs {module}, which is not installed: {fix}")
    if tier.offload == "sequential" and device_type == "cpu":
        raise IDGenError("--offload sequential streams weights to a GPU layer by layer: this run is on the CPU, "
                         "where everything is in memory already; leave it out")
    if tier.gguf:
        if importlib.util.find_spec("gguf") is None:
            raise IDGenError('--gguf needs the gguf package, which is not installed: pip install "idgen[quantize]"')
        if not os.path.isfile(tier.gguf) or not tier.gguf.endswith(".gguf"):
            raise IDGenError(f"--gguf {tier.gguf} is not a .gguf file: pass the denoiser's GGUF file (a FLUX "
                             "transformer or a UNet, e.g. flux1-dev-Q8_0.gguf)")
    if tier.cache:
        if family != "flux":
            raise IDGenError("--cache is for FLUX: diffusers' caches skip transformer blocks, and SD1.5/SDXL UNets "
                             "have none; leave it out")
        if tier.cache.startswith("fbc") and checkpoint_format == "infiniteyou":
            raise IDGenError("--cache fbc skips whole transformer blocks, and InfiniteYou's InfuseNet adds to each "
                             "of them: use --cache taylorseer")


def denoiser_name(family: str) -> str:
    return "transformer" if family == "flux" else "unet"


def quantization_config(tier: Tier, family: str, dtype: torch.dtype) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` for ``--quantize int8`` (torchao, weight-only) or
    ``nf4`` (bitsandbytes) of the denoiser, and FLUX's T5 text encoder too; None otherwise
    (``fp8`` is float8 storage, applied after loading)."""
    if tier.quantize not in ("int8", "nf4"):
        return None
    def config(library: Any) -> Any:
        if tier.quantize == "int8":
            from torchao.quantization import Int8WeightOnlyConfig  # lazy: optional dependency (idgen[quantize])

            return library.TorchAoConfig(Int8WeightOnlyConfig())
        return library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)

    mapping = {"transformer": config(diffusers), "text_encoder_2": config(transformers)} if family == "flux" else {
        "unet": config(diffusers)}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def gguf_denoiser(tier: Tier, base: str, family: str, dtype: torch.dtype) -> dict[str, Any]:
    """``{"unet"|"transformer": model}`` read from the ``--gguf`` file (its config from the base
    model's folder or repo), for ``from_pretrained``; empty without ``--gguf``."""
    if not tier.gguf:
        return {}
    name = denoiser_name(family)
    cls = FluxTransformer2DModel if family == "flux" else UNet2DConditionModel
    try:
        model = cls.from_single_file(tier.gguf, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                                     config=base, subfolder=name, torch_dtype=dtype)
    except Exception as err:  # another model's file, a damaged file
        raise IDGenError(f"--gguf {tier.gguf} is not a {cls.__name__} for {base} ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}): pass the GGUF file "
                         "of this base model's denoiser") from None
    return {name: model}


def place(pipe: Any, tier: Tier, device: str) -> None:
    """Float8 storage, then the models on ``device`` (or offloaded to the CPU between uses), then
    the cache: after the identity adapter is in (``compile_models`` comes last, after any LoRA)."""
    family_denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    dtype = family_denoiser.dtype
    if tier.quantize == "fp8":  # weights stored in float8, each layer cast up to the compute dtype as it runs
        family_denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    target = torch.device(device)
    if tier.offload == "model":
        pipe.enable_model_cpu_offload(device=target)
    elif tier.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=target)
    elif tier.offload == "group":
        pipe.enable_group_offload(target, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=target.type == "cuda")
    else:
        pipe.to(device)
    if tier.cache:
        name, _, threshold = tier.cache.partition(":")
        config = (FirstBlockCacheConfig(threshold=float(threshold or FBC_THRESHOLD)) if name == "fbc"
                  else TaylorSeerCacheConfig())
        family_denoiser.enable_cache(config)


def compile_models(pipe: Any, regional: bool = False) -> None:
    """Compile the denoiser and the ControlNet (IdentityNet, InfuseNet), if any, in place: the whole
    model in one graph, or (``regional``) its repeated block once, reused by every block, which
    compiles in a fraction of the time. Identity attention is in the graph; channels-last on CUDA.
    The first call waits for the compiler."""
    for model in (getattr(pipe, "unet", None) or pipe.transformer, getattr(pipe, "controlnet", None)):
        if model is None:
            continue
        if model.device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        if regional and getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(fullgraph=True)
        else:
            model.compile(fullgraph=True)


# ---------------------------------------------------------------- --memory auto
def _safetensors_numel(path: str) -> int:
    """The number of values in a .safetensors file, from its header (nothing else is read)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def component_sizes(folder: str, dtype: torch.dtype) -> dict[str, int]:
    """Bytes each component of a diffusers folder takes in ``dtype``, from its .safetensors headers
    (one variant each: the plain files, else the fp16 ones)."""
    sizes = {}
    for sub in sorted(os.listdir(folder)):
        files = sorted(glob.glob(os.path.join(folder, sub, "*.safetensors")))
        plain = [f for f in files if ".fp16." not in f and ".bf16." not in f]
        files = plain or [f for f in files if ".fp16." in f] or files
        if files:
            sizes[sub] = sum(_safetensors_numel(f) for f in files) * dtype.itemsize
    return sizes


#: The tiers --memory auto tries, fastest first, with the share of each model's bytes that sits on
#: the GPU at once: all of them, the largest one (model offload), then quantized (int8 halves
#: 16-bit weights; NF4 keeps about 0.28 of them with its scales), then one block at a time.
AUTO_TIERS = (
    (Tier(), "all"),
    (Tier(offload="model"), "largest"),
    (Tier(quantize="int8", offload="model"), "largest"),
    (Tier(quantize="nf4", offload="model"), "largest"),
    (Tier(quantize="int8", offload="group"), "block"),
    (Tier(quantize="nf4", offload="group"), "block"),
    (Tier(offload="group"), "block"),
)
_SHARE = {None: 1.0, "int8": 0.5, "nf4": 0.28}


def needed_bytes(tier: Tier, sizes: dict[str, int], denoiser: str, quantized: tuple[str, ...], extra: int) -> int:
    """Estimated peak GPU bytes of ``tier`` for models of ``sizes``: ``extra`` (activations, the
    identity modules) plus the weights it holds on the GPU at once."""
    share = _SHARE[tier.quantize]
    held = {name: size * (share if name in quantized else 1.0) for name, size in sizes.items()}
    if tier.offload is None:
        weights = sum(held.values())
    elif tier.offload == "model":
        weights = max(held.values(), default=0)
    else:  # group offload: a block of the denoiser at a time, and the largest other model's block
        weights = held.get(denoiser, 0) / 8
    return int(weights + extra)


def choose_tier(sizes: dict[str, int], free: int, family: str, extra: int, available: tuple[str, ...]) -> Tier:
    """The fastest of ``AUTO_TIERS`` whose estimate fits ``free`` bytes, using only the quantizers
    ``available``; the smallest one when none fits (it says so)."""
    denoiser = denoiser_name(family)
    quantized = (denoiser, "text_encoder_2") if family == "flux" else (denoiser,)
    candidates = [tier for tier, _ in AUTO_TIERS if tier.quantize is None or tier.quantize in available]
    for tier in candidates:
        need = needed_bytes(tier, sizes, denoiser, quantized, extra)
        if need <= free:
            return dataclasses.replace(tier, chosen=f"--memory auto: ~{need / GIB:.1f} of {free / GIB:.1f} GiB free")
    tier = min(candidates, key=lambda tier: needed_bytes(tier, sizes, denoiser, quantized, extra))
    need = needed_bytes(tier, sizes, denoiser, quantized, extra)
    return dataclasses.replace(tier, chosen=f"--memory auto: the smallest tier, ~{need / GIB:.1f} GiB, and "
                                            f"{free / GIB:.1f} GiB free: it may not fit")


def auto_tier(tier: Tier, base: str, family: str, device: str, dtype: torch.dtype, pixels: int | None = None) -> Tier:
    """``--memory auto``: on a CUDA device, the quantization and offload of the fastest tier that
    fits its free memory (the cache and compile stay as asked); elsewhere the plain tier."""
    if torch.device(device).type != "cuda":
        return dataclasses.replace(tier, chosen=f"--memory auto: {torch.device(device).type} keeps every model in "
                                                "memory")
    folder = base if os.path.isdir(base) else DiffusionPipeline.download(base)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    pixels = pixels or (512 * 512 if family in ("sd15", "arc2face") else 1024 * 1024)
    # activations grow with the image: 2 GiB at 1024x1024 for FLUX, 1 GiB for a UNet; the identity's 1.5 GiB
    extra = int(((2 if family == "flux" else 1) * pixels / 1024**2 + 1.5) * GIB)
    available = tuple(q for q, module in (("int8", "torchao"), ("nf4", "bitsandbytes"))
                      if importlib.util.find_spec(module) is not None)
    chosen = choose_tier(component_sizes(folder, dtype), free, family, extra, available)
    return dataclasses.replace(chosen, cache=tier.cache, compile=tier.compile)
