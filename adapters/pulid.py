"""PuLID (guozinan/PuLID: ``pulid_v1.1.safetensors``, ``pulid_v1.bin``, SDXL): its ID encoders,
its checkpoint layout and the face image its EVA02-CLIP reads.

The checkpoint holds ``id_adapter.*`` (the ID encoder) and ``id_adapter_attn_layers.N.id_to_{k,v}.weight``,
numbered over every attention processor of the UNet like IP-Adapter's ``ip_adapter.N`` (only
cross-attention layers have weights). Its identity attention is the decoupled one of
``IdentityAttention``, plus PuLID's two settings: ``num_zero`` all-zero identity tokens that
dilute the attention, and ``ortho``, which keeps (``"v1"``) or weighs (``"v2"``) only the part of
the identity output orthogonal to the text output.

The ID encoder reads the raw ArcFace vector concatenated with EVA02-CLIP's normalised image
embedding (512 + 768), and five hidden states of EVA's tower. EVA sees the face aligned to FFHQ's
template at 512 px with everything but the face (per a face-parsing network) white, in grey.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from idgen.errors import CheckpointError

from .eva_clip import EVA_MEAN, EVA_STD
from .projection import perceiver_layers

StateDict = dict[str, torch.Tensor]
#: PuLID's top-level groups.
PULID_GROUPS = ("id_adapter", "id_adapter_attn_layers")
#: What each version's reference demo runs by default: (num_zero, ortho).
PULID_DEFAULTS = {"pulid": (20, "v2"), "pulid_v1": (8, "v2")}
ORTHO_MODES = ("off", "v1", "v2")
#: Face-parsing labels (CelebAMask-HQ's) that PuLID whitens: background, ears, earring, neck, necklace, cloth, hat.
PARSING_BACKGROUND = (0, 7, 8, 9, 14, 15, 16, 18)
#: How many EVA hidden states the ID encoders read.
VIT_LEVELS = 5


def pulid_settings(format: str, num_zero: int | None = None, ortho: str | None = None) -> tuple[int, str]:
    """PuLID's attention settings: ``num_zero`` zero tokens (more: more editable, less alike) and
    ``ortho`` ("off", "v1", "v2"), each by default its reference demo's for ``format`` (v1.1: 20
    and "v2"; v1's "fidelity" mode: 8 and "v2")."""
    default_zero, default_ortho = PULID_DEFAULTS[format]
    num_zero = default_zero if num_zero is None else int(num_zero)
    ortho = default_ortho if ortho is None else ortho
    if num_zero < 0 or ortho not in ORTHO_MODES:
        raise ValueError(f"PuLID takes num_zero >= 0 and ortho in {ORTHO_MODES}, got {num_zero} and {ortho!r}")
    return num_zero, ortho


def _mapping(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden),
                         nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, out_dim))


class _PuLIDInputs:
    """What both ID encoders take: (B, n, arcface_dim + clip_dim) identity vectors of n photos
    each and ``VIT_LEVELS`` EVA hidden states (B, n * L, vit_dim)."""

    @property
    def id_embed_dim(self) -> int:
        return self.config.arcface_dim

    def _check(self, id_cond: torch.Tensor, vit_hidden: list[torch.Tensor]) -> None:
        width = self.config.arcface_dim + self.config.clip_dim
        if id_cond.shape[-1] != width or len(vit_hidden) != VIT_LEVELS:
            raise ValueError(f"PuLID's ID encoder takes {width}-d identity vectors and {VIT_LEVELS} EVA hidden states, "
                             f"got {tuple(id_cond.shape)} and {len(vit_hidden)}")


