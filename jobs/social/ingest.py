"""Social-media ingest: post files -> bronze.social_posts (pseudonymised) and quarantine.social_posts.

Reads: ``social.inputs`` -- JSON Lines in the X/Twitter API v2 shape (one tweet
object a line, or one API response page ``{"data": [...], "includes": {...}}`` a
line), or CSV through ``social.column_mapping``.
Writes: ``bronze.social_posts`` (the period when ``period`` is set, else the
whole table) and ``quarantine.social_posts`` (rows of the same files replaced).

Each file is parsed inside one Spark task, line by line (so line numbers are
exact); no line passes through the driver. A line that cannot be used goes to
quarantine with its file, line number and reason (invalid_utf8, bad_json,
not_a_post, missing_id, missing_text, missing_author, missing_time,
unparseable_time, outside_period, bad_csv_row, empty_line); rows in =
accepted + quarantined is checked. Author and post ids become keyed
HMAC-SHA256 pseudonyms inside the task; the raw ids are never written.
Retweets (``referenced_tweets`` of type retweeted, or text starting ``RT @``)
and exact duplicates (the same post again, or the same author and text) are
flagged, not dropped.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.config import Config, ConfigError, SocialInput
from lib.privacy.pseudonym import load_key, pseudonymise_values
from lib.runtime import log, stage
from lib.tables import Lakehouse

DESCRIPTION = "Post files (X API v2 JSON Lines or CSV) -> bronze.social_posts (pseudonymised) + quarantine"

REQUIRED = ("id", "text", "author_id", "created_at")
OPTIONAL = ("lang", "longitude", "latitude", "retweet_of")
REASONS = ("invalid_utf8", "bad_json", "not_a_post", "missing_id", "missing_text", "missing_author",
           "missing_time", "unparseable_time", "outside_period", "bad_csv_row", "empty_line")
NO_LANGUAGE = {"", "und", "qme", "qht", "qam", "zxx", "art"}
CHUNK = 20_000

PARSED = T.StructType([
    T.StructField("source_file", T.StringType(), False),
    T.StructField("line_number", T.LongType(), False),
    T.StructField("reason", T.StringType(), True),
    T.StructField("detail", T.StringType(), True),
    T.StructField("post_key", T.StringType(), True),
    T.StructField("author_key", T.StringType(), True),
    T.StructField("created_at", T.TimestampType(), True),
    T.StructField("text", T.StringType(), True),
    T.StructField("lang_field", T.StringType(), True),
    T.StructField("longitude", T.DoubleType(), True),
    T.StructField("latitude", T.DoubleType(), True),
    T.StructField("place_kind", T.StringType(), True),
    T.StructField("is_retweet", T.BooleanType(), True),
])


class InputError(ValueError):
    """Post files that cannot be read at all; names the path and the reason."""


# ----------------------------------------------------------------------------- files


def list_files(source: SocialInput) -> list[str]:
    p = Path(source.path)
    if p.is_dir():
        suffixes = (".jsonl", ".json", ".ndjson", ".jsonl.gz") if source.format == "jsonl" else (".csv", ".tsv")
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(glob.glob(source.path, recursive=True))
    if not files:
        raise InputError(f"{source.path}: no {source.format} post files found")
    return [str(Path(f).resolve()) for f in files]


def check_csv_header(path: str, mapping: dict[str, str]) -> None:
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        header = next(csv.reader(fh), [])
    for ours in REQUIRED:
        theirs = mapping.get(ours, ours)
        if theirs not in header:
            raise InputError(f"{path}: required column '{theirs}' (for {ours}) not found; columns are {header}. "
                             f"Map it with social.column_mapping.{ours}")


# ----------------------------------------------------------------------------- parsing (executors)


def _bbox_centre(bbox: Any) -> tuple[float, float] | None:
    if isinstance(bbox, list | tuple) and len(bbox) == 4:
        try:
            w, s, e, n = (float(v) for v in bbox)
        except (TypeError, ValueError):
            return None
        return (w + e) / 2.0, (s + n) / 2.0
    return None


def place_of(tweet: dict, places: dict[str, dict]) -> tuple[float | None, float | None, str | None]:
    """(longitude, latitude, kind): exact coordinates, else the centre of the place's bounding box."""
    geo = tweet.get("geo") or {}
    if not isinstance(geo, dict):
        return None, None, None
    coords = (geo.get("coordinates") or {})
    if isinstance(coords, dict) and isinstance(coords.get("coordinates"), list) and len(coords["coordinates"]) == 2:
        try:
            lon, lat = float(coords["coordinates"][0]), float(coords["coordinates"][1])
            if -180 <= lon <= 180 and -90 <= lat <= 90:
                return lon, lat, "point"
        except (TypeError, ValueError):
            pass
    candidates = [geo.get("bbox"), (geo.get("geo") or {}).get("bbox") if isinstance(geo.get("geo"), dict) else None]
    place = places.get(str(geo.get("place_id"))) if geo.get("place_id") is not None else None
    if isinstance(place, dict):
        candidates.append((place.get("geo") or {}).get("bbox"))
    for bbox in candidates:
        c = _bbox_centre(bbox)
        if c and -180 <= c[0] <= 180 and -90 <= c[1] <= 90:
            return c[0], c[1], "bbox"
    return None, None, None


