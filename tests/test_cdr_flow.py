"""The CDR flow on planted synthetic data: bronze -> silver -> gold against the known truth."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.cdr import ingest, mobility
from jobs.demo import cdr_synth
from jobs.demo.main import demo_config
from lib.config import load_config
from lib.tables import Lakehouse

KEY = "test-key-0123456789abcdef"
GOLD = ["gold.cdr_presence_daily", "gold.cdr_od_daily", "gold.cdr_od_weekly", "gold.cdr_od_home_current",
        "gold.cdr_displacement", "gold.cdr_displacement_share"]


@pytest.fixture(scope="module")
def flow(spark: SparkSession, tmp_path_factory, monkeypatch_module):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cdr")
    monkeypatch_module.setenv("MIGRALAKE_PSEUDONYM_KEY", KEY)
    cfg = load_config(
        "demo",
        overrides=[
            f"lakehouse.root={root / 'lakehouse'}",
            f"demo.input_dir={root / 'inputs'}",
            "demo.n_subscribers=1000",
            "demo.n_days=8",
            "demo.event_day=4",
            "demo.bad_row_share=0.03",
        ],
    )
    truth = cdr_synth.generate(spark, cfg.demo, Path(cfg.demo.input_dir), files_per_type=2)
    run_cfg = demo_config(cfg, Path(cfg.demo.input_dir))
    ingest.run(spark, run_cfg)
    mobility.run(spark, run_cfg)
    return run_cfg, truth, Lakehouse(spark, run_cfg.lakehouse.resolved_root())


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def pseudo(msisdn: str) -> str:
    return hmac.new(KEY.encode(), msisdn.encode(), hashlib.sha256).hexdigest()


def test_every_row_is_accepted_or_quarantined_with_the_planted_reason(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    planted = truth["rows_by_reason"]
    bronze = lake.read("bronze.cdr_events").count()
    quarantine = {r["reason"]: r["count"] for r in lake.read("quarantine.cdr_events").groupBy("reason").count().collect()}
    assert bronze == planted["accepted"]
    assert quarantine == {k: v for k, v in planted.items() if k != "accepted"}
    # every reason the generator plants (malformed rows, bad outgoing / duration: tests/test_hostile_inputs.py)
    assert set(quarantine) == set(ingest.REASONS) - {"malformed_row", "bad_outgoing", "bad_duration"}
    assert bronze + sum(quarantine.values()) == truth["rows_total"]
    q = lake.read("quarantine.cdr_events").collect()
    assert all(r["source_file"].endswith(".csv") and r["detail"] for r in q)


def test_no_raw_subscriber_id_anywhere_under_the_lakehouse(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    raw_ids = set(pd.read_parquet(Path(cfg.demo.input_dir) / "cdr" / "truth_subscribers")["msisdn"])
    assert len(raw_ids) == cfg.demo.n_subscribers
    needles = [i.encode() for i in raw_ids]
    scanned = 0
    for path in Path(lake.root).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += 1
            # Parquet may compress, so also check the decoded string columns below.
            assert not any(n in data for n in needles), path
    assert scanned > 10
    bronze = lake.read("bronze.cdr_events").select("subscriber_id", "counterpart_id").toPandas()
    assert not (set(bronze["subscriber_id"]) | set(bronze["counterpart_id"].dropna())) & raw_ids
    assert set(bronze["subscriber_id"]) <= {pseudo(m) for m in raw_ids}


def test_renumbered_cell_is_valid_by_date(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    cells = {r["cell_id"]: r for r in lake.read("silver.cdr_cells").collect()}
    old, new = cells[cdr_synth.RENUMBERED_CELL], cells[cdr_synth.RENUMBERED_TO]
    assert old["admin2"] == new["admin2"] == "R1-D1" and old["h3_index"] == new["h3_index"]
    switch = cfg.demo.start_date + timedelta(days=cdr_synth.RENUMBER_DAY)
    assert old["valid_to"] == switch - timedelta(days=1) and new["valid_from"] == switch


def test_displaced_subscribers_are_located_at_their_destination(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    subs = pd.read_parquet(Path(cfg.demo.input_dir) / "cdr" / "truth_subscribers")
    subs["subscriber_id"] = subs["msisdn"].map(pseudo)
    daily = lake.read("silver.cdr_daily_locations").toPandas().merge(subs, on="subscriber_id")
    event = date.fromisoformat(truth["event_date"])
    moved = daily[daily["displaced"] & (daily["date"] >= event)]
    assert len(moved) > 0
    assert (moved["unit"] == moved["dest_admin2"]).mean() == 1.0
    # Before the event the same people are in their home region.
    before = daily[daily["displaced"] & (daily["date"] < event)]
    assert (before["unit"].str[:2] == "R1").all()


def test_presence_drops_by_the_planted_displacement(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    event = date.fromisoformat(truth["event_date"])
    pres = lake.read("gold.cdr_presence_daily").filter(F.col("unit").startswith("R1-"))
    per_day = {r["date"]: r["n"] for r in pres.groupBy("date").agg(F.sum("n_subscribers").alias("n")).collect()}
    residents = truth["residents_affected_region"]
    stayers = residents - sum(truth["displaced_by_od"].values())
    # Every subscriber has at least one event a day; bad rows (3%) can remove a day's only event.
    for day, n in per_day.items():
        expected = residents if day < event else stayers
        assert 0.97 * expected <= n <= expected, (day, n, expected)


def test_rerun_leaves_identical_tables(spark: SparkSession, flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    names = ["bronze.cdr_events", "quarantine.cdr_events", "silver.cdr_daily_locations",
             "silver.cdr_home_locations", *GOLD]
    before = {n: sorted(map(tuple, lake.read(n).drop("source_file").collect())) for n in names}
    ingest.run(spark, cfg)
    mobility.run(spark, cfg)
    after = {n: sorted(map(tuple, lake.read(n).drop("source_file").collect())) for n in names}
    assert before == after
    assert json.loads(json.dumps(truth))  # truth stays serialisable


def test_baseline_home_matches_planted_home(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    subs = pd.read_parquet(Path(cfg.demo.input_dir) / "cdr" / "truth_subscribers")
    subs["subscriber_id"] = subs["msisdn"].map(pseudo)
    homes = lake.read("silver.cdr_home_locations").filter(F.col("window") == "baseline").toPandas()
    assert (homes["window_end"] < date.fromisoformat(truth["event_date"])).all()
    merged = homes.merge(subs, on="subscriber_id", how="inner")
    assert len(merged) == len(homes)  # every home belongs to a real subscriber
    assert len(homes) >= 0.9 * cfg.demo.n_subscribers  # most are eligible (>= home_min_days nights)
    agreement = (merged["home_unit"] == merged["home_admin2"]).mean()
    assert agreement >= 0.95, agreement


def truth_subscribers(cfg) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    subs = pd.read_parquet(Path(cfg.demo.input_dir) / "cdr" / "truth_subscribers")
    subs["subscriber_id"] = subs["msisdn"].map(pseudo)
    return subs


def test_consecutive_od_shows_the_move_on_the_event_day(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    event = date.fromisoformat(truth["event_date"])
    od = lake.read("gold.cdr_od_daily").filter(F.col("date") == F.lit(event - timedelta(days=1))).toPandas()
    planted_in: dict[str, int] = {}
    for pair, n in truth["displaced_by_od"].items():
        planted_in[pair.split("->")[1]] = planted_in.get(pair.split("->")[1], 0) + n
    moved = od[od["origin"].str.startswith("R1-") & (od["origin"].str[:2] != od["destination"].str[:2])]
    got = moved.groupby("destination")["n_subscribers"].sum().to_dict()
    assert set(got) == set(planted_in)  # nobody else crosses out of R1 that night
    for dest, n in planted_in.items():
        # A subscriber needs a daily location on both days; 3% bad rows can remove a day's only event.
        assert 0.9 * n <= got[dest] <= n, (dest, got[dest], n)
    # Stayers: flows inside R1 after the event are only between a district and its work neighbour.
    later = lake.read("gold.cdr_od_daily").filter(F.col("date") >= F.lit(event)).toPandas()
    assert not ((later["origin"].str[:2] != "R1") & later["destination"].str.startswith("R1-")).any()


def test_weekly_od_adds_up_the_daily_od(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    daily = lake.read("gold.cdr_od_daily").toPandas()
    daily["week_start"] = pd.to_datetime(daily["date"]).dt.to_period("W-SUN").dt.start_time.dt.date
    expected = daily.groupby(["week_start", "origin", "destination"])["n_subscribers"].sum()
    weekly = lake.read("gold.cdr_od_weekly").toPandas().set_index(["week_start", "origin", "destination"])
    assert weekly["n_transitions"].sort_index().to_dict() == expected.sort_index().to_dict()
    assert (weekly["n_subscribers"] <= weekly["n_transitions"]).all()
    assert (weekly.index.get_level_values("week_start").map(date.weekday) == 0).all()  # ISO weeks start Monday


def eligible_displaced(cfg, lake, window: str) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """Planted displaced subscribers with a baseline home (and a home in ``window`` when given)."""
    subs = truth_subscribers(cfg)
    homes = lake.read("silver.cdr_home_locations").toPandas()
    have = set(homes.loc[homes["window"] == "baseline", "subscriber_id"])
    if window != "baseline":
        have &= set(homes.loc[homes["window"] == window, "subscriber_id"])
    return subs[subs["displaced"] & subs["subscriber_id"].isin(have)]


def test_home_to_current_flows_follow_the_planted_moves(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    event = date.fromisoformat(truth["event_date"])
    hc = lake.read("gold.cdr_od_home_current").filter(F.col("date") >= F.lit(event)).toPandas()
    cross = hc[hc["origin"].str[:2] != hc["destination"].str[:2]]
    got = cross.groupby(["date", "origin", "destination"])["n_subscribers"].sum()
    # Exactly the displaced subscribers with a baseline home and a daily location that day.
    subs = eligible_displaced(cfg, lake, "baseline")
    daily = lake.read("silver.cdr_daily_locations").filter(F.col("date") >= F.lit(event)).toPandas()
    seen = daily.merge(subs, on="subscriber_id")
    expected = seen.groupby(["date", "home_admin2", "dest_admin2"]).size()
    expected.index.names = got.index.names
    assert got.to_dict() == expected.to_dict()
    assert len(subs) >= 0.8 * sum(truth["displaced_by_od"].values())


def test_displacement_recovers_the_planted_origin_destination_counts(flow) -> None:  # type: ignore[no-untyped-def]
    """Tolerance: a displaced subscriber is counted when both homes exist, i.e. with night-time
    events on at least home_min_days (3) of the 4 nights of the baseline and of the post-event
    week here. With 1-11 events a day, half of them at night, a night has no event with
    probability about 0.09, so each window loses about 4% (P(fewer than 3 of 4 nights)), and
    bad rows a little more: expected recall about 0.9. With about 75 displaced subscribers
    the binomial spread is about 3 points, so the bound is 0.8. Precision must be exact:
    non-displaced subscribers spend every night at home."""
    cfg, truth, lake = flow
    disp = lake.read("gold.cdr_displacement").toPandas()
    assert set(disp["week_since_event"]) == {0}
    assert (disp["window_start"] == date.fromisoformat(truth["event_date"])).all()
    planted = truth["displaced_by_od"]
    got = {f"{r.origin}->{r.destination}": r.n_subscribers for r in disp.itertuples()}
    assert set(got) <= set(planted)  # no spurious origin-destination pair
    for pair, n in got.items():
        assert n <= planted[pair], (pair, n, planted[pair])
    recall = sum(got.values()) / sum(planted.values())
    assert recall >= 0.8, recall
    # Exactly the displaced subscribers with both homes are counted, at their planted destination.
    subs = eligible_displaced(cfg, lake, "post_event_week_0")
    expected = subs.groupby(["home_admin2", "dest_admin2"]).size()
    assert got == {f"{o}->{d}": n for (o, d), n in expected.items()}


def test_share_away_matches_the_planted_share(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    share = lake.read("gold.cdr_displacement_share").toPandas()
    subs = truth_subscribers(cfg)
    residents = subs.groupby("home_admin2").size()
    away = subs[subs["displaced"]].groupby("home_admin2").size()
    for r in share.itertuples():
        assert r.n_away <= r.n_subscribers <= r.n_baseline_residents <= residents[r.origin]
        assert r.share_away == pytest.approx(r.n_away / r.n_subscribers)
        planted_away = int(away.get(r.origin, 0))
        assert r.n_away <= planted_away and r.n_subscribers - r.n_away <= residents[r.origin] - planted_away
    r1 = share[share["origin"].str.startswith("R1-")]
    assert len(r1) == 9
    pooled = r1["n_away"].sum() / r1["n_subscribers"].sum()
    planted_share = sum(truth["displaced_by_od"].values()) / truth["residents_affected_region"]
    assert abs(pooled - planted_share) <= 0.03, (pooled, planted_share)
    assert (share.loc[~share["origin"].str.startswith("R1-"), "n_away"] == 0).all()


def test_unscaled_tables_carry_no_estimate(flow) -> None:  # type: ignore[no-untyped-def]
    cfg, truth, lake = flow
    for name in GOLD:
        assert lake.read(name).filter(F.col("est_population").isNotNull()).count() == 0, name
