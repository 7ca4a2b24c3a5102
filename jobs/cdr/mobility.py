"""CDR mobility: bronze events -> daily and home locations (silver) -> flows, presence, displacement (gold).

Reads ``bronze.cdr_events`` and ``silver.cdr_cells``; writes, for the configured
period and spatial unit (re-running replaces exactly that slice):

- ``silver.cdr_daily_locations``: one unit per active subscriber per day;
- ``silver.cdr_home_locations``: modal night-time location over the baseline
  window and over each week after ``cdr.event_date``;
- ``gold.cdr_presence_daily``, ``gold.cdr_od_daily`` (day d -> d+1),
  ``gold.cdr_od_weekly``, ``gold.cdr_od_home_current`` (baseline home -> daily
  location), and with an event date ``gold.cdr_displacement`` and
  ``gold.cdr_displacement_share``.

Metrics build on each other as in FlowKit: daily locations from events, homes
from night-time daily locations, flows and displacement from those. Every gold
row carries ``n_subscribers`` (distinct subscribers); ``est_population`` is an
optional scaled estimate (``cdr.scaling``), null when scaling is off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs.cdr.cells import join_valid_cells, require_period
from lib import geo
from lib.config import CdrSettings, Config, ConfigError, ScalingSettings, SpatialUnit
from lib.runtime import Write, log, side_by_side, stage
from lib.spark import from_pandas, to_pandas
from lib.tables import Lakehouse, spec

DESCRIPTION = "bronze.cdr_events -> daily/home locations -> presence, OD flows, displacement (gold)"


def cells_with_unit(cells: DataFrame, spatial_unit: str) -> DataFrame:
    """The cells table (at least cell_id, valid_from, valid_to) with a ``_unit`` column: the cell's admin
    area, or its H3 cell at the unit's own resolution (from the cell's coordinates: ``h3_9`` is resolution 9
    whatever ``cdr.h3_resolution`` is)."""
    try:
        unit = SpatialUnit.parse(spatial_unit, "cdr.spatial_unit")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if unit.admin_level:
        if unit.admin_level not in cells.columns:
            raise ConfigError(f"cdr.spatial_unit: '{spatial_unit}': silver.cdr_cells has no such admin level")
        return cells.withColumn("_unit", F.col(unit.admin_level))
    res = unit.h3_resolution
    assert res is not None
    coords = to_pandas(cells.select("cell_id", "valid_from", "valid_to", "latitude", "longitude"))
    coords["_unit"] = geo.h3_cells(coords["latitude"].to_numpy(), coords["longitude"].to_numpy(), res) \
        if len(coords) else []
    # the cells table is small: one row per cell and validity period
    return from_pandas(cells.sparkSession, coords[["cell_id", "valid_from", "valid_to", "_unit"]],
                       "cell_id string, valid_from date, valid_to date, _unit string")


def events_with_units(events: DataFrame, cells: DataFrame, spatial_unit: str) -> DataFrame:
    """Events with the spatial unit of their cell on the event date."""
    joined = join_valid_cells(events, cells_with_unit(cells, spatial_unit), how="inner", columns={"_unit": "unit"})
    return joined.select("subscriber_id", "event_time", F.col("event_date").alias("date"), "unit")


def in_hours(hour_col: str, hours: tuple[int, int] | None):  # type: ignore[no-untyped-def]
    """Filter expression for an hour window [start, end), wrapping midnight when start > end."""
    if hours is None:
        return F.lit(True)
    h = F.hour(hour_col)
    start, end = hours
    return (h >= start) & (h < end) if start < end else (h >= start) | (h < end)


def unit_day_stats(events: DataFrame, hours: dict[str, tuple[int, int] | None]) -> DataFrame:
    """Per subscriber, day and unit, in one pass over the events: ``n_all`` (every event) and, for each
    named hour window, ``n_<name>`` (events inside it) and ``last_<name>`` (time of the last one).

    Daily locations, night-time locations and the activity filters all derive from
    these rows, so the (large) event table is read once.
    """
    aggs = [F.count("*").alias("n_all")]
    for name, window in hours.items():
        inside = in_hours("event_time", window)
        aggs += [F.count(F.when(inside, 1)).alias(f"n_{name}"),
                 F.max(F.when(inside, F.col("event_time"))).alias(f"last_{name}")]
    return events.groupBy("subscriber_id", "date", "unit").agg(*aggs)


def daily_from_stats(stats: DataFrame, rule: str, spatial_unit: str, name: str) -> DataFrame:
    """One unit per subscriber per day from :func:`unit_day_stats` rows, using hour window ``name``.

    ``last``: the unit of the day's last event (ties on time broken by unit name).
    ``most_frequent``: the unit with most events that day (ties to the later last event).
    """
    per_unit = stats.filter(F.col(f"n_{name}") > 0).select(
        "subscriber_id", "date", "unit", F.col(f"n_{name}").alias("n_unit"), F.col(f"last_{name}").alias("last_time")
    )
    totals = Window.partitionBy("subscriber_id", "date")
    if rule == "last":
        order = [F.col("last_time").desc(), F.col("unit").desc()]
    elif rule == "most_frequent":
        order = [F.col("n_unit").desc(), F.col("last_time").desc(), F.col("unit").desc()]
    else:
        raise ConfigError(f"cdr.daily_location_rule: '{rule}' is not last or most_frequent")
    ranked = per_unit.withColumn("n_events", F.sum("n_unit").over(totals)).withColumn(
        "_rank", F.row_number().over(totals.orderBy(*order))
    )
    return ranked.filter(F.col("_rank") == 1).select(
        "date", "subscriber_id", F.lit(spatial_unit).alias("spatial_unit"), "unit", F.col("n_events").cast("long")
    )


ACTIVITY_REASONS = ("too_few_events", "too_many_events_per_day_on_average", "too_many_events_on_one_day")


def activity_verdict(events: DataFrame, cdr: CdrSettings, n_days: int) -> DataFrame:
    """Per subscriber: ``n`` events, ``max_day`` (most on one day) and the ``excluded`` reason (null = kept).

    ``events``: event rows (subscriber_id, date), or :func:`unit_day_stats` rows (their ``n_all``).

    A SIM is dropped with fewer than ``min_events`` events in the period, more than
    ``max_mean_events_per_day`` per day of the period on average, or more than
    ``max_events_single_day`` on one day (the World Bank COVID-19 indicator rules).
    """
    return with_verdict(activity_totals(events), cdr, n_days)


def activity_totals(events: DataFrame) -> DataFrame:
    """Per subscriber: ``n`` events and ``max_day`` (most on one day), from event rows or subscriber days."""
    n = F.sum("n_all") if "n_all" in events.columns else F.count("*")
    per_day = events.groupBy("subscriber_id", "date").agg(n.alias("n_day"))
    return per_day.groupBy("subscriber_id").agg(F.sum("n_day").alias("n"), F.max("n_day").alias("max_day"))


def with_verdict(stats: DataFrame, cdr: CdrSettings, n_days: int) -> DataFrame:
    """The activity filters' ``excluded`` reason for per-subscriber totals (``n``, ``max_day``) over a period of
    ``n_days`` days."""
    reason = (
        F.when(F.col("n") < cdr.min_events, F.lit(ACTIVITY_REASONS[0]))
        .when(F.col("n") / F.lit(n_days) > cdr.max_mean_events_per_day, F.lit(ACTIVITY_REASONS[1]))
        .when(F.col("max_day") > cdr.max_events_single_day, F.lit(ACTIVITY_REASONS[2]))
    )
    return stats.select("subscriber_id", "n", "max_day", reason.alias("excluded"))


def activity_status(events: DataFrame, cdr: CdrSettings, n_days: int) -> DataFrame:
    """Per subscriber: ``excluded`` reason (null = kept) from the activity filters (:func:`activity_verdict`)."""
    return activity_verdict(events, cdr, n_days).select("subscriber_id", "excluded")


def home_locations(night_daily: DataFrame, windows: list[tuple[str, date, date]], min_days: int) -> DataFrame:
    """Modal night-time daily location per subscriber in each (name, start, end) window, in one pass.

    Windows must not overlap. Subscribers seen on fewer than ``min_days`` distinct
    nights of a window have no home for it. Ties between units with as many nights go
    to the unit seen most recently, then to the first unit by name.
    """
    if not windows:
        raise ValueError("home_locations: no windows")
    ordered = sorted(windows, key=lambda w: w[1])
    for (n1, _, e1), (n2, s2, _) in zip(ordered, ordered[1:], strict=False):
        if s2 <= e1:
            raise ValueError(f"home windows {n1} and {n2} overlap")
    name = F.lit(None).cast("string")
    for w, ws, we in windows:
        name = F.when(F.col("date").between(F.lit(ws), F.lit(we)), F.lit(w)).otherwise(name)
    bounds = {w: (ws, we) for w, ws, we in windows}
    tagged = night_daily.withColumn("window", name).filter(F.col("window").isNotNull())
    per_unit = tagged.groupBy("window", "subscriber_id", "spatial_unit", "unit").agg(
        F.countDistinct("date").alias("n_days_home"), F.max("date").alias("last_seen")
    )
    by_sub = Window.partitionBy("window", "subscriber_id", "spatial_unit")
    ranked = per_unit.withColumn("n_days_seen", F.sum("n_days_home").over(by_sub)).withColumn(
        "_rank",
        F.row_number().over(by_sub.orderBy(F.col("n_days_home").desc(), F.col("last_seen").desc(), F.col("unit"))),
    )
    starts = F.create_map(*[x for w, (ws, _) in bounds.items() for x in (F.lit(w), F.lit(ws))])
    ends = F.create_map(*[x for w, (_, we) in bounds.items() for x in (F.lit(w), F.lit(we))])
    return ranked.filter((F.col("_rank") == 1) & (F.col("n_days_seen") >= min_days)).select(
        "window",
        starts[F.col("window")].alias("window_start"),
        ends[F.col("window")].alias("window_end"),
        "subscriber_id",
        "spatial_unit",
        F.col("unit").alias("home_unit"),
        F.col("n_days_home").cast("long"),
        F.col("n_days_seen").cast("long"),
    )


def baseline_window(start: date, end: date, event_date: date | None, baseline_days: int) -> tuple[date, date]:
    """The baseline: the days before the event (at most baseline_days), else the period's first days."""
    if event_date is not None and event_date > start:
        return max(start, event_date - timedelta(days=baseline_days)), min(end, event_date - timedelta(days=1))
    return start, min(end, start + timedelta(days=baseline_days - 1))


