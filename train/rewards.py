"""Rewards for reward-feedback fine-tuning: identity (ArcFace cosine) and aesthetics (CLIP)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPVisionModelWithProjection

from idgen.errors import IDGenError, NoFaceError
from idgen.faces import FaceAnalyzer
from idgen.faces.arcface import DifferentiableArcFace
from idgen.images import clip_preprocess


class IdentityReward(nn.Module):
    """Cosine between the ArcFace embedding of the generated face and the reference identity.

    ``alignment="detect"`` finds the face in each generated image (no gradient through the
    detector; a sample with no face gets ``no_face_reward``, a constant); ``"reference"`` aligns
    with the reference photo's keypoints, for models that keep the face where its keypoints are.
    """

    def __init__(self, recognizer: DifferentiableArcFace, analyzer: FaceAnalyzer | None, alignment: str = "detect",
                 no_face_reward: float = -1.0):
        super().__init__()
        if alignment not in ("detect", "reference"):
            raise IDGenError(f"face_alignment must be 'detect' or 'reference', got {alignment!r}")
        if alignment == "detect" and analyzer is None:
            raise IDGenError("face_alignment 'detect' needs a face analyzer")
        self.recognizer, self.analyzer = recognizer, analyzer
        self.alignment, self.no_face_reward = alignment, no_face_reward

    def detect_kps(self, images: torch.Tensor) -> list[np.ndarray | None]:
        found = []
        for image in images.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy():
            try:
                found.append(self.analyzer.get_face(image).kps)
            except NoFaceError:
                found.append(None)
        return found

    def forward(self, images: torch.Tensor, reference: torch.Tensor, reference_kps: torch.Tensor | None = None):
        """``images`` (B, 3, H, W) in [0, 1]; ``reference`` (B, 512) unit vectors.
        Returns (rewards (B,), mask of samples whose face was found (B,))."""
        if self.alignment == "reference":
            kps = reference_kps.to(images.device, images.dtype)
            found = torch.ones(len(images), dtype=torch.bool, device=images.device)
        else:
            detected = self.detect_kps(images)
            found = torch.tensor([k is not None for k in detected], device=images.device)
            fallback = np.zeros((5, 2), np.float32)
            kps = torch.as_tensor(np.stack([k if k is not None else fallback for k in detected]), dtype=images.dtype,
                                  device=images.device)
        rewards = torch.full((len(images),), float(self.no_face_reward), device=images.device)
        if found.any():
            embeddings = self.recognizer(images[found], kps[found])
            cosine = (embeddings * F.normalize(reference[found].to(embeddings), dim=-1)).sum(-1)
            rewards = rewards.masked_scatter(found, cosine.to(rewards.dtype))
        return rewards, found


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP on a unit CLIP image embedding (keys ``layers.*``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class AestheticReward(nn.Module):
    """A CLIP image embedding scored by an MLP head (the LAION aesthetic predictor's shape).

    Args:
        clip: a ``CLIPVisionModelWithProjection`` (``openai/clip-vit-large-patch14`` for the
            LAION head; a tiny one in tests).
        head: the scoring MLP (``AestheticHead``).
    """

    def __init__(self, clip, head: nn.Module):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.size = clip.config.image_size

    @classmethod
    def from_pretrained(cls, clip_model: str, head_file: str) -> AestheticReward:
        """``clip_model``: hub id or folder; ``head_file``: a local ``.pth``/``.safetensors`` or
        ``repo_id/filename`` on the hub (e.g. the LAION ``sac+logos+ava1-l14-linearMSE.pth``)."""
        clip = CLIPVisionModelWithProjection.from_pretrained(clip_model)
        if not os.path.isfile(head_file):
            repo, _, name = head_file.rpartition("/")
            head_file = hf_hub_download(repo, name)
        if head_file.endswith(".safetensors"):
            state = load_file(head_file)
        else:
            state = torch.load(head_file, map_location="cpu", weights_only=True)
        head = AestheticHead(clip.config.projection_dim)
        head.load_state_dict(state)
        return cls(clip, head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) in [0, 1] -> (B,) scores, differentiable."""
        pixels = clip_preprocess(images, self.size)
        embeds = F.normalize(self.clip(pixel_values=pixels.to(self.clip.dtype)).image_embeds.float(), dim=-1)
        return self.head(embeds).squeeze(-1)
