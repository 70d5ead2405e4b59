"""Differentiable ArcFace: iresnet, the ONNX runner against onnxruntime, torch alignment."""

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from idgen.faces import align_face, arcface_template, similarity_transform
from idgen.faces.arcface import DifferentiableArcFace, IResNet, OnnxRecognizer, align_faces, iresnet, similarity_matrices


def randomise_batchnorm(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def export(model, path):
    torch.onnx.export(model, torch.randn(1, 3, 112, 112), str(path), input_names=["input.1"], output_names=["embedding"],
                      dynamic_axes={"input.1": {0: "None"}}, opset_version=13, dynamo=False)


@pytest.mark.parametrize("layers", [(1, 1, 1, 1), (2, 2, 2, 2)])
@pytest.mark.slow
def test_onnx_runner_matches_onnxruntime(tmp_path, layers):
    torch.manual_seed(0)
    model = randomise_batchnorm(IResNet(layers, width=16 if layers == (1, 1, 1, 1) else 64))
    path = tmp_path / "rec.onnx"
    export(model, path)
    pixels = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input.1": ((pixels.numpy() * 255 - 127.5) / 127.5).astype(np.float32)})[0]
    runner = OnnxRecognizer(str(path))
    got = runner(pixels).detach().numpy()
    with torch.no_grad():
        direct = model((pixels - 0.5) / 0.5).numpy()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < 1e-4, np.abs(got - expected).max()
    assert np.abs(direct - expected).max() / scale < 1e-4


def test_r50_and_r100_shapes():
    r50 = iresnet("r50")
    assert sum(p.numel() for p in r50.parameters()) == pytest.approx(43.6e6, rel=0.01)  # w600k_r50's size
    assert len(iresnet("r100").layer3) == 30
    with torch.no_grad():
        assert r50.eval()(torch.zeros(1, 3, 112, 112)).shape == (1, 512)


def test_preset_recognizer_runs_in_torch(preset):
    import glob
    import os

    path = glob.glob(os.path.join(preset.face_pack, "*.onnx"))[0]
    pixels = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input.1": ((pixels.numpy() * 255 - 127.5) / 127.5).astype(np.float32)})[0]
    assert np.abs(OnnxRecognizer(path)(pixels).detach().numpy() - expected).max() < 1e-4


def test_torch_alignment_matches_cv2(analyzer, astronaut):
    rgb = np.asarray(Image.open(astronaut).convert("RGB"))
    kps = analyzer.get_face(astronaut).kps
    matrix = similarity_matrices(torch.from_numpy(kps)[None].double())[0].numpy()
    assert np.abs(matrix - similarity_transform(kps, arcface_template(112))).max() < 1e-3
    crop = align_faces(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, torch.from_numpy(kps)[None])
    expected = align_face(rgb, kps).astype(np.float32) / 255
    got = crop[0].permute(1, 2, 0).numpy()
    assert np.abs(got - expected).mean() < 2 / 255 and np.abs(got[8:-8, 8:-8] - expected[8:-8, 8:-8]).max() < 0.05


def test_gradients_reach_the_pixels(preset):
    import glob
    import os

    model = DifferentiableArcFace.from_onnx(glob.glob(os.path.join(preset.face_pack, "*.onnx"))[0])
    images = torch.rand(2, 3, 128, 128, requires_grad=True)
    kps = torch.tensor([[[45.0, 55.0], [83.0, 55.0], [64.0, 75.0], [49.0, 95.0], [79.0, 95.0]]] * 2)
    embedding = model(images, kps)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(2), atol=1e-5)
    (embedding @ torch.randn(512)).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in model.buffers())
