"""``idgen batch JOBS --out DIR``: many generate requests (identity x prompt x seed x options), one
per row of a CSV or JSONL file, rendered by workers that each load the pipeline once
(idgen.workers: local processes, or Ray), into DIR with a manifest.

Exactly once, whatever stops it: each job's images are named from its id and written atomically,
its seeds are its own (not a worker's), and each finished job appends one line to
``DIR/manifest.jsonl`` (flushed to disk) before it counts as done. A run started again skips the
jobs done, renders the rest (a job cut off mid-way is rendered again, to the same files) and
rewrites ``DIR/manifest.parquet``: one row per image, or per failed job with its one-line error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from idgen import workers
from idgen.errors import IDGenError
from idgen.faces import IMAGE_SUFFIXES
from idgen.files import atomic_path, remove_stale_temporaries

from .eval.metrics import face_similarity
from .generate import identity_inputs, render
from .options import SessionOptions
from .session import Session, start_session

JOURNAL, MANIFEST = "manifest.jsonl", "manifest.parquet"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: Row keys naming photos: relative paths are read from the jobs file's folder.
PHOTO_KEYS = ("face", "negative_face", "kps_image")

SCHEMA = pa.schema([
    ("job", pa.string()), ("line", pa.int64()), ("image", pa.int64()), ("file", pa.string()), ("seed", pa.uint64()),
    ("prompt", pa.string()), ("faces", pa.string()), ("settings", pa.string()), ("face_sim", pa.float64()),
    ("status", pa.string()), ("error", pa.string()),
])


@dataclass
class Job:
    """One row of the jobs file: its id, line, the options it sets (as written, for the manifest),
    and the generate request they make (``args``, ``options``), or the ``error`` that stops it."""

    id: str
    line: int
    row: dict[str, Any]
    args: argparse.Namespace | None = None
    options: SessionOptions | None = None
    error: str | None = None


@dataclass
class BatchReport:
    rendered: int  # jobs rendered by this run
    skipped: int  # jobs a previous run had done
    failed: list[dict] = field(default_factory=list)  # the manifest rows of the failed jobs


def read_rows(path: str) -> list[tuple[int, dict[str, Any] | str]]:
    """``(line, row)`` of each job in a ``.csv`` (a header row; empty cells unset; several photos
    separated by ``;``) or ``.jsonl`` file (one object per line); a line that is no object is
    ``(line, error)``."""
    if not os.path.isfile(path):
        raise IDGenError(f"jobs file {path} does not exist: check the path")
    rows: list[tuple[int, dict[str, Any] | str]] = []
    if path.lower().endswith(".csv"):
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                cells = {key.strip(): value.strip() for key, value in row.items() if key and value and value.strip()}
                for key in PHOTO_KEYS:
                    if key in cells:
                        cells[key] = [part.strip() for part in cells[key].split(";") if part.strip()]
                rows.append((reader.line_num, cells))
        return rows
    if not path.lower().endswith((".jsonl", ".json")):
        raise IDGenError(f"jobs file {path}: write it as .csv (a header row) or .jsonl (an object per line)")
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                rows.append((number, f"line {number} is not JSON ({getattr(err, 'msg', err)})"))
                continue
            rows.append((number, row if isinstance(row, dict) else f"line {number} is not a JSON object"))
    return rows


def job_id(row: dict[str, Any], line: int) -> str:
    """The row's ``id`` (letters, digits, ``.``, ``_``, ``-``), else one from its line."""
    value = str(row.get("id", f"line-{line:06d}"))
    if not _JOB_ID.match(value):
        raise IDGenError(f"id {value!r} is not a file name (letters, digits, '.', '_', '-', up to 100)")
    return value


def photos(value: Any, folder: str) -> list[str]:
    """The photos a row names: one path, a list, or a folder of photos (its images, sorted);
    relative paths from the jobs file's ``folder``."""
    found = []
    for item in value if isinstance(value, list) else [value]:
        path = os.path.join(folder, str(item))
        if os.path.isdir(path):
            inside = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
            if not inside:
                raise IDGenError(f"{path} holds no photo ({', '.join(IMAGE_SUFFIXES)})")
            found += [os.path.join(path, f) for f in inside]
        else:
            found.append(path)
    return found


