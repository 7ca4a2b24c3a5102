"""Remote-sensing pipeline against planted truth: real and synthetic GeoTIFFs through rasterio and Spark.

One Spark run covers four areas (window 64 px, so every scene spans many windows):
- ``real``: the Landsat-7 scene (when ../shared/data is present) and a second date with planted growth;
- ``warped``: the same first date and the planted second date reprojected to EPSG:4326 at another
  resolution (the pipeline must align them);
- ``synth``: a synthetic scene with a nodata block covering whole windows, and planted growth;
- ``broken``: a good scene plus a truncated copy (quarantined; the others proceed).
A second run of the synth area with one window for the whole scene checks that windows leave no seams.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.windows
import shapely
from pyspark.sql import functions as F

from jobs.demo import raster_synth
from jobs.remote_sensing import change, pixels
from jobs.remote_sensing.catalogue import catalogue
from lib.config import RemoteSensingSettings, load_config

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "rasters" / "L7_ETMs.tif"
SYNTH_SIZE = 300
NODATA_BOX = (128, 0, 64, 192)  # rows 128-191, columns 0-191: three whole 64-px windows


def _cfg(root: Path, scenes: list[dict], admin: dict[str, str], window: int):  # type: ignore[no-untyped-def]
    cfg = load_config(profile="demo", overrides=[f"lakehouse.root={root / 'lake'}"], check_writable=False)
    rs = cfg.remote_sensing.model_dump()
    rs.update(scenes=scenes, admin_paths=admin, window_size=window)
    return cfg.model_copy(update={"remote_sensing": RemoteSensingSettings.model_validate(rs)})


def _thresholds(cfg) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    t = cfg.remote_sensing.sensors["landsat7_etm"].thresholds
    return (t.ndbi_min, t.ndvi_max, t.mndwi_max)


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("rs")
    base = _cfg(root, [], {}, 64)
    t = _thresholds(base)
    scenes, truth = [], {}
    first_real = REAL if REAL.exists() else None
    if first_real is None:  # the warped area still needs a first date: a synthetic one
        first_real = raster_synth.synthetic_scene(root / "stand-in.tif", 349, 352, seed=3)
    truth["real"] = raster_synth.plant_growth(first_real, root / "real" / "after.tif", seed=5, thresholds=t)
    truth["warped"] = raster_synth.plant_growth(first_real, root / "warped" / "after.tif", seed=5, thresholds=t,
                                                dst_crs="EPSG:4326", dst_pixel=0.0003)
    (root / "control").mkdir()
    raster_synth.warp(first_real, root / "control" / "after.tif", "EPSG:4326", 0.0003)  # no growth, only warped
    synth = raster_synth.synthetic_scene(root / "synth" / "before.tif", SYNTH_SIZE, SYNTH_SIZE, seed=11,
                                         nodata_box=NODATA_BOX)
    truth["synth"] = raster_synth.plant_growth(synth, root / "synth" / "after.tif", seed=12, thresholds=t,
                                               n_sites=2, radius=10)
    broken = root / "broken" / "after.tif"
    broken.parent.mkdir()
    data = (root / "synth" / "after.tif").read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # truncated mid-file
    for area, before, after in (("real", first_real, root / "real" / "after.tif"),
                                ("warped", first_real, root / "warped" / "after.tif"),
                                ("control", first_real, root / "control" / "after.tif"),
                                ("synth", synth, root / "synth" / "after.tif"),
                                ("broken", synth, broken)):
        scenes += [{"path": str(before), "date": "2024-01-01", "sensor": "landsat7_etm", "area": area},
                   {"path": str(after), "date": "2024-07-01", "sensor": "landsat7_etm", "area": area}]
    admin = raster_synth.admin_areas(first_real, root / "admin")
    cfg = _cfg(root, scenes, admin, 64)
    summary = change.run(spark, cfg)
    from lib.tables import Lakehouse

    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    return {"root": root, "cfg": cfg, "summary": summary, "truth": truth, "lake": lake, "first": first_real,
            "synth": synth, "admin": admin, "thresholds": t}


def _h3(world, area):  # type: ignore[no-untyped-def]
    return world["lake"].read("gold.settlement_change_h3").filter(F.col("area") == area)


def _totals(df):  # type: ignore[no-untyped-def]
    cols = ["n_pixels", "n_pixels_valid", "n_new", "n_lost", "n_stable", "n_built_before", "new_km2"]
    row = df.agg(*[F.sum(c).alias(c) for c in cols]).first()
    return {c: row[c] for c in cols}


def test_planted_growth_recovered_on_the_same_grid(world):  # type: ignore[no-untyped-def]
    # Same grid, everything outside the disks copied unchanged and every planted pixel given a spectrum of a
    # clearly built-up pixel (0.05 inside every threshold): detection is exact, so no tolerance is needed.
    for area in ("real", "synth"):
        tot = _totals(_h3(world, area))
        truth = world["truth"][area]
        assert truth["planted_pixels"] > 300
        assert tot["n_new"] == truth["planted_pixels"], area
        assert tot["n_lost"] == 0, area
        assert tot["new_km2"] == pytest.approx(truth["planted_km2"], rel=1e-9)


def test_builtup_fraction_matches_independent_numpy(world):  # type: ignore[no-untyped-def]
    with rasterio.open(world["first"]) as src:
        b = src.read().astype(np.float64)
    ndbi = (b[4] - b[3]) / (b[4] + b[3])
    ndvi = (b[3] - b[2]) / (b[3] + b[2])
    mndwi = (b[1] - b[4]) / (b[1] + b[4])
    t = world["thresholds"]
    expected = int(((ndbi > t[0]) & (ndvi < t[1]) & (mndwi < t[2])).sum())
    tot = _totals(_h3(world, "real"))
    assert tot["n_pixels"] == b.shape[1] * b.shape[2]
    assert tot["n_built_before"] == expected
    assert 0.2 < expected / tot["n_pixels"] < 0.9  # an urban scene, not all or nothing


def test_crs_and_resolution_mismatch_are_aligned(world):  # type: ignore[no-untyped-def]
    truth = world["truth"]["warped"]
    tot = _totals(_h3(world, "warped"))
    control = _totals(_h3(world, "control"))
    # The second date went to EPSG:4326 at ~33 m (nearest) and is resampled back onto the 28.5 m UTM grid
    # (bilinear). Resampling alone creates apparent change at the edges of every built-up patch; the control
    # pair (the same warp, no growth) measures it, and outside the disks both pairs are identical. The
    # planted net growth is then recovered within 25%: a 12-px disk has ~75 edge pixels out of ~450 (17%),
    # and each edge moves by at most about a pixel.
    net = (tot["n_new"] - tot["n_lost"]) - (control["n_new"] - control["n_lost"])
    assert abs(net - truth["planted_pixels"]) <= 0.25 * truth["planted_pixels"], (net, truth["planted_pixels"])
    assert tot["n_pixels_valid"] >= 0.97 * tot["n_pixels"]  # the warped scene still covers the first grid
    # Inside the planted disks, most pixels are found as new built-up (checked on the change COG).
    cog = Path(world["summary"]["rasters"][[r["pair_id"] for r in world["summary"]["rasters"]].index(
        "warped_2024-01-01_2024-07-01")]["cog"])
    with rasterio.open(cog) as src:
        classes = src.read(1)
    rr, cc = np.indices(classes.shape)
    for site in truth["sites"]:
        disk = (rr - site["row"]) ** 2 + (cc - site["col"]) ** 2 <= (site["radius_px"] - 1) ** 2
        assert (classes[disk] == pixels.NEW).sum() >= 0.8 * site["planted_pixels"] * disk.sum() / (
            np.pi * site["radius_px"] ** 2)


def test_nodata_and_all_nodata_windows(world):  # type: ignore[no-untyped-def]
    r, c, h, w = NODATA_BOX
    tot = _totals(_h3(world, "synth"))
    assert tot["n_pixels"] == SYNTH_SIZE * SYNTH_SIZE
    assert tot["n_pixels_valid"] == SYNTH_SIZE * SYNTH_SIZE - h * w
    tiles = world["lake"].read("silver.settlement_tiles").filter(F.col("area") == "synth").toPandas()
    empty = tiles[(tiles["row_off"] == 128) & (tiles["col_off"] < 192)]
    assert len(empty) == 3 and (empty["valid_fraction"] == 0).all() and (empty["n_pixels"] == 64 * 64).all()
    assert tiles["n_pixels"].sum() == SYNTH_SIZE * SYNTH_SIZE


def test_corrupt_scene_is_quarantined_and_the_rest_proceed(world):  # type: ignore[no-untyped-def]
    q = world["lake"].read("quarantine.settlement_scenes").toPandas()
    assert len(q) == 1
    row = q.iloc[0]
    assert row["path"].endswith("broken/after.tif") and row["stage"] == "catalogue"
    assert "truncated" in row["reason"] or "cannot be" in row["reason"]
    areas = {r["area"] for r in world["lake"].read("gold.settlement_change_h3").select("area").distinct().collect()}
    assert areas == {"real", "warped", "control", "synth"}
    assert world["summary"]["pairs_written"] == 4


def test_windows_leave_no_seams(world, spark):  # type: ignore[no-untyped-def]
    """The synth pair in one window must give the same per-cell and per-area counts as in 64-px windows."""
    root = world["root"]
    scenes = [s.model_dump(mode="json") for s in world["cfg"].remote_sensing.scenes if s.area == "synth"]
    cfg = _cfg(root / "one-window", scenes, world["admin"], 4096)
    change.run(spark, cfg)
    from lib.tables import Lakehouse

    whole = Lakehouse(spark, cfg.lakehouse.resolved_root())
    cols = ["h3_index", "n_pixels", "n_pixels_valid", "n_new", "n_lost", "n_stable"]
    a = _h3(world, "synth").select(*cols).toPandas().sort_values("h3_index").reset_index(drop=True)
    b = whole.read("gold.settlement_change_h3").select(*cols).toPandas().sort_values("h3_index").reset_index(drop=True)
    assert len(a) > 10
    assert a.equals(b)
    cols = ["level", "unit", "n_pixels", "n_pixels_valid", "n_new", "n_stable"]
    a = world["lake"].read("gold.settlement_change_admin").filter(F.col("area") == "synth").select(*cols)
    b = whole.read("gold.settlement_change_admin").select(*cols)
    assert sorted(map(tuple, a.collect())) == sorted(map(tuple, b.collect()))
    # Each admin level partitions the pixels it covers; level sums equal the whole-scene figure.
    adm = a.groupBy("level").agg(F.sum("n_pixels").alias("n")).collect()
    tiles = world["lake"].read("silver.settlement_tiles").filter(F.col("area") == "synth")
    outside = tiles.agg(F.sum("n_outside_admin")).first()[0]
    assert all(r["n"] + outside == SYNTH_SIZE * SYNTH_SIZE for r in adm)


def test_change_raster_is_a_cog_with_the_gold_counts(world):  # type: ignore[no-untyped-def]
    r = next(x for x in world["summary"]["rasters"] if x["pair_id"].startswith("synth_"))
    with rasterio.open(r["cog"]) as src:
        assert src.driver == "GTiff" and src.overviews(1)
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.profile.get("tiled") and src.crs.to_epsg() == 31985
        classes = src.read(1)
    tot = _totals(_h3(world, "synth"))
    assert int((classes == pixels.NEW).sum()) == tot["n_new"]
    assert int((classes != pixels.INVALID).sum()) == tot["n_pixels_valid"]
    assert Path(r["quicklook"]).stat().st_size > 5_000


def test_quality_mask_bits_and_classes():
    qa = np.array([0, 1 << 3, 1 << 4, 1 << 6, 9, 8])
    assert pixels.quality_mask(qa, "bits", (3, 4)).tolist() == [False, True, True, False, True, True]
    assert pixels.quality_mask(qa, "classes", (8, 9)).tolist() == [False, True, False, False, True, True]


def test_band_folder_with_20m_swir_is_resampled(tmp_path):  # type: ignore[no-untyped-def]
    """A Sentinel-2-like folder: 10 m blue/green/red/nir, 20 m SWIR and SCL, all one cover map."""
    cfg = load_config(profile="demo", check_writable=False)
    cover = np.zeros((64, 64), dtype=np.uint8)
    cover[:, 32:] = 2  # east half built-up, west half vegetation
    folder = tmp_path / "S2_20240301"
    folder.mkdir()
    refl = {"vegetation": (0.04, 0.06, 0.04, 0.40, 0.20), "built": (0.12, 0.13, 0.14, 0.20, 0.28)}
    t10 = rasterio.Affine(10, 0, 500000, 0, -10, 4000000)
    t20 = rasterio.Affine(20, 0, 500000, 0, -20, 4000000)
    for i, name in enumerate(("B02", "B03", "B04", "B08", "B11")):
        values = np.where(cover == 2, refl["built"][i], refl["vegetation"][i])
        dn = np.rint((values + 0.1) / 0.0001).astype(np.uint16)
        transform, arr = (t10, dn) if name != "B11" else (t20, dn[::2, ::2])
        with rasterio.open(folder / f"T31_20240301_{name}.tif", "w", driver="GTiff", width=arr.shape[1],
                           height=arr.shape[0], count=1, dtype="uint16", crs="EPSG:32631", transform=transform,
                           nodata=0) as dst:
            dst.write(arr, 1)
    scl = np.full((32, 32), 4, dtype=np.uint8)
    scl[:4, :] = 9  # a strip of high-probability cloud in the top 8 rows at 10 m
    with rasterio.open(folder / "T31_20240301_SCL.tif", "w", driver="GTiff", width=32, height=32, count=1,
                       dtype="uint8", crs="EPSG:32631", transform=t20) as dst:
        dst.write(scl, 1)
    rs = cfg.remote_sensing.model_dump()
    rs.update(scenes=[{"path": str(folder), "date": "2024-03-01", "sensor": "sentinel2_l2a"}])
    scenes, rejected = catalogue(RemoteSensingSettings.model_validate(rs))
    assert not rejected and set(scenes[0].files) >= {"blue", "swir1", "qa"}
    scene = scenes[0]
    built, valid = pixels.builtup(scene, scene.grid, rasterio.windows.Window(0, 0, 64, 64), "nearest")
    assert not valid[:8].any() and valid[8:].all()
    assert built[8:, 32:].all() and not built[8:, :32].any()


def test_settlement_release_coarsens_sensitive_zones_and_withholds_measures(world, spark):  # type: ignore[no-untyped-def]
    import geopandas as gpd
    import h3
    from shapely.geometry import Point

    from jobs import audit, release

    site = world["truth"]["synth"]["sites"][0]
    with rasterio.open(world["synth"]) as src:
        x, y = src.xy(site["row"], site["col"])
        zone = gpd.GeoDataFrame(geometry=[Point(x, y).buffer(800)], crs=src.crs).to_crs(4326)
    zones = world["root"] / "zones.geojson"
    zone.to_file(zones, driver="GeoJSON")
    rs = world["cfg"].remote_sensing.model_copy(update={"sensitive_zones_path": str(zones)})
    lakehouse = world["cfg"].lakehouse.model_copy(update={"exports_dir": str(world["root"] / "exports")})
    cfg = world["cfg"].model_copy(update={"remote_sensing": rs, "lakehouse": lakehouse})
    out = release.release(spark, cfg, "settlement_change", requester="tester")
    cells = pd.read_parquet(Path(out["path"]) / "cells.parquet")
    assert out["counts"]["cells_coarsened_sensitive"] > 0
    # Nothing finer than resolution 7 has its centre in the zone; the zone's cells went to their parents.
    zone_geom = zone.union_all()
    synth = cells[cells["area"] == "synth"]
    res = synth["h3_index"].map(h3.get_resolution)
    assert set(res) == {7, 8}
    fine_in_zone = [c for c in synth.loc[res == 8, "h3_index"]
                    if zone_geom.contains(Point(h3.cell_to_latlng(c)[::-1]))]
    assert fine_in_zone == []
    assert len(synth) < _h3(world, "synth").count()  # fine cells were merged into parents
    withheld = cells[cells["status"] != "released"]
    released = cells[cells["status"] == "released"]
    assert (released["n_pixels_valid"] > 15).all()
    assert withheld[["new_km2", "change_km2", "change_pct"]].isna().all().all()
    assert len(withheld) > 0  # thin edge cells of the warped scene and the nodata block
    results = audit.verify_files(Path(out["path"]))
    assert all(ok for _, ok, _ in results), results
    folder = Path(out["path"])
    # Partners' files: integer counts as integers, each cell's true H3 resolution.
    feats = json.loads((folder / "cells.geojson").read_text())["features"]
    props = [f["properties"] for f in feats if f["properties"]["area"] == "synth"]
    assert all(isinstance(p["n_pixels_valid"], int) for p in props if p["status"] == "released")
    assert all(p["n_pixels_valid"] is None for p in props if p["status"] != "released")
    assert {p["h3_cell_resolution"] for p in props} == {7, 8}
    assert all(p["h3_cell_resolution"] == h3.get_resolution(p["h3_index"]) for p in props)
    # The change raster in the release folder: a COG with its classes, showing released cells' pixels only.
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["data_dictionary"]["n_pixels_valid"].startswith("valid pixels (an area, not people")
    entry = next(r for r in manifest["rasters"] if r["area"] == "synth")
    cog = folder / entry["file"]
    assert cog.name in manifest["files"] and entry["pixels_masked"] > 0 and entry["pixels_published"] > 0
    from jobs.remote_sensing.change import rasters_root

    source = (rasters_root(cfg) / "settlement_change" / "synth"
              / f"{entry['date_before']}_{entry['date_after']}" / "change.tif")
    with rasterio.open(cog) as dst, rasterio.open(source) as src:
        assert dst.profile.get("tiled") and dst.overviews(1), "not a cloud-optimised GeoTIFF"
        assert dst.descriptions[0] == "built-up change class"
        assert dst.tags(1)["class_3"] == "new built-up" and dst.colormap(1)[3][:3] == (220, 30, 30)
        got, orig = dst.read(1), src.read(1)
        grid = pixels.Grid(src.crs.to_wkt(), tuple(src.transform)[:6], src.width, src.height)
        lon, lat = pixels.pixel_centres(grid, rasterio.windows.Window(0, 0, src.width, src.height))
    kept = got != pixels.INVALID
    assert (got[kept] == orig[kept]).all()  # published pixels are the change classes as computed
    # Attack: every published pixel must lie in a cell released at full resolution; none in the zone.
    cell_of = pixels.h3_index(lon[kept], lat[kept], 8)
    released_fine = {h3.str_to_int(c) for c in released["h3_index"] if h3.get_resolution(c) == 8}
    assert set(np.unique(cell_of).tolist()) <= released_fine
    in_zone = shapely.contains_xy(zone_geom, lon, lat)
    assert in_zone.any() and not (kept & in_zone).any()
    # The STAC item describes every file, with extent, CRS, licence and publisher; it validates (core schema).
    import pystac
    from pystac.validation import validate_dict

    item_dict = json.loads((folder / "stac-item.json").read_text())
    validate_dict(item_dict, extensions=[])
    item = pystac.Item.from_dict(item_dict)
    hrefs = {a.href.lstrip("./") for a in item.assets.values()}
    assert hrefs == {p.name for p in folder.iterdir() if p.name != "stac-item.json"}
    assert item.properties["license"] == "CC-BY-4.0" and item.common_metadata.providers
    west, south, east, north = item.bbox
    assert west <= lon.min() + 0.01 and east >= lon.max() - 0.01 and south <= lat.min() + 0.01
    with rasterio.open(cog) as dst:
        assert item.assets[cog.name.replace(".", "_")].extra_fields["proj:code"] == f"EPSG:{dst.crs.to_epsg()}"


@pytest.mark.parametrize("resolution", [7, 8])
def test_per_cell_h3_assignment_equals_per_pixel_lookup(tmp_path, resolution):  # type: ignore[no-untyped-def]
    scene = raster_synth.synthetic_scene(tmp_path / "s.tif", 700, 600, seed=2)
    with rasterio.open(scene) as src:
        grid = pixels.Grid(src.crs.to_wkt(), tuple(src.transform)[:6], src.width, src.height)
    for window in pixels.windows(grid, 256):
        lon, lat = pixels.pixel_centres(grid, window)
        exact = pixels.h3_index(lon, lat, resolution)
        fast = pixels.h3_index_fast(grid, window, lon, lat, resolution)
        assert np.array_equal(exact, fast), window