def _is_retweet(tweet: dict, text: str) -> bool:
    refs = tweet.get("referenced_tweets") or []
    if isinstance(refs, list) and any(isinstance(r, dict) and r.get("type") == "retweeted" for r in refs):
        return True
    return text.startswith("RT @")


def tweet_row(tweet: Any, places: dict[str, dict]) -> dict[str, Any]:
    """One tweet object -> a parsed row, or a row with the quarantine reason."""
    if not isinstance(tweet, dict):
        return {"reason": "not_a_post", "detail": f"a JSON {type(tweet).__name__}, not an object"}
    raw_note = tweet.get("note_tweet")
    note: dict[str, Any] = raw_note if isinstance(raw_note, dict) else {}
    text = note.get("text") or tweet.get("text")
    if tweet.get("id") in (None, ""):
        return {"reason": "missing_id", "detail": "no 'id'"}
    if not isinstance(text, str) or not text.strip():
        return {"reason": "missing_text", "detail": "no 'text' (or empty)"}
    if tweet.get("author_id") in (None, ""):
        return {"reason": "missing_author", "detail": "no 'author_id'"}
    if tweet.get("created_at") in (None, ""):
        return {"reason": "missing_time", "detail": "no 'created_at'"}
    lon, lat, kind = place_of(tweet, places)
    lang = tweet.get("lang")
    return {"id": str(tweet["id"]), "author": str(tweet["author_id"]), "created_raw": str(tweet["created_at"]),
            "text": text, "lang_field": lang if isinstance(lang, str) and lang.lower() not in NO_LANGUAGE else None,
            "longitude": lon, "latitude": lat, "place_kind": kind, "is_retweet": _is_retweet(tweet, text)}


def jsonl_rows(path: str) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            base = {"line_number": number}
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                yield {**base, "reason": "empty_line", "detail": None}
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield {**base, "reason": "invalid_utf8", "detail": f"byte {exc.start}: {exc.reason}"}
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield {**base, "reason": "bad_json", "detail": f"column {exc.colno}: {exc.msg}"}
                continue
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):  # an API response page
                raw_inc = obj.get("includes")
                inc: dict[str, Any] = raw_inc if isinstance(raw_inc, dict) else {}
                places = {str(p.get("id")): p for p in inc.get("places") or [] if isinstance(p, dict)}
                if not obj["data"]:
                    yield {**base, "reason": "not_a_post", "detail": "an API page with no tweets"}
                for tweet in obj["data"]:
                    yield {**base, **tweet_row(tweet, places)}
            else:
                yield {**base, **tweet_row(obj, {})}