def post_event_windows(event_date: date, end: date, weeks: int) -> list[tuple[str, date, date]]:
    """Week k after the event: [event + 7k, event + 7k + 6], clipped to the period end."""
    out = []
    for k in range(weeks):
        ws = event_date + timedelta(days=7 * k)
        if ws > end:
            break
        out.append((f"post_event_week_{k}", ws, min(end, ws + timedelta(days=6))))
    return out


def presence(daily: DataFrame) -> DataFrame:
    """Distinct subscribers per unit per day."""
    return daily.groupBy("date", "spatial_unit", "unit").agg(
        F.countDistinct("subscriber_id").cast("long").alias("n_subscribers")
    ).select("date", "spatial_unit", "unit", "n_subscribers")


def transitions(daily: DataFrame) -> DataFrame:
    """Day-to-day moves: (date d, subscriber, origin = location on d, destination = location on d + 1)."""
    a = daily.select("date", "subscriber_id", "spatial_unit", F.col("unit").alias("origin"))
    b = daily.select(
        F.date_sub("date", 1).alias("date"), "subscriber_id", "spatial_unit", F.col("unit").alias("destination")
    )
    return a.join(b, on=["date", "subscriber_id", "spatial_unit"], how="inner")


def od_daily(daily: DataFrame) -> DataFrame:
    """Consecutive-day OD matrix per day (daily locations are unique per subscriber and day)."""
    return transitions(daily).groupBy("date", "spatial_unit", "origin", "destination").agg(
        F.countDistinct("subscriber_id").cast("long").alias("n_subscribers")
    )


