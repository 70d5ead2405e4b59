"""Offline means offline: every download idgen makes itself honours ``HF_HUB_OFFLINE`` and has a
timeout, and the libraries it uses are asked not to phone home."""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request

from .errors import ModelNotFoundError
from .files import atomic_path

#: Seconds a download may wait for the server to answer (connecting, and between reads).
DOWNLOAD_TIMEOUT = float(os.environ.get("IDGEN_DOWNLOAD_TIMEOUT", "30"))

#: The libraries' own switches: no telemetry from onnxruntime (its device id file too), the hub
#: libraries and gradio, and no version check from albumentations (which insightface imports).
QUIET_ENVIRONMENT = {
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}


#: Loggers whose notices on import ask nothing of the user: torchao's, once installed, is imported by
#: diffusers at start-up and reports its CUDA-only kernels missing on every machine without them.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_libraries() -> None:
    """Set the switches of ``QUIET_ENVIRONMENT`` that the user has not set otherwise, and keep the
    import notices of ``QUIET_LOGGERS`` to errors."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no downloads at all (read at every call)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def download(url: str, path: str, what: str, fix: str) -> str:
    """``url`` saved at ``path`` (atomically) unless it is there already; ``what`` and ``fix`` name the
    file and the way to pass a local copy in the one-line error of an offline or failed download."""
    if os.path.isfile(path):
        return path
    if offline():
        raise ModelNotFoundError(f"{what} is not downloaded ({path}) and HF_HUB_OFFLINE is set: download {url} and "
                                 f"{fix}")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, atomic_path(path) as staging, \
                open(staging, "wb") as handle:
            shutil.copyfileobj(response, handle)
    except OSError as err:  # no network, a timeout, a refused or broken connection, an HTTP error
        raise ModelNotFoundError(f"{what} could not be downloaded from {url} ({type(err).__name__}, timeout "
                                 f"{DOWNLOAD_TIMEOUT:g} s): download it and {fix}") from None
    return path


quiet_libraries()  # on import: idgen/__init__.py imports this module before onnxruntime loads
