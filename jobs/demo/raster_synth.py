"""Synthetic scenes with a known truth for the remote-sensing pipeline (seeded, deterministic).

- :func:`synthetic_scene` writes a Landsat-7-like 6-band uint8 GeoTIFF of any size
  (water, vegetation and built-up patches from smooth deterministic fields), block by
  block so memory does not grow with the size.
- :func:`plant_growth` derives a second date from a first one (the real Landsat-7
  scene or a synthetic one): inside planted disks, pixels that are not built-up get a
  built-up spectrum sampled from the scene's own clearly built-up pixels; everything
  else is copied unchanged. The truth (sites, planted pixels and km2) is returned and
  written beside the data.
- :func:`admin_areas` writes two levels of fictional admin polygons over a scene.

Writes files only (never tables).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.warp
from rasterio.windows import Window

# Digital numbers (B1, B2, B3, B4, B5, B7) of three covers, close to the Olinda/Recife scene.
SPECTRA = {
    "water": (70, 50, 35, 15, 10, 5),
    "vegetation": (60, 50, 40, 100, 70, 35),
    "built": (85, 75, 80, 62, 95, 75),
}
BLOCK_ROWS = 512


def _field(rows: np.ndarray, cols: np.ndarray, seed: int, scale: float) -> np.ndarray:
    """A smooth deterministic field in [-1, 1] from a few seeded sinusoids (no state across blocks)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    out = np.zeros(rr.shape)
    for _ in range(6):
        fx, fy = rng.uniform(0.3, 1.0, 2) / scale
        out += np.sin(fx * cc + fy * rr + rng.uniform(0, 2 * np.pi))
    return out / 6


def cover(rows: np.ndarray, cols: np.ndarray, seed: int) -> np.ndarray:
    """0 water, 1 vegetation, 2 built-up for the given pixel rows and columns."""
    water = _field(rows, cols, seed, 120.0) < -0.45
    built = _field(rows, cols, seed + 1, 40.0) > 0.2
    return np.where(water, 0, np.where(built, 2, 1)).astype(np.uint8)


