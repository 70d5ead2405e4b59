"""GGUF files of a model's weights, as llama.cpp's tools write them for diffusion models: linear
weights in Q8_0 blocks of 32, the rest as float32, under diffusers' key names (which diffusers'
``from_single_file`` reads as they are). For tests and CPU benchmarks of ``--gguf``."""

from __future__ import annotations

import numpy as np
from torch import nn


def write_gguf(model: nn.Module, path: str, architecture: str = "flux") -> int:
    """Write ``model``'s state dict to ``path``; return how many tensors went in as Q8_0."""
    import gguf  # lazy: optional dependency (idgen[quantize])

    writer = gguf.GGUFWriter(path, architecture)
    quantized = 0
    for name, tensor in model.state_dict().items():
        values = tensor.detach().float().cpu().numpy()
        if values.ndim == 2 and values.shape[-1] % 32 == 0 and name.endswith(".weight"):
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized
