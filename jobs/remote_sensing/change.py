"""Settlement change: scene pairs -> per-window built-up change on Spark -> gold layers, COG, quick-look.

Reads: scenes from ``remote_sensing.scenes`` / ``remote_sensing.scene_dir`` (GeoTIFFs),
``remote_sensing.admin_paths`` (small, read on the driver).
Writes: ``silver.settlement_scenes`` and ``quarantine.settlement_scenes`` (the catalogue,
whole), and for each pair of consecutive dates of an area ``silver.settlement_tiles``,
``gold.settlement_change_h3`` and ``gold.settlement_change_admin`` (re-running a pair
replaces it), plus ``<lakehouse>/<rasters_dir>/settlement_change/<area>/<before>_<after>/``
``change.tif`` (Cloud-Optimised GeoTIFF, classes 0 invalid, 1 not built, 2 stable,
3 new, 4 lost) and ``quicklook.png``.

How it scales: the driver lists scenes and windows (a fixed grid per pair on the
first date's grid); each Spark task receives (scene paths, window), opens the files
itself, aligns the second date onto the grid (reprojection and resampling when CRS,
resolution or extent differ), and returns sums per H3 cell and admin area. Pixel
arrays never pass through the driver; a task holds arrays of one window only. A
window that cannot be read quarantines its scene and leaves that pair out of gold.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from rasterio.windows import Window

from jobs.remote_sensing import pixels, radiometry
from jobs.remote_sensing.catalogue import Rejected, catalogue, pair_id, pairs
from jobs.remote_sensing.pixels import Grid, Scene, scene_from_json
from lib.config import Config, RemoteSensingSettings
from lib.runtime import JobFailed, Write, log, side_by_side, stage
from lib.spark import parallel_rows
from lib.tables import Lakehouse, spec

DESCRIPTION = "Satellite scenes (two or more dates) -> built-up change per H3 cell and admin area (gold) + COG"

PART_SCHEMA = T.StructType([
    T.StructField("kind", T.StringType(), False),  # h3 | admin | tile | error
    T.StructField("pair_id", T.StringType(), False),
    T.StructField("level", T.StringType(), True),
    T.StructField("unit", T.StringType(), True),
    T.StructField("window_id", T.StringType(), True),
    *[T.StructField(c, T.LongType(), True) for c in pixels.SUM_COLUMNS if c.startswith("n_")],
    *[T.StructField(c, T.DoubleType(), True) for c in pixels.SUM_COLUMNS if c.startswith("km2_")],
    T.StructField("n_outside_admin", T.LongType(), True),
    T.StructField("peak_rss_mb", T.DoubleType(), True),
    T.StructField("seconds", T.DoubleType(), True),
    T.StructField("worker_pid", T.LongType(), True),
    T.StructField("detail", T.StringType(), True),
])
WINDOW_SCHEMA = T.StructType([
    T.StructField("pair_id", T.StringType(), False),
    T.StructField("row_off", T.IntegerType(), False),
    T.StructField("col_off", T.IntegerType(), False),
    T.StructField("height", T.IntegerType(), False),
    T.StructField("width", T.IntegerType(), False),
])


class RemoteSensingError(JobFailed):
    """The pipeline cannot run as configured; the message says why (the CLI prints it and exits 4)."""


# ----------------------------------------------------------------------------- one window (pure)


def window_id(window: Window) -> str:
    return f"r{int(window.row_off)}_c{int(window.col_off)}"


def process_window(before: Scene, after: Scene, window: Window, h3_resolution: int, resampling: str,
                   admin: list[tuple[str, list[str], list[Any]]], staging: str | None) -> pd.DataFrame:
    """Sums of one window of a pair, per H3 cell and admin area, plus one quality row ('tile').

    The pair's grid is the first date's grid; the second date is aligned onto it. When
    ``staging`` is given the window's change classes are written there as a GeoTIFF.
    """
    grid = before.grid
    b0, v0 = pixels.builtup(before, grid, window, resampling)
    b1, v1 = pixels.builtup(after, grid, window, resampling)
    classes = pixels.change_classes(b0, v0, b1, v1)
    lon, lat = pixels.pixel_centres(grid, window)
    area = pixels.pixel_area_km2(grid, window, lat)
    pid, wid = pair_id(before, after), window_id(window)
    frames = []
    import h3

    # Per cell (vectorised point-in-polygon, exact fallback near edges) when cells span many pixels.
    cell_px = h3.average_hexagon_area(h3_resolution, unit="km^2") / float(area.flat[0])
    keys = (pixels.h3_index_fast(grid, window, lon, lat, h3_resolution) if cell_px >= 300
            else pixels.h3_index(lon, lat, h3_resolution))
    sums = pixels.unit_sums(keys, classes, area)

    frames.append(pd.DataFrame({"kind": "h3", "level": f"h3_{h3_resolution}",
                                "unit": [h3.int_to_str(int(k)) for k in sums.pop("key")], **sums}))
    outside = None
    for level, ids, geoms in admin:
        idx = pixels.admin_index(lon, lat, geoms)
        inside = idx >= 0
        outside = int((~inside).sum()) if outside is None else max(outside, int((~inside).sum()))
        if inside.any():
            s = pixels.unit_sums(idx[inside], classes[inside], area[inside])
            frames.append(pd.DataFrame({"kind": "admin", "level": level,
                                        "unit": [ids[int(k)] for k in s.pop("key")], **s}))
    tile = pixels.unit_sums(np.zeros(classes.shape, dtype=np.int64), classes, area)
    tile.pop("key")
    frames.append(pd.DataFrame({"kind": "tile", **tile, "n_outside_admin": [outside],
                                "detail": json.dumps({"row_off": int(window.row_off), "col_off": int(window.col_off),
                                                      "height": int(window.height), "width": int(window.width)})}))
    if staging:
        write_window(Path(staging) / pid / f"{wid}.tif", classes, grid, window)
    out = pd.concat(frames, ignore_index=True)
    out["pair_id"], out["window_id"] = pid, wid
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def write_window(path: Path, classes: np.ndarray, grid: Grid, window: Window) -> None:
    import rasterio
    from rasterio.windows import transform as window_transform

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=classes.shape[1], height=classes.shape[0], count=1,
                       dtype="uint8", crs=grid.crs_wkt, transform=window_transform(window, grid.affine()),
                       compress="deflate") as dst:
        dst.write(classes, 1)


def _window_parts(pair_scenes: dict[str, tuple[str, str]], h3_resolution: int, resampling: str,
                  admin_wkb: list[tuple[str, list[str], list[bytes]]], staging: str | None):  # type: ignore[no-untyped-def]
    """The mapInPandas function: scenes are parsed and admin polygons loaded once per Python worker."""
    cache: dict[str, Any] = {}

    def run_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import shapely

        if "admin" not in cache:
            cache["admin"] = [(lvl, ids, list(shapely.from_wkb(wkb))) for lvl, ids, wkb in admin_wkb]
        for batch in batches:
            for row in batch.itertuples(index=False):
                before, after = cache.setdefault(row.pair_id, tuple(map(scene_from_json, pair_scenes[row.pair_id])))
                window = Window(row.col_off, row.row_off, row.width, row.height)
                started = time.perf_counter()
                try:
                    out = process_window(before, after, window, h3_resolution, resampling, cache["admin"], staging)
                except pixels.SceneReadError as exc:
                    out = pd.DataFrame({"kind": ["error"], "pair_id": [row.pair_id],
                                        "window_id": [window_id(window)], "detail": [str(exc)]})
                out.loc[out["kind"] == "tile", "seconds"] = time.perf_counter() - started
                out.loc[out["kind"] == "tile", "worker_pid"] = os.getpid()
                yield out.reindex(columns=PART_SCHEMA.fieldNames())

    return run_batches


# ----------------------------------------------------------------------------- Spark


def load_admin(settings: RemoteSensingSettings) -> list[tuple[str, list[str], list[bytes]]]:
    from lib import geo

    out = []
    for level, path in settings.admin_paths.items():
        gdf = geo.read_boundaries(path, level)
        out.append((level, [str(v) for v in gdf[level]], [g.wkb for g in gdf.geometry]))
    return out


def compute(spark: SparkSession, scene_pairs: list[tuple[Scene, Scene]], settings: RemoteSensingSettings,
            admin: list[tuple[str, list[str], list[bytes]]], staging: str | None) -> DataFrame:
    """Per-window parts of every pair (kinds h3, admin, tile, error), computed on the executors."""
    pair_scenes = {pair_id(b, a): (json.dumps(asdict(b)), json.dumps(asdict(a))) for b, a in scene_pairs}
    rows = [(pair_id(b, a), int(w.row_off), int(w.col_off), int(w.height), int(w.width))
            for b, a in scene_pairs for w in pixels.windows(b.grid, settings.window_size)]
    windows_df = parallel_rows(spark, rows, WINDOW_SCHEMA)
    fn = _window_parts(pair_scenes, settings.h3_resolution, settings.resampling, admin, staging)
    return windows_df.mapInPandas(fn, PART_SCHEMA)


def _measures(df: DataFrame) -> DataFrame:
    """Gold measures from summed parts."""
    before = F.col("km2_stable") + F.col("km2_lost")
    after = F.col("km2_stable") + F.col("km2_new")
    return df.select(
        "*",
        (F.col("n_stable") + F.col("n_lost")).alias("n_built_before"),
        (F.col("n_stable") + F.col("n_new")).alias("n_built_after"),
        F.col("km2_valid").alias("valid_km2"),
        before.alias("built_km2_before"),
        after.alias("built_km2_after"),
        F.col("km2_new").alias("new_km2"),
        F.col("km2_lost").alias("lost_km2"),
        (after - before).alias("change_km2"),
        F.when(before > 0, (after - before) / before * 100.0).alias("change_pct"),
        (F.col("n_pixels_valid") / F.col("n_pixels")).alias("valid_fraction"),
    )


def summarise(parts: DataFrame, pair_meta: DataFrame, kind: str) -> DataFrame:
    """Sum the window parts of one kind per pair and unit; add the pair's dates and the measures."""
    # Areas are summed as decimals: exact, so the same windows give the same km2 whatever order Spark adds
    # them in (counts are integers already).
    sums = [(F.sum(F.col(c).cast("decimal(38,18)")).cast("double") if c.startswith("km2") else F.sum(c)).alias(c)
            for c in pixels.SUM_COLUMNS]
    agg = parts.filter(F.col("kind") == kind).groupBy("pair_id", "level", "unit").agg(*sums)
    return _measures(agg.join(pair_meta, on="pair_id", how="inner"))


