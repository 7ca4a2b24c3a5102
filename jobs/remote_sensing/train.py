"""Train a built-up classifier from labels: samples on the executors, the fit in one executor task, a model folder.

Reads: the scenes of ``remote_sensing`` (catalogue and radiometric check as in remote_sensing.change) and
``remote_sensing.labels`` (rasters, polygons or points; layer ``builtup`` labels one date, layer
``new_builtup`` says which pixels became built-up between two dates: built at the later date, not
built at the earlier one). An external built-up layer (WSF, GHSL) of an earlier date is a raster
label with ``builtup_min``, the way WSF Evolution learns from a reference year.
Writes: ``<models_dir>/<model id>/model.txt`` and ``model.json`` (no tables). Set
``remote_sensing.classifier`` to that folder for remote_sensing.change and remote_sensing.accuracy.

How it scales: each Spark task reads one window of one labelled scene, computes the features of its
labelled pixels and keeps a random sample of at most ``max_per_class_per_window`` per class; spatial
blocks of ``block_px`` pixels are held out as a whole (``holdout`` share, by a seeded hash), so the
held-out score is not flattered by neighbouring pixels. The samples (bounded by windows x classes x
that cap) go to one task that fits LightGBM (deterministic: one thread, fixed seed) and scores the
held-out blocks against both the model and the index rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import types as T
from rasterio.windows import Window

from jobs.remote_sensing import learn, pixels
from jobs.remote_sensing.change import usable_scenes
from jobs.remote_sensing.pixels import Scene
from lib.config import Config, LabelSpec, RemoteSensingSettings, TrainSettings
from lib.publish import sha256_file
from lib.runtime import log, stage
from lib.spark import parallel_rows

DESCRIPTION = "Labels + scenes -> a learned built-up classifier (LightGBM model folder with hashes and scores)"

SAMPLE_SCHEMA = T.StructType([
    T.StructField("task", T.IntegerType(), False),
    T.StructField("window_id", T.StringType(), False),
    T.StructField("pixel", T.LongType(), False),
    T.StructField("holdout", T.BooleanType(), False),
    T.StructField("label", T.IntegerType(), False),
    T.StructField("index_pred", T.IntegerType(), False),
    *[T.StructField(f, T.DoubleType(), True) for f in learn.FEATURES],
])
FIT_SCHEMA = T.StructType([T.StructField("model", T.StringType(), False),
                           T.StructField("scores", T.StringType(), False)])


def label_tasks(scenes: list[Scene], labels: list[LabelSpec]) -> list[tuple[LabelSpec, Scene, str]]:
    """(label, scene, how) for every label: 'as_is' (built-up at the scene's date), 'new_built' (new built-up:
    built at the later scene) or 'new_not' (not built at the earlier scene)."""
    by_key = {(s.area, s.date): s for s in scenes}
    out = []
    for spec in labels:
        wanted = ([(spec.date, "as_is")] if spec.layer == "builtup"
                  else [(spec.date_after, "new_built"), (spec.date_before, "new_not")])
        for d, how in wanted:
            scene = by_key.get((spec.area, d.isoformat() if d else ""))
            if scene is None:
                have = sorted(f"{a} {dt}" for a, dt in by_key)
                raise learn.ModelError(f"label {spec.path}: no usable scene of area '{spec.area}' on {d} "
                                       f"(usable scenes: {have})")
            out.append((spec, scene, how))
    return out


def held_out(area: str, rows: np.ndarray, cols: np.ndarray, t: TrainSettings) -> np.ndarray:
    """Whether each pixel's spatial block is held out (a seeded hash of area and block, stable across runs)."""
    br, bc = rows // t.block_px, cols // t.block_px
    key = np.array([int.from_bytes(hashlib.sha256(f"{t.seed}|{area}|{r}|{c}".encode()).digest()[:4], "big")
                    for r, c in zip(br.tolist(), bc.tolist(), strict=True)], dtype=np.uint64)
    return (key % 10_000) < int(round(t.holdout * 10_000))


