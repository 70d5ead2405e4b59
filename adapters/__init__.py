"""Identity adapters: identity attention, projection models and checkpoint loading."""

from .attention import IdentityAdapter, IdentityAttention
from .checkpoints import resolve_checkpoint_file, save_adapter_checkpoint
from .loading import (
    AdapterSpec,
    build_identity_adapter,
    build_projection,
    check_adapter,
    check_portrait_faces,
    detect_format,
    faceid_lora_layers,
    identity_adapter_state_dict,
    init_identity_adapter_state_dict,
    load_adapter_state_dict,
)
from .lora import FusedLoRA, LoRALayers, holds_plain_weights, peft_lora_state_dict
from .projection import FaceIDPlusProjection, FaceIDProjection, InstantIDResampler

__all__ = [
    "AdapterSpec",
    "FaceIDPlusProjection",
    "FaceIDProjection",
    "IdentityAdapter",
    "IdentityAttention",
    "InstantIDResampler",
    "LoRALayers",
    "build_identity_adapter",
    "build_projection",
    "check_adapter",
    "check_portrait_faces",
    "detect_format",
    "FusedLoRA",
    "holds_plain_weights",
    "faceid_lora_layers",
    "identity_adapter_state_dict",
    "init_identity_adapter_state_dict",
    "load_adapter_state_dict",
    "peft_lora_state_dict",
    "resolve_checkpoint_file",
    "save_adapter_checkpoint",
]