def rasters_root(cfg: Config) -> Path:
    p = Path(cfg.remote_sensing.rasters_dir)
    if p.is_absolute():
        return p
    if not cfg.lakehouse.is_local():
        raise RemoteSensingError("remote_sensing.rasters_dir must be an absolute shared path when the lakehouse "
                                 f"is an object store ({cfg.lakehouse.root})")
    return Path(cfg.lakehouse.resolved_root()) / p


def mosaic_vrt(grid: Grid, files: list[Path]) -> str:
    """GDAL VRT XML placing each window file (named r<row>_c<col>.tif) at its offset in the grid,
    with the class colour map and class names."""
    from xml.sax.saxutils import escape

    t = grid.transform
    colours = {0: (0, 0, 0, 0), 1: (230, 230, 230, 255), 2: (120, 120, 120, 255), 3: (220, 30, 30, 255),
               4: (30, 90, 220, 255)}
    entries = "".join(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>' for r, g, b, a in colours.values())
    meta = "".join(f'<MDI key="class_{k}">{escape(v)}</MDI>' for k, v in pixels.CLASS_NAMES.items())
    sources = []
    for f in files:
        r, c = (int(x[1:]) for x in f.stem.split("_"))
        with rasterio.open(f) as src:
            w, h = src.width, src.height
        sources.append(f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(f))}</SourceFilename>'
                       f'<SourceBand>1</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                       f'<DstRect xOff="{c}" yOff="{r}" xSize="{w}" ySize="{h}"/></SimpleSource>')
    return (f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">'
            f"<SRS>{escape(grid.crs_wkt)}</SRS>"
            f"<GeoTransform>{t[2]!r}, {t[0]!r}, {t[1]!r}, {t[5]!r}, {t[3]!r}, {t[4]!r}</GeoTransform>"
            f'<VRTRasterBand dataType="Byte" band="1"><Description>built-up change class</Description>'
            f"<Metadata>{meta}</Metadata>"
            f"<NoDataValue>{pixels.INVALID}</NoDataValue><ColorInterp>Palette</ColorInterp>"
            f"<ColorTable>{entries}</ColorTable>{''.join(sources)}</VRTRasterBand></VRTDataset>")


