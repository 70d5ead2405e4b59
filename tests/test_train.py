"""Adapter training: data preparation on real photos, config errors, kill-and-resume, export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from idgen import IDStableDiffusionPipeline
from idgen.errors import CheckpointError, IDGenError
from idgen.train.adapter import AdapterTrainConfig, train
from idgen.train.checkpoints import resolve_resume
from idgen.train.config import ConfigError, load_config
from idgen.train.data import FaceDataset, prepare_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, analyzer, astronaut, group_photo):
    """Real photos: six people cropped from insightface's group photo, the astronaut and her
    mirror image; plus a group photo, a blank picture and a corrupt file to be skipped."""
    folder = tmp_path_factory.mktemp("photos")
    group = Image.open(group_photo).convert("RGB")
    for i, face in enumerate(analyzer.analyze(group)):
        x1, y1, x2, y2 = face.bbox
        margin = x2 - x1
        crop = group.crop((int(x1 - margin), int(y1 - margin), int(x2 + margin), int(y2 + margin)))
        crop.resize((288, 288)).save(folder / f"person{i}.jpg")
        (folder / f"person{i}.txt").write_text(f"a photo of person {i}")
    Image.open(astronaut).save(folder / "astronaut.jpg")
    ImageOps.mirror(Image.open(astronaut)).save(folder / "astronaut_mirrored.jpg")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "astronaut.jpg", "text": "an astronaut"}) + "\n")
    group.save(folder / "group.jpg")
    Image.new("RGB", (200, 200), (50, 90, 120)).save(folder / "blank.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory, photos, analyzer):
    out = tmp_path_factory.mktemp("data")
    report = prepare_data(str(photos), str(out), analyzer, progress=False)
    assert report.added == 8
    return out


def config(data, output_dir, **overrides):
    values = dict(base="tiny", data=str(data), output_dir=str(output_dir), lora_rank=4, resolution=64,
                  train_batch_size=2, learning_rate=1e-3, max_train_steps=4, checkpointing_steps=2,
                  checkpoints_total_limit=2, export_name="adapter.safetensors")
    values.update(overrides)
    return AdapterTrainConfig(**values)


def test_prepare_data_reports_and_is_idempotent(photos, data, analyzer, tmp_path):
    skipped = {row["file"]: row["reason"] for row in map(json.loads, open(data / "skipped.jsonl"))}
    assert skipped["blank.png"] == "no face"
    assert skipped["group.jpg"] == "several faces (6)"
    assert skipped["broken.jpg"].startswith("unreadable")
    index = [json.loads(line) for line in open(data / "index.jsonl")]
    captions = {row["file"]: row["caption"] for row in index}
    assert captions["astronaut.jpg"] == "an astronaut" and captions["person3.jpg"] == "a photo of person 3"
    dataset = FaceDataset(str(data), 64)
    assert len(dataset) == 8 and torch.allclose(dataset.rows("id_embeds", 8).norm(dim=1), torch.ones(8), atol=1e-5)
    item = dataset[0]
    assert item["pixels"].shape == (3, 64, 64) and -1 <= item["pixels"].min() and item["pixels"].max() <= 1
    # A re-run only looks at new photos.
    assert prepare_data(str(photos), str(data), analyzer, progress=False).added == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("astronaut.jpg", "person0.jpg"):
        (copy / name).write_bytes((photos / name).read_bytes())
    out = tmp_path / "prepared"
    assert prepare_data(str(copy), str(out), analyzer, progress=False).added == 2
    ImageOps.mirror(Image.open(photos / "person1.jpg")).save(copy / "new.jpg")
    report = prepare_data(str(copy), str(out), analyzer, progress=False)
    assert (report.added, report.total) == (1, 3)


def test_bad_configs_fail_before_training(tmp_path, data, photos, analyzer):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match="learning_rate must be float"):
        load_config(AdapterTrainConfig, str(yaml_file))
    yaml_file.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown field 'learning_rat'"):
        load_config(AdapterTrainConfig, str(yaml_file))
    with pytest.raises(ConfigError, match="max_train_steps must be int"):
        load_config(AdapterTrainConfig, None, {"max_train_steps": "ten"})
    assert load_config(AdapterTrainConfig, None, {"lora_rank": "none", "use_ema": "true"}).use_ema is True

    empty = tmp_path / "empty"
    prepare_data(str(tmp_path), str(empty), analyzer, progress=False)  # a folder with no photo
    with pytest.raises(IDGenError, match="no usable face photo"):
        train(config(empty, tmp_path / "run0"))
    with pytest.raises(IDGenError, match="instantid is made for SDXL but base tiny is SD1.5"):
        train(config(data, tmp_path / "run1", adapter_format="instantid", lora_rank=None))
    from idgen.adapters import save_adapter_checkpoint
    from idgen.testing.presets import random_faceid_state_dict, tiny_sdxl_pipeline

    sdxl_adapter = tmp_path / "sdxl.safetensors"
    save_adapter_checkpoint(random_faceid_state_dict(tiny_sdxl_pipeline().unet), str(sdxl_adapter))
    with pytest.raises(CheckpointError, match="sdxl.safetensors"):
        train(config(data, tmp_path / "run2", init_adapter=str(sdxl_adapter)))
    assert not (tmp_path / "run2" / "checkpoints").exists()


def _launch(cfg_file, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(REPO, "configs", "accelerate_cpu.yaml"),
         "-m", "idgen.train.adapter", "--config", str(cfg_file), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, data):
    """A run killed (SIGKILL) mid-way and resumed ends with the weights of an uninterrupted run."""
    import yaml

    def write(name):
        cfg = config(data, tmp_path / name, max_train_steps=12, checkpointing_steps=4, validation_steps=0)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(vars(cfg)))
        return path

    whole = _launch(write("whole"))
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    killed = _launch(write("killed"))
    checkpoint = tmp_path / "killed" / "checkpoints" / "checkpoint-4"
    deadline = time.time() + 600
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert checkpoint.exists() and not (tmp_path / "killed" / "adapter.safetensors").exists(), "killed too late"
    resumed = _launch(write("killed"), "--resume", "latest")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    expected = load_file(tmp_path / "whole" / "adapter.safetensors")
    got = load_file(tmp_path / "killed" / "adapter.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "whole" / "metrics.jsonl")]
    assert len(losses) == 12 and all(np.isfinite(losses))


@pytest.mark.parametrize("step", [-5, 10**8, "4", 4.0, None])
def test_a_tampered_training_state_is_refused(tmp_path, step):
    folder = tmp_path / "checkpoints" / "checkpoint-4"
    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"step": step}))
    with pytest.raises(IDGenError, match="train_state.json gives step .* not the step of checkpoint-4: the checkpoint "
                       "was edited or mixed up"):
        resolve_resume(str(folder), str(folder))


def test_resumed_metrics_keep_each_step_once(tmp_path):
    """A killed run logged steps after its last checkpoint (the last line perhaps half): resuming
    from step 4 drops them, so the resumed run's own lines are the only ones for steps 5 on."""
    from accelerate import Accelerator

    from idgen.train.adapter import MetricsLog

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 0.1}) + "\n" for i in range(1, 7))
                                            + '{"step": 7, "lo')
    log = MetricsLog(str(tmp_path), Accelerator(cpu=True), start_step=4)
    log.log(5, loss=0.2)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]


