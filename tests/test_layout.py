"""The layers hold: face analysis stands alone, apps sit on one loader, and no module imports the CLI."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("idgen", "pipelines", "adapters", "train")


@pytest.mark.slow
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


def _module(path: Path) -> list[str]:
    """The dotted name of a source file's package, by setup.cfg's mapping."""
    parts = path.relative_to(REPO).parent.parts
    return ["idgen", *parts[1:]] if parts[0] == "idgen" else ["idgen", *parts]


def _import_nodes(path: Path) -> list[tuple[ast.stmt, bool]]:
    """Every import statement of a file, and whether it sits inside a function."""
    tree = ast.parse(path.read_text())
    local = {id(node) for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))}
    return [(node, id(node) in local) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def _names(path: Path, node: ast.stmt) -> set[str]:
    """Absolute names of the modules (and imported names) one import statement imports."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    package = _module(path)
    module = node.module or ""
    if node.level:
        module = ".".join(package[: len(package) - node.level + 1] + ([module] if module else []))
    return {module} | {f"{module}.{alias.name}" for alias in node.names}


def _imports(path: Path) -> set[str]:
    return set().union(*(_names(path, node) for node, _ in _import_nodes(path)))


def _layer_table() -> dict[str, tuple[list[str], set[str]]]:
    """README's layer table: layer -> (its folders, the layers it may import)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| layer | where | imports | what |"):].split("\n\n")[0].splitlines()[2:]
    layers = {}
    for row in table:
        name, where, imports = (cell.strip() for cell in row.strip("|").split("|")[:3])
        folders = [w.split("`")[0] for w in where.split("`")[1::2] if not w.startswith("idgen.")]
        layers[name] = (folders, {name} | {i.strip() for i in imports.split(",")})
    return layers


def _layer_of(relative: str, layers: dict) -> str | None:
    """The layer a file (repository-relative path) belongs to: the most specific folder wins."""
    best = None
    for name, (folders, _) in layers.items():
        for folder in folders:
            pattern = folder.replace("*.py", "")
            if relative.startswith(pattern) and (not folder.endswith("*.py") or "/" not in relative[len(pattern):]):
                if best is None or len(pattern) > best[1]:
                    best = (name, len(pattern))
    return best and best[0]


def _module_file(name: str) -> str | None:
    """The repository-relative source file of an idgen module, None for names that are not modules."""
    parts = name.split(".")[1:]
    if not parts:
        return None
    roots = {"pipelines": "pipelines", "adapters": "adapters", "train": "train"}
    base = REPO / roots.get(parts[0], "idgen/" + parts[0])
    for candidate in (base.joinpath(*parts[1:]).with_suffix(".py"), base.joinpath(*parts[1:], "__init__.py")):
        if candidate.is_file():
            return str(candidate.relative_to(REPO))
    return None


def test_every_import_follows_the_readme_layer_table():
    """Each file imports only the layers its README row names, function-local imports included."""
    layers = _layer_table()
    assert set(layers) == {"apps", "training", "testing", "pipelines", "adapters", "foundation"}
    broken = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = str(path.relative_to(REPO))
            if relative in ("idgen/__init__.py", "idgen/__main__.py"):  # the public face, above every layer
                continue
            layer = _layer_of(relative, layers)
            assert layer is not None, f"{relative} is in no row of README's layer table"
            allowed = layers[layer][1]
            for node, _ in _import_nodes(path):
                for name in _names(path, node):
                    target = _module_file(name) if name.startswith("idgen.") else None
                    if target is None or target == "idgen/__init__.py":
                        continue
                    if "every layer" not in allowed and _layer_of(target, layers) not in allowed:
                        broken.append(f"{relative}:{node.lineno} ({layer}) imports {name} ({_layer_of(target, layers)})")
    assert broken == []


def test_function_local_imports_say_why():
    """An import inside a function stays only with its reason on its line (``# lazy: ...``)."""
    unexplained = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            unexplained += [f"{path.relative_to(REPO)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
                            for node, local in _import_nodes(path) if local and "# lazy:" not in lines[node.lineno - 1]]
    assert unexplained == []


def test_the_layer_check_sees_a_broken_layer(tmp_path):
    """The checker itself: an adapter importing a pipeline, inside a function, is reported."""
    layers = _layer_table()
    assert _layer_of("adapters/attention.py", layers) == "adapters"
    assert _layer_of("idgen/faces/analyzer.py", layers) == "foundation"
    assert _layer_of("idgen/apps/eval/run.py", layers) == "apps"
    assert _layer_of("idgen/testing/presets.py", layers) == "testing"
    assert _module_file("idgen.pipelines.identity") == "pipelines/identity.py"
    assert _layer_of(_module_file("idgen.apps.session"), layers) not in layers["training"][1]


def test_no_module_imports_the_cli():
    importers = [
        str(path.relative_to(REPO))
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "__main__.py" and path.relative_to(REPO) != Path("idgen/apps/cli.py")
        and any(name == "idgen.apps.cli" or name.startswith("idgen.apps.cli.") for name in _imports(path))
    ]
    assert importers == []


def test_face_package_imports_nothing_above_it():
    for path in (REPO / "idgen" / "faces").rglob("*.py"):
        above = {n for n in _imports(path) if n.split(".")[0] in ("diffusers", "transformers")
                 or n.startswith(("idgen.pipelines", "idgen.adapters", "idgen.train", "idgen.apps", "idgen.testing"))}
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
    from idgen import formats

    monkeypatch.setattr(formats, "base_family", lambda base: "sdxl" if sdxl else "sd15")
    found, resolved_adapter, resolved = formats.resolve_method("some/base", adapter, weight_name)
    assert (found.name, resolved) == (method, resolved_weight)
    assert resolved_adapter == (adapter or found.default_adapter)


@pytest.mark.slow
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


@pytest.mark.slow
def test_python_and_cli_defaults_come_from_one_registry_row(preset, astronaut):
    """InstantID's call without ``id_scale`` is its registry row's 0.8, the scale the CLI's session uses."""
    from idgen import start_session
    from idgen.formats import METHODS

    session = start_session(base="tiny-sdxl")
    pipe = session.load()
    assert pipe.identity_method is METHODS["instantid"] and session.id_scale == pipe.identity_method.id_scale == 0.8
    assert pipe.raw_id_embeds and not pipe.per_photo_id_embeds
    kwargs = dict(prompt="a person", face_image=astronaut, num_inference_steps=2, height=64, width=64, output_type="pt")
    default = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(default, pipe(generator=torch.Generator().manual_seed(0), id_scale=0.8, **kwargs).images)
    assert not torch.equal(default, pipe(generator=torch.Generator().manual_seed(0), id_scale=1.0, **kwargs).images)
