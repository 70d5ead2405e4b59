"""Identity adapter checkpoints: find the file, read it safely, recognise its format, check it
against the UNet it goes into, and build the modules it describes.

The official container (IP-Adapter, IP-Adapter-FaceID, InstantID) is
``{"image_proj": {...}, "ip_adapter": {...}}`` in a ``.bin`` pickle, or the same keys flattened
as ``image_proj.*`` / ``ip_adapter.*`` in ``.safetensors``. ``ip_adapter.N.*`` numbers every
attention processor of the UNet in ``unet.attn_processors`` order; cross-attention layers
carry ``N.to_k_ip`` / ``N.to_v_ip``; FaceID adds a LoRA (``N.to_{q,k,v,out}_lora.{down,up}``)
on every layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

import torch

from idgen.errors import CheckpointError, IdentityInputError

from .attention import IdentityAdapter, IdentityAttention
from .checkpoints import (
    PhotoMakerCheckpointError,
    StateDict,
    is_infiniteyou,
    is_pulid_flux,
    read_checkpoint,
    validate_tensors,
)
from .lora import LoRALayers
from .projection import FaceIDPlusProjection, FaceIDProjection, InstantIDResampler
from .pulid import PuLIDEncoder, PuLIDEncoderV1, build_pulid_encoder, is_pulid, pulid_adapter_state_dict, pulid_format

#: Base model family by UNet cross-attention width, for error messages.
BASE_BY_CROSS_DIM = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}

_FACEID_PROJ_KEYS = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip|to_q_lora|to_k_lora|to_v_lora|to_out_lora)(?:\.(down|up))?\.weight$")
_LORA_NAMES = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora")
#: The attention projection each FaceID LoRA part adapts.
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _base_name(cross_attention_dim: int) -> str:
    return BASE_BY_CROSS_DIM.get(cross_attention_dim, f"a UNet with cross_attention_dim {cross_attention_dim}")


#: PhotoMaker's top-level groups (its own pipeline, ``IDPhotoMakerPipeline``).
PHOTOMAKER_GROUPS = {"id_encoder", "lora_weights"}


def _nest(flat: StateDict) -> dict[str, StateDict]:
    nested: dict[str, StateDict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group not in nested or not rest:
            raise CheckpointError(f"unexpected key {key!r}")
        nested[group][rest] = value
    return nested


def load_adapter_state_dict(path: str) -> dict[str, StateDict]:
    """Read an adapter checkpoint (``read_checkpoint``) into ``{"image_proj": ..., "ip_adapter": ...}``."""
    raw = read_checkpoint(path)
    groups = {str(key).split(".")[0] for key in raw}
    if groups & PHOTOMAKER_GROUPS:
        raise PhotoMakerCheckpointError(f"{path} is a PhotoMaker checkpoint, whose identity enters the prompt: load "
                                        "it into IDPhotoMakerPipeline (IDPhotoMakerPipeline.from_pipe(pipe) shares the models)")

    if is_pulid_flux(raw) or is_infiniteyou(raw):
        method = "PuLID-FLUX" if is_pulid_flux(raw) else "InfiniteYou"
        raise CheckpointError(f"{path} is a {method} adapter, made for FLUX.1: load it into IDFluxPipeline with a FLUX "
                              "base (offline: tiny-flux)")
    if is_pulid(raw):
        return pulid_adapter_state_dict(raw, path)
    if "image_proj" in raw or "ip_adapter" in raw:
        if not all(isinstance(raw.get(k), dict) for k in ("image_proj", "ip_adapter")):
            raise CheckpointError(f"{path} lacks 'image_proj' or 'ip_adapter': pass a complete adapter checkpoint")
        return {"image_proj": dict(raw["image_proj"]), "ip_adapter": dict(raw["ip_adapter"])}
    try:
        return _nest(raw)
    except CheckpointError as err:
        keys = ", ".join(list(raw)[:4])
        raise CheckpointError(
            f"{path} is not an identity adapter checkpoint ({err}; first keys: {keys}): expected "
            "'image_proj.*' and 'ip_adapter.*' entries as in IP-Adapter-FaceID or InstantID files"
        ) from None


@dataclass(frozen=True)
class AdapterSpec:
    """What a checkpoint describes, read from its keys and shapes."""

    format: str  # "faceid", "faceid_portrait", "faceid_plus", "instantid", "pulid" (v1.1) or "pulid_v1"
    cross_attention_dim: int
    num_tokens: int
    lora_rank: int | None


#: Keys of each projection layout that detection and building read.
_REQUIRED_PROJ_KEYS = {
    "instantid": ("latents", "proj_in.weight", "proj_out.weight"),
    "faceid_plus": ("norm.weight", "proj.0.weight", "proj.2.weight", "perceiver_resampler.proj_in.weight",
                    "perceiver_resampler.layers.0.0.to_q.weight", "perceiver_resampler.layers.0.1.1.weight"),
    "faceid": tuple(sorted(_FACEID_PROJ_KEYS)),
    "pulid": ("latents", "proj_out", "id_embedding_mapping.0.weight", "id_embedding_mapping.6.weight",
              "mapping_0.0.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"),
    "pulid_v1": ("body.0.weight", "body.6.weight", "mapping_0.0.weight", "mapping_0.6.weight", "mapping_patch_0.0.weight"),
}
#: Every identity adapter projects ArcFace vectors.
ID_EMBED_DIM = 512
#: FaceID-Portrait: the FaceID layout with 16 tokens per face and no LoRA, for up to 5 faces.
PORTRAIT_TOKENS, PORTRAIT_MAX_FACES = 16, 5


def check_portrait_faces(count: int) -> None:
    """FaceID-Portrait turns each face photo into its own 16 tokens; it was trained on up to 5."""
    if not 1 <= count <= PORTRAIT_MAX_FACES:
        raise IdentityInputError(
            f"FaceID-Portrait takes 1 to {PORTRAIT_MAX_FACES} photos of one person (it was trained on "
            f"{PORTRAIT_MAX_FACES}), got {count}: pass at most {PORTRAIT_MAX_FACES}"
        )


def _dim(tensor: torch.Tensor, axis: int, name: str, path: str) -> int:
    if tensor.ndim <= axis:
        raise CheckpointError(f"{path}: image_proj.{name} has shape {tuple(tensor.shape)}, too few dimensions for its layout")
    return int(tensor.shape[axis])


def detect_format(state_dict: dict[str, StateDict], path: str = "checkpoint") -> AdapterSpec:
    """Recognise the checkpoint format from its ``image_proj`` keys and check the keys and shapes
    that format needs."""
    missing = [group for group in ("image_proj", "ip_adapter") if not isinstance(state_dict.get(group), dict)]
    if missing:
        raise CheckpointError(f"{path} has no {' and no '.join(repr(g) for g in missing)} group of tensors (top-level "
                              f"keys: {', '.join(map(repr, list(state_dict)[:4])) or 'none'}): an identity adapter holds "
                              "{'image_proj': {...}, 'ip_adapter': {...}}, as IP-Adapter-FaceID and InstantID files do")
    validate_tensors(state_dict, path)
    proj = state_dict["image_proj"]
    keys = set(proj)
    format = pulid_format(proj) or (
        "instantid" if "latents" in keys or "proj_in.weight" in keys
        else "faceid_plus" if "perceiver_resampler.proj_in.weight" in keys
        else "faceid" if keys & _FACEID_PROJ_KEYS
        else None
    )
    if format is None:
        raise CheckpointError(
            f"{path}: unknown image_proj layout (keys: {', '.join(sorted(keys)[:6])}): expected an "
            "IP-Adapter-FaceID (proj.0, proj.2, norm) or InstantID (latents, proj_in, layers, proj_out) checkpoint"
        )
    missing = [key for key in _REQUIRED_PROJ_KEYS[format] if key not in keys]
    if missing:
        what, group = ("a PuLID checkpoint", "id_adapter") if format.startswith("pulid") else (f"a {format} adapter", "image_proj")
        raise CheckpointError(
            f"{path} looks like {what} but {group} lacks {', '.join(missing)}: the file is incomplete; "
            "download or export it again"
        )
    if format.startswith("pulid"):
        return _pulid_spec(proj, format, path)
    lora = state_dict["ip_adapter"].get("0.to_q_lora.down.weight")
    rank = None if lora is None else int(lora.shape[0]) if lora.ndim == 2 else 0
    if format == "instantid":
        spec = AdapterSpec(format, _dim(proj["proj_out.weight"], 0, "proj_out.weight", path),
                           _dim(proj["latents"], 1, "latents", path), rank)
        embed_dim = _dim(proj["proj_in.weight"], 1, "proj_in.weight", path)
    else:
        dim = _dim(proj["norm.weight"], 0, "norm.weight", path)
        out = _dim(proj["proj.2.weight"], 0, "proj.2.weight", path)
        if dim == 0 or out % dim:
            raise CheckpointError(f"{path}: image_proj.proj.2.weight has {out} outputs, not a multiple of the token width {dim}")
        if format == "faceid" and rank is None and out // dim == PORTRAIT_TOKENS:  # Portrait: 16 per face, no LoRA
            format = "faceid_portrait"
        spec = AdapterSpec(format, dim, out // dim, rank)
        embed_dim = _dim(proj["proj.0.weight"], 1, "proj.0.weight", path)
    if embed_dim != ID_EMBED_DIM:
        raise CheckpointError(
            f"{path}: the projection takes {embed_dim}-d vectors but ArcFace embeddings are {ID_EMBED_DIM}-d: "
            "this is not an ArcFace identity adapter"
        )
    return spec


def _pulid_spec(proj: StateDict, format: str, path: str) -> AdapterSpec:
    """PuLID's ID encoder: tokens and width from its shapes; its input is ArcFace's 512 + EVA's."""
    first = proj["id_embedding_mapping.0.weight" if format == "pulid" else "body.0.weight"]
    if _dim(first, 1, "id input", path) <= ID_EMBED_DIM:
        raise CheckpointError(f"{path}: PuLID's ID encoder takes {first.shape[1]}-d vectors, not ArcFace's "
                              f"{ID_EMBED_DIM} plus EVA-CLIP's: the file is damaged or of another format")
    if format == "pulid":
        return AdapterSpec(format, _dim(proj["proj_out"], 1, "proj_out", path), _dim(proj["latents"], 1, "latents", path), None)
    context = _dim(proj["mapping_0.6.weight"], 0, "mapping_0.6.weight", path)
    return AdapterSpec(format, context, _dim(proj["body.6.weight"], 0, "body.6.weight", path) // context + 5, None)


def _hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block]


