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

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 512) -> (B, num_tokens, cross_attention_dim)."""
        tokens = self.proj(id_embeds).reshape(-1, self.config.num_tokens, self.config.cross_attention_dim)
        return self.norm(tokens)
