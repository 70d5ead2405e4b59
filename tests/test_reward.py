"""Reward-feedback fine-tuning: rewards, gradients, and the held-out identity reward rising."""

import numpy as np
import pytest
import torch
from PIL import Image

from idgen.faces.arcface import DifferentiableArcFace
from idgen.train.reward import RewardTrainConfig, setup, train
from idgen.train.rewards import AestheticHead, AestheticReward, IdentityReward

from .test_train import data, photos  # noqa: F401  (module fixtures: real photos, prepared)


def reward_config(prepared, output_dir, **overrides):
    values = dict(base="tiny", data=str(prepared), output_dir=str(output_dir), resolution=64, train_batch_size=2,
                  learning_rate=3e-3, max_train_steps=2, num_inference_steps=8, refl_min_step=4, refl_max_step=7,
                  face_alignment="reference", checkpointing_steps=100, eval_identities=2, eval_seeds=2,
                  export_name="reward.safetensors")
    values.update(overrides)
    return RewardTrainConfig(**values)


def test_identity_reward_reproduces_the_analyzer_and_penalises_no_face(analyzer, astronaut):
    recognizer = DifferentiableArcFace.from_onnx(analyzer.recognizer.model_file)
    reward = IdentityReward(recognizer, analyzer, "detect", no_face_reward=-0.5)
    face = analyzer.get_face(astronaut)
    image = torch.from_numpy(np.array(Image.open(astronaut).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    noise = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    rewards, found = reward(torch.cat([image, noise]), torch.from_numpy(np.stack([face.embedding] * 2)))
    assert found.tolist() == [True, False]
    assert rewards[0] > 0.99  # the torch path (grid_sample alignment, ONNX in torch) matches onnxruntime + cv2
    assert rewards[1] == -0.5


@pytest.mark.slow
def test_gradients_reach_the_trained_parameters_only(tmp_path, data):  # noqa: F811
    from accelerate import Accelerator

    for target in ("adapter", "lora"):
        pipe, model, refl, train_set, _ = setup(reward_config(data, tmp_path / target, train_target=target), Accelerator())
        batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=2)))
        batch["position"] = torch.arange(2)
        loss, metrics = refl.loss(model, batch, 0)
        loss.backward()
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert trained and all(g is not None for g in grads)
        # A LoRA starts with up = 0, so only its up matrices move on the first step.
        assert sum(bool(g.abs().sum() > 0) for g in grads) >= (len(grads) // 2 if target == "lora" else len(grads))
        frozen = [p for module in (pipe.unet, pipe.vae, pipe.text_encoder) for p in module.parameters() if id(p) not in trained]
        assert frozen and all(p.grad is None for p in frozen)
        assert all(not b.requires_grad for b in refl.identity.recognizer.buffers())
        if target == "lora":
            assert all("lora" in n for n, p in pipe.unet.named_parameters() if id(p) in trained)
            assert model.adapter.projection.proj[0].weight.grad is None  # the identity adapter stays as it is
        assert 0 < metrics["identity_reward"] <= 1


@pytest.mark.slow
def test_held_out_identity_reward_rises(tmp_path, data):  # noqa: F811
    path, before, after = train(reward_config(data, tmp_path / "run", max_train_steps=30, checkpointing_steps=10))
    print(f"held-out identity reward: before {before['identity_reward']:.4f}, after {after['identity_reward']:.4f}")
    assert after["identity_reward"] > before["identity_reward"] + 0.01
    from idgen import IDStableDiffusionPipeline
    from idgen.testing.presets import get_preset

    pipe = IDStableDiffusionPipeline.from_pretrained(get_preset("tiny").base)
    pipe.load_identity_adapter(path)  # the export loads like any adapter


@pytest.mark.slow
def test_aesthetic_reward_with_a_tiny_clip(tmp_path, data):  # noqa: F811
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                          num_attention_heads=4, image_size=32, patch_size=8,
                                                          projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    save_file(AestheticHead(16).state_dict(), str(tmp_path / "head.safetensors"))
    model = AestheticReward.from_pretrained(str(tmp_path / "clip"), str(tmp_path / "head.safetensors"))
    images = torch.rand(2, 3, 64, 48, requires_grad=True)
    scores = model(images)
    assert scores.shape == (2,)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    config = reward_config(data, tmp_path / "run", aesthetic_reward_weight=0.5, aesthetic_model=str(tmp_path / "clip"),
                           aesthetic_head=str(tmp_path / "head.safetensors"))
    _, before, after = train(config)
    assert "aesthetic_reward" in before and np.isfinite(after["aesthetic_reward"])
    with pytest.raises(Exception, match="aesthetic_model and aesthetic_head"):
        train(reward_config(data, tmp_path / "bad", aesthetic_reward_weight=0.5))
