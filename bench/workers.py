"""Throughput of idgen's workers: ``idgen batch`` and ``idgen prepare-data`` with 1 and 2 workers,
interleaved in this one run (median of the repeats), with the peak memory of the largest process
(one worker's, or the parent's while it runs the only worker).

    python bench/workers.py [--jobs 16] [--photos 48] [--repeats 2] [--base tiny]

With the tiny presets this is a CPU stand-in (random models of a few MB: the work per image is
small beside a worker's start), and says so; pass a real --base for the real ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTO = os.path.join(HERE, "..", "idgen", "assets", "astronaut.jpg")
#: Runs one command and prints the peak RSS (KiB) of the largest process it started.
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL).returncode; print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measured(command: list[str]) -> tuple[float, float]:
    """Seconds and peak GiB of ``command``, run in a fresh process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK, *command], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    code, peak = result.stdout.split()
    if int(code) not in (0, 1):
        raise SystemExit(f"{' '.join(command)} exited {code}")
    return seconds, int(peak) / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--steps", default="4")
    args = parser.parse_args()
    stand_in = " (CPU stand-in: tiny random models)" if args.base.startswith("tiny") else ""
    idgen = [sys.executable, "-m", "idgen"]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(PHOTO, os.path.join(tmp, "face.jpg"))
        with open(os.path.join(tmp, "jobs.jsonl"), "w") as handle:
            handle.writelines(json.dumps({"id": f"j{i:03d}", "face": "face.jpg", "prompt": "a photo", "seed": i}) + "\n"
                              for i in range(args.jobs))
        photos = os.path.join(tmp, "photos")
        os.makedirs(photos)
        for i in range(args.photos):
            shutil.copy(PHOTO, os.path.join(photos, f"p{i:03d}.jpg"))
        rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for repeat in range(args.repeats):
            for workers in (1, 2):  # interleaved: both see the same machine
                out = os.path.join(tmp, f"batch-{workers}-{repeat}")
                rows.setdefault(("batch", workers), []).append(measured(
                    [*idgen, "batch", os.path.join(tmp, "jobs.jsonl"), "--out", out, "--base", args.base, "--steps",
                     args.steps, "--workers", str(workers), "--no-watermark"]))
                data = os.path.join(tmp, f"data-{workers}-{repeat}")
                rows.setdefault(("prepare-data", workers), []).append(measured(
                    [*idgen, "prepare-data", photos, "--out", data, "--face-model", "tiny", "--shard-size", "8",
                     "--workers", str(workers)]))
    count = {"batch": args.jobs, "prepare-data": args.photos}
    print(f"| command | workers | items/s | ratio to 1 worker | peak GiB (largest process) |{stand_in}")
    print("|---|---|---|---|---|")
    for (command, workers), runs in rows.items():
        seconds = statistics.median(s for s, _ in runs)
        base = statistics.median(s for s, _ in rows[(command, 1)])
        print(f"| {command} | {workers} | {count[command] / seconds:.2f} | {base / seconds:.2f}x | "
              f"{max(p for _, p in runs):.2f} |")
    print(f"\n{os.cpu_count()} CPU cores; {args.repeats} repeats, median; each run includes starting its workers "
          "and loading the models in each")


if __name__ == "__main__":
    main()