class PuLIDEncoder(_PuLIDInputs, ModelMixin, ConfigMixin):
    """PuLID v1.1's IDFormer: ``num_queries`` latents and the identity's ``num_id_token`` tokens per
    photo attend, five times over, to the identity tokens plus one level of EVA's hidden states;
    the latents, projected, are the identity tokens. Names match ``id_adapter.*``."""

    @register_to_config
    def __init__(self, dim: int = 1024, depth: int = 10, dim_head: int = 64, heads: int = 16, num_id_token: int = 5,
                 num_queries: int = 32, output_dim: int = 2048, ff_mult: int = 4, arcface_dim: int = 512,
                 clip_dim: int = 768, vit_dim: int = 1024, hidden_dim: int = 1024):
        super().__init__()
        if depth % VIT_LEVELS:
            raise ValueError(f"the IDFormer's depth is a multiple of {VIT_LEVELS} (one group per EVA level), got {depth}")
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * dim**-0.5)
        self.proj_out = nn.Parameter(torch.randn(dim, output_dim) * dim**-0.5)
        self.layers = perceiver_layers(dim, depth, dim_head, heads, ff_mult)
        for level in range(VIT_LEVELS):
            setattr(self, f"mapping_{level}", _mapping(vit_dim, hidden_dim, dim))
        self.id_embedding_mapping = _mapping(arcface_dim + clip_dim, hidden_dim, dim * num_id_token)

    def forward(self, id_cond: torch.Tensor, vit_hidden: list[torch.Tensor]) -> torch.Tensor:
        """-> (B, num_queries, output_dim)."""
        self._check(id_cond, vit_hidden)
        identity = self.id_embedding_mapping(id_cond).reshape(len(id_cond), -1, self.config.dim)
        latents = torch.cat([self.latents.expand(len(id_cond), -1, -1), identity], dim=1)
        per_level = len(self.layers) // VIT_LEVELS
        for level, hidden in enumerate(vit_hidden):
            context = torch.cat([identity, getattr(self, f"mapping_{level}")(hidden)], dim=1)
            for attention, feed_forward in self.layers[level * per_level:(level + 1) * per_level]:
                latents = attention(context, latents) + latents
                latents = feed_forward(latents) + latents
        return latents[:, :self.config.num_queries] @ self.proj_out


