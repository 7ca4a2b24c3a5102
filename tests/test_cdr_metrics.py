"""CDR metric functions on small hand-made inputs with values worked out by hand."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from pyspark.sql import SparkSession

from jobs.cdr import mobility
from lib.config import CdrSettings, ConfigError, ScalingSettings

D0 = date(2024, 3, 4)  # a Monday


def _daily(spark: SparkSession, rows: list[tuple[int, str, str]]):  # type: ignore[no-untyped-def]
    return spark.createDataFrame(
        [(D0 + timedelta(days=d), s, "admin2", u, 1) for d, s, u in rows],
        "date date, subscriber_id string, spatial_unit string, unit string, n_events long",
    )


def test_activity_filters_use_the_world_bank_defaults(spark: SparkSession) -> None:
    cdr = CdrSettings()
    assert (cdr.min_events, cdr.max_mean_events_per_day, cdr.max_events_single_day) == (3, 100.0, 200)
    rows = []
    rows += [("few", 0)] * 2  # 2 events in the period: too few
    rows += [("ok", 0)] * 3  # exactly 3: kept
    rows += [("busy", d) for d in range(10) for _ in range(101)]  # 101 a day for 10 days: mean > 100
    rows += [("spike", 0)] * 201 + [("spike", 1)] * 3  # 201 on one day, mean 20.4
    rows += [("edge", 0)] * 200  # 200 on one day, mean 20: kept
    ev = spark.createDataFrame(
        [(s, datetime(2024, 3, 4 + d, 12), D0 + timedelta(days=d), "U") for s, d in rows],
        "subscriber_id string, event_time timestamp, date date, unit string",
    )
    got = {r["subscriber_id"]: r["excluded"] for r in mobility.activity_status(ev, cdr, n_days=10).collect()}
    assert got == {
        "few": "too_few_events",
        "ok": None,
        "busy": "too_many_events_per_day_on_average",
        "spike": "too_many_events_on_one_day",
        "edge": None,
    }


def test_od_daily_and_weekly_by_hand(spark: SparkSession) -> None:
    # a: A A B (Mon..Wed); b: A B (Sun, next Mon: crosses the week boundary); c: B on Mon only.
    daily = _daily(spark, [(0, "a", "A"), (1, "a", "A"), (2, "a", "B"), (6, "b", "A"), (7, "b", "B"), (0, "c", "B")])
    od = {(r["date"], r["origin"], r["destination"]): r["n_subscribers"] for r in mobility.od_daily(daily).collect()}
    assert od == {(D0, "A", "A"): 1, (D0 + timedelta(days=1), "A", "B"): 1, (D0 + timedelta(days=6), "A", "B"): 1}
    weekly = {
        (r["week_start"], r["origin"], r["destination"]): (r["n_subscribers"], r["n_transitions"], r["days_covered"])
        for r in mobility.od_weekly(daily, D0 + timedelta(days=2), D0 + timedelta(days=9)).collect()
    }
    # The transition Sun -> Mon belongs to the week of its first day; the first week is covered from Wed.
    assert weekly == {(D0, "A", "A"): (1, 1, 5), (D0, "A", "B"): (2, 2, 5)}


def test_home_windows_ties_and_minimum_days(spark: SparkSession) -> None:
    night = _daily(spark, [(0, "a", "A"), (1, "a", "B"), (2, "a", "A"), (3, "a", "B"),  # tie: B seen last
                           (0, "b", "A"), (1, "b", "A"),  # 2 nights: below min_days 3
                           (7, "a", "C"), (8, "a", "C"), (9, "a", "C")])
    windows = [("baseline", D0, D0 + timedelta(days=6)), ("post_event_week_0", D0 + timedelta(days=7), D0 + timedelta(days=13))]
    homes = {(r["window"], r["subscriber_id"]): (r["home_unit"], r["n_days_home"], r["n_days_seen"])
             for r in mobility.home_locations(night, windows, 3).collect()}
    assert homes == {("baseline", "a"): ("B", 2, 4), ("post_event_week_0", "a"): ("C", 3, 3)}
    with pytest.raises(ValueError, match="overlap"):
        mobility.home_locations(night, [("x", D0, D0 + timedelta(days=3)), ("y", D0 + timedelta(days=3), D0 + timedelta(days=5))], 1)


def test_displacement_and_share_by_hand(spark: SparkSession) -> None:
    ev = D0 + timedelta(days=7)
    rows = [("baseline", D0, "s1", "A"), ("baseline", D0, "s2", "A"), ("baseline", D0, "s3", "A"),
            ("baseline", D0, "s4", "B"), ("post_event_week_0", ev, "s1", "B"), ("post_event_week_0", ev, "s2", "A"),
            ("post_event_week_0", ev, "s4", "B"), ("post_event_week_0", ev, "s5", "C")]
    homes = spark.createDataFrame(
        [(w, ws, ws + timedelta(days=6), s, "admin2", u, 3, 3) for w, ws, s, u in rows],
        "window string, window_start date, window_end date, subscriber_id string, spatial_unit string, "
        "home_unit string, n_days_home long, n_days_seen long",
    )
    od, share = mobility.displacement(homes, ev)
    assert [(r["origin"], r["destination"], r["n_subscribers"], r["week_since_event"]) for r in od.collect()] == [
        ("A", "B", 1, 0)
    ]
    got = {r["origin"]: (r["n_baseline_residents"], r["n_subscribers"], r["n_away"], r["share_away"])
           for r in share.collect()}
    # s3 has no post-event home (not observed), s5 no baseline home: neither counts.
    assert got == {"A": (3, 2, 1, 0.5), "B": (1, 1, 0, 0.0)}


def test_scaling_weights_from_population_and_estimates(spark: SparkSession, tmp_path) -> None:  # type: ignore[no-untyped-def]
    homes = spark.createDataFrame([("A",), ("A",), ("A",), ("A",), ("B",)], "home_unit string")
    assert mobility.scaling_weights(ScalingSettings(population={"A": 1000, "B": 50, "Z": 9}), homes) == {
        "A": 250.0, "B": 50.0}
    assert mobility.scaling_weights(ScalingSettings(weights={"A": 2.5}), homes) == {"A": 2.5}
    csv = tmp_path / "pop.csv"
    csv.write_text("unit,population\nA,400\nB,not-a-number\n")
    with pytest.raises(ConfigError, match=r"pop.csv row 3: population 'not-a-number' is not a number"):
        mobility.scaling_weights(ScalingSettings(population_path=str(csv)), homes)
    csv.write_text("unit,population\nA,400\n")
    assert mobility.scaling_weights(ScalingSettings(population_path=str(csv)), homes) == {"A": 100.0}
    df = spark.createDataFrame([("A", 3), ("B", 2)], "unit string, n_subscribers long")
    est = {r["unit"]: r["est_population"] for r in mobility.with_estimate(df, {"A": 100.0}, "unit", "n_subscribers").collect()}
    assert est == {"A": 300.0, "B": None}


def test_h3_units_aggregate_at_their_own_resolution(spark: SparkSession) -> None:
    import h3

    from lib.config import SpatialUnit

    a9 = h3.latlng_to_cell(-8.05, -34.9, 9)
    (la, lo) = h3.cell_to_latlng(a9)
    parent = h3.latlng_to_cell(la, lo, 7)  # the resolution-7 cell holding A's site, as ingest computes it
    b9 = next(c for c in h3.grid_disk(a9, 1) if c != a9 and h3.latlng_to_cell(*h3.cell_to_latlng(c), 7) == parent)
    (lb, lob) = h3.cell_to_latlng(b9)
    # silver.cdr_cells carries H3 at cdr.h3_resolution = 7: both cells share it.
    cells = spark.createDataFrame(
        [("A", None, la, lo, None, None, parent, "R1", "R1-D1", "within"),
         ("B", None, lb, lob, None, None, parent, "R1", "R1-D1", "within")],
        "cell_id string, site_id string, latitude double, longitude double, valid_from date, valid_to date, "
        "h3_index string, admin1 string, admin2 string, assignment string")
    events = spark.createDataFrame(
        [(s, datetime(2024, 3, 4, 12), D0, c) for s, c in [("s1", "A"), ("s2", "A"), ("s3", "A"), ("s4", "B"),
                                                          ("s5", "B")]],
        "subscriber_id string, event_time timestamp, event_date date, cell_id string")

    def count(unit: str) -> dict[str, int]:
        located = mobility.events_with_units(events, cells, unit)
        return {r["unit"]: r["n"] for r in located.groupBy("unit").count().withColumnRenamed("count", "n").collect()}

    assert count("h3_9") == {a9: 3, b9: 2}  # by hand: three subscribers in A's cell, two in B's
    assert count("h3_7") == {parent: 5}
    assert count("admin2") == {"R1-D1": 5}
    assert SpatialUnit.parse("h3_9").h3_resolution == 9 and SpatialUnit.parse("admin1").admin_level == "admin1"
    for bad, why in (("h3_16", "0 to 15"), ("district", "not a spatial unit"), ("h3-9", "not a spatial unit")):
        with pytest.raises(ValueError, match=why):
            SpatialUnit.parse(bad)
    with pytest.raises(ValueError, match="cdr.spatial_unit: 'admin3': cells carry admin1 and admin2 only"):
        CdrSettings(spatial_unit="admin3")