def _is_cross_attention(name: str) -> bool:
    return not name.endswith("attn1.processor")


def check_adapter(unet, state_dict: dict[str, StateDict], spec: AdapterSpec, path: str) -> None:
    """Raise a CheckpointError naming the file when the checkpoint does not fit ``unet``."""
    unet_dim = unet.config.cross_attention_dim
    if spec.cross_attention_dim != unet_dim:
        raise CheckpointError(
            f"{path} is an adapter for {_base_name(spec.cross_attention_dim)} (cross-attention width "
            f"{spec.cross_attention_dim}) but the pipeline's UNet is {_base_name(unet_dim)} ({unet_dim}): "
            f"use an adapter made for {_base_name(unet_dim)} or the pipeline for {_base_name(spec.cross_attention_dim)}"
        )
    names = list(unet.attn_processors)
    found: dict[int, set[str]] = {}
    for key in state_dict["ip_adapter"]:
        match = _IP_KEY.match(key)
        if not match:
            raise CheckpointError(f"{path}: unexpected key ip_adapter.{key}; this is not an identity adapter layout")
        index = int(match.group(1))
        if index >= len(names):
            raise CheckpointError(
                f"{path} has weights for attention layer {index} but the UNet has {len(names)} attention layers: "
                "the adapter was made for a different UNet"
            )
        found.setdefault(index, set()).add(key.split(".", 1)[1])
    for index, name in enumerate(names):
        has = found.get(index, set())
        hidden = _hidden_size(unet, name)
        wants_ip = _is_cross_attention(name)
        if wants_ip != ("to_k_ip.weight" in has and "to_v_ip.weight" in has):
            what = "lacks" if wants_ip else "has unexpected"
            raise CheckpointError(
                f"{path} {what} identity weights for layer {index} ({name}): the adapter was made for a different UNet"
            )
        if wants_ip:
            for part in ("to_k_ip", "to_v_ip"):
                shape = tuple(state_dict["ip_adapter"][f"{index}.{part}.weight"].shape)
                if shape != (hidden, unet_dim):
                    raise CheckpointError(
                        f"{path}: ip_adapter.{index}.{part}.weight has shape {shape}, the UNet needs "
                        f"{(hidden, unet_dim)}: the adapter was made for a different UNet"
                    )
        lora_parts = {k for k in has if k.split(".")[0] in _LORA_NAMES}
        if spec.lora_rank is not None and len(lora_parts) != 8:
            raise CheckpointError(f"{path}: layer {index} ({name}) has an incomplete LoRA ({sorted(lora_parts)})")
        if lora_parts:
            _check_lora_shapes(unet, state_dict["ip_adapter"], index, name, cast(int, spec.lora_rank), path)


