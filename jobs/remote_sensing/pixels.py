"""Per-window pixel work: read two dates onto one grid, built-up masks, change classes, per-unit sums.

Everything here runs inside one Spark task on one window (or in a plain loop); it
opens the GeoTIFFs itself, so pixel arrays never pass through the driver. The
arrays of one call are bounded by the window size, not by the scene size.

- :func:`read_role` reads one band role of a scene onto the pair's grid (the first
  date's grid), reprojecting and resampling when CRS, resolution or extent differ,
  and returns a mask of pixels that are nodata, outside the scene or masked as cloud.
- :func:`builtup` applies the sensor's rule (NDBI high, NDVI and MNDWI low) or an
  external built-up layer's threshold.
- :func:`change_classes` combines two dates into 0 invalid, 1 never built,
  2 stable built, 3 new built, 4 lost built.
- :func:`unit_sums` sums pixel counts and areas per H3 cell / admin area.

Reads GeoTIFFs; writes no tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

INVALID, NEVER, STABLE, NEW, LOST = 0, 1, 2, 3, 4
CLASS_NAMES = {INVALID: "invalid", NEVER: "not built", STABLE: "stable built-up", NEW: "new built-up",
               LOST: "lost built-up"}
SUM_COLUMNS = ("n_pixels", "n_pixels_valid", "n_new", "n_lost", "n_stable",
               "km2_valid", "km2_new", "km2_lost", "km2_stable")
EARTH_RADIUS_KM = 6371.0088


class SceneReadError(RuntimeError):
    """A scene band that cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS (WKT), affine transform (6 numbers, GDAL order a, b, c, d, e, f), size."""

    crs_wkt: str
    transform: tuple[float, ...]
    width: int
    height: int

    def affine(self) -> rasterio.Affine:
        return rasterio.Affine(*self.transform[:6])


@dataclass(frozen=True)
class Scene:
    """A catalogued scene: where each band role lives (file, 1-based band index) and how to scale it."""

    scene_id: str
    area: str
    date: str
    sensor: str
    path: str
    files: dict[str, tuple[str, int]]
    grid: Grid
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    mask_role: str | None = None
    mask_kind: str = "bits"
    mask_values: tuple[int, ...] = ()
    thresholds: tuple[float, float, float] = (0.0, 0.3, 0.0)  # ndbi_min, ndvi_max, mndwi_max
    builtup_min: float | None = None
    level: str = "sr"  # radiometric level of the scaled values: sr, toa, dn, layer
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)  # role -> (scale, offset) from MTL
    notes: tuple[str, ...] = ()  # how the bands were found, calibration used, radiometry warnings
    classifier: str = "index"  # "index" or the folder of a learned model (jobs/remote_sensing/learn.py)
    extra: dict[str, Any] = field(default_factory=dict)

    def scaling(self, role: str) -> tuple[float, float]:
        """(scale, offset) turning the role's stored values into the profile's level."""
        return self.calibration.get(role, (self.scale, self.offset))


def scene_to_json(scene: Scene) -> str:
    import json
    from dataclasses import asdict

    return json.dumps(asdict(scene))


def scene_from_json(text: str) -> Scene:
    import json

    d = json.loads(text)
    d["grid"] = Grid(**{**d["grid"], "transform": tuple(d["grid"]["transform"])})
    d["files"] = {k: tuple(v) for k, v in d["files"].items()}
    d["calibration"] = {k: tuple(v) for k, v in d.get("calibration", {}).items()}
    for key in ("thresholds", "mask_values", "notes"):
        d[key] = tuple(d.get(key, ()))
    return Scene(**d)


def _same_grid(src: rasterio.io.DatasetReader, grid: Grid) -> bool:
    return (src.width == grid.width and src.height == grid.height
            and src.transform.almost_equals(grid.affine(), precision=1e-9)
            and src.crs is not None and src.crs == rasterio.crs.CRS.from_wkt(grid.crs_wkt))


def read_role(scene: Scene, role: str, grid: Grid, window: Window,
              resampling: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, invalid mask) of one band role over ``window`` of ``grid``."""
    path, index = scene.files[role]
    method = Resampling[resampling] if role != scene.mask_role else Resampling.nearest
    try:
        with rasterio.open(path) as src:
            if index > src.count:
                raise SceneReadError(f"{path}: band {index} for role '{role}' but the file has {src.count} bands")
            nodata = src.nodata if src.nodata is not None else scene.nodata
            if _same_grid(src, grid):
                values = src.read(index, window=window)
                invalid = np.zeros(values.shape, dtype=bool)
            else:
                with WarpedVRT(src, crs=rasterio.crs.CRS.from_wkt(grid.crs_wkt), transform=grid.affine(),
                               width=grid.width, height=grid.height, resampling=method,
                               src_nodata=nodata, add_alpha=True) as vrt:
                    values = vrt.read(index, window=window)
                    invalid = vrt.read(vrt.count, window=window) == 0  # alpha: outside the scene or nodata
    except SceneReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - GDAL raises several types for corrupt files
        raise SceneReadError(f"{path}: cannot read band {index} ({role}) window {window}: {exc}") from None
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        invalid |= values == nodata
    values = values.astype(np.float64)
    invalid |= ~np.isfinite(values)
    return values, invalid


