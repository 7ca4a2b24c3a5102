"""Releases and review on real Delta tables: exports, audit record, files, verify, tampering, budget."""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession

from jobs import audit, release
from lib import publish
from lib.config import CONF_DIR, load_config
from lib.tables import Lakehouse, spec

DAY1, DAY2 = date(2024, 3, 4), date(2024, 3, 5)
UNITS = ["A", "B", "C"]
COUNTS = [100, 12, 40, 30, 200, 50, 60, 70, 300]  # A->B = 12 leaks by differencing without complements


def gold_od(spark: SparkSession, lake: Lakehouse) -> None:
    rows = []
    for d, bump in ((DAY1, 0), (DAY2, 5)):
        k = 0
        for o in UNITS:
            for dest in UNITS:
                rows.append((d, "admin2", o, dest, COUNTS[k] + bump, None))
                k += 1
    df = spark.createDataFrame(rows, schema=spec("gold.cdr_od_daily").schema)
    lake.write(df, "gold.cdr_od_daily", period=(DAY1, DAY2), scope={"spatial_unit": "admin2"})


def gold_presence_admin2(spark: SparkSession, lake: Lakehouse) -> None:
    """Five admin2 units in two regions (R1-D1 = 9 is withheld) and their cells, on DAY1."""
    units = {"R1-D1": 9, "R1-D2": 120, "R1-D3": 80, "R2-D1": 300, "R2-D2": 40}
    cells = [(f"C{i}", None, 30.0, -1.0, None, None, "87000000fffffff", u[:2], u, "within")
             for i, u in enumerate(units)]
    lake.write(spark.createDataFrame(cells, schema=spec("silver.cdr_cells").schema), "silver.cdr_cells",
               mode="overwrite")
    lake.write(spark.createDataFrame([(DAY1, "admin2", u, n, None) for u, n in units.items()],
                                     schema=spec("gold.cdr_presence_daily").schema),
               "gold.cdr_presence_daily", period=(DAY1, DAY1), scope={"spatial_unit": "admin2"})


def config(tmp_path: Path, policy: Path | None = None, period: tuple[date, date] | None = None):  # type: ignore[no-untyped-def]
    over = [f"lakehouse.root={tmp_path / 'lake'}", f"lakehouse.exports_dir={tmp_path / 'exports'}",
            f"lakehouse.reports_dir={tmp_path / 'reports'}"]
    if policy:
        over.append(f"privacy.policy_path={policy}")
    if period:
        over += [f"period.start={period[0]}", f"period.end={period[1]}"]
    return load_config("demo", overrides=over)


