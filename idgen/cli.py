"""The ``idgen`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import IDGenError, ModelNotFoundError

DEFAULT_ADAPTER = "h94/IP-Adapter-FaceID"
DEFAULT_WEIGHT_NAME = "ip-adapter-faceid_sd15.bin"
DEFAULT_FACE_PACK = "buffalo_l"
ARC2FACE_FACE_PACK = "antelopev2"  # with arcface.onnx added, as Arc2Face asks


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _dimension(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {value}")
    return value


def _id_scale(text: str) -> float | dict[str, float]:
    """``0.8`` or ``down=0,mid=1,up=0.8`` (keys: down, mid, up or a layer-name prefix)."""
    if "=" not in text:
        return float(text)
    scales = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        try:
            scales[key.strip()] = float(value)
        except ValueError:
            sep = ""
        block = key.strip().split(".")[0]
        if not sep or block not in ("down", "mid", "up", "down_blocks", "mid_block", "up_blocks"):
            raise argparse.ArgumentTypeError(f"expected a number or down=..,mid=..,up=.., got {text!r}")
    return scales


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction of the schedule between 0 and 1, got {value}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which models run and how: shared by generate and eval."""
    parser.add_argument("--base", default="tiny",
                        help="base model: 'tiny', 'tiny-sdxl' or 'tiny-arc2face' (offline presets), a hub id or a local "
                        "diffusers folder; SD1.5 or SDXL is read from it")
    parser.add_argument("--adapter", default=None,
                        help=f"identity adapter: hub id, folder or file (default: {DEFAULT_ADAPTER} for SD1.5, "
                        f"{SDXL_ADAPTER} for SDXL; the preset's for the tiny bases); "
                        "an Arc2Face repo or folder (FoivosPar/Arc2Face) selects Arc2Face")
    parser.add_argument("--weight-name", default=None, help=f"file inside --adapter (default: {DEFAULT_WEIGHT_NAME})")
    parser.add_argument("--subfolder", default=None, help="subfolder of --adapter")
    parser.add_argument("--face-model", default=None,
                        help=f"insightface pack name or folder, or 'tiny' (default: {DEFAULT_FACE_PACK}; the preset's for tiny)")
    parser.add_argument("--detector", choices=("auto", "scrfd", "dlib"), default="auto")
    parser.add_argument("--face-index", type=int, default=0, help="which face of the photo, largest first")
    parser.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default 30; Arc2Face 25)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 7.5; Arc2Face 3.0)")
    parser.add_argument("--id-scale", type=_id_scale, default=None,
                        help="identity strength: a number, or per block as down=0,mid=1,up=0.8 "
                        "(default 1.0; InstantID 0.8, as its reference runs it)")
    parser.add_argument("--id-start", type=_fraction, default=0.0, help="fraction of the steps before the identity applies")
    parser.add_argument("--id-end", type=_fraction, default=1.0, help="fraction of the steps after which it stops")
    parser.add_argument("--height", type=_dimension, default=None)
    parser.add_argument("--width", type=_dimension, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="idgen", description="Identity-preserving image generation.")
    parser.add_argument("--version", action="version", version=f"idgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="make images of the person in a face photo",
        description="Make images of the person in --face. With no --base, runs the offline tiny preset "
        "(random weights: it checks the stack, its images are noise).",
    )
    gen.add_argument("--face", action="append", required=True, metavar="PHOTO",
                     help="face photo; repeat for several photos of the same person")
    gen.add_argument("--negative-face", action="append", default=None, metavar="PHOTO",
                     help="a face to steer away from (through the unconditional branch); repeatable")
    gen.add_argument("--prompt", default=None, help="what to make (required, except for Arc2Face)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--out", default="out.png", help="output PNG; with --num-images N, OUT-0.png ... are written")
    _add_model_arguments(gen)
    gen.add_argument("--kps-image", default=None, metavar="PHOTO",
                     help="InstantID: take the face position and pose from this photo")
    gen.add_argument("--identitynet-scale", type=float, default=0.8, help="InstantID: IdentityNet strength")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-images", type=_positive_int, default=1)
    gen.set_defaults(run=run_generate)

    ev = commands.add_parser(
        "eval",
        help="generate for reference identities and prompts, and report FaceSim, detection rate and CLIP-T",
        description="For each identity (a sub-folder of --refs with its photos), each prompt and each seed, "
        "generate an image and measure it. Writes OUT/images/, OUT/report.json, OUT/report.md and OUT/grid.png.",
    )
    ev.add_argument("--refs", required=True, help="folder with one sub-folder of reference photos per identity")
    ev.add_argument("--prompts", default=None, help="text file, one prompt per line")
    ev.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; with or instead of --prompts)")
    ev.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument("--clip-model", default=None,
                    help="CLIP for CLIP-T: hub id or folder (default openai/clip-vit-large-patch14; the tiny preset's "
                    "offline), or 'none'")
    _add_model_arguments(ev)
    ev.set_defaults(run=run_eval)

    demo = commands.add_parser("demo", help="serve the Gradio demo (http://127.0.0.1:7860)",
                               description="Serve the Gradio demo; the models load once, at start.")
    _add_model_arguments(demo)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.set_defaults(run=run_demo)

    prep = commands.add_parser(
        "prepare-data",
        help="detect, align and embed a folder of face photos once, for training",
        description="Embed every photo of FOLDER (captions from a .txt beside each image or metadata.jsonl) "
        "into OUT; photos without exactly one large enough face are listed in OUT/skipped.jsonl. "
        "Re-runs process only new photos.",
    )
    prep.add_argument("folder")
    prep.add_argument("--out", required=True)
    prep.add_argument("--face-model", default=DEFAULT_FACE_PACK,
                      help=f"insightface pack name or folder, or 'tiny' for the offline preset's (default {DEFAULT_FACE_PACK})")
    prep.add_argument("--detector", choices=("auto", "scrfd", "dlib"), default="auto")
    prep.add_argument("--min-face-size", type=_positive_int, default=64, help="smallest face side kept, in pixels")
    prep.set_defaults(run=run_prepare_data)
    return parser


