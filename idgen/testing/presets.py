"""The offline tiny preset: a randomly initialised SD1.5-shaped pipeline, a random FaceID
checkpoint in the official format and a random ArcFace-format recognizer, all built
deterministically from a seed into a cache folder.

It exists so that the whole stack (face analysis, adapter loading, pipeline, CLI) runs with
no download; its images are noise-like and its identity embeddings carry no meaning. Real
weights come from the hub.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import onnx
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from idgen.adapters import InstantIDResampler
from idgen.adapters.checkpoints import save_adapter_checkpoint
from idgen.adapters.eva_clip import EVAVisionTower
from idgen.adapters.face_parsing import BiSeNet
from idgen.adapters.face_recognition import IRSEArcFace
from idgen.adapters.flux import INFINITEYOU_WEIGHT_NAME, INFUSENET_FOLDER, PuLIDFluxAdapter, ca_block_positions
from idgen.adapters.loading import _hidden_size, _is_cross_attention
from idgen.adapters.photomaker import _RENAMES, PhotoMakerEncoder
from idgen.adapters.projection import FacePerceiverResampler
from idgen.adapters.pulid import PuLIDEncoder
from idgen.faces import RANDOM_WEIGHTS_KEY
from idgen.pipelines import IDFluxPipeline, IDStableDiffusionPipeline, IDStableDiffusionXLPipeline

#: Bumped whenever what the builder writes changes, so stale caches are rebuilt.
PRESET_FORMAT = 12
TINY_PRESETS = ("tiny", "tiny-arc2face", "tiny-sdxl", "tiny-faceid-sdxl", "tiny-photomaker", "tiny-pulid", "tiny-flux",
                "tiny-infiniteyou")
INSTANTID_FILE = "ip-adapter.bin"
ADAPTER_FILE = "ip-adapter-faceid_sd15.safetensors"
FACEID_SDXL_FILE = "ip-adapter-faceid_sdxl.safetensors"
PHOTOMAKER_FILE = "photomaker-v2.bin"
PULID_FILE, FACE_PARSER_FILE = "pulid_v1.1.safetensors", "parsing_bisenet.pth"
PULID_FLUX_FILE = "pulid_flux_v0.9.1.safetensors"
IRSE_FILE = "recognition_arcface_ir_se50.pth"


def cache_dir() -> str:
    """Where presets are built: ``$IDGEN_CACHE``, else ``~/.cache/idgen``."""
    return os.path.expanduser(os.environ.get("IDGEN_CACHE", os.path.join("~", ".cache", "idgen")))


@dataclass(frozen=True)
class Preset:
    """Paths of a built preset, used exactly like real model locations."""

    name: str
    seed: int
    base: str  # diffusers pipeline folder
    adapter: str  # identity model: adapter checkpoint file, or a folder in Arc2Face layout
    face_pack: str  # insightface-style pack folder (recognition model only)
    clip: str  # tiny CLIP (model + tokenizer folder) for CLIP-T
    image_encoder: str | None = None  # the adapter's own image encoder (PuLID's EVA02-CLIP tower folder)
    face_parser: str | None = None  # PuLID's face parser (facexlib's BiSeNet file)
    face_recognizer: str | None = None  # InfiniteYou's ArcFace (facexlib's IR-SE file)


# ------------------------------------------------------------------------------ tokenizer
def _byte_symbols() -> list[str]:
    """CLIP's byte-level BPE alphabet: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def tiny_clip_tokenizer():
    """A CLIP tokenizer over single characters (plus the word "id"), built with no download."""
    symbols = _byte_symbols()
    merges = [("i", "d</w>")]  # keeps "id" one token, as in CLIP's real vocabulary
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# ------------------------------------------------------------------------------ models
def tiny_unet(cross_attention_dim: int = 32):
    """A tiny SD1.5-shaped UNet: two cross-attention blocks down and up, 14 attention layers."""
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae():
    """A tiny VAE with SD's 8x downsampling and 4 latent channels (128 px images, 16x16 latents)."""
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
    )


def tiny_text_encoder(tokenizer, hidden_size: int = 32):
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_arc2face_models(tokenizer, seed: int = 0):
    """Arc2Face's two fine-tuned parts, tiny and random: a text encoder wide enough to hold a
    512-d identity (``encoder/``) and a UNet attending to it (``arc2face/``)."""
    torch.manual_seed(seed + 1)
    return tiny_text_encoder(tokenizer, hidden_size=512), tiny_unet(cross_attention_dim=512)


