"""Release: the only way data leaves the platform. Guard a gold table, export it, record it.

    ./spark-submit.sh release <type> [--period START:END] [--requester NAME] [--override-reason TEXT]

Reads the release type's source table (conf/privacy.yaml), for the period when
given, and runs the guard on every slice on the executors (primary and complementary suppression,
attacker check, optional noise and rounding). Writes:

- ``exports.<type>`` and ``exports.<type>_margins`` (append; a Delta CHECK
  constraint rejects any released count at or below the threshold), with the
  policy hash in the table properties;
- partner files under ``<exports_dir>/<release-id>/``: cells and margins as CSV
  and Parquet, ``manifest.json`` (data dictionary, policy, source versions,
  counts, checksums, how to cite) and the owning pipeline's quick-look plot;
- one row in the append-only ``audit.releases``; for noised releases one row per
  release in ``audit.privacy_budget`` (a release past the budget is refused).

The release id derives from the inputs and the policy, so the same inputs and
policy give the same rows (and the same id).
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib import publish
from lib.config import PROJECT_ROOT, Config
from lib.privacy import guard, slices
from lib.privacy.policy import PolicyError, ReleaseType, effective, load_policy, policy_hash, snapshot
from lib.runtime import log, stage
from lib.tables import Lakehouse, TableError, TableSpec, register, spec

DESCRIPTION = "Guard a gold table and export it: exports.<type>, files + manifest, audit.releases"
CITATION = ("{title}. migralake release {release_id} ({created}). Aggregated with disclosure control "
            "(threshold {threshold}, policy {hash12}). Source: {source} version {version}.")

# ----------------------------------------------------------------------------- audit tables

RELEASES = register(TableSpec(
    name="audit.releases",
    schema=T.StructType([
        T.StructField("release_id", T.StringType(), False),
        T.StructField("created_at", T.TimestampType(), False),
        T.StructField("requester", T.StringType(), False),
        T.StructField("release_type", T.StringType(), False),
        T.StructField("policy_json", T.StringType(), False),
        T.StructField("policy_hash", T.StringType(), False),
        T.StructField("override_reason", T.StringType(), True),
        T.StructField("overridden", T.StringType(), True),
        T.StructField("sources_json", T.StringType(), False),
        T.StructField("period_start", T.DateType(), True),
        T.StructField("period_end", T.DateType(), True),
        T.StructField("counts_json", T.StringType(), False),
        T.StructField("files_json", T.StringType(), False),
        T.StructField("exports_path", T.StringType(), False),
    ]),
    description="One row per release: who, when, policy snapshot and hash, source versions, counts, file checksums.",
    source="privacy",
    owner_job="release",
    keys=("release_id",),
    append_only=True,
    constraints={"hash_is_sha256": "policy_hash RLIKE '^[0-9a-f]{64}$'",
                 "override_has_reason": "overridden IS NULL OR length(trim(override_reason)) > 0"},
))

BUDGET = register(TableSpec(
    name="audit.privacy_budget",
    schema=T.StructType([
        T.StructField("dataset", T.StringType(), False),
        T.StructField("release_id", T.StringType(), False),
        T.StructField("created_at", T.TimestampType(), False),
        T.StructField("epsilon", T.DoubleType(), False),
        T.StructField("delta", T.DoubleType(), False),
    ]),
    description="Privacy-budget ledger: epsilon (and delta) spent by each noised release, per dataset.",
    source="privacy",
    owner_job="release",
    append_only=True,
    constraints={"epsilon_positive": "epsilon > 0"},
))


class ReleaseError(RuntimeError):
    """A release that cannot be made; the message says why (nothing was exported)."""


def export_specs(release_type: str, rt: ReleaseType, source_schema: T.StructType,
                 table_threshold: int) -> tuple[TableSpec, TableSpec]:
    """exports.<type> (cells) and exports.<type>_margins, with a CHECK constraint at ``table_threshold``:
    the lowest threshold any profile of the policy allows for the type, so every release passes it
    and no direct write at or below it can."""
    by_name = {f.name: f.dataType for f in source_schema.fields}
    cols = [*rt.slice_by, *rt.cells, *rt.measures]
    missing = [c for c in cols + [rt.count_column] if c not in by_name]
    if missing:
        raise ReleaseError(f"release type {release_type}: source {rt.source} has no columns {missing}")
    n, t = rt.count_column, table_threshold
    parent_cols = list(dict.fromkeys(c for m in rt.margins for c in m if c not in rt.cells))
    check = {
        "released_above_threshold": f"(status = 'released' AND {n} > {t}) OR (status <> 'released' AND {n} IS NULL)",
        # 'withheld' since releases stopped publishing why; the older reasons are allowed for earlier rows.
        "status_known": "status IN ('released', 'withheld', 'primary', 'complementary', 'noise')",
    }
    cell_check = dict(check)
    if rt.measures:
        cell_check["withheld_measures_empty"] = "status = 'released' OR (" + " AND ".join(
            f"{m} IS NULL" for m in rt.measures) + ")"
    head = [T.StructField("release_id", T.StringType(), False)]
    slice_fields = [T.StructField(c, by_name[c], True) for c in rt.slice_by]
    tail = [T.StructField(n, T.LongType(), True), T.StructField("status", T.StringType(), False)]
    cells = TableSpec(
        name=f"exports.{release_type}",
        schema=T.StructType(head + slice_fields + [T.StructField(c, by_name[c], True) for c in rt.cells]
                            + [T.StructField(c, T.StringType(), True) for c in parent_cols] + tail
                            + [T.StructField(m, T.DoubleType(), True) for m in rt.measures]),
        description=f"Released {release_type} cells (withheld cells listed with status, count null).",
        source=rt.owner, owner_job="release", partition_by=("release_id",), constraints=cell_check,
    )
    margins = TableSpec(
        name=f"exports.{release_type}_margins",
        schema=T.StructType(head + slice_fields + [T.StructField("margin", T.StringType(), False),
                                                   T.StructField("key", T.StringType(), False)] + tail),
        description=f"Margins published with {release_type}: sums of the exact cell counts, guarded alike.",
        source=rt.owner, owner_job="release", partition_by=("release_id",), constraints=check,
    )
    return register(cells, replace=True), register(margins, replace=True)


def sync_constraints(lake: Lakehouse, name: str) -> None:
    """Make the table's CHECK constraints those of its spec (the threshold may have changed)."""
    s = spec(name)
    lake.ensure(name)
    props = lake.properties(name)
    loc = lake.location(name)
    for cname, expr in s.constraints.items():
        current = props.get(f"delta.constraints.{cname.lower()}")
        if current is not None and current.replace(" ", "") != expr.replace(" ", ""):
            lake.spark.sql(f"ALTER TABLE delta.`{loc}` DROP CONSTRAINT {cname}")
            try:
                lake.spark.sql(f"ALTER TABLE delta.`{loc}` ADD CONSTRAINT {cname} CHECK ({expr})")
            except Exception as exc:  # noqa: BLE001 - existing rows violate the new rule
                lake.spark.sql(f"ALTER TABLE delta.`{loc}` ADD CONSTRAINT {cname} CHECK ({current})")
                raise ReleaseError(
                    f"{name}: earlier releases violate the new rule '{expr}' (threshold raised?): {exc}"
                ) from None


