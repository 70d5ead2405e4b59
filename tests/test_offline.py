"""Offline means offline: with every socket refused, each tiny preset generates; downloads that
cannot happen say so in one line at once (HF_HUB_OFFLINE) instead of hanging; the libraries idgen
loads are asked not to phone home."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from idgen.errors import ModelNotFoundError
from idgen.testing.presets import get_preset

#: Refuses every network connection and name lookup of the process, and writes each attempt down.
SOCKET_GUARD = textwrap.dedent('''
    import os, socket
    LOG = os.environ["IDGEN_SOCKET_LOG"]

    def refuse(what, *args, **kwargs):
        with open(LOG, "a") as log:
            log.write(f"{what} {args[:2]!r}\\n")
        raise OSError(f"network blocked by the test: {what}")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        refuse("connect", address)

    socket.socket.connect = connect
    socket.socket.connect_ex = lambda self, address: refuse("connect_ex", address)
    socket.getaddrinfo = lambda *args, **kwargs: refuse("getaddrinfo", *args)
    socket.create_connection = lambda *args, **kwargs: refuse("create_connection", *args)
''')

PRESETS = {"tiny": ["--prompt", "a person"], "tiny-sdxl": ["--prompt", "a person"],
           "tiny-faceid-sdxl": ["--prompt", "a person"], "tiny-arc2face": [],
           "tiny-photomaker": ["--prompt", "a photo of a woman img"], "tiny-pulid": ["--prompt", "a person"],
           "tiny-flux": ["--prompt", "a person"], "tiny-infiniteyou": ["--prompt", "a person"]}


@pytest.mark.slow
def test_every_tiny_preset_generates_with_the_network_blocked(cache, astronaut, tmp_path):
    for name in PRESETS:  # built here, before the guard: the presets are the models a user already has
        get_preset(name)
    (tmp_path / "guard.py").write_text(SOCKET_GUARD)
    log = tmp_path / "sockets.log"
    script = textwrap.dedent(f'''
        import guard, sys
        from idgen.apps.cli import main
        for name, extra in {PRESETS!r}.items():
            code = main(["generate", "--base", name, "--face", {str(astronaut)!r}, "--steps", "1", "--height", "64",
                         "--width", "64", "--out", {str(tmp_path)!r} + f"/{{name}}.png", "--no-watermark", *extra])
            print(name, code, flush=True)
    ''')
    env = dict(os.environ, PYTHONPATH=str(tmp_path), IDGEN_SOCKET_LOG=str(log), HF_HUB_OFFLINE="1",
               HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    codes = [line for line in result.stdout.splitlines() if not line.endswith(".png")]
    assert codes == [f"{name} 0" for name in PRESETS], result.stderr[-3000:]
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".png")) == sorted(f"{name}.png" for name in PRESETS)
    assert not log.exists(), log.read_text()[:2000]
    assert not (tmp_path / "home" / ".cache" / "Microsoft").exists()  # onnxruntime's device id


def test_release_downloads_honour_hf_hub_offline(monkeypatch, tmp_path):
    """PuLID's face parser and InfiniteYou's recognizer come from GitHub releases: offline and not
    downloaded, each fails at once in one line naming the flag for a local copy."""
    from idgen.adapters.face_parsing import load_face_parser
    from idgen.adapters.face_recognition import load_irse_recognizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for load, flag in ((load_face_parser, "--face-parser"), (load_irse_recognizer, "--face-recognizer")):
        with pytest.raises(ModelNotFoundError, match=f"is not downloaded .* and HF_HUB_OFFLINE is set: download https://"
                           f".* and pass .*{flag}") as error:
            load()
        assert "\n" not in str(error.value)


def test_a_missing_face_pack_is_not_fetched_offline(monkeypatch, tmp_path):
    from idgen.faces.analyzer import resolve_pack

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="face model pack 'buffalo_l' is not downloaded .* HF_HUB_OFFLINE is set"):
        resolve_pack("buffalo_l", root=str(tmp_path))


def test_a_silent_server_times_out(monkeypatch, tmp_path):
    """A server that accepts the connection and never answers: the download gives up after its
    timeout with one line, instead of hanging."""
    import socket
    import threading

    from idgen import network

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    monkeypatch.setattr(network, "DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        with pytest.raises(ModelNotFoundError, match="could not be downloaded from http://127.0.0.1:.* timeout 0.5 s"):
            network.download(f"http://127.0.0.1:{server.getsockname()[1]}/w.pth", str(tmp_path / "w.pth"), "a file",
                             "pass --file")
    finally:
        server.close()
    assert not os.listdir(tmp_path)


def test_libraries_are_asked_not_to_phone_home():
    script = "import os, idgen, onnxruntime; print(os.environ['ORT_DISABLE_TELEMETRY'], os.environ['NO_ALBUMENTATIONS_UPDATE'])"
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "NO_ALBUMENTATIONS_UPDATE")}
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env).stdout.split() == ["1", "1"]


def test_eval_without_its_clip_model_is_one_line(monkeypatch):
    """`idgen eval`'s default CLIP for CLIP-T, not downloaded and offline: one line naming
    --clip-model, not a traceback."""
    import huggingface_hub

    from idgen.apps.eval.metrics import ClipScorer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent-idgen-hf-home")
    with pytest.raises(ModelNotFoundError, match="CLIP-T's model openai/clip-vit-large-patch14 could not be loaded .*: "
                       "pass --clip-model with a local CLIP folder, or --clip-model none"):
        ClipScorer("openai/clip-vit-large-patch14")