def test_partial_checkpoint_is_never_resumed(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoint-4" / "train_state.json").write_text('{"step": 4}')
    (folder / ".tmp-checkpoint-8").mkdir()  # a save killed mid-write
    assert resolve_resume(str(folder), "latest") == (str(folder / "checkpoint-4"), 4)
    with pytest.raises(IDGenError, match="not a complete training checkpoint"):
        resolve_resume(str(folder / ".tmp-checkpoint-8"), str(folder / ".tmp-checkpoint-8"))


@pytest.mark.slow
def test_export_loads_in_idgen_and_diffusers(tmp_path, data, preset):
    from diffusers import StableDiffusionPipeline

    path = train(config(data, tmp_path / "run", validation_steps=2))
    assert sorted(os.listdir(tmp_path / "run" / "samples")) == ["step-000002.png", "step-000004.png"]
    trained = load_file(path)
    from idgen.adapters import init_identity_adapter_state_dict

    fresh = init_identity_adapter_state_dict(IDStableDiffusionPipeline.from_pretrained(preset.base).unet, lora_rank=4)
    assert not torch.equal(trained["image_proj.proj.0.weight"], fresh["image_proj"]["proj.0.weight"])
    assert trained["ip_adapter.0.to_q_lora.up.weight"].abs().max() > 0  # the LoRA learned from zero

    emb = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)), dim=0)
    ours = IDStableDiffusionPipeline.from_pretrained(preset.base)
    ours.load_identity_adapter(path)
    ours.set_progress_bar_config(disable=True)
    reference = StableDiffusionPipeline.from_pretrained(preset.base)
    reference.load_ip_adapter(str(tmp_path / "run"), subfolder="", weight_name="adapter.safetensors", image_encoder_folder=None)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, output_type="np")
    a = reference("a photo", ip_adapter_image_embeds=[torch.stack([torch.zeros(512), emb])[:, None]],
                  generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ours("a photo", id_embeds=emb, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(a - b).max() <= 1e-5


@pytest.mark.slow
def test_identity_enhanced_and_ema(tmp_path, data):
    plain = load_file(train(config(data, tmp_path / "plain", max_train_steps=2)))
    enhanced = load_file(train(config(data, tmp_path / "enhanced", max_train_steps=2, identity_enhanced=True)))
    ema = load_file(train(config(data, tmp_path / "ema", max_train_steps=2, use_ema=True, ema_decay=0.5)))
    key = "image_proj.proj.2.weight"
    assert not torch.equal(plain[key], enhanced[key]) and not torch.equal(plain[key], ema[key])


@pytest.mark.slow
def test_instantid_style_adapter_on_sdxl(tmp_path, data):
    """adapter_format instantid trains a Resampler adapter on an SDXL base; the export loads."""
    from idgen import IDStableDiffusionXLPipeline
    from idgen.adapters import InstantIDResampler
    from idgen.testing.presets import get_preset

    path = train(config(data, tmp_path / "xl", base="tiny-sdxl", adapter_format="instantid", lora_rank=None,
                        max_train_steps=2))
    pipe = IDStableDiffusionXLPipeline.from_pretrained(get_preset("tiny-sdxl").base)
    pipe.load_identity_adapter(path)
    assert isinstance(pipe.id_projection, InstantIDResampler) and pipe.adapter_spec.num_tokens == 16


@pytest.mark.slow
def test_pulid_style_adapter_on_flux(tmp_path, data, astronaut, analyzer):
    """adapter_format pulid_flux trains PuLID-FLUX's ID encoder and cross-attention on the tiny FLUX
    base (rectified-flow loss; the identity read from EVA features of each photo's aligned face);
    it resumes to the weights of an uninterrupted run, and the export loads in IDFluxPipeline."""
    from idgen import IDFluxPipeline
    from idgen.testing.presets import get_preset

    flux = dict(base="tiny-flux", adapter_format="pulid_flux", lora_rank=None, max_train_steps=4,
                checkpointing_steps=2, export_name="pulid_flux.safetensors")
    path = train(config(data, tmp_path / "flux", **flux))
    trained = load_file(path)
    assert any(key.startswith("pulid_ca.") for key in trained) and any(key.startswith("pulid_encoder.") for key in trained)
    assert trained["pulid_ca.0.to_out.weight"].abs().max() > 0  # learned from its zero start
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "flux" / "metrics.jsonl")]
    assert len(losses) == 4 and all(np.isfinite(losses))

    shutil.copytree(tmp_path / "flux", tmp_path / "half")
    shutil.rmtree(tmp_path / "half" / "checkpoints" / "checkpoint-4")
    os.remove(tmp_path / "half" / "pulid_flux.safetensors")
    resumed = load_file(train(config(data, tmp_path / "half", **flux), resume="latest"))
    assert all(torch.equal(resumed[key], trained[key]) for key in trained)

    preset = get_preset("tiny-flux")
    pipe = IDFluxPipeline.from_pretrained(preset.base)
    pipe.load_identity_adapter(path, image_encoder=preset.image_encoder, face_parser=preset.face_parser)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a photo", face_image=astronaut, num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)
    with pytest.raises(IDGenError, match="a FLUX base trains pulid_flux"):
        train(config(data, tmp_path / "mixed", base="tiny-flux"))
    with pytest.raises(IDGenError, match="gradient_checkpointing train UNet adapters"):
        config(data, tmp_path / "gc", **flux, gradient_checkpointing=True).check()


