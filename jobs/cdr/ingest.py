"""CDR ingest: event files + cells table -> bronze.cdr_events, silver.cdr_cells, quarantines.

Reads: event files named in ``cdr.inputs`` (CSV or Parquet, FlowDB layout or
mapped through ``cdr.column_mapping``), ``cdr.cells_path``, ``cdr.admin_paths``.
Writes: ``silver.cdr_cells``, ``quarantine.cdr_cells``, ``bronze.cdr_events``
and ``quarantine.cdr_events`` for the configured period (re-running replaces it).

Every input row ends in exactly one of bronze or quarantine (checked: rows in =
accepted + quarantined). Subscriber ids of both parties are replaced by keyed
HMAC-SHA256 pseudonyms before anything is written; other identifiers in the
files (IMSI, IMEI, ...) are never read.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.cdr.cells import join_valid_cells, require_period
from lib import geo
from lib.config import CdrInput, CdrSettings, Config, ConfigError
from lib.privacy.pseudonym import load_key, with_pseudonyms
from lib.runtime import log, stage
from lib.spark import from_pandas
from lib.tables import Lakehouse, spec

DESCRIPTION = "CDR event files + cells -> bronze.cdr_events (pseudonymised) and quarantine.cdr_events"

# Our column names -> FlowDB names (the default mapping).
REQUIRED = ("start_time", "msisdn", "location_id")
OPTIONAL = ("msisdn_counterpart", "outgoing", "duration")
MSISDN_PATTERN = r"^[0-9]{6,15}$"
REASONS = (
    "malformed_row",
    "unparseable_time",
    "null_subscriber",
    "malformed_subscriber",
    "outside_period",
    "unknown_cell",
    "bad_outgoing",
    "bad_duration",
    "duplicate",
)
TRUE_WORDS = ("1", "true", "t", "yes", "y")
FALSE_WORDS = ("0", "false", "f", "no", "n")
CORRUPT = "_corrupt_record"


class InputError(ValueError):
    """An input file set that cannot be read as events; names the path and the reason."""


# ----------------------------------------------------------------------------- extract


def read_csv(spark: SparkSession, path: str) -> DataFrame:
    """CSV event files as RFC 4180 text: every column a string, ``""`` an escaped quote, quoted newlines kept
    inside their field, and a row whose fields do not match the header marked in ``_corrupt_record`` (never
    stored: it holds the raw line) instead of shifting columns or failing the job."""
    header = spark.read.option("header", True).option("multiLine", True).option("escape", '"').csv(path).columns
    if CORRUPT in header:
        raise InputError(f"{path}: a column is named {CORRUPT}, which the reader needs for itself")
    schema = T.StructType([T.StructField(c, T.StringType(), True) for c in header]
                          + [T.StructField(CORRUPT, T.StringType(), True)])
    return (spark.read.schema(schema).option("header", True).option("multiLine", True).option("escape", '"')
            .option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT).csv(path))


def read_events(spark: SparkSession, source: CdrInput, mapping: dict[str, str]) -> DataFrame:
    """Raw rows of one input as strings, renamed to our column names, with source_file."""
    try:
        raw = read_csv(spark, source.path) if source.format == "csv" else spark.read.parquet(source.path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - AnalysisException for missing paths and more
        raise InputError(f"{source.path}: cannot read {source.format} event files: {exc}") from None
    cols = {}
    for ours in (*REQUIRED, *OPTIONAL):
        theirs = mapping.get(ours, ours)
        if theirs in raw.columns:
            cols[ours] = F.col(f"`{theirs}`").cast("string")
        elif ours in REQUIRED:
            raise InputError(
                f"{source.path}: required column '{theirs}' (for {ours}) not found; columns are "
                f"{raw.columns}. Map it with cdr.column_mapping.{ours}"
            )
        else:
            cols[ours] = F.lit(None).cast("string")
    malformed = F.col(CORRUPT).isNotNull() if CORRUPT in raw.columns else F.lit(False)
    return raw.select(
        *[c.alias(n) for n, c in cols.items()],
        F.lit(source.event_type).alias("event_type"),
        F.input_file_name().alias("source_file"),
        malformed.alias("_malformed"),
    )


def read_cells(path: str) -> pd.DataFrame:
    """The cells table (small: read on the driver)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: cells file not found")
    df = pd.read_csv(p, dtype=str, keep_default_na=False) if p.suffix != ".parquet" else pd.read_parquet(p)
    missing = {"cell_id", "longitude", "latitude"} - set(df.columns)
    if missing:
        raise InputError(f"{path}: cells table lacks columns {sorted(missing)} (has {list(df.columns)})")
    for col in ("site_id", "valid_from", "valid_to"):
        if col not in df.columns:
            df[col] = ""
    return df


