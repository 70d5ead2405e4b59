"""From "base + adapter + face model + options" to a ready pipeline and its call arguments.

The one loader behind ``idgen generate``, ``idgen eval``, the demo and Python callers::

    from idgen import start_session

    session = start_session(base="stabilityai/stable-diffusion-xl-base-1.0", adapter="InstantX/InstantID")
    pipe = session.load()
    image = pipe(**session.call_kwargs("a photo of a person"), id_embeds=session.identity(["me.jpg"])).images[0]

Each identity method is one row of ``METHODS``: how its checkpoints are recognised, which
pipeline runs it, its face models and sampling defaults. A new method adds a row (and its
modules in ``adapters/`` and ``pipelines/``), not branches here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import torch
from transformers import CLIPVisionModelWithProjection

from idgen import pipelines, watermark
from idgen.adapters import check_portrait_faces, detect_format, load_adapter_state_dict, resolve_checkpoint_file
from idgen.adapters.checkpoints import PhotoMakerCheckpointError, is_infiniteyou, is_pulid_flux, read_checkpoint
from idgen.adapters.photomaker import photomaker_state_dicts
from idgen.adapters.pulid import pulid_settings
from idgen.credentials import Signer
from idgen.errors import IDGenError, ModelNotFoundError
from idgen.faces import FaceAnalyzer, ImageInput
from idgen.files import save_png
from idgen.formats import METHODS, Method, base_model_error, is_instantid, method_of, resolve_method
from idgen.testing.presets import TINY_PRESETS, get_preset
from idgen.version import __version__

from . import tiers
from .loras import LoRASpec, load_loras, parse_lora
from .options import SessionOptions, check_call_options, check_id_window, check_timesteps
from .schedulers import make_scheduler, scheduler_spec, takes_timesteps


def face_pack(name: str) -> str:
    """A face pack name or folder; 'tiny' is the offline preset's."""
    if name == "tiny":
        return get_preset("tiny").face_pack
    return name


