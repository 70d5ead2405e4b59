import os

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from idgen import CheckpointError, ModelNotFoundError
from idgen.adapters import (
    FaceIDProjection,
    IdentityAdapter,
    IdentityAttention,
    detect_format,
    load_adapter_state_dict,
    resolve_checkpoint_file,
    save_adapter_checkpoint,
)
from idgen.adapters.attention import IdentityCall
from idgen.adapters.context import open_identity
from idgen.testing.presets import random_faceid_plus_state_dict, random_faceid_state_dict


class Payload:
    """Any class: a pickle of it needs code, which weights_only loading refuses."""


@pytest.fixture(scope="module")
def unet(preset):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(preset.base, subfolder="unet")


def test_identity_branch_adds_to_plain_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    layer = IdentityAttention(hidden_size=32, cross_attention_dim=24, heads=4)
    adapter = IdentityAdapter(torch.nn.Identity(), {"attn": layer})
    adapter.attach(torch.nn.ModuleDict({"attn": attn}))
    hidden, text, identity = torch.randn(2, 10, 32), torch.randn(2, 7, 24), torch.randn(2, 4, 24)
    plain = attn(hidden, text)
    scale = torch.tensor(0.0)
    call = IdentityCall(adapter)
    call.set_tokens(identity, {"attn": scale})
    with open_identity(call):
        assert torch.allclose(attn(hidden, text), plain, atol=1e-6)
        # With a scale, the difference is exactly scale x (identity attention through to_out's linear part).
        scale.fill_(0.5)
        half = attn(hidden, text)
        scale.fill_(1.0)
        full = attn(hidden, text)
        assert torch.allclose(full - plain, 2 * (half - plain), atol=1e-5)
        assert (full - plain).abs().max() > 1e-2
        # Whatever processor computes the text attention, the identity branch stays.
        attn.set_processor(AttnProcessor2_0())
        assert torch.allclose(attn(hidden, text), full, atol=1e-6)
    assert torch.equal(attn(hidden, text), plain)  # outside the call: plain
    call.set_tokens(identity[:1])
    with open_identity(call), pytest.raises(ValueError, match="batch of 1"):
        attn(hidden, text)
    adapter.detach()
    with open_identity(call):
        assert torch.equal(attn(hidden, text), plain)


def test_projection_matches_the_reference_computation():
    torch.manual_seed(0)
    model = FaceIDProjection(cross_attention_dim=16, num_tokens=4).eval()
    x = torch.randn(3, 512)
    expected = model.proj[2](torch.nn.functional.gelu(model.proj[0](x))).reshape(3, 4, 16)
    expected = torch.nn.functional.layer_norm(expected, (16,), model.norm.weight, model.norm.bias)
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert set(model.state_dict()) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}


def test_bin_and_safetensors_forms_load_the_same_tensors(tmp_path, unet):
    state = random_faceid_state_dict(unet, seed=3)
    save_adapter_checkpoint(state, str(tmp_path / "a.safetensors"))
    save_adapter_checkpoint(state, str(tmp_path / "a.bin"))
    for name in ("a.safetensors", "a.bin"):
        loaded = load_adapter_state_dict(str(tmp_path / name))
        for group in ("image_proj", "ip_adapter"):
            assert loaded[group].keys() == state[group].keys()
            assert all(torch.equal(loaded[group][k], state[group][k]) for k in state[group])
    spec = detect_format(state)
    assert (spec.format, spec.cross_attention_dim, spec.num_tokens, spec.lora_rank) == ("faceid", 32, 4, 8)


def test_format_detection(unet):
    faceid_plus = random_faceid_plus_state_dict(unet, clip_embed_dim=48)
    instantid = {
        "image_proj": {"latents": torch.zeros(1, 16, 1280), "proj_in.weight": torch.zeros(1280, 512),
                       "proj_out.weight": torch.zeros(2048, 1280)},
        "ip_adapter": {},
    }
    spec = detect_format(faceid_plus)
    assert (spec.format, spec.cross_attention_dim, spec.num_tokens, spec.lora_rank) == ("faceid_plus", 32, 4, 8)
    spec = detect_format(instantid)
    assert (spec.format, spec.cross_attention_dim, spec.num_tokens) == ("instantid", 2048, 16)
    with pytest.raises(CheckpointError, match="unknown image_proj layout"):
        detect_format({"image_proj": {"weird": torch.zeros(1)}, "ip_adapter": {}}, "x.bin")