def synthetic_scene(path: Path, width: int, height: int, seed: int, crs: str = "EPSG:31985",
                    origin: tuple[float, float] = (288776.25, 9120760.75), pixel: float = 28.5,
                    nodata_box: tuple[int, int, int, int] | None = None) -> Path:
    """A Landsat-7-like scene (6 bands, uint8, DN) written block by block.

    ``nodata_box`` (row, col, height, width) is filled with 0 and the file declares nodata 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spectra = np.array([SPECTRA["water"], SPECTRA["vegetation"], SPECTRA["built"]], dtype=np.float64)
    transform = rasterio.Affine(pixel, 0, origin[0], 0, -pixel, origin[1])
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=6, dtype="uint8", crs=crs,
                       transform=transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                       nodata=0 if nodata_box else None) as dst:
        for row0 in range(0, height, BLOCK_ROWS):
            h = min(BLOCK_ROWS, height - row0)
            rows, cols = np.arange(row0, row0 + h), np.arange(width)
            cls = cover(rows, cols, seed)
            rng = np.random.default_rng([seed, row0])
            data = spectra[cls].transpose(2, 0, 1) + rng.normal(0, 2.0, (6, h, width))
            block = np.clip(np.rint(data), 1, 255).astype(np.uint8)
            if nodata_box:
                r, c, bh, bw = nodata_box
                rows_in = (rows >= r) & (rows < r + bh)
                block[:, rows_in, c:c + bw] = 0
            dst.write(block, window=Window(0, row0, width, h))
    return path


def _built(data: np.ndarray, t: tuple[float, float, float], margin: float = 0.0) -> np.ndarray:
    b = data.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ndbi = (b[4] - b[3]) / (b[4] + b[3])
        ndvi = (b[3] - b[2]) / (b[3] + b[2])
        mndwi = (b[1] - b[4]) / (b[1] + b[4])
    return (ndbi > t[0] + margin) & (ndvi < t[1] - margin) & (mndwi < t[2] - margin)


def choose_sites(src_path: Path, n_sites: int, radius: int, seed: int,
                 thresholds: tuple[float, float, float]) -> list[tuple[int, int]]:
    """Disk centres (row, col) on land that is mostly not built-up, chosen on a decimated read."""
    with rasterio.open(src_path) as src:
        f = max(1, max(src.width, src.height) // 400)
        small = src.read(out_shape=(src.count, src.height // f, src.width // f))
        height, width = src.height, src.width
    built = _built(small, thresholds)
    b = small.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        water = (b[1] - b[4]) / (b[1] + b[4]) >= thresholds[2]
    rng = np.random.default_rng(seed)
    sites: list[tuple[int, int]] = []
    r_small = max(1, radius // f)
    for _ in range(20_000):
        if len(sites) == n_sites:
            break
        r, c = int(rng.integers(radius, height - radius)), int(rng.integers(radius, width - radius))
        rs, cs = r // f, c // f
        patch = (slice(max(0, rs - r_small), rs + r_small + 1), slice(max(0, cs - r_small), cs + r_small + 1))
        if built[patch].mean() > 0.2 or water[patch].mean() > 0.05 or (small[:, patch[0], patch[1]] == 0).any():
            continue
        if any((r - r2) ** 2 + (c - c2) ** 2 < (3 * radius) ** 2 for r2, c2 in sites):
            continue
        sites.append((r, c))
    if len(sites) < n_sites:
        raise ValueError(f"{src_path}: found only {len(sites)} of {n_sites} unbuilt land sites for planted growth")
    return sites


def plant_growth(src_path: Path, dst_path: Path, seed: int, thresholds: tuple[float, float, float],
                 n_sites: int = 3, radius: int = 12, dst_crs: str | None = None,
                 dst_pixel: float | None = None) -> dict[str, Any]:
    """Second date = first date + built-up disks. Returns the truth (on the first date's grid).

    With ``dst_crs`` / ``dst_pixel`` the second date is then warped to another CRS or
    resolution (nearest neighbour), so the pipeline has to align the dates.
    """
    sites = choose_sites(src_path, n_sites, radius, seed, thresholds)
    rng = np.random.default_rng(seed + 7)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    planted = 0
    per_site: list[dict[str, int]] = []
    with rasterio.open(src_path) as src:
        profile = src.profile.copy()
        # Built-up spectra sampled from clearly built-up pixels of the scene itself.
        sample = src.read(window=Window(0, 0, min(src.width, 1024), min(src.height, 1024)))
        donors = sample.reshape(src.count, -1)[:, _built(sample, thresholds, margin=0.05).ravel()]
        if donors.shape[1] < 10:
            raise ValueError(f"{src_path}: too few clearly built-up pixels to sample a spectrum from")
        target = dst_path if dst_crs is None and dst_pixel is None else dst_path.with_suffix(".grid.tif")
        profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
        with rasterio.open(target, "w", **profile) as dst:
            for row0 in range(0, src.height, BLOCK_ROWS):
                win = Window(0, row0, src.width, min(BLOCK_ROWS, src.height - row0))
                data = src.read(window=win)
                rr, cc = np.meshgrid(np.arange(row0, row0 + win.height), np.arange(src.width), indexing="ij")
                before = _built(data, thresholds)
                if src.nodata is not None:
                    before |= (data == src.nodata).any(axis=0)  # nodata stays nodata: never planted
                for i, (r, c) in enumerate(sites):
                    disk = (rr - r) ** 2 + (cc - c) ** 2 <= radius ** 2
                    new = disk & ~before
                    picks = donors[:, rng.integers(0, donors.shape[1], int(new.sum()))]
                    data[:, new] = picks
                    n = int(new.sum())
                    planted += n
                    if len(per_site) <= i:
                        per_site.append({"row": r, "col": c, "radius_px": radius, "planted_pixels": 0})
                    per_site[i]["planted_pixels"] += n
                dst.write(data, window=win)
        pixel_km2 = abs(src.transform.a * src.transform.e) / 1e6
    if target != dst_path:
        warp(target, dst_path, dst_crs or profile["crs"], dst_pixel)
        target.unlink()
    truth = {"sites": per_site, "planted_pixels": planted, "pixel_km2": pixel_km2,
             "planted_km2": planted * pixel_km2, "thresholds": list(thresholds),
             "first_date_grid": str(src_path), "second_date": str(dst_path)}
    dst_path.with_suffix(".truth.json").write_text(json.dumps(truth, indent=2))
    return truth


def warp(src_path: Path, dst_path: Path, dst_crs: Any, dst_pixel: float | None) -> None:
    """Reproject a scene to another CRS and/or pixel size (nearest neighbour, nodata 0 outside)."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(src_path) as src:
        kwargs = {"resolution": dst_pixel} if dst_pixel else {}
        transform, width, height = calculate_default_transform(src.crs, dst_crs, src.width, src.height,
                                                               *src.bounds, **kwargs)
        profile = src.profile.copy()
        profile.update(crs=dst_crs, transform=transform, width=width, height=height, nodata=0)
        with rasterio.open(dst_path, "w", **profile) as dst:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.nearest,
                          dst_nodata=0)


