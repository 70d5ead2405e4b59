"""Identity generation speed against what it replaces, whole pipelines, side by side.

    python bench/gpu.py                                  # GPU: full-size SD1.5 512 px and SDXL 1024 px, fp16
    python bench/gpu.py --instantid-repo ~/src/InstantID # adds the original InstantID pipeline
    python bench/gpu.py --size small                     # a smaller stand-in (the default with no GPU)
    python bench/gpu.py --only flux                      # FLUX.1: plain, PuLID-FLUX, InfiniteYou, bf16 1024 px

Every model is built from its published config with random weights, directly on the device
(nothing is downloaded); every pipeline of a table after the first gets its own copy of the same
UNet (and ControlNet) weights.
The cases of a table run interleaved (one call of each per round, the first round warms up and
compiles), CUDA-synchronised, and the median is reported with the peak memory a call adds above
the resident weights and the largest pixel difference to the anchors (images in [0, 1]).

SD1.5 (FaceID with its rank-128 LoRA): plain diffusers, diffusers' own FaceID path
(``load_ip_adapter``), idgen eager, compiled, and 4 steps (LCM scheduler with a random rank-64
LoRA, guidance 1). SDXL (InstantID with its IdentityNet): diffusers' ControlNet pipeline,
the original InstantID pipeline as its README runs it (``--instantid-repo``: a local copy of
github.com/InstantID/InstantID), idgen eager, compiled, and 4 steps (DMD2's recipe: LCM scheduler,
timesteps 999,749,499,249, guidance 0, a random rank-64 LoRA).
FLUX.1-dev (bf16 on a GPU, 1024 px, 28 steps, guidance 3.5): plain diffusers ``FluxPipeline``, idgen
PuLID-FLUX (its IDFormer, 20 cross-attention blocks, EVA02-CLIP-L and the face parser), idgen
InfiniteYou (its resampler and an InfuseNet of 4 double and 10 single blocks), then each method
again alone with ``enable_model_cpu_offload()`` (GPU only), whose peak is what the GPU holds at most.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.models.controlnets import multicontrolnet
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from idgen import FaceAnalyzer, IDFluxPipeline, IDStableDiffusionPipeline, IDStableDiffusionXLPipeline
from idgen.adapters import InstantIDResampler
from idgen.adapters.eva_clip import EVAVisionTower
from idgen.adapters.face_parsing import BiSeNet
from idgen.adapters.lora import peft_lora_state_dict
from idgen.apps.loras import LoRASpec, load_loras
from idgen.apps.options import SessionOptions
from idgen.apps.schedulers import make_scheduler
from idgen.apps.tiers import compile_models
from idgen.testing.presets import (
    get_preset,
    random_faceid_state_dict,
    random_instantid_state_dict,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)
from idgen.train.flux import init_pulid_flux_adapter

SCALES = {
    # SD1.5 width divisor, SDXL width divisor, SD1.5 px, SDXL px, steps, image counts for SD1.5
    "full": (1, 1, 512, 1024, 30, (1, 4)),
    "small": (2, 4, 256, 256, 8, (1,)),  # fits a 24 GiB CPU machine with five SDXL pipelines
}
PROMPT = "a photo of a person, portrait, detailed"
LCM_TIMESTEPS = [999, 749, 499, 249]


@dataclasses.dataclass
class Case:
    name: str
    run: Callable[[], np.ndarray]  # one call, returns the images
    anchors: tuple[str, ...] = ()  # cases whose images this one should reproduce


# ------------------------------------------------------------------------------ models
def text_encoder(hidden: int, layers: int, heads: int, projection: int | None = None):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def vae(div: int, sample_size: int, scaling_factor: float):
    return AutoencoderKL(block_out_channels=tuple(c // div for c in (128, 256, 512, 512)),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, layers_per_block=2, sample_size=sample_size, scaling_factor=scaling_factor)


def sd15_parts(div: int) -> dict:
    """SD1.5's UNet, VAE and text encoder (``div``: channel widths divided, for the stand-in)."""
    cross = 768 // div
    return dict(
        unet=UNet2DConditionModel(block_out_channels=tuple(c // div for c in (320, 640, 1280, 1280)),
                                  cross_attention_dim=cross, attention_head_dim=8, sample_size=64),
        vae=vae(div, 512, 0.18215), text_encoder=text_encoder(cross, 12, 12), tokenizer=tiny_clip_tokenizer(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
    )


def sdxl_parts(div: int) -> dict:
    """SDXL's UNet, VAE, two text encoders and an IdentityNet (a ControlNet of the UNet's shape)."""
    one, two = 768 // div, 1280 // div
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=tuple(c // div for c in (320, 640, 1280)), layers_per_block=2,
        norm_num_groups=32 // max(1, div // 2),  # 80 channels at div 4: 16 groups
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=two + 6 * 256, cross_attention_dim=one + two,
    )
    return dict(
        unet=unet, controlnet=ControlNetModel.from_unet(unet), vae=vae(div, 1024, 0.13025),
        text_encoder=text_encoder(one, 12, 12), text_encoder_2=text_encoder(two, 32, 20, projection=two),
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )


def build(parts_fn: Callable[[int], dict], div: int, device: str, dtype: torch.dtype) -> dict:
    with torch.device(device):  # random init on the device itself
        torch.manual_seed(0)
        parts = parts_fn(div)
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device, dtype).eval().requires_grad_(False)
    return parts


def own_copy(parts: dict, *names: str) -> dict:
    """``parts`` with fresh copies of the models ``names`` (the ones a pipeline changes)."""
    return {key: copy.deepcopy(value) if key in names else value for key, value in parts.items()}


def random_lora(unet, path: str, rank: int = 64) -> str:
    """A random LoRA on every attention projection, in diffusers' file format."""
    generator = torch.Generator().manual_seed(1)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            layers[name] = (torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5,
                            torch.randn(module.out_features, rank, generator=generator) * 0.1 / rank**0.5)
    save_file({k: v.contiguous() for k, v in peft_lora_state_dict(layers).items()}, path)
    return path


# ------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(cases: list[Case], repeats: int, device: str) -> dict[str, dict]:
    """Interleaved rounds; per case the median seconds per call, the peak memory above what was
    allocated before the call (CUDA), and its images from the last round."""
    seconds = {case.name: [] for case in cases}
    peaks, images = {}, {}
    for round_ in range(repeats + 1):  # round 0 warms up (and compiles)
        for case in cases:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            sync(device)
            start = time.perf_counter()
            images[case.name] = case.run()
            sync(device)
            if round_:
                seconds[case.name].append(time.perf_counter() - start)
            if device.startswith("cuda"):
                peaks[case.name] = ((torch.cuda.max_memory_allocated() - before) / 2**30,
                                    torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
            print(f"  round {round_}: {case.name} {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return {case.name: {"seconds": statistics.median(seconds[case.name]), "images": images[case.name],
                        **dict(zip(("peak_GiB", "allocated_GiB", "reserved_GiB"), peaks.get(case.name, (None,) * 3)))}
            for case in cases}


def table(title: str, cases: list[Case], results: dict, baseline: str, count: int, note: str) -> str:
    """A markdown table: time per image, peak memory, time against the baseline, and against each
    anchor its speed-up (anchor time / case time) and the largest pixel difference."""
    lines = [f"### {title}", "", note, "", f"| case | s / image | peak GiB above weights | time vs {baseline} | "
             "vs anchor: speed-up, max pixel diff |", "|---|---|---|---|---|"]
    base = results[baseline]["seconds"]
    for case in cases:
        result = results[case.name]
        versus = "; ".join(f"{results[a]['seconds'] / result['seconds']:.2f}x, "
                           f"{float(np.abs(result['images'] - results[a]['images']).max()):.1e} ({a})"
                           for a in case.anchors if a in results) or "-"
        peak = f"{result['peak_GiB']:.2f}" if result["peak_GiB"] is not None else "n/a (CPU)"
        lines.append(f"| {case.name} | {result['seconds'] / count:.3f} | {peak} | {result['seconds'] / base:.3f}x | "
                     f"{versus} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ SD1.5 FaceID
def sd15_cases(parts: dict, size: int, steps: int, count: int, device: str, dtype: torch.dtype, folder: str,
               compile_: bool, few_step: bool = True, methods: bool = True) -> list[Case]:
    """Plain diffusers, diffusers' FaceID path and idgen's, then (``compile_``) compiled, (``few_step``)
    the 4-step recipe, and (``methods``) what several people and the fusions cost over one identity."""
    checkpoint = random_faceid_state_dict(parts["unet"], lora_rank=128)  # the official shapes
    embeds = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)), dim=0)
    common = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, num_images_per_prompt=count,
                  output_type="np")
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def call(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**common, **kwargs}).images

    plain = StableDiffusionPipeline(**parts, **extra)
    anchor = StableDiffusionPipeline(**own_copy(parts, "unet"), **extra)
    anchor.load_ip_adapter(checkpoint, subfolder="", weight_name="", image_encoder_folder=None)
    anchor_embeds = [torch.stack([torch.zeros(512), embeds])[:, None].to(device, dtype)]

    def idgen_pipe():
        pipe = IDStableDiffusionPipeline(**own_copy(parts, "unet"), **extra)
        pipe.load_identity_adapter(checkpoint)
        return pipe

    ours = idgen_pipe()
    cases = [Case("plain diffusers (no identity)", call(plain)),
             Case("diffusers FaceID (load_ip_adapter)", call(anchor, ip_adapter_image_embeds=anchor_embeds)),
             Case("idgen FaceID", call(ours, id_embeds=embeds), ("diffusers FaceID (load_ip_adapter)",))]
    if compile_:
        compiled = idgen_pipe()
        compile_models(compiled)
        cases.append(Case("idgen FaceID, compiled", call(compiled, id_embeds=embeds),
                          ("idgen FaceID", "diffusers FaceID (load_ip_adapter)")))
    if methods:
        halves = [(0, 0, size // 2, size), (size // 2, 0, size, size)]
        cases += [Case("idgen FaceID, two people (regions=)",
                       call(ours, id_embeds=torch.stack([embeds, embeds.roll(1)]), regions=halves)),
                  Case("idgen FaceID, id_fusion='adain'", call(ours, id_embeds=embeds, id_fusion="adain")),
                  Case("idgen FaceID, id_fusion='freecure'",
                       call(ours, id_embeds=embeds, id_fusion="freecure", recover_words=["portrait"]))]
    if few_step:
        fast = idgen_pipe()
        fast.scheduler = make_scheduler("lcm", fast.scheduler.config)
        load_loras(fast, [LoRASpec(folder, os.path.basename(random_lora(fast.unet, os.path.join(folder, "lcm.safetensors"))))])
        cases.append(Case("idgen FaceID, 4 steps (LCM-LoRA recipe)",
                          call(fast, id_embeds=embeds, num_inference_steps=4, guidance_scale=1.0)))
    return cases


# ------------------------------------------------------------------------------ SDXL InstantID
def original_instantid(repo: str):
    """The original pipeline class, imported from a local copy of its repository (written for
    diffusers 0.25: the module it takes MultiControlNetModel from has moved since)."""
    sys.modules.setdefault("diffusers.pipelines.controlnet.multicontrolnet", multicontrolnet)
    sys.path.insert(0, os.path.abspath(os.path.expanduser(repo)))
    return importlib.import_module("pipeline_stable_diffusion_xl_instantid").StableDiffusionXLInstantIDPipeline


def sdxl_cases(parts: dict, size: int, steps: int, device: str, dtype: torch.dtype, folder: str, compile_: bool,
               instantid_repo: str | None) -> list[Case]:
    # The official resampler: 1280 wide, 20 heads, 4 layers, 16 tokens.
    checkpoint = random_instantid_state_dict(parts["unet"], dim=1280, depth=4, num_queries=16)
    embeds = torch.randn(512, generator=torch.Generator().manual_seed(0))  # raw, as InstantID takes it
    embeds = embeds / embeds.norm() * 22
    kps = np.array([[0.38, 0.42], [0.62, 0.42], [0.5, 0.55], [0.41, 0.68], [0.59, 0.68]]) * size
    common = dict(negative_prompt="blurry", height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
                  controlnet_conditioning_scale=0.8, output_type="np")

    def call(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**common, **kwargs}).images

    def idgen_pipe():
        pipe = IDStableDiffusionXLPipeline(**own_copy(parts, "unet", "controlnet"), add_watermarker=False)
        pipe.load_identity_adapter(checkpoint)
        return pipe

    ours, compiled, fast = idgen_pipe(), idgen_pipe(), idgen_pipe()
    kps_image = ours.kps_condition(kps, None, size, size)
    plain = StableDiffusionXLControlNetPipeline(**parts, add_watermarker=False)
    cases = [Case("diffusers SDXL + ControlNet (no identity)", call(plain, image=kps_image))]
    anchors: tuple[str, ...] = ()
    if instantid_repo:
        path = os.path.join(folder, "ip-adapter.bin")
        torch.save(checkpoint, path)
        original = original_instantid(instantid_repo)(**own_copy(parts, "unet", "controlnet"), add_watermarker=False)
        original.load_ip_adapter_instantid(path)
        original.to(device, dtype)
        anchors = ("original InstantID pipeline",)
        cases.append(Case(anchors[0], call(original, image_embeds=embeds.numpy(), image=kps_image, ip_adapter_scale=0.8)))
    else:
        print("original InstantID pipeline: skipped (pass --instantid-repo with a local copy of "
              "github.com/InstantID/InstantID)", file=sys.stderr)
    identity = dict(id_embeds=embeds, face_kps=kps, id_scale=0.8)
    cases.append(Case("idgen InstantID", call(ours, **identity), anchors))
    if compile_:
        compile_models(compiled)
        cases.append(Case("idgen InstantID, compiled", call(compiled, **identity), anchors + ("idgen InstantID",)))
    fast.scheduler = make_scheduler("lcm", fast.scheduler.config)
    load_loras(fast, [LoRASpec(folder, os.path.basename(random_lora(fast.unet, os.path.join(folder, "dmd2.safetensors"))))])
    cases.append(Case("idgen InstantID, 4 steps (DMD2 recipe)",
                      call(fast, **identity, timesteps=LCM_TIMESTEPS, num_inference_steps=4, guidance_scale=0.0)))
    return cases


# ------------------------------------------------------------------------------ FLUX.1
def flux_parts(div: int) -> dict:
    """FLUX.1-dev's transformer, VAE, CLIP-L and T5-XXL text encoders (``div``: heads and widths
    divided, for the stand-in; the block counts are the published ones)."""
    return dict(
        transformer=FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                           num_attention_heads=24 // div, joint_attention_dim=4096 // div,
                                           pooled_projection_dim=768 // div, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        vae=AutoencoderKL(block_out_channels=tuple(c // div for c in (128, 256, 512, 512)), latent_channels=16,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          layers_per_block=2, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                          shift_factor=0.1159, scaling_factor=0.3611, norm_num_groups=32 // div),
        text_encoder=text_encoder(768 // div, 12, 12 // div), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=32128, d_model=4096 // div, d_kv=64, d_ff=10240 // div,
                                               num_layers=24, num_heads=64 // div, feed_forward_proj="gated-gelu",
                                               dropout_rate=0.0)),
        tokenizer_2=tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
    )


