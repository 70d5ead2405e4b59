"""Decoupled cross-attention: text and identity tokens share the query, not the keys.

``out = to_out(Attn(q, K_text, V_text) + id_scale * Attn(q, to_k_id(id), to_v_id(id)))``

The identity branch does not replace the UNet's attention processors. Each cross-attention
layer's ``to_q`` and ``to_out[0]`` carry an identity hook (``idgen.adapters.context``): the first
keeps the query, the second adds the identity attention to its input. Whatever computes the text
attention (diffusers' default processor, attention slicing, fused projections, a processor set by
the user) keeps working, the UNet's own modules and state dict stay untouched, and
``save_pretrained`` writes a plain UNet.

The identity of a call (its keys and values, scales, regions, PuLID's settings) is an
``IdentityCall``, open only while that call runs and only in its thread; outside one the hooks
do nothing, so a pipeline that shares the UNet runs it plain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .context import ModelHooks, hook, hook_owner, registration_lock, unhook
from .regions import RegionWeights

logger = logging.getLogger(__name__)


class IdentityAttention(nn.Module):
    """The identity branch of one UNet cross-attention layer: its trained key and value
    projections and the attention over the identity tokens.

    Args:
        hidden_size: the attention layer's width (its ``to_out`` size).
        cross_attention_dim: width of the identity tokens.
        heads: the attention layer's number of heads.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, heads: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.heads = heads
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def attend(self, call: IdentityCall, name: str, query: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` (the text attention's output) plus this layer's identity attention
        for ``query``, as ``call`` sets it (only the identity with ``call.text_enabled`` off)."""
        key, value, scale = call.layers[name]
        batch, head_dim = query.shape[0], query.shape[-1] // self.heads
        if key.shape[0] != batch:
            raise ValueError(
                f"identity tokens were prepared for a batch of {key.shape[0]}, the UNet runs {batch}: "
                "set them for this batch (IdentityCall.set_tokens)"
            )

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(batch, -1, self.heads, head_dim).transpose(1, 2)

        def attend(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            if call.num_zero:
                zeros = key.new_zeros(batch, call.num_zero, key.shape[-1])
                key, value = torch.cat([key, zeros], dim=1), torch.cat([value, zeros], dim=1)
            out = F.scaled_dot_product_attention(query_heads, heads(key), heads(value))
            out = out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim).to(hidden_states.dtype)
            return out if call.ortho == "off" else self._orthogonal(call.ortho, hidden_states, out, query_heads, heads(key))

        if call.observer is not None:
            call.observer(self, name, query, key)
        query_heads = heads(query)
        key, value = key.to(query.dtype), value.to(query.dtype)
        if call.regions is None:
            out = attend(key, value)
        else:
            weights = call.regions[query.shape[1]].to(hidden_states.dtype)
            out = sum(weight * attend(k, v) for weight, k, v in
                      zip(weights, key.chunk(len(weights), dim=1), value.chunk(len(weights), dim=1)))
        out = scale.to(out.dtype) * out
        return hidden_states + out if call.text_enabled else out

    @staticmethod
    def _orthogonal(ortho: str, text: torch.Tensor, identity: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                    ) -> torch.Tensor:
        """PuLID's orthogonal identity output, in float32: per channel, the part of ``identity``
        along ``text`` over the image's positions is dropped ("v1"), or kept in proportion to the
        attention the query gives the first five identity tokens ("v2"). A channel the text leaves
        at zero everywhere (SDXL's zeroed empty negative prompt) has nothing to project on."""
        text32, identity32 = text.float(), identity.float()
        energy = (text32 * text32).sum(-2, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        along = (text32 * identity32).sum(-2, keepdim=True) / energy * text32
        if ortho == "v1":
            return (identity32 - along).to(identity.dtype)
        weight = (query @ key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[..., :5].sum(-1, keepdim=True)
        return (identity32 + (weight.float() - 1) * along).to(identity.dtype)


class IdentityAdapter(nn.Module):
    """An identity adapter's trained parts: the projection (ArcFace vector -> identity tokens)
    and one ``IdentityAttention`` per UNet cross-attention layer, keyed by layer name.

    It lives beside the UNet, not inside it: the UNet's modules and state dict stay the base
    model's. ``attach`` registers its hooks once; they act only inside an ``IdentityCall``.
    """

    def __init__(self, projection: nn.Module, layers: dict[str, IdentityAttention]):
        super().__init__()
        self.projection = projection
        self.names = list(layers)
        self.layers = nn.ModuleList(layers.values())
        self._by_name = dict(layers)  # the same modules, looked up by name on every forward
        self._hooked: list[nn.Module] = []
        self._roles: list[str] = []
        self._model_hooks = ModelHooks()
        #: Logged once, as a warning, the next time the UNet runs outside an identity call.
        self.plain_notice: str | None = None

    def items(self) -> Iterable[tuple[str, IdentityAttention]]:
        return zip(self.names, cast(Iterable[IdentityAttention], self.layers))

    def layer(self, name: str) -> IdentityAttention:
        return self._by_name[name]

    def _targets(self, unet: nn.Module, fusion: bool) -> list[tuple[nn.Module, str]]:
        """(module, role) of every hook inside the UNet: each identity layer's ``to_q`` and
        ``to_out[0]``; with ``fusion`` also every self-attention's ``to_k``, ``to_v``, ``to_out[0]``
        and every cross-attention's ``to_q`` and ``to_k`` (``idgen.adapters.fusion``)."""
        targets = []
        cross: dict[str, Any] = {name: unet.get_submodule(name) for name in self.names}
        if fusion:
            for name, module in unet.named_modules():
                if name.endswith(".attn1"):
                    targets += [(module.to_k, f"k1:{name}"), (module.to_v, f"v1:{name}"), (module.to_out[0], f"o1:{name}")]
                elif name.endswith(".attn2"):
                    cross.setdefault(name, module)
                    targets.append((module.to_k, f"k2:{name}"))
        for name, attn in cross.items():
            targets += [(attn.to_q, f"q:{name}")]
            if name in self.names:
                targets.append((attn.to_out[0], f"out:{name}"))
        return targets

    def attach(self, unet: nn.Module, fusion: bool = False) -> None:
        """Hook the UNet's current modules (again if a LoRA wrapped them; the fusion hooks too
        with ``fusion``, or when they were hooked before). Cheap when nothing changed."""
        model, unet = unet, getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet: its hooks on the wrapper
        fusion = fusion or any(role.startswith("k1:") for role in self._roles)
        targets = self._targets(unet, fusion)
        if self._model_hooks.model is model and len(targets) == len(self._hooked) \
                and all(hook_owner(m) is self for m, _ in targets):
            return
        with registration_lock():
            self.detach()
            for module, role in targets:
                hook(module, self, role)
            self._hooked = [module for module, _ in targets]
            self._roles = [role for _, role in targets]
            self._model_hooks.follow(model, self, "unet", self._outside_call)

    def _outside_call(self) -> None:
        notice, self.plain_notice = self.plain_notice, None
        if notice is not None:
            logger.warning(notice)

    def detach(self) -> None:
        """Remove every hook: the UNet is the plain base model again."""
        with registration_lock():
            for module in self._hooked:
                if hook_owner(module) is self:
                    unhook(module)
            self._model_hooks.remove()
            self._hooked, self._roles = [], []


class IdentityCall:
    """The identity of one call of an ``IdentityAdapter``: what its hooks add while the call runs
    (opened with ``idgen.adapters.context.open_identity``).

    ``on_unet(args, kwargs)`` runs ahead of every UNet forward (the pipeline sets the tokens for
    the batch and the step's scales there); ``fusion`` runs the base stream beside
    (``idgen.adapters.fusion.StreamFusion``); ``observer`` sees every query
    (training's face-attention loss: ``observer(layer, name, query, identity_keys)``);
    ``text_enabled = False`` drops the text branch (Infinite-ID's
    identity-enhanced training: the identity branch learns without the prompt to lean on).
    """

    def __init__(self, adapter: IdentityAdapter, on_unet: Callable[[tuple, dict], None] | None = None,
                 fusion: Any = None, observer: Callable | None = None, text_enabled: bool = True):
        self.owner = adapter
        self.on_unet, self.fusion, self.observer, self.text_enabled = on_unet, fusion, observer, text_enabled
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.regions: RegionWeights | None = None
        self.num_zero, self.ortho = 0, "off"
        self.queries: dict[str, torch.Tensor] = {}

    def set_tokens(self, tokens: torch.Tensor, scales: dict[str, torch.Tensor] | None = None,
                   regions: RegionWeights | None = None, num_zero: int = 0, ortho: str = "off") -> None:
        """Condition every layer on ``tokens`` (one row per UNet batch row, (B, T, C)) with
        per-layer 0-d ``scales`` (default 1; updated in place between steps). With ``regions`` the
        tokens are several people's, side by side, and each person's attention acts where their
        weights say. ``num_zero``: PuLID's all-zero tokens appended, diluting the identity attention;
        ``ortho``: PuLID's orthogonal output, "v1" or "v2" (else "off")."""
        one = torch.ones((), device=tokens.device)
        self.layers = {name: (layer.to_k_id(tokens), layer.to_v_id(tokens), one if scales is None else scales[name])
                       for name, layer in self.owner.items()}
        self.regions, self.num_zero, self.ortho = regions, num_zero, ortho

    def pre_forward(self, role: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kind, _, name = role.partition(":")
        if kind == "unet":
            if self.on_unet is not None:
                self.on_unet(args, kwargs)
            return self.fusion.double_batch(args, kwargs) if self.fusion is not None else None
        if kind == "out":
            query = self.queries.pop(name, None)
            if query is None or name not in self.layers:
                return args, kwargs
            return (self.owner.layer(name).attend(self, name, query, args[0]), *args[1:]), kwargs
        if kind == "o1" and self.fusion is not None:
            return self.fusion.recover(args), kwargs
        return args, kwargs

    def post_forward(self, role: str, module: nn.Module, output: Any) -> Any:
        kind, _, name = role.partition(":")
        if kind == "q":
            self.queries[name] = output
        elif self.fusion is None:
            return None if kind == "unet" else output
        elif kind == "unet":
            return self.fusion.identity_stream(output)
        elif kind in ("k1", "v1"):
            return self.fusion.mix(output)
        elif kind == "k2":
            self.fusion.attribute_map(name, self.queries.get(name), output)
        return output