def quality_mask(qa: np.ndarray, kind: str, values: tuple[int, ...]) -> np.ndarray:
    """True where the quality band flags a pixel (any listed bit set, or a listed class)."""
    q = qa.astype(np.int64)
    if kind == "bits":
        bits = 0
        for b in values:
            bits |= 1 << int(b)
        return (q & bits) != 0
    return np.isin(q, np.asarray(values, dtype=np.int64))


def _normalised(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a - b) / (a + b)


def reflectance(scene: Scene, grid: Grid, window: Window, roles: tuple[str, ...],
                resampling: str = "bilinear") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scaled values of ``roles`` over the window, and the pixels invalid in any of them or masked by QA."""
    bands: dict[str, np.ndarray] = {}
    invalid = np.zeros((int(window.height), int(window.width)), dtype=bool)
    for role in roles:
        values, bad = read_role(scene, role, grid, window, resampling)
        scale, offset = scene.scaling(role)
        bands[role] = values * scale + offset
        invalid |= bad
    if scene.mask_role and scene.mask_role in scene.files:
        qa, bad = read_role(scene, scene.mask_role, grid, window, "nearest")
        invalid |= bad | quality_mask(qa, scene.mask_kind, scene.mask_values)
    return bands, invalid


def builtup(scene: Scene, grid: Grid, window: Window, resampling: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """(built-up, valid) boolean arrays of one scene over the window of the grid."""
    if scene.builtup_min is not None:
        layer, invalid = read_role(scene, "builtup", grid, window, resampling)
        return (layer >= scene.builtup_min) & ~invalid, ~invalid
    if scene.classifier != "index":
        from jobs.remote_sensing import learn

        return learn.predict_window(scene, grid, window, resampling)
    bands, invalid = reflectance(scene, grid, window, ("green", "red", "nir", "swir1"), resampling)
    ndbi = _normalised(bands["swir1"], bands["nir"])
    ndvi = _normalised(bands["nir"], bands["red"])
    mndwi = _normalised(bands["green"], bands["swir1"])
    ndbi_min, ndvi_max, mndwi_max = scene.thresholds
    built = (ndbi > ndbi_min) & (ndvi < ndvi_max) & (mndwi < mndwi_max) & ~invalid
    return built, ~invalid


def change_classes(built0: np.ndarray, valid0: np.ndarray, built1: np.ndarray, valid1: np.ndarray) -> np.ndarray:
    """uint8 classes: 0 invalid at either date, 1 never built, 2 stable, 3 new, 4 lost."""
    out = np.full(built0.shape, NEVER, dtype=np.uint8)
    out[built0 & built1] = STABLE
    out[~built0 & built1] = NEW
    out[built0 & ~built1] = LOST
    out[~(valid0 & valid1)] = INVALID
    return out


@lru_cache(maxsize=16)
def _to_lonlat(crs_wkt: str):  # type: ignore[no-untyped-def]
    from pyproj import CRS, Transformer

    return Transformer.from_crs(CRS.from_wkt(crs_wkt), CRS.from_epsg(4326), always_xy=True)


def pixel_centres(grid: Grid, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (EPSG:4326) of every pixel centre of the window, as 2-D arrays."""
    a, b, c, d, e, f = grid.transform[:6]
    rows = np.arange(int(window.row_off), int(window.row_off + window.height)) + 0.5
    cols = np.arange(int(window.col_off), int(window.col_off + window.width)) + 0.5
    cc, rr = np.meshgrid(cols, rows)
    x = a * cc + b * rr + c
    y = d * cc + e * rr + f
    lon, lat = _to_lonlat(grid.crs_wkt).transform(x, y)
    return np.asarray(lon), np.asarray(lat)


