"""Checkpoint files: find one (file, folder or hub repo), read it safely, check its tensors, write
one atomically, and tell the FLUX layouts apart by their top-level keys. Every other adapter module
reads and writes weights through these."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file, save_file

from idgen.errors import CheckpointError, ModelNotFoundError
from idgen.files import atomic_path
from idgen.network import download

StateDict = dict[str, torch.Tensor]


def resolve_checkpoint_file(
    pretrained_model_name_or_path_or_file: str | os.PathLike,
    weight_name: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs,
) -> str:
    """Local path of an adapter checkpoint given a file, a folder (+ weight_name) or a hub repo id."""
    source = os.fspath(pretrained_model_name_or_path_or_file)
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder or "")
        if weight_name:
            path = os.path.join(folder, weight_name)
            if not os.path.isfile(path):
                raise ModelNotFoundError(f"{path} does not exist: check weight_name and subfolder")
            return path
        candidates = sorted(
            name for name in os.listdir(folder) if name.endswith((".safetensors", ".bin", ".pth"))
        ) if os.path.isdir(folder) else []
        if len(candidates) != 1:
            found = ", ".join(candidates) or "no .safetensors/.bin file"
            raise ModelNotFoundError(f"{folder} holds {found}: pass weight_name= to choose the adapter file")
        return os.path.join(folder, candidates[0])
    looks_local = source.startswith((".", "/", "~")) or source.endswith((".bin", ".safetensors", ".pth"))
    if looks_local or source.count("/") != 1:
        raise ModelNotFoundError(f"adapter {source} is neither an existing file or folder nor a hub repo id: check the path")
    if not weight_name:
        raise ModelNotFoundError(
            f"{source} is a hub repo: pass weight_name= (e.g. ip-adapter-faceid_sd15.bin) to choose the file"
        )

    try:
        return hf_hub_download(source, weight_name, subfolder=subfolder or None, **hub_kwargs)
    except Exception as err:  # offline, missing repo or file, auth
        raise ModelNotFoundError(
            f"could not get {weight_name} from hub repo {source} ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
            "check the names, or download the file and pass its local path"
        ) from None


class PhotoMakerCheckpointError(CheckpointError):
    """A PhotoMaker checkpoint given where an adapter checkpoint was expected."""


def read_checkpoint(path: str) -> dict:
    """The raw contents of a checkpoint: ``.safetensors`` read as such, any other file only with
    ``torch.load(weights_only=True)``, which refuses pickles that carry code."""
    try:
        if path.endswith(".safetensors"):
            raw = load_file(path, device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} could not be read ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}): "
            "the file is truncated, corrupt or not a weights file; download it again"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict: pass an identity adapter checkpoint")
    return raw


def release_weights(source: str | os.PathLike | None, url: str, purpose: str, flag: str, name: str) -> tuple[dict, str]:
    """A helper network's weights and where they came from: the file ``source`` (``read_checkpoint``),
    or by default ``url``, downloaded once into torch's hub cache (with a timeout, never under
    ``HF_HUB_OFFLINE``). The errors say ``purpose`` and the argument (``flag``) that takes the file ``name``."""
    if source is None:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        return read_checkpoint(download(url, cached, purpose, f"pass {flag} with its path")), url
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{path} does not exist: pass {name}")
    return read_checkpoint(path), path


#: The largest weight magnitude a trained adapter plausibly holds: published adapters stay below
#: 100; one past this was damaged or written wrongly, and would overflow to black images.
MAX_WEIGHT = 1e4


def validate_tensors(state_dict: dict[str, StateDict], path: str = "checkpoint") -> None:
    """Every entry is a floating-point tensor with finite values of a plausible size
    (``MAX_WEIGHT``); one line naming the key if not."""
    for group, part in state_dict.items():
        for key, value in part.items():
            name = f"{group}.{key}"
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: {name} is a {type(value).__name__}, not a tensor: the file is not an adapter checkpoint")
            if not value.is_floating_point():
                raise CheckpointError(
                    f"{path}: {name} has dtype {str(value.dtype).replace('torch.', '')}; adapter weights are floating "
                    "point: the file is damaged or was written wrongly"
                )
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(
                    f"{path}: {name} holds NaN or Inf values, which would generate black images: the weights "
                    "are damaged (a diverged training run or a bad download); use another checkpoint"
                )
            largest = float(value.abs().max()) if value.numel() else 0.0
            if largest > MAX_WEIGHT:
                raise CheckpointError(
                    f"{path}: {name} holds values up to {largest:.3g}, far past any trained adapter's (at most about "
                    f"{MAX_WEIGHT:g}), which would overflow to black images: the weights are damaged; use another checkpoint"
                )


def save_adapter_checkpoint(state_dict: dict[str, StateDict], path: str) -> None:
    """Write ``{"image_proj", "ip_adapter"}`` in the official layout, atomically.

    ``.safetensors`` gets the flattened keys (``image_proj.*``, ``ip_adapter.*``); ``.bin``
    the nested torch pickle of the reference repos.
    """

    with atomic_path(path) as staging:
        if path.endswith(".safetensors"):

            flat = {f"{group}.{key}": value.contiguous() for group, part in state_dict.items() for key, value in part.items()}
            save_file(flat, staging)
        else:
            torch.save(state_dict, staging)




#: PuLID-FLUX's top-level groups.
PULID_FLUX_GROUPS = ("pulid_encoder", "pulid_ca")


def is_pulid_flux(raw: dict) -> bool:
    return any(str(key).split(".")[0] in PULID_FLUX_GROUPS for key in raw)


def is_infiniteyou(raw: dict) -> bool:
    """InfiniteYou's projection file: ``image_proj`` alone, in the resampler's layout."""
    proj = raw.get("image_proj")
    return set(raw) == {"image_proj"} and isinstance(proj, dict) and "proj_in.weight" in proj and "latents" in proj