def od_weekly(daily: DataFrame, start: date, end: date) -> DataFrame:
    """Consecutive-day OD matrix per ISO week (transitions assigned to the week of their first day)."""
    week = F.date_trunc("week", F.col("date")).cast("date")
    t = transitions(daily).withColumn("week_start", week)
    covered = F.least(F.date_add("week_start", 6), F.lit(end))
    first = F.greatest(F.col("week_start"), F.lit(start))
    return t.groupBy("week_start", "spatial_unit", "origin", "destination").agg(
        F.countDistinct("subscriber_id").cast("long").alias("n_subscribers"),
        F.count("*").cast("long").alias("n_transitions"),
    ).withColumn("days_covered", (F.datediff(covered, first) + 1).cast("int"))


def od_home_current(daily: DataFrame, baseline_homes: DataFrame) -> DataFrame:
    """Baseline home -> daily location, per day."""
    homes = baseline_homes.select("subscriber_id", "spatial_unit", F.col("home_unit").alias("origin"))
    return daily.join(homes, on=["subscriber_id", "spatial_unit"], how="inner").groupBy(
        "date", "spatial_unit", "origin", F.col("unit").alias("destination")
    ).agg(F.countDistinct("subscriber_id").cast("long").alias("n_subscribers"))


def displacement(homes: DataFrame, event_date: date) -> tuple[DataFrame, DataFrame]:
    """(per-OD displacement, per-origin share away) from baseline and post-event homes."""
    base = homes.filter(F.col("window") == "baseline").select(
        "subscriber_id", "spatial_unit", F.col("home_unit").alias("origin")
    )
    post = homes.filter(F.col("window").startswith("post_event_week_")).select(
        F.regexp_extract("window", r"(\d+)$", 1).cast("int").alias("week_since_event"),
        "window_start", "window_end", "subscriber_id", "spatial_unit", F.col("home_unit").alias("destination"),
    )
    both = base.join(post, on=["subscriber_id", "spatial_unit"], how="inner")
    away = F.col("origin") != F.col("destination")
    ev = F.lit(event_date).alias("event_date")
    od = both.filter(away).groupBy("week_since_event", "window_start", "window_end", "spatial_unit", "origin",
                                   "destination").agg(
        F.countDistinct("subscriber_id").cast("long").alias("n_subscribers")
    ).select(ev, "*")
    residents = base.groupBy("spatial_unit", "origin").agg(
        F.countDistinct("subscriber_id").cast("long").alias("n_baseline_residents")
    )
    share = both.groupBy("week_since_event", "window_start", "window_end", "spatial_unit", "origin").agg(
        F.countDistinct("subscriber_id").cast("long").alias("n_subscribers"),
        F.countDistinct(F.when(away, F.col("subscriber_id"))).cast("long").alias("n_away"),
    ).join(residents, on=["spatial_unit", "origin"], how="inner").withColumn(
        "share_away", F.col("n_away") / F.col("n_subscribers")
    ).select(ev, "*")
    return od, share


