"""Learned built-up: per-pixel features, labels on a scene grid, the model file and its use.

Features of a pixel: its six reflectance bands (swir2 missing -> NaN), NDVI, NDBI, MNDWI and
simple texture (the 5 x 5 standard deviation of NIR and SWIR1, the 5 x 5 mean of NDBI), so a
town with a slightly negative NDBI but a rough texture can be told from a smooth field.
Windows are read with a 2-pixel halo so texture has no seams at window edges.

Labels (:class:`lib.config.LabelSpec`) are a raster (any grid: nearest neighbour onto the scene's)
or vector polygons / points, read onto one window as -1 unlabelled, 0 not built-up, 1 built-up.

A model is a folder: ``model.txt`` (LightGBM's text format: no code is loaded from it) and
``model.json`` (features, level, sensors, the SHA-256 of ``model.txt`` and of every scene band
file and label file it was trained on, sample sizes, parameters, held-out scores). Loading checks
the hash first; a scene whose level or bands do not match the model is refused.

Reads GeoTIFFs and label files; writes no tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from jobs.remote_sensing import pixels
from jobs.remote_sensing.pixels import Grid, Scene
from lib.config import LabelSpec
from lib.publish import sha256_file
from lib.runtime import JobFailed

FEATURES = ("blue", "green", "red", "nir", "swir1", "swir2", "ndvi", "ndbi", "mndwi",
            "nir_std5", "swir1_std5", "ndbi_mean5")
REQUIRED_ROLES = ("blue", "green", "red", "nir", "swir1")
HALO = 2
VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".csv")


class ModelError(JobFailed):
    """A model folder that is missing, altered or does not fit the scenes; the message says which."""


# ----------------------------------------------------------------------------- features


def _local_stats(x: np.ndarray, ok: np.ndarray, size: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over a size x size neighbourhood, of valid pixels only."""
    from scipy.ndimage import uniform_filter

    w = ok.astype(np.float64)
    xv = np.where(ok, x, 0.0)
    n = uniform_filter(w, size, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = uniform_filter(xv, size, mode="nearest") / n
        sq = uniform_filter(xv * xv, size, mode="nearest") / n
        std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    return mean, std


def feature_window(scene: Scene, grid: Grid, window: Window, resampling: str = "bilinear"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(features (height, width, len(FEATURES)) as float32, valid mask (height, width)) of one window."""
    r0, c0 = int(window.row_off), int(window.col_off)
    pr0, pc0 = max(0, r0 - HALO), max(0, c0 - HALO)
    pr1 = min(grid.height, r0 + int(window.height) + HALO)
    pc1 = min(grid.width, c0 + int(window.width) + HALO)
    padded = Window(pc0, pr0, pc1 - pc0, pr1 - pr0)
    roles = tuple(r for r in ("blue", "green", "red", "nir", "swir1", "swir2") if r in scene.files)
    bands, invalid = pixels.reflectance(scene, grid, padded, roles, resampling)
    nan = np.full(invalid.shape, np.nan)
    b = {r: bands.get(r, nan) for r in ("blue", "green", "red", "nir", "swir1", "swir2")}
    norm = pixels._normalised
    ndvi, ndbi, mndwi = norm(b["nir"], b["red"]), norm(b["swir1"], b["nir"]), norm(b["green"], b["swir1"])
    ok = ~invalid
    _, nir_std = _local_stats(b["nir"], ok)
    _, swir_std = _local_stats(b["swir1"], ok)
    ndbi_mean, _ = _local_stats(np.nan_to_num(ndbi), ok & np.isfinite(ndbi))
    stack = np.stack([b["blue"], b["green"], b["red"], b["nir"], b["swir1"], b["swir2"], ndvi, ndbi, mndwi,
                      nir_std, swir_std, ndbi_mean], axis=-1)
    crop = (slice(r0 - pr0, r0 - pr0 + int(window.height)), slice(c0 - pc0, c0 - pc0 + int(window.width)))
    return stack[crop].astype(np.float32), ok[crop]


# ----------------------------------------------------------------------------- labels


@lru_cache(maxsize=8)
def _vector(path: str, crs_wkt: str, mtime_ns: int) -> Any:  # mtime: a file edited in place is read again
    import geopandas as gpd
    import pandas as pd

    p = Path(path)
    if p.suffix.lower() == ".csv":
        df = pd.read_csv(p)
        missing = [c for c in ("lon", "lat") if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: label points need columns lon and lat (missing {missing})")
        gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df["lon"], df["lat"]), crs=4326)
    else:
        gdf = gpd.read_file(p)
    if gdf.crs is None:
        raise ValueError(f"{path}: the label file has no CRS")
    return gdf.to_crs(crs_wkt)


def _classes_of(values: np.ndarray, spec: LabelSpec) -> np.ndarray:
    out = np.full(values.shape, -1, dtype=np.int8)
    built = (values >= spec.builtup_min) if spec.builtup_min is not None else np.isin(values, spec.builtup_values)
    other = np.isin(values, spec.other_values) if spec.other_values else ~built
    out[other] = 0
    out[built] = 1
    return out


def label_window(spec: LabelSpec, grid: Grid, window: Window) -> np.ndarray:
    """-1 unlabelled, 0 not built-up, 1 built-up for every pixel of the window of ``grid``."""
    import rasterio
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import transform as window_transform

    path = str(spec.path)
    shape = (int(window.height), int(window.width))
    if Path(path).suffix.lower() in VECTOR_SUFFIXES:
        from rasterio.features import rasterize
        from shapely.geometry import box

        gdf = _vector(path, grid.crs_wkt, Path(path).stat().st_mtime_ns)
        transform = window_transform(window, grid.affine())
        left, top = transform @ (0, 0)
        right, bottom = transform @ (shape[1], shape[0])
        sub = gdf[gdf.intersects(box(min(left, right), min(top, bottom), max(left, right), max(top, bottom)))]
        if spec.class_column not in gdf.columns:
            raise ValueError(f"{path}: no column '{spec.class_column}' (columns {list(gdf.columns)})")
        if sub.empty:
            return np.full(shape, -1, dtype=np.int8)
        wanted = {c.lower() for c in spec.builtup_classes}
        cls = [1 if str(v).strip().lower() in wanted else 0 for v in sub[spec.class_column]]
        burned = rasterize(zip(sub.geometry, cls, strict=True), out_shape=shape, transform=transform, fill=255,
                           dtype="uint8")
        return np.where(burned == 255, -1, burned).astype(np.int8)
    with rasterio.open(path) as src:
        if src.crs is None:
            raise ValueError(f"{path}: the label raster has no CRS")
        with WarpedVRT(src, crs=rasterio.crs.CRS.from_wkt(grid.crs_wkt), transform=grid.affine(),
                       width=grid.width, height=grid.height, resampling=rasterio.enums.Resampling.nearest,
                       add_alpha=True) as vrt:
            values = vrt.read(1, window=window).astype(np.float64)
            outside = vrt.read(vrt.count, window=window) == 0
        nodata = src.nodata
    out = _classes_of(values, spec)
    out[outside] = -1
    if nodata is not None:
        out[values == nodata] = -1
    return out


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelMeta:
    folder: Path
    model_id: str
    level: str
    sensors: tuple[str, ...]
    roles: tuple[str, ...]
    threshold: float
    meta: dict[str, Any]


def load_meta(folder: str | Path) -> ModelMeta:
    """The model's description, after checking ``model.txt`` against the hash recorded beside it."""
    f = Path(folder)
    txt, js = f / "model.txt", f / "model.json"
    if not txt.is_file() or not js.is_file():
        raise ModelError(f"{f}: not a built-up model folder (needs model.txt and model.json from "
                         "remote_sensing.train)")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
        want = meta["model_sha256"]
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{js}: unreadable model description: {exc}") from None
    got = sha256_file(txt)
    if got != want:
        raise ModelError(f"{txt}: SHA-256 {got[:16]}... does not match model.json ({want[:16]}...): the model "
                         "file was altered or replaced; retrain it")
    if list(meta.get("features", [])) != list(FEATURES):
        raise ModelError(f"{js}: the model uses features {meta.get('features')}, this version computes {FEATURES}")
    return ModelMeta(f, meta["model_id"], meta["level"], tuple(meta["sensors"]), tuple(meta["roles"]),
                     float(meta["threshold"]), meta)


def check_compatible(model: ModelMeta, scene: Scene) -> None:
    if scene.builtup_min is not None:
        raise ModelError(f"scene {scene.path} is a built-up layer ({scene.sensor}); a learned model reads bands")
    if scene.level != model.level:
        raise ModelError(f"model {model.model_id} was trained on {model.level} values, scene {scene.path} "
                         f"({scene.sensor}) has {scene.level}: retrain on scenes of that level")
    if scene.level == "dn" and scene.sensor not in model.sensors:
        raise ModelError(f"model {model.model_id} was trained on digital numbers of {list(model.sensors)}; "
                         f"scene {scene.path} is {scene.sensor} (digital numbers differ between sensors)")
    missing = [r for r in model.roles if r not in scene.files]
    if missing:
        raise ModelError(f"scene {scene.path} lacks band roles {missing} that model {model.model_id} uses")


@lru_cache(maxsize=4)
def _booster(folder: str, mtime_ns: int) -> tuple[Any, float]:  # mtime: a replaced model is checked again
    import lightgbm as lgb

    meta = load_meta(folder)
    return lgb.Booster(model_file=str(Path(folder) / "model.txt")), meta.threshold


def predict_window(scene: Scene, grid: Grid, window: Window, resampling: str = "bilinear"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(built-up, valid) of one window by the scene's learned model."""
    booster, threshold = _booster(scene.classifier, (Path(scene.classifier) / "model.txt").stat().st_mtime_ns)
    x, valid = feature_window(scene, grid, window, resampling)
    built = np.zeros(valid.shape, dtype=bool)
    if valid.any():
        prob = booster.predict(x[valid].astype(np.float64), num_threads=1)
        built[valid] = prob >= threshold
    return built, valid


def train_booster(x: np.ndarray, y: np.ndarray, trees: int, leaves: int, learning_rate: float, seed: int) -> Any:
    """A deterministic LightGBM binary classifier (one thread, fixed seed, class-balanced)."""
    import lightgbm as lgb

    params = {"objective": "binary", "num_leaves": leaves, "learning_rate": learning_rate, "seed": seed,
              "deterministic": True, "force_row_wise": True, "num_threads": 1, "verbose": -1,
              "is_unbalance": True, "min_data_in_leaf": 20, "feature_fraction": 0.9,
              "bagging_fraction": 0.8, "bagging_freq": 1}
    data = lgb.Dataset(x, label=y, feature_name=list(FEATURES), free_raw_data=True)
    return lgb.train(params, data, num_boost_round=trees)


def binary_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    tp = int(((y_true == 1) & (y_pred == 1)).sum())
    fp = int(((y_true == 0) & (y_pred == 1)).sum())
    fn = int(((y_true == 1) & (y_pred == 0)).sum())
    tn = int(((y_true == 0) & (y_pred == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / max(1, tp + fp + fn + tn)}
