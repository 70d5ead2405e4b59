"""Face fix: faces of a real group photo repainted as another person; every other pixel kept."""

import numpy as np
import pytest
import torch
from PIL import Image

from idgen import start_session
from idgen.apps.cli import main
from idgen.apps.facefix import FaceFixOptions, face_fix
from idgen.errors import NoFaceError

from .conftest import embedding


def _fix(session, pipe, photo, faces, identity, **options):
    call = dict(session.call_kwargs("a photo of a person"), id_embeds=identity, generator=torch.Generator().manual_seed(0))
    return face_fix(pipe, photo, session.analyzer, faces, FaceFixOptions(**options), **call)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny", "tiny-sdxl"])
def test_only_the_chosen_faces_change(base, cache, group_photo, astronaut):
    session = start_session(base=base, steps=3)
    pipe = session.load()
    pipe.set_progress_bar_config(disable=True)
    source = np.asarray(Image.open(group_photo).convert("RGB"))
    identity = session.identity([astronaut])
    fixed, boxes = _fix(session, pipe, group_photo, [0, 2], identity, strength=0.8)
    fixed = np.asarray(fixed)
    assert fixed.shape == source.shape and len(boxes) == 2
    inside = np.zeros(source.shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        inside[y1:y2, x1:x2] = True
    assert np.array_equal(fixed[~inside], source[~inside])  # outside the crops: the input, exactly
    changed = np.any(fixed != source, axis=-1)
    assert changed.sum() > 500
    for x1, y1, x2, y2 in boxes:  # the border of each crop lies outside its oval's feather: kept
        assert not changed[y1, x1:x2].any() and not changed[y2 - 1, x1:x2].any()
    other, _ = _fix(session, pipe, group_photo, [0, 2], embedding(7, float(identity.norm())), strength=0.8)
    assert np.abs(np.asarray(other, int) - fixed).max() > 3  # the identity decides what is painted


@pytest.mark.slow
def test_faces_are_checked(cache, group_photo):
    session = start_session(steps=2)
    pipe = session.load()
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(NoFaceError, match=r"face 9 asked for, but the photo has 6 face\(s\)"):
        _fix(session, pipe, group_photo, [9], embedding(0))
    # the analyzer's Face objects stand for their numbers: the same repaint as by number
    faces = session.analyzer.analyze(Image.open(group_photo).convert("RGB"))
    by_face, _ = _fix(session, pipe, group_photo, [faces[1]], embedding(0))
    by_number, _ = _fix(session, pipe, group_photo, [1], embedding(0))
    assert np.array_equal(np.asarray(by_face), np.asarray(by_number))
    with pytest.raises(TypeError, match="face_fix takes face numbers or Face objects, not str"):
        _fix(session, pipe, group_photo, ["1"], embedding(0))
    with pytest.raises(NoFaceError, match="no face found to fix"):
        _fix(session, pipe, Image.new("RGB", (256, 256), (90, 140, 200)), None, embedding(0))


@pytest.mark.slow
def test_fix_from_the_command_line(cache, tmp_path, group_photo, astronaut, capsys):
    out = tmp_path / "fixed.png"
    common = ["fix", "--image", str(group_photo), "--face", str(astronaut), "--steps", "2"]
    assert main([*common, "--fix-index", "1", "--out", str(out), "--overwrite"]) == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.size == Image.open(group_photo).size
    assert image.text["face_fix"].startswith("1 face(s) repainted at strength 0.6 (crops ")
    assert image.text["source_image"] == str(group_photo) and image.text["method"] == "faceid"
    capsys.readouterr()
    assert main([*common, "--fix-index", "9", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "face 9 asked for, but the photo has 6 face(s)" in err[0]
    with pytest.raises(SystemExit):  # argparse: 0 < strength <= 1
        main([*common, "--strength", "1.5", "--out", str(tmp_path / "x.png")])


def test_generate_fix_faces_keeps_an_image_without_a_face(cache, tmp_path, astronaut, capsys):
    out = tmp_path / "g.png"
    assert main(["generate", "--face", str(astronaut), "--prompt", "p", "--steps", "1", "--height", "64", "--width",
                 "64", "--fix-faces", "--out", str(out), "--overwrite"]) == 0
    assert "no face found to fix" in capsys.readouterr().err  # the tiny preset paints noise
    assert Image.open(out).text["face_fix"] == "no face found"


def test_arc2face_has_no_face_fix(cache, tmp_path, astronaut, capsys):
    code = main(["generate", "--base", "tiny-arc2face", "--face", str(astronaut), "--fix-faces",
                 "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--fix-faces inpaints with FaceID or InstantID" in err[0]


@pytest.mark.slow
def test_several_people_each_face_takes_its_region_identity(cache, group_photo, astronaut):
    """With regions, each face of the group photo is repainted with the identity of the region its
    centre lies in: the left faces as with person A alone, the right ones as with person B alone."""
    from idgen.adapters.regions import Regions
    from idgen.apps.facefix import fix_faces

    session = start_session(steps=2)
    pipe = session.load()
    pipe.set_progress_bar_config(disable=True)
    photo = Image.open(group_photo).convert("RGB")
    a, b = {"id_embeds": embedding(1)}, {"id_embeds": embedding(2)}
    halves = Regions.from_spec([(0, 0, photo.width // 2, photo.height), (photo.width // 2, 0, photo.width, photo.height)])
    both, settings = fix_faces(session, pipe, photo, [a, b], "a photo of a person", 0, 0.8, regions=halves)
    only_a, _ = fix_faces(session, pipe, photo, a, "a photo of a person", 0, 0.8)
    only_b, _ = fix_faces(session, pipe, photo, b, "a photo of a person", 0, 0.8)
    assert settings["face_fix"].startswith("6 face(s) repainted")
    both, only_a, only_b = (np.asarray(image, dtype=int) for image in (both, only_a, only_b))
    for face in session.analyzer.analyze(photo):
        x1, y1, x2, y2 = face.bbox.astype(int)
        inner = (slice(y1 + (y2 - y1) // 4, y2 - (y2 - y1) // 4), slice(x1 + (x2 - x1) // 4, x2 - (x2 - x1) // 4))
        same, other = (only_a, only_b) if (x1 + x2) / 2 < photo.width / 2 else (only_b, only_a)
        assert np.abs(both[inner] - same[inner]).mean() < 0.25 * np.abs(both[inner] - other[inner]).mean()