def admin_areas(scene: Path, folder: Path, prefix: str = "RS") -> dict[str, str]:
    """Two fictional admin levels over the scene: 2 x 1 level-1 areas, each split 2 x 2 (EPSG:4326)."""
    import geopandas as gpd
    from shapely.geometry import box

    with rasterio.open(scene) as src:
        left, bottom, right, top = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    pad = 0.001
    left, bottom, right, top = left - pad, bottom - pad, right + pad, top + pad
    mid = (left + right) / 2
    l1, l2 = [], []
    for i, (x0, x1) in enumerate(((left, mid), (mid, right))):
        a1 = f"{prefix}{i + 1}"
        l1.append({"admin1": a1, "geometry": box(x0, bottom, x1, top)})
        xm, ym = (x0 + x1) / 2, (bottom + top) / 2
        for j, (bx0, by0, bx1, by1) in enumerate(((x0, ym, xm, top), (xm, ym, x1, top),
                                                   (x0, bottom, xm, ym), (xm, bottom, x1, ym))):
            l2.append({"admin2": f"{a1}-{j + 1}", "admin1": a1, "geometry": box(bx0, by0, bx1, by1)})
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for level, rows in (("admin1", l1), ("admin2", l2)):
        path = folder / f"{level}.geojson"
        gpd.GeoDataFrame(rows, crs=4326).to_file(path, driver="GeoJSON")
        out[level] = str(path)
    return out


# A town of mixed roofs and trees (rough texture, NDBI just below the index rule's threshold) and smooth bare
# fields (NDBI well above it): the fixed index rule misses the first and takes the second for settlement.
TOWN_SPECTRA = {
    "roof": (95, 88, 92, 75, 80, 65),
    "tree": (55, 50, 42, 85, 60, 30),
    "bare": (90, 85, 95, 80, 110, 90),
}


def town_scene(path: Path, size: int, seed: int, crs: str = "EPSG:31985",
               origin: tuple[float, float] = (288776.25, 9120760.75), pixel: float = 28.5) -> np.ndarray:
    """A Landsat-7-like 6-band uint8 scene with water, vegetation, bare fields and mixed-texture towns.
    Returns the truth (1 town = built-up, 0 not) on the scene grid."""
    rows, cols = np.arange(size), np.arange(size)
    water = _field(rows, cols, seed, 90.0) < -0.5
    town = (_field(rows, cols, seed + 1, 30.0) > 0.3) & ~water
    bare = (_field(rows, cols, seed + 2, 30.0) > 0.35) & ~water & ~town
    rng = np.random.default_rng(seed)
    roof = rng.random((size, size)) < 0.6
    spectra = np.zeros((6, size, size))
    spectra[:] = np.array(SPECTRA["vegetation"], dtype=np.float64)[:, None, None]
    for mask, name in ((water, "water"), (bare, "bare"), (town & roof, "roof"), (town & ~roof, "tree")):
        values = TOWN_SPECTRA.get(name) or SPECTRA[name]
        spectra[:, mask] = np.array(values, dtype=np.float64)[:, None]
    data = np.clip(np.rint(spectra + rng.normal(0, 2.0, spectra.shape)), 1, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=6, dtype="uint8", crs=crs,
                       transform=rasterio.Affine(pixel, 0, origin[0], 0, -pixel, origin[1])) as dst:
        dst.write(data)
    return town.astype(np.uint8)


