"""Where each of several people goes in one image: a weight map per person at every attention
resolution of the UNet (and of InstantID's IdentityNet).

A person's region is a mask (image or array, any size with the output's aspect ratio), a box
``(x0, y0, x1, y1)`` in output pixels, or the cell of their face in a group photo (every pixel
belongs to the nearest face). The identity attention of person ``p`` is multiplied by their
weight map; where regions overlap the weights are shared, so no pixel gets more than a full
identity, and outside every region no identity acts at all (text attention is never masked).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from PIL import Image

from idgen.errors import IdentityInputError

from .context import current, register

#: Query length of an attention layer -> (people, query length, 1) weights at that resolution.
RegionWeights = dict[int, torch.Tensor]
#: The name of ``RegionalAttention`` in a module's diffusers hook registry.
REGIONS_HOOK_NAME = "idgen_regions"


def _mask_array(mask: Any, index: int) -> np.ndarray:
    """A mask (PIL image, array or tensor; white/True/1 = the person's region) as float32 (H, W) in [0, 1]."""
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"), np.float32) / 255.0
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        array = array[..., :3].mean(-1) if array.shape[-1] != 1 else array[..., 0]
    if array.ndim != 2 or min(array.shape) == 0:
        raise IdentityInputError(f"region {index}: a mask must be a 2-d image or array, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if array.min() < 0 or array.max() > 1:
        raise IdentityInputError(f"region {index}: mask values must lie in [0, 1] (or be uint8 / an image), "
                                 f"got {array.min():.3g}..{array.max():.3g}")
    return array


def _is_box(region: Any) -> bool:
    return isinstance(region, (tuple, list)) and len(region) == 4 and all(isinstance(v, (int, float)) for v in region)


class Regions:
    """One region per person, drawn at any output size (``render``), and its weights at every
    attention resolution (``weights``)."""

    def __init__(self, count: int, render: Callable[[int, int], np.ndarray]):
        self.count = count
        self._render = render
        self._cache: dict[tuple, RegionWeights] = {}

    # ---------------------------------------------------------------- building
    @classmethod
    def from_spec(cls, regions: Sequence[Any]) -> Regions:
        """Regions from one mask or box per person (masks and boxes may be mixed)."""
        if isinstance(regions, (str, bytes)) or not isinstance(regions, (list, tuple)) or not regions:
            raise IdentityInputError("regions= takes a list with one mask or (x0, y0, x1, y1) box per person, "
                                     "or 'faces' with kps_image=")
        boxes = {i: [float(v) for v in r] for i, r in enumerate(regions) if _is_box(r)}
        masks = {i: _mask_array(r, i) for i, r in enumerate(regions) if i not in boxes}
        for i, (x0, y0, x1, y1) in boxes.items():
            if not (x1 > x0 and y1 > y0):
                raise IdentityInputError(f"region {i}: box {regions[i]} is empty: give (x0, y0, x1, y1) with x1 > x0 "
                                         "and y1 > y0, in output pixels")

        def render(width: int, height: int) -> np.ndarray:
            out = np.zeros((len(regions), height, width), np.float32)
            for i, (x0, y0, x1, y1) in boxes.items():
                out[i] = _box_coverage(x0, x1, width)[None, :] * _box_coverage(y0, y1, height)[:, None]
                if not out[i].any():
                    raise IdentityInputError(f"region {i}: box {regions[i]} lies outside the {width}x{height} image: "
                                             "boxes are in output pixels")
            for i, mask in masks.items():
                h, w = mask.shape
                if abs(w / h - width / height) > 0.02 * width / height:
                    raise IdentityInputError(
                        f"region {i}: the mask is {w}x{h} but the image is {width}x{height}: draw masks with the "
                        "image's aspect ratio (any size), or give a box"
                    )
                out[i] = F.interpolate(torch.from_numpy(mask)[None, None], size=(height, width), mode="bilinear",
                                       align_corners=False, antialias=h > height)[0, 0].clamp(0, 1).numpy()
            return out

        return cls(len(regions), render)

    @classmethod
    def around(cls, centres: np.ndarray) -> Regions:
        """One region per point of ``centres`` (P, 2), given as fractions of the width and height:
        every pixel belongs to the nearest point (faces of a group photo -> each person's part)."""
        centres = np.asarray(centres, np.float64).reshape(-1, 2)

        def render(width: int, height: int) -> np.ndarray:
            ys, xs = np.mgrid[0:height, 0:width]
            points = centres * [width, height]
            distance = (xs[None] + 0.5 - points[:, 0, None, None]) ** 2 + (ys[None] + 0.5 - points[:, 1, None, None]) ** 2
            return (distance.argmin(0)[None] == np.arange(len(centres))[:, None, None]).astype(np.float32)

        return cls(len(centres), render)

    # ---------------------------------------------------------------- using
    def render(self, width: int, height: int) -> np.ndarray:
        """(people, height, width) float32 masks in [0, 1] at this output size."""
        return self._render(width, height)

    def boxes(self, width: int, height: int) -> np.ndarray:
        """(people, 4): each region's bounding box in output pixels (the whole image if empty)."""
        out = []
        for mask in self.render(width, height):
            ys, xs = np.nonzero(mask > 0.5)
            out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, width, height])
        return np.asarray(out, np.float64)

    def weights(self, height: int, width: int, scale_factor: int, device: torch.device,
                normalise: bool = False) -> RegionWeights:
        """Weights of each person at every resolution from the latent ``height`` x ``width`` down
        (halving, rounding up, as the UNet's downsamplers do), keyed by query length.

        The default keeps each region as drawn where regions do not overlap, and shares
        overlaps (weights summing to more than 1 are scaled to 1); ``normalise`` makes them sum
        to 1 everywhere, pixels outside every region sharing equally (IdentityNet's attention,
        whose output must be a mixture of the people's)."""
        key = (height, width, scale_factor, str(device), normalise)
        if key not in self._cache:
            masks = torch.from_numpy(self.render(width * scale_factor, height * scale_factor))[None]
            levels, h, w = {}, height, width
            while True:
                level = F.adaptive_avg_pool2d(masks, (h, w))[0]  # each cell: the share of its pixels in the region
                total = level.sum(0, keepdim=True)
                if normalise:
                    level = torch.where(total > 0, level / total.clamp_min(1e-12), 1.0 / self.count)
                else:
                    level = level / total.clamp_min(1.0)
                levels[h * w] = level.reshape(self.count, h * w, 1).to(device)
                if h == 1 and w == 1:
                    break
                h, w = (h + 1) // 2, (w + 1) // 2
            self._cache[key] = levels
        return self._cache[key]


