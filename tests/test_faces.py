import io
import os
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from idgen import FaceAnalyzer, ModelNotFoundError, NoFaceError
from idgen.faces import ARCFACE_TEMPLATE, align_face, arcface_template, dlib_models_dir, similarity_transform

# Hand-checked positions on the astronaut photo (pupil centres, nose tip, mouth corners).
ASTRONAUT_KPS = np.array([[203, 101.5], [247, 104], [225, 127], [201, 139], [245, 141]])


def test_similarity_transform_recovers_a_known_transform():
    angle, scale, shift = np.deg2rad(17), 2.5, np.array([30.0, -12.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = ARCFACE_TEMPLATE @ rotation.T + shift
    matrix = similarity_transform(moved, ARCFACE_TEMPLATE)
    back = moved @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(back - ARCFACE_TEMPLATE).max() < 1e-3


def test_template_sizes():
    assert np.allclose(arcface_template(224), ARCFACE_TEMPLATE * 2)
    assert np.allclose(arcface_template(128)[:, 0], ARCFACE_TEMPLATE[:, 0] + 8)
    with pytest.raises(ValueError):
        arcface_template(100)


def test_keypoints_land_on_eyes_nose_and_mouth(analyzer, astronaut):
    faces = analyzer.analyze(astronaut)
    assert len(faces) == 1
    face = faces[0]
    assert np.abs(face.kps - ASTRONAUT_KPS).max() < 5, face.kps
    x1, y1, x2, y2 = face.bbox
    assert (face.kps[:, 0] > x1).all() and (face.kps[:, 0] < x2).all()
    assert (face.kps[:, 1] > y1).all() and (face.kps[:, 1] < y2).all()
    assert face.det_score > 0.2


def test_aligned_crop_puts_the_keypoints_on_the_template(analyzer, astronaut):
    face = analyzer.get_face(astronaut)
    assert face.aligned.shape == (112, 112, 3) and face.aligned.dtype == np.uint8
    matrix = similarity_transform(face.kps, ARCFACE_TEMPLATE)
    mapped = face.kps @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 6  # a smiling frontal face fits the template closely
    # Same estimate as insightface's norm_crop (scikit-image's least-squares similarity).
    from skimage.transform import SimilarityTransform

    reference = SimilarityTransform()
    reference.estimate(face.kps, ARCFACE_TEMPLATE)
    assert np.abs(reference.params[:2] - matrix).max() < 1e-3
    assert np.array_equal(face.aligned, align_face(np.asarray(Image.open(astronaut).convert("RGB")), face.kps))
    # The crop is the face: the detector finds it again, centred.
    again = analyzer.analyze(cv2.resize(face.aligned, (448, 448)))
    assert len(again) == 1 and abs((again[0].bbox[0] + again[0].bbox[2]) / 2 - 224) < 30


def test_embedding_is_unit_float32_and_deterministic(analyzer, astronaut):
    first, second = analyzer.get_face(astronaut), analyzer.get_face(str(astronaut))
    assert first.embedding.shape == (512,) and first.embedding.dtype == np.float32
    assert abs(np.linalg.norm(first.embedding) - 1) < 1e-5
    assert np.array_equal(first.embedding, second.embedding)
    assert analyzer.info["recognizer_random_weights"] is True


def test_group_photo_sorted_largest_first_and_face_index(analyzer, group_photo):
    faces = analyzer.analyze(group_photo)
    assert len(faces) == 6
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)
    assert np.array_equal(analyzer.get_face(group_photo, 2).kps, faces[2].kps)
    with pytest.raises(NoFaceError, match="has 6 face"):
        analyzer.get_face(group_photo, 6)
    embeddings = np.stack([face.embedding for face in faces])
    assert np.abs(embeddings @ embeddings.T - np.eye(6)).max() < 1 - 1e-3  # six different vectors


def test_no_face_names_the_minimum_size(analyzer):
    with pytest.raises(NoFaceError, match="at least 40 pixels"):
        analyzer.get_face(Image.new("RGB", (256, 256), (120, 160, 200)))


def test_several_photos_average_and_report_the_faceless_one(analyzer, astronaut):
    same = analyzer.identity([astronaut, astronaut])
    assert np.allclose(same, analyzer.get_face(astronaut).embedding, atol=1e-6)
    with pytest.raises(NoFaceError, match="face image 1"):
        analyzer.identity([astronaut, Image.new("RGB", (128, 128))])


@pytest.mark.slow
def test_detection_matches_dlib_identity_on_real_photos(analyzer, astronaut, group_photo):
    """dlib's real recognizer confirms the faces we find: the astronaut found in a
    smaller, recompressed copy is the same person; the six people of t1 are not."""
    import dlib

    models = dlib_models_dir()
    recognizer = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))
    shape5 = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))

    def descriptors(image):
        rgb = np.ascontiguousarray(np.asarray(Image.open(image).convert("RGB")))
        out = []
        for face in analyzer.analyze(rgb):
            rect = dlib.rectangle(*[int(v) for v in face.bbox])
            out.append(np.array(recognizer.compute_face_descriptor(rgb, shape5(rgb, rect))))
        return out

    small = Image.open(astronaut).resize((300, 300))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=40)
    buffer.seek(0)
    original, copy = descriptors(astronaut)[0], descriptors(buffer)[0]
    assert np.linalg.norm(original - copy) < 0.6
    group = descriptors(group_photo)
    distances = [np.linalg.norm(a - b) for i, a in enumerate(group) for b in group[i + 1 :]]
    assert len(distances) == 15 and min(distances) > 0.6