def assemble(task: tuple[str, str, str, str]) -> dict[str, Any]:
    """On an executor: window GeoTIFFs of one pair -> change.tif (COG) and quicklook.png."""
    import rasterio.shutil

    pid, scene_json, staging, out_dir = task
    grid = scene_from_json(scene_json).grid
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A VRT mosaics the window files without copying them; GDAL's COG driver then writes the tiled,
    # compressed file with overviews in one pass.
    vrt = out / "change.partial.vrt"
    vrt.write_text(mosaic_vrt(grid, sorted((Path(staging) / pid).glob("*.tif"))), encoding="utf-8")
    cog = out / "change.tif"
    rasterio.shutil.copy(vrt, cog, driver="COG", compress="DEFLATE", blocksize=256, overview_resampling="nearest")
    vrt.unlink()
    shutil.rmtree(Path(staging) / pid, ignore_errors=True)
    from jobs.remote_sensing import quicklook

    quicklook.change_map(cog, out / "quicklook.png", title=pid)
    return {"pair_id": pid, "cog": str(cog), "quicklook": str(out / "quicklook.png")}


def _scene_row(s: Scene, verdict: radiometry.Verdict | None) -> tuple:
    return (s.scene_id, s.area, date.fromisoformat(s.date), s.sensor, s.path, s.grid.crs_wkt, s.grid.width,
            s.grid.height, abs(s.grid.transform[0]), abs(s.grid.transform[4]), json.dumps(s.files, sort_keys=True),
            s.level, verdict.worst_share if verdict else None, radiometry.summary_json(verdict),
            "; ".join(s.notes) or None)


