"""Style and speed LoRAs beside the identity (``--lora PATH_OR_ID[:WEIGHT]``).

A LoRA is a file, a folder holding one, a hub repo (``latent-consistency/lcm-lora-sdv1-5``) or a
file in a hub repo (``ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors``), in any
format diffusers' ``load_lora_weights`` reads (diffusers/peft, kohya). They are loaded next to the
identity adapter's own LoRA, weighed, and fused into the weights so that steps cost what the base
model's do.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from idgen.errors import IDGenError
from idgen.formats import ID_LORA_NAME

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_FILE = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class LoRASpec:
    """One ``--lora``: where it loads from (a folder or hub repo, and the file in it) and its weight."""

    source: str
    weight_name: str | None = None
    weight: float = 1.0

    def __str__(self) -> str:
        where = os.path.join(self.source, self.weight_name) if self.weight_name else self.source
        return f"{where}:{self.weight:g}"


def parse_lora(text: str) -> LoRASpec:
    """``PATH_OR_ID[:WEIGHT]`` as a LoRASpec; local paths are checked, hub ids only for form."""
    source, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            source = head
        except ValueError:
            pass  # a ':' inside a path (C:\...)
    if not math.isfinite(weight):
        raise IDGenError(f"--lora {text}: the weight after ':' must be a finite number")
    if os.path.isfile(source):
        return LoRASpec(os.path.dirname(os.path.abspath(source)), os.path.basename(source), weight)
    if os.path.isdir(source):
        return LoRASpec(source, _folder_weight_name(source), weight)
    parts = source.split("/")
    if len(parts) >= 2 and _HUB_ID.fullmatch("/".join(parts[:2])) and not source.startswith((".", "/", "~")):
        if len(parts) == 2 and not source.endswith(_WEIGHT_FILE):
            return LoRASpec(source, None, weight)
        if len(parts) > 2 and source.endswith(_WEIGHT_FILE):
            return LoRASpec("/".join(parts[:2]), "/".join(parts[2:]), weight)
    raise IDGenError(f"--lora {source}: no such file or folder, and not a hub id: pass a LoRA file (.safetensors), "
                     "a folder holding one, owner/name, or owner/name/file.safetensors, with :WEIGHT after it if needed")


def _folder_weight_name(folder: str) -> str | None:
    """The LoRA file of a local folder: diffusers' usual name, else its only .safetensors file."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if "pytorch_lora_weights.safetensors" in files or len(files) == 1:
        return "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in files else files[0]
    found = ", ".join(files) if files else "none"
    raise IDGenError(f"--lora {folder}: expected one .safetensors LoRA file in this folder (found: {found}): "
                     "name the file, e.g. --lora FOLDER/FILE.safetensors")


def load_loras(pipe, loras: list[LoRASpec]) -> None:
    """Load ``loras`` into ``pipe`` beside its identity LoRA, weigh them, and fuse all of them
    (on quantized weights, which take no sum, they stay in peft)."""
    if not loras:
        return
    names = []
    for i, lora in enumerate(loras):
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(lora.source, weight_name=lora.weight_name, adapter_name=name)
        except Exception as err:  # missing repo, offline, not a LoRA, made for another base model
            if "size mismatch" in str(err):
                raise IDGenError(f"LoRA {lora} does not fit this base model: its layer shapes differ from the UNet's "
                                 "(a LoRA made for another base, e.g. an SDXL LoRA on SD1.5): use one made for "
                                 "this base") from None
            first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise IDGenError(f"could not load LoRA {lora} ({type(err).__name__}: {first_line}): pass a LoRA "
                             ".safetensors file, a folder holding one, or a reachable hub id") from None
        if name not in getattr(pipe.unet, "peft_config", {}):
            raise IDGenError(f"LoRA {lora} has no weights for this base model's UNet (it was made for another base "
                             "model, or holds only a text encoder): use a LoRA made for this base")
        names.append(name)

    weights = [lora.weight for lora in loras]
    identity = [ID_LORA_NAME] if ID_LORA_NAME in pipe.unet.peft_config else []  # at its full strength
    pipe.set_adapters(names + identity, weights + [1.0] * len(identity))
    from idgen.adapters import holds_plain_weights  # lazy: the command line parses LoRA flags without torch

    if holds_plain_weights(pipe.unet):
        pipe.fuse_lora(adapter_names=names + identity)