def test_pack_lookup(tmp_path, preset):
    nested = tmp_path / "mypack" / "mypack"
    nested.mkdir(parents=True)
    shutil.copy(os.path.join(preset.face_pack, "arcface_random.onnx"), nested)
    assert FaceAnalyzer(str(tmp_path / "mypack")).detector.name == "dlib"
    with pytest.raises(ModelNotFoundError, match="no SCRFD detection model"):
        FaceAnalyzer(str(nested), detector="scrfd")
    with pytest.raises(ModelNotFoundError, match="unpack it"):
        FaceAnalyzer("buffalo_l", root=str(tmp_path / "empty-root"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no .onnx"):
        FaceAnalyzer(str(tmp_path / "empty"))


def write_scrfd_like(path, cell=(40, 30)):
    """A detection ONNX with SCRFD's interface (input.1 1x3x640x640; scores, boxes and keypoints
    for strides 8, 16, 32, two anchors per cell) whose outputs are constants: one face at the
    stride-8 anchor ``cell``, its box 16 px around the anchor centre, keypoints 8 px around it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    outputs, nodes = [], []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            rows = (640 // stride) ** 2 * 2
            value = np.zeros((rows, width), np.float32)
            if stride == 8:
                anchor = (cell[1] * 80 + cell[0]) * 2
                value[anchor] = {"score": [0.95], "bbox": [2, 2, 2, 2],
                                 "kps": [-1, -1, 1, -1, 0, 0, -1, 1, 1, 1]}[kind]
            name = f"{kind}_{stride}"
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value)))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, width]))
    graph = helper.make_graph(nodes, "scrfd_like", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 640, 640])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_scrfd_pack_is_routed_and_decoded(tmp_path, preset):
    """A full pack (detector + recognizer) runs the SCRFD path through insightface's decoder."""
    pack = tmp_path / "pack"
    pack.mkdir()
    write_scrfd_like(pack / "det_10g.onnx")
    shutil.copy(os.path.join(preset.face_pack, "arcface_random.onnx"), pack / "w600k_r50.onnx")
    analyzer = FaceAnalyzer(str(pack))
    assert analyzer.detector.name == "scrfd" and analyzer.info["recognizer"] == "w600k_r50.onnx"
    centre = np.array([320.0, 240.0])
    offsets = np.array([[-8, -8], [8, -8], [0, 0], [-8, 8], [8, 8]], np.float32)
    for size, scale in ((640, 1.0), (1280, 2.0)):  # the detector letterboxes to 640: coordinates scale back
        faces = analyzer.analyze(np.full((size, size, 3), 127, np.uint8))
        assert len(faces) == 1
        assert np.allclose(faces[0].bbox, np.r_[centre - 16, centre + 16] * scale, atol=1e-3)
        assert np.allclose(faces[0].kps, (centre + offsets) * scale, atol=1e-3)
        assert faces[0].det_score == pytest.approx(0.95, abs=1e-6) and faces[0].embedding.shape == (512,)
    assert FaceAnalyzer(str(pack), detector="dlib").detector.name == "dlib"