# ----------------------------------------------------------------------------- scaling


def scaling_weights(scaling: ScalingSettings, baseline_homes: DataFrame) -> dict[str, float]:
    """unit -> weight: given directly, or population / baseline residents of the unit."""
    if scaling.weights:
        return dict(scaling.weights)
    population = dict(scaling.population)
    if scaling.population_path:
        import pandas as pd

        try:
            table = pd.read_csv(scaling.population_path, dtype={"unit": str})
        except OSError as exc:
            raise ConfigError(f"cdr.scaling.population_path: {scaling.population_path}: {exc}") from None
        missing = {"unit", "population"} - set(table.columns)
        if missing:
            raise ConfigError(
                f"cdr.scaling.population_path: {scaling.population_path} lacks columns {sorted(missing)}"
            )
        bad = table[pd.to_numeric(table["population"], errors="coerce").isna()]
        if not bad.empty:
            raise ConfigError(
                f"cdr.scaling.population_path: {scaling.population_path} row {int(bad.index[0]) + 2}: "
                f"population '{bad.iloc[0]['population']}' is not a number"
            )
        population.update(zip(table["unit"], table["population"].astype(float), strict=True))
    residents = {
        r["home_unit"]: r["n"]
        for r in baseline_homes.groupBy("home_unit").agg(F.count("*").alias("n")).collect()
    }
    return {u: p / residents[u] for u, p in population.items() if residents.get(u)}


def with_estimate(df: DataFrame, weights: dict[str, float], unit_col: str, count_col: str) -> DataFrame:
    """Add est_population = count x weight of the unit (null for units without a weight or without scaling)."""
    if not weights:
        return df.withColumn("est_population", F.lit(None).cast("double"))
    w = F.create_map(*[x for u, v in sorted(weights.items()) for x in (F.lit(u), F.lit(float(v)))])
    return df.withColumn("est_population", F.round(F.col(count_col) * w[F.col(unit_col)], 1))


# ----------------------------------------------------------------------------- job


