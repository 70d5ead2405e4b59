"""PhotoMaker V2's ID encoder (TencentARC/PhotoMaker-V2, ``photomaker-v2.bin``), without its CLIP.

The checkpoint holds ``id_encoder.*`` (a CLIP ViT-L/14 vision model with projection, a Q-Former
style perceiver and a fuse module) and ``lora_weights.*`` (a UNet LoRA in diffusers' old
attention-processor format). For each photo of the person, the ArcFace vector becomes
``num_tokens`` tokens (``token_proj``, ``token_norm``), refined by a perceiver over the CLIP
patch tokens (added back); then each token is fused into one copy of the prompt's class word
("man img" -> "man man" for one photo, two tokens each).

Our ``qformer`` is FaceID-Plus's projection with the shortcut (the same computation: MLP tokens,
perceiver over CLIP features, tokens + perceiver output); only the key names differ.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from idgen.errors import CheckpointError

from .checkpoints import StateDict, read_checkpoint, validate_tensors
from .projection import FaceIDPlusProjection

#: PhotoMaker's perceiver uses 128-dimensional heads (16 for its 2048 width).
PHOTOMAKER_DIM_HEAD = 128
#: Official key prefixes of the id encoder -> ours.
_RENAMES = {"qformer_perceiver.token_proj.": "qformer.proj.", "qformer_perceiver.token_norm.": "qformer.norm.",
            "qformer_perceiver.perceiver_resampler.": "qformer.perceiver_resampler.", "fuse_module.": "fuse."}
#: CLIP keys of the id encoder: transformers' CLIPVisionModelWithProjection names.
_CLIP_PREFIXES = ("vision_model.", "visual_projection.")


class _MLP(nn.Module):
    """PhotoMaker's MLP: ``fc2(GELU(fc1(LayerNorm(x))))``, optionally plus ``x``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class PhotoMakerFuse(nn.Module):
    """Fuses an identity token into a class-word embedding: two MLPs and a LayerNorm."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = _MLP(embed_dim * 2, embed_dim, embed_dim, residual=False)
        self.mlp2 = _MLP(embed_dim, embed_dim, embed_dim, residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, class_embeds: torch.Tensor, id_tokens: torch.Tensor) -> torch.Tensor:
        fused = self.mlp1(torch.cat([class_embeds, id_tokens], dim=-1)) + class_embeds
        return self.layer_norm(self.mlp2(fused))


class PhotoMakerEncoder(ModelMixin, ConfigMixin):
    """PhotoMaker V2's identity path beside CLIP: ``id_tokens`` (ArcFace + CLIP patch tokens ->
    ``num_tokens`` tokens per photo) and ``fuse_prompt`` (the tokens into the class word's copies)."""

    @register_to_config
    def __init__(self, id_embed_dim: int = 512, embed_dim: int = 2048, num_tokens: int = 2, clip_embed_dim: int = 1024,
                 depth: int = 4, ratio: int = 4, ff_mult: int = 4):
        super().__init__()
        dim_head = min(PHOTOMAKER_DIM_HEAD, embed_dim)
        self.qformer = FaceIDPlusProjection(id_embed_dim, id_embed_dim * ratio, embed_dim, num_tokens, clip_embed_dim,
                                            depth, embed_dim // dim_head, ff_mult, shortcut=True, dim_head=dim_head)
        self.fuse = PhotoMakerFuse(embed_dim)

    def id_tokens(self, id_embeds: torch.Tensor, clip_hidden_states: torch.Tensor) -> torch.Tensor:
        """(n, 512) raw ArcFace vectors and CLIP's last hidden states (n, L, C) of the photos ->
        (n * num_tokens, embed_dim), photo by photo."""
        return self.qformer(id_embeds, clip_hidden_states).reshape(-1, self.config.embed_dim)

    def fuse_prompt(self, prompt_embeds: torch.Tensor, class_mask: torch.Tensor, id_tokens: torch.Tensor) -> torch.Tensor:
        """``prompt_embeds`` (N, L, D) with the positions of ``class_mask`` (N, L), each row holding
        ``len(id_tokens)`` of them, fused with the tokens in order."""
        out = prompt_embeds.clone()
        per_row = int(class_mask[0].sum())
        if per_row != len(id_tokens) or bool((class_mask.sum(1) != per_row).any()):
            raise ValueError(f"the prompt holds {per_row} class-word copies for {len(id_tokens)} identity tokens")
        tokens = id_tokens.to(prompt_embeds.dtype).repeat(len(prompt_embeds), 1)
        out[class_mask] = self.fuse(prompt_embeds[class_mask], tokens)
        return out


def photomaker_state_dicts(checkpoint: str | dict, path: str | None = None) -> tuple[StateDict, StateDict, StateDict]:
    """(our encoder's state dict, the CLIP vision model's, the UNet LoRA's) from a PhotoMaker V2
    checkpoint: a file (``.bin`` read with ``weights_only=True``, or ``.safetensors`` with the groups
    as key prefixes) or its contents; ``path`` names it in errors."""
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    path = path or (checkpoint if isinstance(checkpoint, str) else "checkpoint")
    if set(raw) == {"id_encoder", "lora_weights"} and all(isinstance(v, dict) for v in raw.values()):
        groups = {name: dict(raw[name]) for name in raw}
    else:
        groups = {"id_encoder": {}, "lora_weights": {}}
        for key, value in raw.items():
            group, _, rest = str(key).partition(".")
            if group not in groups:
                raise CheckpointError(f"{path}: unexpected key {key!r}: a PhotoMaker checkpoint holds id_encoder.* and "
                                      "lora_weights.* only")
            groups[group][rest] = value
    validate_tensors(groups, path)
    encoder = groups["id_encoder"]
    if not any(key.startswith("qformer_perceiver.") for key in encoder):
        raise CheckpointError(f"{path} is a PhotoMaker V1 checkpoint (no qformer_perceiver): idgen runs PhotoMaker V2 "
                              "(TencentARC/PhotoMaker-V2, photomaker-v2.bin)")
    ours, clip = {}, {}
    for key, value in encoder.items():
        if key.startswith(_CLIP_PREFIXES):
            clip[key] = value
        elif key.startswith("visual_projection_2."):
            continue  # a V1 leftover the V2 encoder never uses
        else:
            prefix = next((p for p in _RENAMES if key.startswith(p)), None)
            if prefix is None:
                raise CheckpointError(f"{path}: unexpected id_encoder key {key!r}")
            ours[_RENAMES[prefix] + key[len(prefix):]] = value
    return ours, clip, groups["lora_weights"]


def build_photomaker_encoder(state_dict: StateDict, path: str = "checkpoint") -> PhotoMakerEncoder:
    """A ``PhotoMakerEncoder`` sized from the checkpoint's shapes, with its weights."""
    try:
        proj = state_dict["qformer.proj.0.weight"]
        embed_dim = int(state_dict["qformer.norm.weight"].shape[0])
        config = dict(id_embed_dim=int(proj.shape[1]), embed_dim=embed_dim,
                      num_tokens=int(state_dict["qformer.proj.2.weight"].shape[0]) // embed_dim,
                      clip_embed_dim=int(state_dict["qformer.perceiver_resampler.proj_in.weight"].shape[1]),
                      depth=len({k.split(".")[3] for k in state_dict if k.startswith("qformer.perceiver_resampler.layers.")}),
                      ratio=int(proj.shape[0]) // int(proj.shape[1]))
    except KeyError as err:
        raise CheckpointError(f"{path}: the PhotoMaker id encoder lacks {err.args[0]}: the file is incomplete") from None
    encoder = PhotoMakerEncoder(**config)
    missing, unexpected = encoder.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the PhotoMaker id encoder does not match its layout (missing: "
                              f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})")
    return encoder


def build_photomaker_clip(state_dict: StateDict, path: str = "checkpoint"):
    """The id encoder's CLIP vision model (transformers' ``CLIPVisionModelWithProjection``),
    sized from the checkpoint's shapes (64-dimensional heads, as CLIP ViTs have)."""
    try:
        patch = state_dict["vision_model.embeddings.patch_embedding.weight"]
        positions = int(state_dict["vision_model.embeddings.position_embedding.weight"].shape[0])
        hidden, size = int(patch.shape[0]), int(patch.shape[-1])
        config = CLIPVisionConfig(
            hidden_size=hidden, patch_size=size, image_size=int(round((positions - 1) ** 0.5)) * size,
            num_hidden_layers=len({k.split(".")[3] for k in state_dict if k.startswith("vision_model.encoder.layers.")}),
            intermediate_size=int(state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            num_attention_heads=max(1, hidden // 64), projection_dim=int(state_dict["visual_projection.weight"].shape[0]),
        )
    except KeyError as err:
        raise CheckpointError(f"{path}: the PhotoMaker id encoder lacks its CLIP weight {err.args[0]}") from None
    model = CLIPVisionModelWithProjection(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the PhotoMaker CLIP weights do not match a CLIP vision model (missing: "
                              f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})")
    return model.eval()
