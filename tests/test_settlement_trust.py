"""Settlement layers a user can trust on scenes the project has never seen.

- band discovery: the common file-naming styles, stacks without B1, MTL calibration;
- radiometric sanity: Level-1 digital numbers given to a surface-reflectance profile are quarantined with
  the numbers (and the job stops with a clear error after writing them); the Level-1 profile takes them;
- a learned classifier (LightGBM on the executors) on a scene where the index rule fails in both directions
  (a rough-textured town it misses, smooth bare fields it takes for settlement), trained on one half and
  measured on the other half it never saw;
- accuracy with confidence: the Olofsson et al. (2014) worked example, and the new built-up layer against
  a planted truth, carried into the settlement release's manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from pyspark.sql import functions as F

from jobs.demo import raster_synth
from jobs.remote_sensing import accuracy, catalogue, change, learn, train
from jobs.remote_sensing.catalogue import match_band_file, stack_bands
from lib.config import Config, RemoteSensingSettings, load_config
from lib.publish import sha256_file
from lib.tables import Lakehouse


def _cfg(root: Path, **rs_updates: object) -> Config:
    cfg = load_config(profile="demo", overrides=[f"lakehouse.root={root / 'lake'}"], check_writable=False)
    rs = cfg.remote_sensing.model_dump()
    rs.update(rs_updates)
    return cfg.model_copy(update={"remote_sensing": RemoteSensingSettings.model_validate(rs)})


# ----------------------------------------------------------------------------- band discovery


@pytest.mark.parametrize(("names", "token", "expected"), [
    (["L8-B2-recife.tiff", "L8-B3-recife.tiff", "L8-B12-recife.tiff"], "B2", "L8-B2-recife.tiff"),
    (["L8-B2-recife.tiff", "L8-B3-recife.tiff"], "SR_B2", "L8-B2-recife.tiff"),
    (["LC08_L2SP_214066_20200601_20200824_02_T1_SR_B1.TIF", "LC08_L2SP_214066_20200601_20200824_02_T1_ST_B10.TIF"],
     "SR_B1", "LC08_L2SP_214066_20200601_20200824_02_T1_SR_B1.TIF"),
    (["LC08_x_SR_B6.TIF", "LC08_x_ST_B6.TIF"], "B6", "LC08_x_SR_B6.TIF"),
    (["T33UUP_20230101T100031_B02_20m.jp2", "T33UUP_20230101T100031_B02_10m.jp2"], "B02",
     "T33UUP_20230101T100031_B02_10m.jp2"),
    (["T33_B8A_20m.jp2", "T33_B08_10m.jp2"], "B08", "T33_B08_10m.jp2"),
    (["T33_B8A_20m.jp2", "T33_B08_10m.jp2"], "B8A", "T33_B8A_20m.jp2"),
    (["LC08_x_QA_PIXEL.TIF", "LC08_x_SR_B1.TIF"], "QA_PIXEL", "LC08_x_QA_PIXEL.TIF"),
    (["scene_B1.tif", "scene_B10.tif", "scene_B11.tif"], "B1", "scene_B1.tif"),
    (["scene_B3.tif"], "B2", None),
])
def test_band_files_are_found_by_their_band_token(names, token, expected):  # type: ignore[no-untyped-def]
    got = match_band_file([Path(n) for n in names], token, "role")
    assert (got.name if got else None) == expected


def test_two_files_of_one_band_are_a_clear_error():
    with pytest.raises(ValueError, match="2 files match the band name 'B2'"):
        match_band_file([Path("a_B2.tif"), Path("b_B02.tif")], "B2", "blue")


def _stack(path: Path, count: int, descriptions: list[str] | None = None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=count, dtype="uint16",
                       crs="EPSG:32625", transform=rasterio.Affine(30, 0, 0, 0, -30, 0)) as dst:
        dst.write(np.ones((count, 8, 8), dtype=np.uint16))
        for i, d in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, d)
    return path


def test_a_stack_without_b1_takes_its_bands_in_order_or_by_description(tmp_path):  # type: ignore[no-untyped-def]
    profile = load_config(profile="demo", check_writable=False).remote_sensing.sensors["landsat8_oli"]
    files, how = stack_bands(_stack(tmp_path / "b2_b7.tif", 6), profile)
    assert {r: i for r, (_, i) in files.items()} == {"blue": 1, "green": 2, "red": 3, "nir": 4, "swir1": 5, "swir2": 6}
    assert "B2, B3, B4, B5, B6, B7" in how
    shuffled = ["SR_B5", "SR_B4", "SR_B3", "SR_B2", "SR_B7", "SR_B6"]
    files, how = stack_bands(_stack(tmp_path / "described.tif", 6, shuffled), profile)
    assert how == "band descriptions in the file"
    assert files["nir"][1] == 1 and files["blue"][1] == 4 and files["swir1"][1] == 6
    with pytest.raises(ValueError, match="the file has 4 bands"):
        stack_bands(_stack(tmp_path / "four.tif", 4), profile)


def test_mtl_coefficients_give_toa_reflectance(tmp_path):  # type: ignore[no-untyped-def]
    profile = load_config(profile="demo", check_writable=False).remote_sensing.sensors["landsat8_oli_c2l1"]
    lines = ["GROUP = LANDSAT_METADATA_FILE", '    SUN_ELEVATION = 30.00000000']
    for n in range(1, 8):
        lines += [f"    REFLECTANCE_MULT_BAND_{n} = 2.0000E-05", f"    REFLECTANCE_ADD_BAND_{n} = -0.100000"]
    (tmp_path / "LC08_x_MTL.txt").write_text("\n".join(lines) + "\nEND_GROUP\n")
    mtl = catalogue.find_mtl(tmp_path)
    assert mtl is not None
    cal = catalogue.mtl_calibration(catalogue.read_mtl(mtl), profile, mtl.name)
    assert cal["red"] == pytest.approx((4.0e-05, -0.2))  # sin(30 deg) = 0.5
    (tmp_path / "LC08_x_MTL.txt").unlink()
    (tmp_path / "LC08_x_MTL.json").write_text(json.dumps({"LANDSAT_METADATA_FILE": {
        "IMAGE_ATTRIBUTES": {"SUN_ELEVATION": "90"},
        "LEVEL1_RADIOMETRIC_RESCALING": {**{f"REFLECTANCE_MULT_BAND_{n}": "3E-05" for n in range(1, 8)},
                                         **{f"REFLECTANCE_ADD_BAND_{n}": "-0.1" for n in range(1, 8)}}}}))
    cal = catalogue.mtl_calibration(catalogue.read_mtl(catalogue.find_mtl(tmp_path)), profile, "x")  # type: ignore[arg-type]
    assert cal["nir"] == pytest.approx((3.0e-05, -0.1))


# ----------------------------------------------------------------------------- radiometric sanity


def _level1_folders(root: Path, seed: int) -> list[dict[str, str]]:
    """Two dates of an OLI Level-1 scene as six single-band uint16 files named like 'L8-B2-recife.tiff'
    (digital numbers 6,000-20,000: far below zero once scaled as surface reflectance in the dark bands)."""
    rng = np.random.default_rng(seed)
    base = {2: 7500, 3: 6800, 4: 6200, 5: 16000, 6: 11000, 7: 8000}
    scenes = []
    for day in ("20240101", "20240701"):
        folder = root / "recife" / day
        folder.mkdir(parents=True)
        for band, dn in base.items():
            data = (dn + rng.normal(0, 300, (96, 96))).astype(np.uint16)
            with rasterio.open(folder / f"L8-B{band}-recife.tiff", "w", driver="GTiff", width=96, height=96,
                               count=1, dtype="uint16", crs="EPSG:32725", nodata=0,
                               transform=rasterio.Affine(30, 0, 280000, 0, -30, 9120000)) as dst:
                dst.write(data, 1)
        scenes.append({"path": str(folder), "date": f"{day[:4]}-{day[4:6]}-{day[6:]}", "area": "recife"})
    return scenes


def test_level1_digital_numbers_in_a_surface_reflectance_profile_are_quarantined(spark, tmp_path):  # type: ignore[no-untyped-def]
    scenes = _level1_folders(tmp_path, seed=1)
    cfg = _cfg(tmp_path, scenes=[{**s, "sensor": "landsat8_oli"} for s in scenes], window_size=48)
    with pytest.raises(change.RemoteSensingError, match="no pair of usable scenes") as err:
        change.run(spark, cfg)
    assert "quarantine.settlement_scenes" in str(err.value)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    q = lake.read("quarantine.settlement_scenes").orderBy("date").collect()  # written before the error
    assert [r["stage"] for r in q] == ["radiometry", "radiometry"]
    reason = q[0]["reason"]
    assert "Level-1 DN given to a surface reflectance profile?" in reason
    share = float(reason.split("%")[0]) / 100  # the share is measured, not assumed: recompute it
    with rasterio.open(Path(scenes[0]["path"]) / "L8-B4-recife.tiff") as src:
        red = src.read(1) * 0.0000275 - 0.2
    blue_or_red = max(float((red < -0.01).mean()), share)
    assert share == pytest.approx(blue_or_red, abs=0.01) and share > 0.5

    # The same files through the Level-1 profile (TOA reflectance from the Collection 2 default scaling,
    # no MTL beside them): accepted, with the calibration used in the scene notes.
    cfg1 = _cfg(tmp_path / "l1", scenes=[{**s, "sensor": "landsat8_oli_c2l1"} for s in scenes], window_size=48)
    summary = change.run(spark, cfg1)
    assert summary["pairs_written"] == 1
    lake1 = Lakehouse(spark, cfg1.lakehouse.resolved_root())
    notes = [r["notes"] for r in lake1.read("silver.settlement_scenes").collect()]
    assert all("blue <- L8-B2-recife.tiff" in n and "no MTL file" in n for n in notes)
    assert lake1.read("quarantine.settlement_scenes").count() == 0

    # With on_radiometry: warn the misfit scenes are processed and the warning is kept with them.
    cfgw = _cfg(tmp_path / "warn", scenes=[{**s, "sensor": "landsat8_oli"} for s in scenes], window_size=48,
                on_radiometry="warn")
    assert change.run(spark, cfgw)["pairs_written"] == 1
    lakew = Lakehouse(spark, cfgw.lakehouse.resolved_root())
    rows = lakew.read("silver.settlement_scenes").collect()
    assert all("radiometry warning" in r["notes"] and r["out_of_range"] > 0.5 for r in rows)


# ----------------------------------------------------------------------------- learned built-up


def _sample_points(path: Path, scene: Path, truth: np.ndarray, spec: dict[str, str], seed: int) -> Path:
    """A stratified random sample over the whole scene, strata = the index rule's map classes (150 mapped
    built-up, 250 mapped not built-up), written as lon, lat, class points."""
    from rasterio.windows import Window

    from jobs.remote_sensing.catalogue import open_scene
    from jobs.remote_sensing.pixels import builtup, pixel_centres
    from lib.config import SceneSpec

    profile = load_config(profile="demo", check_writable=False).remote_sensing.sensors["landsat7_etm"]
    s = open_scene(SceneSpec.model_validate(spec), profile)
    window = Window(0, 0, s.grid.width, s.grid.height)
    built, valid = builtup(s, s.grid, window)
    lon, lat = pixel_centres(s.grid, window)
    rng = np.random.default_rng(seed)
    picks = []
    for stratum, k in ((True, 150), (False, 250)):
        idx = np.flatnonzero((built == stratum) & valid)
        picks.append(rng.choice(idx, k, replace=False))
    idx = np.concatenate(picks)
    pd.DataFrame({"lon": lon.ravel()[idx], "lat": lat.ravel()[idx],
                  "class": np.where(truth.ravel()[idx] == 1, "built", "other")}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def town(spark, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A town scene; labels of its left half train a model; its right half is the reference it never saw."""
    root = tmp_path_factory.mktemp("town")
    size = 192
    first = root / "town_20240101.tif"
    truth = raster_synth.town_scene(first, size, seed=21)
    second = root / "town_20240701.tif"
    second.write_bytes(first.read_bytes())  # no change: this fixture is about built-up at a date
    cols = np.arange(size)[None, :].repeat(size, 0)
    train_labels = raster_synth.label_raster(root / "labels_left.tif", first, truth, cols < size // 2)
    reference = raster_synth.label_raster(root / "reference_right.tif", first, truth, cols >= size // 2)
    scenes = [{"path": str(first), "date": "2024-01-01", "sensor": "landsat7_etm", "area": "town"},
              {"path": str(second), "date": "2024-07-01", "sensor": "landsat7_etm", "area": "town"}]
    points = _sample_points(root / "points.csv", first, truth, scenes[0], seed=5)
    cfg = _cfg(root, scenes=scenes, window_size=64,
               labels=[{"path": str(train_labels), "area": "town", "date": "2024-01-01"}],
               reference=[{"path": str(reference), "area": "town", "date": "2024-01-01"},
                          {"path": str(points), "area": "town", "date": "2024-01-01", "class_column": "class",
                           "builtup_classes": ["built"]}],
               train={"trees": 60, "max_per_class_per_window": 1500, "holdout": 0.3, "block_px": 32})
    trained = train.run(spark, cfg)
    cfg_model = cfg.model_copy(update={"remote_sensing": cfg.remote_sensing.model_copy(
        update={"classifier": trained["model"]})})
    assessed = accuracy.run(spark, cfg_model)
    return {"root": root, "cfg": cfg_model, "trained": trained, "assessed": assessed, "truth": truth, "size": size,
            "n_points": len(pd.read_csv(points))}


def test_the_model_folder_records_its_training_data(town):  # type: ignore[no-untyped-def]
    folder = Path(town["trained"]["model"])
    meta = json.loads((folder / "model.json").read_text())
    assert meta["model_id"] == folder.name and meta["model_sha256"] == sha256_file(folder / "model.txt")
    scene_files = meta["training_data"]["scenes"][0]["files"]
    assert scene_files["red"]["sha256"] == sha256_file(scene_files["red"]["path"])
    assert meta["training_data"]["labels"][0]["sha256"] == sha256_file(town["root"] / "labels_left.tif")
    assert meta["level"] == "dn" and meta["sensors"] == ["landsat7_etm"]
    # Held-out blocks of the training half: the model is right, the index rule is not.
    assert meta["holdout_model"]["f1"] > 0.95
    assert meta["holdout_index_rule"]["f1"] < 0.5


def test_the_learned_model_beats_the_index_rule_on_the_half_it_never_saw(town):  # type: ignore[no-untyped-def]
    rows = {(r["classifier"].split(":")[0], r["layer"], str(r["date"])): r for r in town["assessed"]["rows"]
            if r["reference"].endswith("reference_right.tif")}
    model = rows[("model", "builtup", "2024-01-01")]
    index = rows[("index", "builtup", "2024-01-01")]
    size = town["size"]
    truth_right = town["truth"][:, size // 2:]
    assert model["n_reference"] == truth_right.size
    assert model["n_reference_built"] == int(truth_right.sum())
    assert model["producers_accuracy"] > 0.95 and model["users_accuracy"] > 0.85  # edges: 5 x 5 texture
    assert index["producers_accuracy"] < 0.2  # the textured town is missed ...
    assert index["users_accuracy"] < 0.5  # ... and bare fields are taken for it


def test_a_random_sample_corrects_the_area_of_a_biased_map(town):  # type: ignore[no-untyped-def]
    """The index rule's map of the town scene is badly biased; a stratified random sample of reference points
    (the design Olofsson et al. assume) gives an area-adjusted estimate whose 95% interval covers the truth."""
    rows = [r for r in town["assessed"]["rows"] if r["reference"].endswith("points.csv")
            and r["classifier"] == "index" and r["layer"] == "builtup"]
    assert len(rows) == 1
    r = rows[0]
    true_km2 = float(town["truth"].sum()) * 28.5 * 28.5 / 1e6
    assert r["n_reference"] == town["n_points"]
    assert abs(r["adjusted_km2"] - true_km2) <= r["adjusted_km2_ci95"]
    assert abs(r["mapped_km2"] - true_km2) > 3 * r["adjusted_km2_ci95"]  # the map alone is far off


def test_an_altered_model_file_is_refused(town, tmp_path):  # type: ignore[no-untyped-def]
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(town["trained"]["model"], copy)
    text = (copy / "model.txt").read_text()
    (copy / "model.txt").write_text(text.replace("threshold=", "threshold=9", 1))
    with pytest.raises(learn.ModelError, match="does not match model.json"):
        learn.load_meta(copy)


# ----------------------------------------------------------------------------- accuracy with confidence


def test_olofsson_2014_worked_example():
    """Table 8 of Olofsson et al. (2014): strata deforestation, forest gain, stable forest, stable non-forest."""
    n = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])
    mapped_px = np.array([200_000, 150_000, 3_200_000, 6_450_000])
    est = accuracy.olofsson(n, mapped_px * 0.09)  # 30 m pixels, hectares
    assert est["area"][0] == pytest.approx(21_158, abs=2)
    assert est["area_ci95"][0] == pytest.approx(6_158, abs=2)
    assert est["users"][0] == pytest.approx(0.88, abs=0.005)
    assert est["users_ci95"][0] == pytest.approx(0.07, abs=0.005)
    assert est["producers"][0] == pytest.approx(0.75, abs=0.005)
    assert est["producers_ci95"][0] == pytest.approx(0.21, abs=0.005)
    assert est["overall"] == pytest.approx(0.95, abs=0.005)
    assert est["overall_ci95"] == pytest.approx(0.02, abs=0.005)


def test_new_builtup_against_the_planted_truth_reaches_the_release(spark, tmp_path):  # type: ignore[no-untyped-def]
    from jobs import release

    first = raster_synth.synthetic_scene(tmp_path / "s_20240101.tif", 256, 256, seed=11)
    cfg0 = _cfg(tmp_path)
    t = cfg0.remote_sensing.sensors["landsat7_etm"].thresholds
    after = tmp_path / "s_20240701.tif"
    truth = raster_synth.plant_growth(first, after, seed=32, thresholds=(t.ndbi_min, t.ndvi_max, t.mndwi_max),
                                      n_sites=2, radius=10)
    with rasterio.open(first) as a, rasterio.open(after) as b:
        planted = (a.read() != b.read()).any(axis=0)
    assert int(planted.sum()) == truth["planted_pixels"]
    ref = raster_synth.label_raster(tmp_path / "planted.tif", first, planted.astype(np.uint8),
                                    np.ones_like(planted))
    scenes = [{"path": str(first), "date": "2024-01-01", "sensor": "landsat7_etm", "area": "s"},
              {"path": str(after), "date": "2024-07-01", "sensor": "landsat7_etm", "area": "s"}]
    cfg = _cfg(tmp_path, scenes=scenes, window_size=64, reference=[
        {"path": str(ref), "area": "s", "layer": "new_builtup", "date_before": "2024-01-01",
         "date_after": "2024-07-01"}])
    change.run(spark, cfg)
    rows = accuracy.run(spark, cfg)["rows"]
    new = next(r for r in rows if r["layer"] == "new_builtup")
    assert new["n_reference"] == 256 * 256 and new["n_reference_built"] == truth["planted_pixels"]
    assert new["producers_accuracy"] == pytest.approx(1.0) and new["users_accuracy"] == pytest.approx(1.0)
    assert new["adjusted_km2"] == pytest.approx(truth["planted_km2"], rel=1e-9)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    stored = lake.read("gold.settlement_accuracy").filter(F.col("layer") == "new_builtup").collect()
    assert len(stored) == 1 and stored[0]["classifier"] == "index"
    out = release.release(spark, cfg, "settlement_change", requester="tester")
    manifest = json.loads((Path(out["path"]) / "manifest.json").read_text())
    assert [a["layer"] for a in manifest["accuracy"]] == ["new_builtup"]
    assert manifest["accuracy"][0]["producers_accuracy"] == pytest.approx(1.0)


@pytest.mark.slow
def test_no_usable_pair_exits_with_a_clear_message_after_writing_the_quarantine(spark, tmp_path):  # type: ignore[no-untyped-def]
    """As a user runs it: Level-1 band folders found in scene_dir, given to the surface-reflectance profile."""
    import os
    import subprocess

    _level1_folders(tmp_path / "scenes", seed=2)
    lake_root = tmp_path / "lh"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [str(root / "spark-submit.sh"), "remote_sensing.change", "--master", "local[1]",
         "--set", f"lakehouse.root={lake_root}", "--set", f"remote_sensing.scene_dir={tmp_path / 'scenes'}",
         "--set", "remote_sensing.default_sensor=landsat8_oli"],
        capture_output=True, text=True, timeout=300, cwd=root, env=dict(os.environ))
    logs = out.stdout + out.stderr
    assert out.returncode == 4, logs[-3000:]
    assert "migralake: error: no pair of usable scenes of one area (0 usable, 2 rejected" in logs
    assert "Traceback" not in logs
    rows = Lakehouse(spark, str(lake_root)).read("quarantine.settlement_scenes").collect()
    assert sorted(r["stage"] for r in rows) == ["radiometry", "radiometry"]
    assert all("Level-1 DN given to a surface reflectance profile?" in r["reason"] for r in rows)


