"""InfiniteYou's ArcFace: facexlib's IR-SE50 recognizer (``recognition_arcface_ir_se50.pth``).

InfiniteYou's projection was trained on this network's embeddings, not on insightface's, so its
identity vectors come from here: the face aligned to the ArcFace template at 112 px, in BGR
order, scaled to [-1, 1]; the output is L2-normalised. Module names match facexlib's
``Backbone(50, mode="ir_se")`` so its file loads as is; the widths and unit counts are read from
the keys, so smaller test networks of the same layout load too.
"""

from __future__ import annotations

import os
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from idgen.errors import CheckpointError

from .checkpoints import release_weights

#: facexlib's release of the recognizer InfiniteYou reads.
IRSE50_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth"
#: Channel reduction of the squeeze-and-excitation modules.
SE_REDUCTION = 16


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // SE_REDUCTION, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // SE_REDUCTION, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class _Unit(nn.Module):
    """One IR-SE bottleneck: BN, 3x3 conv, PReLU, strided 3x3 conv, BN, SE, plus the shortcut."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        self.shortcut_layer = nn.MaxPool2d(1, stride) if in_channels == depth else nn.Sequential(
            nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), _SqueezeExcite(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSEArcFace(nn.Module):
    """IR-SE ArcFace for 112 px faces: ``units`` is (input width, output width) of each bottleneck;
    the first of each stage (the first unit, and each that widens) halves the resolution.
    Defaults are IR-SE50's. ``forward`` takes (B, 3, 112, 112) BGR in [-1, 1]; -> (B, 512), unit norm."""

    def __init__(self, units: list[tuple[int, int]] | None = None, stem: int = 64, embed_dim: int = 512):
        super().__init__()
        units = units or [(64, 64)] * 3 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 13 + \
            [(256, 512)] + [(512, 512)] * 2
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        self.body = nn.Sequential(*(_Unit(a, b, 2 if i == 0 or a != b else 1) for i, (a, b) in enumerate(units)))
        width = units[-1][1]
        self.output_layer = nn.Sequential(nn.BatchNorm2d(width), nn.Dropout(0.6), nn.Flatten(),
                                          nn.Linear(width * 7 * 7, embed_dim), nn.BatchNorm1d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)

    @torch.no_grad()
    def embed(self, crops: np.ndarray) -> torch.Tensor:
        """Unit-norm embeddings (n, 512) of ArcFace-aligned 112 px RGB crops (n, 112, 112, 3) uint8."""
        parameter = next(self.parameters())
        bgr = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).permute(0, 3, 1, 2)
        return self(bgr.to(parameter.device, parameter.dtype) / 127.5 - 1).float()


def build_irse(state: dict[str, torch.Tensor], path: str = "recognizer") -> IRSEArcFace:
    """The recognizer sized from its keys, with its weights (eval mode)."""
    try:
        count = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("body."))
        units = [(int(state[f"body.{i}.res_layer.1.weight"].shape[1]), int(state[f"body.{i}.res_layer.1.weight"].shape[0]))
                 for i in range(count)]
        model = IRSEArcFace(units, int(state["input_layer.0.weight"].shape[0]), int(state["output_layer.3.weight"].shape[0]))
        model.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not facexlib's IR-SE ArcFace recognizer ({detail}): pass "
                              "recognition_arcface_ir_se50.pth") from None
    return model.eval()


def load_irse_recognizer(source: str | os.PathLike | nn.Module | None = None) -> IRSEArcFace:
    """facexlib's IR-SE50 from a ``recognition_arcface_ir_se50.pth`` file (read with
    ``weights_only=True``), by default downloaded once from facexlib's release; a module passes through."""
    if isinstance(source, nn.Module):
        return cast(IRSEArcFace, source.eval())  # any module with its embed()

    state, path = release_weights(source, IRSE50_URL, "InfiniteYou reads the identity with facexlib's ArcFace",
                                  "face_recognizer= (or --face-recognizer)", "facexlib's recognition_arcface_ir_se50.pth")
    return build_irse(state, path)
