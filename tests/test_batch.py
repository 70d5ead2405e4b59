"""``idgen batch``: jobs from CSV and JSONL, bad rows recorded and the rest rendered, the same
images and manifest with 1 and 2 workers and on Ray, and exactly once after a kill (of the run,
or of one worker)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from idgen.apps.cli import main

#: 12 jobs: 10 good ones (two photos, a folder, per-job id_scale, steps and seed, two images), and
#: two bad rows (a missing photo, an option generate does not have).
ROWS = [
    *({"id": f"j{i:02d}", "face": "astronaut.jpg", "prompt": f"a photo, take {i}", "seed": i} for i in range(6)),
    {"id": "two-photos", "face": ["astronaut.jpg", "people/astronaut-2.jpg"], "prompt": "a painting"},
    {"id": "folder", "face": "people", "prompt": "a sketch", "id_scale": 0.5},
    {"id": "steps", "face": "astronaut.jpg", "prompt": "a photo", "steps": 3, "seed": 7},
    {"id": "pair", "face": "astronaut.jpg", "prompt": "a photo", "num_images": 2, "seed": 9},
    {"id": "missing", "face": "nobody.jpg", "prompt": "a photo"},
    {"id": "typo", "face": "astronaut.jpg", "prompt": "a photo", "id_sacle": 0.5},
]
FLAGS = ["--steps", "2", "--threads", "1", "--no-watermark"]


def _jobs_folder(tmp_path: Path, astronaut: Path) -> Path:
    folder = tmp_path / "jobs"
    (folder / "people").mkdir(parents=True)
    shutil.copy(astronaut, folder / "astronaut.jpg")
    shutil.copy(astronaut, folder / "people" / "astronaut-2.jpg")
    (folder / "jobs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return folder


def _images(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.png"))}


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, cache, astronaut):
    """The uninterrupted run with one worker: the reference the others must equal."""
    folder = _jobs_folder(tmp_path_factory.mktemp("batch"), astronaut)
    out = folder / "out-1"
    assert main(["batch", str(folder / "jobs.jsonl"), "--out", str(out), *FLAGS]) == 1  # two rows failed
    return folder, out


def test_bad_rows_are_recorded_and_the_rest_rendered(one_worker):
    _, out = one_worker
    rows = _manifest(out)
    assert [row["job"] for row in rows] == [r["id"] for r in ROWS[:9]] + ["pair", "pair", "missing", "typo"]
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == 11 and set(_images(out)) == {row["file"] for row in ok}
    assert {row["job"]: row["seed"] for row in ok if row["job"].startswith("j")} == {f"j{i:02d}": i for i in range(6)}
    assert [(row["image"], row["seed"]) for row in ok if row["job"] == "pair"] == [(0, 9), (1, 10)]
    errors = {row["job"]: row["error"] for row in rows if row["status"] == "error"}
    assert "nobody.jpg does not exist" in errors["missing"] and "unknown option 'id_sacle'" in errors["typo"]
    assert all(row["error"] is None and row["file"] == f"{row['job']}.png" for row in ok if row["job"] != "pair")
    folder_row = next(row for row in rows if row["job"] == "folder")
    assert folder_row["faces"].endswith("people/astronaut-2.jpg") and json.loads(folder_row["settings"])["id_scale"] == 0.5
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]


@pytest.mark.slow
def test_images_follow_the_job_not_the_worker(one_worker, tmp_path):
    """Two workers: the same files, byte for byte, and the same manifest."""
    folder, out = one_worker
    two = tmp_path / "out-2"
    assert main(["batch", str(folder / "jobs.jsonl"), "--out", str(two), "--workers", "2", *FLAGS]) == 1
    assert _images(two) == _images(out)
    assert _manifest(two) == _manifest(out)


def test_a_second_run_renders_nothing(one_worker, tmp_path, capsys):
    folder, out = one_worker
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert main(["batch", str(folder / "jobs.jsonl"), "--out", str(again), *FLAGS]) == 1
    assert "1 job(s) run, 10 done before, 2 failed" in capsys.readouterr().out  # the failed job is tried again
    assert _images(again) == _images(out) and _manifest(again) == _manifest(out)


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started, from any of its threads."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]


def _kill_during(args: list[str], journal: Path, lines: int, worker: bool = False) -> int:
    """Start ``idgen batch``; once ``lines`` jobs are in the journal, SIGKILL it (or one of its
    workers); return its exit code."""
    process = subprocess.Popen([sys.executable, "-m", "idgen", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= lines:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    if worker:
        spawned = [pid for pid in _children(process.pid)
                   if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text() and "resource_tracker" not in
                   Path(f"/proc/{pid}/cmdline").read_text()]
        os.kill(spawned[0], signal.SIGKILL)
        return process.wait(600)
    process.kill()
    return process.wait(60)


@pytest.mark.slow
def test_killed_runs_resume_exactly_once(one_worker, tmp_path):
    """SIGKILL of the run mid-way, then a restart; and a worker killed mid-way: every job
    rendered once, the same images and manifest, no temporary file left."""
    folder, out = one_worker
    killed = tmp_path / "killed"
    args = ["batch", str(folder / "jobs.jsonl"), "--out", str(killed), *FLAGS]
    assert _kill_during(args, killed / "manifest.jsonl", 3) == -signal.SIGKILL
    assert not (killed / "manifest.parquet").exists()
    assert main(args) == 1
    assert _images(killed) == _images(out) and _manifest(killed) == _manifest(out)
    assert not [name for name in os.listdir(killed) if name.startswith(".tmp")]

    worker_killed = tmp_path / "worker-killed"
    args = ["batch", str(folder / "jobs.jsonl"), "--out", str(worker_killed), "--workers", "2", *FLAGS]
    assert _kill_during(args, worker_killed / "manifest.jsonl", 2, worker=True) == 1  # only the bad rows failed
    assert _images(worker_killed) == _images(out) and _manifest(worker_killed) == _manifest(out)


@pytest.mark.slow
def test_csv_jobs(tmp_path, cache, astronaut):
    """A CSV file: a header row, empty cells unset, several photos with ';', a switch as true."""
    shutil.copy(astronaut, tmp_path / "a.jpg")
    (tmp_path / "jobs.csv").write_text("id,face,prompt,seed,id_scale,people\n"
                                       "one,a.jpg,a photo,3,,\n"
                                       "both,a.jpg; a.jpg,two people,4,0.7,true\n"
                                       "bad id!,a.jpg,x,,,\n")
    assert main(["batch", str(tmp_path / "jobs.csv"), "--out", str(tmp_path / "out"), *FLAGS]) == 1
    rows = {row["job"]: row for row in _manifest(tmp_path / "out")}
    assert rows["one"]["status"] == "ok" and rows["one"]["seed"] == 3
    assert rows["both"]["status"] == "ok" and rows["both"]["face_sim"] is None  # two people: no one to compare
    assert json.loads(rows["both"]["settings"])["people"] == "true"
    assert "is not a file name" in rows["line-000004"]["error"]


def test_model_options_are_the_batch_s(tmp_path, cache, astronaut):
    shutil.copy(astronaut, tmp_path / "a.jpg")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"face": "a.jpg", "prompt": "p", "base": "tiny-sdxl"}) + "\n")
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out"), *FLAGS]) == 1
    (row,) = _manifest(tmp_path / "out")
    assert row["job"] == "line-000001" and "--base: the models are the batch's" in row["error"]


@pytest.mark.slow
def test_ray_renders_the_same(one_worker, tmp_path):
    """Two Ray actors on a local instance (ray.init(num_cpus=2)): the same images and manifest."""
    ray = pytest.importorskip("ray")
    folder, out = one_worker
    on_ray = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["batch", str(folder / "jobs.jsonl"), "--out", str(on_ray), "--workers", "2", "--ray",
                     *FLAGS]) == 1
    finally:
        ray.shutdown()
    assert _images(on_ray) == _images(out) and _manifest(on_ray) == _manifest(out)