# ----------------------------------------------------------------------------- transform


def place_cells(cells: pd.DataFrame, cdr: CdrSettings, source_file: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(usable cells with H3 and admin areas, quarantined cells with reasons)."""
    rows = cells.copy()
    rows["source_file"] = source_file
    rows["longitude"] = pd.to_numeric(rows["longitude"], errors="coerce")
    rows["latitude"] = pd.to_numeric(rows["latitude"], errors="coerce")
    for col in ("valid_from", "valid_to"):
        rows[col] = pd.to_datetime(rows[col].replace("", None), errors="coerce", format="ISO8601").dt.date
    bad_coord = rows["longitude"].isna() | rows["latitude"].isna() | ~rows["latitude"].between(-90, 90) \
        | ~rows["longitude"].between(-180, 180)
    bad_id = rows["cell_id"].isna() | (rows["cell_id"].str.strip() == "")
    reasons = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    reasons[bad_id] = "missing cell_id"
    reasons[bad_coord & reasons.isna()] = "invalid or missing coordinates"
    ok = rows[reasons.isna()]
    if not ok.empty:
        boundaries = {level: geo.read_boundaries(path, level) for level, path in sorted(cdr.admin_paths.items())}
        placed = geo.assign_areas(ok, boundaries, cdr.nearest_area_max_km)
        reasons.loc[placed.index] = placed["unassigned_reason"]
        for level in boundaries:
            rows.loc[placed.index, level] = placed[level]
        rows.loc[placed.index, "assignment"] = placed["assignment"]
        rows.loc[placed.index, "h3_index"] = geo.h3_cells(
            placed["latitude"].to_numpy(), placed["longitude"].to_numpy(), cdr.h3_resolution
        )
    # Overlapping validity of one cell id would make events ambiguous.
    good = rows[reasons.isna()].sort_values(["cell_id", "valid_from"], na_position="first")
    lo = good["valid_from"].map(lambda d: d or date.min)
    hi = good["valid_to"].map(lambda d: d or date.max)
    prev_hi = hi.groupby(good["cell_id"]).shift(1)
    overlap = prev_hi.notna() & (lo <= prev_hi.fillna(date.min))
    reasons.loc[good.index[overlap.to_numpy()]] = "validity overlaps another row of the same cell_id"
    usable = rows[reasons.isna()]
    for level in ("admin1", "admin2"):
        if level not in usable.columns:
            usable = usable.assign(**{level: None})
    quarantined = rows[reasons.notna()].assign(reason=reasons[reasons.notna()])
    return usable, quarantined


def parse_time(col: Column, fmt: str | None) -> Column:
    return F.try_to_timestamp(col, F.lit(fmt)) if fmt else F.try_to_timestamp(col)


def classify_events(
    events: DataFrame,
    cells: DataFrame,
    start: date,
    end: date,
    key: bytes,
    timestamp_format: str | None = None,
) -> DataFrame:
    """Parse, validate and pseudonymise raw events; ``reason`` is null for accepted rows.

    The first failing rule gives the reason, in the order of :data:`REASONS`.
    Raw MSISDNs do not survive this function: only their pseudonyms do.
    """
    msisdn = F.regexp_replace(F.trim(F.col("msisdn")), r"^\+", "")
    counterpart = F.regexp_replace(F.trim(F.col("msisdn_counterpart")), r"^\+", "")
    out_word = F.lower(F.trim(F.col("outgoing")))
    duration = F.trim(F.col("duration"))
    parsed = events.select(
        parse_time(F.trim(F.col("start_time")), timestamp_format).alias("event_time"),
        msisdn.alias("_msisdn"),
        F.when(counterpart != "", counterpart).alias("_counterpart"),
        F.trim(F.col("location_id")).alias("cell_id"),
        F.col("event_type"),
        F.when(out_word.isin(*TRUE_WORDS), F.lit(True)).when(out_word.isin(*FALSE_WORDS), F.lit(False))
        .alias("outgoing"),
        (out_word.isNotNull() & (out_word != "") & ~out_word.isin(*TRUE_WORDS, *FALSE_WORDS)).alias("_bad_out"),
        F.expr("try_cast(trim(duration) AS double)").alias("duration_s"),
        (duration.isNotNull() & (duration != "") & F.expr("try_cast(trim(duration) AS double)").isNull())
        .alias("_bad_duration"),
        F.col("source_file"),
        F.col("_malformed") if "_malformed" in events.columns else F.lit(False).alias("_malformed"),
    )
    parsed = parsed.withColumn("event_date", F.to_date("event_time"))
    known = cells.select(F.col("cell_id").alias("_known")).distinct()
    joined = join_valid_cells(parsed, cells, how="left")
    joined = joined.join(F.broadcast(known), joined["cell_id"] == known["_known"], "left")
    reason = (
        F.when(F.col("_malformed"), F.lit("malformed_row"))
        .when(F.col("event_time").isNull(), F.lit("unparseable_time"))
        .when(F.col("_msisdn").isNull() | (F.col("_msisdn") == ""), F.lit("null_subscriber"))
        .when(~F.col("_msisdn").rlike(MSISDN_PATTERN), F.lit("malformed_subscriber"))
        .when((F.col("event_date") < F.lit(start)) | (F.col("event_date") > F.lit(end)), F.lit("outside_period"))
        .when(F.col("_cell").isNull(), F.lit("unknown_cell"))
        .when(F.col("_bad_out"), F.lit("bad_outgoing"))
        .when(F.col("_bad_duration"), F.lit("bad_duration"))
    )
    # A quarantined row keeps a cell id only when the cells table knows it: with a header that lies about
    # the column order, location_id may hold anything, a phone number included.
    tagged = (joined.withColumn("reason", reason)
              .withColumn("cell_id", F.when(F.col("reason").isNull() | F.col("_known").isNotNull(), F.col("cell_id")))
              .drop("_cell", "_known", "_bad_out", "_bad_duration", "_malformed"))
    # Exact duplicates among otherwise valid rows: the first copy (by file) is kept. Only valid rows are counted:
    # a quarantined row with the same values (an outgoing of "maybe" reads as null, like an empty one) does not
    # make a valid row its duplicate.
    # Rows are shuffled by subscriber (valid rows; the others by a hash of their values, so a column of empty
    # MSISDNs does not land in one task), and the window sorts each task by date and subscriber first: every
    # subscriber's rows of a day are then in one task and together, through the partitioned bronze write (its
    # sort by date is stable) too, where Parquet's dictionaries compress the 64-character pseudonyms and the
    # subscriber-day aggregation finds each subscriber's day in one file (unless a read split cuts through it).
    # ``_part`` is a function of ``_valid`` and the key, so it does not change which rows are copies of each other.
    dup_key = ["event_date", "_msisdn", "event_time", "cell_id", "event_type", "_counterpart", "outgoing",
               "duration_s"]
    tagged = tagged.withColumn("_valid", F.col("reason").isNull())
    tagged = tagged.withColumn("_part", F.when(F.col("_valid"), F.col("_msisdn")).otherwise(
        F.xxhash64(*dup_key).cast("string")))
    w = Window.partitionBy(*dup_key, "_valid", "_part").orderBy("source_file")
    tagged = tagged.repartition("_part").withColumn(
        "reason",
        F.when(F.col("_valid") & (F.row_number().over(w) > 1), F.lit("duplicate")).otherwise(F.col("reason")),
    )
    tagged = with_pseudonyms(
        tagged, {"subscriber_id": F.when(F.col("_msisdn") != "", F.col("_msisdn")), "counterpart_id": "_counterpart"},
        key,
    )
    return tagged.select(
        "reason",
        "event_time",
        "event_date",
        "subscriber_id",
        "counterpart_id",
        "cell_id",
        "event_type",
        "outgoing",
        "duration_s",
        "source_file",
    )


def accepted_events(tagged: DataFrame) -> DataFrame:
    return tagged.filter(F.col("reason").isNull()).select(
        "event_time", "event_date", "subscriber_id", "counterpart_id", "cell_id", "event_type", "outgoing",
        "duration_s", "source_file",
    )


def quarantined_events(tagged: DataFrame, period_start: date) -> DataFrame:
    # No raw value of the row appears here: the reason, the file, the parsed time and pseudonyms suffice.
    detail = (
        F.when(F.col("reason") == "malformed_row", F.lit("the row's fields do not match the header (a field too "
                                                         "many or too few, or broken quoting)"))
        .when(F.col("reason") == "unparseable_time", F.lit("start_time is not a timestamp in the expected format"))
        .when(F.col("reason") == "outside_period", F.concat(F.lit("event date "), F.col("event_date").cast("string"),
                                                             F.lit(" outside the requested period")))
        .when(F.col("reason") == "unknown_cell",
              F.when(F.col("cell_id").isNotNull(), F.lit("the cell is not valid on that date"))
              .otherwise(F.lit("no cell with that id in the cells table")))
        .when(F.col("reason") == "malformed_subscriber", F.lit("subscriber id is not 6-15 digits (pseudonymised)"))
        .when(F.col("reason") == "bad_outgoing", F.lit("outgoing is not one of 1/0, true/false, t/f, yes/no, y/n"))
        .when(F.col("reason") == "bad_duration", F.lit("duration is not a number"))
        .when(F.col("reason") == "duplicate", F.lit("exact copy of an accepted event"))
        .when(F.col("reason") == "null_subscriber", F.lit("subscriber id missing"))
    )
    return tagged.filter(F.col("reason").isNotNull()).select(
        F.lit(period_start).alias("period_start"),
        "source_file",
        "reason",
        detail.alias("detail"),
        "event_time",
        "subscriber_id",
        "cell_id",
    )


# ----------------------------------------------------------------------------- load


CELLS_SHA256 = "migralake.cells_source_sha256"


def cells_fingerprint(cdr: CdrSettings) -> str:
    """SHA-256 over the cells file, the boundary files and the settings that place cells: equal fingerprints,
    equal silver.cdr_cells (a daily ingest then keeps the table and its version)."""
    import hashlib

    h = hashlib.sha256()
    files = [("cells", cdr.cells_path)] + sorted(cdr.admin_paths.items())
    for name, path in files:
        h.update(f"{name}\0".encode())
        try:
            with open(str(path), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            raise InputError(f"{path}: cannot read the {name} file: {exc}") from None
    h.update(f"{cdr.h3_resolution}\0{cdr.nearest_area_max_km}".encode())
    return h.hexdigest()


def ingest_cells(spark: SparkSession, cfg: Config, lake: Lakehouse) -> DataFrame:
    cdr = cfg.cdr
    if not cdr.cells_path:
        raise ConfigError("cdr.cells_path: the cells table is required for ingest")
    fingerprint = cells_fingerprint(cdr)
    if lake.exists("silver.cdr_cells") and lake.exists("quarantine.cdr_cells") \
            and lake.properties("silver.cdr_cells").get(CELLS_SHA256) == fingerprint:
        log.info("cdr.cells: the cells and boundary files are those of the last ingest (sha256 %s): kept as they "
                 "are", fingerprint[:16])
        return lake.read("silver.cdr_cells")
    with stage("cdr.cells") as st:
        raw = read_cells(cdr.cells_path)
        st.rows_in = len(raw)
        usable, quarantined = place_cells(raw, cdr, cdr.cells_path)
        cells_df = from_pandas(spark, usable.assign(site_id=usable["site_id"].replace("", None))[
            ["cell_id", "site_id", "longitude", "latitude", "valid_from", "valid_to", "h3_index", "admin1",
             "admin2", "assignment"]
        ], spec("silver.cdr_cells").schema)
        lake.write(cells_df, "silver.cdr_cells", mode="overwrite")
        q = quarantined.reindex(columns=["cell_id", "source_file", "reason", "longitude", "latitude"])
        lake.write(
            from_pandas(spark, q, spec("quarantine.cdr_cells").schema),
            "quarantine.cdr_cells",
            mode="overwrite",
        )
        st.rows_out = len(usable)
        st.notes["quarantined"] = len(quarantined)
        if len(usable) + len(quarantined) != len(raw):
            raise RuntimeError(f"cells: {len(raw)} in but {len(usable)} + {len(quarantined)} out")
        lake.set_properties("silver.cdr_cells", {CELLS_SHA256: fingerprint})
    return lake.read("silver.cdr_cells")


def read_inputs(spark: SparkSession, cfg: Config) -> DataFrame:
    """Every configured input set as raw text rows with their event type and file."""
    if not cfg.cdr.inputs:
        raise ConfigError("cdr.inputs: no event files configured")
    parts = [read_events(spark, source, cfg.cdr.column_mapping) for source in cfg.cdr.inputs]
    raw = parts[0]
    for part in parts[1:]:
        raw = raw.unionByName(part)
    return raw


def write_events(lake: Lakehouse, tagged: DataFrame, start: date, end: date) -> tuple[int, int, int, dict[str, int]]:
    """Bronze and quarantine from the classified rows; (rows in, accepted, quarantined, rows in by quarantine
    reason), conserved."""
    with stage("cdr.ingest -> bronze.cdr_events") as st:
        by_reason = {r["reason"]: int(r["count"]) for r in tagged.groupBy("reason").count().collect()}
        st.rows_in = rows_in = sum(by_reason.values())
        by_reason.pop(None, None)
        accepted = lake.write(accepted_events(tagged), "bronze.cdr_events", period=(start, end)).rows_written
        # Rows are filed under the run's first day; the whole period is replaced, so a full re-run also replaces
        # the quarantine rows that daily runs filed under the days it covers.
        quarantined = lake.write(quarantined_events(tagged, start), "quarantine.cdr_events",
                                 period=(start, end)).rows_written
        st.rows_out, st.notes["quarantined"] = accepted, quarantined
    if accepted + quarantined != rows_in:
        raise RuntimeError(f"row conservation failed: {rows_in} rows in, {accepted} accepted + {quarantined} "
                           "quarantined")
    return rows_in, accepted, quarantined, by_reason


def run(spark: SparkSession, cfg: Config) -> None:
    start, end = require_period(cfg, "cdr.ingest")
    key = load_key(cfg.pseudonym)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    cells = ingest_cells(spark, cfg, lake)
    raw = read_inputs(spark, cfg)
    # Every row is classified and pseudonymised once into a staging folder (pseudonyms only), and bronze and
    # quarantine are both written from it (cheaper than caching ten million wide rows; nothing is computed
    # twice); the folder is removed after, or by the next run if this one dies.
    with lake.staging("cdr_ingest") as staging:
        classify_events(raw, cells, start, end, key, cfg.cdr.timestamp_format).write.parquet(staging)
        rows_in, accepted, quarantined, by_reason = write_events(lake, spark.read.parquet(staging), start, end)
    log.info("cdr.ingest: %d rows in = %d accepted + %d quarantined (%s)", rows_in, accepted, quarantined,
             ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items())) or "none")
