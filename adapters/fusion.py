"""Training-free ways to merge the identity with what the base model alone makes of the prompt.

Both run a second stream beside the identity stream in the same UNet batch: the base stream, the
same latents with the identity attention off (and no IdentityNet). The image is the identity
stream's; the base stream only lends its self-attention.

- ``"adain"``, Infinite-ID's mixed attention ("Infinite-ID: Identity-preserved Personalization via
  ID-semantics Decoupling Paradigm"): in every self-attention layer the identity stream attends to
  its own keys/values and the base stream's, its own first shifted to the base stream's mean over
  the image (AdaIN-mean: ``x - mean(x) + mean(base)``), so the prompt's semantics and style reach
  the identity stream. (Infinite-ID runs the text stream on latents of its own; here both streams
  share the scheduler's latents, so any scheduler works.)
- ``"freecure"``, FreeCure's attribute recovery ("Foundation Cures Personalization: Recovering Facial
  Personalized Models' Prompt Consistency"): where the prompt's attribute words (hair, smile,
  glasses, ...) draw the base stream's cross-attention, the identity stream's self-attention output
  is replaced by the base stream's, so attributes the identity tends to override follow the prompt.
  FreeCure finds the parts with a face-parsing network; here the mask is the base stream's own
  cross-attention to the attribute words at the previous step (normalised to its maximum, above
  ``FREECURE_THRESHOLD``), so no extra model is needed.

A FaceID LoRA is part of the UNet's weights and acts in both streams.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

FUSIONS = ("adain", "freecure")
#: Words whose look FreeCure takes from the base model when the caller names none.
ATTRIBUTE_WORDS = ("hair", "hairstyle", "bangs", "ponytail", "braid", "braids", "curly", "bald", "beard", "mustache",
                   "eyes", "eyebrows", "glasses", "sunglasses", "smile", "smiling", "laughing", "crying", "angry",
                   "surprised", "frowning", "makeup", "lipstick", "hat", "cap", "earrings", "tattoo", "freckles")
FREECURE_THRESHOLD = 0.3


def adain_mean(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``x`` with its mean over tokens (dim 1) moved to ``reference``'s, channel by channel."""
    return x - x.mean(dim=1, keepdim=True) + reference.mean(dim=1, keepdim=True)


def attribute_tokens(tokenizer: Any, prompt: str, words: Sequence[str] | None) -> list[int]:
    """Positions in ``prompt``'s token sequence of ``words`` (default: the prompt's words found in
    ``ATTRIBUTE_WORDS``): every sub-token of each occurrence."""
    spoken = re.findall(r"[a-z]+", prompt.lower())
    wanted = [w.lower() for w in words] if words is not None else [w for w in spoken if w in ATTRIBUTE_WORDS]
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    positions: list[int] = []
    for word in dict.fromkeys(wanted):
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        for start in range(len(ids) - len(pieces) + 1):
            if ids[start:start + len(pieces)] == pieces:
                positions.extend(range(start, start + len(pieces)))
    return sorted(set(positions))


