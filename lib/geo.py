"""Spatial units: H3 indexing and admin-area assignment of points (cell sites, posts).

Boundaries are small (thousands of polygons) and read on the driver with
geopandas from GeoJSON or GeoPackage in any CRS; points are assigned to the
polygon that contains them, else to the nearest polygon within a distance
(measured in a local equal-distance projection), else left unassigned with a
reason so the caller can quarantine them.

Reads and writes no tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import geopandas as gpd
import h3
import numpy as np
import pandas as pd


class BoundaryError(ValueError):
    """A boundary file that cannot be used; the message names the file and the reason."""


def read_boundaries(path: str | Path, level: str) -> gpd.GeoDataFrame:
    """Polygons of one admin level in EPSG:4326 with an id column named after the level."""
    path = Path(path)
    if not path.exists():
        raise BoundaryError(f"{path}: admin boundary file for level '{level}' not found")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001 - GDAL errors come in many types
        raise BoundaryError(f"{path}: cannot read admin boundaries: {exc}") from None
    if level not in gdf.columns:
        raise BoundaryError(f"{path}: no column '{level}' with the area ids (columns: {list(gdf.columns)})")
    if gdf.crs is None:
        raise BoundaryError(f"{path}: no CRS; give the file a CRS (e.g. EPSG:4326)")
    gdf = gdf[[level, "geometry"]].to_crs(4326)
    if gdf[level].isna().any():
        raise BoundaryError(f"{path}: {int(gdf[level].isna().sum())} features have no '{level}' id")
    return gdf


def h3_cells(lat: np.ndarray, lon: np.ndarray, resolution: int) -> list[str]:
    return [h3.latlng_to_cell(float(a), float(o), resolution) for a, o in zip(lat, lon, strict=True)]


def assign_areas(
    points: pd.DataFrame,
    boundaries: Mapping[str, gpd.GeoDataFrame],
    max_distance_km: float,
) -> pd.DataFrame:
    """Add one column per level with the containing (or nearest, within the distance) area.

    Adds ``assignment`` ('within' when every level contains the point, 'nearest' when
    some level needed the nearest rule) and ``unassigned_reason`` (None when usable).
    """
    out = points.copy()
    pts = gpd.GeoDataFrame(out, geometry=gpd.points_from_xy(out["longitude"], out["latitude"]), crs=4326)
    nearest_used = np.zeros(len(out), dtype=bool)
    reasons: list[str | None] = [None] * len(out)
    for level, polys in boundaries.items():
        within = gpd.sjoin(pts[["geometry"]], polys, how="left", predicate="within")
        within = within[~within.index.duplicated(keep="first")]
        values = within[level].reindex(pts.index)
        missing = values.isna()
        if missing.any():
            # Nearest polygon in a metric CRS centred on the data.
            lon0, lat0 = float(out["longitude"].mean()), float(out["latitude"].mean())
            crs = f"+proj=aeqd +lat_0={lat0} +lon_0={lon0} +units=m"
            near = gpd.sjoin_nearest(
                pts.loc[missing, ["geometry"]].to_crs(crs), polys.to_crs(crs), how="left",
                max_distance=max_distance_km * 1000.0, distance_col="_dist",
            )
            near = near[~near.index.duplicated(keep="first")]
            values.loc[missing] = near[level].reindex(values.index[missing])
            nearest_used |= missing.to_numpy() & values.notna().to_numpy()
        for i in np.flatnonzero(values.isna().to_numpy()):
            reasons[i] = reasons[i] or f"outside every {level} area and farther than {max_distance_km} km from one"
        out[level] = values.to_numpy()
    out["assignment"] = np.where(nearest_used, "nearest", "within")
    out["unassigned_reason"] = reasons
    return out