def _check_lora_shapes(unet, ip_adapter: StateDict, index: int, name: str, rank: int, path: str) -> None:
    attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
    for part, layer in zip(_LORA_NAMES, (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])):
        layer = getattr(layer, "base_layer", layer)
        for side, shape in (("down", (rank, layer.in_features)), ("up", (layer.out_features, rank))):
            key = f"{index}.{part}.{side}.weight"
            if tuple(ip_adapter[key].shape) != shape:
                raise CheckpointError(
                    f"{path}: ip_adapter.{key} has shape {tuple(ip_adapter[key].shape)}, layer {name} needs {shape} "
                    f"(LoRA rank {rank}): the adapter was made for a different UNet or the file is damaged"
                )


def build_projection(
    state_dict: dict[str, StateDict], spec: AdapterSpec, path: str = "checkpoint", shortcut: bool = False
) -> FaceIDProjection | FaceIDPlusProjection | InstantIDResampler | PuLIDEncoder | PuLIDEncoderV1:
    """The projection model the checkpoint describes, with its weights (shapes read from the keys);
    ``shortcut``: FaceID-PlusV2's (the keys do not tell v1 from v2)."""
    proj = state_dict["image_proj"]
    try:
        if spec.format in ("pulid", "pulid_v1"):
            return build_pulid_encoder(proj, spec.format)
        if spec.format == "instantid":
            dim = int(proj["latents"].shape[2])
            model = InstantIDResampler(
                dim=dim,
                depth=len({key.split(".")[1] for key in proj if key.startswith("layers.")}),
                dim_head=64,  # the reference's; the checkpoint only fixes heads x dim_head
                heads=int(proj["layers.0.0.to_q.weight"].shape[0]) // 64,
                num_queries=spec.num_tokens,
                embedding_dim=int(proj["proj_in.weight"].shape[1]),
                output_dim=spec.cross_attention_dim,
                ff_mult=int(proj["layers.0.1.1.weight"].shape[0]) // dim,
            )
        elif spec.format == "faceid_plus":
            prefix = "perceiver_resampler.layers."
            model = FaceIDPlusProjection(
                id_embed_dim=int(proj["proj.0.weight"].shape[1]),
                hidden_dim=int(proj["proj.0.weight"].shape[0]),
                cross_attention_dim=spec.cross_attention_dim,
                num_tokens=spec.num_tokens,
                clip_embed_dim=int(proj["perceiver_resampler.proj_in.weight"].shape[1]),
                depth=len({key[len(prefix):].split(".")[0] for key in proj if key.startswith(prefix)}),
                heads=int(proj[prefix + "0.0.to_q.weight"].shape[0]) // 64,
                ff_mult=int(proj[prefix + "0.1.1.weight"].shape[0]) // spec.cross_attention_dim,
                shortcut=shortcut,
            )
        else:
            model = FaceIDProjection(
                id_embed_dim=int(proj["proj.0.weight"].shape[1]),
                hidden_dim=int(proj["proj.0.weight"].shape[0]),
                cross_attention_dim=spec.cross_attention_dim,
                num_tokens=spec.num_tokens,
            )
        model.load_state_dict(proj, strict=True)
    except (RuntimeError, KeyError, IndexError, ValueError, ZeroDivisionError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: image_proj does not match the {spec.format} layout ({detail}): the file is damaged or of another format"
        ) from None
    return model


