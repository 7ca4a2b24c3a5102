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


@pytest.fixture(scope="module")
def flow(spark: SparkSession, tmp_path_factory, monkeypatch_module):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cdr")
    monkeypatch_module.setenv("MIGRALAKE_PSEUDONYM_KEY", KEY)
    cfg = load_config(
        "demo",
        overrides=[
            f"lakehouse.root={root / 'lakehouse'}",
            f"demo.input_dir={root / 'inputs'}",
            "demo.n_subscribers=400",
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
    assert set(quarantine) == set(ingest.REASONS)  # every reason is exercised
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
             "silver.cdr_home_locations", "gold.cdr_presence_daily"]
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