# ----------------------------------------------------------------------------- inputs


def with_parents(lake: Lakehouse, rt: ReleaseType, df: DataFrame) -> DataFrame:
    """Add the parent columns named by the hierarchy (CDR: admin1 of each admin2 unit), as a Spark join.

    Rows at another spatial level than the child's (e.g. admin1 rows next to admin2 ones) are their own
    parent; an admin2 unit with no parent is an error naming the units.
    """
    for child, parent in rt.hierarchy.items():
        if rt.owner != "cdr":
            raise ReleaseError(f"hierarchy {child} -> {parent}: only CDR units have a parent lookup")
        lookup = (lake.read("silver.cdr_cells").select(F.col("admin2").alias("_child"), F.col(parent).alias("_parent"))
                  .distinct())
        df = df.join(F.broadcast(lookup), df[child] == lookup["_child"], "left")
        at_child = (F.col("spatial_unit") == "admin2") if "spatial_unit" in df.columns else F.lit(True)
        df = df.withColumn(parent, F.when(at_child, F.col("_parent")).otherwise(F.col(child).cast("string")))
        missing = [r[child] for r in df.filter(F.col(parent).isNull()).select(child).distinct().limit(5).collect()]
        if missing:
            raise ReleaseError(f"hierarchy {child} -> {parent}: no parent for {missing} "
                               "(spatial unit is not admin2?)")
        df = df.drop("_child", "_parent")
    return df


def owner_hooks(rt: ReleaseType) -> Any:
    """The owning pipeline's ``release_hooks`` module (jobs.<owner>.release_hooks), or None."""
    import importlib

    try:
        return importlib.import_module(f"jobs.{rt.owner}.release_hooks")
    except ModuleNotFoundError:
        return None


