"""Guard every slice of a release on the executors: one grouped pandas function per slice.

The source rows never reach the driver. Each Spark task receives the rows of one
slice (e.g. one day's OD matrix at one spatial unit), lets the owning pipeline
prepare them (``prepare``: e.g. coarsen H3 cells in sensitive zones), guards them
(:func:`lib.privacy.guard.protect`), attaches the measures of released cells, and
returns the guarded cells and margins plus one summary row: the slice's counts,
the SHA-256 of its prepared input (for the release id), the guard's seconds, or
the reason it could not be guarded. The driver collects only the summaries, one
per slice; the guarded rows go straight to the export tables and files.

The same code runs on ``local[*]`` and on a cluster; the result does not depend on
how the slices are spread over tasks (each slice is sorted before it is guarded).

Reads and writes no tables.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.privacy import guard
from lib.privacy.policy import ReleaseType

ROW, SUMMARY = "_row", "_summary"
WITHHELD = "withheld"
PUBLIC_COUNTS = ("cells_in", "margins_in", "slices", "withheld", "noised_or_rounded")
WITHHELD_REASONS = ("withheld_primary", "withheld_complementary", "withheld_after_noise")  # summed: "withheld"
Prepare = Callable[[pd.DataFrame], tuple[pd.DataFrame, dict[str, int]]]


class SliceError(RuntimeError):
    """A slice that cannot be guarded; the message names the slice and the reason. Nothing is published."""


@dataclass
class Guarded:
    """The guarded rows (a Spark DataFrame, cells and margins) and what the driver learned per slice."""

    rows: DataFrame
    per_slice: list[dict[str, Any]]
    totals: dict[str, int] = field(default_factory=dict)
    content: str = ""  # SHA-256 over every slice's prepared input
    persisted: DataFrame | None = None

    def release(self) -> None:
        if self.persisted is not None:
            self.persisted.unpersist()

    def also_withhold(self, extra: DataFrame, keys: list[str], rt: ReleaseType) -> Guarded:
        """The same release with the cells of ``extra`` (its ``keys``: slice and cell columns) withheld too:
        status withheld, count and measures empty; counted as complementary in the totals and per slice."""
        marked = extra.select(*keys).withColumn("_more", F.lit(True))
        cond = [self.rows[k].eqNullSafe(marked[k]) for k in keys]
        joined = self.rows.join(marked, on=cond, how="left").select(self.rows["*"], marked["_more"])
        more = (F.col(ROW) == "cell") & F.col("_more").isNotNull()
        rows = joined.withColumn("status", F.when(more, F.lit(WITHHELD)).otherwise(F.col("status")))
        for c in [rt.count_column, *rt.measures]:
            rows = rows.withColumn(c, F.when(more, F.lit(None).cast(joined.schema[c].dataType)).otherwise(F.col(c)))
        rows = rows.select(*self.rows.columns)
        n = extra.count()
        by_slice: dict[str, int] = {}
        for r in extra.groupBy(*rt.slice_by).count().collect() if rt.slice_by else []:
            k = json.dumps({c: str(r[c]) for c in rt.slice_by}, sort_keys=True)
            by_slice[k] = int(r["count"])
        per_slice = []
        for s_ in self.per_slice:
            k = json.dumps({c: str(s_[c]) for c in rt.slice_by}, sort_keys=True)
            add = by_slice.get(k, 0)
            per_slice.append({**s_, "withheld_complementary": s_.get("withheld_complementary", 0) + add,
                              "cells_released": s_.get("cells_released", 0) - add})
        totals = dict(self.totals)
        for key, delta in (("withheld_complementary", n), ("withheld", n), ("withheld_across_slices", n),
                           ("cells_released", -n)):
            totals[key] = totals.get(key, 0) + delta
        return Guarded(rows, per_slice, totals, self.content, self.persisted)

    def cells(self) -> DataFrame:
        return self.rows.filter(F.col(ROW) == "cell").drop(ROW, SUMMARY, "margin", "key")

    def margins(self) -> DataFrame:
        return self.rows.filter(F.col(ROW) == "margin").drop(ROW, SUMMARY)


def dims_of(rt: ReleaseType) -> list[str]:
    """Cell columns plus the parent columns the margins group by."""
    extra = list(dict.fromkeys(c for m in rt.margins for c in m if c not in rt.cells))
    return [*rt.cells, *extra]


def output_schema(rt: ReleaseType, source: T.StructType) -> T.StructType:
    by_name = {f.name: f.dataType for f in source.fields}
    fields = [T.StructField(ROW, T.StringType(), False)]
    fields += [T.StructField(c, by_name[c], True) for c in rt.slice_by]
    fields += [T.StructField(c, by_name.get(c, T.StringType()), True) for c in dims_of(rt)]
    fields += [T.StructField(rt.count_column, T.LongType(), True), T.StructField("status", T.StringType(), True)]
    # Counts stay integers (a partner reads 44, not 44.0); every other measure is a double.
    fields += [T.StructField(m, T.LongType() if m in integral_measures(rt, source) else T.DoubleType(), True)
               for m in rt.measures]
    fields += [T.StructField("margin", T.StringType(), True), T.StructField("key", T.StringType(), True),
               T.StructField(SUMMARY, T.StringType(), True)]
    return T.StructType(fields)


def integral_measures(rt: ReleaseType, source: T.StructType) -> tuple[str, ...]:
    """The measures that are integers in the source table."""
    by_name = {f.name: f.dataType for f in source.fields}
    return tuple(m for m in rt.measures if isinstance(by_name.get(m), T.IntegralType))


def digest(frame: pd.DataFrame) -> str:
    """SHA-256 of a frame's values in a canonical row and column order."""
    cols = sorted(frame.columns)
    canon = frame[cols].sort_values(cols).reset_index(drop=True)
    return hashlib.sha256(pd.util.hash_pandas_object(canon, index=False).to_numpy().tobytes()).hexdigest()


