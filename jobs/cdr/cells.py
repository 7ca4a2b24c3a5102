"""What the CDR jobs share: the cells valid on an event's date, and the period a job needs.

Reads and writes no tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lib.config import Config, ConfigError


def join_valid_cells(
    events: DataFrame, cells: DataFrame, how: str, columns: Mapping[str, str] | None = None
) -> DataFrame:
    """Events joined to the row of their cell that is valid on the event date.

    Cells can move or be re-numbered: a row applies from ``valid_from`` to ``valid_to``
    (both inclusive, null = open). The cells table is small and broadcast. The result
    has ``_cell`` (null when no row applies, for ``how="left"``) plus ``columns`` of
    the cells table renamed as given.
    """
    extra = [F.col(k).alias(v) for k, v in (columns or {}).items()]
    c = cells.select(
        F.col("cell_id").alias("_cell"), F.col("valid_from").alias("_from"), F.col("valid_to").alias("_to"), *extra
    )
    cond = (F.col("cell_id") == F.col("_cell")) & (F.col("_from").isNull() | (F.col("event_date") >= F.col("_from"))) \
        & (F.col("_to").isNull() | (F.col("event_date") <= F.col("_to")))
    return events.join(F.broadcast(c), on=cond, how=how).drop("_from", "_to")


def require_period(cfg: Config, job: str) -> tuple[date, date]:
    if cfg.period.start is None or cfg.period.end is None:
        raise ConfigError(f"{job} needs a period: --period START:END (or period.start / period.end)")
    return cfg.period.start, cfg.period.end
