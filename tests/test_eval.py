"""Evaluation metrics on real photos, and `idgen eval` on the tiny preset."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from idgen.apps.cli import main
from idgen.apps.eval import ClipScorer, DlibRecognizer, face_similarity


@pytest.mark.slow
def test_independent_recognizer_ranks_same_person_above_different(astronaut, group_photo, analyzer):
    """dlib's real recognizer: the astronaut against a smaller recompressed copy and her mirror
    image scores above her against each of six other people."""
    second = DlibRecognizer()
    reference = second.descriptor(astronaut)
    buffer = io.BytesIO()
    Image.open(astronaut).resize((300, 300)).save(buffer, format="JPEG", quality=40)
    same = [second.similarity(reference, second.descriptor(buffer.getvalue())),
            second.similarity(reference, second.descriptor(ImageOps.mirror(Image.open(astronaut))))]
    group = Image.open(group_photo).convert("RGB")
    different = []
    for face in analyzer.analyze(group):
        x1, y1, x2, y2 = face.bbox
        margin = x2 - x1
        crop = group.crop((int(x1 - margin), int(y1 - margin), int(x2 + margin), int(y2 + margin))).resize((288, 288))
        different.append(second.similarity(reference, second.descriptor(crop)))
    assert len(different) == 6
    assert min(same) > max(different), (same, different)


def test_facesim(analyzer, astronaut):
    reference = analyzer.get_face(astronaut).embedding
    assert face_similarity(analyzer, str(astronaut), reference) == pytest.approx(1.0, abs=1e-5)
    assert face_similarity(analyzer, Image.new("RGB", (128, 128)), reference) is None


def test_clip_t_is_a_cosine(preset, astronaut):
    scorer = ClipScorer(preset.clip)
    score = scorer.score(Image.open(astronaut), "a photo of an astronaut")
    assert -1 <= score <= 1 and score != scorer.score(Image.open(astronaut), "a red car")


@pytest.mark.slow
def test_eval_report_on_the_tiny_preset(tmp_path, preset, astronaut, group_photo, capsys):
    refs = tmp_path / "refs"
    (refs / "eileen").mkdir(parents=True)
    Image.open(astronaut).save(refs / "eileen" / "a.jpg")
    ImageOps.mirror(Image.open(astronaut)).save(refs / "eileen" / "b.jpg")
    (refs / "other").mkdir()
    group = Image.open(group_photo).convert("RGB")
    from idgen import FaceAnalyzer

    x1, y1, x2, y2 = FaceAnalyzer(preset.face_pack).analyze(group)[0].bbox
    group.crop((int(x1 - 60), int(y1 - 60), int(x2 + 60), int(y2 + 60))).resize((256, 256)).save(refs / "other" / "c.jpg")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a person\n\na person in a garden\n")
    out = tmp_path / "report"
    code = main(["eval", "--refs", str(refs), "--prompts", str(prompts), "--out", str(out), "--seeds", "0,1",
                 "--steps", "2", "--height", "64", "--width", "64"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["images"] == 2 * 2 * 2 and set(report["per_identity"]) == {"eileen", "other"}
    assert report["config"]["prompts"] == ["a photo of a person", "a person in a garden"]
    from idgen.watermark import verify

    for sample in report["samples"]:
        assert os.path.exists(out / sample["file"]) and -1 <= sample["clip_t"] <= 1
        checked = verify(str(out / sample["file"]))
        assert checked["status"] == "idgen" and checked["metadata_matches"], checked
        assert sample["face_detected"] == (sample["facesim"] is not None)
    assert 0 <= report["summary"]["face_detection_rate"] <= 1
    # The grid: a reference column, then every prompt x seed (2 x 2), a row per identity.
    grid = Image.open(out / "grid.png").convert("RGB")
    assert grid.width == 112 + 192 + 2 * 2 * 192 and grid.height > 2 * 192
    eileen_top = grid.height - 2 * 192
    reference = grid.crop((112, eileen_top, 112 + 192, eileen_top + 192))
    assert np.array_equal(np.asarray(reference), np.asarray(ImageOps.fit(Image.open(refs / "eileen" / "a.jpg"), (192, 192))))
    seed1 = grid.crop((112 + 2 * 192, eileen_top + 96, 112 + 3 * 192, eileen_top + 192))  # below the FaceSim label
    expected = Image.open(out / "images" / "eileen" / "000-seed1.png").convert("RGB").resize((192, 192)).crop((0, 96, 192, 192))
    assert np.array_equal(np.asarray(seed1), np.asarray(expected))
    text = (out / "report.md").read_text()
    assert "| eileen |" in text and "random weights" in text and "![grid](grid.png)" in text
    assert main(["eval", "--refs", str(tmp_path / "none"), "--prompt", "p", "--out", str(out)]) == 2
    assert main(["eval", "--refs", str(refs), "--out", str(out)]) == 2
    assert "no prompt" in capsys.readouterr().err
    # --face-index picks the face of the reference photos (these have one each).
    assert main(["eval", "--refs", str(refs), "--prompt", "p", "--out", str(out), "--face-index", "1"]) == 2
    assert "face_index=1 but" in capsys.readouterr().err
