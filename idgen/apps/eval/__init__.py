"""Evaluation: generate for reference identities and prompts, measure identity and prompt
fidelity, and write a report a person reads (``idgen eval``)."""

from .metrics import ClipScorer, DlibRecognizer, clip_preprocess, face_similarity, pil_to_tensor
from .report import Report, Sample, load_identities, write_report

__all__ = ["ClipScorer", "DlibRecognizer", "Report", "Sample", "clip_preprocess", "face_similarity",
           "load_identities", "pil_to_tensor", "write_report"]