def _quarantine_row(r: Rejected, stage_name: str) -> tuple:
    return (r.path, r.area, date.fromisoformat(r.date) if r.date else None, r.sensor, stage_name, r.reason)


def with_classifier(scenes: list[Scene], rs: RemoteSensingSettings) -> list[Scene]:
    """The scenes set to use the configured built-up rule (a learned model is checked against each scene)."""
    if rs.classifier == "index":
        return scenes
    from jobs.remote_sensing import learn

    try:
        model = learn.load_meta(rs.classifier)
        for s in scenes:
            learn.check_compatible(model, s)
    except learn.ModelError as exc:
        raise RemoteSensingError(str(exc)) from None
    return [replace(s, classifier=str(model.folder)) for s in scenes]


def usable_scenes(spark: SparkSession, rs: RemoteSensingSettings) -> tuple[list[Scene], list[tuple[Rejected, str]],
                                                                           dict[str, radiometry.Verdict]]:
    """The scene catalogue after the radiometric check: usable scenes, rejected ones (with the stage), verdicts."""
    with stage("remote_sensing.catalogue") as st:
        scenes, rejected = catalogue(rs)
        st.rows_in, st.rows_out = len(scenes) + len(rejected), len(scenes)
    for s in scenes:
        log.info("scene %s: %s", s.scene_id, "; ".join(s.notes))
    out: list[tuple[Rejected, str]] = [(r, "catalogue") for r in rejected]
    with stage("remote_sensing.radiometry") as st:
        verdicts = {v.scene_id: v for v in radiometry.check(spark, scenes, rs.window_size, rs.max_out_of_range)}
        st.rows_in = len(verdicts)
        kept = []
        for s in scenes:
            v = verdicts.get(s.scene_id)
            if v is None or v.problem is None:
                kept.append(s)
            elif rs.on_radiometry == "warn" and not v.problem.startswith("window read failed"):
                log.warning("scene %s kept (on_radiometry: warn): %s", s.path, v.problem)
                kept.append(replace(s, notes=(*s.notes, f"radiometry warning: {v.problem}")))
            else:
                out.append((Rejected(s.path, s.area, s.date, s.sensor, v.problem), "radiometry"))
        st.rows_out = len(kept)
    for r, stage_name in out:
        log.warning("scene quarantined (%s): %s: %s", stage_name, r.path, r.reason)
    return with_classifier(kept, rs), out, verdicts