def pixel_area_km2(grid: Grid, window: Window, lat: np.ndarray) -> np.ndarray:
    """Area of each pixel in km2: from the pixel size in a projected CRS (metres or other linear
    units), or on the sphere from the latitude band of each row in a geographic CRS."""
    from pyproj import CRS

    crs = CRS.from_wkt(grid.crs_wkt)
    a, b, _, d, e, _ = grid.transform[:6]
    if crs.is_geographic:
        half = abs(e) / 2
        lat_r1, lat_r2 = np.radians(lat + half), np.radians(lat - half)
        return (EARTH_RADIUS_KM ** 2) * np.radians(abs(a)) * np.abs(np.sin(lat_r1) - np.sin(lat_r2))
    unit = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return np.full(lat.shape, abs(a * e - b * d) * unit * unit / 1e6)


def h3_index(lon: np.ndarray, lat: np.ndarray, resolution: int) -> np.ndarray:
    """H3 cell (as uint64) of each pixel centre."""
    import h3.api.numpy_int as h3i

    flat = [h3i.latlng_to_cell(la, lo, resolution) for la, lo in zip(lat.ravel().tolist(), lon.ravel().tolist(),
                                                                       strict=True)]
    return np.asarray(flat, dtype=np.uint64).reshape(lat.shape)


def unit_sums(keys: np.ndarray, classes: np.ndarray, area_km2: np.ndarray) -> dict[str, np.ndarray]:
    """Per distinct key: pixel counts and areas by class (only pixels with a key >= 0 for int keys)."""
    uniq, inverse = np.unique(keys.ravel(), return_inverse=True)
    cls = classes.ravel()
    area = area_km2.ravel()
    n = len(uniq)

    def count(sel: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=sel.astype(np.float64), minlength=n).round().astype(np.int64)

    def km2(sel: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=np.where(sel, area, 0.0), minlength=n)

    valid = cls != INVALID
    return {
        "key": uniq,
        "n_pixels": np.bincount(inverse, minlength=n).astype(np.int64),
        "n_pixels_valid": count(valid),
        "n_new": count(cls == NEW), "n_lost": count(cls == LOST), "n_stable": count(cls == STABLE),
        "km2_valid": km2(valid), "km2_new": km2(cls == NEW), "km2_lost": km2(cls == LOST),
        "km2_stable": km2(cls == STABLE),
    }


def windows(grid: Grid, size: int) -> list[Window]:
    """A fixed grid of windows covering the grid exactly once (edge windows are smaller)."""
    return [Window(col, row, min(size, grid.width - col), min(size, grid.height - row))
            for row in range(0, grid.height, size) for col in range(0, grid.width, size)]


