"""FCS read speed: ``blinaprofile.io.fcs.read_fcs`` on a float32 file, events per second.

Writes one ``--events`` x ``--channels`` float32 FCS file (default 1,000,000 x 16, 64 MB)
to a temporary folder, reads it ``--repeats`` times into float64 and into float32, and
prints the best and median time, events/s and MB/s of the file per output dtype.

Run::

    .venv/bin/python benchmarks/fcs_read.py [--events 1000000] [--channels 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.fcs_write import write_fcs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)

    rng = np.random.default_rng(1)
    events = rng.normal(1000, 300, size=(a.events, a.channels)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.fcs"
        write_fcs(path, events, channels=[f"C{i}" for i in range(a.channels)])
        size_mb = path.stat().st_size / 1e6
        print(f"file: {a.events:,} events x {a.channels} channels float32, {size_mb:.1f} MB")
        print(f"{'read as':<8} {'best ms':>9} {'median ms':>10} {'events/s':>14} {'MB/s':>8}")
        for dtype in (np.float64, np.float32):
            times = []
            for _ in range(a.repeats):
                start = time.perf_counter()
                data = read_fcs(path, dtype=dtype)
                times.append(time.perf_counter() - start)
            if not np.array_equal(data.events, events.astype(dtype)):
                print(f"error: {np.dtype(dtype).name} read differs from the written events")
                return 1
            best = min(times)
            print(
                f"{np.dtype(dtype).name:<8} {best * 1e3:9.1f} {statistics.median(times) * 1e3:10.1f} "
                f"{a.events / best:14,.0f} {size_mb / best:8.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
