"""The demo: synthetic inputs with a known truth, then every pipeline end to end.

Writes the synthetic raw files under ``demo.input_dir`` (outside the
lakehouse), then runs the CDR pipeline (ingest -> bronze, daily locations ->
silver, presence -> gold) for the synthetic period and prints where the tables
are and how the result compares with the planted truth.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.cdr import ingest, mobility
from jobs.demo import cdr_synth
from lib.config import CdrInput, Config
from lib.runtime import log, stage
from lib.spark import one_row, to_pandas
from lib.tables import Lakehouse

CDR_GOLD = ("gold.cdr_presence_daily", "gold.cdr_od_daily", "gold.cdr_od_weekly", "gold.cdr_od_home_current",
            "gold.cdr_displacement", "gold.cdr_displacement_share")
DESCRIPTION = "Generate synthetic inputs with a known truth and run every pipeline end to end"


def demo_config(cfg: Config, input_dir: Path) -> Config:
    """The run's config with the CDR inputs and period pointed at the synthetic data."""
    cdr_dir = input_dir / "cdr"
    start = cfg.demo.start_date
    end = start + timedelta(days=cfg.demo.n_days - 1)
    cdr = cfg.cdr.model_copy(
        update={
            "inputs": [CdrInput(path=str(cdr_dir / t), event_type=t) for t in cdr_synth.EVENT_TYPES],
            "cells_path": str(cdr_dir / "cells.csv"),
            "admin_paths": {lvl: str(cdr_dir / f"{lvl}.geojson") for lvl in ("admin1", "admin2")},
            "event_date": start + timedelta(days=cfg.demo.event_day),
        }
    )
    period = cfg.period.model_copy(update={"start": start, "end": end})
    return cfg.model_copy(update={"cdr": cdr, "period": period})


def run(spark: SparkSession, cfg: Config) -> None:
    input_dir = Path(cfg.demo.input_dir)
    lines = ["", "migralake demo finished"]
    if "cdr" in cfg.demo.pipelines:
        lines += cdr_demo(spark, cfg, input_dir)
    if "remote_sensing" in cfg.demo.pipelines:
        lines += remote_sensing_demo(spark, cfg, input_dir)
    if "social" in cfg.demo.pipelines:
        lines += social_demo(spark, cfg, input_dir)
    print("\n".join(lines))
    log.info("demo: done")


