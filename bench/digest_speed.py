"""How long the manifest check's hashing takes: SHA-256 of a set of files one after another (as load did)
against `files_sha256` (one thread per file), for the same bytes as one file and as N shards.

    python bench/digest_speed.py --workdir /tmp/digest --total-gib 1 --shards 4 --out digest_cpu.json
    python bench/digest_speed.py --workdir /tmp/digest --total-gib 15 --shards 8 --out digest_h200.json

Files are random bytes written once and left in the page cache (read back before timing), so the figure
is the hashing, not the disk; a cold read adds the disk's time to both columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

from quantlab.checkpoint.digest import file_sha256, files_sha256


def _write(path: Path, nbytes: int) -> None:
    if path.is_file() and path.stat().st_size == nbytes:
        return
    with open(path, "wb") as f:
        for _ in range(nbytes >> 24):
            f.write(os.urandom(1 << 24))
        f.write(os.urandom(nbytes & ((1 << 24) - 1)))


def _median_seconds(run, reps: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (CPU / wall near the thread count means the
    threads really ran at once; near 1 means the cores were busy with something else)."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--total-gib", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    total = int(args.total_gib * 2**30)
    args.workdir.mkdir(parents=True, exist_ok=True)
    layouts = {"one file": [args.workdir / "whole.bin"],
               f"{args.shards} shards": [args.workdir / f"shard-{i}.bin" for i in range(args.shards)]}
    _write(layouts["one file"][0], total)
    for path in layouts[f"{args.shards} shards"]:
        _write(path, total // args.shards)
    rows = []
    for layout, paths in layouts.items():
        files_sha256(paths)  # into the page cache
        serial, _ = _median_seconds(lambda: [file_sha256(p) for p in paths], args.reps)
        threaded, cpu = _median_seconds(lambda: files_sha256(paths), args.reps)
        rows.append({"layout": layout, "bytes": sum(p.stat().st_size for p in paths), "serial_s": serial,
                     "threaded_s": threaded, "threaded_cpu_s": cpu})
        print(f"{layout:>12s}: one after another {serial:.3f} s, files_sha256 {threaded:.3f} s "
              f"(CPU {cpu:.3f} s; medians of {args.reps})")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