def job_paths(out: str, job: Job) -> list[str]:
    count = job.args.num_images if job.args is not None else 1
    return [os.path.join(out, f"{job.id}.png")] if count == 1 else [
        os.path.join(out, f"{job.id}-{i}.png") for i in range(count)]


class Renderer:
    """A worker's setup: the session and pipeline, loaded once; it returns the function that
    renders one job into ``out``."""

    def __init__(self, options: SessionOptions, out: str):
        self.options, self.out = options, out

    def __call__(self) -> Callable[[Job], list[dict]]:
        session = start_session(self.options)
        pipe = session.load()
        pipe.set_progress_bar_config(disable=True)  # the batch's bar counts jobs
        return partial(render_job, session, pipe, self.out)


def render_job(session: Session, pipe: Any, out: str, job: Job) -> list[dict]:
    """Render ``job``; one manifest row per image, with its FaceSim to the job's photos (None for
    several people, or where no face is found)."""
    args = job.args
    assert args is not None and job.options is not None
    call = session.for_call(job.options)
    inputs = identity_inputs(call, args)
    reference = None if args.people else session.analyzer.identity(args.face, call.options.face_index)
    rows = []
    for i, path in enumerate(render(call, pipe, args, job_paths(out, job), inputs)):
        rows.append({"image": i, "file": os.path.basename(path), "seed": args.seed + i,
                     "face_sim": None if reference is None else face_similarity(session.analyzer, path, reference)})
    return rows


def _manifest_rows(job: Job, result: Any) -> list[dict]:
    """The job's rows of the manifest: its images, or one row with its error."""
    common = {"job": job.id, "line": job.line, "prompt": job.row.get("prompt"),
              "faces": "; ".join(job.args.face) if job.args is not None and job.args.face else None,
              "settings": json.dumps(job.row, sort_keys=True, default=str)}
    if isinstance(result, list):
        return [{**common, **row, "status": "ok", "error": None} for row in result]
    return [{**common, "image": None, "file": None, "seed": None, "face_sim": None, "status": "error",
             "error": str(result)}]


def _done(out: str) -> dict[str, list[dict]]:
    """The jobs a previous run finished (the last line of each), whose images are all there."""
    path = os.path.join(out, JOURNAL)
    done: dict[str, list[dict]] = {}
    if not os.path.exists(path):
        return done
    with open(path) as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except ValueError:  # the line a kill cut short: that job is rendered again
                continue
            done[entry["job"]] = entry["rows"]
    return {job: rows for job, rows in done.items() if all(
        row["status"] == "ok" and os.path.exists(os.path.join(out, row["file"])) for row in rows)}


def write_manifest(out: str, jobs: list[Job], rows: dict[str, list[dict]]) -> str:
    """``manifest.parquet``, atomically: the rows in the jobs file's order."""
    path = os.path.join(out, MANIFEST)
    table = pa.Table.from_pylist([row for job in jobs for row in rows.get(job.id, [])], schema=SCHEMA)
    with atomic_path(path) as staging:
        pq.write_table(table, staging)
    return path


def run_batch(jobs: list[Job], out: str, options: SessionOptions, engine: workers.Engine,
              progress: bool = True) -> BatchReport:
    """Render the jobs not done yet into ``out``, then write the manifest (see the module)."""
    os.makedirs(out, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written
    done = _done(out)
    rows = {job.id: done[job.id] for job in jobs if job.id in done}
    for job in jobs:
        if job.error is not None:
            rows[job.id] = _manifest_rows(job, job.error)
    todo = [job for job in jobs if job.error is None and job.id not in done]
    with open(os.path.join(out, JOURNAL), "a") as journal:
        for job, result in tqdm(workers.run(Renderer(options, out), todo, engine), total=len(todo), desc="jobs",
                                unit="job", disable=not progress):
            rows[job.id] = _manifest_rows(job, result)
            journal.write(json.dumps({"job": job.id, "rows": rows[job.id]}) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
    write_manifest(out, jobs, rows)
    failed = [row for job in jobs for row in rows[job.id] if row["status"] == "error"]
    return BatchReport(rendered=len(todo), skipped=sum(job.id in done for job in jobs), failed=failed)
