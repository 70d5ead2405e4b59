"""A LoRA fused into the weights it adapts, and unfused exactly.

Run through peft, a LoRA adds two matrix products to every adapted layer at every step; FaceID's
is rank 128 on every attention projection of the UNet, which costs a diffusion step about a third
more. Fused (``W + up @ down``) the UNet runs at the base model's cost. peft unmerges by
subtracting the product again, which in half precision does not give the base weights back;
``FusedLoRA`` keeps the original weights on the CPU and copies them back, so unfusing restores
the model bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

#: A LoRA as ``(down, up)`` per adapted linear layer, keyed by the layer's module path.
LoRALayers = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _weight(model: nn.Module, path: str) -> nn.Parameter:
    layer = model.get_submodule(path)
    return cast(nn.Parameter, getattr(layer, "base_layer", layer).weight)  # under a peft wrapper: the base layer's


def holds_plain_weights(model: nn.Module, paths: Iterable[str] | None = None) -> bool:
    """Whether the linear layers at ``paths`` (default: all of ``model``'s) keep plain floating-point
    weights a LoRA can be added to. Quantized weights (torchao's, bitsandbytes', GGUF's) live in
    tensor types of their own: a LoRA on them runs unfused, through peft."""
    if paths is None:
        paths = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for path in paths:
        weight = _weight(model, path)
        if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point or weight.dtype.itemsize < 2:
            return False
    return True


class FusedLoRA:
    """``layers`` merged into ``model``'s weights at ``scale``; ``unfuse`` puts the originals back.

    The product is computed in float32 and rounded once to the weight's dtype. The originals
    (about the size of the adapted layers, in their dtype) stay on the CPU while fused.
    """

    def __init__(self, model: nn.Module, layers: LoRALayers, scale: float = 1.0):
        self.model, self.scale = model, scale
        self.originals: dict[str, torch.Tensor] = {}
        try:  # all layers or none: a failure puts the ones already fused back
            for path, (down, up) in layers.items():
                weight = _weight(model, path)
                if weight.device.type == "meta":
                    raise RuntimeError(
                        "the UNet's weights are offloaded (enable_sequential_cpu_offload): load the identity adapter "
                        "before enabling offload, or pass fuse_lora=False"
                    )
                self.originals[path] = weight.detach().to("cpu", copy=True)
                delta = up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)
                weight.data.copy_((weight.detach().float() + scale * delta).to(weight.dtype))
        except BaseException:
            self.unfuse()
            raise

    def unfuse(self) -> None:
        """Copy the original weights back (cast to the layer's current dtype and device)."""
        for path, original in self.originals.items():
            weight = _weight(self.model, path)
            weight.data.copy_(original.to(weight.device, weight.dtype))
        self.originals = {}


def peft_lora_state_dict(layers: LoRALayers, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """``layers`` in peft's key naming (``<prefix>.<path>.lora_A.weight``), as diffusers'
    ``load_lora_weights`` reads it; no alpha, so the LoRA acts at scale 1."""
    state: dict[str, torch.Tensor] = {}
    for path, (down, up) in layers.items():
        state[f"{prefix}.{path}.lora_A.weight"] = down
        state[f"{prefix}.{path}.lora_B.weight"] = up
    return state
