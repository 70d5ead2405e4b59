"""Train an identity adapter (FaceID or InstantID-style) on prepared face photos.

    accelerate launch -m idgen.train.adapter --config configs/faceid_sd15.yaml [--resume latest]

The base model stays frozen; the projection, the identity K/V of every cross-attention layer
and, optionally, a LoRA on the UNet attention (FaceID's) are trained with the noise-prediction
loss. Every random draw of a step (noise, timesteps, dropout, VAE sample) and the data order
come from the seed and the step number, so a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from idgen.adapters import (
    IdentityAdapter,
    identity_adapter_state_dict,
    init_identity_adapter_state_dict,
    save_adapter_checkpoint,
)
from idgen.adapters.attention import IdentityCall
from idgen.adapters.context import checkpoint as identity_checkpoint
from idgen.adapters.context import open_identity
from idgen.adapters.eva_clip import load_eva_tower
from idgen.errors import IDGenError
from idgen.files import atomic_path
from idgen.formats import FAMILY_NAMES, ID_LORA_NAME, base_family, method_of
from idgen.pipelines import IDFluxPipeline, IDStableDiffusionPipeline, IDStableDiffusionXLPipeline
from idgen.testing.presets import TINY_PRESETS, get_preset

from .checkpoints import load_checkpoint, prepare_run_folder, resolve_resume, save_checkpoint
from .config import run_training_cli
from .data import FaceDataset
from .face_attention import FaceAttentionLoss
from .flux import flux_training_loss, init_pulid_flux_adapter


@dataclass
class AdapterTrainConfig:
    """Every field can be set in the YAML/JSON config and overridden as ``--field value``."""

    base: str = "tiny"  # "tiny", "tiny-sdxl", "tiny-flux", or a diffusers SD1.5/SDXL/FLUX.1 model (hub id or folder)
    data: str = "data"  # output of `idgen prepare-data`
    output_dir: str = "runs/adapter"
    adapter_format: str = "faceid"  # "faceid" (MLP projection), "instantid" (Resampler) or "pulid_flux" (FLUX.1)
    image_encoder: str | None = None  # pulid_flux: EVA02-CLIP (default: the preset's, else QuanSun/EVA-CLIP's)
    face_parser: str | None = None  # pulid_flux: facexlib's parsing_bisenet.pth (default: the preset's, else its release)
    init_adapter: str | None = None  # start from this checkpoint instead of a fresh adapter
    num_tokens: int | None = None  # identity tokens (default: 4 FaceID, 16 InstantID)
    lora_rank: int | None = None  # FaceID LoRA on every UNet attention layer; None: no LoRA
    resolution: int = 512
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    max_train_steps: int = 1000
    seed: int = 0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    text_dropout: float = 0.05  # caption dropped (IP-Adapter's t_drop)
    id_dropout: float = 0.05  # identity zeroed (i_drop)
    both_dropout: float = 0.05  # both dropped (ti_drop)
    identity_enhanced: bool = False  # Infinite-ID: text cross-attention off while training
    face_loss_weight: float = 0.0  # masked diffusion loss: the face box's pixels weigh 1 + this
    face_attention_loss_weight: float = 0.0  # SeFi-IDE's face-wise attention loss (0: off)
    editing_direction_weight: float = 0.0  # MasterWeaver's editing-direction loss (0: off)
    # Its edits, separated by "|"; {caption} is where the photo's caption goes.
    edit_prompts: str = "{caption}, smiling|{caption}, wearing glasses|{caption}, with a hat|{caption}, as an old person"
    use_ema: bool = False
    ema_decay: float = 0.999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 3
    validation_steps: int = 0  # 0: no sample images
    validation_prompt: str = "a photo of a person"
    num_validation_identities: int = 2
    export_name: str = "ip-adapter.safetensors"
    dataloader_num_workers: int = 0

    def check(self) -> None:
        if self.adapter_format not in ("faceid", "instantid", "pulid_flux"):
            raise IDGenError(f"adapter_format must be 'faceid', 'instantid' or 'pulid_flux', got {self.adapter_format!r}")
        if self.adapter_format == "pulid_flux":
            unsupported = [name for name in ("identity_enhanced", "face_loss_weight", "face_attention_loss_weight",
                                             "editing_direction_weight", "gradient_checkpointing", "validation_steps")
                           if getattr(self, name)]
            if unsupported:
                raise IDGenError(f"{', '.join(unsupported)} train UNet adapters; pulid_flux (FLUX.1) trains with the "
                                 "rectified-flow loss alone: leave them out")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise IDGenError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.lora_rank is not None and self.adapter_format != "faceid":
            # FaceID's LoRA; a FaceID config reused with another --adapter-format still runs.
            print(f"idgen: note: lora_rank ({self.lora_rank}) is FaceID's LoRA; {self.adapter_format} trains none: ignoring it",
                  file=sys.stderr)
            self.lora_rank = None
        for name in ("text_dropout", "id_dropout", "both_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise IDGenError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.editing_direction_weight and not all("{caption}" in p for p in self.edit_prompts.split("|")):
            raise IDGenError("every edit_prompts entry needs {caption}, where the photo's caption goes, e.g. "
                             "'{caption}, smiling'")
        for name in ("face_loss_weight", "face_attention_loss_weight", "editing_direction_weight"):
            if getattr(self, name) < 0:
                raise IDGenError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.text_dropout + self.id_dropout + self.both_dropout >= 1:
            raise IDGenError("text_dropout + id_dropout + both_dropout must stay below 1")
        for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
            if getattr(self, name) < 1:
                raise IDGenError(f"{name} must be at least 1, got {getattr(self, name)}")


class TrainableIdentity(nn.Module):
    """The trained parts (the identity adapter: projection and identity K/V; the LoRA) around a
    frozen UNet.

    Only the trained parts are registered, so checkpoints hold them and not the base model. Each
    forward opens its own identity (``IdentityCall``): ``text_enabled = False`` drops the text
    branch (identity-enhanced training), ``observer`` sees every identity layer's query (the
    face-attention loss).
    """

    def __init__(self, unet, adapter: IdentityAdapter, lora_name: str = ID_LORA_NAME):
        super().__init__()
        self.adapter = adapter
        self.lora = nn.ModuleList(
            module[lora_name]
            for layer in unet.modules()
            for module in (getattr(layer, "lora_A", None), getattr(layer, "lora_B", None))
            if isinstance(module, nn.ModuleDict) and lora_name in module
        )
        self.text_enabled = True
        self.observer = None
        object.__setattr__(self, "unet", unet)  # used, not owned

    def forward(self, noisy, timesteps, text_embeds, id_embeds, added_cond_kwargs=None):
        # Gradient checkpointing re-runs the UNet blocks during backward, after this block has
        # closed: the UNet's checkpoint function (idgen.adapters.context.checkpoint) reopens it.
        call = IdentityCall(self.adapter, observer=self.observer, text_enabled=self.text_enabled)
        call.set_tokens(self.adapter.projection(id_embeds))
        self.adapter.attach(self.unet)
        with open_identity(call):
            return self.unet(noisy, timesteps, encoder_hidden_states=text_embeds, added_cond_kwargs=added_cond_kwargs).sample


class StepBatches(torch.utils.data.Sampler):
    """Batches of dataset indices for micro-steps ``start, start + 1, ...``: epoch ``e`` is the
    permutation seeded by ``seed + e``, so batch ``k`` is the same whenever it is drawn. With
    ``world`` processes, micro-step ``k`` of the run takes samples ``k * world * batch_size`` on,
    process ``rank`` its ``rank``-th share: the global batch is one process's of ``world`` times the size."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, count: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.count, self.rank, self.world = start, count, rank, world

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return int(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))[offset])

    def positions(self, step: int) -> list[int]:
        """The run-wide positions of this process's samples at micro-step ``step``."""
        first = (step * self.world + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self):
        for step in range(self.start, self.start + self.count):
            yield [self._index(position) for position in self.positions(step)]

    def __len__(self) -> int:
        return self.count