def guard_slice(pdf: pd.DataFrame, rt: ReleaseType, schema_names: list[str],
                prepare: Prepare | None, integral: tuple[str, ...] = ()) -> pd.DataFrame:
    """Guard one slice (all rows share the slice columns); cells, margins and one summary row."""
    started = time.perf_counter()
    key = tuple(pdf[c].iloc[0] for c in rt.slice_by) if len(pdf) else ()
    key_text = dict(zip(rt.slice_by, map(str, key), strict=True))
    dims = dims_of(rt)
    prepared: dict[str, int] = {}
    summary: dict[str, Any] = {"slice": key_text}
    try:
        frame = pdf
        if prepare is not None:
            frame, prepared = prepare(frame)
        guard.validate(frame, dims, rt.count_column, rt.margins)  # before anything reads the columns
        frame = frame.sort_values(dims).reset_index(drop=True)
        summary["digest"] = digest(frame)
        noise = rt.noise.model_dump() if rt.noise else None
        p = guard.protect(frame[dims + [rt.count_column]], dims, rt.count_column, rt.suppress_at_or_below,
                          rt.margins, rounding_base=rt.rounding_base, noise=noise)
        if not (rt.noise or rt.rounding_base):
            # Belt and braces: the attacker's check on exactly what will be published, before anything is.
            found = guard.check_published(p.cells, p.margins, dims, rt.count_column, rt.suppress_at_or_below,
                                          rt.margins)
            if found:
                raise guard.GuardError("the attacker check failed on the guarded slice: " + "; ".join(found[:3]))
    except guard.GuardError as exc:
        summary["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure refuses the release, naming the slice
        summary["error"] = f"{type(exc).__name__}: {exc}"
    if "error" in summary:
        out = pd.DataFrame({c: [None] for c in schema_names})
        out[ROW] = "summary"
        for c, v in zip(rt.slice_by, key, strict=True):
            out[c] = v
        out[SUMMARY] = json.dumps(summary, default=str)
        return out[schema_names]
    cells = p.cells
    # Published statuses say released or withheld, never why: a "primary" status would tell an attacker the
    # cell is at or below the threshold. The reasons are counted in the summary for the audit record only.
    cells["status"] = cells["status"].where(cells["status"] == guard.RELEASED, WITHHELD)
    if rt.measures:
        cells = cells.merge(frame[dims + rt.measures], on=dims, how="left", validate="one_to_one")
        cells.loc[cells["status"] != guard.RELEASED, rt.measures] = np.nan
    cells[ROW] = "cell"
    margins = p.margins.copy()
    margins["status"] = margins["status"].where(margins["status"] == guard.RELEASED, WITHHELD)
    margins[ROW] = "margin"
    summary["counts"] = {**p.counts, **prepared, "cells_released": int((cells["status"] == guard.RELEASED).sum())}
    summary["seconds"] = round(time.perf_counter() - started, 3)
    tail = pd.DataFrame({ROW: ["summary"], SUMMARY: [json.dumps(summary, default=str)]})
    out = pd.concat([cells, margins, tail], ignore_index=True)
    for c, v in zip(rt.slice_by, key, strict=True):
        out[c] = v
    for c in schema_names:
        if c not in out.columns:
            out[c] = None
    for c in (rt.count_column, *integral):
        out[c] = out[c].astype("Int64")
    for c in ("margin", "key", SUMMARY, "status"):  # all-empty text columns must not become floats
        out[c] = out[c].astype(object).where(out[c].notna(), None)
    return out[schema_names]


def guard_all(df: DataFrame, rt: ReleaseType, prepare: Prepare | None = None) -> Guarded:
    """Guard every slice of ``df`` on the executors; collects the per-slice summaries only.

    Raises SliceError (naming the slice and reason) when any slice cannot be guarded.
    The returned rows are persisted until :meth:`release` (unpersist) is called.
    """
    schema = output_schema(rt, df.schema)
    names = schema.fieldNames()
    integral = integral_measures(rt, df.schema)
    group = list(rt.slice_by)
    if not group:
        df = df.withColumn("_slice", F.lit(0))
        group = ["_slice"]
    cols = list(dict.fromkeys([*group, *df.columns]))

    def fn(pdf: pd.DataFrame) -> pd.DataFrame:
        return guard_slice(pdf.drop(columns=["_slice"], errors="ignore"), rt, names, prepare, integral)

    rows = df.select(*cols).groupBy(*group).applyInPandas(fn, schema=schema).persist()
    summaries = [json.loads(r[SUMMARY]) for r in rows.filter(F.col(ROW) == "summary").select(SUMMARY).collect()]
    summaries.sort(key=lambda s: json.dumps(s["slice"], sort_keys=True))
    errors = [s for s in summaries if "error" in s]
    if errors:
        rows.unpersist()
        first = errors[0]
        raise SliceError(f"slice {first['slice']}: {first['error']}"
                         + (f" (and {len(errors) - 1} more slices)" if len(errors) > 1 else "")
                         + ". Nothing was published.")
    totals: dict[str, int] = {}
    for s in summaries:
        for k, v in s["counts"].items():
            totals[k] = totals.get(k, 0) + int(v)
    totals["slices"] = len(summaries)
    totals["withheld"] = sum(totals.get(k, 0) for k in WITHHELD_REASONS)
    content = hashlib.sha256("\n".join(f"{json.dumps(s['slice'], sort_keys=True)} {s['digest']}"
                                       for s in summaries).encode()).hexdigest()
    per_slice = [{**s["slice"], **s["counts"], "seconds": s["seconds"]} for s in summaries]
    return Guarded(rows.filter(F.col(ROW) != "summary"), per_slice, totals, content, rows)


def public_counts(totals: dict[str, int]) -> dict[str, int]:
    """What partners may see of a release's counts: sizes and how many withheld, not why (the split into
    primary and complementary, and the complementary cells' summed count, stay in the audit record)."""
    keep = set(PUBLIC_COUNTS) | {k for k in totals if k.startswith(("cells_coarsened", "sensitive"))}
    return {k: v for k, v in totals.items() if k in keep}


def most_withheld(per_slice: Iterable[dict[str, Any]], slice_by: list[str]) -> dict[str, str] | None:
    """The slice (as {column: text}) with the most withheld cells, for plots and reports."""
    best = max(per_slice, key=lambda s: s.get("withheld_primary", 0) + s.get("withheld_complementary", 0),
               default=None)
    return {c: best[c] for c in slice_by} if best else None
