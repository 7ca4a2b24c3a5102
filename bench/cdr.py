"""CDR benchmark: N synthetic events through the whole Spark pipeline vs an independent DuckDB reference.

    ./bench/run cdr [--events N] [--days D] [--floor] [--incremental] [--reuse-inputs] [--event-log]

1. Generates about N events (FlowDB layout, Parquet, 1% bad rows and duplicates)
   with the demo generator (not timed).
2. Times the Spark pipeline from the files to gold: ``cdr.ingest`` (bronze,
   quarantine, cells) and ``cdr.mobility`` (daily and home locations, presence,
   OD daily / weekly / home-to-current, displacement), all written to Delta.
3. Runs bench/cdr_reference.py in its own process: the same daily locations,
   baseline homes and consecutive-day OD matrix in DuckDB SQL over the same files,
   timed, then compared row by row with the pipeline's tables.
4. With --floor: bench/cdr_spark_sql.py, the reference's statements in bare
   Spark SQL in the same session (no Delta, quarantine or other tables), timed
   and compared with the reference too: what Spark alone needs for that work
   here (spark_sql_floor_seconds, floor_ratio against DuckDB, pipeline_floor_ratio:
   the pipeline's seconds over the floor's). Then the same statements split in
   two steps like the pipeline's two jobs: the deduplicated, located events
   written once, both parties pseudonymised, as Parquet partitioned by date,
   then read back for the three results (spark_sql_floor_rows_seconds,
   floor_rows_ratio: over the floor): the least a pipeline that keeps its
   events adds to the floor; its row count is checked against bronze.cdr_events.
5. With --incremental: one more day is generated and held back; after the timed
   run over the D days, that day is ingested and ``cdr.mobility --incremental``
   adds it (incremental_seconds, incremental_ratio: over the D-day run), then a
   full run over all D + 1 days builds a second lakehouse (full_rerun_seconds;
   incremental_ratio_warm: the day over it, both in a warm JVM) and every
   mobility table is compared with it (incremental_identical).
--reuse-inputs keeps generated files of an earlier run with the same parameters;
--event-log writes Spark's event log (summary: python -m bench.eventlog DIR).

Prints progress to stderr and, last, one JSON object: events, spark_seconds,
reference_seconds, ratio (spark / reference), events_per_second, identical,
plus row counts, differences per table and peak memory (driver JVM and Python).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from pyspark.sql import functions as F

from jobs.cdr import ingest, mobility
from jobs.demo import cdr_synth
from jobs.demo.main import demo_config
from lib.config import PROJECT_ROOT, CdrInput, Config, load_config
from lib.runtime import configure_logging
from lib.spark import get_spark


def jvm_peak_rss_mb(spark) -> float | None:  # type: ignore[no-untyped-def]
    """Peak resident memory of the driver JVM (local mode: driver and executors share it)."""
    pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()  # noqa: SLF001
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def dir_mb(path: Path) -> float:
    """Disk used by the files under ``path``, in MB."""
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1) if path.exists() else 0.0


def full_run(spark, cfg: Config) -> float:  # type: ignore[no-untyped-def]
    """cdr.ingest and cdr.mobility over the configured period; the seconds taken."""
    t0 = time.perf_counter()
    ingest.run(spark, cfg)
    mobility.run(spark, cfg)
    return time.perf_counter() - t0


def incremental_day(spark, run_cfg: Config, work: Path, new_day: date,  # type: ignore[no-untyped-def]
                    history_seconds: float) -> dict:
    """Add ``new_day`` to the pipeline's lakehouse incrementally (timed; incremental_ratio: against the full
    run over the earlier days, ``history_seconds``), then build a second lakehouse with a full run over all the
    days (timed) and compare every mobility table row for row."""
    import argparse

    from lib.tables import Lakehouse

    daily_dir = work / "inputs" / "daily"
    start = run_cfg.period.start
    assert start is not None
    day_sources = [CdrInput(path=str(daily_dir / t / f"day={new_day}"), event_type=t, format="parquet")
                   for t in cdr_synth.EVENT_TYPES if (daily_dir / t / f"day={new_day}").exists()]
    day_cfg = run_cfg.model_copy(update={
        "period": run_cfg.period.model_copy(update={"start": new_day, "end": new_day}),
        "cdr": run_cfg.cdr.model_copy(update={"inputs": day_sources})})
    all_cfg = run_cfg.model_copy(update={"period": run_cfg.period.model_copy(update={"start": start,
                                                                                      "end": new_day})})
    t0 = time.perf_counter()
    ingest.run(spark, day_cfg)
    mobility.run(spark, all_cfg, argparse.Namespace(incremental=True))
    incremental_seconds = time.perf_counter() - t0
    print(f"bench cdr: day {new_day} added incrementally in {incremental_seconds:.1f} s", file=sys.stderr)

    full_root = work / "lakehouse_full"
    full_cfg = all_cfg.model_copy(update={
        "lakehouse": all_cfg.lakehouse.model_copy(update={"root": str(full_root)}),
        "cdr": all_cfg.cdr.model_copy(update={"inputs": run_cfg.cdr.inputs})})
    full_seconds = full_run(spark, full_cfg)
    print(f"bench cdr: full run over all {(new_day - start).days + 1} days {full_seconds:.1f} s", file=sys.stderr)
    a = Lakehouse(spark, run_cfg.lakehouse.resolved_root())
    b = Lakehouse(spark, str(full_root))
    differences = {}
    for name in mobility.MOBILITY_TABLES:
        x, y = a.read(name), b.read(name)
        if "period_start" in x.columns and "period_end" in x.columns:
            x, y = x.drop("period_start"), y.drop("period_start")
        differences[name] = x.exceptAll(y).count() + y.exceptAll(x).count()
    return {"incremental_day": str(new_day), "incremental_seconds": round(incremental_seconds, 2),
            "full_rerun_seconds": round(full_seconds, 2),
            "incremental_ratio": round(incremental_seconds / history_seconds, 3),
            # the same day against the full run that follows it in the same (warm) JVM: the D-day run is the
            # first Spark work of the process, so incremental_ratio compares a warm run with a colder one
            "incremental_ratio_warm": round(incremental_seconds / full_seconds, 3),
            "incremental_identical": all(v == 0 for v in differences.values()),
            "incremental_differences": {k: v for k, v in differences.items() if v}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run cdr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="about this many events (default 1,000,000)")
    p.add_argument("--days", type=int, default=28)
    p.add_argument("--events-per-day", type=float, default=6.0)
    p.add_argument("--workdir", default="build/bench/cdr")
    p.add_argument("--driver-memory", default="4g")
    p.add_argument("--floor", action="store_true",
                   help="also time the reference's statements in bare Spark SQL (bench/cdr_spark_sql.py)")
    p.add_argument("--reuse-inputs", action="store_true",
                   help="keep the generated input files of an earlier run with the same parameters")
    p.add_argument("--incremental", action="store_true",
                   help="also add one more day incrementally (cdr.ingest of the day, cdr.mobility --incremental) "
                        "and check it against a full run over all the days")
    p.add_argument("--skip-reference", action="store_true",
                   help="do not run the DuckDB reference (for sizes it cannot hold in memory); nothing is compared")
    p.add_argument("--event-log", action="store_true",
                   help="write Spark's event log under the work folder and print the slowest stages")
    a = p.parse_args(argv)
    if a.events < 1000:
        p.error("--events must be at least 1000")
    configure_logging("INFO")
    os.environ.setdefault("MIGRALAKE_PSEUDONYM_KEY", secrets.token_hex(32))
    work = Path(a.workdir)
    work = (work if work.is_absolute() else PROJECT_ROOT / work) / f"events-{a.events}"
    params = {"events": a.events, "days": a.days, "events_per_day": a.events_per_day, "extra_day": a.incremental}
    stamp = work / "inputs" / "params.json"
    reuse = a.reuse_inputs and stamp.exists() and json.loads(stamp.read_text()) == params \
        and (work / "inputs" / "cdr" / "truth.json").exists()
    for old in (work.iterdir() if work.exists() else []):
        if not (reuse and old.name == "inputs"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    n_subs = max(10, round(a.events / (a.days * a.events_per_day)))
    cfg = load_config("demo", overrides=[
        f"lakehouse.root={work / 'lakehouse'}", f"demo.input_dir={work / 'inputs'}",
        f"demo.n_subscribers={n_subs}", f"demo.n_days={a.days + int(a.incremental)}",
        f"demo.event_day={a.days // 2}",
        f"demo.events_per_day={a.events_per_day}", "spark.show_progress=false",
        f"spark.driver_memory={a.driver_memory}",
    ])
    if a.event_log:
        (work / "eventlog").mkdir(parents=True, exist_ok=True)
        cfg = cfg.model_copy(update={"spark": cfg.spark.model_copy(update={"conf": {
            **cfg.spark.conf, "spark.eventLog.enabled": "true", "spark.eventLog.compress": "false",
            "spark.eventLog.dir": str(work / "eventlog")}})})
    spark = get_spark(cfg.spark)

    t0 = time.perf_counter()
    if reuse:
        truth = json.loads((work / "inputs" / "cdr" / "truth.json").read_text())
        print("bench cdr: reusing the generated inputs", file=sys.stderr)
    else:
        shutil.rmtree(work / "inputs", ignore_errors=True)
        truth = cdr_synth.generate(spark, cfg.demo, Path(cfg.demo.input_dir), fmt="parquet")
        stamp.write_text(json.dumps(params))
    generate_seconds = time.perf_counter() - t0
    events = truth["rows_total"]
    print(f"bench cdr: generated {events:,} event rows for {n_subs:,} subscribers in {generate_seconds:.1f} s",
          file=sys.stderr)
    run_cfg = demo_config(cfg, Path(cfg.demo.input_dir))
    cdr_dir = Path(cfg.demo.input_dir) / "cdr"
    sources = [CdrInput(path=str(cdr_dir / t), event_type=t, format="parquet") for t in cdr_synth.EVENT_TYPES]
    new_day = None
    if a.incremental:  # the last generated day arrives later, as its own delivery
        assert run_cfg.period.end is not None
        new_day = run_cfg.period.end
        run_cfg = run_cfg.model_copy(update={"period": run_cfg.period.model_copy(
            update={"end": new_day - timedelta(days=1)})})
        daily_dir = work / "inputs" / "daily"
        if not (reuse and daily_dir.exists()):
            cdr_synth.split_by_day(spark, cdr_dir, daily_dir)
        # The run over the earlier days reads the same files as the floor and the reference (the new day's rows
        # in them are outside its period and quarantined as such); the new day then comes as its own delivery.
    run_cfg = run_cfg.model_copy(update={"cdr": run_cfg.cdr.model_copy(update={"inputs": sources})})

    spark_seconds = full_run(spark, run_cfg)
    print(f"bench cdr: Spark pipeline (files -> gold) {spark_seconds:.1f} s", file=sys.stderr)

    # Export the pipeline's results for the row-by-row comparison (not timed).
    from lib.tables import Lakehouse

    lake = Lakehouse(spark, run_cfg.lakehouse.resolved_root())
    out = work / "spark_out"
    lake.read("silver.cdr_daily_locations").select("date", "subscriber_id", "unit", "n_events") \
        .write.parquet(str(out / "daily_locations"))
    lake.read("silver.cdr_home_locations").filter(F.col("window") == "baseline") \
        .select("subscriber_id", "home_unit", "n_days_home", "n_days_seen").write.parquet(str(out / "homes"))
    lake.read("gold.cdr_od_daily").select("date", "origin", "destination", "n_subscribers") \
        .write.parquet(str(out / "od_daily"))
    bronze_rows = lake.read("bronze.cdr_events").count() if a.floor else 0  # before the day is added
    jvm_peak = jvm_peak_rss_mb(spark)
    incremental = incremental_day(spark, run_cfg, work, new_day, spark_seconds) if new_day is not None else {}

    c = run_cfg.cdr
    start, end = run_cfg.period.start, run_cfg.period.end
    assert start is not None and end is not None
    b_start, b_end = mobility.baseline_window(start, end, c.event_date, c.baseline_days)
    floor_seconds = floor_rows_seconds = None
    floor_rows_events = 0
    if a.floor:
        from bench import cdr_spark_sql

        def floor(out: Path, with_rows: bool) -> float:
            return cdr_spark_sql.run(
                spark, inputs=cdr_dir, cells=cdr_dir / "cells.csv", admin2=cdr_dir / "admin2.geojson",
                start=str(start), end=str(end), n_days=(end - start).days + 1, baseline_start=str(b_start),
                baseline_end=str(b_end), min_events=c.min_events, max_mean=c.max_mean_events_per_day,
                max_day=c.max_events_single_day, home_min_days=c.home_min_days,
                key=os.environ["MIGRALAKE_PSEUDONYM_KEY"].encode("utf-8"), out=out, with_rows=with_rows)

        floor_seconds = floor(work / "floor_out", False)
        print(f"bench cdr: bare Spark SQL floor {floor_seconds:.1f} s", file=sys.stderr)
        floor_rows_seconds = floor(work / "floor_rows_out", True)
        floor_rows_events = spark.read.parquet(str(work / "floor_rows_out" / "events")).count()
        print(f"bench cdr: the floor with its {floor_rows_events:,} events written once {floor_rows_seconds:.1f} s "
              f"(bronze.cdr_events holds {bronze_rows:,})", file=sys.stderr)
    spark.stop()
    python_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cmd = [
        sys.executable, "-m", "bench.cdr_reference",
        "--inputs", str(cdr_dir), "--cells", str(cdr_dir / "cells.csv"), "--admin2", str(cdr_dir / "admin2.geojson"),
        "--start", str(start), "--end", str(end), "--n-days", str((end - start).days + 1),
        "--baseline-start", str(b_start), "--baseline-end", str(b_end),
        "--min-events", str(c.min_events), "--max-mean", str(c.max_mean_events_per_day),
        "--max-day", str(c.max_events_single_day), "--home-min-days", str(c.home_min_days),
        "--out", str(work / "reference_out"), "--spark-out", str(out),
    ] + (["--floor-out", str(work / "floor_out"), "--floor-out", str(work / "floor_rows_out")] if a.floor else [])
    if c.home_night_hours != (19, 7) or c.daily_location_rule != "last" or c.hours is not None \
            or c.spatial_unit != "admin2":
        raise SystemExit("bench cdr: the reference implements the default rules only")
    if a.skip_reference:
        ref: dict[str, Any] = {"reference_seconds": None, "differences": {}, "rows": None,
                               "reference_peak_rss_mb": None}
    else:
        ref = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE,
                                        text=True).stdout.strip().splitlines()[-1])
        print(f"bench cdr: DuckDB reference {ref['reference_seconds']:.1f} s; differences {ref['differences']}",
              file=sys.stderr)
    ref_s = ref["reference_seconds"]
    result = {
        "events": events,
        "subscribers": n_subs,
        "days": a.days,
        "spark_seconds": round(spark_seconds, 2),
        "reference_seconds": ref_s,
        "ratio": round(spark_seconds / ref_s, 2) if ref_s else None,
        "events_per_second": round(events / spark_seconds),
        "identical": (all(v == 0 for v in ref["differences"].values()) and ref["rows"]["daily_locations"] > 0)
        if ref["rows"] else None,
        **({"spark_sql_floor_seconds": round(floor_seconds, 2),
            "floor_ratio": round(floor_seconds / ref_s, 2) if ref_s else None,
            "pipeline_floor_ratio": round(spark_seconds / floor_seconds, 2),
            "floor_identical": all(v == 0 for d in ref["floor_differences"] for v in d.values())
            if ref_s else None}
           if floor_seconds is not None else {}),
        **({"spark_sql_floor_rows_seconds": round(floor_rows_seconds, 2),
            "floor_rows_ratio": round(floor_rows_seconds / floor_seconds, 2),
            "floor_rows_events": floor_rows_events, "bronze_rows": bronze_rows,
            "floor_rows_match_bronze": floor_rows_events == bronze_rows}
           if floor_rows_seconds is not None and floor_seconds is not None else {}),
        **incremental,
        "rows": ref["rows"],
        "differences": ref["differences"],
        "driver_jvm_peak_rss_mb": jvm_peak,
        "driver_python_peak_rss_mb": round(python_peak, 1),
        "driver_memory_setting": a.driver_memory,
        "reference_peak_rss_mb": ref["reference_peak_rss_mb"],
        "generate_seconds": round(generate_seconds, 2),
        "lakehouse_mb": dir_mb(work / "lakehouse"),
        "inputs_mb": dir_mb(work / "inputs" / "cdr"),
        "cores": os.cpu_count(),
    }
    print(json.dumps(result))
    checks = ("identical", "floor_identical", "floor_rows_match_bronze", "incremental_identical")
    return 1 if any(result.get(k) is False for k in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