def csv_rows(path: str, mapping: dict[str, str]) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as fh:
        data = fh.read().decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(data, newline=""))
    header = next(reader)
    col = {ours: header.index(mapping.get(ours, ours)) for ours in (*REQUIRED, *OPTIONAL)
           if mapping.get(ours, ours) in header}
    line = reader.line_num + 1
    for fields in reader:
        base = {"line_number": line}
        line = reader.line_num + 1
        if not fields or all(not f.strip() for f in fields):
            yield {**base, "reason": "empty_line", "detail": None}
            continue
        if len(fields) != len(header):
            yield {**base, "reason": "bad_csv_row", "detail": f"{len(fields)} fields, header has {len(header)}"}
            continue
        if any("\udc80" <= ch <= "\udcff" for f in fields for ch in f):
            yield {**base, "reason": "invalid_utf8", "detail": "bytes that are not UTF-8"}
            continue
        rec = {k: fields[i] for k, i in col.items()}
        tweet: dict[str, Any] = {"id": rec.get("id"), "text": rec.get("text"), "author_id": rec.get("author_id"),
                                 "created_at": rec.get("created_at"), "lang": rec.get("lang") or None}
        try:
            lon, lat = float(rec.get("longitude") or "nan"), float(rec.get("latitude") or "nan")
        except ValueError:
            lon = lat = math.nan
        if not (math.isnan(lon) or math.isnan(lat)):
            tweet["geo"] = {"coordinates": {"type": "Point", "coordinates": [lon, lat]}}
        if rec.get("retweet_of"):
            tweet["referenced_tweets"] = [{"type": "retweeted", "id": rec["retweet_of"]}]
        yield {**base, **tweet_row(tweet, {})}


