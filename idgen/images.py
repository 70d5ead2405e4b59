"""Images as tensors: PIL to (B, 3, H, W) in [0, 1], and CLIP's preprocessing, differentiable (the
reward model trains through it, the CLIP-T metric scores with it)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: CLIP's normalisation (OpenAI CLIP), per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's preprocessing, differentiable: centre square, bicubic resize, normalise.
    ``images`` (B, 3, H, W) in [0, 1]."""
    side = min(images.shape[-2:])
    top, left = (images.shape[-2] - side) // 2, (images.shape[-1] - side) // 2
    square = images[..., top : top + side, left : left + side]
    pixels = F.interpolate(square, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size as a (B, 3, H, W) float tensor in [0, 1]."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1) for im in images])