def failed_pairs(parts: DataFrame, scene_pairs: list[tuple[Scene, Scene]]) -> tuple[dict[str, str], list[Rejected]]:
    """Pairs a window of which could not be read (left out of gold), and the scenes to blame."""
    errors = parts.filter(F.col("kind") == "error").select("pair_id", "window_id", "detail").collect()
    by_pair = {pair_id(b, a): (b, a) for b, a in scene_pairs}
    failed: dict[str, str] = {}
    rejects = []
    for e in errors:
        failed.setdefault(e["pair_id"], e["detail"])
    for pid, detail in failed.items():
        for s in by_pair[pid]:
            if s.path in detail or any(f in detail for f, _ in s.files.values()):
                rejects.append(Rejected(s.path, s.area, s.date, s.sensor, f"window read failed: {detail}"))
        log.warning("pair %s left out of gold: %s", pid, detail)
    return failed, rejects


def classifier_name(rs: RemoteSensingSettings) -> str:
    """'index' or 'model:<id>' of the configured built-up rule."""
    if rs.classifier == "index":
        return "index"
    from jobs.remote_sensing import learn

    return f"model:{learn.load_meta(rs.classifier).model_id}"


def gold_writes(lake: Lakehouse, parts: DataFrame, good: list[tuple[Scene, Scene]], rs: RemoteSensingSettings,
                levels: list[str], staging: Path, root: Path) -> tuple[list[Write], list[dict[str, Any]]]:
    """The gold and tile writes of the pairs that were read whole, and the COG assembly; the COGs' paths are
    appended to the returned list when the assembly has run."""
    if not good:
        return [], []
    spark = lake.spark
    meta = spark.createDataFrame(
        [(pair_id(b, a), b.area, date.fromisoformat(b.date), date.fromisoformat(a.date), b.sensor, a.sensor)
         for b, a in good],
        "pair_id string, area string, date_before date, date_after date, sensor_before string, sensor_after string")
    scopes = [{"area": b.area, "date_before": date.fromisoformat(b.date), "date_after": date.fromisoformat(a.date)}
              for b, a in good]
    h3df = summarise(parts, meta, "h3").withColumn("h3_resolution", F.lit(rs.h3_resolution)) \
        .withColumnRenamed("unit", "h3_index")
    writes = [Write("remote_sensing.gold h3", lambda: lake.write(
        lake.conform(h3df, "gold.settlement_change_h3"), "gold.settlement_change_h3",
        where=[{**sc, "h3_resolution": rs.h3_resolution} for sc in scopes]).rows_written)]
    if levels:
        adf = summarise(parts, meta, "admin")
        writes.append(Write("remote_sensing.gold admin", lambda: lake.write(
            lake.conform(adf, "gold.settlement_change_admin"), "gold.settlement_change_admin",
            where=[{**sc, "level": levels} for sc in scopes]).rows_written))
    tiles = parts.filter(F.col("kind") == "tile").join(meta, on="pair_id", how="inner")
    window_json = F.from_json("detail", "row_off int, col_off int, height int, width int")
    tiles = tiles.select("*", window_json.alias("w")).select(
        "area", "date_before", "date_after", "window_id", F.col("w.row_off").alias("row_off"),
        F.col("w.col_off").alias("col_off"), F.col("w.height").alias("height"), F.col("w.width").alias("width"),
        "n_pixels", "n_pixels_valid", "n_outside_admin",
        (F.col("n_pixels_valid") / F.col("n_pixels")).alias("valid_fraction"),
        F.col("peak_rss_mb").alias("worker_peak_rss_mb"), F.lit(classifier_name(rs)).alias("classifier"))
    writes.append(Write("remote_sensing.tiles -> silver", lambda: lake.write(
        lake.conform(tiles, "silver.settlement_tiles"), "silver.settlement_tiles", where=scopes).rows_written))
    tasks = [(pair_id(b, a), json.dumps(asdict(b)), str(staging),
              str(root / "settlement_change" / b.area / f"{b.date}_{a.date}")) for b, a in good]
    rasters: list[dict[str, Any]] = []

    def cogs() -> int:
        rasters.extend(spark.sparkContext.parallelize(tasks, len(tasks)).map(assemble).collect())
        return len(rasters)

    return [*writes, Write("remote_sensing.cogs", cogs)], rasters


