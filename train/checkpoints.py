"""Resumable training state, written atomically, the last K kept, read back without running code.

A checkpoint folder holds only data formats: the trained weights (``model.safetensors``), the
EMA weights (``ema.safetensors``), the optimizer's and the gradient scaler's state
(``optimizer.pt``, ``scaler.pt``: tensors and numbers, read with ``torch.load(weights_only=True)``)
and ``train_state.json``. There is no random state to restore: every random draw of a step is
seeded by the run's seed and the step number. Checkpoints get copied between machines, so a
file that would need code to load is refused with one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from idgen.errors import IDGenError
from idgen.files import follow_umask, remove_stale_temporaries, temporary_prefix

_NAME = re.compile(r"^checkpoint-(\d+)$")
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, SCALER_FILE, STATE_FILE = (
    "model.safetensors", "ema.safetensors", "optimizer.pt", "scaler.pt", "train_state.json",
)


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``folder`` as (step, path), oldest first (partial writes are hidden)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder) if (m := _NAME.match(name))]
    return sorted(found)


def _ema_tensors(ema) -> dict[str, torch.Tensor]:
    return {f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}


def save_checkpoint(accelerator, folder: str, step: int, keep: int, model, optimizer, ema=None) -> str:
    """Save the training state for ``step``. It is written under a hidden name and renamed into
    place, so a kill mid-write leaves the previous checkpoint as the latest good one."""
    final = os.path.join(folder, f"checkpoint-{step}")
    staging = os.path.join(folder, f"{temporary_prefix()}checkpoint-{step}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        weights = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(weights, os.path.join(staging, MODEL_FILE))
        torch.save(optimizer.state_dict(), os.path.join(staging, OPTIMIZER_FILE))
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), os.path.join(staging, SCALER_FILE))
        state = {"step": step}
        if ema is not None:
            save_file(_ema_tensors(ema), os.path.join(staging, EMA_FILE))
            state["ema_optimization_step"] = int(ema.optimization_step)
        with open(os.path.join(staging, STATE_FILE), "w") as handle:
            json.dump(state, handle)
        follow_umask(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for _, old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _read(path: str, what: str):
    """Read one checkpoint file as data only; one line naming the file when it cannot be."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path, device="cpu")
        if path.endswith(".json"):
            with open(path) as handle:
                return json.load(handle)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise IDGenError(
            f"{path} ({what}) could not be read safely ({type(err).__name__}: {first}): the checkpoint is "
            "damaged or not one idgen wrote; resume from another checkpoint or start without --resume"
        ) from None


def load_checkpoint(path: str, accelerator, model, optimizer, ema=None) -> int:
    """Restore a checkpoint written by ``save_checkpoint``; returns its step."""
    state = _read(os.path.join(path, STATE_FILE), "training state")
    weights = _read(os.path.join(path, MODEL_FILE), "trained weights")
    target = accelerator.unwrap_model(model)
    expected = target.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise IDGenError(
            f"{path} holds weights of another model than this run trains (different adapter, LoRA rank or base): "
            "resume with the config it was written with, or start without --resume"
        )
    target.load_state_dict(weights)
    optimizer.load_state_dict(_read(os.path.join(path, OPTIMIZER_FILE), "optimizer state"))
    scaler_file = os.path.join(path, SCALER_FILE)
    if accelerator.scaler is not None and os.path.isfile(scaler_file):
        accelerator.scaler.load_state_dict(_read(scaler_file, "gradient scaler state"))
    if ema is not None:
        ema_file = os.path.join(path, EMA_FILE)
        if not os.path.isfile(ema_file):
            raise IDGenError(f"{path} has no EMA weights but this run uses EMA: resume with use_ema as it was written")
        shadow = _read(ema_file, "EMA weights")
        if len(shadow) != len(ema.shadow_params):
            raise IDGenError(f"{ema_file} holds {len(shadow)} EMA tensors, this run has {len(ema.shadow_params)}")
        for i, param in enumerate(ema.shadow_params):
            param.data.copy_(shadow[f"shadow.{i}"])
        ema.optimization_step = int(state.get("ema_optimization_step", state["step"]))
    return checkpoint_step(path, state)


def checkpoint_step(path: str, state: dict) -> int:
    """The step a checkpoint's ``train_state.json`` gives, checked: a whole number, and the N of
    its ``checkpoint-N`` folder (a file edited by hand or from another checkpoint is refused)."""
    step = state.get("step") if isinstance(state, dict) else None
    named = _NAME.match(os.path.basename(os.path.normpath(path)))
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or (named and int(named.group(1)) != step):
        raise IDGenError(f"{os.path.join(path, STATE_FILE)} gives step {step!r}, not the step of {os.path.basename(path)}: "
                         "the checkpoint was edited or mixed up; resume from another checkpoint or start without --resume")
    return step


def resolve_resume(folder: str, resume: str | None) -> tuple[str, int] | None:
    """The checkpoint to resume from (``latest`` or a path) and its step, or None to start fresh."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        if not found:
            return None
        step, path = found[-1]
        return path, step
    state = os.path.join(resume, STATE_FILE)
    if not os.path.isfile(state):
        raise IDGenError(f"{resume} is not a complete training checkpoint (no train_state.json): pass latest or a checkpoint-N folder")
    return resume, checkpoint_step(resume, _read(state, "training state"))


def prepare_run_folder(accelerator, output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over one that left checkpoints (it would overwrite its adapter,
    append to its metrics from step 1, and leave its checkpoints for a later resume to mix in),
    unless ``overwrite`` says to replace it: then its checkpoints and metrics are removed first.
    What a killed run left half-written there (``.tmp-<pid>-*``) is removed in any case."""
    if resume and overwrite:
        raise IDGenError("--resume continues a run and --overwrite replaces it: pass only one")
    if accelerator.is_main_process:
        for folder in (output_dir, os.path.join(output_dir, "checkpoints")):
            remove_stale_temporaries(folder)
    found = list_checkpoints(os.path.join(output_dir, "checkpoints"))
    if not found or resume:
        return
    if not overwrite:
        raise IDGenError(
            f"{output_dir} already holds a run (checkpoints up to step {found[-1][0]}): pass --resume latest to "
            "continue it, --overwrite to start over (its checkpoints and metrics are deleted), or another output_dir"
        )
    if accelerator.is_main_process:
        shutil.rmtree(os.path.join(output_dir, "checkpoints"))
        metrics = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
    accelerator.wait_for_everyone()