@pytest.fixture(scope="module")
def released(spark: SparkSession, tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("release")
    cfg = config(tmp)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_od(spark, lake)
    out = release.release(spark, cfg, "cdr_od", requester="tester", purpose="flows between A, B and C")
    return cfg, lake, out, tmp


def verify(spark: SparkSession, cfg, release_id: str, action: str = "verify") -> int:  # type: ignore[no-untyped-def]
    return audit.run(spark, cfg, argparse.Namespace(action=action, release_id=release_id))


def test_release_exports_guarded_rows_files_and_an_audit_record(spark: SparkSession, released) -> None:  # type: ignore[no-untyped-def]
    cfg, lake, out, tmp = released
    rid = out["release_id"]
    rows = lake.read("exports.cdr_od").filter(f"release_id = '{rid}'").toPandas()
    assert len(rows) == 18  # 2 days x 9 cells, withheld ones listed
    day1 = rows[rows["date"] == DAY1].set_index(["origin", "destination"])
    assert day1.loc[("A", "B"), "status"] == "withheld" and pd.isna(day1.loc[("A", "B"), "n_subscribers"])
    assert (day1["status"] == "withheld").sum() == 4  # A->B and a rectangle of three complements
    # Partners see "withheld", never why (a "primary" status says the count is small); the audit record knows.
    assert set(rows["status"]) == {"released", "withheld"}
    audit_counts = json.loads(lake.read("audit.releases").first()["counts_json"])
    assert audit_counts["totals"]["withheld_complementary"] == 3 and audit_counts["per_slice"][0]["withheld_primary"] == 1
    assert out["counts"]["withheld_primary"] == 1 and out["counts"]["slices"] == 2  # day 2: A->B = 17
    folder = Path(out["path"])
    assert sorted(p.name for p in folder.iterdir()) == [
        "cells.csv", "cells.parquet", "manifest.json", "manifest.sig", "margins.csv", "margins.parquet",
        "quicklook.png", "signing_key.pub", "stac-item.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["policy"]["rules"]["suppress_at_or_below"] == 15
    assert manifest["source"]["table"] == "gold.cdr_od_daily" and manifest["source"]["version"] == lake.version("gold.cdr_od_daily")
    assert "how_to_cite" in manifest and "n_subscribers" in manifest["data_dictionary"]
    rec = lake.read("audit.releases").toPandas()
    assert rec["release_id"].tolist() == [rid] and rec["requester"].tolist() == ["tester"]
    assert json.loads(rec["sources_json"][0]) == {"gold.cdr_od_daily": lake.version("gold.cdr_od_daily")}
    assert lake.properties("exports.cdr_od")["migralake.policy_hash"] == manifest["policy_hash"]
    assert verify(spark, cfg, rid) == 0


def test_same_inputs_and_policy_give_the_same_release(spark: SparkSession, released) -> None:  # type: ignore[no-untyped-def]
    cfg, lake, out, tmp = released
    again = release.release(spark, cfg, "cdr_od", requester="tester")
    assert again["release_id"] == out["release_id"] and again["new"] is False
    assert lake.read("audit.releases").count() == 1
    # The strict profile would withhold day 2's A->B = 17, which this release published: refused
    # (tests/test_overlap.py); in a lakehouse of its own it withholds both small cells.
    strict_cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"profile": "strict"})})
    with pytest.raises(release.ReleaseError, match=f"earlier release {out['release_id']}"):
        release.release(spark, strict_cfg, "cdr_od", requester="tester")
    alone = config(tmp / "strict")
    gold_od(spark, Lakehouse(spark, alone.lakehouse.resolved_root()))
    strict = release.release(spark, alone.model_copy(update={"privacy": strict_cfg.privacy}), "cdr_od")
    assert strict["counts"]["withheld_primary"] == 2  # 12 and 17 <= 20


def test_direct_write_at_the_floor_into_an_export_table_is_rejected(spark: SparkSession, released) -> None:  # type: ignore[no-untyped-def]
    cfg, lake, out, tmp = released
    before = lake.version("exports.cdr_od")
    bad = spark.createDataFrame([("forged", DAY1, "admin2", "A", "B", 10, "released")],  # the platform floor
                                schema=spec("exports.cdr_od").schema)
    with pytest.raises(Exception, match="(?i)constraint|CHECK"):
        lake.write(bad, "exports.cdr_od", mode="append")
    assert lake.version("exports.cdr_od") == before
    assert lake.read("exports.cdr_od").filter("release_id = 'forged'").count() == 0