def hour_windows(cdr: CdrSettings) -> dict[str, tuple[int, int] | None]:
    return {"day": cdr.hours, "night": cdr.home_night_hours}


def subscriber_days(events: DataFrame, cells: DataFrame, cdr: CdrSettings) -> DataFrame:
    """silver.cdr_subscriber_days rows from bronze events (one pass over them)."""
    located = events_with_units(events, cells, cdr.spatial_unit)
    return unit_day_stats(located, hour_windows(cdr)).select(
        "date", "subscriber_id", F.lit(cdr.spatial_unit).alias("spatial_unit"), "unit",
        *[F.col(c).cast("long").alias(c) if c.startswith("n_") else F.col(c)
          for c in ("n_all", "n_day", "last_day", "n_night", "last_night")])


def activity_rows(stats: DataFrame, cdr: CdrSettings, start: date, end: date,
                  earlier: DataFrame | None = None) -> DataFrame:
    """silver.cdr_subscriber_activity rows: the activity filters over the period's subscriber days.

    ``earlier``: the table's rows for the period up to the day before the first of ``stats``' days (an
    incremental run that only adds days): their totals are carried, so only the new days are read.
    """
    if earlier is None:
        verdict = activity_verdict(stats, cdr, (end - start).days + 1)
    else:
        new = activity_totals(stats)
        old = earlier.select("subscriber_id", F.col("n_events").alias("n"), F.col("max_events_day").alias("max_day"))
        totals = old.unionByName(new).groupBy("subscriber_id").agg(F.sum("n").alias("n"),
                                                                   F.max("max_day").alias("max_day"))
        verdict = with_verdict(totals, cdr, (end - start).days + 1)
    return verdict.select(F.lit(cdr.spatial_unit).alias("spatial_unit"), F.lit(start).alias("period_start"),
                          F.lit(end).alias("period_end"), "subscriber_id", F.col("n").cast("long").alias("n_events"),
                          F.col("max_day").cast("long").alias("max_events_day"), "excluded")


def read_slice(lake: Lakehouse, name: str, cdr: CdrSettings, start: date, end: date,
               version: int | None = None) -> DataFrame:
    """One table's rows of the period and spatial unit (at a version when given)."""
    col = spec(name).period_column
    assert col is not None, name
    return lake.read(name, version=version).filter(
        F.col(col).between(F.lit(start), F.lit(end)) & (F.col("spatial_unit") == cdr.spatial_unit))


def kept_stats(lake: Lakehouse, cdr: CdrSettings, start: date, end: date) -> DataFrame:
    """The period's subscriber days of the subscribers the activity filters keep (as stored)."""
    stats = read_slice(lake, "silver.cdr_subscriber_days", cdr, start, end)
    kept = lake.read("silver.cdr_subscriber_activity").filter(
        (F.col("spatial_unit") == cdr.spatial_unit) & F.col("excluded").isNull()).select("subscriber_id")
    return stats.join(kept, on="subscriber_id", how="left_semi")


def write_activity(lake: Lakehouse, cdr: CdrSettings, start: date, end: date,
                   appended: tuple[list[date], int] | None = None) -> dict[str, int]:
    """Run the activity filters over the stored subscriber days; write and return the verdict counts.

    ``appended=(days, version)``: the period grew by ``days`` (all after the end of the period the table held
    at ``version``, which they extend without a gap): the stored totals are carried and only those days read.
    """
    with stage("cdr.activity_filter -> silver") as st:
        if appended is None:
            rows = activity_rows(read_slice(lake, "silver.cdr_subscriber_days", cdr, start, end), cdr, start, end)
        else:
            days, version = appended
            earlier = lake.read("silver.cdr_subscriber_activity", version=version).filter(
                F.col("spatial_unit") == cdr.spatial_unit)
            new_days = read_slice(lake, "silver.cdr_subscriber_days", cdr, min(days), max(days)).filter(
                F.col("date").isin(days))
            rows = activity_rows(new_days, cdr, start, end, earlier)
            st.notes["carried"] = "totals up to the day before " + min(days).isoformat()
        lake.write(rows, "silver.cdr_subscriber_activity", where={"spatial_unit": cdr.spatial_unit})
        counts = {r["excluded"] or "kept": r["n"] for r in lake.read("silver.cdr_subscriber_activity").filter(
            F.col("spatial_unit") == cdr.spatial_unit).groupBy("excluded").agg(F.count("*").alias("n")).collect()}
        st.rows_in, st.rows_out = sum(counts.values()), counts.get("kept", 0)
        st.notes.update({k: v for k, v in counts.items() if k != "kept"})
    return counts


