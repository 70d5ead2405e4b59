"""Per-identity tuning: a small peft LoRA learned on a few photos of one person, on top of an
identity adapter, so that details the adapter misses (hair, skin, the shape of a smile) come back.

    idgen tune photos/ --out person-lora/ --adapter ip-adapter-faceid_sd15.bin --base ...
    accelerate launch -q -m idgen.train.tune --config tune.yaml        # the same, from a config

The adapter conditions every step on each photo's own identity, as at generation; only the new
LoRA (``person``) trains. The result is a diffusers LoRA folder (``pytorch_lora_weights.safetensors``)
that loads with ``pipe.load_lora_weights`` and ``--lora person-lora/``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from idgen.errors import IDGenError
from idgen.files import follow_umask

from .adapter import AdapterTrainConfig, fit, load_base, prepare_models, start_run, training_loss
from .config import run_training_cli
from .data import FaceDataset

TUNE_LORA_NAME = "person"


@dataclass
class TuneConfig(AdapterTrainConfig):
    """``AdapterTrainConfig``'s fields, with defaults for a few photos of one person:
    ``init_adapter`` is the identity adapter to tune on (required), ``tune_rank`` the new LoRA's rank."""

    output_dir: str = "runs/person-lora"
    tune_rank: int = 8
    train_batch_size: int = 1
    max_train_steps: int = 200
    text_dropout: float = 0.0
    id_dropout: float = 0.0
    both_dropout: float = 0.0
    checkpointing_steps: int = 100

    def check(self) -> None:
        super().check()
        if not self.init_adapter:
            raise IDGenError("tuning needs the identity adapter it tunes on: set init_adapter (--adapter on the "
                             "command line), e.g. an ip-adapter-faceid_sd15 checkpoint")
        if self.tune_rank < 1:
            raise IDGenError(f"tune_rank must be at least 1, got {self.tune_rank}")


def tune(config: TuneConfig, resume: str | None = None, overwrite: bool = False) -> str:
    """Train (or resume) the person LoRA; returns the exported LoRA folder's file."""
    accelerator = start_run(config, resume, overwrite)
    dataset = FaceDataset(config.data, config.resolution)
    pipe, sdxl = load_base(config)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # initial weights from the config's seed
        torch.manual_seed(config.seed)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # beside FaceID's LoRA, on purpose
        pipe.unet.add_adapter(LoraConfig(r=config.tune_rank, lora_alpha=config.tune_rank, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                              adapter_name=TUNE_LORA_NAME)
    pipe.unet.set_adapters(list(pipe.unet.peft_config))  # the adapter's own LoRA stays on
    model, weight_dtype = prepare_models(config, accelerator, pipe, TUNE_LORA_NAME)
    model.adapter.requires_grad_(False)  # only the person LoRA trains

    def step_loss(model, batch, micro):
        return training_loss(config, pipe, model, batch, micro, sdxl, accelerator.device, weight_dtype), {}

    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fit(config, accelerator, model, dataset, step_loss, resume)
    seconds = time.perf_counter() - start
    path = os.path.join(config.output_dir, "pytorch_lora_weights.safetensors")
    if accelerator.is_main_process:
        layers = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in
                  get_peft_model_state_dict(pipe.unet, adapter_name=TUNE_LORA_NAME).items()}
        StableDiffusionPipeline.save_lora_weights(config.output_dir, unet_lora_layers=layers, safe_serialization=True)
        follow_umask(path)
        memory = _peak_memory()
        accelerator.print(f"exported {path} ({config.max_train_steps} steps in {seconds:.1f} s, "
                          f"{config.max_train_steps / seconds:.2f} steps/s{memory}); load it with --lora "
                          f"{config.output_dir}")
    accelerator.end_training()
    return path


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(TuneConfig, tune, argv, "python -m idgen.train.tune", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())


def _peak_memory() -> str:
    """The run's peak memory for the summary line: the GPU's, else the process's resident size."""
    if torch.cuda.is_available():
        return f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    try:
        import resource  # lazy: Unix only
    except ImportError:  # Windows
        return ""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return f", peak process memory {kib / 2**20:.2f} GiB"