def sample_window(spec: LabelSpec, scene: Scene, how: str, window: Window, t: TrainSettings,
                  resampling: str, task: int) -> pd.DataFrame:
    """The labelled pixels of one window (a seeded sample per class), with features and the index rule's call."""
    labels = learn.label_window(spec, scene.grid, window)
    if how == "new_built":
        labels = np.where(labels == 1, 1, -1).astype(np.int8)
    elif how == "new_not":
        labels = np.where(labels == 1, 0, -1).astype(np.int8)
    if not (labels >= 0).any():
        return pd.DataFrame(columns=SAMPLE_SCHEMA.fieldNames())
    x, valid = learn.feature_window(scene, scene.grid, window, resampling)
    use = (labels >= 0) & valid
    rng = np.random.default_rng([t.seed, task, int(window.row_off), int(window.col_off)])
    picked = []
    for cls in (0, 1):
        idx = np.flatnonzero((use & (labels == cls)).ravel())
        if len(idx) > t.max_per_class_per_window:
            idx = np.sort(rng.choice(idx, t.max_per_class_per_window, replace=False))
        picked.append(idx)
    idx = np.concatenate(picked)
    flat = x.reshape(-1, len(learn.FEATURES))[idx]
    rows = idx // int(window.width) + int(window.row_off)
    cols = idx % int(window.width) + int(window.col_off)
    f = {name: flat[:, i].astype(np.float64) for i, name in enumerate(learn.FEATURES)}
    ndbi_min, ndvi_max, mndwi_max = scene.thresholds
    index_pred = (f["ndbi"] > ndbi_min) & (f["ndvi"] < ndvi_max) & (f["mndwi"] < mndwi_max)
    return pd.DataFrame({
        "task": task, "window_id": f"r{int(window.row_off)}_c{int(window.col_off)}",
        "pixel": rows.astype(np.int64) * scene.grid.width + cols, "holdout": held_out(scene.area, rows, cols, t),
        "label": labels.ravel()[idx].astype(np.int32), "index_pred": index_pred.astype(np.int32), **f})


def _sample_fn(tasks: list[tuple[str, str, str]], t: TrainSettings, resampling: str):  # type: ignore[no-untyped-def]
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for r in batch.itertuples(index=False):
                spec_json, scene_json, how = tasks[r.task]
                out = sample_window(LabelSpec.model_validate_json(spec_json), pixels.scene_from_json(scene_json),
                                    how, Window(r.col_off, r.row_off, r.width, r.height), t, resampling, r.task)
                yield out.reindex(columns=SAMPLE_SCHEMA.fieldNames())

    return run


def _fit_fn(t: TrainSettings):  # type: ignore[no-untyped-def]
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        df = pd.concat(list(batches), ignore_index=True)
        if df.empty:
            return
        df = df.sort_values(["task", "pixel"], kind="stable").reset_index(drop=True)
        features = list(learn.FEATURES)
        train, test = df[~df["holdout"]], df[df["holdout"]]
        booster = learn.train_booster(train[features].to_numpy(), train["label"].to_numpy(), t.trees, t.leaves,
                                      t.learning_rate, t.seed)
        scores: dict[str, Any] = {
            "samples": {"train": {"built": int((train["label"] == 1).sum()), "not_built": int((train["label"] == 0).sum())},
                        "holdout": {"built": int((test["label"] == 1).sum()), "not_built": int((test["label"] == 0).sum())}},
            "importance_gain": dict(zip(features, [round(float(g), 3) for g in
                                                   booster.feature_importance("gain")], strict=True)),
        }
        if len(test):
            prob = booster.predict(test[features].to_numpy(), num_threads=1)
            y = test["label"].to_numpy()
            scores["holdout_model"] = learn.binary_scores(y, (prob >= 0.5).astype(int))
            scores["holdout_index_rule"] = learn.binary_scores(y, test["index_pred"].to_numpy())
        yield pd.DataFrame({"model": [booster.model_to_string()], "scores": [json.dumps(scores)]})

    return run


def models_root(cfg: Config) -> Path:
    p = Path(cfg.remote_sensing.train.models_dir)
    return p if p.is_absolute() else Path(cfg.lakehouse.resolved_root()) / p


