"""Resumable training state: ``accelerator.save_state`` written atomically, the last K kept."""

from __future__ import annotations

import json
import os
import re
import shutil

from idgen.errors import IDGenError

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``folder`` as (step, path), oldest first (partial writes are hidden)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder) if (m := _NAME.match(name))]
    return sorted(found)


def save_checkpoint(accelerator, folder: str, step: int, keep: int) -> str:
    """Save the full training state for ``step``. It is written under a hidden name and renamed
    into place, so a kill mid-write leaves the previous checkpoint as the latest good one."""
    final = os.path.join(folder, f"checkpoint-{step}")
    staging = os.path.join(folder, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    if accelerator.is_main_process:
        with open(os.path.join(staging, "train_state.json"), "w") as handle:
            json.dump({"step": step}, handle)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for _, old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
    state = os.path.join(resume, "train_state.json")
    if not os.path.isfile(state):
        raise IDGenError(f"{resume} is not a complete training checkpoint (no train_state.json): pass latest or a checkpoint-N folder")
    with open(state) as handle:
        return resume, int(json.load(handle)["step"])