def device_and_dtype(device: str, dtype: str):
    """The torch device and dtype for ``--device`` / ``--dtype`` (``auto``: CUDA and float16 when
    there is a GPU), checked against what this machine and torch build have."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise IDGenError(f"--device {device} is not a device: use auto, cpu, cuda, cuda:1 or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise IDGenError(f"--device {device}: this machine (torch {torch.__version__}) has no {kind} device "
                         "torch can use: use --device cpu, or auto to pick the best one found")
    if dtype == "auto":
        dtype = "float16" if kind in ("cuda", "mps") else "float32"
    return device, getattr(torch, dtype)


@dataclass
class Session:
    """The models chosen by the options, the face analyzer and the sampling settings; ``load()``
    makes the pipeline, ``call_kwargs()`` / ``identity()`` its call arguments."""

    options: SessionOptions
    method: Method
    base: str  # resolved: a preset's folder, a hub id or a folder
    adapter: str
    weight_name: str | None
    analyzer: FaceAnalyzer
    adapter_file: str | None  # the checked checkpoint file (None for Arc2Face, loaded from its folder)
    steps: int
    guidance: float
    identitynet: str | None = None  # where InstantID's IdentityNet loads from
    random_parts: list[str] = field(default_factory=list)
    signer: Any = None  # idgen.credentials.Signer when Content Credentials are asked for
    loras: list[LoRASpec] = field(default_factory=list)
    #: The adapter checkpoint as read and checked by ``start_session``, handed to the pipeline by the
    #: first ``load()`` (not read twice) and then dropped.
    adapter_state: dict | None = field(default=None, repr=False)
    loaded_tier: tiers.Tier | None = None  # the memory and speed tier of the last load()

    def load(self):
        """The pipeline, on its device, with the identity adapter loaded and the analyzer set."""
        device, dtype = device_and_dtype(self.options.device, self.options.dtype)
        cls = getattr(pipelines, self.method.pipeline)
        extra = {}
        if self.identitynet is not None:
            try:
                extra["controlnet"] = pipelines.load_identitynet(self.identitynet, dtype=dtype)
            except Exception as err:  # missing folder or repo, offline, not a ControlNet
                raise ModelNotFoundError(
                    f"could not load InstantID's IdentityNet from {self.identitynet} ({type(err).__name__}): pass "
                    "--identitynet with a ControlNetModel folder or InstantX/InstantID"
                ) from None
        elif self.method.pipeline == "IDStableDiffusionXLPipeline":
            extra["controlnet"] = None
        tier = self.tier(device)
        try:
            if self.method.family == "arc2face":
                pipe = cls.from_arc2face(self.adapter, base_model=self.base, dtype=dtype)
            else:
                extra.update(tiers.gguf_denoiser(tier, self.base, self.method.family, dtype))
                pipe = cls.from_pretrained(self.base, dtype=dtype, **extra,
                                           quantization_config=tiers.quantization_config(tier, self.method.family, dtype))
        except IDGenError:
            raise
        except Exception as err:  # offline, missing repo, bad folder
            raise base_model_error(self.base, err) from None
        if self.options.scheduler:
            pipe.scheduler = make_scheduler(self.options.scheduler, pipe.scheduler.config)
        self._check_schedule(pipe.scheduler)
        if self.adapter_file is not None:
            if self.method.face_eva:  # PuLID loads its EVA tower and face parser from files, folders or their repos
                extra = {"image_encoder": self.options.image_encoder, "face_parser": self.options.face_parser}
            elif self.method.checkpoint_format == "infiniteyou":  # and InfuseNet, from beside it unless given
                extra = {"infusenet": self.options.infusenet, "face_recognizer": self.options.face_recognizer}
            else:
                extra = {"image_encoder": self._image_encoder(dtype)} if self.options.image_encoder else {}
            if self.adapter_state is not None:
                extra["weight_name"] = self.adapter_file
            source = self.adapter_state or self.adapter_file
            if self.method.checkpoint_format == "infiniteyou":  # its InfuseNet sits beside it, in the folder or repo
                source, extra = self.adapter, dict(extra, weight_name=self.weight_name, subfolder=self.options.subfolder)
            pipe.load_identity_adapter(source, **extra)
            self.adapter_state = None
        pipe.set_face_analyzer(self.analyzer)
        tiers.place(pipe, tier, device)
        load_loras(pipe, self.loras)  # on the device: fusing is a matrix product per layer
        if tier.compile:
            tiers.compile_models(pipe, regional=tier.compile == "regional")
        self.loaded_tier = tier
        pipe.set_progress_bar_config(desc="denoising")
        return pipe

    def for_call(self, options: SessionOptions) -> Session:
        """This session with another call's ``CALL_OPTIONS`` (steps, id_scale, size, ...): the same
        models, analyzer and adapter; an option that picks or places a model is refused."""
        check_call_options(self.options, options)
        check_id_window(options.id_start, options.id_end)
        if options.timesteps:
            check_timesteps(options.timesteps, options.steps)
        steps, guidance = _steps_and_guidance(self.method, options)
        return dataclasses.replace(self, options=options, steps=steps, guidance=guidance)

    def tier(self, device: str) -> tiers.Tier:
        """The memory and speed tier the options ask for; ``--memory auto`` resolved for ``device``."""
        options = self.options
        tier = tiers.requested_tier(options)
        if options.memory == "auto":
            dtype = device_and_dtype(self.options.device, self.options.dtype)[1]
            size = options.height * options.width if options.height and options.width else None
            tier = tiers.auto_tier(tier, self.base, self.method.family, device, dtype, size)
            if tier.chosen:
                print(f"idgen: {tier}", file=sys.stderr)
        return tier

    def _image_encoder(self, dtype):
        try:
            return CLIPVisionModelWithProjection.from_pretrained(self.options.image_encoder, dtype=dtype)
        except Exception as err:  # missing folder or repo, offline, not a CLIP image encoder
            raise ModelNotFoundError(
                f"could not load the image encoder {self.options.image_encoder} ({type(err).__name__}): pass "
                "--image-encoder with a CLIPVisionModelWithProjection folder, or leave it out for h94/IP-Adapter's"
            ) from None

    def clip_inputs(self, pipe, photos: Sequence[ImageInput], face_index: int | None = None,
                    people: bool = False) -> dict[str, Any]:
        """The call arguments a method reads from the photos themselves (one person, or with
        ``people`` one photo per person): FaceID-Plus's ``face_clip_embeds``; ``face_image`` (and
        the face to take) for PhotoMaker, PuLID and InfiniteYou; nothing for the other methods."""
        index = self.options.face_index if face_index is None else face_index
        if self.method.prompt_identity or self.method.face_eva or self.method.own_recognizer:  # they read the photos
            if people:
                return {"face_image": [[photo] for photo in photos]}
            return {"face_image": list(photos), "face_index": index}
        if not self.method.face_clip:
            return {}
        if people:
            rows = [pipe.encode_face_clip([photo], 1, i) for photo, i in zip(photos, self._person_indices(photos, index))]
            return {"face_clip_embeds": torch.cat(rows)}
        return {"face_clip_embeds": pipe.encode_face_clip(list(photos), 1, index)}

    def _check_schedule(self, scheduler) -> None:
        limit = scheduler.config.get("num_train_timesteps", 1000)
        if self.steps > limit:
            raise IDGenError(f"--steps {self.steps} is more than the {limit} timesteps the scheduler was trained on: "
                             f"use at most {limit} (20-50 is usual)")
        timesteps = self.options.timesteps
        if timesteps and not takes_timesteps(scheduler):
            raise IDGenError(f"--timesteps needs a scheduler that samples at given timesteps, and "
                             f"{type(scheduler).__name__} does not: add --scheduler lcm (or euler, dpm++-2m, tcd)")
        if timesteps and max(timesteps) >= limit:
            raise IDGenError(f"--timesteps {max(timesteps)} is past the scheduler's {limit} training timesteps: "
                             f"use values below {limit}")

    @property
    def start_merge_step(self) -> int:
        return self.merge_step(self.steps)

    def merge_step(self, steps: int) -> int:
        """PhotoMaker: the steps with the prompt alone, of ``steps``; its demo's 20% unless given."""
        merge = self.options.start_merge_step
        return int(0.2 * steps) if merge is None else merge

    @property
    def id_scale(self) -> float | dict[str, float]:
        return self.method.id_scale if self.options.id_scale is None else self.options.id_scale

    def identity(self, photos: Sequence[ImageInput], face_index: int | None = None):
        """The identity tensor of ``photos`` (one person), as this method takes it: (512,), or
        (n, 512) one row per photo for FaceID-Portrait; None for InfiniteYou, whose pipeline reads
        the photos with its own recognizer (they are checked for a face here)."""
        index = self.options.face_index if face_index is None else face_index
        if self.method.own_recognizer:  # the photos are checked now; the pipeline's recognizer reads them
            self.analyzer.faces(photos, index)
            return None
        if self.method.per_photo:
            if not self.method.raw_id_embeds:  # FaceID-Portrait (PhotoMaker takes any number, raw)

                check_portrait_faces(len(photos))
            return torch.from_numpy(self.analyzer.embeddings(photos, index, raw=self.method.raw_id_embeds))
        return torch.from_numpy(self.analyzer.identity(photos, index, raw=self.method.raw_id_embeds))

    def people(self, photos: Sequence[ImageInput], face_index: int | Sequence[int] | None = None):
        """The identities of several people, one photo each, one row per person: (people, 512), or
        (people, 1, 512) for FaceID-Portrait; ``face_index`` is one index, or one per person."""
        indices = self._person_indices(photos, face_index)
        return torch.stack([self.identity([photo], i) for photo, i in zip(photos, indices)])

    def _person_indices(self, photos: Sequence[ImageInput], face_index: int | Sequence[int] | None) -> list[int]:
        index = self.options.face_index if face_index is None else face_index
        return list(index) if isinstance(index, (list, tuple)) else [cast(int, index)] * len(photos)

    @property
    def pulid_settings(self) -> tuple[int, str]:
        """PuLID's num_zero and ortho as run: the options', else its demo's defaults."""
        return pulid_settings(cast(str, self.method.checkpoint_format), self.options.num_zero, self.options.ortho)

    def call_kwargs(self, prompt: str | None) -> dict[str, Any]:
        """Pipeline call arguments shared by generate, eval and the demo."""
        call: dict[str, Any] = dict(num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.options.height,
                    width=self.options.width)
        if self.options.timesteps:
            call.update(timesteps=list(self.options.timesteps))
        if self.method.prompt_identity:
            call.update(prompt=prompt, trigger_word=self.options.trigger_word, start_merge_step=self.start_merge_step)
        elif self.method.uses_prompt:
            call.update(prompt=prompt, id_scale=self.id_scale, id_guidance_start=self.options.id_start,
                        id_guidance_end=self.options.id_end)
        if self.method.pulid_attention:
            call.update(zip(("num_zero", "ortho"), self.pulid_settings))
        if self.method.family == "flux":
            call.update(id_start_step=self.options.id_start_step, true_cfg_scale=self.options.true_cfg_scale)
        return call

    @staticmethod
    def prompt_warning(pipe, prompt: str | None) -> str | None:
        """What a prompt longer than the text encoder reads loses (diffusers cuts it without a word):
        the count of tokens past the limit, or None when it fits."""
        flux = getattr(pipe, "tokenizer_2", None) is not None and getattr(pipe, "transformer", None) is not None
        tokenizer, limit = (pipe.tokenizer_2, 512) if flux else (getattr(pipe, "tokenizer", None), None)
        if not prompt or tokenizer is None:
            return None
        limit = limit or tokenizer.model_max_length
        count = len(tokenizer(prompt).input_ids)
        if count <= limit:
            return None
        return (f"the prompt has {count} tokens and the text encoder reads {limit}: the last {count - limit} are "
                "left out; shorten it")

    def generators(self, seed: int, count: int) -> list:
        """One CPU generator per image, seeded ``seed + i``: image i is reproduced alone with seed + i."""
        return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(count)]

    def image_metadata(self, pipe, seed: int, **settings: Any) -> dict[str, str]:
        """PNG metadata of one image: its seed, the session's settings, the call's ``settings`` that
        acted (they override the session's; None ones are left out), and the pipeline's (scheduler,
        dtype, device)."""
        meta = {"seed": str(seed), **self.metadata()}
        meta.update({key: str(value) for key, value in settings.items() if value is not None})
        scheduler = type(pipe.scheduler).__name__ + (f" ({self.options.scheduler})" if self.options.scheduler else "")
        denoiser = pipe.transformer if self.method.family == "flux" else pipe.unet
        meta.update(scheduler=scheduler, dtype=str(denoiser.dtype).removeprefix("torch."),
                    device=str(pipe._execution_device), tier=str(self.loaded_tier or tiers.Tier()))
        if getattr(pipe, "_id_lora", None) is not None:  # FaceID's LoRA: fused into plain weights, else run by peft
            meta["id_lora"] = "fused" if pipe._fused_id_lora is not None else "unfused (peft)"
        return meta

    def save(self, image, path: str, pipe, seed: int, **settings: Any):
        """Write ``image`` to ``path`` as PNG, atomically, with ``image_metadata`` as text and (unless
        the options turn it off) idgen's invisible watermark carrying that metadata's hash; return
        the image as written."""
        meta = self.image_metadata(pipe, seed, **settings)
        if self.options.watermark:
            image = watermark.embed(image, meta)
            meta["watermark"] = f"idgen {watermark.settings_hash(meta)}"
        else:
            meta["watermark"] = "off"
        sign = None if self.signer is None else partial(self.signer.sign, metadata=meta, title=os.path.basename(path))
        save_png(image, path, meta, sign)
        return image

    def metadata(self) -> dict[str, str]:
        """What made the images, for their PNG metadata and reports."""
        meta = {
            "steps": str(self.steps),
            "guidance": str(self.guidance),
            **({"id_scale": str(self.id_scale), "id_window": f"{self.options.id_start}-{self.options.id_end}"}
               if self.method.uses_prompt and not self.method.prompt_identity else {}),  # Arc2Face has neither
            **({"trigger_word": self.options.trigger_word, "start_merge_step": str(self.start_merge_step)}
               if self.method.prompt_identity else {}),
            **(dict(zip(("num_zero", "ortho"), map(str, self.pulid_settings))) if self.method.pulid_attention else {}),
            **({"id_start_step": str(self.options.id_start_step), "true_cfg_scale": str(self.options.true_cfg_scale)}
               if self.method.family == "flux" else {}),
            "method": self.method.name,
            "base_model": self.options.base,
            "adapter": self.adapter + (f" ({self.weight_name})" if self.weight_name else ""),
            **({"identitynet": self.identitynet} if self.identitynet else {}),
            **({"loras": ", ".join(map(str, self.loras))} if self.loras else {}),
            **({"timesteps": ",".join(map(str, self.options.timesteps))} if self.options.timesteps else {}),
            "face_model": (f"facexlib IR-SE50 ({self.options.face_recognizer or 'its release'})"
                           if self.method.own_recognizer else self.analyzer.info["recognizer"])
            + f" via {self.analyzer.info['detector']}",
            "idgen_version": __version__,
        }
        if self.random_parts:
            meta["random_weights"] = (
                "random weights in: " + ", ".join(self.random_parts) + " (offline preset; images carry no likeness)"
            )
        return meta