def finish(rows: list[dict[str, Any]], path: str, key: bytes, period: tuple[date, date] | None) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in ("reason", "detail", "id", "author", "created_raw", "text", "lang_field", "longitude", "latitude",
              "place_kind", "is_retweet"):
        if c not in df.columns:
            df[c] = None
    df["source_file"] = path
    ok = df["reason"].isna()
    created = pd.to_datetime(df.loc[ok, "created_raw"], errors="coerce", utc=True, format="ISO8601")
    bad_time = created.isna()
    df.loc[bad_time[bad_time].index, ["reason", "detail"]] = ["unparseable_time", "created_at is not ISO 8601"]
    df["created_at"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns]")
    good = created[~bad_time]
    df.loc[good.index, "created_at"] = good.dt.tz_convert(None).astype("datetime64[ns]")
    if period is not None:
        day = df["created_at"].dt.date
        out = df["reason"].isna() & ~day.between(period[0], period[1])
        df.loc[out, ["reason", "detail"]] = ["outside_period", f"outside {period[0]}..{period[1]}"]
    ok = df["reason"].isna()
    df["post_key"] = None
    df["author_key"] = None
    if ok.any():
        df.loc[ok, "post_key"] = pseudonymise_values(df.loc[ok, "id"].astype(str), key).to_numpy()
        df.loc[ok, "author_key"] = pseudonymise_values(df.loc[ok, "author"].astype(str), key).to_numpy()
    # Quarantined rows keep no content; missing values are None (Arrow needs them typed, not NaN).
    for c in ("longitude", "latitude"):
        df[c] = pd.to_numeric(df[c], errors="coerce").where(ok)
    for c in ("text", "lang_field", "place_kind", "is_retweet"):
        df[c] = df[c].astype(object).where(ok & df[c].notna(), None)
    for c in ("reason", "detail", "post_key", "author_key"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    df["line_number"] = df["line_number"].astype("int64")
    return df[PARSED.fieldNames()]  # raw ids and times dropped here, inside the task


def parse_files(files: pd.DataFrame, key: bytes, mapping: dict[str, str],
                period: tuple[date, date] | None) -> Iterator[pd.DataFrame]:
    for path, fmt in zip(files["path"], files["format"], strict=True):
        rows = jsonl_rows(path) if fmt == "jsonl" else csv_rows(path, mapping)
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= CHUNK:
                yield finish(chunk, path, key, period)
                chunk = []
        if chunk:
            yield finish(chunk, path, key, period)


# ----------------------------------------------------------------------------- job


def ingest(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    social = cfg.social
    if not social.inputs:
        raise ConfigError("social.inputs is empty: name at least one {path, format} of post files")
    key = load_key(cfg.pseudonym)
    files: list[tuple[str, str]] = []
    for source in social.inputs:
        for f in list_files(source):
            if source.format == "csv":
                check_csv_header(f, social.column_mapping)
            files.append((f, source.format))
    period = (cfg.period.start, cfg.period.end) if cfg.period.start and cfg.period.end else None
    mapping = dict(social.column_mapping)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    now = pd.Timestamp.now(tz="UTC").tz_convert(None).floor("s").to_pydatetime()

    with stage("social.ingest") as st:
        listing = spark.createDataFrame(files, "path string, format string").repartition(len(files), "path")
        parsed = listing.mapInPandas(lambda it: (p for f in it for p in parse_files(f, key, mapping, period)),
                                     schema=PARSED).cache()
        counts = {r["reason"] or "accepted": r["n"] for r in parsed.groupBy("reason").agg(F.count("*").alias("n"))
                  .collect()}
        rows_in = sum(counts.values())
        accepted = parsed.filter(F.col("reason").isNull())
        by_id = Window.partitionBy("post_key").orderBy("created_at", "source_file", "line_number")
        by_text = Window.partitionBy("author_key", F.sha2(F.col("text"), 256)).orderBy(
            "created_at", "source_file", "line_number")
        bronze = (accepted
                  .withColumn("_id_rank", F.row_number().over(by_id))
                  .withColumn("_text_rank", F.row_number().over(by_text))
                  .select("post_key", "author_key", "created_at", F.to_date("created_at").alias("date"), "text",
                          "lang_field", "longitude", "latitude", "place_kind", "is_retweet",
                          ((F.col("_id_rank") > 1) | (F.col("_text_rank") > 1)).alias("is_duplicate"),
                          "source_file", "line_number", F.lit(now).alias("ingested_at"),
                          F.lit(None).cast("timestamp").alias("text_erased_at")))
        quarantine = parsed.filter(F.col("reason").isNotNull()).select(
            "source_file", "line_number", "reason", "detail", F.lit(now).alias("ingested_at"))
        if period:
            res = lake.write(lake.conform(bronze, "bronze.social_posts"), "bronze.social_posts", period=period)
        else:
            res = lake.write(lake.conform(bronze, "bronze.social_posts"), "bronze.social_posts")
        in_files = " OR ".join(f"source_file = '{p.replace(chr(39), chr(39) * 2)}'" for p, _ in files)
        if lake.exists("quarantine.social_posts"):
            q = lake.write(lake.conform(quarantine, "quarantine.social_posts"), "quarantine.social_posts",
                           replace_where=in_files)
        else:
            q = lake.write(lake.conform(quarantine, "quarantine.social_posts"), "quarantine.social_posts")
        parsed.unpersist()
        accepted_n = counts.get("accepted", 0)
        quarantined = rows_in - accepted_n
        if res.rows_written != accepted_n or q.rows_written != quarantined:
            raise RuntimeError(f"social.ingest: rows in {rows_in} != bronze {res.rows_written} + quarantine "
                               f"{q.rows_written}")
        st.rows_in, st.rows_out = rows_in, accepted_n
        st.notes.update({k: v for k, v in counts.items() if k != "accepted"})
    flags = lake.read("bronze.social_posts").agg(
        F.sum(F.col("is_retweet").cast("int")).alias("retweets"),
        F.sum(F.col("is_duplicate").cast("int")).alias("duplicates")).first()
    assert flags is not None  # an aggregate has one row
    log.info("social.ingest: %d lines in %d files -> %d posts + %d quarantined %s; %d retweets, %d duplicates "
             "flagged", rows_in, len(files), accepted_n, quarantined,
             {k: v for k, v in counts.items() if k != "accepted"}, flags["retweets"] or 0, flags["duplicates"] or 0)
    return {"files": len(files), "rows_in": rows_in, "accepted": accepted_n,
            "quarantined": {k: v for k, v in counts.items() if k != "accepted"},
            "retweets": int(flags["retweets"] or 0), "duplicates": int(flags["duplicates"] or 0)}


def run(spark: SparkSession, cfg: Config) -> int:
    out = ingest(spark, cfg)
    print(json.dumps(out, indent=2))
    return 0