def tiny_sd15_pipeline(seed: int = 0):
    """A tiny random ``IDStableDiffusionPipeline`` shaped like SD1.5 (8x VAE, cross-attention UNet)."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = tiny_unet()
    vae = tiny_vae()
    text_encoder = tiny_text_encoder(tokenizer)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return IDStableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, controlnet=None):
    """A tiny random ``IDStableDiffusionXLPipeline``: SDXL-shaped UNet (text-time conditioning, two
    text encoders, 64-wide cross-attention), the tiny 8x VAE and Euler, as InstantID's demo uses."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # pooled text (32) + 6 time ids x 8
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = tiny_vae()
    text_encoder = tiny_text_encoder(tokenizer)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_encoder.config.to_dict(), "projection_dim": 32}))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return IDStableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(), unet=unet, scheduler=cast(Any, scheduler), controlnet=controlnet,
        add_watermarker=False,
    )


def tiny_identitynet(unet, seed: int = 0):
    """A tiny IdentityNet: an SDXL ``ControlNetModel`` shaped like ``unet``, random."""
    torch.manual_seed(seed + 3)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    with torch.no_grad():
        # from_unet zero-inits the condition's last conv and the outputs, and default init washes
        # a sparse keypoint image out: give the condition path a gain so the keypoints matter.
        for module in net.controlnet_cond_embedding.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0, 3 / module.weight[0].numel() ** 0.5)
                module.bias.zero_()
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            module.weight.normal_(0, 0.01)
    return net


