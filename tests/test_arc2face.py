import os
import shutil

import numpy as np
import pytest
import torch

from idgen import FaceAnalyzer, IDArc2FacePipeline
from idgen.pipelines.arc2face import ID_PROMPT
from idgen.testing.presets import get_preset, tiny_arc2face_models, tiny_clip_tokenizer, write_random_recognizer

STEPS = 3


@pytest.fixture(scope="module")
def arc2face(cache, analyzer):
    preset = get_preset("tiny-arc2face", root=str(cache))
    pipe = IDArc2FacePipeline.from_arc2face(preset.adapter, base_model=preset.base)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, **kwargs):
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_official_layout_round_trip(arc2face, cache):
    folder = get_preset("tiny-arc2face", root=str(cache)).adapter
    assert sorted(os.listdir(folder)) == ["arc2face", "encoder"]
    encoder, unet = tiny_arc2face_models(tiny_clip_tokenizer(), seed=0)
    for built, loaded in ((encoder, arc2face.text_encoder), (unet, arc2face.unet)):
        expected, got = built.state_dict(), loaded.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_identity_replaces_the_id_token_embedding(arc2face):
    emb = torch.nn.functional.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    states = arc2face.encode_id_prompt(emb, torch.device("cpu"))
    assert states.shape == (2, 77, 512)
    # Reference: the same encoder whose "id" vocabulary row *is* the identity vector.
    token = arc2face.tokenizer("id", add_special_tokens=False).input_ids[0]
    ids = arc2face.tokenizer(ID_PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    table = arc2face.text_encoder.get_input_embeddings().weight
    original = table[token].clone()
    try:
        for i in range(2):
            with torch.no_grad():
                table[token] = emb[i]
            assert torch.allclose(arc2face.text_encoder(ids)[0][0], states[i], atol=1e-5)
    finally:
        with torch.no_grad():
            table[token] = original
    assert (states[0] - states[1]).abs().max() > 1e-3


@pytest.mark.slow
def test_generation_from_photos_and_embeddings(arc2face, analyzer, astronaut):
    from_photo = run(arc2face, face_image=str(astronaut))
    emb = torch.from_numpy(analyzer.get_face(astronaut).embedding)
    assert np.array_equal(from_photo, run(arc2face, id_embeds=emb))
    other = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(3)), dim=0)
    assert np.abs(run(arc2face, id_embeds=other) - from_photo).max() > 1e-2
    assert np.abs(run(arc2face, id_embeds=emb, negative_id_embeds=other) - from_photo).max() > 1e-3
    two = run(arc2face, id_embeds=torch.stack([emb, other]))
    assert two.shape[0] == 2
    with pytest.raises(ValueError, match="no prompt"):
        arc2face(prompt="a person", id_embeds=emb)
    # prompt stands first, as in the other pipelines: positional calls fail with the same message
    with pytest.raises(ValueError, match="no prompt"):
        arc2face("a person", id_embeds=emb)
    # diffusers' prompt arguments are in the signature, and refused in one line naming them
    with pytest.raises(ValueError, match="takes no negative_prompt, clip_skip: the identity is its whole condition"):
        arc2face(id_embeds=emb, negative_prompt="blurry", clip_skip=1)
    # numpy arrays are embeddings too (float64 included), as in the other pipelines
    assert np.abs(run(arc2face, id_embeds=emb.numpy().astype(np.float64)) - from_photo).max() <= 1e-5


def test_arcface_onnx_wins_in_an_antelopev2_pack(tmp_path, preset):
    """Arc2Face's recognizer (arcface.onnx) is taken before glintr100.onnx, as insightface does."""
    pack = tmp_path / "antelopev2"
    pack.mkdir()
    write_random_recognizer(str(pack / "glintr100.onnx"), seed=1)
    write_random_recognizer(str(pack / "arcface.onnx"), seed=2)
    assert FaceAnalyzer(str(pack)).info["recognizer"] == "arcface.onnx"
    shutil.rmtree(pack)


@pytest.mark.slow
def test_cli_arc2face(tmp_path, cache, astronaut, capsys):
    from PIL import Image

    from idgen.apps.cli import main

    out = tmp_path / "a2f.png"
    assert main(["generate", "--base", "tiny-arc2face", "--face", str(astronaut), "--out", str(out), "--overwrite",
                 "--steps", "2", "--height", "64", "--width", "64"]) == 0
    meta = Image.open(out).text
    assert meta["method"] == "arc2face" and meta["guidance"] == "3.0"
    assert not {"prompt", "id_scale", "id_window"} & set(meta), "Arc2Face records only what acted"
    capsys.readouterr()
    # Flags Arc2Face has no use for: one warning, the same pixels, and not in the metadata.
    ignored = tmp_path / "ignored.png"
    assert main(["generate", "--base", "tiny-arc2face", "--face", str(astronaut), "--out", str(ignored), "--steps", "2",
                 "--height", "64", "--width", "64", "--prompt", "a cat", "--id-scale", "0.3", "--id-start", "0.5"]) == 0
    err = capsys.readouterr().err
    assert err.count("ignoring --prompt, --id-scale, --id-start") == 1
    assert np.array_equal(np.asarray(Image.open(ignored)), np.asarray(Image.open(out)))
    assert "prompt" not in Image.open(ignored).text
    assert main(["generate", "--face", str(astronaut), "--out", str(out), "--overwrite"]) == 2
    assert "--prompt is required" in capsys.readouterr().err