def build_identity_adapter(
    unet, state_dict: dict[str, StateDict], spec: AdapterSpec, path: str = "checkpoint", shortcut: bool = False
) -> IdentityAdapter:
    """The projection and the identity attention of every cross-attention layer, with the
    checkpoint's weights, on the UNet's device and dtype (not yet attached)."""
    layers = {}
    for index, name in enumerate(unet.attn_processors):
        if not _is_cross_attention(name):
            continue
        module = name.rsplit(".processor", 1)[0]
        layer = IdentityAttention(_hidden_size(unet, name), spec.cross_attention_dim, unet.get_submodule(module).heads)
        layer.load_state_dict(
            {
                "to_k_id.weight": state_dict["ip_adapter"][f"{index}.to_k_ip.weight"],
                "to_v_id.weight": state_dict["ip_adapter"][f"{index}.to_v_ip.weight"],
            }
        )
        layers[module] = layer
    return IdentityAdapter(build_projection(state_dict, spec, path, shortcut), layers).to(device=unet.device, dtype=unet.dtype)


def faceid_lora_layers(unet, state_dict: dict[str, StateDict]) -> LoRALayers:
    """The FaceID LoRA as ``(down, up)`` per adapted projection of ``unet``, keyed by module path
    (``...attn1.to_q``, ``...attn2.to_out.0``)."""
    layers: LoRALayers = {}
    ip_adapter = state_dict["ip_adapter"]
    for index, name in enumerate(unet.attn_processors):
        attn = name.rsplit(".processor", 1)[0]
        for part, target in zip(_LORA_NAMES, _LORA_TARGETS):
            down = ip_adapter.get(f"{index}.{part}.down.weight")
            if down is not None:
                layers[f"{attn}.{target}"] = (down, ip_adapter[f"{index}.{part}.up.weight"])
    return layers