def start_session(options: SessionOptions | None = None, **overrides: Any) -> Session:
    """Resolve the models and check the adapter file and face models, before any base model loads,
    so that a wrong path or checkpoint fails in seconds."""
    options = dataclasses.replace(options or SessionOptions(), **overrides)
    check_id_window(options.id_start, options.id_end)
    loras = [parse_lora(text) for text in ([options.lora] if isinstance(options.lora, str) else options.lora or [])]
    if options.scheduler:
        scheduler_spec(options.scheduler)
    if options.timesteps:
        check_timesteps(options.timesteps, options.steps)
    device_and_dtype(options.device, options.dtype)  # a wrong device fails now, not after loading
    signer = None
    if options.c2pa_cert or options.c2pa_key:
        if not (options.c2pa_cert and options.c2pa_key):
            raise IDGenError("Content Credentials need both --c2pa-cert (certificate chain) and --c2pa-key (its key)")
        signer = Signer(options.c2pa_cert, options.c2pa_key)
    base, adapter, face_model, random_parts = options.base, options.adapter, options.face_model, []
    if base in TINY_PRESETS:
        preset = get_preset(base)
        random_parts = ["base"]
        if adapter is None:
            adapter = preset.adapter
            random_parts.append("adapter")
        elif METHODS["arc2face"].recognises(adapter, options.weight_name):
            raise IDGenError(f"{adapter} needs a real SD1.5 base for its tokenizer, VAE and scheduler: "
                             "add --base stable-diffusion-v1-5/stable-diffusion-v1-5")
        base, face_model = preset.base, face_model or preset.face_pack
        if preset.image_encoder and options.adapter is None:  # the preset's own PuLID encoders, random too
            options = dataclasses.replace(options, image_encoder=options.image_encoder or preset.image_encoder,
                                          face_parser=options.face_parser or preset.face_parser)
            random_parts += ["image encoder", "face parser"]
        if preset.face_recognizer and options.adapter is None:  # InfiniteYou's IR-SE ArcFace, random too
            options = dataclasses.replace(options, face_recognizer=options.face_recognizer or preset.face_recognizer)
            random_parts.append("InfiniteYou's face recognizer")
    method, adapter, weight_name = resolve_method(base, adapter, options.weight_name)
    adapter_file = adapter_state = None
    if method.family != "arc2face":
        adapter_file = resolve_checkpoint_file(adapter, weight_name, options.subfolder)

        def photomaker() -> str:
            photomaker_state_dicts(adapter_file)  # the layout checked as PhotoMaker's
            if method.family != "sdxl":
                raise IDGenError(f"{adapter_file} is PhotoMaker V2, made for SDXL, but {options.base} is not SDXL: pass "
                                 "an SDXL --base (offline: tiny-sdxl)")
            return "photomaker"

        if method.checkpoint_format == "photomaker":
            found = photomaker()
        elif method.family == "flux":
            raw = read_checkpoint(adapter_file)
            found = _flux_format(raw, adapter_file)
            adapter_state = raw if found == "pulid_flux" else None  # InfiniteYou loads from its folder: InfuseNet is there
        else:
            try:
                adapter_state = load_adapter_state_dict(adapter_file)
                found = detect_format(adapter_state, adapter_file).format
            except PhotoMakerCheckpointError:  # a PhotoMaker file under another name: its keys decide
                found, adapter_state = photomaker(), None
        if found != method.checkpoint_format:  # a trained or renamed checkpoint: its keys decide
            method = method_of(found, method.family) or method
    identitynet = _identitynet(method, adapter, options.identitynet)
    _check_method_options(method, options, adapter)
    tiers.check_tier(tiers.requested_tier(options), method.family, method.checkpoint_format,
                     torch.device(device_and_dtype(options.device, options.dtype)[0]).type)
    analyzer = FaceAnalyzer(face_pack(face_model or method.face_pack), detector=options.detector,
                            max_pixels=options.max_pixels)
    if analyzer.recognizer_random:
        random_parts.append("face recognizer")
    steps, guidance = _steps_and_guidance(method, options)
    return Session(options, method, base, adapter, weight_name, analyzer, adapter_file, steps, guidance, identitynet,
                   random_parts, signer, loras, adapter_state)


