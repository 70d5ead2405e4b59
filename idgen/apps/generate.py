"""One ``generate`` request, from its parsed flags to PNG files: shared by ``idgen generate`` and
each job of ``idgen batch``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from idgen.adapters.regions import columns
from idgen.errors import IDGenError

from .facefix import fix_faces, people_identities
from .guard import finite_call
from .session import Session


def identity_inputs(session: Session, args: argparse.Namespace) -> dict[str, Any]:
    """The identity of the request's photos (``id_embeds``, ``negative_id_embeds``), read and
    checked before the base model loads, so a bad photo fails in seconds."""
    method = session.method
    if method.prompt_identity:
        check_photomaker(args)
    if args.kps_image and not (session.identitynet is not None or method.checkpoint_format == "infiniteyou") \
            and not args.people:
        raise IDGenError("--kps-image needs InstantID's IdentityNet (use an SDXL base with --adapter InstantX/InstantID) "
                         "or InfiniteYou's InfuseNet, or --people to place several people around its faces")
    if method.family == "flux" and (args.people or args.id_fusion or args.fix_faces):
        raise IDGenError("--people, --id-fusion and --fix-faces run on SD1.5 and SDXL bases; a FLUX base makes one person")
    inputs: dict[str, Any] = {"id_embeds": session.people(args.face) if args.people else session.identity(args.face)}
    if args.negative_face:
        inputs["negative_id_embeds"] = session.identity(args.negative_face, args.negative_face_index)
    return inputs


def check_photomaker(args: argparse.Namespace) -> None:
    """PhotoMaker's identity enters the prompt: the flags of adapter attention do not apply."""
    unused = [flag for flag, given in (
        ("--negative-face", args.negative_face), ("--people", args.people), ("--id-fusion", args.id_fusion),
        ("--fix-faces", args.fix_faces), ("--kps-image", args.kps_image), ("--id-scale", args.id_scale is not None),
        ("--id-start", args.id_start != 0.0), ("--id-end", args.id_end != 1.0)) if given]
    if unused:
        raise IDGenError(f"PhotoMaker puts the identity into the prompt; {', '.join(unused)} act on adapter attention: "
                         "leave them out (--start-merge-step sets when the identity joins)")
    if args.trigger_word not in args.prompt.split() and f" {args.trigger_word}" not in args.prompt:
        raise IDGenError(f"PhotoMaker finds the person in the prompt as a class word followed by "
                         f"'{args.trigger_word}': write e.g. --prompt \"a photo of a woman {args.trigger_word} ...\"")


def _call(session: Session, pipe: Any, args: argparse.Namespace,
          inputs: dict[str, Any]) -> tuple[dict, dict, dict, Any]:
    """The pipeline call of the request, the settings that acted (for each image's metadata), the
    identity arguments alone and the people's regions (for face fix)."""
    method = session.method
    identitynet = session.identitynet is not None
    infusenet = method.checkpoint_format == "infiniteyou"  # InfiniteYou's InfuseNet reads the pose like IdentityNet
    identity = dict(session.clip_inputs(pipe, args.face, people=args.people), id_embeds=inputs["id_embeds"])
    call = dict(session.call_kwargs(args.prompt), **identity)
    if "negative_id_embeds" in inputs:
        call.update(negative_id_embeds=inputs["negative_id_embeds"])
    kps_image = args.kps_image or (args.face if args.people else args.face[0])  # people: each posed in their region
    regions = None
    if args.people:
        regions = args.face_region or ("faces" if args.kps_image else columns(len(args.face), *pipe.output_size(
            None, args.height, args.width)))
        call.update(regions=regions, kps_image=args.kps_image, face_order=args.face_order,
                    face_index=session.options.face_index)
    if method.uses_prompt:
        call.update(negative_prompt=args.negative_prompt)
    if args.id_fusion:
        call.update(id_fusion=args.id_fusion,
                    recover_words=[w.strip() for w in args.recover_words.split(",")] if args.recover_words else None)
    if identitynet:
        call.update(kps_image=kps_image, face_index=session.options.face_index,
                    controlnet_conditioning_scale=args.identitynet_scale)
    if infusenet:  # posed like --kps-image when given, else free (the reference's black control)
        call.update(control_image=args.kps_image)
    settings = dict(
        prompt=args.prompt if method.uses_prompt else None,
        negative_prompt=args.negative_prompt if method.uses_prompt else None,
        faces=", ".join(args.face), face_index=session.options.face_index,
        regions=None if regions is None else regions if isinstance(regions, str) else
        "; ".join(",".join(f"{v:g}" for v in box) for box in regions),
        face_order=",".join(map(str, args.face_order)) if args.face_order else None,
        id_fusion=args.id_fusion, recover_words=args.recover_words,
        negative_faces=", ".join(args.negative_face) if args.negative_face else None,
        negative_face_index=args.negative_face_index if args.negative_face else None,
        kps_image=((args.kps_image or "face photos") if args.people else kps_image) if identitynet else
        args.kps_image if infusenet else None,
        identitynet_scale=args.identitynet_scale if identitynet else None,
    )
    return call, settings, identity, regions


def render(session: Session, pipe: Any, args: argparse.Namespace, paths: list[str],
           inputs: dict[str, Any]) -> Iterator[str]:
    """Render the request's ``--num-images`` into ``paths`` (``--batch-size`` at a time, so memory
    follows the batch, not the count), face-fixed when asked; yield each path once written."""
    call, settings, identity, regions = _call(session, pipe, args, inputs)
    fix_identity: dict[str, Any] | list[dict[str, Any]] = identity
    fix_regions = None
    if args.fix_faces and args.people:  # each face takes the identity of the region it lies in
        fix_identity, fix_regions = people_identities(pipe, identity, regions, len(args.face), args.kps_image,
                                                      args.face_order)
    warning = session.prompt_warning(pipe, args.prompt if session.method.uses_prompt else None)
    if warning:
        print(f"idgen: warning: {warning}", file=sys.stderr)
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        images = finite_call(pipe, **call, num_images_per_prompt=count,
                             generator=session.generators(args.seed + start, count)).images
        for i, (image, path) in enumerate(zip(images, paths[start:start + count]), start):
            extra: dict[str, str] = {}
            if args.fix_faces:
                image, extra = fix_faces(session, pipe, image, fix_identity, args.prompt, args.seed + i,
                                         args.fix_strength, negative_prompt=args.negative_prompt, keep_faceless=True,
                                         regions=fix_regions)
                if extra["face_fix"] == "no face found":
                    print(f"idgen: warning: no face found to fix in {path}; it is kept as generated", file=sys.stderr)
            session.save(image, path, pipe, args.seed + i, **settings, **extra)
            yield path