def _box_coverage(start: float, end: float, size: int) -> np.ndarray:
    """How much of each pixel 0..size-1 lies in [start, end) (anti-aliased box edges)."""
    edges = np.arange(size, dtype=np.float64)
    return np.clip(np.minimum(edges + 1, end) - np.maximum(edges, start), 0, 1).astype(np.float32)


class RegionalAttention(ModelHook):
    """A cross-attention module's hook for several people (IdentityNet's): while ``owner``'s call
    in this thread holds ``region_weights`` (a holder whose ``"now"`` entry the call keeps at the
    current latent size), the encoder tokens are the people's, side by side, and each person's
    attention output is weighted by their (normalised) region, so every position attends to the
    people whose region it lies in. Otherwise the module runs as it is."""

    def __init__(self, owner: Any):
        super().__init__()
        self.owner = owner

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor,
                    encoder_hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        forward = self.fn_ref.original_forward
        state = current(self.owner)
        holder = None if state is None else state.values.get("region_weights")
        if holder is None or encoder_hidden_states is None:
            return forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        weights = holder["now"][hidden_states.shape[1]].to(hidden_states.dtype)
        people = encoder_hidden_states.chunk(len(weights), dim=1)
        return cast(torch.Tensor, sum(weight * forward(hidden_states, tokens, *args, **kwargs) for weight, tokens in zip(weights, people)))


def regional_cross_attention(model: torch.nn.Module, owner: Any) -> None:
    """Give every cross-attention (``attn2``) of ``model`` a ``RegionalAttention`` hook for
    ``owner``'s calls, once."""
    for name, module in model.named_modules():
        if name.endswith("attn2"):
            register(module, RegionalAttention(owner), REGIONS_HOOK_NAME)


def place_kps(kps: np.ndarray, box: Sequence[float], size: float = 0.3, height: float = 0.4) -> np.ndarray:
    """One face's (5, 2) keypoints moved into ``box`` (x0, y0, x1, y1): their spread scaled to
    ``size`` of the box's shorter side, centred across the box and ``height`` of the way down
    (a portrait's face; IdentityNet then draws the person there)."""
    kps = np.asarray(kps, np.float64)
    x0, y0, x1, y1 = box
    spread = max(float(np.ptp(kps, axis=0).max()), 1e-6)
    return (kps - kps.mean(0)) * (size * min(x1 - x0, y1 - y0) / spread) + [(x0 + x1) / 2, y0 + height * (y1 - y0)]


def columns(count: int, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """``count`` equal columns of a ``width`` x ``height`` image, left to right, as boxes: where
    several people go when nothing else says."""
    return [(i * width / count, 0.0, (i + 1) * width / count, float(height)) for i in range(count)]
