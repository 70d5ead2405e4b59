"""Training a PuLID-style adapter on FLUX.1: the ID encoder and the cross-attention blocks after the
transformer's blocks learn with the rectified-flow loss while the base stays frozen.

The identity of each photo is PuLID-FLUX's: the raw ArcFace vector and EVA02-CLIP's features of
the face aligned to FFHQ's template and parsed (grey on white), read by the IDFormer. The export
is a ``pulid_flux`` checkpoint that ``IDFluxPipeline.load_identity_adapter`` loads as is.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from idgen.adapters.flux import PuLIDFluxAdapter, ca_block_positions
from idgen.adapters.pulid import eva_face_pixels
from idgen.faces.alignment import align_face

#: FLUX.1-dev's distilled guidance while training (diffusers' FLUX training scripts use the same).
TRAIN_GUIDANCE = 3.5


def init_pulid_flux_adapter(transformer, eva, seed: int = 0, dim: int = 1024, depth: int = 10,
                            num_queries: int = 32) -> PuLIDFluxAdapter:
    """A fresh PuLID-FLUX adapter for ``transformer`` reading ``eva``: the reference's IDFormer
    shape (width ``dim``) with tokens as wide as the cross-attention reads, and one cross-attention
    block per place ``ca_block_positions`` names; the blocks' outputs start at zero, so step 0 is
    the base model."""
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    torch.manual_seed(seed)
    adapter = PuLIDFluxAdapter(
        encoder_config=dict(dim=dim, depth=depth, heads=max(1, dim // 64), num_queries=num_queries,
                            output_dim=min(2048, width), clip_dim=eva.config.embed_dim, vit_dim=eva.config.width,
                            hidden_dim=dim),
        num_ca=len(ca_block_positions(config.num_layers, config.num_single_layers)), dim=width,
        kv_dim=min(2048, width), heads=max(1, min(2048, width) // 128))
    for block in adapter.pulid_ca:
        nn.init.zeros_(block.to_out.weight)
    return adapter


@torch.no_grad()
def eva_inputs(pipe, pixels: torch.Tensor, kps: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EVA02-CLIP's normalised embeddings (B, 1, C) and hidden states of the training photos'
    faces, aligned by their keypoints as the pipeline aligns a face photo."""
    rgb = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    crops = np.stack([align_face(image, points, 512, template="ffhq") for image, points in zip(rgb, kps.cpu().numpy())])
    tower = pipe.eva_encoder
    embeds, hidden = tower(eva_face_pixels(crops, pipe.face_parser, tower.config.image_size).to(tower.dtype))
    return F.normalize(embeds.float(), dim=-1)[:, None], list(hidden)


def flux_training_loss(pipe, adapter: PuLIDFluxAdapter, batch: dict, captions: list[str], id_embeds: torch.Tensor,
                       drop_id: torch.Tensor, generators: list[torch.Generator], device, weight_dtype) -> torch.Tensor:
    """Rectified-flow loss of one batch: noisy latents ``(1 - s) x + s n`` at a uniform ``s``, the
    transformer asked for ``n - x`` with the identity's tokens in its cross-attention blocks.
    Dropped identities read zeros, as PuLID's unconditional branch does."""
    pixels = batch["pixels"].to(device, weight_dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator=generators).float()
        latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        text, pooled, text_ids = pipe.encode_prompt(captions, None, device=device, max_sequence_length=128)
        eva_embeds, eva_hidden = eva_inputs(pipe, batch["pixels"], batch["kps"])
    keep = (~drop_id).to(device)[:, None, None]
    id_cond = torch.cat([id_embeds[:, None].to(device), eva_embeds.to(device)], dim=-1) * keep
    hidden = [level.to(device, torch.float32) * keep for level in eva_hidden]
    tokens = adapter.pulid_encoder(id_cond, hidden)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
    sigmas = torch.stack([torch.rand((), generator=g) for g in generators]).to(device)
    noisy = (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
    batch_size, channels, height, width = latents.shape
    packed = pipe._pack_latents(noisy, batch_size, channels, height, width).to(weight_dtype)
    image_ids = pipe._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, weight_dtype)
    guidance = torch.full((batch_size,), TRAIN_GUIDANCE, device=device) if pipe.transformer.config.guidance_embeds else None
    with pipe.identity_conditioning(tokens.to(weight_dtype), None):
        prediction = pipe.transformer(hidden_states=packed, timestep=sigmas.to(weight_dtype), guidance=guidance,
                                      pooled_projections=pooled, encoder_hidden_states=text, txt_ids=text_ids,
                                      img_ids=image_ids, return_dict=False)[0]
    target = pipe._pack_latents(noise - latents, batch_size, channels, height, width)
    return F.mse_loss(prediction.float(), target.float())