def load_base(config: AdapterTrainConfig):
    """The frozen base pipeline, its identity adapter to train, and the face-pack info."""
    base = get_preset(config.base).base if config.base in TINY_PRESETS else config.base
    family = base_family(base)
    if method_of(config.adapter_format, family) is None:
        made_for = FAMILY_NAMES[method_of(config.adapter_format).family]
        raise IDGenError(f"adapter_format {config.adapter_format} is made for {made_for} but base {config.base} is "
                         f"{FAMILY_NAMES[family]}: a FLUX base trains pulid_flux, SD1.5 faceid, SDXL faceid or instantid")
    if family == "flux":
        return load_flux_base(config, base), False
    sdxl = family == "sdxl"
    pipe = (IDStableDiffusionXLPipeline if sdxl else IDStableDiffusionPipeline).from_pretrained(base)
    state = config.init_adapter or init_identity_adapter_state_dict(
        pipe.unet, config.adapter_format, config.num_tokens, config.lora_rank, config.seed
    )
    pipe.load_identity_adapter(state, fuse_lora=False)  # checks an init_adapter; its LoRA trains in peft
    pipe.set_progress_bar_config(disable=True)
    if pipe.adapter_spec.format != config.adapter_format:
        raise IDGenError(f"init_adapter {config.init_adapter} is {pipe.adapter_spec.format}, the config says {config.adapter_format}")
    return pipe, sdxl