def owner_inputs(rt: ReleaseType) -> list[str]:
    """Extra source columns the owning pipeline needs to prepare a release (e.g. to re-aggregate)."""
    module = owner_hooks(rt)
    return list(getattr(module, "INPUTS", [])) if module else []


def owner_prepare(cfg: Config, rt: ReleaseType) -> slices.Prepare | None:
    """The owning pipeline's per-slice preparation before the guard (settlement layers: coarsen H3 cells
    in sensitive zones to the policy's minimum resolution), run on the executors; None when it has none."""
    module = owner_hooks(rt)
    if module is None:
        return None
    prepare = module.prepare
    return lambda frame: prepare(cfg, rt, frame)  # type: ignore[no-any-return]


def spatial_files(cfg: Config, rt: ReleaseType, cells: pd.DataFrame, folder: Path) -> str | None:
    """GeoJSON + GeoParquet of the cells for releases keyed by one spatial unit (admin polygons or H3).

    Each feature is one guarded cell with its unit's polygon; withheld cells keep an
    empty count and their status. Returns a description, or None for non-spatial types.
    """
    import geopandas as gpd
    import h3
    from shapely.geometry import Polygon

    from lib import geo

    if rt.cells == ["h3_index"]:
        shapes = {u: Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(u)]) for u in cells["h3_index"].unique()}
        polygons = gpd.GeoDataFrame({"h3_index": list(shapes)}, geometry=list(shapes.values()), crs=4326)
        out = gpd.GeoDataFrame(polygons.merge(cells, on="h3_index", how="inner"), geometry="geometry", crs=4326)
        out = out.astype({c: str for c in rt.slice_by})
        out.to_file(folder / "cells.geojson", driver="GeoJSON")
        out.to_parquet(folder / "cells.geoparquet")
        return "cells.geojson and cells.geoparquet: one feature per H3 cell with its polygon (EPSG:4326)"
    if rt.owner != "cdr" or "unit" not in rt.cells or "spatial_unit" not in cells.columns:
        return None

    levels = set(cells["spatial_unit"].dropna())
    if len(levels) != 1:
        return None
    level = levels.pop()
    if level.startswith("h3_"):
        shapes = {u: Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(u)]) for u in cells["unit"].unique()}
        polygons = gpd.GeoDataFrame({"unit": list(shapes)}, geometry=list(shapes.values()), crs=4326)
    elif level in cfg.cdr.admin_paths:
        polygons = geo.read_boundaries(cfg.cdr.admin_paths[level], level).rename(columns={level: "unit"})
    else:
        log.warning("release: no boundaries for spatial unit %s (cdr.admin_paths); no GeoJSON written", level)
        return None
    out = polygons.merge(cells, on="unit", how="inner")
    missing = set(cells["unit"]) - set(out["unit"])
    if missing:
        raise ReleaseError(f"release: units {sorted(missing)[:5]} have no polygon in the {level} boundaries")
    out = gpd.GeoDataFrame(out.astype({c: str for c in out.columns if c not in ("geometry", rt.count_column)}),
                           geometry="geometry", crs=4326)
    out.to_file(folder / "cells.geojson", driver="GeoJSON")
    out.to_parquet(folder / "cells.geoparquet")
    return f"cells.geojson and cells.geoparquet: one feature per cell with its {level} polygon (EPSG:4326)"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_dictionary(rt: ReleaseType, source_desc: str) -> dict[str, str]:
    d = {c: f"slice: one protected table per value ({c})" for c in rt.slice_by}
    d.update({c: "cell dimension" for c in rt.cells})
    d.update({m: "measure of the cell (see the source description); empty when the cell is withheld"
              for m in rt.measures})
    d[rt.count_column] = (f"distinct contributors; null when withheld. Released only above "
                          f"{rt.suppress_at_or_below}" + (f", rounded to {rt.rounding_base}" if rt.rounding_base else "")
                          + (f", with {rt.noise.mechanism} noise (epsilon {rt.noise.epsilon})" if rt.noise else ""))
    d["status"] = ("released, or withheld: at or below the threshold, or withheld so that such counts cannot be "
                   "recovered from the published margins, or at or below the threshold after noise (which of "
                   "these is not published: it would tell the cell's size)")
    d["margin"] = "margins file: the grouping columns of the margin ('total' for the grand total)"
    d["key"] = "margins file: the values of the grouping columns, joined by '|'"
    d["source"] = source_desc
    return d


