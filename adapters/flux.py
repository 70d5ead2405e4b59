"""Identity on FLUX.1: PuLID-FLUX's and InfiniteYou's modules and checkpoint layouts.

PuLID-FLUX (guozinan/PuLID ``pulid_flux_v0.9.x.safetensors``) holds ``pulid_encoder.*``, the
v1.1 IDFormer (``PuLIDEncoder``), and ``pulid_ca.N.*``, identity cross-attention blocks: after
every ``double_interval``-th double-stream block and every ``single_interval``-th single-stream
block of the transformer, the image tokens attend to the identity tokens and add the result,
weighted by ``id_scale``. The text tokens are left alone.

InfiniteYou (ByteDance/InfiniteYou ``infu_flux_v1.0/<model>/``) holds ``image_proj_model.bin``
(``{"image_proj": ...}``: IP-Adapter's perceiver resampler from one ArcFace vector to tokens as
wide as T5's) and ``InfuseNetModel/``, a diffusers ``FluxControlNetModel`` that reads those tokens
where a ControlNet reads the prompt, and a face-keypoint image (or a black one) as its condition;
its residuals are added to the transformer's blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from idgen.errors import CheckpointError

from .checkpoints import PULID_FLUX_GROUPS, StateDict
from .loading import AdapterSpec, build_projection
from .pulid import PuLIDEncoder, build_pulid_encoder

#: Checkpoint formats IDFluxPipeline runs.
FLUX_FORMATS = ("pulid_flux", "infiniteyou")
#: InfiniteYou's projection file and InfuseNet folder, side by side in each model folder.
INFINITEYOU_WEIGHT_NAME = "image_proj_model.bin"
INFUSENET_FOLDER = "InfuseNetModel"
#: Width of the heads of PuLID-FLUX's cross-attention (the reference's; the keys fix heads x width).
CA_HEAD_DIM = 128


def ca_block_positions(num_double: int, num_single: int, double_interval: int = 2, single_interval: int = 4
                       ) -> list[str]:
    """The transformer blocks PuLID-FLUX's cross-attention follows, in order: every
    ``double_interval``-th double block then every ``single_interval``-th single block, named as
    the transformer's modules (``transformer_blocks.0``, ..., ``single_transformer_blocks.0``, ...)."""
    return ([f"transformer_blocks.{i}" for i in range(0, num_double, double_interval)]
            + [f"single_transformer_blocks.{i}" for i in range(0, num_single, single_interval)])


class IdentityCrossAttention(nn.Module):
    """PuLID-FLUX's ``PerceiverAttentionCA``: the image tokens (B, N, dim) query the identity tokens
    (B, T, kv_dim); returns what is added to the image tokens. Names match ``pulid_ca.N.*``."""

    def __init__(self, dim: int = 3072, kv_dim: int = 2048, heads: int = 16, dim_head: int = CA_HEAD_DIM):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, id_tokens: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        query = split(self.to_q(self.norm2(hidden_states)))
        key, value = (split(t) for t in self.to_kv(self.norm1(id_tokens)).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(query, key, value)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PuLIDFluxAdapter(ModelMixin, ConfigMixin):
    """PuLID-FLUX: the ID encoder (``pulid_encoder``) and the cross-attention blocks (``pulid_ca``)
    that follow the transformer blocks ``ca_block_positions`` names. Its state dict is the
    checkpoint's, key for key."""

    @register_to_config
    def __init__(self, encoder_config: dict | None = None, num_ca: int = 20, dim: int = 3072, kv_dim: int = 2048,
                 heads: int = 24, double_interval: int = 2, single_interval: int = 4):
        super().__init__()
        self.pulid_encoder = PuLIDEncoder(**(encoder_config or {}))
        self.pulid_ca = nn.ModuleList(IdentityCrossAttention(dim, kv_dim, heads) for _ in range(num_ca))

    def positions(self, transformer) -> list[str]:
        """The transformer blocks each cross-attention follows; raises when the counts differ."""
        config = transformer.config
        names = ca_block_positions(config.num_layers, config.num_single_layers, self.config.double_interval,
                                   self.config.single_interval)
        if len(names) != len(self.pulid_ca):
            raise CheckpointError(
                f"this PuLID-FLUX adapter has {len(self.pulid_ca)} cross-attention blocks, but a transformer with "
                f"{config.num_layers} double and {config.num_single_layers} single blocks takes {len(names)}: "
                "use the adapter made for this base (FLUX.1's 19 + 38 blocks take 20)")
        width = config.num_attention_heads * config.attention_head_dim
        if width != self.config.dim:
            raise CheckpointError(f"this PuLID-FLUX adapter is {self.config.dim} wide and the transformer {width}: "
                                  "use the adapter made for this base")
        return names


def pulid_flux_adapter(raw: dict, path: str = "checkpoint") -> PuLIDFluxAdapter:
    """PuLID-FLUX's adapter from its checkpoint (flat ``pulid_encoder.*`` / ``pulid_ca.N.*`` keys, or
    those two groups nested as a ``.bin`` holds them), sized from the shapes."""
    groups: dict[str, StateDict] = {name: {} for name in PULID_FLUX_GROUPS}
    flat = {f"{group}.{key}": value for group, part in raw.items() if isinstance(part, dict) for key, value in part.items()}
    for key, value in {**{k: v for k, v in raw.items() if not isinstance(v, dict)}, **flat}.items():
        group, _, rest = str(key).partition(".")
        if group not in groups or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: unexpected key {key!r}: a PuLID-FLUX checkpoint holds pulid_encoder.* and "
                                  "pulid_ca.* tensors only")
        groups[group][rest] = value
    ca = groups["pulid_ca"]
    try:
        encoder = build_pulid_encoder(groups["pulid_encoder"], "pulid")
        num_ca = len({key.split(".")[0] for key in ca})
        inner, dim = (int(s) for s in ca["0.to_q.weight"].shape)
        adapter = PuLIDFluxAdapter(encoder_config=dict(encoder.config), num_ca=num_ca, dim=dim,
                                   kv_dim=int(ca["0.to_kv.weight"].shape[1]), heads=inner // CA_HEAD_DIM)
        adapter.load_state_dict({f"pulid_encoder.{k}": v for k, v in groups["pulid_encoder"].items()}
                                | {f"pulid_ca.{k}": v for k, v in ca.items()}, strict=True)
    except (KeyError, RuntimeError, ValueError, IndexError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a complete PuLID-FLUX checkpoint ({detail}): download or export it again") from None
    if adapter.config.kv_dim != encoder.config.output_dim:
        raise CheckpointError(f"{path}: the ID encoder makes {encoder.config.output_dim}-d tokens but the cross-attention "
                              f"reads {adapter.config.kv_dim}-d ones: the file is damaged")
    return adapter


def infiniteyou_projection(raw: dict, path: str = "checkpoint"):
    """InfiniteYou's projection (an ``InstantIDResampler``: ArcFace vector -> T5-wide tokens)."""
    proj = raw["image_proj"]
    try:
        spec = AdapterSpec("instantid", int(proj["proj_out.weight"].shape[0]), int(proj["latents"].shape[1]), None)
    except KeyError as err:
        raise CheckpointError(f"{path}: InfiniteYou's image_proj lacks {err}: download or export it again") from None
    return build_projection({"image_proj": proj}, spec, path)
