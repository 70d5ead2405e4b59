"""EVA02-CLIP's vision tower in plain torch (PuLID's face encoder), loading the official weights.

PuLID reads EVA02-CLIP-L-14-336 (``QuanSun/EVA-CLIP``, ``EVA02_CLIP_L_336_psz14_s6B.pt``): a ViT
whose blocks differ from CLIP's in three ways. Queries and keys of the patch tokens are rotated by
a 2-D rotary position embedding (the class token is not); the MLP is SwiGLU
(``w3(LN(silu(w1 x) * w2 x))``); and "sub-LN" puts a LayerNorm before each output projection
(``inner_attn_ln``, ``ffn_ln``). Queries and values carry biases (``q_bias``, ``v_bias``), keys
do not. Module and parameter names are the official ones (the ``visual.*`` part of the
checkpoint), so its state dict loads as is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from idgen.errors import CheckpointError, ModelNotFoundError

from .checkpoints import read_checkpoint, resolve_checkpoint_file

#: Where PuLID's EVA02-CLIP-L-14-336 weights live on the hub (the whole CLIP; the tower is ``visual.*``).
EVA_CLIP_REPO, EVA_CLIP_FILE = "QuanSun/EVA-CLIP", "EVA02_CLIP_L_336_psz14_s6B.pt"
#: The tower's input normalisation (OpenAI CLIP's).
EVA_MEAN, EVA_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def rotary_tables(head_dim: int, grid: int, pretrain_grid: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (grid * grid, head_dim) of EVA's 2-D rotary embedding: the first half of each
    head rotates with the patch row, the second with its column, each at ``head_dim / 4``
    frequencies repeated pairwise; positions are rescaled to the pretraining grid."""
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2)[:quarter].float() / (head_dim // 2))
    angles = (torch.arange(grid) / grid * pretrain_grid)[:, None] * freqs  # (grid, quarter)
    angles = angles.repeat_interleave(2, dim=-1)  # (grid, head_dim / 2)
    rows = angles[:, None, :].expand(grid, grid, -1)
    cols = angles[None, :, :].expand(grid, grid, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


class EVARotary(nn.Module):
    """The rotary tables as the official buffers ``freqs_cos`` / ``freqs_sin``."""

    freqs_cos: torch.Tensor
    freqs_sin: torch.Tensor

    def __init__(self, head_dim: int, grid: int, pretrain_grid: int):
        super().__init__()
        cos, sin = rotary_tables(head_dim, grid, pretrain_grid)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.freqs_cos + _rotate_pairs(x) * self.freqs_sin


class EVAAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: EVARotary) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, -1).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        q = torch.cat([q[:, :, :1], rope(q[:, :, 1:])], dim=2).type_as(v)  # the class token is not rotated
        k = torch.cat([k[:, :, :1], rope(k[:, :, 1:])], dim=2).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EVABlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EVAAttention(dim, heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden, eps)

    def forward(self, x: torch.Tensor, rope: EVARotary) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EVAVisionTower(ModelMixin, ConfigMixin):
    """EVA02-CLIP's vision tower. Defaults are EVA02-CLIP-L-14-336's (PuLID's).

    ``forward`` returns the CLIP image embedding (``embed_dim``) and the hidden states entering
    the blocks of ``hidden_layers`` (PuLID's ID encoder reads blocks 4, 8, 12, 16 and 20).
    """

    @register_to_config
    def __init__(self, image_size: int = 336, patch_size: int = 14, width: int = 1024, layers: int = 24,
                 head_width: int = 64, mlp_ratio: float = 2.6667, embed_dim: int = 768, pretrain_grid: int = 16,
                 hidden_layers: Sequence[int] = (4, 8, 12, 16, 20), eps: float = 1e-6):
        super().__init__()
        grid = image_size // patch_size
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.rope = EVARotary(head_width, grid, pretrain_grid)
        self.blocks = nn.ModuleList(EVABlock(width, width // head_width, int(width * mlp_ratio), eps)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.head = nn.Linear(width, embed_dim)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``pixels`` (B, 3, image_size, image_size), normalised with ``EVA_MEAN`` / ``EVA_STD``."""
        x = self.patch_embed(pixels.to(self.dtype))
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        hidden = []
        wanted = set(self.config.hidden_layers)
        for index, block in enumerate(self.blocks):
            if index in wanted:
                hidden.append(x)
            x = block(x, self.rope)
        return self.head(self.norm(x)[:, 0]), hidden


def eva_state_dict(raw: dict, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The vision tower's weights from an EVA-CLIP checkpoint: the whole CLIP (``visual.*`` kept,
    the text tower dropped), optionally under ``model`` / ``module`` / ``state_dict``, or the tower alone."""
    for key in ("model", "module", "state_dict"):
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    raw = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
    if any(k.startswith("visual.") for k in raw):
        raw = {k[len("visual."):]: v for k, v in raw.items() if k.startswith("visual.")}
    if "patch_embed.proj.weight" not in raw or "blocks.0.attn.q_proj.weight" not in raw:
        raise CheckpointError(f"{path} is not an EVA02-CLIP vision tower (no patch_embed / blocks.0.attn.q_proj): pass "
                              f"{EVA_CLIP_REPO}'s {EVA_CLIP_FILE} or a folder saved by EVAVisionTower")
    return raw


def build_eva_tower(state_dict: dict[str, torch.Tensor], path: str = "checkpoint") -> EVAVisionTower:
    """An ``EVAVisionTower`` sized from the weights' shapes, with them loaded."""
    try:
        patch = state_dict["patch_embed.proj.weight"]
        width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
        grid = int(round((state_dict["pos_embed"].shape[1] - 1) ** 0.5))
        head_width = int(state_dict["rope.freqs_cos"].shape[1]) if "rope.freqs_cos" in state_dict else 64
        layers = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
        config = dict(image_size=grid * patch_size, patch_size=patch_size, width=width, layers=layers,
                      head_width=head_width, mlp_ratio=int(state_dict["blocks.0.mlp.w1.weight"].shape[0]) / width,
                      embed_dim=int(state_dict["head.weight"].shape[0]),
                      hidden_layers=tuple(i for i in range(4, min(layers, 21), 4)))  # the reference's choice
    except KeyError as err:
        raise CheckpointError(f"{path}: the EVA02-CLIP tower lacks {err.args[0]}: the file is incomplete") from None
    tower = EVAVisionTower(**config)
    tables = ("rope.freqs_cos", "rope.freqs_sin")  # recomputed (they follow from the config); also in every block
    missing, unexpected = tower.load_state_dict({k: v for k, v in state_dict.items() if not k.endswith(tables)},
                                                strict=False)
    missing = [k for k in missing if not k.endswith(tables)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the EVA02-CLIP weights do not match the tower (missing: "
                              f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})")
    return tower.eval()


def load_eva_tower(source: str | os.PathLike | None = None, dtype: torch.dtype | None = None) -> EVAVisionTower:
    """PuLID's EVA02-CLIP tower from a folder saved by ``EVAVisionTower.save_pretrained``, an
    official checkpoint file, or a hub repo (default ``QuanSun/EVA-CLIP``'s ``EVA02_CLIP_L_336_psz14_s6B.pt``)."""
    source = os.fspath(source) if source is not None else EVA_CLIP_REPO
    if os.path.isdir(source):
        return EVAVisionTower.from_pretrained(source, torch_dtype=dtype).eval()
    try:
        path = resolve_checkpoint_file(source, None if os.path.isfile(source) else EVA_CLIP_FILE)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"PuLID reads EVA02-CLIP-L features of the face, whose weights could not be loaded: "
                                 f"{err}; or pass image_encoder= (a file, a folder or an EVAVisionTower)") from None
    tower = build_eva_tower(eva_state_dict(read_checkpoint(path), path), path)
    return cast(Any, tower).to(dtype) if dtype is not None else tower  # ModelMixin.to: its wrapper hides the types