# ----------------------------------------------------------------------------- job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("release_type", help="a release type of conf/privacy.yaml, e.g. cdr_od")
    parser.add_argument("--requester", default=None, help="who asks for the release (default: the OS user)")
    parser.add_argument("--override-reason", default=None,
                        help="written reason to release under a policy without approval or below the floor")


def release(spark: SparkSession, cfg: Config, release_type: str, requester: str | None = None,
            override_reason: str | None = None) -> dict[str, Any]:
    policy_path = cfg.privacy.resolved_policy_path()
    policy = load_policy(policy_path)
    rt, overridden = effective(policy, release_type, cfg.privacy.profile, override_reason)
    if overridden:
        log.warning("release %s: policy problems overridden (%s): %s", release_type, override_reason,
                    "; ".join(overridden))
    snap = snapshot(policy, release_type, rt, cfg.privacy.profile)
    phash = policy_hash(snap)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    try:
        src_spec = spec(rt.source)
    except TableError as exc:
        raise ReleaseError(f"release type {release_type}: {exc}") from None
    if not lake.exists(rt.source):
        raise ReleaseError(f"release type {release_type}: source {rt.source} does not exist yet; run "
                           f"{src_spec.owner_job} first")
    version = lake.version(rt.source)
    df = lake.read(rt.source, version=version)
    start, end = cfg.period.start, cfg.period.end
    if start and end and src_spec.period_column:
        df = df.filter(F.col(src_spec.period_column).between(F.lit(start), F.lit(end)))
    lowest = min(effective(policy, release_type, p, override_reason or "threshold of the export table")[0]
                 .suppress_at_or_below for p in policy.profiles)
    cells_spec, margins_spec = export_specs(release_type, rt, src_spec.schema, min(lowest, rt.suppress_at_or_below))
    df = df.select(*dict.fromkeys([*rt.slice_by, *rt.cells, rt.count_column, *rt.measures, *owner_inputs(rt)]))
    if df.limit(1).count() == 0:
        raise ReleaseError(f"release {release_type}: {rt.source} has no rows for the period {start}..{end}")
    df = with_parents(lake, rt, df)

    with stage(f"release.guard {release_type}") as st:
        try:
            guarded = slices.guard_all(df, rt, seed=phash, prepare=owner_prepare(cfg, rt))
        except slices.SliceError as exc:
            raise ReleaseError(f"release {release_type}: {exc}") from None
        totals = guarded.totals
        st.rows_in = totals.get("cells_in", 0)
        st.rows_out = totals.get("cells_released", 0)
        st.notes.update({k: v for k, v in totals.items() if k.startswith("withheld") or k == "slices"})
    counts = {"totals": totals, "per_slice": guarded.per_slice}
    release_id = f"{release_type}-{phash[:8]}-{guarded.content[:12]}"
    created = datetime.now(UTC).replace(microsecond=0)
    try:
        return _publish(spark, cfg, lake, policy, rt, release_type, release_id, created, snap, phash, version,
                        src_spec.description, (start, end), guarded, counts, cells_spec, margins_spec, requester,
                        override_reason, overridden)
    finally:
        guarded.release()