def load_flux_base(config: AdapterTrainConfig, base: str):
    """The frozen FLUX pipeline with a PuLID-FLUX adapter to train (``init_adapter``, or fresh)
    and its EVA02-CLIP tower and face parser (the preset's for a tiny base)."""
    preset = get_preset(config.base) if config.base in TINY_PRESETS else None
    image_encoder = config.image_encoder or (preset.image_encoder if preset else None)
    face_parser = config.face_parser or (preset.face_parser if preset else None)
    pipe = IDFluxPipeline.from_pretrained(base)
    if config.init_adapter:
        state = load_file(config.init_adapter) if config.init_adapter.endswith(".safetensors") else config.init_adapter
    else:
        tiny = preset is not None  # a tiny base: an IDFormer of its EVA tower's size
        state = init_pulid_flux_adapter(pipe.transformer, load_eva_tower(image_encoder), config.seed,
                                        **(dict(dim=64, depth=5, num_queries=8) if tiny else {})).state_dict()
    pipe.load_identity_adapter(state, weight_name=config.init_adapter, image_encoder=image_encoder, face_parser=face_parser)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_conditioning(pipe, captions, device, resolution):
    embeds, _, pooled, _ = pipe.encode_prompt(captions, None, device, 1, False)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(captions), device=device)
    return embeds, {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype)}


