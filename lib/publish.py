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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
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


# What each release type's count column counts: a threshold means "15 subscribers" or "15 pixels".
COUNT_UNITS = {"n_subscribers": "subscribers (distinct pseudonymised SIMs)",
               "n_users": "authors (distinct pseudonymised accounts)",
               "n_pixels_valid": "valid pixels (an area, not people: about 0.0009 km2 each for Landsat)"}


def data_dictionary(slice_by: list[str], cells: list[str], measures: list[str], count_column: str,
                    threshold: int, rounding_base: int | None, noise: str | None, source_desc: str) -> dict[str, str]:
    d = {c: f"slice: one protected table per value ({c})" for c in slice_by}
    d.update({c: "cell dimension" for c in cells})
    d.update({m: "measure of the cell (see the source description); empty when the cell is withheld"
              for m in measures})
    d[count_column] = (f"{COUNT_UNITS.get(count_column, 'distinct contributors')}; null when withheld. "
                       f"Released only above {threshold}"
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
    # The cell's own resolution: a cell coarsened to its parent (e.g. in a sensitive zone) says so.
    return gpd.GeoDataFrame({column: uniq, "h3_cell_resolution": [h3.get_resolution(u) for u in uniq]},
                            geometry=shapes, crs=4326)


def spatial_files(cells: pd.DataFrame, polygons: Any, key: str, count_column: str, folder: Path,
                  what: str, integers: Sequence[str] = ()) -> str:
    """cells.geojson and cells.geoparquet: one feature per guarded cell with its unit's polygon.

    Withheld cells keep an empty count and their status. Every cell must have a polygon."""
    import geopandas as gpd

    out = polygons.merge(cells, on=key, how="inner")
    for c in integers:  # integer columns with empty (withheld) values stay integers, not 44.0
        if c in out.columns:
            out[c] = out[c].astype("Int64")
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


# ----------------------------------------------------------------------------- STAC


@dataclass(frozen=True)
class StacInfo:
    """What a release's STAC item says beyond its files."""

    release_id: str
    title: str
    description: str
    created: datetime
    start: date | None
    end: date | None
    publisher: str | None
    contact: str | None
    licence: str
    url: str | None
    extra: dict[str, Any]


MEDIA = {".csv": ("text/csv", ["data"]), ".parquet": ("application/vnd.apache.parquet", ["data"]),
         ".geoparquet": ("application/vnd.apache.parquet", ["data"]),
         ".geojson": ("application/geo+json", ["data"]),
         ".tif": ("image/tiff; application=geotiff; profile=cloud-optimized", ["data"]),
         ".png": ("image/png", ["overview"]), ".json": ("application/json", ["metadata"]),
         ".sig": ("text/plain", ["metadata"]), ".pub": ("text/plain", ["metadata"])}
STAC_FILE = "stac-item.json"
LATER = ("manifest.json", "manifest.sig", "signing_key.pub")  # written after the item, in the same folder


def _raster_footprint(path: Path) -> tuple[tuple[float, float, float, float], str | None, list[int], list[float]]:
    """EPSG:4326 bounds, the CRS code, shape and transform of a GeoTIFF."""
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as src:
        epsg = src.crs.to_epsg() if src.crs else None
        bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds) if src.crs else src.bounds
        return (tuple(bounds), f"EPSG:{epsg}" if epsg else None,  # type: ignore[return-value]
                [src.height, src.width], list(src.transform)[:6])


def stac_item(folder: Path, info: StacInfo) -> str:
    """``stac-item.json``: a STAC 1.1 Item for the release describing every file of the folder (media type,
    role, CRS of each raster through the projection extension), with the release's spatial extent (the union
    of its cells' polygons and rasters, EPSG:4326), its period, licence and publisher. Returns a caption."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from shapely.geometry import box, mapping

    boxes: list[tuple[float, float, float, float]] = []
    rasters: dict[str, tuple[str | None, list[int], list[float]]] = {}
    if (folder / "cells.geoparquet").exists():
        import geopandas as gpd

        boxes.append(tuple(gpd.read_parquet(folder / "cells.geoparquet").total_bounds.tolist()))  # type: ignore[arg-type]
    for tif in sorted(folder.glob("*.tif")):
        bounds, code, shape, transform = _raster_footprint(tif)
        boxes.append(bounds)
        rasters[tif.name] = (code, shape, transform)
    bbox = ([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
            if boxes else None)
    both = info.start is not None and info.end is not None
    start = datetime.combine(info.start, time.min, UTC) if both and info.start else None
    end = datetime.combine(info.end, time.max.replace(microsecond=0), UTC) if both and info.end else None
    props: dict[str, Any] = {"title": info.title, "description": info.description,
                             "created": info.created.isoformat().replace("+00:00", "Z"), **info.extra}
    item = pystac.Item(id=info.release_id, geometry=mapping(box(*bbox)) if bbox else None, bbox=bbox,
                       datetime=None if start else info.created, start_datetime=start, end_datetime=end,
                       properties=props)
    item.common_metadata.license = info.licence
    if info.publisher:
        item.common_metadata.providers = [pystac.Provider(
            name=info.publisher, roles=[pystac.ProviderRole.PRODUCER, pystac.ProviderRole.LICENSOR,
                                        pystac.ProviderRole.HOST],
            url=info.url, description=f"contact: {info.contact}" if info.contact else None)]
    names = sorted({p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()} | set(LATER))
    for name in names:
        if name == STAC_FILE:
            continue
        media, roles = MEDIA.get(Path(name).suffix, ("application/octet-stream", ["data"]))
        asset = pystac.Asset(href=f"./{name}", media_type=media, roles=roles, title=name)
        item.add_asset(name.replace(".", "_"), asset)
        if name in rasters:
            code, shape, transform = rasters[name]
            proj = ProjectionExtension.ext(asset, add_if_missing=True)
            proj.apply(code=code, shape=shape, transform=transform)
    if boxes:  # the vector files are in EPSG:4326 (GeoJSON: CRS84)
        ProjectionExtension.ext(item, add_if_missing=True).apply(code="EPSG:4326")
    (folder / STAC_FILE).write_text(json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False),
                                               indent=2) + "\n", encoding="utf-8")
    return (f"{STAC_FILE}: STAC 1.1 item of the release ({len(names)} files, extent "
            + (", ".join(f"{v:.4f}" for v in bbox) if bbox else "none") + f", licence {info.licence})")
