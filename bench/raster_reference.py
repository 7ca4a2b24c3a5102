"""Single-process reference for the raster benchmark: a rasterio + numpy windowed loop.

    python -m bench.raster_reference BEFORE.tif AFTER.tif OUT.parquet --h3 8 --thresholds a,b,c

Computes, per H3 cell (pixel centres), the pixels, valid pixels and new / lost / stable
built-up pixels between two Landsat-7-like scenes on the same grid, one window at a
time in one process. Shares no code with jobs/remote_sensing: it is written from the
rule alone (built-up where NDBI > a, NDVI < b and MNDWI < c; invalid where a file's
nodata appears in any band). Prints its own wall time as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import h3
import numpy as np
import pandas as pd
import rasterio
from pyproj import Transformer
from rasterio.windows import Window


def built_and_valid(src: rasterio.io.DatasetReader, win: Window, t: tuple[float, float, float]):  # type: ignore[no-untyped-def]
    b = src.read(window=win).astype(np.float64)
    valid = np.ones(b.shape[1:], dtype=bool) if src.nodata is None else ~(b == src.nodata).any(axis=0)
    green, red, nir, swir1 = b[1], b[2], b[3], b[4]
    with np.errstate(divide="ignore", invalid="ignore"):
        ndbi = (swir1 - nir) / (swir1 + nir)
        ndvi = (nir - red) / (nir + red)
        mndwi = (green - swir1) / (green + swir1)
    return (ndbi > t[0]) & (ndvi < t[1]) & (mndwi < t[2]) & valid, valid


def run(before: str, after: str, resolution: int, t: tuple[float, float, float], size: int = 1024) -> pd.DataFrame:
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(5, dtype=np.int64))
    with rasterio.open(before) as s0, rasterio.open(after) as s1:
        to_lonlat = Transformer.from_crs(s0.crs, "EPSG:4326", always_xy=True)
        for row in range(0, s0.height, size):
            for col in range(0, s0.width, size):
                win = Window(col, row, min(size, s0.width - col), min(size, s0.height - row))
                b0, v0 = built_and_valid(s0, win, t)
                b1, v1 = built_and_valid(s1, win, t)
                valid = v0 & v1
                rows, cols = np.mgrid[row:row + win.height, col:col + win.width]
                xs, ys = rasterio.transform.xy(s0.transform, rows.ravel(), cols.ravel(), offset="center")
                lon, lat = to_lonlat.transform(np.asarray(xs), np.asarray(ys))
                cells = np.array([h3.latlng_to_cell(a, o, resolution) for a, o in zip(lat.tolist(), lon.tolist(),
                                                                                      strict=True)])
                flags = np.stack([np.ones(valid.size, dtype=np.int64), valid.ravel(),
                                  (valid & ~b0 & b1).ravel(), (valid & b0 & ~b1).ravel(),
                                  (valid & b0 & b1).ravel()], axis=1).astype(np.int64)
                frame = pd.DataFrame(flags, columns=list("ptnls"))
                frame["cell"] = cells
                for cell, v in frame.groupby("cell", sort=False)[list("ptnls")].sum().iterrows():
                    sums[str(cell)] += v.to_numpy()
    out = pd.DataFrame([(c, *v) for c, v in sums.items()],
                       columns=["h3_index", "n_pixels", "n_pixels_valid", "n_new", "n_lost", "n_stable"])
    return out.sort_values("h3_index").reset_index(drop=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("out")
    p.add_argument("--h3", type=int, default=8)
    p.add_argument("--thresholds", default="0.05,0.25,0.0")
    a = p.parse_args()
    t = tuple(float(x) for x in a.thresholds.split(","))
    start = time.perf_counter()
    table = run(a.before, a.after, a.h3, t)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    table.to_parquet(a.out, index=False)
    print(json.dumps({"seconds": seconds, "cells": len(table)}))


if __name__ == "__main__":
    main()
