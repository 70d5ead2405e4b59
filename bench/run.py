"""idgen benchmarks: every number is a ratio measured side by side in this one run.

    python bench/run.py            # all three
    python bench/run.py --only 1 3 # some

1. identity overhead, whole pipeline: plain diffusers, diffusers' own FaceID path and idgen's on
   SD1.5's published config with FaceID's rank-128 LoRA (time, output difference);
2. face analysis throughput on real photos, per detector backend;
3. peak memory of one adapter training step vs one plain LoRA training step.

GPU speed against the original pipelines, fp16 at full size: bench/gpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import gpu
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from idgen import FaceAnalyzer
from idgen.adapters import build_identity_adapter, detect_format
from idgen.adapters.attention import IdentityCall
from idgen.adapters.context import open_identity
from idgen.faces import insightface_root, load_image
from idgen.testing.presets import get_preset, random_faceid_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def sd15_unet(cross_attention_dim: int = 768):
    return UNet2DConditionModel(cross_attention_dim=cross_attention_dim, attention_head_dim=8).eval()


# ------------------------------------------------------------------------------ 1
def bench_identity_overhead(latent: int, steps: int, repeats: int) -> dict:
    """Whole pipelines on SD1.5's published config (random weights): plain diffusers, diffusers'
    FaceID path and idgen's, with FaceID's rank-128 LoRA (bench/gpu.py's SD1.5 table, eager)."""
    sys.path.insert(0, HERE)

    parts = gpu.build(gpu.sd15_parts, 1, "cpu", torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        cases = gpu.sd15_cases(parts, latent * 8, steps, 1, "cpu", torch.float32, folder, compile_=False,
                               few_step=False, methods=False)
        results = gpu.measure(cases, repeats, "cpu")
    plain, anchor, ours = (results[case.name] for case in cases)
    return {"config": f"SD1.5 config (random weights), fp32, CPU, {latent * 8} px, {steps} steps, CFG, FaceID with its "
                      f"rank-128 LoRA, whole pipeline, median of {repeats} interleaved",
            "seconds": {case.name: results[case.name]["seconds"] for case in cases},
            "idgen_overhead_over_plain": ours["seconds"] / plain["seconds"] - 1,
            "diffusers_faceid_overhead_over_plain": anchor["seconds"] / plain["seconds"] - 1,
            "max_abs_difference_idgen_vs_diffusers_faceid": float(np.abs(ours["images"] - anchor["images"]).max()),
            "target": "<= 3% (GPU, fp16: bench/gpu.py)"}


# ------------------------------------------------------------------------------ 2
def real_photos() -> list[str]:
    insightface = list(importlib.util.find_spec("insightface").submodule_search_locations)[0]
    return [os.path.join(os.path.dirname(HERE), "idgen", "assets", "astronaut.jpg"),
            os.path.join(insightface, "data", "images", "t1.jpg")]


def bench_face_analysis(repeats: int) -> dict:
    photos = [np.asarray(load_image(p)) for p in real_photos()]
    faces_per_pass = 0
    backends = {"dlib (HOG + 68 landmarks) + ArcFace ONNX": FaceAnalyzer(get_preset("tiny").face_pack, detector="dlib")}
    pack = os.path.join(insightface_root(), "models", "buffalo_l")
    if os.path.isdir(pack):
        backends["scrfd (buffalo_l) + w600k_r50"] = FaceAnalyzer(pack)
    results = {}
    for name, analyzer in backends.items():
        faces_per_pass = sum(len(analyzer.analyze(p)) for p in photos)
        seconds = statistics.median(timed(lambda analyzer=analyzer: [analyzer.analyze(p) for p in photos], repeats))
        results[name] = {"images_per_second": len(photos) / seconds, "faces_per_second": faces_per_pass / seconds}
    if len(backends) == 1:
        results["scrfd (buffalo_l)"] = f"not measured: no pack at {pack} (insightface's model zoo is not reachable here)"
    return {"config": f"{len(photos)} real photos (astronaut 512x512, t1.jpg 1280x886 with 6 faces), median of {repeats}",
            "backends": results}


# ------------------------------------------------------------------------------ 3
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(kind: str, latent: int) -> dict:
    """One training step in this (fresh) process; peak memory above the loaded model."""
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
    identity = contextlib.nullcontext()
    if kind == "adapter":
        call = IdentityCall(adapter)
        call.set_tokens(adapter.projection(torch.randn(1, 512)))
        identity = open_identity(call)
    with identity:
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
    parser.add_argument("--only", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--latent", type=int, default=32, help="UNet latent side for 1 and 3 (64 = 512 px)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps for 1")
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
    benches = {1: ("identity overhead, whole pipeline", lambda: bench_identity_overhead(args.latent, args.steps,
                                                                                         args.repeats)),
               2: ("face analysis throughput", lambda: bench_face_analysis(args.repeats)),
               3: ("training step peak memory", lambda: bench_training_memory(args.latent))}
    for number in args.only:
        name, run = benches[number]
        print(f"\n== {number}. {name}")
        print(json.dumps(run(), indent=1))


if __name__ == "__main__":
    main()