class PuLIDEncoderV1(_PuLIDInputs, ModelMixin, ConfigMixin):
    """PuLID v1's IDEncoder: an MLP's ``num_token`` tokens from the identity vector, then one token
    per EVA level (its class token mapped, plus the mean of its mapped patch tokens). One photo."""

    @register_to_config
    def __init__(self, context_dim: int = 2048, num_token: int = 5, arcface_dim: int = 512, clip_dim: int = 768,
                 vit_dim: int = 1024, hidden_dim: int = 1024):
        super().__init__()
        width = arcface_dim + clip_dim
        first, second = min(context_dim * num_token // 4, hidden_dim), min(context_dim * num_token // 2, hidden_dim)
        self.body = nn.Sequential(nn.Linear(width, first), nn.LayerNorm(first), nn.LeakyReLU(), nn.Linear(first, second),
                                  nn.LayerNorm(second), nn.LeakyReLU(), nn.Linear(second, context_dim * num_token))
        for level in range(VIT_LEVELS):
            setattr(self, f"mapping_{level}", _mapping(vit_dim, hidden_dim, context_dim))
            setattr(self, f"mapping_patch_{level}", _mapping(vit_dim, hidden_dim, context_dim))

    def forward(self, id_cond: torch.Tensor, vit_hidden: list[torch.Tensor]) -> torch.Tensor:
        """-> (B, num_token + 5, context_dim)."""
        self._check(id_cond, vit_hidden)
        if id_cond.ndim == 3:
            if id_cond.shape[1] != 1:
                raise ValueError(f"PuLID v1 takes one photo per identity, got {id_cond.shape[1]}: use PuLID v1.1 "
                                 "(pulid_v1.1.safetensors) for several")
            id_cond = id_cond[:, 0]
        tokens = self.body(id_cond).reshape(len(id_cond), self.config.num_token, self.config.context_dim)
        levels = [getattr(self, f"mapping_{i}")(h[:, :1]) + getattr(self, f"mapping_patch_{i}")(h[:, 1:]).mean(1, keepdim=True)
                  for i, h in enumerate(vit_hidden)]
        return torch.cat([tokens, *levels], dim=1)


def is_pulid(raw: dict) -> bool:
    return any(str(key).split(".")[0] in PULID_GROUPS for key in raw)


def pulid_adapter_state_dict(raw: dict, path: str = "checkpoint") -> dict[str, StateDict]:
    """A PuLID checkpoint (nested ``.bin`` or flat ``.safetensors``) in the adapter layout:
    ``image_proj`` = the ID encoder, ``ip_adapter.N.to_{k,v}_ip.weight`` = its identity attention."""
    groups: dict[str, StateDict] = {name: {} for name in PULID_GROUPS}
    for key, value in raw.items():
        group, _, rest = str(key).partition(".")
        if group not in groups:
            raise CheckpointError(f"{path}: unexpected key {key!r}: a PuLID checkpoint holds id_adapter.* and "
                                  "id_adapter_attn_layers.* only")
        if isinstance(value, dict):
            groups[group].update(value)
        else:
            groups[group][rest] = value
    ip_adapter = {}
    for key, value in groups["id_adapter_attn_layers"].items():
        index, _, name = key.partition(".")
        if name not in ("id_to_k.weight", "id_to_v.weight"):
            raise CheckpointError(f"{path}: unexpected key id_adapter_attn_layers.{key}: PuLID's layers hold id_to_k "
                                  "and id_to_v")
        ip_adapter[f"{index}.{name.replace('id_to_', 'to_').replace('.weight', '_ip.weight')}"] = value
    return {"image_proj": groups["id_adapter"], "ip_adapter": ip_adapter}


def pulid_format(image_proj: StateDict) -> str | None:
    """"pulid" (v1.1's IDFormer), "pulid_v1" (v1's IDEncoder), or None."""
    if "id_embedding_mapping.0.weight" in image_proj:
        return "pulid"
    if "body.0.weight" in image_proj or any(key.startswith("mapping_patch_") for key in image_proj):
        return "pulid_v1"
    return None


def build_pulid_encoder(image_proj: StateDict, format: str) -> PuLIDEncoder | PuLIDEncoderV1:
    """The ID encoder sized from the weights' shapes (64-dimensional heads, as the reference's);
    raises KeyError / RuntimeError on a layout that does not fit (the caller names the file)."""
    vit_dim, hidden = (int(s) for s in image_proj["mapping_0.0.weight"].shape[::-1])
    if format == "pulid":
        dim = int(image_proj["latents"].shape[2])
        id_width = int(image_proj["id_embedding_mapping.0.weight"].shape[1])
        model = PuLIDEncoder(
            dim=dim, depth=len({k.split(".")[1] for k in image_proj if k.startswith("layers.")}), dim_head=64,
            heads=max(1, int(image_proj["layers.0.0.to_q.weight"].shape[0]) // 64),
            num_id_token=int(image_proj["id_embedding_mapping.6.weight"].shape[0]) // dim,
            num_queries=int(image_proj["latents"].shape[1]), output_dim=int(image_proj["proj_out"].shape[1]),
            ff_mult=int(image_proj["layers.0.1.1.weight"].shape[0]) // dim, clip_dim=id_width - 512, vit_dim=vit_dim,
            hidden_dim=hidden)
    else:
        context = int(image_proj["mapping_0.6.weight"].shape[0])
        model = PuLIDEncoderV1(context_dim=context, num_token=int(image_proj["body.6.weight"].shape[0]) // context,
                               clip_dim=int(image_proj["body.0.weight"].shape[1]) - 512, vit_dim=vit_dim, hidden_dim=hidden)
    model.load_state_dict(image_proj, strict=True)
    return model


def eva_face_pixels(crops: np.ndarray, parser: nn.Module, size: int) -> torch.Tensor:
    """EVA's input for aligned 512 px face crops (n, 512, 512, 3) uint8 RGB: the face (what the
    parser does not label background, hair, ears, neck or clothes) in grey on white, resized
    to ``size`` (bicubic) and normalised. -> (n, 3, size, size) float32."""
    device = next(parser.parameters()).device
    pixels = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div(255).to(device)
    mean = torch.tensor((0.485, 0.456, 0.406), device=device)[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225), device=device)[:, None, None]
    dtype = next(parser.parameters()).dtype
    labels = parser(((pixels - mean) / std).to(dtype))[0].argmax(dim=1, keepdim=True)
    background = torch.isin(labels, torch.tensor(PARSING_BACKGROUND, device=device))
    grey = (0.299 * pixels[:, :1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:3]).expand(-1, 3, -1, -1)
    face = torch.where(background, torch.ones_like(pixels), grey)
    face = F.interpolate(face, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return (face - torch.tensor(EVA_MEAN, device=device)[:, None, None]) / torch.tensor(EVA_STD, device=device)[:, None, None]
