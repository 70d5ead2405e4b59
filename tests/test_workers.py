"""idgen.workers (the engine of batch, synth and prepare-data) and ``prepare-data --workers``: the
same records with 1 and 2 workers, resumable after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from idgen.workers import Engine, Failed, WorkerDied, given, run


def _square(item: int) -> int:
    if item == 3:
        raise ValueError("three is refused")
    if item == 5 and os.environ.get("IDGEN_TEST_DIE") == "1":
        os._exit(9)  # the worker dies, as under the kernel's OOM killer
    return item * item


def test_results_come_with_their_items_and_failures_stay_with_theirs(monkeypatch):
    results = dict(run(given(_square), list(range(6)), Engine()))
    assert results == {0: 0, 1: 1, 2: 4, 3: Failed("ValueError: three is refused"), 4: 16, 5: 25}


@pytest.mark.slow
def test_an_item_that_kills_its_worker_is_retried_then_reported(monkeypatch):
    """Two spawned workers: item 5 kills its worker each time; the pool is replaced, the other
    items finish, and 5 comes back as WorkerDied after the retries."""
    monkeypatch.setenv("IDGEN_TEST_DIE", "1")
    results = dict(run(given(_square), list(range(8)), Engine(workers=2, retries=1)))
    assert results[5] == WorkerDied(2) and "died 2 time(s)" in str(results[5])
    assert {k: v for k, v in results.items() if k not in (3, 5)} == {k: k * k for k in (0, 1, 2, 4, 6, 7)}


def test_engine_checks():
    with pytest.raises(Exception, match="give 1 or more"):
        Engine(workers=0)
    with pytest.raises(Exception, match="at most --workers 2"):
        Engine(workers=3, gpus=2)


@pytest.fixture
def photos(tmp_path, astronaut):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        shutil.copy(astronaut, folder / f"p{i:02d}.jpg")
    Image.new("RGB", (64, 64)).save(folder / "blank.png")
    return folder


def _records(out) -> list[dict]:
    return sorted((json.loads(line) for line in open(out / "index.jsonl")), key=lambda r: r["file"])


def _prepare(*args: str) -> list[str]:
    return [sys.executable, "-m", "idgen", "prepare-data", *args, "--face-model", "tiny"]


@pytest.mark.slow
def test_prepare_data_workers_and_resume(photos, tmp_path, cache):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    subprocess.run(_prepare(str(photos), "--out", str(one), "--shard-size", "2"), check=True, capture_output=True)
    subprocess.run(_prepare(str(photos), "--out", str(two), "--shard-size", "2", "--workers", "2"), check=True,
                   capture_output=True)
    assert len(_records(one)) == 12 and _records(two) == _records(one)
    assert json.loads((two / "skipped.jsonl").read_text())["reason"] == "no face"

    process = subprocess.Popen(_prepare(str(photos), "--out", str(killed), "--shard-size", "2"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (killed / "index.jsonl").exists() and len((killed / "index.jsonl").read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, "prepare-data ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    kept = len(_records(killed))
    assert 4 <= kept < 12
    done = subprocess.run(_prepare(str(photos), "--out", str(killed), "--shard-size", "2"), check=True,
                          capture_output=True, text=True)
    assert f"{12 - kept} photo(s) added" in done.stdout
    assert _records(killed) == _records(one)
    assert sorted(os.listdir(killed / "shards")) == sorted(os.listdir(one / "shards"))


@pytest.mark.slow
def test_prepare_data_and_synth_on_ray(photos, tmp_path, cache, analyzer):
    """Both on a local Ray instance (ray.init(num_cpus=2), two actors): the records prepare-data
    writes in this process, and synth's files and card as one local worker writes them."""
    ray = pytest.importorskip("ray")
    from idgen.apps.cli import main
    from idgen.train.data import prepare_data

    here, there = tmp_path / "here", tmp_path / "there"
    prepare_data(str(photos), str(here), analyzer, shard_size=4, progress=False)
    synth = ["synth", "--identities", "3", "--images-per-identity", "2", "--steps", "2", "--no-filter", "--threads", "1"]
    assert main([*synth, "--out", str(tmp_path / "synth-here")]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        prepare_data(str(photos), str(there), analyzer, shard_size=4, progress=False,
                     engine=Engine(workers=2, ray="local", threads=1))
        assert main([*synth, "--out", str(tmp_path / "synth-there"), "--workers", "2", "--ray"]) == 0
    finally:
        ray.shutdown()
    assert _records(there) == _records(here)
    for name in ("card.json", "records.jsonl"):
        assert (tmp_path / "synth-there" / name).read_text() == (tmp_path / "synth-here" / name).read_text()
    here_images = sorted((tmp_path / "synth-here" / "identities").rglob("*.jpg"))
    there_images = sorted((tmp_path / "synth-there" / "identities").rglob("*.jpg"))
    assert [p.read_bytes() for p in there_images] == [p.read_bytes() for p in here_images] and len(here_images) == 6