def label_raster(path: Path, like: Path, labels: np.ndarray, keep: np.ndarray) -> Path:
    """A uint8 label raster on ``like``'s grid: ``labels`` where ``keep``, else nodata 255."""
    with rasterio.open(like) as src:
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "dtype": "uint8",
                   "crs": src.crs, "transform": src.transform, "nodata": 255}
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.where(keep, labels, 255).astype(np.uint8), 1)
    return path


def demo_labels(first: Path, after: Path, truth: dict[str, Any], folder: Path,
                thresholds: tuple[float, float, float]) -> tuple[dict[str, Any], str]:
    """Labels for the demo's learned classifier and its accuracy, split by a column between the planted sites
    (half of them on each side): training labels on the left only, the accuracy reference on the right only.

    - ``reference_layer``: a WSF-like built-up layer of the first date (255 built-up, 0 not, nodata between)
      from the index rule with a margin, as an external layer would be used for an earlier year;
    - ``planted``: the planted growth (1 new built-up) - built-up at the second date, not at the first;
    - the reference (returned separately): new built-up right of the split, every pixel labelled (1 planted,
      0 not), pixels the training never saw.
    Also records ``split_col`` and ``held_back_km2`` (planted km2 right of the split) in ``truth``.
    """
    cols_sorted = sorted(s["col"] for s in truth["sites"])
    half = len(cols_sorted) // 2
    split = (cols_sorted[half - 1] + cols_sorted[half]) // 2
    with rasterio.open(first) as a, rasterio.open(after) as b:
        before, later = a.read(), b.read()
        planted = (before != later).any(axis=0)
        profile = {"driver": "GTiff", "width": a.width, "height": a.height, "count": 1, "dtype": "uint8",
                   "crs": a.crs, "transform": a.transform}
    cols = np.arange(planted.shape[1])[None, :].repeat(planted.shape[0], 0)
    left = cols < split
    sure_built = _built(before, thresholds, margin=0.05)
    sure_not = ~_built(before, (thresholds[0] - 0.05, thresholds[1] + 0.05, thresholds[2] + 0.05))
    layer = np.full(planted.shape, 128, dtype=np.uint8)
    layer[sure_not] = 0
    layer[sure_built] = 255
    layer[~left] = 128
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"reference_layer": folder / "wsf_like_20240101_left.tif", "planted": folder / "planted_left.tif",
             "reference": folder / "planted_right_reference.tif"}
    with rasterio.open(paths["reference_layer"], "w", **profile, nodata=128) as dst:
        dst.write(layer, 1)
    with rasterio.open(paths["planted"], "w", **profile, nodata=255) as dst:
        dst.write(np.where(left & planted, 1, 255).astype(np.uint8), 1)
    with rasterio.open(paths["reference"], "w", **profile, nodata=255) as dst:
        dst.write(np.where(~left, planted.astype(np.uint8), 255).astype(np.uint8), 1)
    truth["split_col"] = int(split)
    truth["held_back_km2"] = float((planted & ~left).sum() * truth["pixel_km2"])
    return {"reference_layer": str(paths["reference_layer"]), "planted": str(paths["planted"]),
            "split_col": int(split)}, str(paths["reference"])
