"""Release preparation for settlement layers: coarsen H3 cells in sensitive zones before the guard.

Settlement layers can show where displaced or otherwise vulnerable people live. In
zones marked sensitive (``remote_sensing.sensitive_zones_path``: polygons, any CRS),
nothing finer than the policy's ``min_h3_resolution_sensitive`` is published: every
cell whose parent at that resolution has any child cell centre inside a zone is
merged into that parent (counts and km2 summed, percentages recomputed), so a parent
and its children are never published side by side.

Registered under the owner name ``remote_sensing`` when this module is imported (jobs/release.py does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import h3
import numpy as np
import pandas as pd

from lib.config import Config
from lib.privacy.hooks import ReleaseHooks, register
from lib.privacy.policy import ReleaseType

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from lib.tables import Lakehouse

INPUTS = ["n_pixels"]  # needed to recompute valid_fraction after merging


def load_zones(zones_path: str) -> Any:
    """The sensitive zones (polygons, any CRS) as one shapely geometry in EPSG:4326."""
    import geopandas as gpd

    return gpd.read_file(Path(zones_path)).to_crs(4326).union_all()


def sensitive_parents(cells: pd.Series, zones_path: str, resolution: int) -> set[str]:
    """Parents at ``resolution`` of the cells whose centre lies in a sensitive zone."""
    import shapely

    zones = load_zones(zones_path)
    uniq = cells.dropna().unique()
    centres = [h3.cell_to_latlng(c) for c in uniq]
    inside = shapely.contains_xy(zones, [c[1] for c in centres], [c[0] for c in centres])
    return {h3.cell_to_parent(c, resolution) if h3.get_resolution(c) > resolution else c
            for c, hit in zip(uniq, inside, strict=True) if hit}


def prepare(cfg: Config, rt: ReleaseType, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    res = rt.min_h3_resolution_sensitive
    zones = cfg.remote_sensing.sensitive_zones_path
    if res is None or not zones or "h3_index" not in rt.cells:
        return frame.drop(columns=[c for c in INPUTS if c not in rt.measures and c in frame.columns]), {}
    parents = sensitive_parents(frame["h3_index"], zones, res)
    parent_of = frame["h3_index"].map(lambda c: h3.cell_to_parent(c, res) if h3.get_resolution(c) > res else c)
    hit = parent_of.isin(parents)
    n_fine = int(hit.sum())
    out = frame.copy()
    out.loc[hit, "h3_index"] = parent_of[hit]
    keys = [*rt.slice_by, *rt.cells]
    ratios = ("change_pct", "valid_fraction")  # recomputed below; every other measure is a count or an area
    summed = [c for c in out.columns if c not in keys and c not in ratios]
    # Children in a fixed order (by parent, then child cell): the float sums do not depend on the row order
    # the table was read in.
    out = out.assign(_child=frame["h3_index"]).sort_values([*keys, "_child"], kind="stable").drop(columns="_child")
    agg = out.groupby(keys, sort=True, dropna=False)[summed].sum().reset_index()
    if {"change_pct", "change_km2", "built_km2_before"} <= set(out.columns):
        before = agg["built_km2_before"]
        agg["change_pct"] = np.where(before > 0, agg["change_km2"] / before.where(before > 0) * 100.0, np.nan)
    if {"valid_fraction", "n_pixels_valid", "n_pixels"} <= set(out.columns):
        agg["valid_fraction"] = agg["n_pixels_valid"] / agg["n_pixels"]
    agg = agg[[c for c in frame.columns if c in agg.columns]]
    agg = agg.drop(columns=[c for c in INPUTS if c not in rt.measures])
    return agg, {"cells_coarsened_sensitive": n_fine, "sensitive_parents": int(agg["h3_index"].isin(parents).sum())}


def _draw(release_type: str, rt: ReleaseType, cells: pd.DataFrame, path: Path) -> str:
    from jobs.remote_sensing import quicklook

    return quicklook.draw(release_type, rt, cells, path)


ACCURACY_COLUMNS = ("classifier", "layer", "date", "reference", "reference_sha256", "n_reference",
                    "n_reference_built", "mapped_km2", "adjusted_km2", "adjusted_km2_ci95", "overall_accuracy",
                    "overall_ci95", "users_accuracy", "users_ci95", "producers_accuracy", "producers_ci95", "f1",
                    "confusion")


def accuracy_notes(lake: Lakehouse, cfg: Config, rt: ReleaseType, cells: DataFrame) -> dict[str, Any]:
    """The accuracy of the released pairs' layers by the built-up rule that made them (gold.settlement_accuracy,
    from remote_sensing.accuracy), or a statement that none was assessed."""

    keys = ["area", "date_before", "date_after"]
    if not set(keys) <= set(rt.slice_by):
        return {}
    released = cells.select(*keys).distinct()
    none = {"accuracy": [], "accuracy_note": "no reference labels were assessed for these pairs "
            "(remote_sensing.accuracy); the layers' accuracy is unknown"}
    if not (lake.exists("gold.settlement_accuracy") and lake.exists("silver.settlement_tiles")):
        return none
    made_by = lake.read("silver.settlement_tiles").select(*keys, "classifier").distinct()
    acc = (lake.read("gold.settlement_accuracy").join(released, keys).join(made_by, [*keys, "classifier"])
           .orderBy(*keys, "layer", "date", "reference"))
    rows = [{k: (str(v) if k in ("date", "date_before", "date_after") else Path(v).name if k == "reference" else v)
             for k, v in r.asDict().items() if k in (*keys, *ACCURACY_COLUMNS)} for r in acc.collect()]
    if not rows:
        return none
    return {"accuracy": rows, "accuracy_note": "Olofsson et al. 2014 stratified estimators (map classes as strata); "
            "+-ci95 is the 95% interval; built-up class figures. Reference pixels that are not a random sample "
            "within each map class make the intervals indicative."}


def masked_rasters(cfg: Config, rt: ReleaseType, folder: Path) -> dict[str, Any]:
    """The change COG of every released pair, in the release folder, showing only the pixels of released cells.

    A pixel is published where its H3 cell at the slice's resolution is released as itself: pixels of withheld
    cells, and of cells merged into a parent in a sensitive zone, become nodata (class 0, "invalid"). The
    class colour map, class names and band description come along; the file is a COG again."""
    from jobs.remote_sensing.change import rasters_root

    if rt.cells != ["h3_index"] or not {"area", "date_before", "date_after", "h3_resolution"} <= set(rt.slice_by):
        return {}
    cells = pd.read_parquet(folder / "cells.parquet",
                            columns=["area", "date_before", "date_after", "h3_resolution", "h3_index", "status"])
    root = rasters_root(cfg) / "settlement_change"
    zones_path = cfg.remote_sensing.sensitive_zones_path
    zones = load_zones(zones_path) if zones_path else None
    written, missing = [], []
    for (area, d0, d1, res), grp in cells.groupby(["area", "date_before", "date_after", "h3_resolution"],
                                                 sort=True):
        src = root / str(area) / f"{d0}_{d1}" / "change.tif"
        name = f"change_{area}_{d0}_{d1}_h3r{res}.tif"
        if not src.exists():
            missing.append(str(src))
            continue
        released = grp.loc[(grp["status"] == "released") & grp["h3_index"].notna(), "h3_index"]
        kept = mask_to_cells(src, folder / name, released.tolist(), int(res), zones)
        written.append({"file": name, "area": str(area), "date_before": str(d0), "date_after": str(d1),
                        "h3_resolution": int(res), "pixels_published": kept[0], "pixels_masked": kept[1]})
    return {"rasters": written, "rasters_note": (
        "change class per pixel (0 invalid/masked, 1 not built, 2 stable built-up, 3 new built-up, 4 lost "
        "built-up), Cloud Optimized GeoTIFF in the scene's CRS; only pixels of cells released as themselves")
        + (f"; no change raster found for {len(missing)} slice(s): {missing[:3]}" if missing else "")}


def mask_to_cells(src_path: Path, dst_path: Path, released: list[str], resolution: int,
                  zones: Any = None) -> tuple[int, int]:
    """Copy a change COG keeping only pixels whose H3 cell (at ``resolution``) is in ``released`` and whose
    centre lies outside the sensitive ``zones`` (a shapely geometry in EPSG:4326; a cell released whole can
    still reach into a zone); returns the valid pixels kept and masked."""
    import rasterio
    import rasterio.shutil
    import shapely
    from rasterio.windows import Window

    from jobs.remote_sensing import pixels

    keep = np.array(sorted(h3.str_to_int(c) for c in released if h3.get_resolution(c) == resolution),
                    dtype=np.uint64)
    tmp = dst_path.with_name(dst_path.name + ".partial.tif")
    kept = masked = 0
    with rasterio.open(src_path) as src:
        profile = {**src.profile, "driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256,
                   "compress": "deflate"}
        profile.pop("interleave", None)
        grid = pixels.Grid(src.crs.to_wkt(), tuple(src.transform)[:6], src.width, src.height)
        tags, cmap = src.tags(1), src.colormap(1)
        with rasterio.open(tmp, "w", **profile) as dst:
            step = 1024
            for r in range(0, src.height, step):
                for c in range(0, src.width, step):
                    w = Window(c, r, min(step, src.width - c), min(step, src.height - r))
                    data = src.read(1, window=w)
                    valid = data != pixels.INVALID
                    if valid.any():
                        lon, lat = pixels.pixel_centres(grid, w)
                        cells = pixels.h3_index_fast(grid, w, lon, lat, resolution)
                        ok = valid & np.isin(cells, keep)
                        if zones is not None:
                            ok &= ~shapely.contains_xy(zones, lon, lat)
                        kept += int(ok.sum())
                        masked += int((valid & ~ok).sum())
                        data = np.where(ok, data, pixels.INVALID).astype(data.dtype)
                    dst.write(data, 1, window=w)
            dst.update_tags(1, **tags)
            dst.write_colormap(1, cmap)
            dst.set_band_description(1, "built-up change class")
    rasterio.shutil.copy(tmp, dst_path, driver="COG", compress="DEFLATE", blocksize=256,
                         overview_resampling="nearest")
    tmp.unlink()
    return kept, masked


HOOKS = register("remote_sensing", ReleaseHooks(inputs=tuple(INPUTS), prepare=prepare, draw=_draw,
                                                  notes=accuracy_notes, files=masked_rasters))
