"""CDR mobility: bronze events -> daily locations (silver) -> presence (gold).

Reads ``bronze.cdr_events`` and ``silver.cdr_cells``; writes
``silver.cdr_daily_locations`` and ``gold.cdr_presence_daily`` for the
configured period and spatial unit (re-running replaces exactly that slice).

Metrics build on each other as in FlowKit: a daily location per subscriber
from events, presence from daily locations.
"""

from __future__ import annotations

from datetime import date, timedelta

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs.cdr.ingest import require_period
from lib.config import Config, ConfigError
from lib.runtime import stage
from lib.tables import Lakehouse

DESCRIPTION = "bronze.cdr_events -> silver daily locations -> gold presence"


def unit_column(spatial_unit: str) -> str:
    """The silver.cdr_cells column holding a spatial unit ('admin1', 'admin2', 'h3')."""
    if spatial_unit in {"admin1", "admin2"}:
        return spatial_unit
    if spatial_unit.startswith("h3_"):
        return "h3_index"
    raise ConfigError(f"cdr.spatial_unit: '{spatial_unit}' is not admin1, admin2 or h3_<resolution>")


def events_with_units(events: DataFrame, cells: DataFrame, spatial_unit: str) -> DataFrame:
    """Events with the spatial unit of their cell on the event date."""
    col = unit_column(spatial_unit)
    c = cells.select(
        F.col("cell_id").alias("_cell"), F.col("valid_from").alias("_from"), F.col("valid_to").alias("_to"),
        F.col(col).alias("unit"),
    )
    cond = (F.col("cell_id") == F.col("_cell")) & (F.col("_from").isNull() | (F.col("event_date") >= F.col("_from"))) \
        & (F.col("_to").isNull() | (F.col("event_date") <= F.col("_to")))
    return events.join(F.broadcast(c), on=cond, how="inner").select(
        "subscriber_id", "event_time", F.col("event_date").alias("date"), "unit"
    )


def in_hours(hour_col: str, hours: tuple[int, int] | None):  # type: ignore[no-untyped-def]
    """Filter expression for an hour window [start, end), wrapping midnight when start > end."""
    if hours is None:
        return F.lit(True)
    h = F.hour(hour_col)
    start, end = hours
    return (h >= start) & (h < end) if start < end else (h >= start) | (h < end)


def daily_locations(
    events: DataFrame, rule: str, spatial_unit: str, hours: tuple[int, int] | None = None
) -> DataFrame:
    """One unit per subscriber per day.

    ``last``: the unit of the day's last event (ties on time broken by unit name).
    ``most_frequent``: the unit with most events that day (ties to the later last event).
    ``events`` must carry subscriber_id, event_time, date and unit (see events_with_units).
    """
    ev = events.filter(in_hours("event_time", hours))
    per_unit = ev.groupBy("subscriber_id", "date", "unit").agg(
        F.count("*").alias("n_unit"), F.max("event_time").alias("last_time")
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


def active_subscribers(events: DataFrame, min_days: int, min_per_day: float, max_per_day: float) -> DataFrame:
    """Subscribers whose activity is plausible for a person (not a machine or a near-silent SIM)."""
    stats = events.groupBy("subscriber_id").agg(
        F.countDistinct("date").alias("days"), F.count("*").alias("n")
    ).withColumn("per_day", F.col("n") / F.col("days"))
    return stats.filter(
        (F.col("days") >= min_days) & (F.col("per_day") >= min_per_day) & (F.col("per_day") <= max_per_day)
    ).select("subscriber_id")


def home_locations(
    night_daily: DataFrame, window: str, start: date, end: date, min_days: int
) -> DataFrame:
    """Modal night-time daily location over [start, end] per subscriber.

    Subscribers seen on fewer than ``min_days`` distinct nights have no home. Ties
    between units with as many nights go to the unit seen most recently.
    """
    in_window = night_daily.filter(F.col("date").between(F.lit(start), F.lit(end)))
    per_unit = in_window.groupBy("subscriber_id", "spatial_unit", "unit").agg(
        F.countDistinct("date").alias("n_days_home"), F.max("date").alias("last_seen")
    )
    by_sub = Window.partitionBy("subscriber_id", "spatial_unit")
    ranked = per_unit.withColumn("n_days_seen", F.sum("n_days_home").over(by_sub)).withColumn(
        "_rank",
        F.row_number().over(by_sub.orderBy(F.col("n_days_home").desc(), F.col("last_seen").desc(), F.col("unit"))),
    )
    return ranked.filter((F.col("_rank") == 1) & (F.col("n_days_seen") >= min_days)).select(
        F.lit(window).alias("window"),
        F.lit(start).alias("window_start"),
        F.lit(end).alias("window_end"),
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


def presence(daily: DataFrame) -> DataFrame:
    """Distinct subscribers per unit per day."""
    return daily.groupBy("date", "spatial_unit", "unit").agg(
        F.countDistinct("subscriber_id").cast("long").alias("n_subscribers")
    ).select("date", "spatial_unit", "unit", "n_subscribers")


def run(spark: SparkSession, cfg: Config) -> None:
    start, end = require_period(cfg, "cdr.mobility")
    cdr = cfg.cdr
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    events = lake.read("bronze.cdr_events").filter(F.col("event_date").between(F.lit(start), F.lit(end)))
    cells = lake.read("silver.cdr_cells")
    located = events_with_units(events, cells, cdr.spatial_unit)
    active = active_subscribers(located, cdr.min_active_days, cdr.min_events_per_day, cdr.max_events_per_day)
    located = located.join(active, on="subscriber_id", how="left_semi")
    scope = {"spatial_unit": cdr.spatial_unit}

    with stage("cdr.daily_locations -> silver") as st:
        daily = daily_locations(located, cdr.daily_location_rule, cdr.spatial_unit, cdr.hours)
        res = lake.write(daily, "silver.cdr_daily_locations", period=(start, end), scope=scope)
        st.rows_out = res.rows_written
    daily = lake.read("silver.cdr_daily_locations").filter(
        F.col("date").between(F.lit(start), F.lit(end)) & (F.col("spatial_unit") == cdr.spatial_unit)
    )
    with stage("cdr.home_locations -> silver") as st:
        night = daily_locations(located, cdr.daily_location_rule, cdr.spatial_unit, cdr.home_night_hours)
        b_start, b_end = baseline_window(start, end, cdr.event_date, cdr.baseline_days)
        homes = home_locations(night, "baseline", b_start, b_end, cdr.home_min_days)
        st.rows_out = lake.write(
            homes, "silver.cdr_home_locations", period=(b_start, b_start),
            scope={"spatial_unit": cdr.spatial_unit, "window": "baseline"},
        ).rows_written
        st.notes["window"] = f"{b_start}..{b_end}"
    with stage("cdr.presence -> gold") as st:
        st.rows_in = res.rows_written
        out = lake.write(presence(daily), "gold.cdr_presence_daily", period=(start, end), scope=scope)
        st.rows_out = out.rows_written
