"""Partner files of a release: tables, spatial files, quick-look plot, data dictionary, checksums.

Spark writes the guarded rows, sorted, as a single Parquet file; the CSV is then
streamed from it in Arrow batches (integers stay integers, withheld counts are
empty, dates are ISO dates), so the driver holds one batch at a time whatever
the size of the release.

Text is made safe for the programs partners open it with: a CSV text cell that
starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
single quote (OWASP's advice against formula injection; :func:`csv_safe`), and
text drawn on a plot has matplotlib's math markers escaped (:func:`plot_text`).
The Parquet files keep the values as they are.

Reads and writes no tables.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame

_NULLABLE = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}  # integers stay integers
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as a formula, prefixed with a single quote."""
    out = frame
    for col in frame.columns:
        if frame[col].dtype != object:
            continue
        values = frame[col]
        risky = values.map(lambda v: isinstance(v, str) and v.startswith(FORMULA_START))
        if risky.any():
            if out is frame:
                out = frame.copy()
            out.loc[risky, col] = "'" + values[risky].astype(str)
    return out


def csv_unsafe(values: pd.Series) -> pd.Series:
    """The inverse of :func:`csv_safe` on one column read back as text (for comparing CSV and Parquet)."""
    quoted = values.str.startswith("'") & values.str[1:2].isin(list(FORMULA_START))
    return values.where(~quoted, values.str[1:])


def plot_text(value: Any) -> str:
    """Text for a plot label: matplotlib would read ``$...$`` as mathematics (and fail on ``$^$``)."""
    return str(value).replace("$", r"\$")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Signer(Protocol):
    @property
    def public_hex(self) -> str: ...

    def sign(self, data: bytes) -> str: ...


SIGNED = ("manifest.sig", "signing_key.pub")  # written after the manifest, so not listed in it


def write_manifest(folder: Path, manifest: Mapping[str, Any], signer: Signer) -> str:
    """manifest.json, its detached Ed25519 signature (manifest.sig, hex) and the public key
    (signing_key.pub, hex); returns the signature."""
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    (folder / "manifest.json").write_bytes(body)
    signature = signer.sign(body)
    (folder / "manifest.sig").write_text(signature + "\n")
    (folder / "signing_key.pub").write_text(signer.public_hex + "\n")
    return signature


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
            frame = csv_safe(batch.to_pandas(types_mapper=_NULLABLE.get))
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


# ----------------------------------------------------------------------------- what comes with the tables


def data_dictionary(slice_by: list[str], cells: list[str], measures: list[str], count_column: str,
                    threshold: int, rounding_base: int | None, noise: str | None, source_desc: str) -> dict[str, str]:
    d = {c: f"slice: one protected table per value ({c})" for c in slice_by}
    d.update({c: "cell dimension" for c in cells})
    d.update({m: "measure of the cell (see the source description); empty when the cell is withheld"
              for m in measures})
    d[count_column] = (f"distinct contributors; null when withheld. Released only above {threshold}"
                       + (f", rounded to {rounding_base}" if rounding_base else "") + (f", with {noise}" if noise else ""))
    d["status"] = ("released, or withheld: at or below the threshold, or withheld so that such counts cannot be "
                   "recovered from the published margins, or at or below the threshold after noise (which of "
                   "these is not published: it would tell the cell's size)")
    d["margin"] = "margins file: the grouping columns of the margin ('total' for the grand total)"
    d["key"] = "margins file: the values of the grouping columns, joined by '|'"
    d["source"] = source_desc
    d["text cells"] = ("in the CSV files a text value starting with = + - @, a tab or a carriage return has a "
                       "leading ' so that spreadsheets show it as text; the Parquet files hold it unchanged")
    return d


def h3_polygons(cells: pd.Series, column: str) -> Any:
    """One polygon (EPSG:4326) per distinct H3 cell of ``cells``."""
    import geopandas as gpd
    import h3
    from shapely.geometry import Polygon

    uniq = list(cells.dropna().unique())
    shapes = [Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(u)]) for u in uniq]
    return gpd.GeoDataFrame({column: uniq}, geometry=shapes, crs=4326)


def spatial_files(cells: pd.DataFrame, polygons: Any, key: str, count_column: str, folder: Path,
                  what: str) -> str:
    """cells.geojson and cells.geoparquet: one feature per guarded cell with its unit's polygon.

    Withheld cells keep an empty count and their status. Every cell must have a polygon."""
    import geopandas as gpd

    out = polygons.merge(cells, on=key, how="inner")
    missing = set(cells[key].dropna()) - set(out[key])
    if missing:
        raise ValueError(f"units {sorted(map(str, missing))[:5]} have no polygon ({what})")
    text = {c: str for c in out.columns if c not in ("geometry", count_column)
            and not pd.api.types.is_numeric_dtype(out[c])}  # dates and keys as text: GeoJSON has no dates
    out = gpd.GeoDataFrame(out.astype(text), geometry="geometry", crs=4326)
    out.to_file(folder / "cells.geojson", driver="GeoJSON")
    out.to_parquet(folder / "cells.geoparquet")
    return f"cells.geojson and cells.geoparquet: one feature per cell with its {what} polygon (EPSG:4326)"


def draw_generic(release_type: str, slice_by: list[str], cells: pd.DataFrame, path: Path) -> str:
    """Released and withheld cells per value of the first slice column (for types without their own plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = slice_by[0] if slice_by else None
    fig, ax = plt.subplots(figsize=(8, 4))
    if key:
        tab = cells.assign(**{key: cells[key].map(plot_text)}).groupby([key, "status"]).size().unstack(fill_value=0)
        tab.plot(kind="bar", stacked=True, ax=ax)
    ax.set_title(plot_text(f"{release_type}: cells by status"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"{release_type}: released and withheld cells per {key}"