def init_identity_adapter_state_dict(
    unet, format: str = "faceid", num_tokens: int | None = None, lora_rank: int | None = None, seed: int = 0
) -> dict[str, StateDict]:
    """A fresh checkpoint to train from, in the official layout: a newly initialised projection,
    identity K/V copied from each layer's text K/V (IP-Adapter's initialisation) and, with
    ``lora_rank``, a FaceID LoRA whose ``up`` is zero (training starts from the base model)."""
    torch.manual_seed(seed)
    dim = unet.config.cross_attention_dim
    if format == "instantid":
        projection = InstantIDResampler(num_queries=num_tokens or 16, output_dim=dim)
    elif format == "faceid":
        projection = FaceIDProjection(cross_attention_dim=dim, num_tokens=num_tokens or 4)
    else:
        raise ValueError(f"can train 'faceid' or 'instantid' adapters, not {format!r}")
    ip_adapter: StateDict = {}
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        if _is_cross_attention(name):
            ip_adapter[f"{index}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
            ip_adapter[f"{index}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
        if lora_rank:
            for part, layer in zip(_LORA_NAMES, (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])):
                down = torch.empty(lora_rank, layer.in_features)
                torch.nn.init.kaiming_uniform_(down, a=5**0.5)
                ip_adapter[f"{index}.{part}.down.weight"] = down
                ip_adapter[f"{index}.{part}.up.weight"] = torch.zeros(layer.out_features, lora_rank)
    image_proj = {k: v.detach().clone() for k, v in projection.state_dict().items()}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def identity_adapter_state_dict(unet, adapter: IdentityAdapter, lora_name: str = "faceid") -> dict[str, StateDict]:
    """The identity ``adapter`` of ``unet`` (and its LoRA ``lora_name``) in the official layout,
    the inverse of loading: what ``save_adapter_checkpoint`` writes for export."""

    def cpu(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().float().cpu().contiguous()

    layers = dict(adapter.items())
    ip_adapter: StateDict = {}
    for index, name in enumerate(unet.attn_processors):
        module = name.rsplit(".processor", 1)[0]
        if module in layers:
            ip_adapter[f"{index}.to_k_ip.weight"] = cpu(layers[module].to_k_id.weight)
            ip_adapter[f"{index}.to_v_ip.weight"] = cpu(layers[module].to_v_id.weight)
        attn = unet.get_submodule(module)
        for part, layer in zip(_LORA_NAMES, (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])):
            if lora_name in getattr(layer, "lora_A", {}):
                ip_adapter[f"{index}.{part}.down.weight"] = cpu(layer.lora_A[lora_name].weight)
                ip_adapter[f"{index}.{part}.up.weight"] = cpu(layer.lora_B[lora_name].weight * layer.scaling[lora_name])
    return {"image_proj": {k: cpu(v) for k, v in adapter.projection.state_dict().items()}, "ip_adapter": ip_adapter}