def freeze(config: AdapterTrainConfig, accelerator, *modules: nn.Module | None) -> torch.dtype:
    """The frozen base ``modules`` (None ones skipped) on the device, in the training dtype
    (``mixed_precision``), which is returned."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    for module in modules:
        if module is not None:
            module.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    return weight_dtype


def prepare_models(config: AdapterTrainConfig, accelerator, pipe, lora_name: str = ID_LORA_NAME) -> tuple:
    """Freeze the base model in the training dtype; return (trainable module, weight dtype)."""
    weight_dtype = freeze(config, accelerator, pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    model = TrainableIdentity(pipe.unet, pipe.identity_adapter, lora_name)
    model.to(dtype=torch.float32).requires_grad_(True)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing(gradient_checkpointing_func=identity_checkpoint)
    pipe.unet.train()
    return model, weight_dtype


def fit(config: AdapterTrainConfig, accelerator, model: nn.Module, dataset, step_loss, resume: str | None, on_step=None):
    """The training loop shared by adapter and reward training: optimizer, EMA, atomic
    checkpoints every ``checkpointing_steps``, resume, deterministic batches, progress and logs.

    ``step_loss(model, batch, micro_step) -> (loss, metrics)``; returns the unwrapped model with
    its final (EMA, when enabled) weights.
    """
    trained = [p for p in model.parameters() if p.requires_grad]  # the same tensors after prepare()
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(trained, decay=config.ema_decay) if config.use_ema else None
    checkpoints = os.path.join(config.output_dir, "checkpoints")
    resumed = resolve_resume(checkpoints, resume)
    start_step = 0
    if resumed:
        start_step = load_checkpoint(resumed[0], accelerator, model, optimizer, ema)
        accelerator.print(f"resumed from {resumed[0]} at step {start_step}")
    micro_steps = config.gradient_accumulation_steps
    batches = StepBatches(
        len(dataset), config.train_batch_size, config.seed, start_step * micro_steps,
        (config.max_train_steps - start_step) * micro_steps, accelerator.process_index, accelerator.num_processes,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=config.dataloader_num_workers)
    logger = MetricsLog(config.output_dir, accelerator, start_step)
    if accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "config.json"), "w") as handle:
            json.dump(asdict(config), handle, indent=1)

    step = start_step
    progress = tqdm(total=config.max_train_steps, initial=start_step, desc="training", disable=not accelerator.is_main_process)
    for micro, batch in enumerate(loader, start=start_step * micro_steps):
        batch["position"] = torch.tensor(batches.positions(micro))  # seeds each sample's random draws
        with accelerator.accumulate(model):
            loss, metrics = step_loss(model, batch, micro)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.step(trained)
        logger.log(step, loss=accelerator.gather(loss.detach()).mean().item(), **metrics)
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}", **{k: f"{v:.4f}" for k, v in metrics.items()})
        if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
            save_checkpoint(accelerator, checkpoints, step, config.checkpoints_total_limit, model, optimizer, ema)
        if on_step is not None and accelerator.is_main_process:
            on_step(step)
    progress.close()
    if ema is not None:
        ema.copy_to(trained)
    return accelerator.unwrap_model(model)


def start_run(config: AdapterTrainConfig, resume: str | None, overwrite: bool):
    """Check the config, start the accelerator and prepare the run folder. Several processes on a
    machine without an accelerator (``accelerate launch --multi_gpu --num_processes N`` on CPUs)
    train together over gloo, instead of as N separate runs writing one folder."""
    config.check()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=config.mixed_precision,
                              cpu=several and not torch.accelerator.is_available())
    prepare_run_folder(accelerator, config.output_dir, resume, overwrite)
    return accelerator


def train(config: AdapterTrainConfig, resume: str | None = None, overwrite: bool = False) -> str:
    """Run (or resume) adapter training; returns the exported adapter file. ``overwrite``
    replaces a run already in ``output_dir`` (without it, or ``resume``, such a run is refused)."""
    accelerator = start_run(config, resume, overwrite)
    dataset = FaceDataset(config.data, config.resolution)  # fails early on an empty dataset
    pipe, sdxl = load_base(config)
    if config.adapter_format == "pulid_flux":
        return _train_flux(config, accelerator, pipe, dataset, resume)
    model, weight_dtype = prepare_models(config, accelerator, pipe)
    model.text_enabled = not config.identity_enhanced

    def step_loss(model, batch, micro):
        return training_loss(config, pipe, model, batch, micro, sdxl, accelerator.device, weight_dtype), {}

    def on_step(step):
        if config.validation_steps and step % config.validation_steps == 0:
            save_samples(config, pipe, dataset, step)

    model = fit(config, accelerator, model, dataset, step_loss, resume, on_step)
    path = os.path.join(config.output_dir, config.export_name)
    if accelerator.is_main_process:
        save_adapter_checkpoint(identity_adapter_state_dict(pipe.unet, model.adapter), path)
        accelerator.print(f"exported {path}")
    accelerator.end_training()
    return path


def _train_flux(config: AdapterTrainConfig, accelerator, pipe, dataset: FaceDataset, resume: str | None) -> str:
    """``train`` on a FLUX base: the PuLID-FLUX adapter learns, the rest stays frozen; the export is a
    ``pulid_flux`` safetensors file that ``IDFluxPipeline.load_identity_adapter`` reads."""
    weight_dtype = freeze(config, accelerator, pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                          pipe.eva_encoder)
    pipe.face_parser.requires_grad_(False).to(accelerator.device)  # its label maps stay float32
    adapter = pipe.identity_adapter.to(accelerator.device, torch.float32).requires_grad_(True).train()

    def step_loss(model, batch, micro):
        generators = sample_generators(config.seed, batch["position"])
        captions, drop_id = dropouts(config, batch["caption"], generators)
        raw = batch["id_embeds"].float() * batch["embedding_norm"][:, None]  # PuLID reads the raw ArcFace vector
        return flux_training_loss(pipe, getattr(model, "module", model), batch, captions, raw, drop_id, generators,
                                  accelerator.device, weight_dtype), {}

    adapter = fit(config, accelerator, adapter, dataset, step_loss, resume)
    path = os.path.join(config.output_dir, config.export_name)
    if accelerator.is_main_process:
        groups: dict[str, dict] = {}  # pulid_encoder.*, pulid_ca.*: the official layout
        for key, value in adapter.state_dict().items():
            group, _, rest = key.partition(".")
            groups.setdefault(group, {})[rest] = value.detach().cpu()
        save_adapter_checkpoint(groups, path)
        accelerator.print(f"exported {path}")
    accelerator.end_training()
    return path


def sample_generators(seed: int, positions: torch.Tensor) -> list[torch.Generator]:
    """One generator per sample, seeded by the run's seed and the sample's run-wide position: a
    sample's random draws are the same however the global batch is split over processes."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(position)) for position in positions]


