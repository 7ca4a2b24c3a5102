"""Guard benchmark: a synthetic national OD table through the real ``release cdr_od`` path, then ``audit verify``.

    ./bench/run guard [--units N] [--days D] [--density K] [--series 50,100,500]

1. Generates a daily OD gold table (bench/guard_data.py: N units, K destinations per
   origin a day on average, heavy-tailed flows, stays large; not timed) and writes it
   to ``gold.cdr_od_daily`` in a fresh lakehouse.
2. Times ``release cdr_od`` end to end through Spark (the guard on the executors, the
   export tables, the partner files, the audit row) and then ``audit verify`` of that
   release (every withheld cell's protection recomputed from the published files).
3. On the first day's slice, in this process: the new guard alone, and, where it finishes
   (at most 40 units, or ``--baseline``), the previous algorithm (one linear program per
   withheld cell per round) as the baseline, with what each withholds.
4. ``--series``: the first day's slice through the new guard alone at each size, with the
   seconds per cell (to see how the time grows).

Prints progress to stderr and, last, one JSON object: cells, slices, withheld primary /
complementary and the complementary cells' summed count, guard / release / verify seconds,
cells per second, per-slice seconds, the first slice through the new guard and the baseline,
the driver's peak memory and how much its resident memory grew during the release and during
the verification (sampled every 20 ms), the JVM's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

from bench.cdr import jvm_peak_rss_mb
from bench.guard_data import synthetic_od
from lib.config import PROJECT_ROOT, load_config
from lib.privacy import guard
from lib.runtime import RUN, configure_logging
from lib.spark import get_spark

DIMS = ["origin", "destination"]
MARGINS = [["origin"], ["destination"], []]


class RssSampler:
    """Peak resident memory of this (driver) process while a block runs, sampled every 20 ms, in MB."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.start = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self.rss_mb()

        def loop() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, self.rss_mb())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())


def slice_guard(frame: Any, method: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = guard.protect(frame[[*DIMS, "n_subscribers"]], DIMS, "n_subscribers", 15, MARGINS, method=method)
    seconds = time.perf_counter() - t0
    c = p.counts
    return {"seconds": round(seconds, 3), "cells": c["cells_in"], "withheld_primary": c["withheld_primary"],
            "withheld_complementary": c["withheld_complementary"],
            "complementary_count_total": c["complementary_count_total"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run guard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=500)
    p.add_argument("--days", type=int, default=1)
    p.add_argument("--density", type=float, default=8.0, help="destinations per origin a day (default 8)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--baseline", action="store_true", help="run the previous algorithm even above 40 units")
    p.add_argument("--series", default="", help="comma-separated unit counts: one slice each, new guard only")
    p.add_argument("--workdir", default="build/bench/guard")
    p.add_argument("--no-slice", action="store_true", help="skip the in-process slice comparison")
    p.add_argument("--driver-memory", default="4g")
    a = p.parse_args(argv)
    configure_logging("INFO")
    work = Path(a.workdir)
    work = (work if work.is_absolute() else PROJECT_ROOT / work) / f"units-{a.units}-days-{a.days}"
    shutil.rmtree(work, ignore_errors=True)
    start = date(2024, 3, 1)
    od = synthetic_od(a.units, a.days, a.density, seed=a.seed, start=start)
    end = max(od["date"])
    print(f"bench guard: {len(od):,} cells, {a.units} units x {a.days} days at density {a.density}",
          file=sys.stderr)
    cfg = load_config("demo", overrides=[
        f"lakehouse.root={work / 'lakehouse'}", f"lakehouse.exports_dir={work / 'exports'}",
        f"lakehouse.reports_dir={work / 'reports'}", f"period.start={start}", f"period.end={end}",
        "spark.show_progress=false", f"spark.driver_memory={a.driver_memory}",
    ])
    spark = get_spark(cfg.spark)
    from jobs import audit, release
    from lib.tables import Lakehouse, spec

    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    src = spark.createDataFrame(od, schema=spec("gold.cdr_od_daily").schema)
    lake.write(src, "gold.cdr_od_daily", period=(start, end), scope={"spatial_unit": "admin2"})

    del src
    with RssSampler() as rel_mem:
        t0 = time.perf_counter()
        out = release.release(spark, cfg, "cdr_od", requester="bench")
        release_seconds = time.perf_counter() - t0
    guard_seconds = next(s.seconds for s in RUN.stages if s.name == "release.guard cdr_od")
    print(f"bench guard: release {release_seconds:.1f} s (guard {guard_seconds:.1f} s)", file=sys.stderr)
    with RssSampler() as ver_mem:
        t0 = time.perf_counter()
        code = audit.run(spark, cfg, argparse.Namespace(action="verify", release_id=out["release_id"]))
        verify_seconds = time.perf_counter() - t0
    print(f"bench guard: audit verify {verify_seconds:.1f} s (exit {code})", file=sys.stderr)
    counts = out["counts"]
    record = lake.read("audit.releases").first()
    assert record is not None
    per_slice = json.loads(record["counts_json"])["per_slice"]
    slice_seconds = sorted(s["seconds"] for s in per_slice)
    jvm_peak = jvm_peak_rss_mb(spark)
    spark.stop()

    first = od[od["date"] == start].reset_index(drop=True)
    new = None if a.no_slice else slice_guard(first, "auto")
    baseline = slice_guard(first, "lp") if (a.units <= 40 or a.baseline) else None
    if baseline and new:
        print(f"bench guard: one slice, new {new['seconds']} s vs previous {baseline['seconds']} s", file=sys.stderr)
    series = []
    for n in [int(x) for x in a.series.split(",") if x.strip()]:
        s = slice_guard(synthetic_od(n, 1, a.density, seed=a.seed), "auto")
        s["units"] = n
        s["microseconds_per_cell"] = round(1e6 * s["seconds"] / s["cells"], 1)
        series.append(s)
        print(f"bench guard: series {n} units: {s}", file=sys.stderr)
    python_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "units": a.units,
        "days": a.days,
        "density": a.density,
        "cells": counts["cells_in"],
        "slices": counts["slices"],
        "withheld_primary": counts["withheld_primary"],
        "withheld_complementary": counts["withheld_complementary"],
        "complementary_count_total": counts["complementary_count_total"],
        "guard_seconds": round(guard_seconds, 2),
        "release_seconds": round(release_seconds, 2),
        "verify_seconds": round(verify_seconds, 2),
        "verified": code == 0,
        "release_and_verify_seconds": round(release_seconds + verify_seconds, 2),
        "cells_per_second": round(counts["cells_in"] / guard_seconds),
        "slice_seconds_median": slice_seconds[len(slice_seconds) // 2],
        "slice_seconds_max": slice_seconds[-1],
        "first_slice_new": new,
        "first_slice_baseline": baseline,
        "complementary_vs_baseline": (round(new["withheld_complementary"] / baseline["withheld_complementary"], 3)
                                      if new and baseline and baseline["withheld_complementary"] else None),
        "complementary_count_vs_baseline": (
            round(new["complementary_count_total"] / baseline["complementary_count_total"], 3)
            if new and baseline and baseline["complementary_count_total"] else None),
        "series": series,
        "driver_python_peak_rss_mb": round(python_peak, 1),
        "release_driver_rss_growth_mb": round(rel_mem.peak - rel_mem.start, 1),
        "verify_driver_rss_growth_mb": round(ver_mem.peak - ver_mem.start, 1),
        "driver_jvm_peak_rss_mb": jvm_peak,
        "cores": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