def settings_sha256(cdr: CdrSettings, start: date) -> str:
    """What the stored mobility rows depend on besides the events and cells: a later incremental run must
    find the same (a change of rule means a full run)."""
    dumped = cdr.model_dump(mode="json")
    relevant = {k: dumped[k] for k in (
        "spatial_unit", "daily_location_rule", "hours", "min_events", "max_mean_events_per_day",
        "max_events_single_day", "home_night_hours", "home_min_days", "baseline_days", "event_date",
        "post_event_weeks", "scaling")}
    relevant["period_start"] = start.isoformat()
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


MOBILITY_TABLES = ("silver.cdr_subscriber_days", "silver.cdr_subscriber_activity", "silver.cdr_daily_locations",
                   "silver.cdr_home_locations", "gold.cdr_presence_daily", "gold.cdr_od_daily", "gold.cdr_od_weekly",
                   "gold.cdr_od_home_current", "gold.cdr_displacement", "gold.cdr_displacement_share")


def table_versions(lake: Lakehouse) -> dict[str, int]:
    """The current version of every table cdr.mobility writes (-1: not there yet)."""
    return {n: lake.version(n) if lake.exists(n) else -1 for n in MOBILITY_TABLES}


def record_run(lake: Lakehouse, cdr: CdrSettings, start: date, end: date, bronze_version: int, cells_version: int,
               mode: str, dates: list[date] | None = None, flipped: int = 0) -> None:
    """Append the run to silver.cdr_mobility_runs, last: a run that dies before this leaves its tables ahead of
    the recorded versions, which the next incremental run notices."""
    row = [(cdr.spatial_unit, start, end, settings_sha256(cdr, start), bronze_version, cells_version, mode,
            ",".join(d.isoformat() for d in dates) if dates is not None else f"{start}..{end}", flipped,
            json.dumps(table_versions(lake), sort_keys=True), datetime.now(UTC).replace(tzinfo=None))]
    lake.write(lake.spark.createDataFrame(row, spec("silver.cdr_mobility_runs").schema), "silver.cdr_mobility_runs",
               mode="append")


def home_windows(cdr: CdrSettings, start: date, end: date) -> list[tuple[str, date, date]]:
    b_start, b_end = baseline_window(start, end, cdr.event_date, cdr.baseline_days)
    windows = [("baseline", b_start, b_end)]
    if cdr.event_date is not None and start < cdr.event_date <= end:
        windows += post_event_windows(cdr.event_date, end, cdr.post_event_weeks)
    return windows


def write_silver(lake: Lakehouse, cdr: CdrSettings, kept: DataFrame, start: date, end: date,
                 windows: list[tuple[str, date, date]]) -> int:
    """silver.cdr_daily_locations and silver.cdr_home_locations, side by side (independent: both read the kept
    subscriber days, so one table's commit and small final tasks overlap the other's scan); returns the daily
    locations written."""
    scope = {"spatial_unit": cdr.spatial_unit}
    daily = daily_from_stats(kept, cdr.daily_location_rule, cdr.spatial_unit, "day")
    night = daily_from_stats(kept, cdr.daily_location_rule, cdr.spatial_unit, "night")
    homes = home_locations(night, windows, cdr.home_min_days)
    log.info("cdr.home_locations: windows %s", ", ".join(f"{w}={ws}..{we}" for w, ws, we in windows))
    written = side_by_side([
        Write("cdr.daily_locations -> silver",
              lambda: lake.write(daily, "silver.cdr_daily_locations", period=(start, end), scope=scope).rows_written),
        Write("cdr.home_locations -> silver",
              lambda: lake.write(homes, "silver.cdr_home_locations", period=(windows[0][1], windows[-1][1]),
                                 scope=scope).rows_written),
    ], 2)
    return int(written["cdr.daily_locations -> silver"] or 0)


