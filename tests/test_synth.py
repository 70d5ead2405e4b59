"""``idgen synth``: sampled identities keep their minimum angle, the WebDataset shards read back
and match the identity folders, and the card's numbers are a recomputation from the files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from idgen.apps.cli import main
from idgen.apps.synth import SynthSettings, _rejection, card_numbers, sample_identities
from idgen.errors import IDGenError


def _angles(vectors: np.ndarray) -> np.ndarray:
    cos = vectors @ vectors.T
    return np.degrees(np.arccos(np.clip(cos[np.triu_indices(len(vectors), 1)], -1, 1)))


def test_sampled_identities_keep_their_angle():
    vectors = sample_identities(40, 85.0, seed=3)
    assert vectors.shape == (40, 512) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    assert _angles(vectors).min() >= 85.0
    assert np.array_equal(sample_identities(40, 85.0, seed=3), vectors)  # the seed decides
    with pytest.raises(IDGenError, match="lower --min-angle"):
        sample_identities(5, 179.0, seed=0, dim=8, tries=3)


def test_the_filter_says_why():
    settings = SynthSettings(1, 1, min_face_sim=0.5, max_other_sim=0.4)
    assert _rejection({"face": False}, settings) == "no face"
    assert _rejection({"face": True, "face_sim": 0.3, "other_sim": 0.1}, settings).startswith("FaceSim to its identity")
    assert _rejection({"face": True, "face_sim": 0.8, "other_sim": 0.6}, settings).startswith("FaceSim to another")
    assert _rejection({"face": True, "face_sim": 0.8, "other_sim": 0.2}, settings) is None
    records = [{"identity": i // 2, "rejected": None if i % 3 else "no face", "face_sim": 0.1 * i,
                "dlib": [1.0, float(i)], "attributes": {"age": "young adult" if i % 2 else "elderly"}} for i in range(6)]
    card = card_numbers(records, 3)
    assert card["images_kept"] == 4 and card["rejection_rate"] == {"no face": 2 / 6}
    assert card["dlib_intra"]["pairs"] == 1 and card["dlib_inter"]["pairs"] == 5  # kept: 1, 2 | 4, 5 of ids 0, 1, 2
    assert card["attributes"] == {"age": {"elderly": 2, "young adult": 2}}


@pytest.mark.slow
def test_synth_on_tiny_arc2face(tmp_path, cache, capsys):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "synth"
    args = ["synth", "--identities", "6", "--images-per-identity", "3", "--out", str(out), "--steps", "2",
            "--no-filter", "--shard-size", "8"]
    assert main(args) == 0
    vectors = np.load(out / "identities.npy")
    assert vectors.shape == (6, 512) and _angles(vectors).min() >= 75.0
    folders = sorted(p for p in (out / "identities").iterdir())
    assert [p.name for p in folders] == [f"{i:06d}" for i in range(6)]
    files = {f"{p.name}_{f.stem}": f.read_bytes() for p in folders for f in sorted(p.glob("*.jpg"))}
    assert len(files) == 18
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False))
    assert len(samples) == 18 and len(list((out / "shards").glob("*.tar"))) == math.ceil(18 / 8)
    for sample in samples:
        record = json.loads(sample["json"])
        assert sample["jpg"] == files[sample["__key__"]]
        assert np.array_equal(np.load(__import__("io").BytesIO(sample["npy"])), vectors[record["identity"]])
    records = [json.loads(line) for name in ("records.jsonl", "rejected.jsonl") for line in open(out / name)]
    card = json.loads((out / "card.json").read_text())
    assert card == card_numbers(sorted(records, key=lambda r: (r["identity"], r["image"])), 6)
    assert card["images_kept"] == 18 and "18 kept" in (out / "card.md").read_text()
    # Started again, nothing is rendered: the same card and files.
    journal = (out / "journal.jsonl").read_text()
    assert main(args) == 0
    assert (out / "journal.jsonl").read_text() == journal and json.loads((out / "card.json").read_text()) == card
