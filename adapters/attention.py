"""Decoupled cross-attention: text and identity tokens share the query, not the keys.

``out = Attn(q, K_text, V_text) + id_scale * Attn(q, to_k_id(id), to_v_id(id))``

The identity tokens travel as the last ``num_tokens`` tokens of ``encoder_hidden_states``
(the layout of IP-Adapter, IP-Adapter-FaceID and InstantID), so a UNet with these
processors runs with any diffusers pipeline loop, ControlNet, offload or compile.

The identity keys and values do not change across denoising steps. Inside
``cache_identity_kv(unet)`` each processor computes them once per identity-token tensor
and reuses them at every later step.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class IDAttnProcessor(nn.Module):
    """Attention processor for a UNet cross-attention layer with an identity branch.

    Args:
        hidden_size: the attention layer's width (``to_out`` output size).
        cross_attention_dim: width of the text and identity tokens.
        num_tokens: how many identity tokens close ``encoder_hidden_states``.
        scale: weight of the identity branch (``id_scale``) for this layer.

    ``text_enabled = False`` drops the text branch (Infinite-ID's identity-enhanced training:
    the identity branch learns without the prompt to lean on).
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int, scale: float = 1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.scale = scale
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.text_enabled = True
        self.cache_kv = False
        self._cached: tuple | None = None

    def identity_kv(self, identity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity keys and values; with ``cache_kv``, computed once per identity tensor."""
        if not self.cache_kv:
            return self.to_k_id(identity), self.to_v_id(identity)
        tag = (identity.data_ptr(), tuple(identity.shape), identity.dtype, identity.device)
        if self._cached is None or self._cached[0] != tag:
            self._cached = (tag, self.to_k_id(identity), self.to_v_id(identity))
        return self._cached[1], self._cached[2]

    @staticmethod
    def _attend(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask=None) -> torch.Tensor:
        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_tokens:
            raise ValueError(
                f"identity attention expects text tokens followed by {self.num_tokens} identity tokens; "
                "call the pipeline with face_image= or id_embeds="
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        text, identity = encoder_hidden_states[:, : -self.num_tokens], encoder_hidden_states[:, -self.num_tokens :]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        query = attn.to_q(hidden_states)
        if self.text_enabled:
            hidden_states = self._attend(attn, query, attn.to_k(text), attn.to_v(text), attention_mask)
            if self.scale != 0:
                hidden_states = hidden_states + self.scale * self._attend(attn, query, *self.identity_kv(identity))
        else:
            hidden_states = self.scale * self._attend(attn, query, *self.identity_kv(identity))

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def cache_identity_kv(unet) -> Iterator[None]:
    """Compute each layer's identity K/V once for the duration of one generation call.

    Valid while the identity tokens stay the same tensor, as in a denoising loop; the
    cache is dropped on exit so no tensor outlives the call.
    """
    processors = [p for p in unet.attn_processors.values() if isinstance(p, IDAttnProcessor)]
    for processor in processors:
        processor.cache_kv, processor._cached = True, None
    try:
        yield
    finally:
        for processor in processors:
            processor.cache_kv, processor._cached = False, None