def gold_writes(lake: Lakehouse, cdr: CdrSettings, daily: DataFrame, homes: DataFrame, start: date, end: date,
                windows: list[tuple[str, date, date]], n_daily: int | None) -> list[Write]:
    """The six gold tables from the stored daily and home locations, as independent writes."""
    scope: dict[str, Any] = {"spatial_unit": cdr.spatial_unit}
    baseline_homes = homes.filter(F.col("window") == "baseline")
    weights = scaling_weights(cdr.scaling, baseline_homes) if cdr.scaling.enabled() else {}
    if cdr.scaling.enabled() and not weights:
        raise ConfigError("cdr.scaling: no scaling weight matches a unit with baseline residents")
    gold: list[tuple[str, DataFrame, tuple[date, date], dict[str, Any], int | None]] = [
        # (table, rows, period, scope, rows in: the daily locations it derives from)
        ("gold.cdr_presence_daily", with_estimate(presence(daily), weights, "unit", "n_subscribers"), (start, end),
         scope, n_daily),
        ("gold.cdr_od_daily", with_estimate(od_daily(daily), weights, "origin", "n_subscribers"), (start, end), scope,
         n_daily),
        ("gold.cdr_od_weekly", with_estimate(od_weekly(daily, start, end), weights, "origin", "n_subscribers"),
         (start - timedelta(days=start.weekday()), end), scope, n_daily),
        ("gold.cdr_od_home_current",
         with_estimate(od_home_current(daily, baseline_homes), weights, "origin", "n_subscribers"), (start, end),
         scope, n_daily),
    ]
    if len(windows) > 1:
        assert cdr.event_date is not None
        od, share = displacement(homes, cdr.event_date)
        d_scope = {**scope, "event_date": cdr.event_date}
        d_period = (windows[1][1], windows[-1][1])
        gold += [
            ("gold.cdr_displacement", with_estimate(od, weights, "origin", "n_subscribers"), d_period, d_scope, None),
            ("gold.cdr_displacement_share", with_estimate(share, weights, "origin", "n_away"), d_period, d_scope,
             None),
        ]
    else:
        log.info("cdr.mobility: no cdr.event_date inside the period; displacement tables not written")

    def writer(name: str, df: DataFrame, period: tuple[date, date], where: dict) -> Callable[[], int]:
        return lambda: lake.write(df, name, period=period, scope=where).rows_written

    return [Write(f"cdr.{name.split('.', 1)[1]} -> gold", writer(name, df, period, where), rows_in)
            for name, df, period, where, rows_in in gold]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--incremental", action="store_true",
                        help="recompute only what the bronze days changed since the last run (same period start, "
                             "same settings) changes; the result equals a full run")


def run(spark: SparkSession, cfg: Config, args: argparse.Namespace | None = None) -> None:
    start, end = require_period(cfg, "cdr.mobility")
    cdr = cfg.cdr
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    if args is not None and args.incremental:
        from jobs.cdr import incremental

        incremental.run(lake, cfg, start, end)
        return
    bronze_v, cells_v = lake.version("bronze.cdr_events"), lake.version("silver.cdr_cells")
    with stage("cdr.subscriber_days -> silver") as st:
        events = lake.read("bronze.cdr_events", version=bronze_v).filter(
            F.col("event_date").between(F.lit(start), F.lit(end)))
        rows = subscriber_days(events, lake.read("silver.cdr_cells", version=cells_v), cdr)
        st.rows_out = lake.write(rows, "silver.cdr_subscriber_days", period=(start, end),
                                 scope={"spatial_unit": cdr.spatial_unit}).rows_written
    write_activity(lake, cdr, start, end)
    kept = kept_stats(lake, cdr, start, end)
    windows = home_windows(cdr, start, end)
    n_daily = write_silver(lake, cdr, kept, start, end, windows)
    # The gold tables read the stored silver rows (what a later re-run of gold alone would read), once.
    daily = read_slice(lake, "silver.cdr_daily_locations", cdr, start, end).persist(StorageLevel.MEMORY_AND_DISK)
    homes = read_slice(lake, "silver.cdr_home_locations", cdr, windows[0][1], windows[-1][1])
    try:  # small, independent tables: their Spark jobs and Delta commits run side by side
        side_by_side(gold_writes(lake, cdr, daily, homes, start, end, windows, n_daily), cfg.spark.concurrent_jobs)
    finally:
        daily.unpersist()
    record_run(lake, cdr, start, end, bronze_v, cells_v, "full")