@pytest.mark.slow
def test_accumulation_and_gradient_checkpointing(tmp_path, data):
    """Two micro-batches per step with gradient checkpointing: same loss curve length, finite."""
    train(config(data, tmp_path / "acc", max_train_steps=2, gradient_accumulation_steps=2, gradient_checkpointing=True))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "acc" / "metrics.jsonl")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert sorted(os.listdir(tmp_path / "acc" / "checkpoints")) == ["checkpoint-2"]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        mixed = load_file(train(config(data, tmp_path / "bf16", max_train_steps=2, mixed_precision="bf16")))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in mixed.values())


@pytest.mark.slow
def test_ema_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, data):
    kwargs = dict(use_ema=True, ema_decay=0.5, checkpointing_steps=3, checkpoints_total_limit=3)
    whole = load_file(train(config(data, tmp_path / "whole", max_train_steps=6, **kwargs)))
    train(config(data, tmp_path / "cut", max_train_steps=3, **kwargs))  # stops with checkpoint-3
    checkpoint = tmp_path / "cut" / "checkpoints" / "checkpoint-3"
    assert sorted(os.listdir(checkpoint)) == ["ema.safetensors", "model.safetensors", "optimizer.pt", "train_state.json"]
    resumed = load_file(train(config(data, tmp_path / "cut", max_train_steps=6, **kwargs), resume="latest"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


class _Payload:
    """A pickle of this runs code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.pt", "model.safetensors", "ema.safetensors", "train_state.json"])
def test_resuming_never_runs_code_from_a_checkpoint(tmp_path, data, name):
    kwargs = dict(use_ema=True, max_train_steps=2, checkpointing_steps=2)
    train(config(data, tmp_path / "run", **kwargs))
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(str(marker))}, tmp_path / "run" / "checkpoints" / "checkpoint-2" / name)
    with pytest.raises(IDGenError, match=f"{name} \\(.*\\) could not be read safely"):
        train(config(data, tmp_path / "run", **dict(kwargs, max_train_steps=4)), resume="latest")
    assert not marker.exists()


@pytest.mark.slow
def test_prepare_data_keeps_each_photo_and_one_recognizer(photos, analyzer, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    for name in ("astronaut.jpg", "person0.jpg"):
        (first / name).write_bytes((photos / name).read_bytes())
    (second / "astronaut.jpg").write_bytes((photos / "person1.jpg").read_bytes())  # same name, another photo
    out = tmp_path / "prepared"
    assert prepare_data(str(first), str(out), analyzer, progress=False).added == 2
    assert prepare_data(str(second), str(out), analyzer, progress=False).added == 1
    dataset = FaceDataset(str(out), 64)
    assert sorted(r["path"] for r in dataset.records) == sorted(
        str(p) for p in (first / "astronaut.jpg", first / "person0.jpg", second / "astronaut.jpg"))
    for i, record in enumerate(dataset.records):  # every photo loads from its own folder
        expected = Image.open(record["path"]).convert("RGB").resize((64, 64))
        assert abs(float(dataset.pixels(i)[0].mean()) - (np.asarray(expected, np.float32).mean() / 127.5 - 1)) < 0.05
    # Another recognizer's embeddings do not join the dataset.
    from idgen import FaceAnalyzer
    from idgen.testing.presets import write_random_recognizer

    other_pack = tmp_path / "other-pack"
    other_pack.mkdir()
    write_random_recognizer(str(other_pack / "arcface_random.onnx"), seed=5)  # same file name, other weights
    with pytest.raises(IDGenError, match="was embedded with arcface_random.onnx .* embeddings of two recognizers"):
        prepare_data(str(second), str(out), FaceAnalyzer(str(other_pack)), progress=False)
    # A new --min-face-size applies to the photos already prepared, both ways.
    sizes = {r["path"]: r["face_size"] for r in dataset.records}
    threshold = sorted(sizes.values())[1] + 1  # drops the two smallest faces
    report = prepare_data(str(first), str(out), analyzer, min_face_size=int(threshold), progress=False)
    assert report.total == 1
    skipped = [json.loads(line) for line in open(out / "skipped.jsonl")]
    assert sum(row["reason"].startswith("face too small") for row in skipped) == 2
    # Back to the default 64: this folder's photos dropped as too small are looked at again.
    dropped = [path for path, size in sizes.items() if size < threshold]
    back = [path for path in dropped if path.startswith(str(first)) and sizes[path] >= 64]
    assert back, sizes
    assert prepare_data(str(first), str(out), analyzer, progress=False).total == 1 + len(back)


@pytest.mark.slow
def test_a_finished_run_is_not_restarted_by_accident(tmp_path, data):
    run = tmp_path / "run"
    train(config(data, run, max_train_steps=2))
    with pytest.raises(IDGenError, match="already holds a run .* --resume latest .* --overwrite"):
        train(config(data, run, max_train_steps=2))
    train(config(data, run, max_train_steps=2), overwrite=True)
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == [1, 2]  # the old run's metrics are gone, not appended to
    with pytest.raises(IDGenError, match="pass only one"):
        train(config(data, run, max_train_steps=2), resume="latest", overwrite=True)


def test_instantid_ignores_a_faceid_lora_rank(capsys):
    cfg = AdapterTrainConfig(adapter_format="instantid", lora_rank=4)
    cfg.check()
    assert cfg.lora_rank is None and "lora_rank (4) is FaceID's LoRA" in capsys.readouterr().err


@pytest.mark.slow
def test_training_errors_are_one_line_under_accelerate_launch(tmp_path):
    """`accelerate launch -q` (as the README runs it): our one error line, no launcher traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
         os.path.join(REPO, "configs", "accelerate_cpu.yaml"), "-m", "idgen.train.adapter", "--config", str(bad)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr, result.stderr
    assert lines[-1].startswith("idgen: error:") and "unknown field 'learning_rat'" in lines[-1]


def test_masked_diffusion_loss():
    """face_loss_weight w: the face box's latent cells weigh 1 + w; w = 0 is the plain loss."""
    from idgen.train.adapter import denoising_loss, face_mask

    mask = face_mask(torch.tensor([[16.0, 32.0, 48.0, 64.0]]), (1, 4, 8, 8), 64)  # 8x8 latents of a 64 px image
    assert mask.shape == (1, 1, 8, 8) and mask.sum() == 4 * 4  # columns 2..5, rows 4..7
    assert mask[0, 0, 4:8, 2:6].all() and not mask[0, 0, :4].any()
    prediction = torch.randn(1, 4, 8, 8, requires_grad=True)
    target = torch.randn(1, 4, 8, 8)
    assert torch.equal(denoising_loss(prediction, target, mask, 0.0), torch.nn.functional.mse_loss(prediction, target))
    loss = denoising_loss(prediction, target, mask, 3.0)
    loss.backward()
    error = 2 * (prediction - target).detach() / prediction.numel()
    expected = error * (1 + 3.0 * mask)  # the face's gradient is 4x, the rest unchanged
    assert torch.allclose(prediction.grad, expected, atol=1e-7)


@pytest.mark.slow
def test_face_loss_weight_trains_other_weights(tmp_path, data):
    for item in FaceDataset(data, 64):  # the face box moves with the crop, around the keypoints
        (x1, y1, x2, y2), kps = item["face_box"].tolist(), item["kps"]
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
        inside = (kps[:, 0] >= x1) & (kps[:, 0] <= x2) & (kps[:, 1] >= y1) & (kps[:, 1] <= y2)
        assert inside.sum() >= 4, (item["face_box"], kps)
    plain = load_file(train(config(data, tmp_path / "plain", max_train_steps=2)))
    weighted = load_file(train(config(data, tmp_path / "face", max_train_steps=2, face_loss_weight=4.0)))
    key = "image_proj.proj.2.weight"
    assert not torch.equal(plain[key], weighted[key])
    with pytest.raises(IDGenError, match="face_loss_weight must not be negative"):
        train(config(data, tmp_path / "bad", face_loss_weight=-1.0))


@pytest.mark.slow
def test_editing_direction_loss(tmp_path, data, preset):
    """MasterWeaver's loss: 0 when the identity model's edit direction matches the base model's, 2
    when opposite; the base prediction is the plain UNet's (adapter and LoRA off); training with it
    gives other weights."""
    from diffusers import UNet2DConditionModel

    from idgen.train.adapter import TrainableIdentity, base_prediction, editing_direction_loss, load_base

    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert editing_direction_loss(a, a + b, a, a + 2 * b).abs().max() < 1e-6
    assert abs(float(editing_direction_loss(a, a + b, a, a - b)) - 2.0) < 1e-6
    pipe, _ = load_base(config(data, tmp_path / "base"))
    model = TrainableIdentity(pipe.unet, pipe.identity_adapter)
    assert model.lora  # the base prediction must switch FaceID's LoRA off
    noisy, timesteps, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    plain = UNet2DConditionModel.from_pretrained(preset.base, subfolder="unet")
    expected = plain(noisy, timesteps, encoder_hidden_states=text).sample
    with_identity = model(noisy, timesteps, text, torch.randn(1, 512))
    assert (with_identity - expected).abs().max() > 1e-3
    assert (base_prediction(model, noisy, timesteps, text) - expected).abs().max() < 1e-5
    plain_run = load_file(train(config(data, tmp_path / "plain", max_train_steps=2)))
    edited = load_file(train(config(data, tmp_path / "edit", max_train_steps=2, editing_direction_weight=1.0)))
    assert not torch.equal(plain_run["image_proj.proj.2.weight"], edited["image_proj.proj.2.weight"])
    with pytest.raises(IDGenError, match="needs \\{caption\\}"):
        train(config(data, tmp_path / "bad", editing_direction_weight=1.0, edit_prompts="smiling"))


@pytest.mark.slow
def test_face_attention_loss(tmp_path, data):
    """SeFi-IDE's face-wise attention loss: it reads the joint text+identity attention map of
    every identity layer; descending its gradient moves the identity tokens' map into the face box
    (and the text tokens' out of it); weight 0 is the plain loss; training with it gives other weights."""
    from idgen.train.adapter import TrainableIdentity, face_mask, load_base
    from idgen.train.face_attention import FaceAttentionLoss

    pipe, _ = load_base(config(data, tmp_path / "base"))
    model = TrainableIdentity(pipe.unet, pipe.identity_adapter)
    noisy, timesteps, text = torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), torch.randn(2, 77, 32)
    ids = torch.randn(2, 512)
    faces = face_mask(torch.tensor([[32.0, 16.0, 96.0, 96.0]] * 2), noisy.shape, 128)
    watcher = FaceAttentionLoss(pipe.unet, model.adapter)
    model.observer = watcher.observe
    trained = [p for p in model.adapter.parameters()]
    optimizer = torch.optim.Adam(trained, lr=0.02)
    losses = []
    for _ in range(6):
        watcher.start(faces, torch.tensor([True, True]))
        model(noisy, timesteps, text, ids)
        loss = watcher.loss()
        assert len(watcher.losses) == len(model.adapter.layers)  # every identity layer reported
        losses.append(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert 0 < losses[-1] < losses[0] - 0.01, losses
    watcher.start(faces, torch.tensor([False, False]))  # no sample has an identity: nothing to fit
    model(noisy, timesteps, text, ids)
    assert float(watcher.loss()) == 0.0
    watcher.close()
    assert not any(attn.to_k._forward_hooks for attn in watcher.attention.values())  # its hooks are gone
    plain = load_file(train(config(data, tmp_path / "plain", max_train_steps=2)))
    attended = load_file(train(config(data, tmp_path / "attn", max_train_steps=2, face_attention_loss_weight=1.0)))
    assert not torch.equal(plain["image_proj.proj.2.weight"], attended["image_proj.proj.2.weight"])
    with pytest.raises(IDGenError, match="face_attention_loss_weight must not be negative"):
        train(config(data, tmp_path / "bad", face_attention_loss_weight=-1.0))


def test_written_weights_follow_the_umask(tmp_path):
    """Exported adapters (safetensors, which writes 0600) and checkpoint files get the mode of any
    new file: 0666 less the umask."""
    import stat

    from accelerate import Accelerator

    from idgen.adapters import save_adapter_checkpoint
    from idgen.files import follow_umask
    from idgen.train.checkpoints import save_checkpoint

    model = torch.nn.Linear(2, 2)
    old = os.umask(0o022)
    try:
        save_adapter_checkpoint({"image_proj": {"w": torch.zeros(2)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(2)}},
                                str(tmp_path / "adapter.safetensors"))
        folder = save_checkpoint(Accelerator(cpu=True), str(tmp_path / "run"), 1, 2, model,
                                 torch.optim.SGD(model.parameters(), lr=0.1))
        lora = tmp_path / "lora.safetensors"
        lora.write_bytes(b"x")
        os.chmod(lora, 0o600)  # as diffusers' save_lora_weights leaves it
        follow_umask(str(lora))
    finally:
        os.umask(old)
    written = [tmp_path / "adapter.safetensors", lora, *[os.path.join(folder, name) for name in os.listdir(folder)]]
    assert len(written) >= 5
    assert {path: stat.S_IMODE(os.stat(path).st_mode) for path in written} == {path: 0o644 for path in written}


def test_a_dataset_stays_inside_its_folder(tmp_path, photos, analyzer):
    """Links that lead out of the photo folder are not followed (a photo, a caption, a subfolder),
    and a prepared index whose shard names a path outside the dataset is refused in one line."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "me.jpg").write_bytes((photos / "astronaut.jpg").read_bytes())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not a caption")
    (outside / "other.jpg").write_bytes((photos / "person0.jpg").read_bytes())
    os.symlink(outside / "secret.txt", folder / "me.txt")
    os.symlink(outside / "other.jpg", folder / "linked.jpg")
    os.symlink(outside, folder / "more")
    out = tmp_path / "prepared"
    assert prepare_data(str(folder), str(out), analyzer, progress=False).added == 1
    records = [json.loads(line) for line in open(out / "index.jsonl")]
    assert [(r["file"], r["caption"]) for r in records] == [("me.jpg", "")]
    FaceDataset(str(out), 64)
    (out / "index.jsonl").write_text(json.dumps({**records[0], "shard": "../../outside/x"}) + "\n")
    with pytest.raises(IDGenError, match="names the shard '../../outside/x', not one prepare-data writes"):
        FaceDataset(str(out), 64)
    (out / "index.jsonl").write_text(json.dumps({**records[0], "row": 7}) + "\n")
    with pytest.raises(IDGenError, match="record 1 points past the end of its shard"):
        FaceDataset(str(out), 64)
    (out / "index.jsonl").write_text("{not json\n")
    with pytest.raises(IDGenError, match="index.jsonl line 1 is not JSON"):
        FaceDataset(str(out), 64)


def test_a_bad_metadata_line_names_its_line(tmp_path, photos, analyzer):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "me.jpg").write_bytes((photos / "astronaut.jpg").read_bytes())
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "me.jpg", "text": "me"}) + "\n" + '{"file_name": "me.jpg",\n')
    with pytest.raises(IDGenError, match="metadata.jsonl line 2 is not JSON .*: fix or remove that line"):
        prepare_data(str(folder), str(tmp_path / "out"), analyzer, progress=False)