def _steps_and_guidance(method: Method, options: SessionOptions) -> tuple[int, float]:
    """The steps (as many as the timesteps, when given) and guidance: the options', else the method's."""
    steps = len(options.timesteps) if options.timesteps else options.steps or method.steps
    return steps, method.guidance if options.guidance is None else options.guidance


def _check_method_options(method: Method, options: SessionOptions, adapter: str) -> None:
    """Each method-specific option is refused in one line on the methods that run without it."""
    if options.image_encoder and not (method.face_clip or method.face_eva):
        raise IDGenError(f"--image-encoder is FaceID-Plus's and PuLID's; the {method.name} adapter {adapter} runs "
                         "without it: leave it out")
    if options.face_parser is not None and not method.face_eva:
        raise IDGenError(f"--face-parser is PuLID's; the {method.name} adapter {adapter} runs without it: leave it out")
    for flag, value in (("--num-zero", options.num_zero), ("--ortho", options.ortho)):
        if value is not None and not method.pulid_attention:
            raise IDGenError(f"{flag} is PuLID's on SDXL; the {method.name} adapter {adapter} runs without it: leave it out")
    for flag, given, owner in (("--infusenet", options.infusenet is not None, "infiniteyou"),
                               ("--face-recognizer", options.face_recognizer is not None, "infiniteyou"),
                               ("--id-start-step", options.id_start_step != 0, "flux"),
                               ("--true-cfg-scale", options.true_cfg_scale != 1.0, "flux")):
        if given and owner not in (method.family, method.checkpoint_format):
            raise IDGenError(f"{flag} is {'InfiniteYou' if owner == 'infiniteyou' else 'FLUX'}'s; the {method.name} "
                             f"adapter {adapter} runs without it: leave it out")
    if method.pulid_attention:  # a bad --num-zero fails now, not after the base model loads
        try:
            pulid_settings(cast(str, method.checkpoint_format), options.num_zero, options.ortho)
        except ValueError as err:
            raise IDGenError(str(err)) from None