def random_instantid_state_dict(unet, seed: int = 0, dim: int = 128, depth: int = 4, num_queries: int = 16) -> dict:
    """A random checkpoint in the official InstantID ``ip-adapter.bin`` layout for ``unet``
    (Resampler with ``dim / 64`` heads of 64, identity K/V on every cross-attention layer)."""
    generator = torch.Generator().manual_seed(seed)
    out = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    resampler = InstantIDResampler(dim=dim, depth=depth, heads=dim // 64, num_queries=num_queries, output_dim=out)
    image_proj = {k: v + torch.randn(v.shape, generator=generator) * 0.02 for k, v in resampler.state_dict().items()}
    return {"image_proj": image_proj, "ip_adapter": _random_identity_kv(unet, generator)}


def _random_identity_kv(unet, generator: torch.Generator) -> dict:
    """Random ``N.to_{k,v}_ip.weight`` for every cross-attention layer of ``unet``."""
    out, ip_adapter = unet.config.cross_attention_dim, {}
    for index, name in enumerate(unet.attn_processors):
        if _is_cross_attention(name):
            for part in ("to_k_ip", "to_v_ip"):
                ip_adapter[f"{index}.{part}.weight"] = torch.randn(_hidden_size(unet, name), out, generator=generator) * out**-0.5
    return ip_adapter


def tiny_eva_tower(seed: int = 0):
    """A tiny random EVA02-CLIP vision tower (56 px, 32 wide, 5 blocks each giving PuLID a hidden state)."""
    torch.manual_seed(seed + 7)
    tower = EVAVisionTower(image_size=56, patch_size=14, width=32, layers=5, head_width=16, mlp_ratio=2.0, embed_dim=16,
                           hidden_layers=(0, 1, 2, 3, 4))
    with torch.no_grad():
        for name in ("cls_token", "pos_embed", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"):
            tower.get_parameter(name).normal_(0, 0.02)
    return tower.eval()


def random_pulid_state_dict(unet, eva, seed: int = 0, dim: int = 64) -> dict:
    """A random checkpoint in PuLID v1.1's layout (``pulid_v1.1.safetensors``, flat keys) for
    ``unet``, reading the ``eva`` tower's features: ``id_adapter.*`` (an IDFormer of width ``dim``)
    and ``id_adapter_attn_layers.N.id_to_{k,v}.weight``."""
    torch.manual_seed(seed)
    encoder = PuLIDEncoder(dim=dim, depth=5, dim_head=64, heads=max(1, dim // 64), num_id_token=2, num_queries=8,
                           output_dim=unet.config.cross_attention_dim, clip_dim=eva.config.embed_dim,
                           vit_dim=eva.config.width, hidden_dim=dim)
    generator = torch.Generator().manual_seed(seed + 1)
    state = {f"id_adapter.{k}": v + torch.randn(v.shape, generator=generator) * 0.02 for k, v in encoder.state_dict().items()}
    for key, value in _random_identity_kv(unet, generator).items():
        index, part = key.split(".")[:2]
        state[f"id_adapter_attn_layers.{index}.id_{part.removesuffix('_ip')}.weight"] = value
    return state


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over lower-case letters, digits and punctuation, built with no download."""
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_flux_pipeline(seed: int = 0):
    """A tiny random ``IDFluxPipeline`` shaped like FLUX.1-dev: a rectified-flow transformer with 3
    double- and 5 single-stream blocks (guidance-distilled, rotary axes 4+6+6), a VAE with 16
    latent channels and 8x downsampling, CLIP and T5 text encoders, FLUX's shifted Euler schedule."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed + 11)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=3, num_single_layers=5,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1,
                        norm_num_groups=8, sample_size=128, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    text_encoder = CLIPTextModel(tiny_text_encoder(tokenizer).config).eval()
    t5: dict[str, Any] = dict(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                              decoder_start_token_id=0)
    text_encoder_2 = T5EncoderModel(T5Config(**t5)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return IDFluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def random_pulid_flux_state_dict(transformer, eva, seed: int = 0, dim: int = 64) -> dict:
    """A random checkpoint in PuLID-FLUX's layout (``pulid_flux_v0.9.1.safetensors``) for
    ``transformer``: ``pulid_encoder.*`` (an IDFormer of width ``dim`` reading ``eva``) and one
    ``pulid_ca.N.*`` block per place ``ca_block_positions`` names."""
    config = transformer.config
    torch.manual_seed(seed)
    encoder = dict(dim=dim, depth=5, dim_head=64, heads=max(1, dim // 64), num_id_token=2, num_queries=8,
                   output_dim=32, clip_dim=eva.config.embed_dim, vit_dim=eva.config.width, hidden_dim=dim)
    adapter = PuLIDFluxAdapter(encoder_config=encoder, num_ca=len(ca_block_positions(config.num_layers, config.num_single_layers)),
                               dim=config.num_attention_heads * config.attention_head_dim, kv_dim=32, heads=1)
    generator = torch.Generator().manual_seed(seed + 1)
    return {k: v + torch.randn(v.shape, generator=generator) * 0.02 for k, v in adapter.state_dict().items()}


def random_infiniteyou(transformer, seed: int = 0, dim: int = 64) -> tuple[dict, FluxControlNetModel]:
    """InfiniteYou's two parts, random, for ``transformer``: ``image_proj_model.bin``'s contents
    (``{"image_proj": resampler}``, tokens as wide as its text) and an InfuseNet (a
    ``FluxControlNetModel`` with 2 double and 2 single blocks, residuals given a gain)."""
    config = transformer.config
    torch.manual_seed(seed + 12)
    resampler = InstantIDResampler(dim=dim, depth=2, heads=dim // 64, num_queries=8, output_dim=config.joint_attention_dim)
    net = FluxControlNetModel(patch_size=1, in_channels=config.in_channels, num_layers=2, num_single_layers=2,
                              attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
                              joint_attention_dim=config.joint_attention_dim, pooled_projection_dim=config.pooled_projection_dim,
                              guidance_embeds=config.guidance_embeds, axes_dims_rope=config.axes_dims_rope)
    with torch.no_grad():  # zero-initialised outputs would make InfuseNet a no-op
        for module in [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]:
            module.weight.normal_(0, 0.05)
    return {"image_proj": dict(resampler.state_dict())}, net


def tiny_irse(seed: int = 0):
    """A tiny random IR-SE ArcFace in facexlib's layout: 4 units of widths 16 to 128."""
    torch.manual_seed(seed + 13)
    return IRSEArcFace([(16, 16), (16, 32), (32, 64), (64, 128)], stem=16).eval()


def tiny_clip(seed: int = 0):
    """A tiny random CLIP (text and vision towers, 16-d joint space) for CLIP-T offline."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 4)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)), tokenizer


def tiny_clip_vision(seed: int = 0):
    """A tiny random CLIP image encoder shaped like FaceID-Plus's ViT-H (224 px input, penultimate
    hidden states as features), 32 wide."""
    torch.manual_seed(seed + 5)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=224,
        patch_size=32, projection_dim=16)).eval()


def random_faceid_plus_state_dict(unet, clip_embed_dim: int, seed: int = 0, lora_rank: int = 8) -> dict:
    """A random checkpoint in the official IP-Adapter-FaceID-Plus layout (FaceID's, plus the
    ``perceiver_resampler`` over CLIP features of width ``clip_embed_dim``) for ``unet``."""
    state = random_faceid_state_dict(unet, seed, lora_rank)
    dim = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    resampler = FacePerceiverResampler(dim, 4, 64, max(1, dim // 64), clip_embed_dim, dim, 4)
    generator = torch.Generator().manual_seed(seed + 1)
    state["image_proj"].update({f"perceiver_resampler.{key}": value + torch.randn(value.shape, generator=generator) * 0.02
                                for key, value in resampler.state_dict().items()})
    return state


def random_faceid_state_dict(unet, seed: int = 0, lora_rank: int | None = 8, hidden_dim: int = 1024,
                             num_tokens: int = 4) -> dict:
    """A random checkpoint in the official IP-Adapter-FaceID layout for ``unet``; FaceID-Portrait's
    with ``num_tokens=16, lora_rank=None``.

    Weights are scaled so each part (tokens, identity K/V, LoRA) visibly changes the output.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    dim, tokens = unet.config.cross_attention_dim, num_tokens
    image_proj = {
        "proj.0.weight": randn(hidden_dim, 512, std=512**-0.5 * 4),
        "proj.0.bias": randn(hidden_dim, std=0.1),
        "proj.2.weight": randn(dim * tokens, hidden_dim, std=hidden_dim**-0.5),
        "proj.2.bias": randn(dim * tokens, std=0.1),
        "norm.weight": 1 + randn(dim, std=0.1),
        "norm.bias": randn(dim, std=0.1),
    }
    ip_adapter = {}
    for index, name in enumerate(unet.attn_processors):
        hidden = _hidden_size(unet, name)
        context = dim if _is_cross_attention(name) else hidden
        for part, width in (("to_q_lora", hidden), ("to_k_lora", context), ("to_v_lora", context), ("to_out_lora", hidden)):
            if lora_rank is None:
                break
            ip_adapter[f"{index}.{part}.down.weight"] = randn(lora_rank, width, std=width**-0.5)
            ip_adapter[f"{index}.{part}.up.weight"] = randn(hidden, lora_rank, std=0.05 * lora_rank**-0.5)
        if _is_cross_attention(name):
            ip_adapter[f"{index}.to_k_ip.weight"] = randn(hidden, dim, std=dim**-0.5)
            ip_adapter[f"{index}.to_v_ip.weight"] = randn(hidden, dim, std=dim**-0.5)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def tiny_photomaker_clip(seed: int = 0):
    """A tiny random CLIP vision model in PhotoMaker's layout (64-dimensional heads, as CLIP ViTs)."""
    torch.manual_seed(seed + 6)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1, image_size=56,
        patch_size=14, projection_dim=32)).eval()


def random_photomaker_state_dict(unet, seed: int = 0, lora_rank: int = 4, clip=None) -> dict:
    """A random checkpoint in PhotoMaker V2's layout for an SDXL-shaped ``unet`` (the prompt's width
    is its cross-attention width): ``id_encoder`` (CLIP vision model with projection,
    ``qformer_perceiver``, ``fuse_module``, the unused ``visual_projection_2``) and ``lora_weights``
    (diffusers' old attention-processor LoRA keys, ``unet.<layer>.processor.to_q_lora.down.weight``)."""
    clip = clip or tiny_photomaker_clip(seed)
    torch.manual_seed(seed)
    encoder = PhotoMakerEncoder(embed_dim=unet.config.cross_attention_dim, clip_embed_dim=clip.config.hidden_size)
    generator = torch.Generator().manual_seed(seed + 1)
    back = {ours: official for official, ours in _RENAMES.items()}
    id_encoder = {key: value.clone() for key, value in clip.state_dict().items() if not key.endswith("position_ids")}
    id_encoder["visual_projection_2.weight"] = torch.randn(1280, clip.config.hidden_size, generator=generator) * 0.02
    for key, value in encoder.state_dict().items():
        prefix = next(p for p in back if key.startswith(p))
        noise = torch.randn(value.shape, generator=generator) * 0.02 if key.endswith(("norm.weight", "norm.bias")) else 0
        id_encoder[back[prefix] + key[len(prefix):]] = value + noise
    lora = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        for part, linear in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            out_features, in_features = linear.weight.shape
            lora[f"unet.{name}.{part}_lora.down.weight"] = torch.randn(lora_rank, in_features, generator=generator) * in_features**-0.5
            lora[f"unet.{name}.{part}_lora.up.weight"] = torch.randn(out_features, lora_rank, generator=generator) * 0.05
    return {"id_encoder": id_encoder, "lora_weights": lora}


def write_random_recognizer(path: str, seed: int = 0) -> None:
    """An ONNX face recognizer with the inputs and outputs of insightface's ``w600k_r50.onnx``
    (``input.1``: N x 3 x 112 x 112, one N x 512 output) and random weights, marked as such."""
    rng = np.random.default_rng(seed)
    widths = [3, 16, 32, 64, 64]
    nodes, inits, current = [], [], "input.1"
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        weight = rng.normal(0, (2.0 / (cin * 9)) ** 0.5, (cout, cin, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"conv_{i}.weight"),
                  numpy_helper.from_array(np.full((cout, 1, 1), 0.25, np.float32), f"prelu_{i}.slope")]
        nodes += [
            helper.make_node("Conv", [current, f"conv_{i}.weight"], [f"conv_{i}"], name=f"Conv_{i}",
                             strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            helper.make_node("PRelu", [f"conv_{i}", f"prelu_{i}.slope"], [f"prelu_{i}"], name=f"PRelu_{i}"),
        ]
        current = f"prelu_{i}"
    features = widths[-1] * 7 * 7
    inits.append(numpy_helper.from_array(rng.normal(0, features**-0.5, (512, features)).astype(np.float32), "fc.weight"))
    inits.append(numpy_helper.from_array(np.zeros(512, np.float32), "fc.bias"))
    nodes += [
        helper.make_node("Flatten", [current], ["flat"], name="Flatten_0", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["embedding"], name="Gemm_0", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "random_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="idgen")
    model.ir_version = 8
    helper.set_model_props(model, {RANDOM_WEIGHTS_KEY: "true", "idgen.seed": str(seed)})
    onnx.checker.check_model(model)
    onnx.save(model, path)


# ------------------------------------------------------------------------------ building
def _build_tiny(folder: str, seed: int) -> None:
    pipe = tiny_sd15_pipeline(seed)
    pipe.save_pretrained(os.path.join(folder, "base"))
    save_adapter_checkpoint(random_faceid_state_dict(pipe.unet, seed), os.path.join(folder, "adapter", ADAPTER_FILE))
    os.makedirs(os.path.join(folder, "faces"))
    write_random_recognizer(os.path.join(folder, "faces", "arcface_random.onnx"), seed)
    encoder, unet = tiny_arc2face_models(pipe.tokenizer, seed)
    encoder.save_pretrained(os.path.join(folder, "arc2face", "encoder"))
    unet.save_pretrained(os.path.join(folder, "arc2face", "arc2face"))
    sdxl = tiny_sdxl_pipeline(seed)
    sdxl.save_pretrained(os.path.join(folder, "sdxl"))
    _drop_empty_components(os.path.join(folder, "sdxl"))
    instantid = os.path.join(folder, "instantid")
    tiny_identitynet(sdxl.unet, seed).save_pretrained(os.path.join(instantid, "ControlNetModel"))
    save_adapter_checkpoint(random_instantid_state_dict(sdxl.unet, seed), os.path.join(instantid, INSTANTID_FILE))
    save_adapter_checkpoint(random_faceid_state_dict(sdxl.unet, seed), os.path.join(folder, "faceid-sdxl", FACEID_SDXL_FILE))
    os.makedirs(os.path.join(folder, "photomaker"))
    torch.save(random_photomaker_state_dict(sdxl.unet, seed), os.path.join(folder, "photomaker", PHOTOMAKER_FILE))
    _build_pulid(os.path.join(folder, "pulid"), sdxl.unet, seed)
    _build_flux(folder, seed)
    clip, tokenizer = tiny_clip(seed)
    clip.save_pretrained(os.path.join(folder, "clip"))
    tokenizer.save_pretrained(os.path.join(folder, "clip"))


def _build_pulid(folder: str, unet, seed: int) -> None:
    """PuLID's files: a random v1.1 checkpoint, the tiny EVA tower it reads (``eva_clip/``) and a
    random face parser in facexlib's format (fp16, as small as it gets)."""
    eva = tiny_eva_tower(seed)
    eva.save_pretrained(os.path.join(folder, "eva_clip"))
    save_file({k: v.contiguous() for k, v in random_pulid_state_dict(unet, eva, seed).items()},
              os.path.join(folder, PULID_FILE))
    torch.manual_seed(seed + 8)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in BiSeNet().state_dict().items()},
               os.path.join(folder, FACE_PARSER_FILE))


def _build_flux(folder: str, seed: int) -> None:
    """The FLUX base (``flux/``), a random PuLID-FLUX file reading PuLID's tiny EVA tower
    (``pulid-flux/``) and a random InfiniteYou model folder (``infiniteyou/``, with a tiny IR-SE
    recognizer beside it)."""
    pipe = tiny_flux_pipeline(seed)
    pipe.save_pretrained(os.path.join(folder, "flux"))
    eva = EVAVisionTower.from_pretrained(os.path.join(folder, "pulid", "eva_clip"))
    os.makedirs(os.path.join(folder, "pulid-flux"))
    save_file({k: v.contiguous() for k, v in random_pulid_flux_state_dict(pipe.transformer, eva, seed).items()},
              os.path.join(folder, "pulid-flux", PULID_FLUX_FILE))
    image_proj, infusenet = random_infiniteyou(pipe.transformer, seed)
    infusenet.save_pretrained(os.path.join(folder, "infiniteyou", INFUSENET_FOLDER))
    torch.save(image_proj, os.path.join(folder, "infiniteyou", INFINITEYOU_WEIGHT_NAME))
    torch.save(tiny_irse(seed).state_dict(), os.path.join(folder, "infiniteyou", IRSE_FILE))


def _drop_empty_components(folder: str) -> None:
    """A saved pipeline's ``model_index.json`` without its unset optional parts (an SDXL base
    names no ControlNet), so any SDXL pipeline class loads it without notices."""
    path = os.path.join(folder, "model_index.json")
    with open(path) as handle:
        index = json.load(handle)
    with open(path, "w") as handle:
        json.dump({k: v for k, v in index.items() if v != [None, None]}, handle, indent=2)


def get_preset(name: str = "tiny", seed: int = 0, root: str | None = None) -> Preset:
    """Build (once, atomically) and return a tiny preset.

    ``tiny``: SD1.5-shaped base + FaceID adapter. ``tiny-arc2face``: the same base supplies
    tokenizer, VAE and scheduler; ``adapter`` is the folder in Arc2Face's layout.
    ``tiny-sdxl``: SDXL-shaped base; ``adapter`` is a folder in InstantID's layout
    (``ip-adapter.bin`` + ``ControlNetModel/``). ``tiny-faceid-sdxl``: the same base with a
    FaceID-SDXL adapter file; ``tiny-photomaker`` with a PhotoMaker V2 file; ``tiny-pulid`` with
    a PuLID v1.1 file, its tiny EVA02-CLIP tower and a random face parser. ``tiny-flux``: a
    FLUX.1-shaped base with a PuLID-FLUX file (and the same EVA tower and parser);
    ``tiny-infiniteyou``: that base with an InfiniteYou folder (projection + InfuseNet).
    """
    if name not in TINY_PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(TINY_PRESETS)}")
    folder = os.path.join(root or cache_dir(), f"tiny-v{PRESET_FORMAT}-seed{seed}")
    if not os.path.isdir(folder):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=os.path.dirname(folder))
        try:
            _build_tiny(staging, seed)
            os.rename(staging, folder)
        except OSError:
            if not os.path.isdir(folder):  # not merely lost a race with another builder
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    base, adapter = {
        "tiny": ("base", os.path.join("adapter", ADAPTER_FILE)),
        "tiny-arc2face": ("base", "arc2face"),
        "tiny-sdxl": ("sdxl", "instantid"),
        "tiny-faceid-sdxl": ("sdxl", os.path.join("faceid-sdxl", FACEID_SDXL_FILE)),
        "tiny-photomaker": ("sdxl", os.path.join("photomaker", PHOTOMAKER_FILE)),
        "tiny-pulid": ("sdxl", os.path.join("pulid", PULID_FILE)),
        "tiny-flux": ("flux", os.path.join("pulid-flux", PULID_FLUX_FILE)),
        "tiny-infiniteyou": ("flux", "infiniteyou"),
    }[name]
    pulid = name in ("tiny-pulid", "tiny-flux")
    return Preset(
        name=name,
        seed=seed,
        base=os.path.join(folder, base),
        adapter=os.path.join(folder, adapter),
        face_pack=os.path.join(folder, "faces"),
        clip=os.path.join(folder, "clip"),
        image_encoder=os.path.join(folder, "pulid", "eva_clip") if pulid else None,
        face_parser=os.path.join(folder, "pulid", FACE_PARSER_FILE) if pulid else None,
        face_recognizer=os.path.join(folder, "infiniteyou", IRSE_FILE) if name == "tiny-infiniteyou" else None,
    )
