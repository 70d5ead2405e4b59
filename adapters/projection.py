"""Projection models: ArcFace vector (512) -> identity tokens (num_tokens x cross_attention_dim)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FaceIDProjection(ModelMixin, ConfigMixin):
    """IP-Adapter-FaceID's MLP: ``LayerNorm(reshape(Linear(GELU(Linear(id)))))``.

    Parameter names match the official ``image_proj`` keys (``proj.0``, ``proj.2``, ``norm``),
    so official checkpoints load without renaming.
    """

    @register_to_config
    def __init__(self, id_embed_dim: int = 512, hidden_dim: int = 1024, cross_attention_dim: int = 768, num_tokens: int = 4):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(id_embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    @property
    def id_embed_dim(self) -> int:
        return self.config.id_embed_dim

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 512) -> (B, num_tokens, cross_attention_dim)."""
        tokens = self.proj(id_embeds).reshape(-1, self.config.num_tokens, self.config.cross_attention_dim)
        return self.norm(tokens)


class PerceiverAttention(nn.Module):
    """Latent queries attend to (context + latents), as in IP-Adapter's and InstantID's Resampler."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.norm1(context), self.norm2(latents)
        query = self._split_heads(self.to_q(latents))
        key, value = (self._split_heads(t) for t in self.to_kv(torch.cat([context, latents], dim=-2)).chunk(2, dim=-1))
        scale = self.dim_head**-0.25  # applied to both q and k: steadier in half precision
        weight = ((query * scale) @ (key * scale).transpose(-2, -1)).float().softmax(dim=-1).to(query.dtype)
        out = (weight @ value).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def perceiver_layers(dim: int, depth: int, dim_head: int, heads: int, ff_mult: int) -> nn.ModuleList:
    """``depth`` pairs of (``PerceiverAttention``, feed-forward), named as the published keys
    (``layers.N.0.*``, ``layers.N.1.{0,1,3}.*``)."""
    return nn.ModuleList(
        nn.ModuleList(
            [
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(
                    nn.LayerNorm(dim),
                    nn.Linear(dim, dim * ff_mult, bias=False),
                    nn.GELU(),
                    nn.Linear(dim * ff_mult, dim, bias=False),
                ),
            ]
        )
        for _ in range(depth)
    )


class _Perceiver:
    """The body of IP-Adapter's perceiver resamplers (InstantID's, FaceID-Plus's): ``proj_in`` of
    the context, ``depth`` layers of attention and feed-forward on the latents, then
    ``norm_out(proj_out(latents))``. Module names match the published keys."""

    def _build_perceiver(self, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int,
                         ff_mult: int) -> None:
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = perceiver_layers(dim, depth, dim_head, heads, ff_mult)

    def resample(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context = self.proj_in(context)
        for attention, feed_forward in self.layers:
            latents = attention(context, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class InstantIDResampler(_Perceiver, ModelMixin, ConfigMixin):
    """InstantID's image projection: a Perceiver resampler from the ArcFace vector to
    ``num_queries`` tokens. Parameter names match the official ``ip-adapter.bin``."""

    @register_to_config
    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 2048,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self._build_perceiver(dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult)

    @property
    def id_embed_dim(self) -> int:
        return self.config.embedding_dim

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 512) or (B, N, 512) -> (B, num_queries, output_dim)."""
        if id_embeds.ndim == 2:
            id_embeds = id_embeds[:, None]
        return self.resample(id_embeds, self.latents.repeat(id_embeds.shape[0], 1, 1))


class FacePerceiverResampler(_Perceiver, nn.Module):
    """FaceID-Plus's resampler: the identity tokens are the latents, CLIP's tokens the context."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int, ff_mult: int):
        super().__init__()
        self._build_perceiver(dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult)


class FaceIDPlusProjection(ModelMixin, ConfigMixin):
    """IP-Adapter-FaceID-Plus's projection: FaceID's MLP tokens (``proj``, ``norm``) refined by a
    perceiver over CLIP image features of the face crop (``perceiver_resampler``). PlusV2 adds
    the MLP tokens back (``shortcut``) at strength ``s_scale``. Names match the official keys."""

    @register_to_config
    def __init__(
        self,
        id_embed_dim: int = 512,
        hidden_dim: int = 1024,
        cross_attention_dim: int = 768,
        num_tokens: int = 4,
        clip_embed_dim: int = 1280,
        depth: int = 4,
        heads: int = 12,  # of dim_head dims each: cross_attention_dim / 64 in the published checkpoints
        ff_mult: int = 4,
        shortcut: bool = False,
        dim_head: int = 64,
    ):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(id_embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            cross_attention_dim, depth, dim_head, heads, clip_embed_dim, cross_attention_dim, ff_mult
        )

    @property
    def id_embed_dim(self) -> int:
        return self.config.id_embed_dim

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor, s_scale: float = 1.0) -> torch.Tensor:
        """(B, 512) and CLIP's penultimate hidden states (B, L, clip_embed_dim) -> (B, num_tokens,
        cross_attention_dim)."""
        tokens = self.norm(self.proj(id_embeds).reshape(-1, self.config.num_tokens, self.config.cross_attention_dim))
        out = self.perceiver_resampler.resample(clip_embeds, tokens)
        return tokens + s_scale * out if self.config.shortcut else out