def test_unreadable_checkpoints_name_the_file(tmp_path, unet):
    good = tmp_path / "good.safetensors"
    save_adapter_checkpoint(random_faceid_state_dict(unet), str(good))
    for suffix in (".safetensors", ".bin"):
        source = tmp_path / f"src{suffix}"
        save_adapter_checkpoint(random_faceid_state_dict(unet), str(source))
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        with pytest.raises(CheckpointError, match=f"cut{suffix}.*truncated"):
            load_adapter_state_dict(str(cut))
    pickled = tmp_path / "code.bin"
    torch.save({"image_proj": Payload()}, pickled)
    with pytest.raises(CheckpointError, match="code.bin"):
        load_adapter_state_dict(str(pickled))
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"text_model.weight": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not an identity adapter checkpoint"):
        load_adapter_state_dict(str(other))
    # Families recognised by their keys that other pipelines run: named, not "unknown layout".
    photomaker = tmp_path / "photomaker-v2.bin"
    torch.save({"id_encoder": {"fuse_module.mlp1.fc1.weight": torch.zeros(2)}, "lora_weights": {}}, photomaker)
    with pytest.raises(CheckpointError, match="photomaker-v2.bin is a PhotoMaker checkpoint.*IDPhotoMakerPipeline"):
        load_adapter_state_dict(str(photomaker))
    pulid = tmp_path / "pulid_v1.1.safetensors"
    save_file({"id_adapter.body.0.weight": torch.zeros(2), "id_adapter_attn_layers.1.id_to_k.weight": torch.zeros(2)},
              str(pulid))
    with pytest.raises(CheckpointError, match="looks like a PuLID checkpoint but id_adapter lacks"):
        detect_format(load_adapter_state_dict(str(pulid)), str(pulid))


def test_resolve_checkpoint_file(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.safetensors").write_bytes(b"")
    assert resolve_checkpoint_file(tmp_path / "one").endswith("x.safetensors")
    (tmp_path / "one" / "y.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="weight_name"):
        resolve_checkpoint_file(tmp_path / "one")
    assert resolve_checkpoint_file(tmp_path, "y.bin", "one").endswith(os.path.join("one", "y.bin"))
    with pytest.raises(ModelNotFoundError, match="weight_name"):
        resolve_checkpoint_file("h94/IP-Adapter-FaceID")
    with pytest.raises(ModelNotFoundError, match="neither an existing file"):
        resolve_checkpoint_file("./nowhere/adapter.bin")


def _faceid(unet, **changes):
    state = random_faceid_state_dict(unet, lora_rank=4)
    for key, value in changes.items():
        group, name = key.split(":")
        if value is None:
            del state[group][name]
        else:
            state[group][name] = value
    return state


@pytest.mark.parametrize(
    "case, match",
    [
        ("instantid_partial", "lacks proj_out.weight"),
        ("faceid_plus_partial", "lacks norm.weight"),
        ("scalar_norm", "norm.weight has shape \\(\\), too few dimensions"),
        ("lora_input_size", "ip_adapter.1.to_k_lora.down.weight has shape \\(4, 25\\)"),
        ("lora_bool", "to_q_lora.up.weight has dtype bool"),
        ("lora_int64", "to_q_lora.up.weight has dtype int64"),
        ("lora_uint8", "to_q_lora.up.weight has dtype uint8"),
        ("projection_256", "takes 256-d vectors but ArcFace embeddings are 512-d"),
        ("nan", "ip_adapter.1.to_k_ip.weight holds NaN or Inf"),
        ("inf", "image_proj.proj.0.bias holds NaN or Inf"),
        ("huge", "ip_adapter.1.to_v_ip.weight holds values up to 1e\\+30, far past any trained adapter's"),
    ],
)
def test_malformed_adapters_are_refused_at_load_with_one_line(pipe, unet, case, match):
    from idgen.testing.presets import random_instantid_state_dict

    lora_up = _faceid(unet)["ip_adapter"]["0.to_q_lora.up.weight"]
    states = {
        "instantid_partial": lambda: {**random_instantid_state_dict(unet), "image_proj": {
            k: v for k, v in random_instantid_state_dict(unet)["image_proj"].items() if k != "proj_out.weight"}},
        "faceid_plus_partial": lambda: {"image_proj": {"perceiver_resampler.proj_in.weight": torch.zeros(8, 8)},
                                        "ip_adapter": {}},
        "scalar_norm": lambda: _faceid(unet, **{"image_proj:norm.weight": torch.tensor(1.0)}),
        "lora_input_size": lambda: _faceid(unet, **{"ip_adapter:1.to_k_lora.down.weight": torch.zeros(4, 25)}),
        "lora_bool": lambda: _faceid(unet, **{"ip_adapter:0.to_q_lora.up.weight": lora_up > 0}),
        "lora_int64": lambda: _faceid(unet, **{"ip_adapter:0.to_q_lora.up.weight": lora_up.long()}),
        "lora_uint8": lambda: _faceid(unet, **{"ip_adapter:0.to_q_lora.up.weight": lora_up.to(torch.uint8)}),
        "projection_256": lambda: _faceid(unet, **{"image_proj:proj.0.weight": torch.zeros(1024, 256)}),
        "nan": lambda: _faceid(unet, **{"ip_adapter:1.to_k_ip.weight": torch.full_like(
            _faceid(unet)["ip_adapter"]["1.to_k_ip.weight"], float("nan"))}),
        "inf": lambda: _faceid(unet, **{"image_proj:proj.0.bias": torch.full((1024,), float("inf"))}),
        "huge": lambda: _faceid(unet, **{"ip_adapter:1.to_v_ip.weight": torch.full_like(
            _faceid(unet)["ip_adapter"]["1.to_v_ip.weight"], 1e30)}),
    }
    before = pipe.identity_adapter
    with pytest.raises(CheckpointError, match=match) as error:
        pipe.load_identity_adapter(states[case]())
    assert "\n" not in str(error.value)
    assert pipe.identity_adapter is before  # the pipeline keeps the adapter it had
