"""Face-wise attention loss, after SeFi-IDE ("Semantic-Fidelity Identity Embedding for
Personalized Diffusion-Based Generation"): the identity tokens' cross-attention maps should cover
the face and the text tokens' should stay off it.

SeFi-IDE's identity embedding is a token in the prompt, so one softmax spans text and identity.
An adapter's identity attention has a softmax of its own, whose weights sum to 1 at every pixel
and so cannot single out the face. The loss therefore reads the joint map a pixel would have over
text and identity keys together, ``softmax([q K_text, q K_id] / sqrt(d))`` averaged over heads,
in every identity layer:

    loss = (1 - share of the identity tokens' map inside the face)
         + share of the text tokens' map (start token left out) inside the face

where a map's share is its sum over the face's latent cells divided by its sum over all cells.
Both terms lie in [0, 1]; samples whose identity was dropped (zeroed) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from idgen.adapters import IdentityAdapter


class FaceAttentionLoss:
    """Watches an identity adapter's layers during one forward and returns the loss of the maps it saw.

    >>> watcher = FaceAttentionLoss(unet, adapter)
    >>> watcher.start(face_masks, keep)      # (B, 1, h, w) face mask at latent size; (B,) bool
    >>> model.observer = watcher.observe     # TrainableIdentity: the identity layers report their maps
    >>> prediction = model(...)
    >>> loss = watcher.loss()
    """

    def __init__(self, unet: torch.nn.Module, adapter: IdentityAdapter):
        unet = getattr(unet, "_orig_mod", unet)
        self.adapter = adapter
        self.attention = {name: unet.get_submodule(name) for name, _ in adapter.items()}
        self.text_keys: dict[str, torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []
        self.masks: dict[int, torch.Tensor] = {}
        self.keep: torch.Tensor | None = None
        self._handles = [self.attention[name].to_k.register_forward_hook(self._keep_text_key(name))
                         for name, _ in adapter.items()]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def start(self, face_masks: torch.Tensor, keep: torch.Tensor) -> None:
        """Face masks (B, 1, h, w) at latent size, pooled to every attention resolution; ``keep``
        marks the samples that have an identity."""
        self.losses, self.text_keys, self.keep = [], {}, keep.float()
        self.masks, h, w = {}, *face_masks.shape[-2:]
        while True:
            self.masks[h * w] = F.adaptive_avg_pool2d(face_masks.float(), (h, w)).flatten(1)
            if h == 1 and w == 1:
                break
            h, w = (h + 1) // 2, (w + 1) // 2

    def _keep_text_key(self, name: str):
        def hook(module, args, output):
            self.text_keys[name] = output
        return hook

    def observe(self, layer, name: str, query: torch.Tensor, key: torch.Tensor) -> None:
        """Called by identity layer ``name`` with its query and identity keys (``IdentityCall.observer``)."""
        if self.keep is None:
            return
        batch, length = query.shape[:2]
        heads, dim = layer.heads, query.shape[-1] // layer.heads
        split = lambda t: t.reshape(batch, -1, heads, dim).transpose(1, 2).float()
        text = split(self.text_keys[name])
        keys = torch.cat([text, split(key.to(query.dtype))], dim=2)
        joint = torch.softmax(split(query) @ keys.transpose(-1, -2) / dim ** 0.5, dim=-1).mean(1)  # (B, Q, T)
        identity_map = joint[..., text.shape[2]:].sum(-1)
        text_map = joint[..., 1:text.shape[2]].sum(-1)
        face = self.masks[length].to(query.device)
        share = lambda m: (m * face).sum(-1) / m.sum(-1).clamp_min(1e-12)
        per_sample = 1 - share(identity_map) + share(text_map)
        keep = self.keep.to(query.device)
        self.losses.append((per_sample * keep).sum() / keep.sum().clamp_min(1.0))

    def loss(self) -> torch.Tensor:
        """Mean over the layers seen since ``start`` (0 if none)."""
        if not self.losses:
            return torch.zeros(())
        return torch.stack(self.losses).mean()
