"""Radiometric sanity: do a scene's scaled values fit the level its profile declares?

A profile says what its values become once scaled (``level``): surface reflectance (sr),
top-of-atmosphere reflectance (toa), raw digital numbers (dn) or an external built-up layer.
Reflectance has a physical range; Level-1 digital numbers given to a surface-reflectance
profile, or reflectance given to a profile that scales digital numbers, land far outside
it (e.g. half the red band below zero). Every window of every reflectance scene is measured
on the executors (valid pixels, and how many fall below or above the range, per band); the
driver sums them per scene and either quarantines the scene with the numbers and a likely
cause, or - with ``on_radiometry: warn`` - keeps it with the warning in its notes.

Reads GeoTIFFs; writes no tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import types as T
from rasterio.windows import Window

from jobs.remote_sensing import pixels
from jobs.remote_sensing.pixels import Scene
from lib.spark import parallel_rows

# Scaled values a level can physically take (generous: atmospheric correction leaves slightly negative
# water, bright clouds and snow exceed 1 in TOA).
RANGES = {"sr": (-0.01, 1.1), "toa": (-0.01, 1.6)}
SPECTRAL = ("blue", "green", "red", "nir", "swir1", "swir2")

STATS_SCHEMA = T.StructType([
    T.StructField("scene_id", T.StringType(), False),
    T.StructField("role", T.StringType(), True),
    T.StructField("n_valid", T.LongType(), True),
    T.StructField("n_below", T.LongType(), True),
    T.StructField("n_above", T.LongType(), True),
    T.StructField("raw_min", T.DoubleType(), True),
    T.StructField("raw_max", T.DoubleType(), True),
    T.StructField("error", T.StringType(), True),
])


def checked(scene: Scene) -> bool:
    return scene.level in RANGES and scene.builtup_min is None


def window_stats(scene: Scene, window: Window) -> list[dict[str, object]]:
    """Per spectral band of the scene: valid pixels of the window and how many scaled values are out of range."""
    lo, hi = RANGES[scene.level]
    roles = tuple(r for r in SPECTRAL if r in scene.files)
    invalid = np.zeros((int(window.height), int(window.width)), dtype=bool)
    raw: dict[str, np.ndarray] = {}
    for role in roles:
        values, bad = pixels.read_role(scene, role, scene.grid, window, "nearest")
        raw[role] = values
        invalid |= bad
    if scene.mask_role and scene.mask_role in scene.files:
        qa, bad = pixels.read_role(scene, scene.mask_role, scene.grid, window, "nearest")
        invalid |= bad | pixels.quality_mask(qa, scene.mask_kind, scene.mask_values)
    out: list[dict[str, object]] = []
    valid = ~invalid
    for role in roles:
        v = raw[role][valid]
        scale, offset = scene.scaling(role)
        scaled = v * scale + offset
        out.append({"scene_id": scene.scene_id, "role": role, "n_valid": int(v.size),
                    "n_below": int((scaled < lo).sum()), "n_above": int((scaled > hi).sum()),
                    "raw_min": float(v.min()) if v.size else None, "raw_max": float(v.max()) if v.size else None})
    return out


def _stats_fn(scenes_json: dict[str, str]):  # type: ignore[no-untyped-def]
    cache: dict[str, Scene] = {}

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows: list[dict[str, object]] = []
            for r in batch.itertuples(index=False):
                scene = cache.setdefault(r.scene_id, pixels.scene_from_json(scenes_json[r.scene_id]))
                try:
                    rows += window_stats(scene, Window(r.col_off, r.row_off, r.width, r.height))
                except pixels.SceneReadError as exc:
                    rows.append({"scene_id": r.scene_id, "error": str(exc)})
            out = pd.DataFrame(rows).reindex(columns=STATS_SCHEMA.fieldNames())
            yield out.astype({"scene_id": object, "role": object, "n_valid": "Int64", "n_below": "Int64",
                              "n_above": "Int64", "raw_min": "float64", "raw_max": "float64", "error": object})

    return run


@dataclass(frozen=True)
class Verdict:
    scene_id: str
    problem: str | None  # why the values do not fit the level (None: they fit)
    worst_share: float | None  # the largest share of one band's valid pixels out of range
    detail: dict[str, dict[str, float]]  # role -> valid, below, above, raw_min, raw_max


def likely_cause(level: str, role: str, below: float, above: float, raw_max: float, scale: float) -> str:
    if raw_max <= 2.0 and scale < 0.01:
        return "the values look like reflectance already: set the profile's scale 1 and offset 0?"
    if below >= above and level == "sr" and raw_max > 255:
        return "Level-1 DN given to a surface reflectance profile? (use a Level-1 profile, e.g. landsat8_oli_c2l1)"
    if above > below:
        return "values too large for reflectance: radiance, or the wrong scale?"
    return "check the profile's scale and offset"


def verdicts(stats: pd.DataFrame, scenes: list[Scene], max_share: float) -> list[Verdict]:
    """One verdict per checked scene from the summed window statistics."""
    out = []
    by_id = {s.scene_id: s for s in scenes}
    errors = stats[stats["error"].notna()]
    for sid, grp in stats[stats["error"].isna()].groupby("scene_id", sort=True):
        scene = by_id[str(sid)]
        lo, hi = RANGES[scene.level]
        g = grp.groupby("role").agg(n_valid=("n_valid", "sum"), n_below=("n_below", "sum"),
                                    n_above=("n_above", "sum"), raw_min=("raw_min", "min"),
                                    raw_max=("raw_max", "max"))
        detail, problem, worst = {}, None, 0.0
        for role, r in g.iterrows():
            n = int(r["n_valid"])
            below = r["n_below"] / n if n else 0.0
            above = r["n_above"] / n if n else 0.0
            detail[str(role)] = {"valid": n, "below": round(float(below), 6), "above": round(float(above), 6),
                                 "raw_min": float(r["raw_min"]) if n else float("nan"),
                                 "raw_max": float(r["raw_max"]) if n else float("nan")}
            share = max(below, above)
            if share > worst:
                worst = float(share)
                if share > max_share:
                    side = f"< {lo}" if below >= above else f"> {hi}"
                    problem = (f"{share:.0%} of {role} {'surface' if scene.level == 'sr' else 'TOA'} reflectance "
                               f"{side} (of {n:,} valid pixels; raw values {r['raw_min']:g}..{r['raw_max']:g}): "
                               + likely_cause(scene.level, str(role), below, above, float(r["raw_max"]),
                                              scene.scaling(str(role))[0]))
        out.append(Verdict(str(sid), problem, worst, detail))
    for sid, grp in errors.groupby("scene_id", sort=True):
        out.append(Verdict(str(sid), f"window read failed: {grp['error'].iloc[0]}", None, {}))
    return out


def check(spark: SparkSession, scenes: list[Scene], window_size: int, max_share: float) -> list[Verdict]:
    """Measure every window of every reflectance scene on the executors; one verdict per such scene."""
    todo = [s for s in scenes if checked(s)]
    if not todo:
        return []
    rows = [(s.scene_id, int(w.row_off), int(w.col_off), int(w.height), int(w.width))
            for s in todo for w in pixels.windows(s.grid, window_size)]
    df = parallel_rows(spark, rows, "scene_id string, row_off int, col_off int, height int, width int")
    fn = _stats_fn({s.scene_id: pixels.scene_to_json(s) for s in todo})
    stats = df.mapInPandas(fn, STATS_SCHEMA).toPandas()
    return verdicts(stats, todo, max_share)


def summary_json(v: Verdict | None) -> str | None:
    return json.dumps(v.detail, sort_keys=True) if v is not None else None
