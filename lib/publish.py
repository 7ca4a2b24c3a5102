"""Partner files of a release: one Parquet and one CSV file per table, written without collecting it.

Spark writes the guarded rows, sorted, as a single Parquet file; the CSV is then
streamed from it in Arrow batches (integers stay integers, withheld counts are
empty, dates are ISO dates), so the driver holds one batch at a time whatever
the size of the release.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame

_NULLABLE = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}  # integers stay integers


def write_table(df: DataFrame, folder: Path, name: str) -> tuple[Path, Path]:
    """``<folder>/<name>.parquet`` and ``<name>.csv`` from a (sorted) Spark DataFrame."""
    staging = folder / f".{name}.spark"
    shutil.rmtree(staging, ignore_errors=True)
    df.coalesce(1).write.mode("overwrite").parquet(str(staging))
    parts = sorted(staging.glob("part-*.parquet"))
    target = folder / f"{name}.parquet"
    if len(parts) == 1:
        parts[0].rename(target)
    else:  # an empty frame writes no part file: an empty table with the schema
        pq.write_table(pa.Table.from_pandas(df.limit(0).toPandas(), preserve_index=False), target)
    shutil.rmtree(staging, ignore_errors=True)
    csv = folder / f"{name}.csv"
    source = pq.ParquetFile(target)
    with csv.open("w", encoding="utf-8", newline="") as fh:
        header = True
        for batch in source.iter_batches(batch_size=65_536):
            frame = batch.to_pandas(types_mapper=_NULLABLE.get)
            frame.to_csv(fh, index=False, header=header)
            header = False
        if header:  # no rows: the header alone
            source.schema_arrow.empty_table().to_pandas().to_csv(fh, index=False)
    return target, csv


def read_cells(path: Path, only: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The cells of a written release as pandas, optionally only one slice (values compared as text),
    read batch by batch so that only the selected rows are held."""
    source = pq.ParquetFile(path)
    if not only:
        return source.read().to_pandas()
    parts = []
    for batch in source.iter_batches(batch_size=65_536):
        frame = batch.to_pandas()
        mask = pd.Series(True, index=frame.index)
        for col, value in only.items():
            mask &= frame[col].astype(str) == value
        if mask.any():
            parts.append(frame[mask])
    return pd.concat(parts, ignore_index=True) if parts else source.schema_arrow.empty_table().to_pandas()
