"""Content Credentials (C2PA): a signed manifest inside the PNG that says idgen created the image
with a trained model ("trainedAlgorithmicMedia"), from which base model and adapter.

Needs ``c2pa-python`` (``pip install "idgen[c2pa]"``) and a signing certificate chain and key of
your own (PEM). Unlike the watermark, the manifest proves who signed, if the certificate is
trusted, and is lost when the file is re-encoded.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any

from PIL import Image

from .errors import IDGenError

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def _c2pa():
    try:
        import c2pa  # lazy: optional dependency (idgen[c2pa])
    except ImportError:
        raise IDGenError('Content Credentials need c2pa-python: pip install "idgen[c2pa]"') from None
    return c2pa


def manifest(metadata: Mapping[str, str], title: str) -> dict:
    """The manifest idgen signs: claim generator idgen, one "created" action by a trained model,
    and the base model and adapter."""
    version = metadata.get("idgen_version", "")
    parameters = {key: metadata[key] for key in ("method", "base_model", "adapter", "identitynet") if key in metadata}
    return {
        "claim_generator_info": [{"name": "idgen", "version": version}],
        "title": title,
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
            "action": "c2pa.created",
            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": {"name": "idgen", "version": version},
            "parameters": parameters,
        }]}}],
    }


class Signer:
    """Signs PNG bytes with a certificate chain and private key (PEM files, ES256 by default)."""

    def __init__(self, cert_path: str, key_path: str, alg: str = "es256"):
        c2pa = _c2pa()
        for what, path in (("certificate chain", cert_path), ("private key", key_path)):
            if not os.path.isfile(path):
                raise IDGenError(f"C2PA {what} {path} does not exist: pass a PEM file")
        with open(cert_path, "rb") as handle:
            self._cert = handle.read()
        with open(key_path, "rb") as handle:
            self._key = handle.read()
        self._alg = getattr(c2pa.C2paSigningAlg, alg.upper(), None)
        if self._alg is None:
            raise IDGenError(f"unknown C2PA signing algorithm {alg!r}: use es256, es384, es512, ps256 or ed25519")
        self.cert_path = cert_path
        self._check()

    def _check(self) -> None:
        """Sign a 1-pixel PNG: a key that does not match its certificate fails now, not after generating."""
        buffer = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buffer, format="PNG")
        self.sign(buffer.getvalue(), {}, "check.png")

    def sign(self, png: bytes, metadata: Mapping[str, str], title: str) -> bytes:
        """``png`` with a signed manifest for ``metadata`` embedded."""
        c2pa = _c2pa()
        out = io.BytesIO()
        try:
            signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(self._alg, self._cert, self._key, None))
            with c2pa.Builder(manifest(metadata, title)) as builder:
                builder.sign(signer, "image/png", io.BytesIO(png), out)
        except c2pa.C2paError as err:
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise IDGenError(f"could not sign with {self.cert_path} ({first}): pass a certificate chain (signer "
                             "first, then its CA) and its matching private key, both PEM") from None
        return out.getvalue()


def read(path: str) -> dict | None:
    """The Content Credentials of a file: claim generator, source type, parameters, signer and
    validation; None when the file has none or c2pa-python is not installed."""
    try:
        import c2pa  # lazy: optional dependency (idgen[c2pa])
    except ImportError:
        return None
    try:
        with open(path, "rb") as handle, c2pa.Reader(None, handle) as reader:
            data = json.loads(reader.json())
    except Exception:  # no manifest, or a format the reader does not know
        return None
    active = data.get("manifests", {}).get(data.get("active_manifest"), {})
    actions = [action for assertion in active.get("assertions", []) if assertion.get("label", "").startswith("c2pa.actions")
               for action in assertion.get("data", {}).get("actions", [])]
    created: dict[str, Any] = next((a for a in actions if a.get("action") == "c2pa.created"), {})
    signature = active.get("signature_info", {})
    return {
        "claim_generator": ", ".join(f"{g.get('name')} {g.get('version', '')}".strip()
                                     for g in active.get("claim_generator_info", [])),
        "digital_source_type": created.get("digitalSourceType", "").rsplit("/", 1)[-1] or None,
        "parameters": created.get("parameters", {}),
        "signer": signature.get("common_name"),
        "issuer": signature.get("issuer"),
        "validation_state": data.get("validation_state"),
        "validation_status": [status.get("code") for status in data.get("validation_status", []) or []],
    }
