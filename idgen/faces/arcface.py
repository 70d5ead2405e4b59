"""ArcFace in torch, differentiable: insightface's iresnet architectures, a torch runner for
insightface's ONNX recognizers (``w600k_r50.onnx``, ``glintr100.onnx``, ...), and face alignment
with ``affine_grid`` / ``grid_sample`` so gradients reach the pixels of a generated image.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .alignment import arcface_template

# ------------------------------------------------------------------------------ iresnet
IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    """iresnet's residual unit: BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN, plus shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """insightface's ArcFace backbone: 112x112 RGB in [-1, 1] -> 512-d (un-normalised) embedding."""

    def __init__(self, layers: tuple[int, ...] = IRESNET_LAYERS["r50"], num_features: int = 512, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        stages, inplanes = [], width
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stages.append(nn.Sequential(IBasicBlock(inplanes, planes, 2), *[IBasicBlock(planes, planes) for _ in range(blocks - 1)]))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.fc = nn.Linear(inplanes * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


def iresnet(name: str = "r50", **kwargs) -> IResNet:
    """An iresnet by insightface's name: r18, r34, r50 (w600k_r50) or r100 (glintr100)."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown iresnet {name!r}: choose one of {', '.join(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[name], **kwargs)


# ------------------------------------------------------------------------------ ONNX in torch
def _attrs(node) -> dict:
    from onnx import helper  # lazy: 0.8 s to import, for converting models only

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxRecognizer(nn.Module):
    """Runs an insightface recognition ONNX graph with torch ops, so it is differentiable.

    Covers the operators of iresnet exports (Conv, BatchNormalization, PRelu, Add, Flatten, Gemm,
    ...) and of MXNet conversions (input Sub/Mul). Weights become buffers: the recognizer is
    frozen; gradients flow to its input.
    """

    SUPPORTED = {"Conv", "BatchNormalization", "PRelu", "Relu", "Add", "Sub", "Mul", "Div", "Flatten", "Gemm",
                 "MatMul", "Reshape", "Constant", "Identity", "Dropout", "GlobalAveragePool", "Transpose"}

    def __init__(self, path: str):
        super().__init__()
        import onnx  # lazy: 0.8 s to import, for converting models only
        from onnx import numpy_helper  # lazy: 0.8 s to import, for converting models only

        try:
            model = onnx.load(path)
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable ONNX model ({type(err).__name__}): download it again") from None
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node} - self.SUPPORTED)
        if unsupported:
            raise CheckpointError(f"{path} uses ONNX operators idgen cannot run in torch: {', '.join(unsupported)}")
        self._names: dict[str, str] = {}
        for index, tensor in enumerate(graph.initializer):
            key = f"w{index}_" + re.sub(r"\W", "_", tensor.name)[:40]
            self._names[tensor.name] = key
            self.register_buffer(key, torch.from_numpy(numpy_helper.to_array(tensor).copy()))
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        initialized = {t.name for t in graph.initializer}
        self.input_name = next(i.name for i in graph.input if i.name not in initialized)
        self.output_name = graph.output[0].name
        # insightface's rule: MXNet conversions normalise inside the graph (Sub and Mul up front).
        head = [n.name for n in graph.node[:8]]
        self.normalises_input = any(n.startswith(("Sub", "_minus")) for n in head) and any(n.startswith(("Mul", "_mul")) for n in head)

    def _value(self, values: dict, name: str):
        if name in values:
            return values[name]
        return getattr(self, self._names[name])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw embedding of aligned faces: ``pixels`` (B, 3, 112, 112) RGB in [0, 1]."""
        x = pixels * 255.0 if self.normalises_input else (pixels * 255.0 - 127.5) / 127.5
        values = {self.input_name: x}
        for op, inputs, outputs, attrs in self.nodes:
            args = [self._value(values, name) if name else None for name in inputs]
            values[outputs[0]] = self._run(op, args, attrs)
        return values[self.output_name]

    @staticmethod
    def _run(op: str, args: list, attrs: dict):
        if op == "Conv":
            pads = attrs.get("pads", [0, 0, 0, 0])
            x = args[0]
            if pads[:2] != pads[2:]:
                x, pads = F.pad(x, (pads[1], pads[3], pads[0], pads[2])), [0, 0]
            return F.conv2d(x, args[1], args[2] if len(args) > 2 else None, attrs.get("strides", [1, 1]),
                            pads[:2], attrs.get("dilations", [1, 1]), attrs.get("group", 1))
        if op == "BatchNormalization":
            return F.batch_norm(args[0], args[3], args[4], args[1], args[2], False, 0.0, attrs.get("epsilon", 1e-5))
        if op == "PRelu":
            slope = args[1]
            if args[0].ndim == 4 and slope.ndim == 1:
                slope = slope.reshape(1, -1, 1, 1)
            return torch.where(args[0] >= 0, args[0], args[0] * slope)
        if op == "Relu":
            return F.relu(args[0])
        if op in ("Add", "Sub", "Mul", "Div"):
            return getattr(torch, op.lower())(args[0], args[1])
        if op == "Flatten":
            return torch.flatten(args[0], attrs.get("axis", 1))
        if op == "Gemm":
            a = args[0].t() if attrs.get("transA", 0) else args[0]
            b = args[1].t() if attrs.get("transB", 0) else args[1]
            out = attrs.get("alpha", 1.0) * (a @ b)
            return out + attrs.get("beta", 1.0) * args[2] if len(args) > 2 and args[2] is not None else out
        if op == "MatMul":
            return args[0] @ args[1]
        if op == "Reshape":
            shape = [int(s) for s in args[1].tolist()]
            shape = [args[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return args[0].reshape(shape)
        if op == "Constant":
            from onnx import numpy_helper  # lazy: 0.8 s to import, for converting models only

            return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
        if op == "Transpose":
            return args[0].permute(*attrs["perm"])
        if op == "GlobalAveragePool":
            return args[0].mean(dim=(2, 3), keepdim=True)
        return args[0]  # Identity, Dropout (inference)


# ------------------------------------------------------------------------------ alignment
def similarity_matrices(kps: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Batched least-squares similarity (Umeyama) from keypoints (B, 5, 2) to the ArcFace
    template: (B, 2, 3) matrices mapping image pixels to crop pixels (as ``similarity_transform``)."""
    dst = torch.as_tensor(arcface_template(size), dtype=kps.dtype, device=kps.device).expand_as(kps)
    src_mean, dst_mean = kps.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    src_c, dst_c = kps - src_mean, dst - dst_mean
    cov = dst_c.transpose(1, 2) @ src_c / kps.shape[1]
    u, s, vt = torch.linalg.svd(cov)
    d = torch.ones_like(s)
    d[:, 1] = torch.where(torch.linalg.det(cov) < 0, -1.0, 1.0)
    rotation = u @ torch.diag_embed(d) @ vt
    scale = (s * d).sum(1) / src_c.pow(2).sum((1, 2)).div(kps.shape[1])
    linear = scale[:, None, None] * rotation
    shift = dst_mean.transpose(1, 2) - linear @ src_mean.transpose(1, 2)
    return torch.cat([linear, shift], dim=2)


