"""``cdr.mobility --incremental``: bring the mobility tables up to date after bronze days were added or replaced.

CDR arrives daily. After ``cdr.ingest`` wrote a new day (or re-delivered an earlier one), this run recomputes
only what those days change, and its result equals a full ``cdr.mobility`` run over the period, row for row:

1. The changed days: bronze partitions that commits after the last run's bronze version added or removed (from
   the Delta log), plus the days the period gained. Their ``silver.cdr_subscriber_days`` partitions are
   recomputed from bronze; no other day's events are read.
2. The activity filters look at the whole period (totals, the most on one day, the mean per day of the
   period). When the run only adds days after the last run's period (the daily case), the stored
   per-subscriber totals are carried and only the new days' subscriber days read; when an earlier day changed,
   the filters run again over every stored subscriber day of the period. Subscribers whose verdict changed
   ("flipped") are the only ones whose rows on other days change.
3. Daily locations: the changed days are replaced; on other days, rows of subscribers now left out are
   deleted and rows of subscribers now kept are added.
4. Home locations: windows that contain a changed day, or whose bounds moved with the period's end, are
   replaced; in other windows only flipped subscribers change.
5. Gold tables built from daily locations (presence, OD daily and weekly, home-to-current): partitions the
   changed days reach are recomputed from silver (a day, the day before it for the consecutive-day flows,
   their ISO weeks); elsewhere the counts change only by the contributions of the affected subscribers (the
   flipped ones and those whose baseline home changed), which are computed from silver before and after this
   run (Delta time travel) and merged in. Every count is a number of distinct subscribers that each add at
   most one, so old minus new contributions is exact. Displacement tables (a few rows per week, built from
   home locations): with no affected subscriber only the recomputed post-event windows are replaced (a
   window's rows depend on the baselines and that window's homes); otherwise every window.

With population scaling, a changed baseline can change every weight, so the gold tables are then recomputed
from silver in full (logged). A run with other settings, another period start, an earlier period end, after the cells table changed, or
when a mobility table changed after the last recorded run (a run that died half-way: each run is recorded
last, with the versions it left every table at) refuses: run the full job, which rewrites the whole slice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from jobs.cdr import mobility as m
from lib.config import CdrSettings, Config
from lib.runtime import JobFailed, Write, log, side_by_side, stage
from lib.tables import Lakehouse


class IncrementalRefused(JobFailed):
    """An incremental run that cannot equal a full run; the message says why and what to run instead (the CLI
    prints it and exits 4, nothing written)."""


def last_runs(lake: Lakehouse, spatial_unit: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The latest recorded run for the spatial unit, and the latest of any unit (one read of the run log)."""
    if not lake.exists("silver.cdr_mobility_runs"):
        return None, None
    w = Window.partitionBy("spatial_unit").orderBy(F.col("finished_at").desc())
    rows = [r.asDict() for r in lake.read("silver.cdr_mobility_runs").withColumn("_n", F.row_number().over(w))
            .filter("_n = 1").drop("_n").collect()]
    mine = [r for r in rows if r["spatial_unit"] == spatial_unit]
    return (mine[0] if mine else None), max(rows, key=lambda r: r["finished_at"], default=None)