def _face_pack(name: str) -> str:
    """A face pack name or folder; 'tiny' is the offline preset's."""
    if name == "tiny":
        from .presets import get_preset

        return get_preset("tiny").face_pack
    return name


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise IDGenError(f"prompt file {args.prompts} does not exist: check the path")
        with open(args.prompts) as handle:
            prompts += [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise IDGenError("no prompt: pass --prompts FILE (one per line) or --prompt TEXT")
    return prompts


def run_eval(args: argparse.Namespace) -> None:
    import torch
    from tqdm.auto import tqdm

    from .eval import ClipScorer, DlibRecognizer, Report, Sample, face_similarity, load_identities, write_report
    from .presets import TINY_PRESETS, get_preset

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise IDGenError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    prompts = _prompts(args)
    identities = load_identities(args.refs)
    session = start_session(args)
    references = {name: session.analyzer.identity(photos) for name, photos in identities.items()}  # unit, for FaceSim
    id_embeds = references
    if session.models.raw_id_embeds:
        id_embeds = {name: session.analyzer.identity(photos, raw=True) for name, photos in identities.items()}
    second = DlibRecognizer()
    second_refs = {}
    for name, photos in identities.items():
        found = [d for d in map(second.descriptor, photos) if d is not None]
        second_refs[name] = np.mean(found, axis=0) if found else None
    clip_name = args.clip_model or (get_preset(args.base).clip if args.base in TINY_PRESETS else DEFAULT_CLIP)
    clip = None if clip_name == "none" else ClipScorer(clip_name)

    pipe = session.load(args)
    pipe.set_progress_bar_config(disable=True)
    report = Report(config={**session.metadata(args), "refs": args.refs, "prompts": prompts, "seeds": seeds,
                            "clip_model": clip_name if clip else None, "second_recognizer": DlibRecognizer.name})
    jobs = [(name, i, prompt, seed) for name in identities for i, prompt in enumerate(prompts) for seed in seeds]
    for name, index, prompt, seed in tqdm(jobs, desc="evaluating", unit="image"):
        call = dict(session.call_kwargs(args, prompt), id_embeds=torch.from_numpy(id_embeds[name]),
                    generator=torch.Generator().manual_seed(seed))
        if getattr(pipe, "has_identitynet", False):
            call.update(kps_image=identities[name][0])
        image = pipe(**call).images[0]
        file = os.path.join("images", name, f"{index:03d}-seed{seed}.png")
        os.makedirs(os.path.join(args.out, "images", name), exist_ok=True)
        _save_png(image, os.path.join(args.out, file), {"prompt": prompt, "seed": str(seed), "identity": name})
        facesim = face_similarity(session.analyzer, image, references[name])
        descriptor = second.descriptor(image)
        report.samples.append(Sample(
            identity=name, prompt=prompt, seed=seed, file=file, face_detected=facesim is not None, facesim=facesim,
            facesim_second=None if descriptor is None or second_refs[name] is None
            else second.similarity(descriptor, second_refs[name]),
            clip_t=clip.score(image, prompt) if clip else None,
        ))
    write_report(report, args.out, prompts)
    summary = report.summary()
    print(f"{summary['images']} images, face detection rate {summary['face_detection_rate']:.2f}, "
          f"FaceSim {summary['facesim'] if summary['facesim'] is not None else 'n/a'}, report in {args.out}/report.md")


def run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo as serve

    serve(args)


def run_prepare_data(args: argparse.Namespace) -> None:
    from idgen.train.data import prepare_data

    from .faces import FaceAnalyzer

    report = prepare_data(args.folder, args.out, FaceAnalyzer(_face_pack(args.face_model), detector=args.detector),
                          min_face_size=args.min_face_size)
    for item in report.skipped:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    print(f"{report.added} photo(s) added, {len(report.skipped)} skipped, {report.total} in {args.out}")


def _output_paths(out: str, count: int) -> list[str]:
    if not out.lower().endswith(".png"):
        raise IDGenError(f"--out {out} must end in .png: images are written as PNG with their settings as metadata")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise IDGenError(f"the folder of --out ({folder}) does not exist: create it or choose another path")
    if count == 1:
        return [out]
    stem = out[: -len(".png")]
    return [f"{stem}-{i}.png" for i in range(count)]


def _save_png(image, path: str, metadata: dict[str, str]) -> None:
    """Write ``image`` with text metadata, atomically: a reader never sees a partial file."""
    from PIL.PngImagePlugin import PngInfo

    from .files import atomic_path

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    with atomic_path(path) as staging:
        image.save(staging, format="PNG", pnginfo=info)


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


#: Sampling defaults of each method's reference (steps, guidance).
DEFAULTS = {"faceid": (30, 7.5), "arc2face": (25, 3.0), "sdxl": (30, 5.0)}
SDXL_ADAPTER = "InstantX/InstantID"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
INSTANTID_WEIGHT_NAME = "ip-adapter.bin"


@dataclass
class Models:
    """What ``idgen generate`` runs, resolved from the flags."""

    kind: str  # "faceid" (SD1.5), "sdxl" (InstantID or FaceID-SDXL) or "arc2face"
    base: str
    adapter: str
    weight_name: str | None
    face_model: str
    random_parts: list[str]

    @property
    def raw_id_embeds(self) -> bool:
        """InstantID takes the recognizer's raw (un-normalised) vector."""
        return self.kind == "sdxl" and _is_instantid(self.adapter, self.weight_name)


def _is_arc2face(adapter: str | None) -> bool:
    return adapter is not None and (os.path.isdir(os.path.join(adapter, "arc2face")) or "arc2face" in adapter.lower())


def _is_sdxl(base: str) -> bool:
    """Whether a base model (hub id or folder) is SDXL, from its model_index.json."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(base)
    except Exception as err:  # offline, missing repo, bad folder
        raise _base_model_error(base, err) from None
    return "XL" in config.get("_class_name", "")


def _base_model_error(base: str, err: Exception) -> ModelNotFoundError:
    first_line = str(err).splitlines()[0][:200] if str(err) else ""
    return ModelNotFoundError(
        f"could not load base model {base} ({type(err).__name__}: {first_line}): pass a diffusers folder, "
        "a reachable hub id, or leave --base out for the offline tiny preset"
    )


def _is_instantid(adapter: str, weight_name: str | None) -> bool:
    """InstantID's layout: a repo or folder with ``ControlNetModel/`` beside ``ip-adapter.bin``."""
    return weight_name == INSTANTID_WEIGHT_NAME or adapter == SDXL_ADAPTER or os.path.isdir(
        os.path.join(adapter, "ControlNetModel")
    )


def _resolve_models(args: argparse.Namespace) -> Models:
    from .presets import TINY_PRESETS, get_preset

    base, adapter, weight_name, face_model, random_parts = args.base, args.adapter, args.weight_name, args.face_model, []
    if base in TINY_PRESETS:
        preset = get_preset(base)
        if adapter is None:
            adapter, random_parts = preset.adapter, ["base", "adapter"]
        elif _is_arc2face(adapter):
            raise IDGenError(f"{adapter} needs a real SD1.5 base for its tokenizer, VAE and scheduler: "
                             "add --base stable-diffusion-v1-5/stable-diffusion-v1-5")
        base, face_model = preset.base, face_model or preset.face_pack
    if _is_arc2face(adapter) or args.base == "tiny-arc2face":
        kind = "arc2face"
    else:
        kind = "sdxl" if _is_sdxl(base) else "faceid"
        if adapter is None:
            adapter = SDXL_ADAPTER if kind == "sdxl" else DEFAULT_ADAPTER
        if weight_name is None and _is_instantid(adapter, weight_name):
            weight_name = INSTANTID_WEIGHT_NAME
        elif weight_name is None and adapter == DEFAULT_ADAPTER:
            weight_name = "ip-adapter-faceid_sdxl.bin" if kind == "sdxl" else DEFAULT_WEIGHT_NAME
    instantid = kind == "sdxl" and _is_instantid(adapter, weight_name)
    face_model = face_model or (ARC2FACE_FACE_PACK if kind == "arc2face" or instantid else DEFAULT_FACE_PACK)
    return Models(kind, base, adapter, weight_name, face_model, random_parts)


def _load_pipeline(models: Models, adapter_file: str | None, dtype):
    from .pipelines import IDArc2FacePipeline, IDStableDiffusionPipeline, IDStableDiffusionXLPipeline, load_identitynet

    try:
        if models.kind == "arc2face":
            return IDArc2FacePipeline.from_arc2face(models.adapter, base_model=models.base, dtype=dtype)
        if models.kind == "sdxl":
            controlnet = None
            if _is_instantid(models.adapter, models.weight_name):
                controlnet = load_identitynet(models.adapter, dtype=dtype)
            pipe = IDStableDiffusionXLPipeline.from_pretrained(models.base, controlnet=controlnet, dtype=dtype)
        else:
            pipe = IDStableDiffusionPipeline.from_pretrained(models.base, dtype=dtype)
    except Exception as err:  # offline, missing repo, bad folder
        raise _base_model_error(models.base, err) from None
    pipe.load_identity_adapter(adapter_file)
    return pipe


@dataclass
class Session:
    """Models chosen by the flags, the face analyzer and the sampling settings."""

    models: Models
    analyzer: object
    adapter_file: str | None
    steps: int
    guidance: float

    def load(self, args: argparse.Namespace):
        """The pipeline, on its device, with the analyzer set."""
        device, dtype = _device_and_dtype(args.device, args.dtype)
        pipe = _load_pipeline(self.models, self.adapter_file, dtype)
        pipe.set_face_analyzer(self.analyzer)
        pipe.to(device)
        pipe.set_progress_bar_config(desc="denoising")
        return pipe

    def id_scale(self, args: argparse.Namespace):
        if args.id_scale is not None:
            return args.id_scale
        return 0.8 if self.models.raw_id_embeds else 1.0

    def call_kwargs(self, args: argparse.Namespace, prompt: str | None) -> dict:
        """Arguments of a pipeline call common to generate and eval."""
        call = dict(num_inference_steps=self.steps, guidance_scale=self.guidance, height=args.height, width=args.width)
        if self.models.kind != "arc2face":
            call.update(prompt=prompt, id_scale=self.id_scale(args), id_guidance_start=args.id_start,
                        id_guidance_end=args.id_end)
        return call

    def metadata(self, args: argparse.Namespace) -> dict[str, str]:
        from .version import __version__

        meta = {
            "steps": str(self.steps),
            "guidance": str(self.guidance),
            "id_scale": str(self.id_scale(args)),
            "id_window": f"{args.id_start}-{args.id_end}",
            "method": "instantid" if self.models.raw_id_embeds else self.models.kind,
            "base_model": args.base,
            "adapter": f"{self.models.adapter}" + (f" ({self.models.weight_name})" if self.models.weight_name else ""),
            "face_model": f"{self.analyzer.info['recognizer']} via {self.analyzer.info['detector']}",
            "idgen_version": __version__,
        }
        if self.models.random_parts:
            meta["random_weights"] = (
                "random weights in: " + ", ".join(self.models.random_parts) + " (offline preset; images carry no likeness)"
            )
        return meta


def start_session(args: argparse.Namespace) -> Session:
    """Resolve the models and check the adapter file and face models, before any base model loads."""
    from .faces import FaceAnalyzer

    models = _resolve_models(args)
    steps, guidance = DEFAULTS[models.kind]
    steps, guidance = args.steps or steps, guidance if args.guidance is None else args.guidance
    if not args.id_start < args.id_end:
        raise IDGenError(f"--id-start ({args.id_start}) must be below --id-end ({args.id_end})")
    adapter_file = None
    if models.kind != "arc2face":
        from .adapters import detect_format, load_adapter_state_dict, resolve_checkpoint_file

        adapter_file = resolve_checkpoint_file(models.adapter, models.weight_name, args.subfolder)
        detect_format(load_adapter_state_dict(adapter_file), adapter_file)
    analyzer = FaceAnalyzer(_face_pack(models.face_model), detector=args.detector)
    if analyzer.recognizer_random:
        models.random_parts.append("face recognizer")
    return Session(models, analyzer, adapter_file, steps, guidance)


def run_generate(args: argparse.Namespace) -> None:
    import torch

    paths = _output_paths(args.out, args.num_images)
    # Inputs first: a bad photo or adapter file fails in seconds, before the base model loads.
    session = start_session(args)
    models, analyzer = session.models, session.analyzer
    if models.kind != "arc2face" and not args.prompt:
        raise IDGenError("--prompt is required (only Arc2Face generates from the identity alone)")
    id_embeds = torch.from_numpy(analyzer.identity(args.face, args.face_index, raw=models.raw_id_embeds))
    negative_id_embeds = None
    if args.negative_face:
        negative_id_embeds = torch.from_numpy(analyzer.identity(args.negative_face, args.face_index, raw=models.raw_id_embeds))
    pipe = session.load(args)

    call = dict(
        session.call_kwargs(args, args.prompt),
        id_embeds=id_embeds,
        negative_id_embeds=negative_id_embeds,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    if models.kind != "arc2face":
        call.update(negative_prompt=args.negative_prompt)
    if models.kind == "sdxl" and pipe.has_identitynet:
        call.update(kps_image=args.kps_image or args.face[0], controlnet_conditioning_scale=args.identitynet_scale)
    elif args.kps_image:
        raise IDGenError("--kps-image needs InstantID's IdentityNet: use an SDXL base with --adapter InstantX/InstantID")
    result = pipe(**call)
    metadata = {
        "prompt": args.prompt or "",
        "negative_prompt": args.negative_prompt or "",
        "seed": str(args.seed),
        "negative_faces": ", ".join(args.negative_face or []),
        "faces": ", ".join(args.face),
        **session.metadata(args),
    }
    for image, path in zip(result.images, paths):
        _save_png(image, path, metadata)
        print(path)


def main(argv: Sequence[str] | None = None) -> int:
    # Quiet the libraries' own notices; the progress bar and errors are what a user needs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars; the denoising bar stays
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # no retry chatter: a failed download ends in one error line
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except IDGenError as err:
        print(f"idgen: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idgen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