def write_model(root: Path, model_text: str, meta: dict[str, Any]) -> Path:
    """The model folder, named by the model file's hash; written beside it and renamed into place."""
    digest = hashlib.sha256(model_text.encode("utf-8")).hexdigest()
    model_id = digest[:16]
    final = root / model_id
    tmp = root / f".{model_id}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "model.txt").write_text(model_text, encoding="utf-8")
    meta = {"model_id": model_id, "model_sha256": sha256_file(tmp / "model.txt"), **meta}
    (tmp / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str), encoding="utf-8")
    for f in tmp.iterdir():
        f.chmod(0o644)
    if final.exists():
        shutil.rmtree(tmp)  # the same model (same hash) is already there
    else:
        tmp.rename(final)
    return final


def provenance(label_jobs: list[tuple[LabelSpec, Scene, str]]) -> dict[str, Any]:
    scenes = {s.scene_id: s for _, s, _ in label_jobs}
    return {
        "scenes": [{"scene_id": s.scene_id, "area": s.area, "date": s.date, "sensor": s.sensor,
                    "files": {role: {"path": f, "band": i, "sha256": sha256_file(f)}
                              for role, (f, i) in sorted(s.files.items())}} for s in scenes.values()],
        "labels": [{"path": str(spec.path), "sha256": sha256_file(spec.path), "layer": spec.layer,
                    "area": spec.area, "dates": [str(d) for d in (spec.date, spec.date_before, spec.date_after) if d]}
                   for spec in {str(sp.path) + sp.layer + str(sp.date): sp for sp, _, _ in label_jobs}.values()],
    }


def run(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    rs: RemoteSensingSettings = cfg.remote_sensing.model_copy(update={"classifier": "index"})
    t = rs.train
    if not rs.labels:
        raise learn.ModelError("remote_sensing.labels is empty: give label rasters, polygons or points to train on")
    scenes, _, _ = usable_scenes(spark, rs)
    label_jobs = label_tasks(scenes, rs.labels)
    levels = {s.level for _, s, _ in label_jobs}
    if len(levels) != 1 or "layer" in levels:
        raise learn.ModelError(f"labelled scenes must share one reflectance level (found {sorted(levels)})")
    tasks = [(spec.model_dump_json(), pixels.scene_to_json(replace(s, notes=())), how) for spec, s, how in label_jobs]
    rows = [(i, int(w.row_off), int(w.col_off), int(w.height), int(w.width))
            for i, (_, s, _) in enumerate(label_jobs) for w in pixels.windows(s.grid, rs.window_size)]
    with stage("remote_sensing.train samples") as st:
        win = parallel_rows(spark, rows, "task int, row_off int, col_off int, height int, width int")
        samples = win.mapInPandas(_sample_fn(tasks, t, rs.resampling), SAMPLE_SCHEMA)
        st.rows_in = len(rows)
    with stage("remote_sensing.train fit") as st:
        fitted = samples.repartition(1).mapInPandas(_fit_fn(t), FIT_SCHEMA).collect()
        if not fitted:
            raise learn.ModelError("no labelled valid pixel in any labelled scene: check the labels' area, "
                                   "dates and class values")
        scores = json.loads(fitted[0]["scores"])
        st.rows_out = sum(scores["samples"]["train"].values())
    import lightgbm

    meta = {
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(), "features": list(learn.FEATURES),
        "roles": [r for r in learn.REQUIRED_ROLES], "level": levels.pop(),
        "sensors": sorted({s.sensor for _, s, _ in label_jobs}), "threshold": 0.5,
        "library": f"lightgbm {lightgbm.__version__}",
        "parameters": t.model_dump(), **scores, "training_data": provenance(label_jobs),
    }
    folder = write_model(models_root(cfg), fitted[0]["model"], meta)
    hm, hi = scores.get("holdout_model", {}), scores.get("holdout_index_rule", {})
    log.info("remote_sensing.train: model %s; held-out F1 %.3f (index rule %.3f), precision %.3f, recall %.3f",
             folder, hm.get("f1", float("nan")), hi.get("f1", float("nan")), hm.get("precision", float("nan")),
             hm.get("recall", float("nan")))
    print(f"model: {folder}\n  held-out blocks: model F1 {hm.get('f1', float('nan')):.3f} "
          f"(precision {hm.get('precision', float('nan')):.3f}, recall {hm.get('recall', float('nan')):.3f}); "
          f"index rule F1 {hi.get('f1', float('nan')):.3f}\n  use it: --set remote_sensing.classifier={folder}")
    return {"model": str(folder), "model_id": folder.name, **scores}
