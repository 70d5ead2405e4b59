"""Decoupled cross-attention: text and identity tokens share the query, not the keys.

``out = to_out(Attn(q, K_text, V_text) + id_scale * Attn(q, to_k_id(id), to_v_id(id)))``

The identity branch does not replace the UNet's attention processors. Each cross-attention
layer gets two hooks: one keeps the output of its ``to_q`` projection, the other adds the
identity attention to the input of ``to_out[0]``. Whatever computes the text attention
(diffusers' default processor, attention slicing, fused projections, xformers, a processor
set by the user) keeps working, the UNet's own modules and state dict stay untouched, and
``save_pretrained`` writes a plain UNet.

The identity keys and values are plain tensors set per call (``IdentityAdapter.set_tokens``);
while none are set the hooks do nothing, so a pipeline that shares the UNet runs it plain.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .regions import RegionWeights


class IdentityAttention(nn.Module):
    """The identity branch of one UNet cross-attention layer.

    Args:
        hidden_size: the attention layer's width (its ``to_out`` size).
        cross_attention_dim: width of the identity tokens.
        heads: the attention layer's number of heads.

    ``text_enabled = False`` drops the text branch (Infinite-ID's identity-enhanced training:
    the identity branch learns without the prompt to lean on).
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, heads: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.heads = heads
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.text_enabled = True
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # 0-d tensor: this layer's id_scale at this step
        self.regions: RegionWeights | None = None  # several people: their weights by query length
        self.observer = None  # training: called as observer(self, query) before the identity attention
        self.num_zero = 0  # PuLID: all-zero identity tokens appended, diluting the identity attention
        self.ortho = "off"  # PuLID: "v1" keeps the identity output orthogonal to the text's, "v2" weighs it
        self._query: torch.Tensor | None = None
        self._hooked: tuple[nn.Module, nn.Module] | None = None
        self._handles: list = []

    # ---------------------------------------------------------------- state of one call
    def set_tokens(self, tokens: torch.Tensor, scale: torch.Tensor, regions: RegionWeights | None = None,
                   num_zero: int = 0, ortho: str = "off") -> None:
        """Identity keys/values from ``tokens`` (batch, num_tokens, cross_attention_dim), for
        every following forward until ``clear``; ``scale`` is a 0-d tensor updated in place.
        With ``regions`` the tokens are several people's, side by side, and each person's
        attention acts where their weights say. ``num_zero`` and ``ortho``: PuLID's settings."""
        self.key, self.value, self.scale = self.to_k_id(tokens), self.to_v_id(tokens), scale
        self.regions, self.num_zero, self.ortho = regions, num_zero, ortho

    def clear(self) -> None:
        self.key = self.value = self.scale = self.regions = self._query = None
        self.num_zero, self.ortho = 0, "off"

    # ---------------------------------------------------------------- hooks
    def attach(self, attn: nn.Module) -> None:
        """Hook the layer's current ``to_q`` and ``to_out[0]`` (again if a LoRA wrapped them)."""
        modules = (attn.to_q, attn.to_out[0])
        if self._hooked is not None and all(a is b for a, b in zip(self._hooked, modules)):
            return
        self.detach()
        self._handles = [
            modules[0].register_forward_hook(self._keep_query),
            modules[1].register_forward_pre_hook(self._add_identity),
        ]
        self._hooked = modules

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], None

    def _keep_query(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if self.key is not None:
            self._query = output

    def _add_identity(self, module: nn.Module, args: tuple):
        query, self._query = self._query, None
        if self.key is None or query is None:
            return None
        hidden_states = args[0]
        batch, head_dim = query.shape[0], query.shape[-1] // self.heads
        if self.key.shape[0] != batch:
            raise ValueError(
                f"identity tokens were prepared for a batch of {self.key.shape[0]}, the UNet runs {batch}: "
                "set them for this batch (IdentityAdapter.set_tokens)"
            )

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(batch, -1, self.heads, head_dim).transpose(1, 2)

        def attend(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            if self.num_zero:
                zeros = key.new_zeros(batch, self.num_zero, key.shape[-1])
                key, value = torch.cat([key, zeros], dim=1), torch.cat([value, zeros], dim=1)
            out = F.scaled_dot_product_attention(query_heads, heads(key), heads(value))
            out = out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim).to(hidden_states.dtype)
            return out if self.ortho == "off" else self._orthogonal(hidden_states, out, query_heads, heads(key))

        if self.observer is not None:
            self.observer(self, query)
        query_heads = heads(query)
        key, value = self.key.to(query.dtype), self.value.to(query.dtype)
        if self.regions is None:
            out = attend(key, value)
        else:
            weights = self.regions[query.shape[1]].to(hidden_states.dtype)
            out = sum(weight * attend(k, v) for weight, k, v in
                      zip(weights, key.chunk(len(weights), dim=1), value.chunk(len(weights), dim=1)))
        out = self.scale.to(out.dtype) * out
        return (hidden_states + out if self.text_enabled else out, *args[1:])

    def _orthogonal(self, text: torch.Tensor, identity: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """PuLID's orthogonal identity output, in float32: per channel, the part of ``identity``
        along ``text`` over the image's positions is dropped ("v1"), or kept in proportion to the
        attention the query gives the first five identity tokens ("v2"). A channel the text leaves
        at zero everywhere (SDXL's zeroed empty negative prompt) has nothing to project on."""
        text32, identity32 = text.float(), identity.float()
        energy = (text32 * text32).sum(-2, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        along = (text32 * identity32).sum(-2, keepdim=True) / energy * text32
        if self.ortho == "v1":
            return (identity32 - along).to(identity.dtype)
        weight = (query @ key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[..., :5].sum(-1, keepdim=True)
        return (identity32 + (weight.float() - 1) * along).to(identity.dtype)


class IdentityAdapter(nn.Module):
    """An identity adapter's trained parts: the projection (ArcFace vector -> identity tokens)
    and one ``IdentityAttention`` per UNet cross-attention layer, keyed by layer name.

    It lives beside the UNet, not inside it: the UNet's modules and state dict stay the base
    model's, and ``attach``/``detach`` add and remove the hooks.
    """

    def __init__(self, projection: nn.Module, layers: dict[str, IdentityAttention]):
        super().__init__()
        self.projection = projection
        self.names = list(layers)
        self.layers = nn.ModuleList(layers.values())

    def items(self) -> Iterable[tuple[str, IdentityAttention]]:
        return zip(self.names, self.layers)

    def attach(self, unet: nn.Module) -> None:
        unet = getattr(unet, "_orig_mod", unet)  # torch.compile'd UNet
        for name, layer in self.items():
            layer.attach(unet.get_submodule(name))

    def detach(self) -> None:
        for layer in self.layers:
            layer.detach()
            layer.clear()

    def set_tokens(self, tokens: torch.Tensor, scales: dict[str, torch.Tensor] | None = None,
                   regions: RegionWeights | None = None, num_zero: int = 0, ortho: str = "off") -> None:
        """Condition every layer on ``tokens`` (one row per UNet batch row) with per-layer
        0-d ``scales`` (default 1); ``regions``, ``num_zero``, ``ortho``: see
        ``IdentityAttention.set_tokens``."""
        one = torch.ones((), device=tokens.device)
        for name, layer in self.items():
            layer.set_tokens(tokens, scales[name] if scales is not None else one, regions, num_zero, ortho)

    def clear(self) -> None:
        for layer in self.layers:
            layer.clear()