def test_tampering_with_a_published_file_fails_verify(spark: SparkSession, released, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, lake, out, tmp = released
    rid = out["release_id"]
    folder = Path(out["path"])
    original = (folder / "cells.csv").read_text()
    try:
        (folder / "cells.csv").write_text(original.replace(",,withheld", ",12,withheld", 1))
        assert verify(spark, cfg, rid) == 1
        assert "FAIL  checksums" in capsys.readouterr().out
    finally:
        (folder / "cells.csv").write_text(original)
    # A forger who also rewrites the manifest is caught by the audit record and the attacker check.
    cells = pd.read_parquet(folder / "cells.parquet")
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    try:
        # reveal every withheld cell of the first day but A->B: it is then recovered from its margins
        reveal = (cells["status"] == "withheld") & (cells["date"] == DAY1) & ~(
            (cells["origin"] == "A") & (cells["destination"] == "B"))
        assert reveal.sum() == 3
        cells.loc[reveal, "status"] = "released"
        cells.loc[cells["status"] == "released", "n_subscribers"] = cells["n_subscribers"].fillna(50)
        cells.to_parquet(folder / "cells.parquet", index=False)
        cells.to_csv(folder / "cells.csv", index=False)
        m = json.loads((folder / "manifest.json").read_text())
        m["files"] = {n: publish.sha256_file(folder / n) for n in m["files"]}
        (folder / "manifest.json").write_text(json.dumps(m))
        assert verify(spark, cfg, rid) == 1
        text = capsys.readouterr().out
        assert "PASS  checksums" in text and "FAIL  audit record" in text and "FAIL  attacker intervals" in text
    finally:
        for name, data in saved.items():
            (folder / name).write_bytes(data)
    assert verify(spark, cfg, rid) == 0


def test_report_is_a_self_contained_html_page(spark: SparkSession, released) -> None:  # type: ignore[no-untyped-def]
    cfg, lake, out, tmp = released
    assert verify(spark, cfg, out["release_id"], "report") == 0
    page = (tmp / "reports" / f"{out['release_id']}.html").read_text()
    assert "Verification: <b>PASSED</b>" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # opens with no network
    assert "Lakeland Statistics Office ethics board" in page
    from html.parser import HTMLParser

    class Reader(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.text: list[str] = []
            self.refs: list[str] = []
            self.tags: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags.append(tag)
            self.refs += [v or "" for k, v in attrs if k in ("src", "href")]

        def handle_data(self, data: str) -> None:
            self.text.append(data)

    reader = Reader()
    reader.feed(page)
    reader.close()
    assert reader.refs and all(r.startswith("data:") for r in reader.refs)  # the plot is inline; nothing else
    text = " ".join(" ".join(reader.text).split())
    # The policy as sentences, not Python or JSON values.
    assert "a cell counting 15 or fewer subscribers" in text
    assert "totals by origin; totals by destination; the grand total" in text
    assert "none: released counts are exact" in text
    before_dictionary = text.split("Data dictionary")[0]  # the dictionary's prose may say "null"
    for raw in ("None", "null", "[[", "{\"", "['"):
        assert raw not in before_dictionary, raw
    # Who asked and why; the data dictionary; the slice with the most withheld cells first.
    assert "requested by tester" in text and "purpose flows between A, B and C" in text
    assert "Data dictionary" in text and "subscribers (distinct pseudonymised SIMs); null when withheld" in text
    first_row = text.split("withheld complementary", 1)[1].split()[:2]
    assert first_row[0] == str(DAY1)  # DAY1 holds the withheld cells


def test_budget_ledger_refuses_an_overspend(spark: SparkSession, tmp_path: Path) -> None:
    text = (CONF_DIR / "privacy.yaml").read_text()
    policy = tmp_path / "noisy.yaml"
    policy.write_text(text.replace("  epsilon: 8.0", "  epsilon: 5.0").replace(
        "    margins: [[origin], [destination], []]\n    owner: cdr\n  cdr_displacement",
        "    margins: [[origin], [destination], []]\n    noise: {mechanism: laplace, epsilon: 3.0, contributions_per_slice: 1}\n"
        "    owner: cdr\n  cdr_displacement"))
    cfg = config(tmp_path, policy, period=(DAY1, DAY1))
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_od(spark, lake)
    first = release.release(spark, cfg, "cdr_od")
    assert first["counts"]["noised_or_rounded"] > 0
    ledger = lake.read("audit.privacy_budget").toPandas()
    # one slice at epsilon 3 (OpenDP rounds its accounting up, never down)
    assert ledger["epsilon"].tolist() == [pytest.approx(3.0, abs=1e-9)] and ledger["epsilon"][0] >= 3.0
    assert ledger["dataset"].tolist() == ["gold.cdr_od_daily"]
    with pytest.raises(release.ReleaseError, match=r"budget of gold.cdr_od_daily exceeded: spent epsilon 3 \+ 3 > budget 5"):
        release.release(spark, config(tmp_path, policy, period=(DAY2, DAY2)), "cdr_od")
    assert lake.read("audit.releases").count() == 1 and lake.read("audit.privacy_budget").count() == 1


def test_spatial_release_with_a_two_level_hierarchy_writes_geojson(spark: SparkSession, tmp_path: Path) -> None:
    import geopandas as gpd

    from jobs.demo import cdr_synth

    (tmp_path / "admin2.geojson").write_text(json.dumps(cdr_synth.admin_geojson("admin2")))
    cfg = config(tmp_path, period=(DAY1, DAY1))
    cfg = cfg.model_copy(update={"cdr": cfg.cdr.model_copy(update={"admin_paths": {
        "admin2": str(tmp_path / "admin2.geojson")}})})
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_presence_admin2(spark, lake)
    out = release.release(spark, cfg, "cdr_presence")
    folder = Path(out["path"])
    geo = gpd.read_file(folder / "cells.geojson")
    status = dict(zip(geo["unit"], geo["status"], strict=True))
    assert status == {"R1-D1": "withheld", "R1-D2": "released", "R1-D3": "withheld", "R2-D1": "released",
                      "R2-D2": "released"}
    assert geo.crs.to_epsg() == 4326 and geo.geometry.is_valid.all()
    assert gpd.read_parquet(folder / "cells.geoparquet")["unit"].tolist() == geo["unit"].tolist()
    margins = pd.read_parquet(folder / "margins.parquet")
    assert set(margins["margin"]) == {"admin1", "total"}  # region totals and the national total
    assert verify(spark, cfg, out["release_id"]) == 0


def test_a_slice_the_guard_refuses_stops_the_release_and_publishes_nothing(spark: SparkSession,
                                                                           tmp_path: Path) -> None:
    text = (CONF_DIR / "privacy.yaml").read_text()
    policy = tmp_path / "bad-margins.yaml"  # cdr_od margins on a column the table does not have
    policy.write_text(text.replace("    margins: [[origin], [destination], []]\n    owner: cdr\n  cdr_displacement",
                                   "    margins: [[origin], [district], []]\n    owner: cdr\n  cdr_displacement"))
    cfg = config(tmp_path, policy)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_od(spark, lake)
    with pytest.raises(release.ReleaseError, match=r"slice \{'date': '2024-03-04', 'spatial_unit': 'admin2'\}: "
                                                   r"the policy names columns the table lacks: \['district'\]"):
        release.release(spark, cfg, "cdr_od")
    assert not lake.exists("audit.releases") and not lake.exists("exports.cdr_od")
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_presence_releases_whatever_other_levels_exist_in_gold(spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path, period=(DAY1, DAY1))
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_presence_admin2(spark, lake)
    lake.write(spark.createDataFrame([(DAY1, "admin1", "R1", 209, None), (DAY1, "admin1", "R2", 340, None)],
                                     schema=spec("gold.cdr_presence_daily").schema),
               "gold.cdr_presence_daily", period=(DAY1, DAY1), scope={"spatial_unit": "admin1"})
    out = release.release(spark, cfg, "cdr_presence")  # admin1 rows next to admin2 ones: not refused
    rows = lake.read("exports.cdr_presence").filter(f"release_id = '{out['release_id']}'").toPandas()
    assert set(rows["spatial_unit"]) == {"admin2"} and out["counts"]["slices"] == 1  # the run's level only
    assert verify(spark, cfg, out["release_id"]) == 0
    # Region R1 (209) is the sum of its districts: released at admin1 too, it would let R1-D1 (9) and the
    # complement withheld with it be subtracted out. The other level of the same day is refused.
    admin1 = cfg.model_copy(update={"cdr": cfg.cdr.model_copy(update={"spatial_unit": "admin1"})})
    with pytest.raises(release.ReleaseError, match=rf"'date': '2024-03-04'\}} was published at spatial_unit "
                                                   rf"\['admin2'\] by {out['release_id']}"):
        release.release(spark, admin1, "cdr_presence")
    # A day no release has published goes through at admin1.
    lake.write(spark.createDataFrame([(DAY2, "admin1", "R1", 209, None), (DAY2, "admin1", "R2", 340, None)],
                                     schema=spec("gold.cdr_presence_daily").schema),
               "gold.cdr_presence_daily", period=(DAY2, DAY2), scope={"spatial_unit": "admin1"})
    day2 = release.release(spark, admin1.model_copy(update={"period": admin1.period.model_copy(
        update={"start": DAY2, "end": DAY2})}), "cdr_presence")
    assert day2["new"] and day2["counts"]["slices"] == 1
