"""Reward-feedback fine-tuning of an identity adapter or a LoRA (ID-Aligner, ReFL-style).

    accelerate launch -m idgen.train.reward --config configs/reward_faceid_sd15.yaml

Each step samples without gradient from noise down to a random step of the schedule
(``refl_min_step`` to ``refl_max_step`` of ``num_inference_steps``), takes that one step with
gradient to predict the clean image, decodes it and scores it:
``loss = -identity_reward_weight * R_id - aesthetic_reward_weight * R_aes
(+ diffusion_loss_weight * the ordinary noise-prediction loss)``.
The identity reward is the ArcFace cosine between the generated face and the reference photo;
the recognizer runs in torch, so its gradient reaches the pixels and, through the VAE and the
UNet, the trained weights. Config, checkpoints, resume and export are adapter training's.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from idgen.adapters import identity_adapter_state_dict, save_adapter_checkpoint
from idgen.errors import IDGenError
from idgen.faces import FaceAnalyzer
from idgen.faces.arcface import DifferentiableArcFace
from idgen.files import follow_umask
from idgen.formats import method_of
from idgen.testing.presets import TINY_PRESETS, get_preset

from .adapter import ID_LORA_NAME, AdapterTrainConfig, fit, load_base, prepare_models, sample_generators, start_run, training_loss
from .config import run_training_cli
from .data import FaceDataset
from .rewards import AestheticReward, IdentityReward

REWARD_LORA_NAME = "reward"


@dataclass
class RewardTrainConfig(AdapterTrainConfig):
    train_target: str = "adapter"  # "adapter" (projection, identity K/V, its LoRA) or "lora" (a new peft LoRA)
    reward_lora_rank: int = 8
    num_inference_steps: int = 20
    refl_min_step: int = 10  # the gradient step is drawn from [refl_min_step, refl_max_step]
    refl_max_step: int = 19
    identity_reward_weight: float = 1.0
    aesthetic_reward_weight: float = 0.0
    aesthetic_model: str | None = None  # CLIP vision model (hub id or folder), e.g. openai/clip-vit-large-patch14
    aesthetic_head: str | None = None  # LAION aesthetic MLP: local file or hub "repo/filename"
    diffusion_loss_weight: float = 0.0
    face_model: str | None = None  # face pack for the identity reward (default: the one the data was prepared with)
    face_alignment: str = "detect"  # "detect" the generated face, or use the "reference" photo's keypoints
    no_face_reward: float = -1.0
    eval_identities: int = 2  # the last photos of the data: held out, scored before and after training
    eval_seeds: int = 2
    learning_rate: float = 1e-5

    def check(self) -> None:
        super().check()
        if self.train_target not in ("adapter", "lora"):
            raise IDGenError(f"train_target must be 'adapter' or 'lora', got {self.train_target!r}")
        if not 0 <= self.refl_min_step <= self.refl_max_step < self.num_inference_steps:
            raise IDGenError("need 0 <= refl_min_step <= refl_max_step < num_inference_steps")
        if self.aesthetic_reward_weight and not (self.aesthetic_model and self.aesthetic_head):
            raise IDGenError("aesthetic_reward_weight needs aesthetic_model and aesthetic_head")


def split(dataset: FaceDataset, held_out: int) -> tuple[torch.utils.data.Subset, torch.utils.data.Subset]:
    """Training photos, and the last ``held_out`` photos kept for evaluation."""
    if len(dataset) <= held_out:
        raise IDGenError(f"need more than eval_identities={held_out} photos to hold some out, the data has {len(dataset)}")
    cut = len(dataset) - held_out
    return torch.utils.data.Subset(dataset, range(cut)), torch.utils.data.Subset(dataset, range(cut, len(dataset)))


class ReFL:
    """One reward step: no-grad sampling to a random step, one step with grad, decode, score."""

    def __init__(self, config: RewardTrainConfig, pipe, identity: IdentityReward, aesthetic: AestheticReward | None,
                 device, weight_dtype):
        self.config, self.pipe, self.device, self.weight_dtype = config, pipe, device, weight_dtype
        self.identity, self.aesthetic = identity, aesthetic
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(config.num_inference_steps)

    def ids(self, batch) -> torch.Tensor:
        ids = batch["id_embeds"].float()
        if method_of(self.config.adapter_format).raw_id_embeds:
            ids = ids * batch["embedding_norm"][:, None]
        return ids.to(self.device)

    def generate(self, model, batch, generator: torch.Generator | list[torch.Generator], stop: int) -> torch.Tensor:
        """Images in [0, 1], with gradient through the last denoising step only; ``generator``
        draws the starting noise (a list: one per sample)."""
        pipe, size = self.pipe, len(batch["id_embeds"])
        with torch.no_grad():
            text = pipe.encode_prompt(list(batch["caption"]), self.device, 1, False)[0]
        shape = (size, pipe.unet.config.in_channels, self.config.resolution // pipe.vae_scale_factor,
                 self.config.resolution // pipe.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator).to(self.device) * self.scheduler.init_noise_sigma
        ids = self.ids(batch)
        timesteps = self.scheduler.timesteps
        with torch.no_grad():
            for t in timesteps[:stop]:
                eps = model(latents.to(self.weight_dtype), t.to(self.device), text, ids)
                latents = self.scheduler.step(eps.float(), t, latents).prev_sample
        t = timesteps[stop]
        eps = model(latents.to(self.weight_dtype), t.to(self.device), text, ids)
        x0 = self.scheduler.step(eps.float(), t, latents).pred_original_sample
        decoded = pipe.vae.decode((x0 / pipe.vae.config.scaling_factor).to(self.weight_dtype)).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def rewards(self, images: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        reference = batch["id_embeds"].float().to(self.device)
        identity, found = self.identity(images, reference, batch["kps"])
        out = {"identity_reward": identity, "face_found": found.float()}
        if self.aesthetic is not None:
            out["aesthetic_reward"] = self.aesthetic(images)
        return out

    def loss(self, model, batch, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        # The stopping step is the optimizer step's, shared by its micro-batches on every process (the
        # global batch is one batch however it is split); the noise is each sample's.
        step = micro // config.gradient_accumulation_steps
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        stop = int(torch.randint(config.refl_min_step, config.refl_max_step + 1, (1,), generator=generator))
        noise = sample_generators(config.seed + 1, batch["position"])
        scores = self.rewards(self.generate(model, batch, noise, stop), batch)
        loss = -config.identity_reward_weight * scores["identity_reward"].mean()
        if self.aesthetic is not None:
            loss = loss - config.aesthetic_reward_weight * scores["aesthetic_reward"].mean()
        if config.diffusion_loss_weight:
            loss = loss + config.diffusion_loss_weight * training_loss(
                config, self.pipe, model, batch, micro, False, self.device, self.weight_dtype)
        # Every trained parameter joins the graph (with weight 0) even when no face was found.
        loss = loss + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
        return loss, {k: float(v.detach().float().mean()) for k, v in scores.items()}

    @torch.no_grad()
    def evaluate(self, model, held_out) -> dict[str, float]:
        """Mean rewards on the held-out photos over ``eval_seeds`` seeds, at the last step."""
        loader = torch.utils.data.DataLoader(held_out, batch_size=len(held_out))
        batch = next(iter(loader))
        totals: dict[str, float] = {}
        for seed in range(self.config.eval_seeds):
            generator = torch.Generator().manual_seed(10_000 + seed)
            scores = self.rewards(self.generate(model, batch, generator, self.config.num_inference_steps - 1), batch)
            for key, value in scores.items():
                totals[key] = totals.get(key, 0.0) + float(value.float().mean()) / self.config.eval_seeds
        return totals


def build_rewards(config: RewardTrainConfig, device) -> tuple[IdentityReward, AestheticReward | None]:
    face_model = config.face_model
    if face_model is None:
        with open(os.path.join(config.data, "dataset.json")) as handle:
            face_model = json.load(handle)["pack"]
    analyzer = FaceAnalyzer(face_model)
    recognizer = DifferentiableArcFace.from_onnx(analyzer.recognizer.model_file).to(device)
    identity = IdentityReward(recognizer, analyzer, config.face_alignment, config.no_face_reward)
    aesthetic = None
    if config.aesthetic_reward_weight and config.aesthetic_model and config.aesthetic_head:  # checked in the config
        aesthetic = AestheticReward.from_pretrained(config.aesthetic_model, config.aesthetic_head).to(device)
    return identity, aesthetic


def setup(config: RewardTrainConfig, accelerator):
    """Base pipeline with the adapter to improve, the trainable module, rewards and data."""
    if config.init_adapter is None:
        if config.base not in TINY_PRESETS or config.adapter_format != "faceid":
            raise IDGenError("reward fine-tuning improves an existing adapter: set init_adapter to its checkpoint")
        config.init_adapter = get_preset(config.base).adapter
    if config.adapter_format == "instantid":
        raise IDGenError("reward fine-tuning runs on SD1.5 adapters (FaceID); InstantID needs its IdentityNet in the loop")
    dataset = FaceDataset(config.data, config.resolution)
    train_set, held_out = split(dataset, config.eval_identities)
    pipe, sdxl = load_base(config)
    if sdxl:
        raise IDGenError("reward fine-tuning runs on SD1.5 bases for now: use an SD1.5 base and FaceID adapter")
    lora_name = ID_LORA_NAME
    if config.train_target == "lora":
        pipe.unet.add_adapter(LoraConfig(r=config.reward_lora_rank, lora_alpha=config.reward_lora_rank,
                                         init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=REWARD_LORA_NAME)
        lora_name = REWARD_LORA_NAME
        pipe.set_adapters([a for a in pipe.get_active_adapters() if a != REWARD_LORA_NAME] + [REWARD_LORA_NAME])
    model, weight_dtype = prepare_models(config, accelerator, pipe, lora_name)
    if config.train_target == "lora":  # only the new LoRA learns; the identity adapter stays as it is
        model.requires_grad_(False)
        model.lora.requires_grad_(True)
    identity, aesthetic = build_rewards(config, accelerator.device)
    refl = ReFL(config, pipe, identity, aesthetic, accelerator.device, weight_dtype)
    return pipe, model, refl, train_set, held_out


def train(config: RewardTrainConfig, resume: str | None = None, overwrite: bool = False) -> tuple[str, dict, dict]:
    """Run (or resume) reward fine-tuning; returns (export path, held-out rewards before, after).
    ``overwrite`` as in adapter training."""
    accelerator = start_run(config, resume, overwrite)
    pipe, model, refl, train_set, held_out = setup(config, accelerator)
    before = refl.evaluate(model, held_out)
    accelerator.print(f"held-out identity reward before: {before['identity_reward']:.4f}")
    model = fit(config, accelerator, model, train_set, refl.loss, resume)
    after = refl.evaluate(model, held_out)
    accelerator.print(f"held-out identity reward after:  {after['identity_reward']:.4f}")
    path = os.path.join(config.output_dir, config.export_name)
    if accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "reward_eval.json"), "w") as handle:
            json.dump({"before": before, "after": after}, handle, indent=1)
        if config.train_target == "lora":
            path = os.path.join(config.output_dir, "pytorch_lora_weights.safetensors")
            pipe.save_lora_weights(config.output_dir, unet_lora_layers=get_peft_model_state_dict(
                pipe.unet, adapter_name=REWARD_LORA_NAME), safe_serialization=True)
            follow_umask(path)
        else:
            save_adapter_checkpoint(identity_adapter_state_dict(pipe.unet, model.adapter), path)
        accelerator.print(f"exported {path}")
    accelerator.end_training()
    return path, before, after


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(RewardTrainConfig, train, argv, "python -m idgen.train.reward", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