def _publish(spark: SparkSession, cfg: Config, lake: Lakehouse, policy: Any, rt: ReleaseType, release_type: str,
             release_id: str, created: datetime, snap: dict[str, Any], phash: str, version: int, source_desc: str,
             period: tuple[Any, Any], guarded: slices.Guarded, counts: dict[str, Any], cells_spec: TableSpec,
             margins_spec: TableSpec, requester: str | None, override_reason: str | None,
             overridden: list[str]) -> dict[str, Any]:
    start, end = period
    if rt.noise:
        dataset = rt.source
        spent = 0.0
        if lake.exists("audit.privacy_budget"):
            ledger = lake.read("audit.privacy_budget").filter(
                (F.col("dataset") == dataset) & (F.col("release_id") != release_id)
            ).agg(F.sum("epsilon").alias("e")).first()
            spent = float(ledger["e"] or 0.0) if ledger else 0.0
        if spent + rt.noise.epsilon > policy.budget.epsilon + 1e-12:
            raise ReleaseError(
                f"release {release_type}: privacy budget of {dataset} exceeded: spent epsilon {spent:g} + "
                f"{rt.noise.epsilon:g} > budget {policy.budget.epsilon:g}. Refused."
            )
    existing = lake.exists("audit.releases") and lake.read("audit.releases").filter(
        F.col("release_id") == release_id).count() > 0
    out_dir = Path(cfg.lakehouse.exports_dir)
    out_dir = (out_dir if out_dir.is_absolute() else PROJECT_ROOT / out_dir) / release_id
    if existing:
        log.info("release %s: already released with the same inputs and policy (%s)", release_type, release_id)
        return {"release_id": release_id, "path": str(out_dir), "counts": counts["totals"], "new": False}

    dims = slices.dims_of(rt)
    order = [*rt.slice_by, *dims]
    cell_cols = [*rt.slice_by, *dims, rt.count_column, "status", *rt.measures]
    margin_cols = [*rt.slice_by, "margin", "key", rt.count_column, "status"]
    # Files first (in a temporary folder), then tables, then the audit row: a failure leaves no audit row.
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with stage(f"release.files {release_type}") as st:
        publish.write_table(guarded.cells().select(*cell_cols).orderBy(*order), tmp, "cells")
        publish.write_table(guarded.margins().select(*margin_cols).orderBy(*rt.slice_by, "margin", "key"),
                            tmp, "margins")
        st.rows_out = counts["totals"].get("cells_in", 0)
        focus = slices.most_withheld(guarded.per_slice, rt.slice_by) if len(rt.cells) > 1 else None
        cells = publish.read_cells(tmp / "cells.parquet", focus)
        spatial = spatial_files(cfg, rt, cells, tmp)
        from jobs import quicklook

        plot = quicklook.draw(release_type, rt, cells, tmp / "quicklook.png")
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    manifest = {
        "release_id": release_id,
        "created_at": created.isoformat(),
        "requester": requester or getpass.getuser(),
        "release_type": release_type,
        "title": f"{release_type} ({rt.source})",
        "source": {"table": rt.source, "version": version, "period": [str(start), str(end)] if start else None},
        "policy": snap,
        "policy_hash": phash,
        "override": {"reason": override_reason, "problems": overridden} if overridden else None,
        "dimensions": {"slice_by": rt.slice_by, "cells": rt.cells, "margins": rt.margins,
                       "count_column": rt.count_column, "measures": rt.measures},
        "data_dictionary": data_dictionary(rt, source_desc),
        "counts": slices.public_counts(counts["totals"]),
        "files": files,
        "quicklook": plot,
        "spatial_files": spatial,
        "how_to_cite": CITATION.format(title=f"{release_type} statistics", release_id=release_id,
                                       created=created.date().isoformat(), threshold=rt.suppress_at_or_below,
                                       hash12=phash[:12], source=rt.source, version=version),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    files["manifest.json"] = sha256_file(tmp / "manifest.json")

    with stage(f"release.export {release_type}") as st:
        for s_, data in ((cells_spec, guarded.cells()), (margins_spec, guarded.margins())):
            sync_constraints(lake, s_.name)
            fields = s_.schema.fields
            sdf = data.withColumn("release_id", F.lit(release_id)).select(
                *[F.col(f.name).cast(f.dataType).alias(f.name) for f in fields])
            lake.write(sdf, s_.name, mode="append")
            lake.spark.sql(f"ALTER TABLE delta.`{lake.location(s_.name)}` SET TBLPROPERTIES "
                           f"('migralake.policy_hash' = '{phash}', 'migralake.last_release' = '{release_id}')")
        st.rows_out = counts["totals"].get("cells_in", 0)
        if rt.noise:
            lake.write(spark.createDataFrame([(rt.source, release_id, created.replace(tzinfo=None),
                                               float(rt.noise.epsilon), float(rt.noise.delta or 0.0))],
                                             schema=BUDGET.schema), "audit.privacy_budget", mode="append")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        row = (release_id, created.replace(tzinfo=None), manifest["requester"], release_type,
               json.dumps(snap, sort_keys=True), phash, override_reason if overridden else None,
               "; ".join(overridden) if overridden else None,
               json.dumps({rt.source: version}), start, end, json.dumps(counts, sort_keys=True),
               json.dumps(files, sort_keys=True), str(out_dir))
        lake.write(spark.createDataFrame([row], schema=RELEASES.schema), "audit.releases", mode="append")
    withheld = counts["totals"]["withheld"]
    log.info("release %s: %s -> %s (%d cells, %d withheld)", release_type, release_id, out_dir,
             counts["totals"].get("cells_in", 0), withheld)
    return {"release_id": release_id, "path": str(out_dir), "counts": counts["totals"], "new": True}


def run(spark: SparkSession, cfg: Config, args: argparse.Namespace) -> int:
    try:
        out = release(spark, cfg, args.release_type, args.requester, args.override_reason)
    except (ReleaseError, PolicyError, guard.GuardError) as exc:
        print(f"migralake: release refused: {exc}")
        return 4
    print(json.dumps(out, indent=2, default=str))
    return 0