def _per_sample(draw, generators: list[torch.Generator]) -> torch.Tensor:
    """``draw(generator)`` for each sample's generator, stacked."""
    return torch.stack([draw(generator) for generator in generators])


def dropouts(config: AdapterTrainConfig, captions: Sequence[str], generators: list[torch.Generator]
             ) -> tuple[list[str], torch.Tensor]:
    """IP-Adapter's dropouts of one batch, one draw per sample: the captions with the dropped ones
    empty, and which samples drop their identity (``text_dropout``, ``id_dropout``, ``both_dropout``)."""
    draw = _per_sample(lambda g: torch.rand((), generator=g), generators)
    drop_text = (draw < config.text_dropout) | (draw >= 1 - config.both_dropout)
    drop_id = ((draw >= config.text_dropout) & (draw < config.text_dropout + config.id_dropout)) | (draw >= 1 - config.both_dropout)
    return ["" if drop else caption for caption, drop in zip(captions, drop_text)], drop_id


def training_loss(config, pipe, model, batch, micro: int, sdxl: bool, device, weight_dtype) -> torch.Tensor:
    """Noise-prediction loss of one batch; every random draw of a sample is seeded by (seed, the
    sample's position in the run: ``batch["position"]``)."""
    generators = sample_generators(config.seed, batch["position"])
    pixels = batch["pixels"].to(device, weight_dtype)
    captions, drop_id = dropouts(config, batch["caption"], generators)
    id_embeds = batch["id_embeds"].float()
    if method_of(config.adapter_format).raw_id_embeds:  # InstantID is trained on the raw, un-normalised vector
        id_embeds = id_embeds * batch["embedding_norm"][:, None]
    id_embeds = torch.where(drop_id[:, None], torch.zeros_like(id_embeds), id_embeds).to(device)

    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator=generators)
        latents = latents.float() * pipe.vae.config.scaling_factor
        if sdxl:
            text_embeds, added = _sdxl_conditioning(pipe, captions, device, config.resolution)
        else:
            text_embeds, added = pipe.encode_prompt(captions, device, 1, False)[0], None
    noise = randn_tensor(latents.shape, generator=generators, dtype=latents.dtype).to(device)
    train_steps = pipe.scheduler.config.num_train_timesteps
    timesteps = _per_sample(lambda g: torch.randint(0, train_steps, (), generator=g), generators).to(device)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    noisy = noisy.to(weight_dtype)
    if config.editing_direction_weight:  # the frozen base's predictions first: the identity forwards stay set
        templates = config.edit_prompts.split("|")
        edits = [templates[int(i)] for i in _per_sample(lambda g: torch.randint(len(templates), (), generator=g), generators)]
        edit_captions = [template.format(caption=caption) for template, caption in zip(edits, captions)]
        with torch.no_grad():
            edit_embeds, edit_added = (_sdxl_conditioning(pipe, edit_captions, device, config.resolution) if sdxl
                                       else (pipe.encode_prompt(edit_captions, device, 1, False)[0], None))
        base, base_edit = (base_prediction(model, noisy, timesteps, embeds, cond)
                           for embeds, cond in ((text_embeds, added), (edit_embeds, edit_added)))
    faces = None  # the face boxes as latent masks, for the losses that read them
    if config.face_loss_weight or config.face_attention_loss_weight:
        faces = face_mask(batch["face_box"], latents.shape, pixels.shape[-1]).to(device)
    watcher, trained = None, getattr(model, "module", model)  # under DistributedDataParallel: the model it wraps
    if config.face_attention_loss_weight:  # the identity layers report their maps during this forward
        watcher = FaceAttentionLoss(pipe.unet, trained.adapter)
        watcher.start(cast(torch.Tensor, faces), ~drop_id)  # set above for this loss
        trained.observer = watcher.observe
    try:
        prediction = model(noisy, timesteps, text_embeds, id_embeds, added)
    finally:
        if watcher is not None:
            watcher.close()
            trained.observer = None
    kind = pipe.scheduler.config.prediction_type
    target = noise if kind == "epsilon" else pipe.scheduler.get_velocity(latents, noise, timesteps)
    loss = denoising_loss(prediction.float(), target.float(), faces if config.face_loss_weight else None,
                          config.face_loss_weight)
    if watcher is not None:
        loss = loss + config.face_attention_loss_weight * watcher.loss().to(loss.device)
    if config.editing_direction_weight:
        prediction_edit = model(noisy, timesteps, edit_embeds, id_embeds, edit_added)
        loss = loss + config.editing_direction_weight * editing_direction_loss(prediction, prediction_edit, base, base_edit)
    return loss


