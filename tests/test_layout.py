"""The layers hold: face analysis stands alone, apps sit on one loader, and no module imports the CLI."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("idgen", "pipelines", "adapters", "train")


def test_face_analysis_runs_without_diffusers_or_torch(preset, astronaut):
    """``idgen.faces`` detects, aligns and embeds a real photo in a process where diffusers,
    transformers, torch, accelerate and peft cannot be imported."""
    script = f"""
import json, sys
for name in ("diffusers", "transformers", "torch", "accelerate", "peft"):
    sys.modules[name] = None  # any import of it raises ImportError
from idgen.faces import FaceAnalyzer
face = FaceAnalyzer({preset.face_pack!r}).get_face({str(astronaut)!r})
print(json.dumps({{"kps": face.kps.tolist(), "dim": int(face.embedding.shape[0])}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    face = json.loads(result.stdout.strip().splitlines()[-1])
    assert face["dim"] == 512 and abs(face["kps"][2][0] - 225) < 5  # the nose tip, as test_faces checks it


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules (and imported names) a source file imports."""
    parts = path.relative_to(REPO).parent.parts
    package = ["idgen", *parts[1:]] if parts[0] == "idgen" else ["idgen", *parts]  # setup.cfg's mapping
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(package[: len(package) - node.level + 1] + ([module] if module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_imports_the_cli():
    importers = [
        str(path.relative_to(REPO))
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "__main__.py" and path.relative_to(REPO) != Path("idgen/cli.py")
        and any(name == "idgen.cli" or name.startswith("idgen.cli.") for name in _imports(path))
    ]
    assert importers == []


def test_face_package_imports_nothing_above_it():
    for path in (REPO / "idgen" / "faces").rglob("*.py"):
        above = {n for n in _imports(path) if n.split(".")[0] in ("diffusers", "transformers")
                 or n.startswith(("idgen.pipelines", "idgen.adapters", "idgen.train", "idgen.session", "idgen.cli"))}
        assert not above, (path.name, above)


@pytest.mark.parametrize("sdxl, adapter, weight_name, method, resolved_weight", [
    (False, None, None, "faceid", "ip-adapter-faceid_sd15.bin"),
    (False, "h94/IP-Adapter-FaceID", None, "faceid", "ip-adapter-faceid_sd15.bin"),
    (True, None, None, "instantid", "ip-adapter.bin"),
    (True, "InstantX/InstantID", None, "instantid", "ip-adapter.bin"),
    (True, "h94/IP-Adapter-FaceID", None, "faceid-sdxl", "ip-adapter-faceid_sdxl.bin"),
    (True, "my/faceid-sdxl.safetensors", None, "faceid-sdxl", None),
    (False, "FoivosPar/Arc2Face", None, "arc2face", None),
])
def test_methods_table_resolves_each_method(monkeypatch, sdxl, adapter, weight_name, method, resolved_weight):
    from idgen import session

    monkeypatch.setattr(session, "base_family", lambda base: "sdxl" if sdxl else "sd15")
    found, resolved_adapter, resolved = session.resolve_method("some/base", adapter, weight_name)
    assert (found.name, resolved) == (method, resolved_weight)
    assert resolved_adapter == (adapter or found.default_adapter)


def test_session_loads_each_tiny_preset_with_its_method_defaults(preset):
    from idgen import start_session

    expected = {"tiny": ("faceid", 30, 7.5, 1.0), "tiny-sdxl": ("instantid", 30, 5.0, 0.8),
                "tiny-arc2face": ("arc2face", 25, 3.0, 1.0)}
    for base, (method, steps, guidance, id_scale) in expected.items():
        session = start_session(base=base)
        assert (session.method.name, session.steps, session.guidance, session.id_scale) == (method, steps, guidance, id_scale)
        assert "random weights in: base, adapter, face recognizer" in session.metadata()["random_weights"]
    assert start_session(base="tiny", steps=3, guidance=2.0, id_scale=0.5).call_kwargs("a person") == dict(
        num_inference_steps=3, guidance_scale=2.0, height=None, width=None, prompt="a person", id_scale=0.5,
        id_guidance_start=0.0, id_guidance_end=1.0)


def test_the_adapter_checkpoint_is_read_once(monkeypatch, preset):
    """start_session reads and checks the checkpoint; load() hands that to the pipeline instead of
    reading the file again (InstantID's is 1.7 GB)."""
    from idgen import start_session
    from idgen.adapters import loading

    reads = []
    original = loading.read_checkpoint
    monkeypatch.setattr(loading, "read_checkpoint", lambda path: reads.append(path) or original(path))
    session = start_session(base="tiny-sdxl")
    pipe = session.load()
    assert reads == [session.adapter_file] and session.adapter_state is None
    assert pipe.adapter_spec.format == "instantid"
