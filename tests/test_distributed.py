"""Training on more than one process: `accelerate launch --multi_gpu --num_processes 2` on CPUs
(gloo) gives the weights of one process with the same global batch, resume included."""

import os
import socket
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from idgen.train.adapter import AdapterTrainConfig, train

from .test_train import config, data, photos  # noqa: F401  (fixtures)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cfg: AdapterTrainConfig, path, module: str = "idgen.train.adapter", *extra: str) -> str:
    path.write_text(yaml.safe_dump(vars(cfg)))
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "-q", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(free_port()), "-m", module, "--config", str(path), *extra],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, data):  # noqa: F811
    """Adapter training (FaceID MLP + LoRA, face-masked loss): one process with batches of 2 vs
    two processes with 1 each, the second run stopped at step 2 and resumed to step 4."""
    kwargs = dict(max_train_steps=4, checkpointing_steps=2, face_loss_weight=1.0)
    one = load_file(train(config(data, tmp_path / "one", train_batch_size=2, **kwargs)))
    out = launch(config(data, tmp_path / "two", train_batch_size=1, **dict(kwargs, max_train_steps=2)), tmp_path / "a.yaml")
    assert "exported" in out
    out = launch(config(data, tmp_path / "two", train_batch_size=1, **kwargs), tmp_path / "b.yaml", "idgen.train.adapter",
                 "--resume", "latest")
    assert "resumed from" in out and "at step 2" in out
    two = load_file(tmp_path / "two" / "adapter.safetensors")
    assert one.keys() == two.keys()
    # The float32 noise of one global batch computed as two halves: the same two samples as two
    # accumulated micro-batches in one process differ from the batch of 2 by 2.2e-5 (Adam's
    # first step scales every gradient to about the learning rate, rounding noise included).
    halves = load_file(train(config(data, tmp_path / "acc", train_batch_size=1, gradient_accumulation_steps=2, **kwargs)))
    noise = max(float((one[k] - halves[k]).abs().max()) for k in one)
    assert 0 < noise < 1e-4
    difference = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert difference <= 2 * noise, (difference, noise)
    moved = load_file(train(config(data, tmp_path / "other", train_batch_size=2, **dict(kwargs, seed=1))))
    assert max(float((one[k] - moved[k]).abs().max()) for k in one) > 100 * noise  # another seed: far off


@pytest.mark.slow
def test_reward_training_on_two_processes(tmp_path, data):  # noqa: F811
    """Reward fine-tuning (identity reward, plus the diffusion loss): the same check, resumed."""
    from idgen.train.reward import train as train_reward

    from .test_reward import reward_config

    kwargs = dict(max_train_steps=2, checkpointing_steps=1, diffusion_loss_weight=0.5)
    one = load_file(train_reward(reward_config(data, tmp_path / "one", train_batch_size=2, **kwargs))[0])
    halves = load_file(train_reward(reward_config(data, tmp_path / "acc", train_batch_size=1,
                                                  gradient_accumulation_steps=2, **kwargs))[0])
    launch(reward_config(data, tmp_path / "two", train_batch_size=1, **dict(kwargs, max_train_steps=1)),
           tmp_path / "a.yaml", "idgen.train.reward")
    out = launch(reward_config(data, tmp_path / "two", train_batch_size=1, **kwargs), tmp_path / "b.yaml",
                 "idgen.train.reward", "--resume", "latest")
    assert "resumed from" in out
    two = load_file(tmp_path / "two" / "reward.safetensors")
    noise = max(float((one[k] - halves[k]).abs().max()) for k in one)
    difference = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert noise < 1e-4 and difference <= max(2 * noise, 1e-6), (difference, noise)