@torch.no_grad()
def base_prediction(model: TrainableIdentity, noisy, timesteps, text_embeds, added_cond_kwargs=None) -> torch.Tensor:
    """The frozen base model's prediction: no identity open and its LoRA off."""
    model = getattr(model, "module", model)  # under DistributedDataParallel: the model it wraps
    unet: Any = model.unet  # a diffusers UNet with peft's adapter switches
    lora = bool(model.lora)
    if lora:
        unet.disable_adapters()
    try:
        return unet(noisy, timesteps, encoder_hidden_states=text_embeds, added_cond_kwargs=added_cond_kwargs).sample
    finally:
        if lora:
            unet.enable_adapters()


def editing_direction_loss(prediction, prediction_edit, base, base_edit) -> torch.Tensor:
    """MasterWeaver's editing-direction loss: 1 - cosine between the change an edit of the prompt
    makes with the identity and the change it makes in the frozen base model, per sample, so that
    the identity does not erase the edits the base model follows."""
    with_identity = (prediction_edit - prediction).float().flatten(1)
    without = (base_edit - base).float().flatten(1)
    return (1 - F.cosine_similarity(with_identity, without, dim=1)).mean()


def face_mask(boxes: torch.Tensor, latent_shape: Sequence[int], resolution: int) -> torch.Tensor:
    """(B, 1, h, w): 1 on the latent cells the face boxes (B, 4) in pixels cover, else 0."""
    height, width = latent_shape[-2:]
    cells = boxes.float() / resolution * torch.tensor([width, height, width, height])
    ys, xs = torch.arange(height)[:, None] + 0.5, torch.arange(width)[None, :] + 0.5
    inside = [(xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2) for x1, y1, x2, y2 in cells.tolist()]
    return torch.stack(inside)[:, None].float()


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   face_weight: float = 0.0) -> torch.Tensor:
    """Mean squared error; with a face ``mask``, its cells weigh ``1 + face_weight`` (the masked
    diffusion loss of StableIdentity and PhotoMaker: the face's pixels matter more)."""
    if mask is None or not face_weight:
        return F.mse_loss(prediction, target)
    return ((1 + face_weight * mask) * (prediction - target) ** 2).mean()


def _logged_step(line: str) -> int | None:
    """The step of one ``metrics.jsonl`` line; None for a line cut short."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class MetricsLog:
    """Metrics to tensorboard when it is installed, and always to ``metrics.jsonl``."""

    def __init__(self, output_dir: str, accelerator, start_step: int = 0):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.main = accelerator.is_main_process
        self.board = None
        if self.main:
            os.makedirs(output_dir, exist_ok=True)
            self._keep_until(start_step)
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is optional

                self.board = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                pass

    def _keep_until(self, step: int) -> None:
        """Drop the lines after ``step``: a resumed run logs those steps again (a killed run wrote
        them after its last checkpoint, the last one perhaps half)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as handle:
            lines = handle.readlines()
        kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
        if len(kept) != len(lines):
            with atomic_path(self.path) as staging, open(staging, "w") as handle:
                handle.writelines(kept)

    def log(self, step: int, **metrics: float) -> None:
        if not self.main:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.board is not None:
            for key, value in metrics.items():
                self.board.add_scalar(key, value, step)


@torch.no_grad()
def save_samples(config: AdapterTrainConfig, pipe, dataset: FaceDataset, step: int) -> str:
    """A row of images, one per fixed validation identity (the first photos of the dataset)."""
    count = min(config.num_validation_identities, len(dataset))
    ids = dataset.rows("id_embeds", count)
    if method_of(config.adapter_format).raw_id_embeds:
        ids = ids * dataset.rows("embedding_norm", count)[:, None]
    images = []
    for i in range(count):
        images += pipe(config.validation_prompt, id_embeds=ids[i], num_inference_steps=20, height=config.resolution,
                       width=config.resolution, generator=torch.Generator().manual_seed(config.seed)).images
    pipe.unet.train()
    grid = Image.new("RGB", (config.resolution * count, config.resolution))
    for i, image in enumerate(images):
        grid.paste(image, (i * config.resolution, 0))
    folder = os.path.join(config.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    grid.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(AdapterTrainConfig, train, argv, "python -m idgen.train.adapter", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