def flux_cases(parts: dict, size: int, steps: int, device: str, dtype: torch.dtype, div: int, offload: bool) -> list[Case]:
    """Plain FLUX, PuLID-FLUX and InfiniteYou at the official adapter shapes (random weights), the
    identity read from a real photo; with ``offload``, each method again in its own pipeline under
    ``enable_model_cpu_offload()``."""
    photo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "idgen", "assets", "astronaut.jpg")
    analyzer = FaceAnalyzer(get_preset("tiny").face_pack)  # detection and keypoints are real; the vector is random
    transformer = parts["transformer"]
    with torch.device(device):
        torch.manual_seed(1)
        eva = EVAVisionTower(width=1024 // div, head_width=64, embed_dim=768 // div)
        parser = BiSeNet()
        pulid = init_pulid_flux_adapter(transformer, eva, dim=1024 // div, depth=10, num_queries=32)
        for block in pulid.pulid_ca:  # a trained adapter's outputs are not zero
            torch.nn.init.normal_(block.to_out.weight, std=block.to_out.in_features**-0.5)
        config = transformer.config
        projection = InstantIDResampler(dim=1280 // div, depth=4, heads=20 // div, num_queries=8,
                                        output_dim=config.joint_attention_dim)
        infusenet = FluxControlNetModel(in_channels=64, num_layers=4, num_single_layers=10, attention_head_dim=128,
                                        num_attention_heads=config.num_attention_heads,
                                        joint_attention_dim=config.joint_attention_dim,
                                        pooled_projection_dim=config.pooled_projection_dim, guidance_embeds=True,
                                        axes_dims_rope=(16, 56, 56))
    common = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=128,
                  output_type="np")

    def method(pipe_parts: dict, kind: str, cpu_offload: bool = False) -> IDFluxPipeline:
        pipe = IDFluxPipeline(**pipe_parts)
        if kind == "pulid":
            pipe.load_identity_adapter(pulid.state_dict(), image_encoder=eva, face_parser=parser)
        else:
            pipe.load_identity_adapter({"image_proj": dict(projection.state_dict())}, weight_name="image_proj_model.bin",
                                       infusenet=infusenet)
        pipe.set_face_analyzer(analyzer)
        if cpu_offload:
            pipe.enable_model_cpu_offload()
        return pipe

    def call(pipe, **kwargs):
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **common, **kwargs).images

    cases = [Case("diffusers FluxPipeline (no identity)", call(FluxPipeline(**parts))),
             Case("idgen PuLID-FLUX", call(method(parts, "pulid"), face_image=photo)),
             Case("idgen InfiniteYou", call(method(parts, "infiniteyou"), face_image=photo))]
    if offload:  # each on its own CPU copy: offload moves the models it manages
        for kind, name in (("pulid", "PuLID-FLUX"), ("infiniteyou", "InfiniteYou")):
            on_cpu = {k: copy.deepcopy(v).to("cpu") if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
            cases.append(Case(f"idgen {name}, model CPU offload", call(method(on_cpu, kind, cpu_offload=True),
                                                                        face_image=photo)))
    return cases



# ------------------------------------------------------------------------------ FLUX memory and speed tiers
#: (name, tier flags, GPU only): each run by plain FluxPipeline, PuLID-FLUX and InfiniteYou.
TIERS = [
    ("bf16 eager", {}, False),
    ("model offload", {"offload": "model"}, False),
    ("group offload", {"offload": "group"}, False),
    ("int8", {"quantize": "int8"}, False),
    ("int8 + model offload", {"quantize": "int8", "offload": "model"}, False),
    ("fp8 storage + model offload", {"quantize": "fp8", "offload": "model"}, False),
    ("nf4 + model offload", {"quantize": "nf4", "offload": "model"}, True),
    ("nf4 + group offload", {"quantize": "nf4", "offload": "group"}, True),
    ("first-block cache", {"cache": "fbc"}, False),
    ("TaylorSeer cache", {"cache": "taylorseer"}, False),
    ("regional compile", {"compile": "regional"}, True),
    ("fast: first-block cache + regional compile", {"cache": "fbc", "compile": "regional"}, True),
]


def write_flux_folders(parts: dict, folder: str, div: int) -> dict[str, str]:
    """The FLUX base, a PuLID-FLUX file (with its EVA tower and face parser) and an InfiniteYou
    folder (projection, InfuseNet, IR-SE50), random at the official shapes, written in their
    published layouts so that every tier loads them as users do (``start_session``)."""
    from idgen.adapters.face_recognition import IRSEArcFace
    from idgen.adapters.flux import INFINITEYOU_WEIGHT_NAME, INFUSENET_FOLDER
    from idgen.testing.presets import FACE_PARSER_FILE, IRSE_FILE, PULID_FLUX_FILE

    paths = {name: os.path.join(folder, name) for name in ("base", "pulid-flux", "eva", "infiniteyou")}
    FluxPipeline(**parts).save_pretrained(paths["base"])
    torch.manual_seed(1)
    eva = EVAVisionTower(width=1024 // div, head_width=64, embed_dim=768 // div)
    pulid = init_pulid_flux_adapter(parts["transformer"].cpu(), eva, dim=1024 // div, depth=10, num_queries=32)
    for block in pulid.pulid_ca:  # a trained adapter's outputs are not zero
        torch.nn.init.normal_(block.to_out.weight, std=block.to_out.in_features**-0.5)
    eva.save_pretrained(paths["eva"])
    os.makedirs(paths["pulid-flux"])
    save_file({k: v.contiguous() for k, v in pulid.state_dict().items()}, os.path.join(paths["pulid-flux"], PULID_FLUX_FILE))
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in BiSeNet().state_dict().items()},
               os.path.join(folder, FACE_PARSER_FILE))
    config = parts["transformer"].config
    projection = InstantIDResampler(dim=1280 // div, depth=4, heads=20 // div, num_queries=8,
                                    output_dim=config.joint_attention_dim)
    FluxControlNetModel(in_channels=64, num_layers=4, num_single_layers=10, attention_head_dim=128,
                        num_attention_heads=config.num_attention_heads, joint_attention_dim=config.joint_attention_dim,
                        pooled_projection_dim=config.pooled_projection_dim, guidance_embeds=True,
                        axes_dims_rope=(16, 56, 56)).save_pretrained(os.path.join(paths["infiniteyou"], INFUSENET_FOLDER))
    torch.save({"image_proj": dict(projection.state_dict())}, os.path.join(paths["infiniteyou"], INFINITEYOU_WEIGHT_NAME))
    torch.save(IRSEArcFace().state_dict(), os.path.join(paths["infiniteyou"], IRSE_FILE))
    paths.update(pulid_file=os.path.join(paths["pulid-flux"], PULID_FLUX_FILE), parser=os.path.join(folder, FACE_PARSER_FILE),
                 irse=os.path.join(paths["infiniteyou"], IRSE_FILE))
    return paths


def tier_rows(paths: dict[str, str], size: int, steps: int, device: str, dtype: torch.dtype, repeats: int) -> str:
    """For each tier that runs here: plain ``FluxPipeline``, PuLID-FLUX and InfiniteYou, loaded as
    the CLI loads them and timed one pipeline in memory at a time (a tier's three rows one after
    another); peak GiB is all the GPU held during the call (weights included), and the latent
    difference is to the same method's bf16 eager latents."""
    from idgen.apps import tiers
    from idgen.apps.session import start_session
    from idgen.errors import IDGenError

    photo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "idgen", "assets", "astronaut.jpg")
    common = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=128,
                  output_type="latent")
    methods = {"pulid-flux": dict(adapter=paths["pulid_file"], image_encoder=paths["eva"], face_parser=paths["parser"]),
               "infiniteyou": dict(adapter=paths["infiniteyou"], face_recognizer=paths["irse"])}
    cuda = device.startswith("cuda")
    lines = ["| tier | pipeline | s / image | peak GiB allocated / reserved | time vs plain FLUX at the tier | "
             "max latent diff vs its bf16 eager |", "|---|---|---|---|---|---|"]
    anchors: dict[str, np.ndarray] = {}
    for name, flags, gpu_only in TIERS:
        if gpu_only and not cuda:
            print(f"{name}: skipped (needs a CUDA GPU)", file=sys.stderr)
            continue
        rows: dict[str, dict] = {}
        for method in ("plain", *methods):
            try:
                if method == "plain":
                    tier = tiers.requested_tier(SessionOptions(**flags))
                    family = "flux"
                    pipe = FluxPipeline.from_pretrained(paths["base"], dtype=dtype,
                                                        quantization_config=tiers.quantization_config(tier, family, dtype))
                    tiers.place(pipe, tier, device)
                    if tier.compile:
                        tiers.compile_models(pipe, regional=tier.compile == "regional")
                    call = dict(common)
                else:
                    session = start_session(base=paths["base"], face_model=get_preset("tiny").face_pack, device=device,
                                            dtype=str(dtype).removeprefix("torch."), watermark=False, **methods[method],
                                            **flags)
                    pipe = session.load()
                    call = dict(common, face_image=photo)
            except IDGenError as err:  # a tier this method refuses (InfiniteYou and a block cache)
                print(f"{name}, {method}: {err}", file=sys.stderr)
                continue
            pipe.set_progress_bar_config(disable=True)
            case = Case(method, lambda pipe=pipe, call=call: pipe(PROMPT, generator=torch.Generator().manual_seed(0),
                                                                  **call).images.float().cpu().numpy())
            rows[method] = measure([case], repeats, device)[method]
            del pipe, case
            if cuda:
                torch.cuda.empty_cache()
        for method, result in rows.items():
            anchors.setdefault(method, result["images"])
            peak = (f"{result['allocated_GiB']:.2f} / {result['reserved_GiB']:.2f}" if result["allocated_GiB"] is not None
                    else "n/a (CPU)")
            ratio = f"{result['seconds'] / rows['plain']['seconds']:.3f}x" if "plain" in rows else "-"
            difference = float(np.abs(result["images"] - anchors[method]).max())
            lines.append(f"| {name} | {method} | {result['seconds']:.3f} | {peak} | {ratio} | {difference:.1e} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", choices=SCALES, default="full" if cuda else "small",
                        help="full: the published configs at 512/1024 px; small: SD1.5 widths / 2, SDXL widths / 4, "
                        "256 px, 8 steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("sd15", "sdxl", "flux", "tiers"), nargs="*",
                        default=["sd15", "sdxl", "flux", "tiers"])
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the compiled cases")
    parser.add_argument("--instantid-repo", default=None, metavar="PATH",
                        help="a local copy of github.com/InstantID/InstantID, for the original pipeline")
    args = parser.parse_args()
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    sd15_div, sdxl_div, sd15_px, sdxl_px, steps, counts = SCALES[args.size]
    flux_div, flux_px, flux_steps = (1, 1024, 28) if args.size == "full" else (8, 128, 4)

    def stand_in(div: int, px: int) -> str:
        return "" if args.size == "full" else (
            f" -- SMALLER STAND-IN: channel widths / {div}, {px} px, {steps} steps, not the published sizes")

    machine = (f"{torch.cuda.get_device_name()}" if cuda else f"{platform.machine()} CPU, {os.cpu_count()} cores") + \
        f", torch {torch.__version__}, {str(dtype).removeprefix('torch.')}"
    print(f"# idgen speed, {time.strftime('%Y-%m-%d')}, {machine}\n")
    with tempfile.TemporaryDirectory() as folder:
        if "sd15" in args.only:
            parts = build(sd15_parts, sd15_div, device, dtype)
            for count in counts:
                cases = sd15_cases(parts, sd15_px, steps, count, device, dtype, folder, args.compile)
                results = measure(cases, args.repeats, device)
                print(table(f"SD1.5 {sd15_px} px, FaceID (rank-128 LoRA), {steps} steps, {count} image(s)"
                            f"{stand_in(sd15_div, sd15_px)}",
                            cases, results, cases[0].name, count,
                            f"median of {args.repeats} interleaved calls; 4-step row: 4 steps, guidance 1") + "\n")
                del cases, results
            del parts
        if "sdxl" in args.only:
            parts = build(sdxl_parts, sdxl_div, device, dtype)
            cases = sdxl_cases(parts, sdxl_px, steps, device, dtype, folder, args.compile, args.instantid_repo)
            results = measure(cases, args.repeats, device)
            print(table(f"SDXL {sdxl_px} px, InstantID + IdentityNet, {steps} steps, 1 image"
                        f"{stand_in(sdxl_div, sdxl_px)}", cases, results,
                        cases[0].name, 1, f"median of {args.repeats} interleaved calls; 4-step row: DMD2 timesteps, "
                        "guidance 0") + "\n")
            del parts, cases, results
        if "flux" in args.only:
            flux_dtype = torch.bfloat16 if cuda else torch.float32
            parts = build(flux_parts, flux_div, device, flux_dtype)
            weights = torch.cuda.memory_allocated() / 2**30 if cuda else None
            cases = flux_cases(parts, flux_px, flux_steps, device, flux_dtype, flux_div, offload=cuda)
            results = measure(cases, args.repeats, device)
            stand = "" if args.size == "full" else (f" -- SMALLER STAND-IN: heads and widths / {flux_div}, {flux_px} px, "
                                                    f"{flux_steps} steps, not the published sizes")
            resident = f"; all weights resident: {weights:.1f} GiB" if weights is not None else ""
            print(table(f"FLUX.1-dev {flux_px} px, {flux_steps} steps, guidance 3.5, 1 image, "
                        f"{str(flux_dtype).removeprefix('torch.')}{stand}", cases, results, cases[0].name, 1,
                        f"median of {args.repeats} interleaved calls{resident}; offload rows: their own models live on "
                        "the CPU, so their peak is all the GPU they need") + "\n")
            del parts, cases, results
        if "tiers" in args.only:
            flux_dtype = torch.bfloat16 if cuda else torch.float32
            parts = build(flux_parts, flux_div, "cpu", flux_dtype)  # written to disk, then loaded per tier
            paths = write_flux_folders(parts, folder, flux_div)
            del parts
            stand = "" if args.size == "full" else (f" -- SMALLER STAND-IN: heads and widths / {flux_div}, {flux_px} px, "
                                                    f"{flux_steps} steps, not the published sizes")
            print(f"### FLUX.1-dev memory and speed tiers, {flux_px} px, {flux_steps} steps, "
                  f"{str(flux_dtype).removeprefix('torch.')}{stand}\n\nmedian of {args.repeats} calls, one pipeline "
                  "in memory at a time\n")
            print(tier_rows(paths, flux_px, flux_steps, device, flux_dtype, args.repeats))


if __name__ == "__main__":
    main()