def run(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    rs = cfg.remote_sensing
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    scenes, rejected, verdicts = usable_scenes(spark, rs)
    scene_pairs = pairs(scenes)
    scenes_df = spark.createDataFrame([_scene_row(s, verdicts.get(s.scene_id)) for s in scenes],
                                      spec("silver.settlement_scenes").schema)
    if lake.exists("quarantine.settlement_scenes"):
        lake.sync_constraints("quarantine.settlement_scenes")
    catalogue_writes = [
        Write("remote_sensing.scenes -> silver",
              lambda: lake.write(scenes_df, "silver.settlement_scenes", mode="overwrite").rows_written),
        Write("remote_sensing.quarantine",
              lambda: lake.write(q_df, "quarantine.settlement_scenes", mode="overwrite").rows_written)]
    if not scene_pairs:
        q_df = spark.createDataFrame([_quarantine_row(r, st) for r, st in rejected],
                                     spec("quarantine.settlement_scenes").schema)
        side_by_side(catalogue_writes, max_workers=2)
        raise RemoteSensingError(
            f"no pair of usable scenes of one area ({len(scenes)} usable, {len(rejected)} rejected; the reasons are "
            f"in quarantine.settlement_scenes: " + "; ".join(f"{r.path}: {r.reason}" for r, _ in rejected[:3])
            + "); configure remote_sensing.scenes or remote_sensing.scene_dir with two or more dates")
    admin = load_admin(rs)
    root = rasters_root(cfg)
    staging = root / "_staging"
    shutil.rmtree(staging, ignore_errors=True)
    with stage("remote_sensing.tiles") as st:
        parts = compute(spark, scene_pairs, rs, admin, str(staging)).persist(StorageLevel.MEMORY_AND_DISK)
        st.rows_out = parts.count()
    failed, tiling_rejects = failed_pairs(parts, scene_pairs)
    good = [(b, a) for b, a in scene_pairs if pair_id(b, a) not in failed]
    q_rows = [_quarantine_row(r, st) for r, st in rejected] + [_quarantine_row(r, "tiling") for r in tiling_rejects]
    q_df = spark.createDataFrame(q_rows, spec("quarantine.settlement_scenes").schema)
    writes, rasters = gold_writes(lake, parts, good, rs, [lvl for lvl, _, _ in admin], staging, root)
    try:
        side_by_side([*catalogue_writes, *writes], max_workers=6)
    finally:
        parts.unpersist()
        shutil.rmtree(staging, ignore_errors=True)
    summary = {"scenes": len(scenes), "rejected": len(rejected) + len(tiling_rejects), "pairs": len(scene_pairs),
               "pairs_written": len(good), "failed_pairs": failed, "rasters": rasters,
               "classifier": rs.classifier, **({"pairs": len(good)} if good else {})}
    log.info("remote_sensing.change: %s", json.dumps(summary, default=str))
    return summary