def remote_sensing_config(cfg: Config, input_dir: Path) -> tuple[Config, dict]:
    """Inputs for the remote-sensing demo: the real Landsat-7 scene as the first date when present (else a
    seeded synthetic scene), a second date with planted settlement growth, admin areas, a sensitive zone."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import Point

    from jobs.demo import raster_synth
    from lib.config import RemoteSensingSettings

    folder = input_dir / "remote_sensing"
    real = Path(cfg.demo.raster_scene) if cfg.demo.raster_scene else None
    if real is not None and real.exists():
        first, area = real, "olinda-recife"
    else:
        size = cfg.demo.raster_synthetic_size
        first = raster_synth.synthetic_scene(folder / "synthetic_20240101.tif", size, size, seed=cfg.demo.seed)
        area = "synthetic"
    t = cfg.remote_sensing.sensors["landsat7_etm"].thresholds
    after = folder / f"{area}_20240701.tif"
    thresholds = (t.ndbi_min, t.ndvi_max, t.mndwi_max)
    truth = raster_synth.plant_growth(first, after, seed=cfg.demo.seed, thresholds=thresholds, n_sites=4)
    truth["first_date"] = str(first)
    labels, reference = raster_synth.demo_labels(first, after, truth, folder / "labels", thresholds)
    truth["split_col"] = labels["split_col"]
    admin = raster_synth.admin_areas(first, folder / "admin", prefix="RS")
    # A sensitive zone (e.g. a displacement site) around the first planted site: H3 layers are coarsened there.
    site = truth["sites"][0]
    with rasterio.open(first) as src:
        x, y = src.xy(site["row"], site["col"])
        zone = gpd.GeoDataFrame({"zone": ["site-1"]}, geometry=[Point(x, y).buffer(1500)], crs=src.crs)
    zones = folder / "sensitive_zones.geojson"
    zone.to_crs(4326).to_file(zones, driver="GeoJSON")
    rs = cfg.remote_sensing.model_dump()
    dates = {"date_before": "2024-01-01", "date_after": "2024-07-01"}
    rs.update(scenes=[{"path": str(first), "date": "2024-01-01", "sensor": "landsat7_etm", "area": area},
                      {"path": str(after), "date": "2024-07-01", "sensor": "landsat7_etm", "area": area}],
              admin_paths=admin, sensitive_zones_path=str(zones),
              labels=[{"path": labels["reference_layer"], "area": area, "date": "2024-01-01", "builtup_min": 255},
                      {"path": labels["planted"], "area": area, "layer": "new_builtup", **dates}],
              reference=[{"path": reference, "area": area, "layer": "new_builtup", **dates}],
              train={**rs["train"], "block_px": 32})
    truth["area"] = area
    return cfg.model_copy(update={"remote_sensing": RemoteSensingSettings.model_validate(rs)}), truth


def remote_sensing_demo(spark: SparkSession, cfg: Config, input_dir: Path) -> list[str]:
    from jobs.remote_sensing import accuracy, change, train

    with stage("demo.synthetic_rasters"):
        run_cfg, truth = remote_sensing_config(cfg, input_dir)
    summary = change.run(spark, run_cfg)
    trained = train.run(spark, run_cfg)
    model_cfg = run_cfg.model_copy(update={"remote_sensing": run_cfg.remote_sensing.model_copy(
        update={"classifier": trained["model"]})})
    assessed = accuracy.run(spark, model_cfg)["rows"]
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    h3 = lake.read("gold.settlement_change_h3").filter(F.col("area") == truth["area"])
    tot = one_row(h3.agg(F.sum("new_km2").alias("new"), F.sum("lost_km2").alias("lost"),
                         F.sum("built_km2_before").alias("before"), F.sum("valid_km2").alias("valid")))
    raster = summary["rasters"][0] if summary["rasters"] else {}
    lines = [
        f"  remote sensing   : first date {truth['first_date']}",
        f"    settlement     : built-up {tot['before']:.2f} of {tot['valid']:.2f} km2 valid on the first date; "
        f"new {tot['new']:.3f} km2, lost {tot['lost']:.3f} km2 (planted growth: {truth['planted_km2']:.3f} km2 "
        f"in {len(truth['sites'])} sites)",
        f"    change raster  : {raster.get('cog')} (COG), map {raster.get('quicklook')}",
        f"    learned model  : {trained['model']} (trained left of column {truth['split_col']}: the WSF-like "
        "reference layer of the first date and the planted growth there)",
    ]
    for r in assessed:
        lines.append(
            f"    accuracy       : new built-up right of column {truth['split_col']} (held back), "
            f"{r['classifier']}: user's {r['users_accuracy'] or 0:.1%} +- {r['users_ci95'] or 0:.1%}, producer's "
            f"{r['producers_accuracy'] or 0:.1%} +- {r['producers_ci95'] or 0:.1%}, F1 {r['f1'] or 0:.3f}; "
            f"area-adjusted over the scene {r['adjusted_km2'] or 0:.3f} +- {r['adjusted_km2_ci95'] or 0:.3f} km2 "
            f"(planted: {truth['planted_km2']:.3f}, {truth['held_back_km2']:.3f} of it in the held-back part)")
    lines += [f"    {name:<32} {lake.location(name)}" for name in (
        "silver.settlement_scenes", "quarantine.settlement_scenes", "silver.settlement_tiles",
        "gold.settlement_change_h3", "gold.settlement_change_admin", "gold.settlement_accuracy")]
    lines += releases(spark, run_cfg, lake, ("settlement_change",))
    return lines


def social_config(cfg: Config, input_dir: Path) -> tuple[Config, dict]:
    """Synthetic posts (seeded) over the demo period and country, with a planted shift in one region."""
    from jobs.demo import social_synth
    from lib.config import SocialInput

    folder = input_dir / "social"
    truth = social_synth.generate(folder, seed=cfg.demo.seed, n_authors=cfg.demo.n_authors,
                                  posts_per_author=cfg.demo.posts_per_author, start=cfg.demo.start_date,
                                  n_days=cfg.demo.n_days, event_day=cfg.demo.event_day)
    for level in ("admin1", "admin2"):
        (folder / f"{level}.geojson").write_text(json.dumps(cdr_synth.admin_geojson(level)))
    start = cfg.demo.start_date
    social = cfg.social.model_copy(update={
        "inputs": [SocialInput(path=str(folder / "posts"), format="jsonl")],
        "admin_paths": {"admin1": str(folder / "admin1.geojson"), "admin2": str(folder / "admin2.geojson")},
        "spatial_unit": "admin1", "event_date": start + timedelta(days=cfg.demo.event_day)})
    period = cfg.period.model_copy(update={"start": start, "end": start + timedelta(days=cfg.demo.n_days - 1)})
    return cfg.model_copy(update={"social": social, "period": period}), truth


def social_demo(spark: SparkSession, cfg: Config, input_dir: Path) -> list[str]:
    from jobs.social import ingest as social_ingest
    from jobs.social import sentiment

    with stage("demo.synthetic_posts"):
        run_cfg, truth = social_config(cfg, input_dir)
    got = social_ingest.ingest(spark, run_cfg)
    scored = sentiment.score(spark, run_cfg)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    weeks = to_pandas(lake.read("gold.social_sentiment").filter("period = 'week' AND language = 'all'"))
    event = run_cfg.social.event_date
    weeks["after"] = weeks["period_start"] >= event

    def mean(region: str, after: bool) -> float:
        g = weeks[(weeks["region"] == region) & (weeks["after"] == after)]
        return float((g["mean_score"] * g["n_posts"]).sum() / g["n_posts"].sum())

    shift = truth["shift_region"]
    others = sorted(set(weeks["region"]) - {shift, "national"})
    lines = [
        f"  social media     : {got['rows_in']:,} lines -> {got['accepted']:,} posts + "
        f"{sum(got['quarantined'].values())} quarantined ({len(got['quarantined'])} reasons); "
        f"{got['retweets']} retweets, {got['duplicates']} duplicates flagged (planted: {truth['retweets']}, "
        f"{truth['duplicates']})",
        f"    sentiment      : {scored['on_topic']:,} posts about migration scored with {scored['model']} "
        f"(weights {scored['model_hash'][:12]})",
        f"    planted shift  : mean score in {shift} {mean(shift, False):+.2f} before {event}, "
        f"{mean(shift, True):+.2f} after; other regions " + ", ".join(
            f"{r} {mean(r, False):+.2f} -> {mean(r, True):+.2f}" for r in others),
    ]
    lines += [f"    {name:<32} {lake.location(name)}" for name in (
        "bronze.social_posts", "quarantine.social_posts", "silver.social_posts", "gold.social_sentiment")]
    lines += releases(spark, run_cfg, lake, ("social_sentiment",))
    return lines


def cdr_demo(spark: SparkSession, cfg: Config, input_dir: Path) -> list[str]:
    with stage("demo.synthetic_cdr") as st:
        truth = cdr_synth.generate(spark, cfg.demo, input_dir)
        st.rows_out = truth["rows_total"]
    run_cfg = demo_config(cfg, input_dir)
    ingest.run(spark, run_cfg)
    mobility.run(spark, run_cfg)

    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    bronze = lake.read("bronze.cdr_events").count()
    accepted = truth["rows_by_reason"].get("accepted", 0)
    event_date = run_cfg.cdr.event_date
    presence = lake.read("gold.cdr_presence_daily").filter(F.col("spatial_unit") == run_cfg.cdr.spatial_unit)
    r1 = presence.filter(F.col("unit").startswith(cdr_synth.AFFECTED_REGION + "-"))
    before = r1.filter(F.col("date") < F.lit(event_date)).groupBy("date").agg(F.sum("n_subscribers").alias("n"))
    after = r1.filter(F.col("date") >= F.lit(event_date)).groupBy("date").agg(F.sum("n_subscribers").alias("n"))
    mean_before = one_row(before.agg(F.avg("n")))[0]
    mean_after = one_row(after.agg(F.avg("n")))[0]
    n_displaced = sum(truth["displaced_by_od"].values())
    disp = lake.read("gold.cdr_displacement").filter(
        (F.col("spatial_unit") == run_cfg.cdr.spatial_unit) & (F.col("event_date") == F.lit(event_date))
    )
    by_week = {r["week_since_event"]: r["n"] for r in disp.groupBy("week_since_event").agg(
        F.sum("n_subscribers").alias("n")).collect()}
    share = one_row(lake.read("gold.cdr_displacement_share").filter(
        (F.col("spatial_unit") == run_cfg.cdr.spatial_unit) & (F.col("event_date") == F.lit(event_date))
        & F.col("origin").startswith(cdr_synth.AFFECTED_REGION + "-") & (F.col("week_since_event") == 0)
    ).agg(F.sum("n_away").alias("away"), F.sum("n_subscribers").alias("seen")))
    lines = [
        f"  synthetic inputs : {input_dir / 'cdr'} (ground truth: truth.json, truth_subscribers/)",
        f"  lakehouse        : {lake.root}",
    ]
    lines += [f"    {name:<32} {lake.location(name)}" for name in (
        "bronze.cdr_events", "quarantine.cdr_events", "silver.cdr_cells", "silver.cdr_daily_locations",
        "silver.cdr_home_locations", *CDR_GOLD)]
    lines += [
        f"  bronze events    : {bronze:,} (planted clean rows: {accepted:,})",
        f"  presence in {cdr_synth.AFFECTED_REGION}   : mean {mean_before:,.0f} subscribers/day before "
        f"{event_date}, {mean_after:,.0f} after (planted: {n_displaced:,} of "
        f"{truth['residents_affected_region']:,} residents leave)",
        "  displaced (homes) : " + ", ".join(f"week {k}: {v:,}" for k, v in sorted(by_week.items()))
        + f" subscribers with a post-event home outside their baseline home (planted: {n_displaced:,})",
        f"  share away in {cdr_synth.AFFECTED_REGION} : {share['away'] / share['seen']:.1%} of observed baseline residents "
        f"in week 0 (planted: {n_displaced / truth['residents_affected_region']:.1%})",
        "  list all tables  : ./spark-submit.sh tables",
    ]
    lines += releases(spark, run_cfg, lake, ("cdr_presence", "cdr_od", "cdr_displacement"))
    return lines


DEMO_PURPOSES = {
    "cdr_presence": "daily presence per area around the planted displacement event, for a humanitarian situation "
                    "report",
    "cdr_od": "daily origin-destination flows to see where people moved after the planted event",
    "cdr_displacement": "weekly counts of people away from their baseline home since the planted event",
    "settlement_change": "new built-up area per H3 cell between two dates, to locate settlement growth",
    "social_sentiment": "weekly sentiment about migration per region and language around the planted event",
}


def releases(spark: SparkSession, cfg: Config, lake: Lakehouse, types: tuple[str, ...]) -> list[str]:
    """Release outputs through the guard, verify each from its files, write reviewer reports."""
    from jobs import audit, release
    from lib.privacy import signing

    out = ["  releases (guarded; ./spark-submit.sh audit list):"]
    reports = cfg.lakehouse.resolved_local_dir("reports_dir")
    reports.mkdir(parents=True, exist_ok=True)
    for rtype in types:
        with stage(f"demo.release {rtype}"):
            r = release.release(spark, cfg, rtype, requester="migralake demo (synthetic partner request)",
                                purpose=DEMO_PURPOSES.get(rtype, "demonstration of a guarded release"))
            row = audit.audit_row(lake, r["release_id"])
            trusted, _ = signing.trusted_public_key(cfg.privacy)
            results = audit.verify_release(lake, Path(r["path"]), r["release_id"], None, trusted)
            ok = all(passed for _, passed, _ in results) and row is not None
            page = reports / f"{r['release_id']}.html"
            page.write_text(audit.report_html(r["release_id"], Path(r["path"]), row, results), encoding="utf-8")
        t = r["counts"]
        out.append(
            f"    {r['release_id']:<44} cells {t['cells_in']:>5,}  withheld {t['withheld_primary']:>4,} primary + "
            f"{t['withheld_complementary']:>4,} complementary  verify: {'PASSED' if ok else 'FAILED'}"
        )
        out.append(f"      files: {r['path']}  report: {page}")
    return out
