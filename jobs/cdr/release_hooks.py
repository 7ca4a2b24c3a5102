"""What the CDR pipeline adds to releases of its tables: admin1 parents of admin2 units, unit polygons, plots.

Registered under the owner name ``cdr`` when this module is imported (jobs/release.py does).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib import geo, publish
from lib.config import Config
from lib.privacy.hooks import ReleaseHooks, register
from lib.privacy.policy import ReleaseType
from lib.privacy.release import ReleaseError
from lib.runtime import log
from lib.tables import Lakehouse


def parents(lake: Lakehouse, rt: ReleaseType, df: DataFrame) -> DataFrame:
    """Add the parent columns named by the hierarchy (admin1 of each admin2 unit), as a Spark join.

    Rows at another spatial level than the child's (e.g. admin1 rows next to admin2 ones) are their own
    parent; an admin2 unit with no parent is an error naming the units.
    """
    for child, parent in rt.hierarchy.items():
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


def polygons(cfg: Config, rt: ReleaseType, cells: pd.DataFrame) -> tuple[Any, str, str] | None:
    """Polygons of the units of a release keyed by one unit at one spatial level (admin boundaries or H3)."""
    if "unit" not in rt.cells or "spatial_unit" not in cells.columns:
        return None
    levels = set(cells["spatial_unit"].dropna())
    if len(levels) != 1:
        return None
    level = levels.pop()
    if level.startswith("h3_"):
        return publish.h3_polygons(cells["unit"], "unit"), "unit", level
    if level in cfg.cdr.admin_paths:
        return geo.read_boundaries(cfg.cdr.admin_paths[level], level).rename(columns={level: "unit"}), "unit", level
    log.warning("release: no boundaries for spatial unit %s (cdr.admin_paths); no GeoJSON written", level)
    return None


def _draw(release_type: str, rt: ReleaseType, cells: pd.DataFrame, path: Any) -> str:
    from jobs.cdr import quicklook

    return quicklook.draw(release_type, rt, cells, path)


def one_level(cfg: Config, rt: ReleaseType, df: DataFrame) -> DataFrame:
    """The rows at the spatial unit of this run (cdr.spatial_unit): one level per release. With the default
    daily-location rule a region's count is the sum of its districts', so two levels of one day would let an
    attacker subtract; the release refuses a day already published at another level."""
    if "spatial_unit" not in df.columns:
        return df
    return df.filter(F.col("spatial_unit") == cfg.cdr.spatial_unit)


def event_slice(cfg: Config, rt: ReleaseType) -> dict[str, str] | None:
    """The flows into the event day (cdr_od: a row of ``date`` goes from that day's location to the next
    day's, so the day before the event) or the first week after it (cdr_displacement)."""
    if "week_since_event" in rt.slice_by:
        return {"week_since_event": "0"}
    if "date" in rt.slice_by and cfg.cdr.event_date:
        return {"date": (cfg.cdr.event_date - timedelta(days=1)).isoformat()}
    return None


HOOKS = register("cdr", ReleaseHooks(parents=parents, polygons=polygons, draw=_draw, rows=one_level,
                                     level_column="spatial_unit", event=event_slice))