def align_faces(images: torch.Tensor, kps: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiable ``align_face``: crops (B, 3, size, size) of ``images`` (B, 3, H, W) with the
    keypoints on the ArcFace template; bilinear, zeros outside, gradients flow to ``images``."""
    batch, _, height, width = images.shape
    matrix = similarity_matrices(kps.to(images.dtype), size)
    full = torch.cat([matrix, torch.tensor([0.0, 0.0, 1.0], dtype=images.dtype, device=images.device).expand(batch, 1, 3)], 1)
    inverse = torch.linalg.inv(full)[:, :2]  # crop pixels -> image pixels
    # Normalised coordinates (align_corners=False): pixel p <-> (2p + 1) / n - 1.
    to_pixels = torch.tensor([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]],
                             dtype=images.dtype, device=images.device)
    to_normal = torch.tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1]],
                             dtype=images.dtype, device=images.device)
    theta = to_normal @ torch.cat([inverse, full[:, 2:]], 1) @ to_pixels
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DifferentiableArcFace(nn.Module):
    """Aligned-face embeddings with gradients: ``embed(images, kps)`` -> L2-normalised (B, 512)."""

    def __init__(self, recognizer: nn.Module, size: int = 112):
        super().__init__()
        self.recognizer = recognizer.eval().requires_grad_(False)
        self.size = size

    @classmethod
    def from_onnx(cls, path: str) -> DifferentiableArcFace:
        return cls(OnnxRecognizer(path))

    def forward(self, images: torch.Tensor, kps: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W) RGB in [0, 1]; ``kps`` (B, 5, 2) in their pixels."""
        return F.normalize(self.recognizer(align_faces(images, kps, self.size)).float(), dim=-1)

