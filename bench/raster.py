"""Raster benchmark: the settlement-change pipeline on Spark vs a single-process rasterio + numpy loop.

    ./bench/run raster [--megapixels N] [--window PX] [--learned] [--workdir DIR]

1. Generates a synthetic Landsat-7-like scene of about N megapixels per date and a
   second date with planted growth (seeded; not timed).
2. Times the full pipeline through Spark (``remote_sensing.change``: catalogue,
   per-window built-up change on the executors, gold per H3 cell and admin area
   written to Delta, the change COG and its quick-look).
3. Runs bench/raster_reference.py in its own process: the same per-H3-cell pixel
   counts in a plain windowed loop (timed inside that process), and compares them
   with ``gold.settlement_change_h3`` cell by cell.

The scenes are read through a TOA-reflectance profile (digital numbers / 255), so the
radiometric check (every window measured on the executors) is part of the timed run;
``radiometry_seconds`` and ``tiles_seconds`` are its stages.

With ``--learned``: a label raster of the first date's true cover (left half) trains a
model (``remote_sensing.train``), the change job is timed again with that model
(``learned_change_seconds``; ``learned_overhead`` = learned / index change seconds, same
run), and ``remote_sensing.accuracy`` is timed against the right half's truth, reporting
the model's and the index rule's producer's / user's accuracy there.

Prints progress to stderr and, last, one JSON object: megapixels, spark_seconds,
baseline_seconds, spark_mp_per_second, baseline_mp_per_second, ratio (Spark rate /
baseline rate), identical, peak_task_memory_mb (peak resident memory of a Spark
Python worker, which processes one window at a time), window_size, windows.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from pyspark.sql import functions as F

from jobs.demo import raster_synth
from jobs.remote_sensing import change
from lib.config import PROJECT_ROOT, LabelSpec, RemoteSensingSettings, load_config
from lib.runtime import RUN, configure_logging
from lib.spark import get_spark, one_row, to_pandas
from lib.tables import Lakehouse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run raster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megapixels", type=float, default=25.0, help="pixels per date, in millions (default 25)")
    p.add_argument("--window", type=int, default=1024, help="window side in pixels (default 1024)")
    p.add_argument("--learned", action="store_true", help="also train, apply and assess a learned model")
    p.add_argument("--workdir", default="build/bench/raster")
    args = p.parse_args(argv)
    configure_logging("INFO")
    work = Path(args.workdir)
    work = work if work.is_absolute() else PROJECT_ROOT / work
    shutil.rmtree(work, ignore_errors=True)
    side = int(math.sqrt(args.megapixels * 1e6))
    cfg = load_config(profile="demo", overrides=[f"lakehouse.root={work / 'lake'}", "spark.show_progress=false"])
    t = cfg.remote_sensing.sensors["landsat7_etm"].thresholds
    thresholds = (t.ndbi_min, t.ndvi_max, t.mndwi_max)
    print(f"[bench] generating {side} x {side} px scenes ...", file=sys.stderr)
    before = raster_synth.synthetic_scene(work / "scenes" / "before.tif", side, side, seed=42)
    after = work / "scenes" / "after.tif"
    truth = raster_synth.plant_growth(before, after, seed=43, thresholds=thresholds,
                                      n_sites=max(2, side // 1000), radius=20)
    rs = cfg.remote_sensing.model_dump()
    toa = {**rs["sensors"]["landsat7_etm"], "level": "toa", "scale": 1 / 255, "offset": 0.0}
    rs.update(window_size=args.window, sensors={**rs["sensors"], "bench_toa": toa}, scenes=[
        {"path": str(before), "date": "2024-01-01", "sensor": "bench_toa", "area": "bench"},
        {"path": str(after), "date": "2024-07-01", "sensor": "bench_toa", "area": "bench"}])
    cfg = cfg.model_copy(update={"remote_sensing": RemoteSensingSettings.model_validate(rs)})
    spark = get_spark(cfg.spark)
    spark.range(1).count()  # JVM warm-up outside the timing
    print("[bench] Spark pipeline ...", file=sys.stderr)
    start = time.perf_counter()
    summary = change.run(spark, cfg)
    spark_seconds = time.perf_counter() - start
    stage_seconds = {st.name: st.seconds for st in RUN.stages}
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    cols = ["h3_index", "n_pixels", "n_pixels_valid", "n_new", "n_lost", "n_stable"]
    ours = to_pandas(lake.read("gold.settlement_change_h3").select(*cols))
    tiles = lake.read("silver.settlement_tiles")
    peak = one_row(tiles.agg(F.max("worker_peak_rss_mb")))[0]
    n_windows = tiles.count()
    learned = learned_run(spark, cfg, work, before, side, spark_seconds) if args.learned else {}
    if learned:  # the learned run replaced the pair's tiles: its workers' peak memory
        learned["learned_peak_task_memory_mb"] = round(float(one_row(lake.read("silver.settlement_tiles").agg(
            F.max("worker_peak_rss_mb")))[0]), 1)
    spark.stop()

    print("[bench] single-process reference ...", file=sys.stderr)
    ref_out = work / "reference.parquet"
    proc = subprocess.run([sys.executable, "-m", "bench.raster_reference", str(before), str(after), str(ref_out),
                           "--h3", str(cfg.remote_sensing.h3_resolution),
                           "--thresholds", ",".join(map(str, thresholds))],
                          check=True, capture_output=True, text=True, cwd=PROJECT_ROOT)
    baseline_seconds = float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])
    ref = pd.read_parquet(ref_out)
    ours = ours.sort_values("h3_index").reset_index(drop=True).astype({c: "int64" for c in cols[1:]})
    ref = ref.sort_values("h3_index").reset_index(drop=True).astype({c: "int64" for c in cols[1:]})
    identical = bool(ours.equals(ref[cols]))
    differences = 0 if identical else int(len(pd.concat([ours, ref[cols]]).drop_duplicates(keep=False)))
    mp = side * side / 1e6
    result = {
        "megapixels": round(mp, 3),
        "spark_seconds": round(spark_seconds, 2),
        "baseline_seconds": round(baseline_seconds, 2),
        "spark_mp_per_second": round(mp / spark_seconds, 3),
        "baseline_mp_per_second": round(mp / baseline_seconds, 3),
        "ratio": round(baseline_seconds / spark_seconds, 3),
        "identical": identical,
        "differing_rows": differences,
        "h3_cells": len(ours),
        "peak_task_memory_mb": round(float(peak), 1) if peak is not None else None,
        "window_size": args.window,
        "windows": n_windows,
        "planted_new_pixels": truth["planted_pixels"],
        "new_pixels_found": int(ours["n_new"].sum()),
        "pairs_written": summary["pairs_written"],
        "radiometry_seconds": round(stage_seconds.get("remote_sensing.radiometry", float("nan")), 2),
        "tiles_seconds": round(stage_seconds.get("remote_sensing.tiles", float("nan")), 2),
        **learned,
    }
    print(json.dumps(result))
    return 0 if identical else 1


def learned_run(spark, cfg, work: Path, before: Path, side: int, index_seconds: float) -> dict:  # type: ignore[no-untyped-def]
    """Train on the left half's true cover, re-run the change with the model, assess on the right half."""
    import numpy as np
    import rasterio

    from jobs.remote_sensing import accuracy, train

    with rasterio.open(before) as src:
        height, width = src.height, src.width
    truth = np.zeros((height, width), dtype=np.uint8)
    for row0 in range(0, height, 2048):
        rows = np.arange(row0, min(height, row0 + 2048))
        truth[rows[0]:rows[-1] + 1] = raster_synth.cover(rows, np.arange(width), 42) == 2
    cols = np.arange(width)[None, :]
    left = raster_synth.label_raster(work / "labels_left.tif", before, truth, np.broadcast_to(cols < width // 2,
                                                                                               truth.shape))
    right = raster_synth.label_raster(work / "reference_right.tif", before, truth,
                                      np.broadcast_to(cols >= width // 2, truth.shape))
    del truth
    rs = cfg.remote_sensing.model_copy(update={
        "labels": [LabelSpec(path=str(left), area="bench", date="2024-01-01")],
        "reference": [LabelSpec(path=str(right), area="bench", date="2024-01-01")]})
    cfg = cfg.model_copy(update={"remote_sensing": rs})
    print("[bench] training ...", file=sys.stderr)
    t0 = time.perf_counter()
    trained = train.run(spark, cfg)
    train_seconds = time.perf_counter() - t0
    cfg = cfg.model_copy(update={"remote_sensing": rs.model_copy(update={"classifier": trained["model"]})})
    print("[bench] change with the learned model ...", file=sys.stderr)
    t0 = time.perf_counter()
    change.run(spark, cfg)
    learned_seconds = time.perf_counter() - t0
    print("[bench] accuracy ...", file=sys.stderr)
    t0 = time.perf_counter()
    rows = accuracy.run(spark, cfg)["rows"]
    accuracy_seconds = time.perf_counter() - t0
    by = {r["classifier"].split(":")[0]: r for r in rows if r["layer"] == "builtup" and str(r["date"]) == "2024-01-01"}
    return {
        "train_seconds": round(train_seconds, 2),
        "train_samples": sum(trained["samples"]["train"].values()),
        "learned_change_seconds": round(learned_seconds, 2),
        "learned_overhead": round(learned_seconds / index_seconds, 3),
        "accuracy_seconds": round(accuracy_seconds, 2),
        "model_producers_right_half": round(by["model"]["producers_accuracy"], 4),
        "model_users_right_half": round(by["model"]["users_accuracy"], 4),
        "index_producers_right_half": round(by["index"]["producers_accuracy"], 4),
        "index_users_right_half": round(by["index"]["users_accuracy"], 4),
    }


if __name__ == "__main__":
    sys.exit(main())