def _dates_between(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def changed_days(lake: Lakehouse, last: dict[str, Any], bronze_v: int, start: date, end: date) -> list[date]:
    """Days whose bronze partition changed after the last run, and the days the period gained."""
    touched = lake.changed_partitions("bronze.cdr_events", "event_date", int(last["bronze_version"]), bronze_v)
    if touched is None:
        raise IncrementalRefused("the bronze.cdr_events log no longer holds every commit since the last run "
                                 f"(version {last['bronze_version']}): run cdr.mobility without --incremental")
    days = {date.fromisoformat(v) for v in touched}
    days |= set(_dates_between(last["period_end"] + timedelta(days=1), end)) if end > last["period_end"] else set()
    return sorted(d for d in days if start <= d <= end)


def _in(col: str, values: list[Any]) -> Column:
    return F.col(col).isin(values) if values else F.lit(False)


def _merge_delete(lake: Lakehouse, name: str, subs: DataFrame, where: str) -> None:
    """Delete the rows of ``subs`` (subscriber_id) that satisfy ``where`` (SQL on the table's columns, as t)."""
    table = DeltaTable.forPath(lake.spark, lake.location(name))
    (table.alias("t").merge(subs.alias("s"), f"t.subscriber_id = s.subscriber_id AND {where}")
     .whenMatchedDelete().execute())


def _sql_in(col: str, values: list[date]) -> str:
    return f"t.{col} IN ({', '.join(repr(d.isoformat()) for d in values)})" if values else "FALSE"


def _delta_counts(new: DataFrame, old: DataFrame, keys: list[str], counts: list[str]) -> DataFrame:
    """Per key: the new minus the old value of each count (rows where every difference is zero dropped)."""
    n = new.select(*keys, *[F.col(c).alias(f"_new_{c}") for c in counts])
    o = old.select(*keys, *[F.col(c).alias(f"_old_{c}") for c in counts])
    joined = n.join(o, on=keys, how="full_outer")
    diffs = [(F.coalesce(F.col(f"_new_{c}"), F.lit(0)) - F.coalesce(F.col(f"_old_{c}"), F.lit(0))).alias(f"d_{c}")
             for c in counts]
    out = joined.select(*keys, *diffs)
    return out.filter(" OR ".join(f"d_{c} <> 0" for c in counts))


def _merge_counts(lake: Lakehouse, name: str, delta: DataFrame, keys: list[str], counts: list[str],
                  extra_insert: dict[str, Column] | None = None) -> None:
    """Add ``delta``'s ``d_<count>`` to the table's counts: rows reaching zero subscribers are deleted, keys
    not there yet are inserted (est_population stays null: this path runs without scaling)."""
    table = DeltaTable.forPath(lake.spark, lake.location(name))
    cond = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    first = counts[0]
    insert: dict[str, str | Column] = {k: F.col(f"s.{k}") for k in keys}
    insert.update({c: F.col(f"s.d_{c}") for c in counts})
    insert["est_population"] = F.lit(None).cast("double")
    insert.update(extra_insert or {})
    (table.alias("t").merge(delta.alias("s"), cond)
     .whenMatchedDelete(condition=f"t.{first} + s.d_{first} = 0")
     .whenMatchedUpdate(set={c: F.col(f"t.{c}") + F.col(f"s.d_{c}") for c in counts})
     .whenNotMatchedInsert(values=insert)
     .execute())


def run(lake: Lakehouse, cfg: Config, start: date, end: date) -> None:
    cdr: CdrSettings = cfg.cdr
    unit = cdr.spatial_unit
    last, latest = last_runs(lake, unit)
    if last is None:
        raise IncrementalRefused(f"no earlier cdr.mobility run for spatial unit {unit}: run it without "
                                 "--incremental first")
    if last["period_start"] != start:
        raise IncrementalRefused(f"the last run's period starts on {last['period_start']}, this one on {start}: "
                                 "run cdr.mobility without --incremental")
    if end < last["period_end"]:
        raise IncrementalRefused(f"the period ends on {end}, before the last run's end {last['period_end']}: "
                                 "run cdr.mobility without --incremental")
    if last["settings_sha256"] != m.settings_sha256(cdr, start):
        raise IncrementalRefused("the mobility settings changed since the last run (rules, windows, filters or "
                                 "scaling): run cdr.mobility without --incremental")
    bronze_v, cells_v = lake.version("bronze.cdr_events"), lake.version("silver.cdr_cells")
    if cells_v != last["cells_version"]:
        raise IncrementalRefused("silver.cdr_cells changed since the last run: run cdr.mobility without "
                                 "--incremental")
    assert latest is not None
    recorded, now = json.loads(latest["table_versions"]), m.table_versions(lake)
    ahead = sorted(n for n in now if now[n] != recorded.get(n))
    if ahead:
        raise IncrementalRefused(f"{', '.join(ahead)} changed after the last recorded cdr.mobility run (one that "
                                 "did not finish, or another writer): run cdr.mobility without --incremental")
    days = changed_days(lake, last, bronze_v, start, end)
    log.info("cdr.mobility --incremental: %d changed day(s) since bronze version %s: %s", len(days),
             last["bronze_version"], ", ".join(d.isoformat() for d in days) or "none")
    if not days:  # the period did not grow (a longer one brings its new days): nothing to recompute
        m.record_run(lake, cdr, start, end, bronze_v, cells_v, "incremental", [], 0)
        return
    before = {n: lake.version(n) for n in ("silver.cdr_daily_locations", "silver.cdr_home_locations",
                                           "silver.cdr_subscriber_activity")}
    scope = {"spatial_unit": unit}

    # 1. the changed days' subscriber days
    with stage("cdr.subscriber_days -> silver (changed days)") as st:
        events = lake.read("bronze.cdr_events", version=bronze_v).filter(_in("event_date", days))
        rows = m.subscriber_days(events, lake.read("silver.cdr_cells", version=cells_v), cdr)
        st.rows_out = lake.write(rows, "silver.cdr_subscriber_days", where={"date": days, **scope}).rows_written

    # 2. the activity filters over the whole period; who flipped. When the run only adds the days after the last
    # run's period, the stored per-subscriber totals are carried and only the new days read.
    new_days = _dates_between(last["period_end"] + timedelta(days=1), end) if end > last["period_end"] else []
    appended = (days, before["silver.cdr_subscriber_activity"]) if days == new_days else None
    m.write_activity(lake, cdr, start, end, appended)
    old = lake.read("silver.cdr_subscriber_activity", version=before["silver.cdr_subscriber_activity"]).filter(
        F.col("spatial_unit") == unit).select("subscriber_id", F.col("excluded").isNull().alias("_was"))
    new = lake.read("silver.cdr_subscriber_activity").filter(F.col("spatial_unit") == unit).select(
        "subscriber_id", F.col("excluded").isNull().alias("_is"))
    flips = (old.join(new, "subscriber_id", "full_outer")
             .select("subscriber_id", F.coalesce("_was", F.lit(False)).alias("was_kept"),
                     F.coalesce("_is", F.lit(False)).alias("is_kept"))
             .filter(F.col("was_kept") != F.col("is_kept"))).persist(StorageLevel.MEMORY_AND_DISK)
    removed = flips.filter("was_kept").select("subscriber_id")
    added = flips.filter("is_kept").select("subscriber_id")
    n_flipped = flips.count()
    log.info("cdr.mobility --incremental: %d subscriber(s) flipped by the activity filters", n_flipped)

    kept = m.kept_stats(lake, cdr, start, end)
    other_days = ~_in("date", days)

    # 3. daily locations and 4. home locations: independent of each other (homes come from the night-time rows of
    # the subscriber days), so written side by side.
    def write_daily() -> int:
        fresh = m.daily_from_stats(kept.filter(_in("date", days)), cdr.daily_location_rule, unit, "day")
        n = lake.write(fresh, "silver.cdr_daily_locations", where={"date": days, **scope}).rows_written
        if n_flipped:
            not_days = f"t.spatial_unit = '{unit}' AND NOT ({_sql_in('date', days)})"
            _merge_delete(lake, "silver.cdr_daily_locations", removed, not_days)
            gained = m.daily_from_stats(kept.filter(other_days).join(added, "subscriber_id", "left_semi"),
                                        cdr.daily_location_rule, unit, "day")
            lake.write(gained, "silver.cdr_daily_locations", mode="append")
        return n

    windows = m.home_windows(cdr, start, end)
    old_windows = m.home_windows(cdr, start, last["period_end"])
    dirty = [w for w in windows if w not in old_windows or any(w[1] <= d <= w[2] for d in days)]
    clean = [w for w in windows if w not in dirty]

    def write_homes() -> int:
        n = 0
        night = m.daily_from_stats(kept, cdr.daily_location_rule, unit, "night")
        if dirty:
            homes = m.home_locations(night, dirty, cdr.home_min_days)
            n = lake.write(homes, "silver.cdr_home_locations",
                           where={"window": [w[0] for w in dirty], **scope}).rows_written
        if n_flipped and clean:
            names = ", ".join(repr(w[0]) for w in clean)
            _merge_delete(lake, "silver.cdr_home_locations", removed,
                          f"t.spatial_unit = '{unit}' AND t.window IN ({names})")
            gained_homes = m.home_locations(night.join(added, "subscriber_id", "left_semi"), clean,
                                            cdr.home_min_days)
            lake.write(gained_homes, "silver.cdr_home_locations", mode="append")
        return n

    log.info("cdr.mobility --incremental: home windows recomputed: %s", ", ".join(w[0] for w in dirty) or "none")
    side_by_side([Write("cdr.daily_locations -> silver (changed days)", write_daily),
                  Write("cdr.home_locations -> silver (changed windows)", write_homes)], 2)

    # Subscribers whose contributions outside the recomputed partitions changed: the flipped ones and, when the
    # baseline window was recomputed, those whose baseline home changed (in a clean window only flipped
    # subscribers' rows change).
    old_homes = m.read_slice(lake, "silver.cdr_home_locations", cdr, windows[0][1], windows[-1][1],
                             version=before["silver.cdr_home_locations"])
    new_homes = m.read_slice(lake, "silver.cdr_home_locations", cdr, windows[0][1], windows[-1][1])
    affected = flips.select("subscriber_id")
    if any(w[0] == "baseline" for w in dirty):
        def baseline(h: DataFrame) -> DataFrame:
            return h.filter(F.col("window") == "baseline").select("subscriber_id", "home_unit")

        old_b = baseline(old_homes).withColumnRenamed("home_unit", "_old")
        new_b = baseline(new_homes).withColumnRenamed("home_unit", "_new")
        base_changed = (old_b.join(new_b, "subscriber_id", "full_outer")
                        .filter(~F.col("_old").eqNullSafe(F.col("_new"))).select("subscriber_id"))
        affected = affected.union(base_changed).distinct()
    affected = affected.persist(StorageLevel.MEMORY_AND_DISK)
    n_affected = affected.count()

    # 5. gold
    old_daily = m.read_slice(lake, "silver.cdr_daily_locations", cdr, start, end,
                             version=before["silver.cdr_daily_locations"])
    # Not cached: each recomputed partition reads only its days (partition pruning), and the merge below reads
    # the affected subscribers' rows.
    daily = m.read_slice(lake, "silver.cdr_daily_locations", cdr, start, end)
    try:
        if cdr.scaling.enabled():
            log.info("cdr.mobility --incremental: population scaling is on; gold recomputed from silver in full")
            side_by_side(m.gold_writes(lake, cdr, daily, new_homes, start, end, windows, None),
                         cfg.spark.concurrent_jobs)
        else:
            gold_incremental(lake, cfg, days, start, end, windows, dirty, daily, old_daily, new_homes, old_homes,
                             affected if n_affected else None)
    finally:
        affected.unpersist()
        flips.unpersist()
    m.record_run(lake, cdr, start, end, bronze_v, cells_v, "incremental", days, n_flipped)


def gold_incremental(lake: Lakehouse, cfg: Config, days: list[date], start: date, end: date,
                     windows: list[tuple[str, date, date]], dirty: list[tuple[str, date, date]],
                     daily: DataFrame, old_daily: DataFrame,
                     homes: DataFrame, old_homes: DataFrame, affected: DataFrame | None) -> None:
    od_days = sorted({d for c in days for d in (c - timedelta(days=1), c) if start <= d <= end})
    weeks = sorted({d - timedelta(days=d.weekday()) for d in od_days})
    # the days of those weeks and the day after each (a week's last transition ends on the next week's first day)
    week_days = sorted({w + timedelta(days=i) for w in weeks for i in range(8)})
    next_days = sorted(set(od_days) | {d + timedelta(days=1) for d in od_days})
    cdr = cfg.cdr
    unit = cdr.spatial_unit
    scope = {"spatial_unit": unit}
    none: dict[str, float] = {}
    base = homes.filter(F.col("window") == "baseline")
    old_base = old_homes.filter(F.col("window") == "baseline")

    fresh: list[tuple[str, DataFrame, dict[str, Any]]] = [
        ("gold.cdr_presence_daily", m.with_estimate(m.presence(daily.filter(_in("date", days))), none, "unit",
                                                    "n_subscribers"), {"date": days, **scope}),
        ("gold.cdr_od_daily", m.with_estimate(m.od_daily(daily.filter(_in("date", next_days))), none, "origin",
                                              "n_subscribers").filter(_in("date", od_days)),
         {"date": od_days, **scope}),
        ("gold.cdr_od_weekly", m.with_estimate(
            m.od_weekly(daily.filter(_in("date", week_days)), start, end), none, "origin", "n_subscribers")
         .filter(_in("week_start", weeks)),
         {"week_start": weeks, **scope}),
        ("gold.cdr_od_home_current", m.with_estimate(m.od_home_current(daily.filter(_in("date", days)), base),
                                                     none, "origin", "n_subscribers"), {"date": days, **scope}),
    ]
    def replace(name: str, df: DataFrame, where: dict[str, Any]) -> Callable[[], int]:
        return lambda: lake.write(df, name, where=where).rows_written

    def replace_period(name: str, df: DataFrame, period: tuple[date, date], where: dict[str, Any]) -> Callable[[], int]:
        return lambda: lake.write(df, name, period=period, scope=where).rows_written

    writes = [Write(f"cdr.{name.split('.', 1)[1]} -> gold (changed days)", replace(name, df, where))
              for name, df, where in fresh]
    if len(windows) > 1:
        assert cdr.event_date is not None
        d_scope = {**scope, "event_date": cdr.event_date}
        post_dirty = [w for w in dirty if w[0] != "baseline"]
        # Without affected subscribers no baseline home changed and nobody flipped: a post-event window's rows
        # depend on the baseline and that window's homes only, so only the recomputed post-event windows are
        # replaced (none: the tables stay as they are). Otherwise every window is.
        names = ["baseline", *[w[0] for w in post_dirty]]
        source = homes if affected is not None else homes.filter(F.col("window").isin(names))
        od, share = m.displacement(source, cdr.event_date)
        for name, df in (("gold.cdr_displacement", m.with_estimate(od, none, "origin", "n_subscribers")),
                         ("gold.cdr_displacement_share", m.with_estimate(share, none, "origin", "n_away"))):
            if affected is not None:
                work = replace_period(name, df, (windows[1][1], windows[-1][1]), d_scope)
            elif post_dirty:
                work = replace(name, df, {"window_start": [w[1] for w in post_dirty], **d_scope})
            else:
                continue
            writes.append(Write(f"cdr.{name.split('.', 1)[1]} -> gold", work))
    # Partition-sized writes: their time is mostly Delta's commit protocol on the driver, so all of them at once
    # (spark.concurrent_jobs: 6 by default, one per gold table).
    side_by_side(writes, cfg.spark.concurrent_jobs)
    if affected is None:
        return

    # Affected subscribers' contributions outside the recomputed partitions: after minus before.
    with stage("cdr.gold -> merge affected subscribers") as st:
        new_d = daily.join(affected, "subscriber_id", "left_semi")
        old_d = old_daily.join(affected, "subscriber_id", "left_semi")
        new_b = base.join(affected, "subscriber_id", "left_semi")
        old_b = old_base.join(affected, "subscriber_id", "left_semi")
        keys_daily = ["date", "spatial_unit"]
        merges = [
            ("gold.cdr_presence_daily", m.presence(new_d), m.presence(old_d), [*keys_daily, "unit"],
             ["n_subscribers"], ~_in("date", days), None),
            ("gold.cdr_od_daily", m.od_daily(new_d), m.od_daily(old_d), [*keys_daily, "origin", "destination"],
             ["n_subscribers"], ~_in("date", od_days), None),
            ("gold.cdr_od_weekly", m.od_weekly(new_d, start, end), m.od_weekly(old_d, start, end),
             ["week_start", "spatial_unit", "origin", "destination"], ["n_subscribers", "n_transitions"],
             ~_in("week_start", weeks), "days_covered"),
            ("gold.cdr_od_home_current", m.od_home_current(new_d, new_b), m.od_home_current(old_d, old_b),
             [*keys_daily, "origin", "destination"], ["n_subscribers"], ~_in("date", days), None),
        ]
        n_rows = 0
        for name, after, before, keys, counts, outside, carried in merges:
            delta = _delta_counts(after.filter(outside), before.filter(outside), keys, counts)
            extra: dict[str, Column] = {}
            if carried:  # a week's days_covered depends on the week and the period only
                covered = F.least(F.date_add(F.col("s.week_start"), 6), F.lit(end))
                first = F.greatest(F.col("s.week_start"), F.lit(start))
                extra[carried] = (F.datediff(covered, first) + 1).cast("int")
            delta = delta.persist(StorageLevel.MEMORY_AND_DISK)
            try:
                n = delta.count()
                if n:
                    _merge_counts(lake, name, delta, keys, counts, extra)
                n_rows += n
            finally:
                delta.unpersist()
        st.rows_out = n_rows