class StreamFusion:
    """The base stream of one call, run beside the identity stream and merged with it (see the
    module docstring); an ``IdentityCall`` hands it the UNet's forwards. The pipeline's UNet batch
    (CFG included) is the identity stream. For FreeCure, ``token_positions`` holds the attribute
    tokens of each prompt row (prompts times images per prompt); with CFG the unconditional rows
    come first and use their prompt row's mask."""

    def __init__(self, unet: Any, mode: str, token_positions: list[list[int]] | None = None):
        if mode not in FUSIONS:
            raise ValueError(f"id_fusion={mode!r}: choose one of {', '.join(FUSIONS)}, or None")
        unet = getattr(unet, "_orig_mod", unet)
        if any(type(p).__name__.startswith("Fused") for p in unet.attn_processors.values()):
            raise ValueError("id_fusion reads the self-attention's keys and values apart, and fused projections hold "
                             "them together: call pipe.unfuse_qkv_projections() first")
        self.mode = mode
        self.positions = token_positions or []
        self.heads = {name: module.heads for name, module in unet.named_modules() if name.endswith(".attn2")}
        self.rows = 0  # identity-stream rows of the current UNet call
        self.latent_size = (0, 0)
        self.masks: torch.Tensor | None = None  # FreeCure: (prompt rows, h, w) from the previous step
        self._maps: list[torch.Tensor] = []

    # ---------------------------------------------------------------- the forwards it changes
    def double_batch(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Identity rows, then the same rows again as the base stream: IdentityNet's residuals are
        zero there (the identity attention is zeroed by its tokens)."""
        sample = args[0] if args else kwargs["sample"]
        self.rows, self.latent_size, self._maps = sample.shape[0], tuple(sample.shape[-2:]), []

        def twice(value: Any, base=None) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == self.rows:
                return torch.cat([value, value if base is None else base(value)])
            if isinstance(value, dict):
                return {key: twice(item, base) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(twice(item, base) for item in value)
            return value

        residual = ("down_block_additional_residuals", "mid_block_additional_residual")
        return tuple(twice(arg) for arg in args), {
            key: twice(value, torch.zeros_like if key in residual else None) for key, value in kwargs.items()}

    def identity_stream(self, output: Any) -> Any:
        """The UNet's output for the identity rows alone."""
        if self._maps:
            self.masks = self._combine(self._maps)
        if isinstance(output, tuple):
            return (output[0][: self.rows], *output[1:])
        output.sample = output.sample[: self.rows]
        return output

    def mix(self, output: torch.Tensor) -> torch.Tensor:
        """Self-attention keys or values (2R, N, C) -> (2R, 2N, C): the identity rows get
        [AdaIN-mean(own), base]; the base rows [base, base] (the same attention as over [base] alone)."""
        if self.mode != "adain":
            return output
        own, base = output[: self.rows], output[self.rows:]
        return torch.cat([torch.cat([adain_mean(own, base), base], dim=1), torch.cat([base, base], dim=1)])

    def recover(self, args: tuple) -> tuple:
        """Identity rows' self-attention output -> the base rows' inside the attribute mask."""
        if self.mode != "freecure" or self.masks is None:
            return args
        hidden = args[0]
        h, w = self._resolution(hidden.shape[1])
        mask = F.adaptive_max_pool2d(self.masks[:, None], (h, w))[:, 0]
        prompts = len(self.positions)
        mask = mask[[row % prompts for row in range(self.rows)]].reshape(self.rows, h * w, 1).to(hidden.dtype)
        own, base = hidden[: self.rows], hidden[self.rows:]
        return (torch.cat([torch.lerp(own, base, mask), base]), *args[1:])

    def attribute_map(self, name: str, query: torch.Tensor | None, key: torch.Tensor) -> None:
        """Keep the base stream's cross-attention (layer ``name``) to each prompt row's attribute
        tokens: (prompt rows, Q)."""
        prompts = len(self.positions)
        if self.mode != "freecure" or query is None or not any(self.positions):
            return
        rows = slice(2 * self.rows - prompts, None)  # the base stream's prompt (conditional) rows
        heads = self.heads[name]
        dim = query.shape[-1] // heads
        split = lambda t: t.reshape(t.shape[0], -1, heads, dim).transpose(1, 2).float()
        probs = torch.softmax(split(query[rows]) @ split(key[rows]).transpose(-1, -2) / dim ** 0.5, dim=-1)
        probs = probs.mean(1)  # (prompt rows, Q, T)
        self._maps.append(torch.stack([probs[p][:, self.positions[p]].sum(-1) for p in range(prompts)]))

    # ---------------------------------------------------------------- masks
    def _resolution(self, length: int) -> tuple[int, int]:
        """(h, w) of an attention layer with ``length`` queries: the latent size halved (rounding up)."""
        h, w = self.latent_size
        while h * w > length:
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def _combine(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """All layers' maps at the latent size, averaged, normalised to each row's maximum and
        thresholded: (prompt rows, h, w) in {0, 1}; rows without attribute tokens stay 0."""
        size = self.latent_size
        resized = [F.interpolate(m.reshape(len(m), 1, *self._resolution(m.shape[1])), size=size, mode="bilinear",
                                 align_corners=False)[:, 0] for m in maps]
        mean = torch.stack(resized).mean(0)
        peak = mean.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return (mean / peak > FREECURE_THRESHOLD).float()
