"""Accuracy of the settlement layers against reference labels, with area-adjusted estimates and 95% intervals.

Reads: the scenes of ``remote_sensing`` (as remote_sensing.change does) and ``remote_sensing.reference``
(rasters, polygons or points; layer ``builtup`` for one date, ``new_builtup`` for a pair of dates).
Writes: ``gold.settlement_accuracy`` (one row per pair, classifier, layer, date and reference; re-running
a pair replaces its rows) and prints a readable table.

For every pair of dates and every built-up rule assessed (the configured ``classifier``, and the index
rule beside a learned model), the executors map each window exactly as remote_sensing.change does
(built-up at each date, new built-up between them) and count, per map class, the mapped pixels and km2
(the strata) and the reference pixels by reference class (the confusion matrix). The driver then
follows Olofsson et al. (2014), "Good practices for estimating area and assessing accuracy of land
change" (Remote Sensing of Environment 148): stratified estimators with the map classes as strata give
overall, user's and producer's accuracy and the area of each reference class, each with its standard
error, reported as 95% confidence intervals (+-1.96 SE). The estimators assume the reference pixels are
a random sample within each map class; a reference that covers one region (a held-back part of a scene)
is not, and its intervals are then indicative - the report says how the reference was drawn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import types as T
from rasterio.windows import Window

from jobs.remote_sensing import learn, pixels
from jobs.remote_sensing.catalogue import pair_id, pairs
from jobs.remote_sensing.change import classifier_name, usable_scenes
from jobs.remote_sensing.pixels import Scene
from lib.config import Config, LabelSpec
from lib.publish import sha256_file
from lib.runtime import log, stage
from lib.spark import parallel_rows
from lib.tables import Lakehouse, spec

DESCRIPTION = "Reference labels -> confusion matrix, user's/producer's accuracy, F1, area-adjusted km2 with 95% CI"
Z95 = 1.959964

COUNT_SCHEMA = T.StructType([
    T.StructField("pair_id", T.StringType(), False),
    T.StructField("classifier", T.StringType(), False),
    T.StructField("layer", T.StringType(), False),
    T.StructField("date", T.StringType(), False),
    T.StructField("reference", T.IntegerType(), False),  # -1: the strata (all mapped valid pixels)
    T.StructField("map_class", T.IntegerType(), False),
    T.StructField("ref_class", T.IntegerType(), False),
    T.StructField("n", T.LongType(), False),
    T.StructField("km2", T.DoubleType(), False),
])


# ----------------------------------------------------------------------------- estimators (pure)


def olofsson(n: np.ndarray, mapped: np.ndarray) -> dict[str, Any]:
    """Stratified estimators for a k x k error matrix ``n`` (rows: map class = stratum, columns: reference
    class) and the mapped area of each class ``mapped`` (any unit). Olofsson et al. 2014, eqs. 2-10."""
    n = np.asarray(n, dtype=np.float64)
    mapped = np.asarray(mapped, dtype=np.float64)
    total = mapped.sum()
    w = mapped / total
    ni = n.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = n / ni[:, None]  # n_ij / n_i.
        p = w[:, None] * r  # estimated proportion of area, map i and reference j
        pj = p.sum(axis=0)
        overall = float(np.trace(p))
        users = np.diag(r)
        producers = np.diag(p) / pj
        var_users = users * (1 - users) / (ni - 1)
        var_overall = float(np.sum(w ** 2 * users * (1 - users) / (ni - 1)))
        var_pj = np.sum(w[:, None] ** 2 * r * (1 - r) / (ni - 1)[:, None], axis=0)
        n_hat = (mapped[:, None] * r).sum(axis=0)  # estimated reference-class totals
        var_prod = np.empty(len(ni))
        for j in range(len(ni)):
            others = sum(mapped[i] ** 2 * r[i, j] * (1 - r[i, j]) / (ni[i] - 1) for i in range(len(ni)) if i != j)
            var_prod[j] = (mapped[j] ** 2 * (1 - producers[j]) ** 2 * users[j] * (1 - users[j]) / (ni[j] - 1)
                           + producers[j] ** 2 * others) / n_hat[j] ** 2
    return {"overall": overall, "overall_ci95": Z95 * float(np.sqrt(var_overall)),
            "users": users, "users_ci95": Z95 * np.sqrt(var_users),
            "producers": producers, "producers_ci95": Z95 * np.sqrt(var_prod),
            "area": total * pj, "area_ci95": Z95 * total * np.sqrt(var_pj), "proportion": pj}


# ----------------------------------------------------------------------------- executors


def relevant(refs: list[LabelSpec], before: Scene, after: Scene) -> list[tuple[int, str, str]]:
    """(reference index, layer, date) of the references that assess a layer of this pair."""
    out = []
    for i, ref in enumerate(refs):
        if ref.area != before.area:
            continue
        if ref.layer == "builtup" and ref.date and ref.date.isoformat() in (before.date, after.date):
            out.append((i, "builtup", ref.date.isoformat()))
        elif (ref.layer == "new_builtup" and ref.date_before and ref.date_after
              and (ref.date_before.isoformat(), ref.date_after.isoformat()) == (before.date, after.date)):
            out.append((i, "new_builtup", after.date))
    return out


def assess_window(before: Scene, after: Scene, window: Window, classifiers: list[str], refs: list[LabelSpec],
                  resampling: str) -> pd.DataFrame:
    grid = before.grid
    pid = pair_id(before, after)
    _, lat = pixels.pixel_centres(grid, window)
    area = pixels.pixel_area_km2(grid, window, lat)
    wanted = relevant(refs, before, after)
    labels = {i: learn.label_window(refs[i], grid, window) for i, _, _ in wanted}
    rows: list[tuple[Any, ...]] = []
    for clf in classifiers:
        b0, v0 = pixels.builtup(replace(before, classifier=clf), grid, window, resampling)
        b1, v1 = pixels.builtup(replace(after, classifier=clf), grid, window, resampling)
        layers = {("builtup", before.date): (b0, v0), ("builtup", after.date): (b1, v1),
                  ("new_builtup", after.date): (b1 & ~b0, v0 & v1)}
        for (layer, d), (mapped, valid) in layers.items():
            for m in (0, 1):
                sel = valid & (mapped == bool(m))
                rows.append((pid, clf, layer, d, -1, m, -1, int(sel.sum()), float(area[sel].sum())))
            for i, rlayer, rdate in wanted:
                if (rlayer, rdate) != (layer, d):
                    continue
                lab = labels[i]
                for m in (0, 1):
                    for c in (0, 1):
                        sel = valid & (mapped == bool(m)) & (lab == c)
                        rows.append((pid, clf, layer, d, i, m, c, int(sel.sum()), float(area[sel].sum())))
    return pd.DataFrame(rows, columns=COUNT_SCHEMA.fieldNames())


def _assess_fn(pair_scenes: dict[str, tuple[str, str]], classifiers: list[str], refs_json: list[str],
               resampling: str):  # type: ignore[no-untyped-def]
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        refs = [LabelSpec.model_validate_json(j) for j in refs_json]
        for batch in batches:
            for r in batch.itertuples(index=False):
                before, after = (pixels.scene_from_json(j) for j in pair_scenes[r.pair_id])
                yield assess_window(before, after, Window(r.col_off, r.row_off, r.width, r.height), classifiers,
                                    refs, resampling)

    return run


# ----------------------------------------------------------------------------- driver


def rows_for(counts: pd.DataFrame, refs: list[LabelSpec], pair_meta: dict[str, tuple[Scene, Scene]],
             names: dict[str, str]) -> list[dict[str, Any]]:
    """One result row per pair, classifier, layer, date and reference."""
    out: list[dict[str, Any]] = []
    strata = counts[counts["reference"] == -1].groupby(["pair_id", "classifier", "layer", "date", "map_class"])[
        ["n", "km2"]].sum()
    conf = counts[counts["reference"] >= 0].groupby(["pair_id", "classifier", "layer", "date", "reference",
                                                      "map_class", "ref_class"])["n"].sum()
    if conf.empty:
        return out
    for (pid, clf, layer, d, ref), grp in conf.groupby(level=[0, 1, 2, 3, 4]):
        n = np.zeros((2, 2))
        for (_, _, _, _, _, m, c), v in grp.items():
            n[int(m), int(c)] = v
        mapped = np.array([strata.loc[(pid, clf, layer, d, m), "km2"] if (pid, clf, layer, d, m) in strata.index
                           else 0.0 for m in (0, 1)])
        n_mapped = sum(int(strata.loc[(pid, clf, layer, d, m), "n"]) for m in (0, 1)
                       if (pid, clf, layer, d, m) in strata.index)
        est = olofsson(n, mapped)
        u, p = float(est["users"][1]), float(est["producers"][1])
        f1 = 2 * u * p / (u + p) if u + p > 0 else float("nan")
        before, after = pair_meta[pid]
        reference = refs[int(ref)]

        def num(x: Any) -> float | None:
            x = float(x)
            return None if not np.isfinite(x) else x

        out.append({
            "area": before.area, "date_before": date.fromisoformat(before.date),
            "date_after": date.fromisoformat(after.date), "classifier": names[clf], "layer": layer,
            "date": date.fromisoformat(d), "reference": str(reference.path),
            "reference_sha256": sha256_file(reference.path), "n_reference": int(n.sum()),
            "n_reference_built": int(n[:, 1].sum()), "n_mapped": n_mapped, "total_km2": float(mapped.sum()),
            "mapped_km2": float(mapped[1]), "adjusted_km2": num(est["area"][1]),
            "adjusted_km2_ci95": num(est["area_ci95"][1]), "overall_accuracy": num(est["overall"]),
            "overall_ci95": num(est["overall_ci95"]), "users_accuracy": num(u),
            "users_ci95": num(est["users_ci95"][1]), "producers_accuracy": num(p),
            "producers_ci95": num(est["producers_ci95"][1]), "f1": num(f1),
            "confusion": json.dumps({"rows": "map not/built", "columns": "reference not/built",
                                     "n": n.astype(int).tolist()}),
            "assessed_at": datetime.now(UTC).replace(microsecond=0, tzinfo=None),
        })
    return out


def report(rows: list[dict[str, Any]]) -> str:
    def f(x: float | None, pct: bool = True) -> str:
        return "n/a" if x is None else (f"{x:.1%}" if pct else f"{x:.3f}")

    lines = ["settlement accuracy (Olofsson et al. 2014; +- is the 95% interval)"]
    for r in rows:
        lines.append(
            f"  {r['area']} {r['date_before']}..{r['date_after']} {r['layer']:<11} {r['date']} {r['classifier']:<22}"
            f" n={r['n_reference']:,} ({r['n_reference_built']:,} built): overall {f(r['overall_accuracy'])} +- "
            f"{f(r['overall_ci95'])}; user's {f(r['users_accuracy'])} +- {f(r['users_ci95'])}; producer's "
            f"{f(r['producers_accuracy'])} +- {f(r['producers_ci95'])}; F1 {f(r['f1'], False)}; mapped "
            f"{r['mapped_km2']:.3f} km2, adjusted {f(r['adjusted_km2'], False)} +- {f(r['adjusted_km2_ci95'], False)} km2")
    return "\n".join(lines)


def run(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    rs = cfg.remote_sensing
    if not rs.reference:
        raise learn.ModelError("remote_sensing.reference is empty: give reference rasters, polygons or points")
    scenes, _, _ = usable_scenes(spark, rs.model_copy(update={"classifier": "index"}))
    scene_pairs = pairs(scenes)
    classifiers = ["index"]
    names = {"index": "index"}
    if rs.classifier != "index":
        model = learn.load_meta(rs.classifier)
        for s in scenes:
            learn.check_compatible(model, s)
        classifiers.append(str(model.folder))
        names[str(model.folder)] = classifier_name(rs)
    todo = [(b, a) for b, a in scene_pairs if relevant(rs.reference, b, a)]
    if not todo:
        raise learn.ModelError("no reference label matches a pair of usable scenes (area and dates): "
                               f"pairs {[pair_id(b, a) for b, a in scene_pairs]}")
    pair_scenes = {pair_id(b, a): (pixels.scene_to_json(b), pixels.scene_to_json(a)) for b, a in todo}
    rows = [(pair_id(b, a), int(w.row_off), int(w.col_off), int(w.height), int(w.width))
            for b, a in todo for w in pixels.windows(b.grid, rs.window_size)]
    with stage("remote_sensing.accuracy counts") as st:
        win = parallel_rows(spark, rows, "pair_id string, row_off int, col_off int, height int, width int")
        fn = _assess_fn(pair_scenes, classifiers, [r.model_dump_json() for r in rs.reference], rs.resampling)
        counts = win.mapInPandas(fn, COUNT_SCHEMA).toPandas()
        st.rows_in, st.rows_out = len(rows), len(counts)
    results = rows_for(counts, rs.reference, {pair_id(b, a): (b, a) for b, a in todo}, names)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    with stage("remote_sensing.accuracy -> gold") as st:
        schema = spec("gold.settlement_accuracy").schema
        df = spark.createDataFrame(pd.DataFrame(results)[schema.fieldNames()] if results else [], schema)
        scopes = [{"area": b.area, "date_before": date.fromisoformat(b.date), "date_after": date.fromisoformat(a.date)}
                  for b, a in todo]
        st.rows_out = lake.write(df, "gold.settlement_accuracy", where=scopes).rows_written
    text = report(results)
    print(text)
    log.info("remote_sensing.accuracy: %d rows", len(results))
    return {"rows": results}