def test_polygon_labels_burn_the_pixels_whose_centre_they_contain(tmp_path):  # type: ignore[no-untyped-def]
    """Labels drawn as polygons in another CRS (EPSG:4326) land on the scene grid's pixels."""
    import geopandas as gpd
    from rasterio.windows import Window
    from shapely.geometry import box

    from jobs.remote_sensing.pixels import Grid
    from lib.config import LabelSpec

    grid = Grid("EPSG:32725", (30.0, 0.0, 280_000.0, 0.0, -30.0, 9_120_000.0), 40, 40)
    town = box(280_000 + 30 * 5, 9_120_000 - 30 * 15, 280_000 + 30 * 15, 9_120_000 - 30 * 5)  # cols 5-14, rows 5-14
    field = box(280_000 + 30 * 20, 9_120_000 - 30 * 30, 280_000 + 30 * 30, 9_120_000 - 30 * 20)
    gdf = gpd.GeoDataFrame({"landuse": ["Built", "crops"]}, geometry=[town, field], crs="EPSG:32725").to_crs(4326)
    path = tmp_path / "labels.geojson"
    gdf.to_file(path, driver="GeoJSON")
    spec = LabelSpec(path=str(path), date="2024-01-01", class_column="landuse")  # type: ignore[arg-type]
    labels = learn.label_window(spec, grid, Window(0, 0, 40, 40))
    assert int((labels == 1).sum()) == 100 and labels[5:15, 5:15].min() == 1
    assert int((labels == 0).sum()) == 100 and labels[20:30, 20:30].max() == 0
    assert int((labels == -1).sum()) == 40 * 40 - 200
    part = learn.label_window(spec, grid, Window(10, 10, 20, 20))  # a window cut through both polygons
    assert np.array_equal(part, labels[10:30, 10:30])
