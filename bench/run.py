"""idgen benchmarks: every number is a ratio measured side by side in this one run.

    python bench/run.py            # all four
    python bench/run.py --only 1 3 # some

1. identity adapter overhead: one SD1.5-sized UNet step with the identity adapter vs without;
2. idgen vs diffusers' own FaceID path, end to end on identical tiny weights (time, output);
3. face analysis throughput on real photos, per detector backend;
4. peak memory of one adapter training step vs one plain LoRA training step.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(fns: dict, repeats: int, setups: dict | None = None) -> dict[str, float]:
    """Median seconds of each function, run in turns so machine load hits all alike; ``setups[name]``
    runs untimed before each of its runs."""
    setups = setups or {}
    results = {name: [] for name in fns}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in fns.items():
            setups.get(name, lambda: None)()
            results[name] += timed(fn, 1)
    return {name: statistics.median(values[1:]) for name, values in results.items()}


def sd15_unet(cross_attention_dim: int = 768):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(cross_attention_dim=cross_attention_dim, attention_head_dim=8).eval()


# ------------------------------------------------------------------------------ 1
def bench_adapter_overhead(latent: int, repeats: int) -> dict:
    from idgen.adapters import build_identity_adapter, detect_format
    from idgen.presets import random_faceid_state_dict

    torch.manual_seed(0)
    unet = sd15_unet()
    state = random_faceid_state_dict(unet, lora_rank=4)
    adapter = build_identity_adapter(unet, state, detect_format(state))
    sample = torch.randn(2, 4, latent, latent)
    text = torch.randn(2, 77, 768)
    tokens = torch.randn(2, 4, 768)

    def step():  # the same UNet call; the setups below attach the identity or not
        with torch.no_grad():
            unet(sample, 500, encoder_hidden_states=text)

    def with_identity():
        adapter.attach(unet)
        with torch.no_grad():
            adapter.set_tokens(tokens)

    times = interleaved(
        {"without": step, "with identity adapter": step}, repeats,
        {"without": adapter.detach, "with identity adapter": with_identity},
    )
    overhead = times["with identity adapter"] / times["without"] - 1
    return {"config": f"SD1.5 UNet (random weights), batch 2 (CFG), latent {latent}x{latent}, 77 text + 4 identity "
                      f"tokens, median of {repeats}", "seconds": times, "overhead": overhead, "target": "<= 3%"}


# ------------------------------------------------------------------------------ 2
def bench_vs_diffusers(steps: int, repeats: int) -> dict:
    from diffusers import StableDiffusionPipeline

    from idgen import IDStableDiffusionPipeline
    from idgen.presets import get_preset

    preset = get_preset("tiny")
    ours = IDStableDiffusionPipeline.from_pretrained(preset.base)
    ours.load_identity_adapter(preset.adapter)
    reference = StableDiffusionPipeline.from_pretrained(preset.base)
    reference.load_ip_adapter(os.path.dirname(preset.adapter), subfolder="", weight_name=os.path.basename(preset.adapter),
                              image_encoder_folder=None)
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    emb = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)), dim=0)
    outputs = {}

    def run_ours():
        outputs["idgen"] = ours("a photo", id_embeds=emb, num_inference_steps=steps, output_type="np",
                                generator=torch.Generator().manual_seed(0)).images

    def run_reference():
        outputs["diffusers"] = reference("a photo", ip_adapter_image_embeds=[torch.stack([torch.zeros(512), emb])[:, None]],
                                         num_inference_steps=steps, output_type="np",
                                         generator=torch.Generator().manual_seed(0)).images

    times = interleaved({"idgen": run_ours, "diffusers": run_reference}, repeats)
    return {"config": f"tiny preset, 128x128, {steps} steps, CFG, median of {repeats}", "seconds": times,
            "time_ratio_idgen_over_diffusers": times["idgen"] / times["diffusers"],
            "max_abs_output_difference": float(np.abs(outputs["idgen"] - outputs["diffusers"]).max())}


# ------------------------------------------------------------------------------ 3
def real_photos() -> list[str]:
    insightface = list(importlib.util.find_spec("insightface").submodule_search_locations)[0]
    return [os.path.join(os.path.dirname(HERE), "idgen", "assets", "astronaut.jpg"),
            os.path.join(insightface, "data", "images", "t1.jpg")]


def bench_face_analysis(repeats: int) -> dict:
    from idgen import FaceAnalyzer
    from idgen.faces import insightface_root
    from idgen.faces import load_image
    from idgen.presets import get_preset

    photos = [np.asarray(load_image(p)) for p in real_photos()]
    faces_per_pass = 0
    backends = {"dlib (HOG + 68 landmarks) + ArcFace ONNX": FaceAnalyzer(get_preset("tiny").face_pack, detector="dlib")}
    pack = os.path.join(insightface_root(), "models", "buffalo_l")
    if os.path.isdir(pack):
        backends["scrfd (buffalo_l) + w600k_r50"] = FaceAnalyzer(pack)
    results = {}
    for name, analyzer in backends.items():
        faces_per_pass = sum(len(analyzer.analyze(p)) for p in photos)
        seconds = statistics.median(timed(lambda: [analyzer.analyze(p) for p in photos], repeats))
        results[name] = {"images_per_second": len(photos) / seconds, "faces_per_second": faces_per_pass / seconds}
    if len(backends) == 1:
        results["scrfd (buffalo_l)"] = f"not measured: no pack at {pack} (insightface's model zoo is not reachable here)"
    return {"config": f"{len(photos)} real photos (astronaut 512x512, t1.jpg 1280x886 with 6 faces), median of {repeats}",
            "backends": results}


# ------------------------------------------------------------------------------ 4
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(kind: str, latent: int) -> dict:
    """One training step in this (fresh) process; peak memory above the loaded model."""
    from peft import LoraConfig

    from idgen.adapters import build_identity_adapter, detect_format
    from idgen.presets import random_faceid_state_dict

    torch.manual_seed(0)
    unet = sd15_unet()
    unet.requires_grad_(False)
    text = torch.randn(1, 77, 768)
    # Both train a rank-128 LoRA on every attention projection (FaceID's shape); the adapter also
    # trains the FaceID projection and the identity K/V of each cross-attention layer.
    unet.add_adapter(LoraConfig(r=128, lora_alpha=128, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), kind)
    if kind == "adapter":
        state = random_faceid_state_dict(unet, lora_rank=4)
        adapter = build_identity_adapter(unet, state, detect_format(state))
        adapter.attach(unet)
    trainable = [p for n, p in unet.named_parameters() if "lora" in n]
    if kind == "adapter":
        trainable += list(adapter.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    gc.collect()
    before = _rss_bytes()
    cuda = torch.cuda.is_available()
    sample = torch.randn(1, 4, latent, latent)
    if kind == "adapter":
        adapter.set_tokens(adapter.projection(torch.randn(1, 512)))
    loss = unet(sample, 500, encoder_hidden_states=text).sample.pow(2).mean()
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": kind, "rss_before_step": before, "peak_rss": peak, "step_peak_above_model": peak - before,
            "trainable_parameters": sum(p.numel() for p in trainable), "cuda": cuda}


def bench_training_memory(latent: int) -> dict:
    results = {}
    for kind in ("adapter", "lora"):
        out = subprocess.run([sys.executable, __file__, "--memory-probe", kind, "--latent", str(latent)],
                             capture_output=True, text=True, check=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    adapter, lora = results["adapter"], results["lora"]
    return {"config": f"SD1.5 UNet (random weights), fp32, CPU, batch 1, latent {latent}x{latent}, LoRA rank 128 on "
                      "to_q/k/v/out (adapter: + FaceID projection and identity K/V), AdamW, one step per fresh process",
            "adapter_step_peak_GiB": adapter["step_peak_above_model"] / 2**30,
            "lora_step_peak_GiB": lora["step_peak_above_model"] / 2**30,
            "ratio_adapter_over_lora": adapter["step_peak_above_model"] / lora["step_peak_above_model"],
            "trainable_parameters": {"adapter": adapter["trainable_parameters"], "lora": lora["trainable_parameters"]},
            "peak_rss_GiB": {"adapter": adapter["peak_rss"] / 2**30, "lora": lora["peak_rss"] / 2**30}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, nargs="*", default=[1, 2, 3, 4])
    parser.add_argument("--latent", type=int, default=32, help="UNet latent side for 1 and 4 (64 = 512 px)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-probe", choices=("adapter", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.latent)))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    benches = {1: ("identity adapter overhead", lambda: bench_adapter_overhead(args.latent, args.repeats)),
               2: ("idgen vs diffusers FaceID", lambda: bench_vs_diffusers(20, args.repeats)),
               3: ("face analysis throughput", lambda: bench_face_analysis(args.repeats)),
               4: ("training step peak memory", lambda: bench_training_memory(args.latent))}
    for number in args.only:
        name, run = benches[number]
        print(f"\n== {number}. {name}")
        print(json.dumps(run(), indent=1))


if __name__ == "__main__":
    main()