def admin_index(lon: np.ndarray, lat: np.ndarray, geoms: list[Any]) -> np.ndarray:
    """Index into ``geoms`` (EPSG:4326 polygons) of the polygon containing each pixel centre; -1 outside all."""
    import shapely
    from shapely.strtree import STRtree

    out = np.full(lon.size, -1, dtype=np.int64)
    if not geoms:
        return out.reshape(lon.shape)
    points = shapely.points(lon.ravel(), lat.ravel())
    point_idx, poly_idx = STRtree(geoms).query(points, predicate="within")
    order = np.lexsort((poly_idx, point_idx))  # the first polygon wins where polygons overlap
    point_idx, poly_idx = point_idx[order], poly_idx[order]
    first = np.r_[True, point_idx[1:] != point_idx[:-1]]
    out[point_idx[first]] = poly_idx[first]
    return out.reshape(lon.shape)


@lru_cache(maxsize=16)
def _from_lonlat(crs_wkt: str):  # type: ignore[no-untyped-def]
    from pyproj import CRS, Transformer

    return Transformer.from_crs(CRS.from_epsg(4326), CRS.from_wkt(crs_wkt), always_xy=True)


def h3_index_fast(grid: Grid, window: Window, lon: np.ndarray, lat: np.ndarray, resolution: int,
                  step: int = 8, eps_px: float = 1e-3) -> np.ndarray:
    """The same result as :func:`h3_index` (the cell containing each pixel centre), computed per cell
    rather than per pixel: candidate cells come from a coarse lattice of pixels (and their neighbours);
    each cell's boundary is projected into pixel space, shrunk by ``eps_px`` and tested against the
    pixel centres in its bounding box (vectorised). Pixels no shrunk polygon claims (within ``eps_px``
    of an edge, where straight pixel-space edges and H3's edges could disagree, or missed by the lattice)
    get the exact per-pixel lookup. ``eps_px`` is far above the sub-micrometre gap between the two edges.
    """
    import h3.api.numpy_int as h3i
    import shapely

    h, w = lat.shape
    lattice = {h3i.latlng_to_cell(la, lo, resolution)
               for la, lo in zip(lat[::step, ::step].ravel().tolist(), lon[::step, ::step].ravel().tolist(),
                                 strict=True)}
    candidates = set()
    for cell in lattice:
        candidates.update(h3i.grid_disk(cell, 1).tolist())
    out = np.zeros((h, w), dtype=np.uint64)
    claimed = np.zeros((h, w), dtype=bool)
    inverse = ~grid.affine()
    to_grid = _from_lonlat(grid.crs_wkt)
    r0, c0 = int(window.row_off), int(window.col_off)
    for cell in candidates:
        ring = np.asarray(h3i.cell_to_boundary(cell))  # (lat, lng) pairs
        gx, gy = to_grid.transform(ring[:, 1], ring[:, 0])
        gx, gy = np.asarray(gx), np.asarray(gy)  # column, row in grid pixel space:
        px = inverse.a * gx + inverse.b * gy + inverse.c - c0
        py = inverse.d * gx + inverse.e * gy + inverse.f - r0
        cmin, cmax = max(0, int(np.floor(px.min() - 0.5))), min(w, int(np.ceil(px.max() + 0.5)))
        rmin, rmax = max(0, int(np.floor(py.min() - 0.5))), min(h, int(np.ceil(py.max() + 0.5)))
        if cmin >= cmax or rmin >= rmax:
            continue
        shrunk = shapely.Polygon(np.column_stack([px, py])).buffer(-eps_px)
        cc, rr = np.meshgrid(np.arange(cmin, cmax) + 0.5, np.arange(rmin, rmax) + 0.5)
        inside = shapely.contains_xy(shrunk, cc, rr)
        sub_out = out[rmin:rmax, cmin:cmax]
        sub_claimed = claimed[rmin:rmax, cmin:cmax]
        sub_out[inside] = cell
        sub_claimed |= inside
    rest = np.flatnonzero(~claimed.ravel())
    if len(rest):
        flat = out.ravel()
        flat[rest] = [h3i.latlng_to_cell(la, lo, resolution)
                      for la, lo in zip(lat.ravel()[rest].tolist(), lon.ravel()[rest].tolist(), strict=True)]
        out = flat.reshape(h, w)
    return out
