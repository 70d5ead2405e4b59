"""Metrics: how well an identity is kept (FaceSim, an independent recognizer's FaceSim) and
how well the prompt is followed (CLIP-T)."""

from __future__ import annotations

import os

import dlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from idgen.errors import ModelNotFoundError, NoFaceError
from idgen.faces import FaceAnalyzer, ImageInput, dlib_models_dir, load_image
from idgen.images import clip_preprocess, pil_to_tensor


class ClipScorer:
    """CLIP-T: cosine between a prompt's and an image's CLIP embeddings."""

    def __init__(self, model_name_or_path: str):
        self.name = model_name_or_path
        try:
            self.model = CLIPModel.from_pretrained(model_name_or_path).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(model_name_or_path)
        except OSError as err:  # not downloaded and offline, no network, or not a CLIP folder
            raise ModelNotFoundError(f"CLIP-T's model {model_name_or_path} could not be loaded ({type(err).__name__}): "
                                     "pass --clip-model with a local CLIP folder, or --clip-model none to leave "
                                     "CLIP-T out") from None

    @torch.no_grad()
    def score(self, image: Image.Image, prompt: str) -> float:
        pixels = clip_preprocess(pil_to_tensor([image]), self.model.config.vision_config.image_size)
        tokens = self.tokenizer([prompt], padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        out = self.model(input_ids=tokens.input_ids, pixel_values=pixels)
        return float((F.normalize(out.image_embeds, dim=-1) * F.normalize(out.text_embeds, dim=-1)).sum())


class DlibRecognizer:
    """An independent recognizer: dlib's detector, 5-point model and 128-d ResNet (its own
    pipeline end to end, sharing nothing with the ArcFace path)."""

    name = "dlib_resnet_v1"

    def __init__(self):
        models = dlib_models_dir()
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))

    def descriptor(self, image: ImageInput) -> np.ndarray | None:
        """(128,) descriptor of the largest face, or None."""
        rgb = np.ascontiguousarray(np.asarray(load_image(image)))
        rects, _, _ = self._detector.run(rgb, 1, 0.2)
        if not rects:
            return None
        rect = max(rects, key=lambda r: r.width() * r.height())
        return np.asarray(self._net.compute_face_descriptor(rgb, self._shape(rgb, rect)), dtype=np.float32)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def face_similarity(analyzer: FaceAnalyzer, image: ImageInput, reference: np.ndarray) -> float | None:
    """FaceSim: cosine between the ArcFace embedding of the largest face in ``image`` and
    ``reference``; None when no face is found."""
    try:
        return float(analyzer.get_face(image).embedding @ reference)
    except NoFaceError:
        return None
