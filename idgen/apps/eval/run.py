"""``idgen eval``: for each reference identity, prompt and seed, generate and measure."""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm.auto import tqdm

from idgen.errors import IDGenError
from idgen.testing.presets import TINY_PRESETS, get_preset

from ..guard import finite_call
from ..session import Session
from .metrics import ClipScorer, DlibRecognizer, face_similarity
from .report import Report, Sample, load_identities, write_report

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def evaluate(session: Session, refs: str, prompts: list[str], seeds: list[int], out: str,
             clip_model: str | None = None) -> Report:
    """Generate every (identity, prompt, seed) image into ``out/images`` and write the report.

    ``clip_model``: CLIP for CLIP-T (hub id or folder; default the tiny preset's for a tiny base,
    else ``DEFAULT_CLIP``), or ``"none"`` to skip it.
    """
    options = session.options
    identities = load_identities(refs)
    face_index = options.face_index
    if not isinstance(face_index, int):
        raise IDGenError("idgen eval takes one --face-index for every reference photo")
    # unit vectors, for FaceSim
    references = {name: session.analyzer.identity(photos, face_index) for name, photos in identities.items()}
    second = DlibRecognizer()
    second_refs: dict[str, np.ndarray | None] = {}
    for name, photos in identities.items():
        found = [d for d in map(second.descriptor, photos) if d is not None]
        second_refs[name] = np.mean(found, axis=0) if found else None
    clip_name = clip_model or (get_preset(options.base).clip if options.base in TINY_PRESETS else DEFAULT_CLIP)
    clip = None if clip_name == "none" else ClipScorer(clip_name)

    pipe = session.load()
    pipe.set_progress_bar_config(disable=True)
    report = Report(config={**session.metadata(), "refs": refs, "prompts": prompts, "seeds": seeds,
                            "clip_model": clip_name if clip else None, "second_recognizer": DlibRecognizer.name})
    # The generation's identities: the same unit vectors, or as the method takes them (raw vectors,
    # one row per photo, or read by the pipeline itself), with what the method reads from the photos.
    as_given = session.method.raw_id_embeds or session.method.per_photo or session.method.own_recognizer
    inputs = {name: {"id_embeds": session.identity(photos) if as_given else torch.from_numpy(references[name]),
                     **session.clip_inputs(pipe, photos)} for name, photos in identities.items()}
    jobs = [(name, i, prompt, seed) for name in identities for i, prompt in enumerate(prompts) for seed in seeds]
    for name, index, prompt, seed in tqdm(jobs, desc="evaluating", unit="image"):
        call = dict(session.call_kwargs(prompt), **inputs[name], generator=torch.Generator().manual_seed(seed))
        if getattr(pipe, "has_identitynet", False):
            call.update(kps_image=identities[name][0])
        image = finite_call(pipe, **call).images[0]
        file = os.path.join("images", name, f"{index:03d}-seed{seed}.png")
        os.makedirs(os.path.join(out, "images", name), exist_ok=True)
        image = session.save(image, os.path.join(out, file), pipe, seed, prompt=prompt, identity=name)
        facesim = face_similarity(session.analyzer, image, references[name])
        descriptor, second_ref = second.descriptor(image), second_refs[name]
        report.samples.append(Sample(
            identity=name, prompt=prompt, seed=seed, file=file, face_detected=facesim is not None, facesim=facesim,
            facesim_second=None if descriptor is None or second_ref is None else second.similarity(descriptor, second_ref),
            clip_t=clip.score(image, prompt) if clip else None,
        ))
    write_report(report, out, prompts, {name: photos[0] for name, photos in identities.items()})
    return report
