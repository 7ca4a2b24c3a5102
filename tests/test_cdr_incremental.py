"""An incremental day equals the full re-run: day added, activity verdicts flipped, a late re-delivery that moves
a baseline home, the same delivery twice, and a quiet day that changes no verdict and no baseline.

The demo generator's events are split into daily deliveries (as an operator sends them) plus three planted
subscribers. Lakehouse A receives them day by day (``cdr.ingest`` for the delivery's days, then ``cdr.mobility
--incremental``); lakehouse B is built in one full run over the same final inputs. Every silver and gold
mobility table must be equal row for row.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
from datetime import date, timedelta
from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.cdr import incremental, ingest, mobility
from jobs.demo import cdr_synth
from jobs.demo.main import demo_config
from lib.config import CdrInput, Config, load_config
from lib.tables import Lakehouse

KEY = "test-key-incremental-0123456789"
TABLES = ["silver.cdr_subscriber_days", "silver.cdr_daily_locations", "silver.cdr_home_locations",
          "silver.cdr_subscriber_activity", "gold.cdr_presence_daily", "gold.cdr_od_daily", "gold.cdr_od_weekly",
          "gold.cdr_od_home_current", "gold.cdr_displacement", "gold.cdr_displacement_share"]
N_DAYS = 12  # days 0..9 are the history, day 10 is the new day, day 11 a quiet one
INCREMENTAL = argparse.Namespace(incremental=True)
# Planted subscribers (MSISDN, what they test):
GAINED = "255700000001"  # 2 events before day 10, a 3rd on day 10: the activity filter now keeps it
LOST = "255700000002"  # 4 night events a day, then 201 on day 10: more than 200 in one day, now left out
MOVER = "255700000003"  # at home in C0010 every night; the late re-delivery of days 2 and 3 puts it in C0040


def planted(start: date, variant: str) -> list[tuple[date, int, str, str]]:
    """(day, hour, msisdn, cell) rows; ``late``: the re-delivered days 2 and 3 with the mover elsewhere."""
    rows = [(start + timedelta(days=d), 21, GAINED, "C0020") for d in (1, 2)]
    rows.append((start + timedelta(days=10), 22, GAINED, "C0020"))
    rows += [(start + timedelta(days=d), h, LOST, "C0010") for d in range(10) for h in (0, 1, 20, 23)]
    rows += [(start + timedelta(days=10), h % 24, LOST, "C0010") for h in range(201)]
    for d in range(N_DAYS):
        cell = "C0040" if variant == "late" and d in (2, 3) else "C0010"
        rows += [(start + timedelta(days=d), h, MOVER, cell) for h in (2, 21, 22)]
    return rows


def write_planted(spark: SparkSession, root: Path, start: date, variant: str) -> None:
    schema = "id long, start_time string, msisdn string, msisdn_counterpart string, location_id string, " \
             "outgoing boolean, duration int, day string"
    rows = [(i, f"{d} {h:02d}:{i % 60:02d}:{(i // 60) % 60:02d}", m, None, cell, True, 10, str(d))
            for i, (d, h, m, cell) in enumerate(planted(start, variant))]
    spark.createDataFrame(rows, schema).write.mode("overwrite").partitionBy("day").parquet(
        str(root / f"planted_{variant}" / "call"))


def inputs(root: Path, days: list[date], planted_variant: dict[date, str]) -> list[CdrInput]:
    """The deliveries of ``days``: the generated events of each day and the planted rows of its variant."""
    out = []
    for d in days:
        for t in cdr_synth.EVENT_TYPES:
            folder = root / "daily" / t / f"day={d}"
            if folder.exists():
                out.append(CdrInput(path=str(folder), event_type=t, format="parquet"))
        folder = root / f"planted_{planted_variant.get(d, 'v1')}" / "call" / f"day={d}"
        if folder.exists():
            out.append(CdrInput(path=str(folder), event_type="call", format="parquet"))
    return out


def with_run(cfg: Config, lakehouse: Path, first: date, last: date, sources: list[CdrInput]) -> Config:
    return cfg.model_copy(update={
        "lakehouse": cfg.lakehouse.model_copy(update={"root": str(lakehouse)}),
        "period": cfg.period.model_copy(update={"start": first, "end": last}),
        "cdr": cfg.cdr.model_copy(update={"inputs": sources})})


def pseudonym(msisdn: str) -> str:
    return hmac.new(KEY.encode(), msisdn.encode(), hashlib.sha256).hexdigest()


def verdicts(lake: Lakehouse) -> dict[str, str | None]:
    rows = {r["subscriber_id"]: r["excluded"] for r in lake.read("silver.cdr_subscriber_activity").collect()}
    return {m: rows[pseudonym(m)] for m in (GAINED, LOST, MOVER)}


def days_located(lake: Lakehouse, msisdn: str) -> int:
    return lake.read("silver.cdr_daily_locations").filter(F.col("subscriber_id") == pseudonym(msisdn)).count()


def baseline_home(lake: Lakehouse, msisdn: str) -> str | None:
    rows = lake.read("silver.cdr_home_locations").filter(
        (F.col("window") == "baseline") & (F.col("subscriber_id") == pseudonym(msisdn))).collect()
    return rows[0]["home_unit"] if rows else None


def snapshot(lake: Lakehouse) -> dict[str, list[tuple]]:
    out = {}
    for name in TABLES:
        df = lake.read(name)
        if "period_end" in df.columns:  # the activity rows carry the period they were judged over
            df = df.drop("period_start")
        out[name] = sorted(tuple(r) for r in df.collect())
    return out


def differences(a: dict[str, list[tuple]], b: dict[str, list[tuple]]) -> dict[str, int]:
    return {n: len(set(a[n]) ^ set(b[n])) + abs(len(a[n]) - len(b[n])) for n in TABLES if a[n] != b[n]}


@pytest.fixture(scope="module")
def world(spark: SparkSession, tmp_path_factory):  # type: ignore[no-untyped-def]
    mp = pytest.MonkeyPatch()
    mp.setenv("MIGRALAKE_PSEUDONYM_KEY", KEY)
    root = tmp_path_factory.mktemp("cdr_incremental")
    cfg = load_config("demo", overrides=[
        f"lakehouse.root={root / 'unused'}", f"demo.input_dir={root / 'inputs'}", "demo.n_subscribers=300",
        f"demo.n_days={N_DAYS}", "demo.event_day=4", "demo.bad_row_share=0.02"])
    cdr_synth.generate(spark, cfg.demo, Path(cfg.demo.input_dir), fmt="parquet", files_per_type=1)
    found = cdr_synth.split_by_day(spark, Path(cfg.demo.input_dir) / "cdr", root / "daily")
    assert found[-1] == "none"  # rows whose time cannot be read arrive too
    base = demo_config(cfg, Path(cfg.demo.input_dir))
    start = base.period.start
    assert start is not None
    for variant in ("v1", "late"):
        write_planted(spark, root, start, variant)
    days = [start + timedelta(days=i) for i in range(N_DAYS)]
    yield spark, root, base, days
    mp.undo()


def full_run(spark: SparkSession, cfg: Config) -> None:
    ingest.run(spark, cfg)
    mobility.run(spark, cfg)


def test_incremental_days_equal_the_full_rerun(world) -> None:  # type: ignore[no-untyped-def]
    spark, root, base, days = world
    history, new_day = days[:10], days[10]
    outside = [CdrInput(path=str(root / "daily" / t / "day=none"), event_type=t, format="parquet")
               for t in cdr_synth.EVENT_TYPES if (root / "daily" / t / "day=none").exists()]
    a_root = root / "a"
    a = Lakehouse(spark, str(a_root))

    # History in one run, then the new day incrementally.
    full_run(spark, with_run(base, a_root, days[0], history[-1], inputs(root, history, {}) + outside))
    before = snapshot(a)
    assert verdicts(a) == {GAINED: "too_few_events", LOST: None, MOVER: None}
    assert days_located(a, LOST) == 10 and days_located(a, GAINED) == 0
    cfg_day = with_run(base, a_root, new_day, new_day, inputs(root, [new_day], {}))
    ingest.run(spark, cfg_day)
    mobility.run(spark, with_run(base, a_root, days[0], new_day, []), INCREMENTAL)
    runs = a.read("silver.cdr_mobility_runs").orderBy("finished_at").collect()
    assert [r["mode"] for r in runs] == ["full", "incremental"]
    assert runs[-1]["dates_recomputed"] == new_day.isoformat()
    assert runs[-1]["subscribers_flipped"] == 2  # GAINED now kept, LOST now left out
    after_day = snapshot(a)
    assert after_day != before

    b1 = Lakehouse(spark, str(root / "b1"))
    full_run(spark, with_run(base, root / "b1", days[0], new_day, inputs(root, days[:11], {}) + outside))
    assert differences(after_day, snapshot(b1)) == {}

    # The flipped subscribers' rows on earlier days follow their new verdict.
    assert verdicts(a) == {GAINED: None, LOST: "too_many_events_on_one_day", MOVER: None}
    assert days_located(a, LOST) == 0 and days_located(a, GAINED) == 3

    # Days 2 and 3 arrive again, corrected: the mover slept elsewhere; its baseline home changes.
    late = {days[2]: "late", days[3]: "late"}
    assert baseline_home(a, MOVER) == "R1-D5"  # C0010's district
    ingest.run(spark, with_run(base, a_root, days[2], days[3], inputs(root, days[2:4], late)))
    mobility.run(spark, with_run(base, a_root, days[0], new_day, []), INCREMENTAL)
    runs = a.read("silver.cdr_mobility_runs").orderBy("finished_at").collect()
    assert runs[-1]["dates_recomputed"] == f"{days[2]},{days[3]}"
    after_late = snapshot(a)
    # Two nights each, the later ones in C0040's district: the tie goes to the unit seen last.
    assert baseline_home(a, MOVER) != "R1-D5"

    b2_root = root / "b2"
    full_run(spark, with_run(base, b2_root, days[0], new_day, inputs(root, days[:11], late) + outside))
    assert differences(after_late, snapshot(Lakehouse(spark, str(b2_root)))) == {}

    # The same delivery twice changes nothing.
    ingest.run(spark, with_run(base, a_root, days[2], days[3], inputs(root, days[2:4], late)))
    mobility.run(spark, with_run(base, a_root, days[0], new_day, []), INCREMENTAL)
    assert differences(snapshot(a), after_late) == {}

    # A quiet day: nobody flips and no baseline home moves, so the activity totals are carried and only the
    # post-event window the day falls in is replaced in the displacement tables.
    quiet = days[11]
    displacement_before = {n: after_late[n] for n in ("gold.cdr_displacement", "gold.cdr_displacement_share")}
    ingest.run(spark, with_run(base, a_root, quiet, quiet, inputs(root, [quiet], late)))
    mobility.run(spark, with_run(base, a_root, days[0], quiet, []), INCREMENTAL)
    runs = a.read("silver.cdr_mobility_runs").orderBy("finished_at").collect()
    assert (runs[-1]["dates_recomputed"], runs[-1]["subscribers_flipped"]) == (quiet.isoformat(), 0)
    after_quiet = snapshot(a)
    b3_root = root / "b3"
    full_run(spark, with_run(base, b3_root, days[0], quiet, inputs(root, days, late) + outside))
    assert differences(after_quiet, snapshot(Lakehouse(spark, str(b3_root)))) == {}
    for name, rows in displacement_before.items():  # windows before the quiet day's are kept as they were
        assert rows and {r for r in after_quiet[name] if r[2] < quiet} == {r for r in rows if r[2] < quiet}

    # A full re-ingest later replaces the quarantine rows the daily runs filed, instead of adding to them.
    daily_quarantine = a.read("quarantine.cdr_events").filter(F.col("period_start") > days[0]).count()
    assert daily_quarantine > 0
    ingest.run(spark, with_run(base, a_root, days[0], quiet, inputs(root, days, late) + outside))
    b3_quarantine = Lakehouse(spark, str(b3_root)).read("quarantine.cdr_events")
    assert a.read("quarantine.cdr_events").count() == b3_quarantine.count() > 0


def test_incremental_refuses_what_it_cannot_equal(world) -> None:  # type: ignore[no-untyped-def]
    spark, root, base, days = world
    c_root = root / "c"
    ingest.run(spark, with_run(base, c_root, days[0], days[3], inputs(root, days[:4], {})))
    with pytest.raises(incremental.IncrementalRefused, match="no earlier cdr.mobility run"):
        mobility.run(spark, with_run(base, c_root, days[0], days[3], []), INCREMENTAL)
    mobility.run(spark, with_run(base, c_root, days[0], days[3], []))
    changed = base.cdr.model_copy(update={"min_events": 5})
    cfg = with_run(base, c_root, days[0], days[4], [])
    with pytest.raises(incremental.IncrementalRefused, match="settings changed"):
        mobility.run(spark, cfg.model_copy(update={"cdr": changed}), INCREMENTAL)
    with pytest.raises(incremental.IncrementalRefused, match="period starts on"):
        mobility.run(spark, with_run(base, c_root, days[1], days[4], []), INCREMENTAL)
    with pytest.raises(incremental.IncrementalRefused, match="before the last run's end"):
        mobility.run(spark, with_run(base, c_root, days[0], days[2], []), INCREMENTAL)

    # A run that died half-way: a table moved on after the last recorded run. Adding a day must not build on it.
    lake = Lakehouse(spark, str(c_root))
    half = lake.read("gold.cdr_presence_daily").filter(F.col("date") == days[1])
    lake.write(half.filter(F.col("n_subscribers") > 1), "gold.cdr_presence_daily", where={"date": [days[1]]})
    with pytest.raises(incremental.IncrementalRefused, match="gold.cdr_presence_daily changed after the last"):
        mobility.run(spark, with_run(base, c_root, days[0], days[4], []), INCREMENTAL)
    mobility.run(spark, with_run(base, c_root, days[0], days[3], []))  # the full run puts the slice right
    mobility.run(spark, with_run(base, c_root, days[0], days[3], []), INCREMENTAL)  # nothing changed: accepted
    assert lake.read("silver.cdr_mobility_runs").orderBy("finished_at").collect()[-1]["dates_recomputed"] == ""