def _flux_format(raw: dict, adapter_file: str) -> str:
    """"pulid_flux" or "infiniteyou", from the checkpoint's keys; an SD adapter on a FLUX base fails here."""
    if is_pulid_flux(raw):
        return "pulid_flux"
    if is_infiniteyou(raw):
        return "infiniteyou"
    raise IDGenError(f"{adapter_file} is not a FLUX identity adapter: a FLUX base runs PuLID-FLUX "
                     "(pulid_flux_v0.9.1.safetensors) and InfiniteYou (ByteDance/InfiniteYou); SD1.5 and SDXL adapters "
                     "need their own --base")


def _identitynet(method: Method, adapter: str, identitynet: str | None) -> str | None:
    """Where InstantID's IdentityNet loads from: ``--identitynet``, else the adapter's own repo or
    folder (``ControlNetModel/``); None for methods without one, or ``--identitynet none``."""
    if identitynet == "none":
        return None
    if not method.identitynet:
        if identitynet is not None:
            raise IDGenError(f"--identitynet is InstantID's; the {method.name} adapter {adapter} runs without it: "
                             "leave it out")
        return None
    if identitynet is not None:
        return identitynet
    for folder in (adapter, os.path.dirname(adapter) if os.path.isfile(adapter) else None):
        if folder is not None and is_instantid(folder, None):
            return folder
    raise IDGenError(
        f"{adapter} is an InstantID adapter with no IdentityNet beside it (no ControlNetModel/ folder): pass "
        "--identitynet with InstantID's (InstantX/InstantID, or a folder holding ControlNetModel/), or "
        "--identitynet none to run the adapter alone"
    )
