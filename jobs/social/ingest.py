"""Social-media ingest: post files -> bronze.social_posts (pseudonymised) and quarantine.social_posts.

Reads: ``social.inputs`` -- JSON Lines in the X/Twitter API v2 shape (one tweet
object a line, or one API response page ``{"data": [...], "includes": {...}}`` a
line), or CSV through ``social.column_mapping``.
Writes: ``bronze.social_posts`` (the period when ``period`` is set, else the
whole table) and ``quarantine.social_posts`` (rows of the same files replaced).

Each file is parsed inside one Spark task, line by line (so line numbers are
exact); no line passes through the driver. A line that cannot be used goes to
quarantine with its file, line number and reason (invalid_utf8,
invalid_unicode, bad_json, oversize, not_a_post, missing_id, missing_text,
missing_author, missing_time, unparseable_time, outside_period, bad_csv_row,
empty_line, unreadable_file); rows in = accepted + quarantined is checked.
Compressed files (``.gz``, or gzip data under any name) are read decompressed; a
UTF-8 byte-order mark is dropped; JSON nested deeper than Python can parse, a
line over ``MAX_LINE_BYTES`` or a CSV field over ``MAX_FIELD_CHARS`` is
quarantined, not fatal. A file none of whose lines could be parsed (binary data,
a broken gzip stream) is named in one clear error at the end of the job (exit
status 5), after everything else was ingested. Author and post ids become keyed
HMAC-SHA256 pseudonyms inside the task; the raw ids are never written.
Retweets (``referenced_tweets`` of type retweeted, or text starting ``RT @``)
and exact duplicates (the same post again, or the same author and text) are
flagged, not dropped.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import math
import sys
import zlib
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.config import Config, ConfigError, SocialInput
from lib.privacy.pseudonym import load_key, pseudonymise_values
from lib.runtime import log, stage
from lib.tables import Lakehouse

DESCRIPTION = "Post files (X API v2 JSON Lines or CSV) -> bronze.social_posts (pseudonymised) + quarantine"

REQUIRED = ("id", "text", "author_id", "created_at")
OPTIONAL = ("lang", "longitude", "latitude", "retweet_of")
REASONS = ("invalid_utf8", "invalid_unicode", "bad_json", "oversize", "not_a_post", "missing_id", "missing_text",
           "missing_author", "missing_time", "unparseable_time", "outside_period", "bad_csv_row", "empty_line",
           "unreadable_file")
UNPARSEABLE = ("invalid_utf8", "bad_json", "bad_csv_row", "unreadable_file")  # the line was not read at all
MAX_LINE_BYTES = 1 << 20  # one JSON line (a tweet object is a few kB; an API page of 100 tweets < 1 MB)
MAX_FIELD_CHARS = 100_000  # one CSV field (a long post is 25,000 characters)
GZIP_MAGIC = b"\x1f\x8b"
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
        suffixes = ((".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz") if source.format == "jsonl"
                    else (".csv", ".tsv", ".csv.gz", ".tsv.gz"))
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(glob.glob(source.path, recursive=True))
    if not files:
        raise InputError(f"{source.path}: no {source.format} post files found")
    return [str(Path(f).resolve()) for f in files]


def open_bytes(path: str) -> io.BufferedIOBase:
    """The file's bytes, decompressed when it holds gzip data (whatever its name)."""
    fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    magic = fh.peek(2)[:2] if hasattr(fh, "peek") else b""
    if magic == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[return-value]
    return fh


def check_csv_header(path: str, mapping: dict[str, str]) -> None:
    try:
        with open_bytes(path) as raw:
            first = raw.readline(MAX_LINE_BYTES).decode("utf-8", errors="replace").lstrip("\ufeff")
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read the CSV header ({exc})") from None
    header = next(csv.reader(io.StringIO(first, newline="")), [])
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


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
    fields = (text, tweet.get("id"), tweet.get("author_id"), tweet.get("created_at"), tweet.get("lang"))
    if any(isinstance(v, str) and _has_surrogate(v) for v in fields):
        return {"reason": "invalid_unicode", "detail": "a lone UTF-16 surrogate (\\ud800-\\udfff) in text, id, "
                                                       "author, time or language"}
    lon, lat, kind = place_of(tweet, places)
    lang = tweet.get("lang")
    return {"id": str(tweet["id"]), "author": str(tweet["author_id"]), "created_raw": str(tweet["created_at"]),
            "text": text, "lang_field": lang if isinstance(lang, str) and lang.lower() not in NO_LANGUAGE else None,
            "longitude": lon, "latitude": lat, "place_kind": kind, "is_retweet": _is_retweet(tweet, text)}


def _lines(path: str) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(line number, bytes, None) per line, or (line number, None, why) once when the file stops being readable
    (a broken gzip stream); a line over MAX_LINE_BYTES is cut there and skipped to its end."""
    number = 0
    try:
        with open_bytes(path) as fh:
            while True:
                raw = fh.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                number += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while (rest := fh.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                        pass
                    yield number, None, f"oversize: the line is longer than {MAX_LINE_BYTES} bytes"
                    continue
                yield number, raw, None
    except (OSError, EOFError, zlib.error) as exc:
        yield number + 1, None, f"unreadable_file: {type(exc).__name__}: {exc}"


def jsonl_rows(path: str) -> Iterator[dict[str, Any]]:
    for number, raw, problem in _lines(path):
        base = {"line_number": number}
        if raw is None:
            reason, _, detail = (problem or "unreadable_file").partition(": ")
            yield {**base, "reason": reason, "detail": detail}
            continue
        raw = raw.rstrip(b"\r\n")
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
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
        except RecursionError:
            yield {**base, "reason": "bad_json", "detail": "nested too deeply to parse"}
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
    try:
        with open_bytes(path) as fh:
            data = fh.read().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    except (OSError, EOFError, zlib.error) as exc:
        yield {"line_number": 1, "reason": "unreadable_file", "detail": f"{type(exc).__name__}: {exc}"}
        return
    csv.field_size_limit(sys.maxsize)  # fields are measured below, each row on its own
    reader = csv.reader(io.StringIO(data, newline=""))
    header = next(reader)
    col = {ours: header.index(mapping.get(ours, ours)) for ours in (*REQUIRED, *OPTIONAL)
           if mapping.get(ours, ours) in header}
    line = reader.line_num + 1
    while True:
        base = {"line_number": line}
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line = reader.line_num + 1
            yield {**base, "reason": "bad_csv_row", "detail": str(exc)}
            continue
        line = reader.line_num + 1
        if any(len(f) > MAX_FIELD_CHARS for f in fields):
            yield {**base, "reason": "oversize", "detail": f"a field longer than {MAX_FIELD_CHARS} characters"}
            continue
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
    if period is not None:  # (compared as timestamps: a chunk with no valid time has no dates to compare)
        lo, hi = pd.Timestamp(period[0]), pd.Timestamp(period[1]) + pd.Timedelta(days=1)
        created_at = pd.to_datetime(df["created_at"])
        out = df["reason"].isna() & ~((created_at >= lo) & (created_at < hi))
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


def input_files(cfg: Config) -> list[tuple[str, str]]:
    """(path, format) of every post file of ``social.inputs``; CSV headers checked here, on the driver."""
    if not cfg.social.inputs:
        raise ConfigError("social.inputs is empty: name at least one {path, format} of post files")
    files: list[tuple[str, str]] = []
    for source in cfg.social.inputs:
        for f in list_files(source):
            if source.format == "csv":
                check_csv_header(f, cfg.social.column_mapping)
            files.append((f, source.format))
    return files


def bronze_rows(parsed: DataFrame, now: datetime) -> tuple[DataFrame, DataFrame]:
    """(bronze rows with retweet and duplicate flags, quarantine rows) from the parsed lines."""
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
    return bronze, quarantine


def line_counts(parsed: DataFrame) -> tuple[dict[str, int], list[str]]:
    """Lines per reason ('accepted' for none), and the files none of whose lines could be parsed."""
    counts = {r["reason"] or "accepted": r["n"]
              for r in parsed.groupBy("reason").agg(F.count("*").alias("n")).collect()}
    per_file = parsed.groupBy("source_file").agg(
        F.count("*").alias("lines"), F.sum(F.col("reason").isNull().cast("int")).alias("accepted"),
        F.sum(F.col("reason").isin(*UNPARSEABLE).cast("int")).alias("unparsed")).collect()
    return counts, sorted(r["source_file"] for r in per_file if r["accepted"] == 0 and r["unparsed"] == r["lines"])


def ingest(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    files = input_files(cfg)
    key = load_key(cfg.pseudonym)
    period = (cfg.period.start, cfg.period.end) if cfg.period.start and cfg.period.end else None
    mapping = dict(cfg.social.column_mapping)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    now = pd.Timestamp.now(tz="UTC").tz_convert(None).floor("s").to_pydatetime()
    with stage("social.ingest") as st:
        listing = spark.createDataFrame(files, "path string, format string").repartition(len(files), "path")
        parsed = listing.mapInPandas(lambda it: (p for f in it for p in parse_files(f, key, mapping, period)),
                                     schema=PARSED).cache()
        counts, unusable = line_counts(parsed)
        bronze, quarantine = bronze_rows(parsed, now)
        res = lake.write(lake.conform(bronze, "bronze.social_posts"), "bronze.social_posts", period=period)
        q = lake.write(lake.conform(quarantine, "quarantine.social_posts"), "quarantine.social_posts",
                       where={"source_file": [p for p, _ in files]})
        parsed.unpersist()
        rows_in, accepted_n = sum(counts.values()), counts.get("accepted", 0)
        if res.rows_written != accepted_n or q.rows_written != rows_in - accepted_n:
            raise RuntimeError(f"social.ingest: rows in {rows_in} != bronze {res.rows_written} + quarantine "
                               f"{q.rows_written}")
        st.rows_in, st.rows_out = rows_in, accepted_n
        st.notes.update({k: v for k, v in counts.items() if k != "accepted"})
    return summarise(lake, files, counts, unusable)


def summarise(lake: Lakehouse, files: list[tuple[str, str]], counts: dict[str, int],
              unusable: list[str]) -> dict[str, Any]:
    rows_in, accepted_n = sum(counts.values()), counts.get("accepted", 0)
    quarantined = {k: v for k, v in counts.items() if k != "accepted"}
    flags = lake.read("bronze.social_posts").agg(
        F.sum(F.col("is_retweet").cast("int")).alias("retweets"),
        F.sum(F.col("is_duplicate").cast("int")).alias("duplicates")).first()
    assert flags is not None  # an aggregate has one row
    log.info("social.ingest: %d lines in %d files -> %d posts + %d quarantined %s; %d retweets, %d duplicates "
             "flagged", rows_in, len(files), accepted_n, rows_in - accepted_n, quarantined, flags["retweets"] or 0,
             flags["duplicates"] or 0)
    for f in unusable:
        log.error("social.ingest: %s: not one line could be read as %s (binary data, a broken compressed stream, "
                  "or another format); its lines are in quarantine.social_posts", f, dict(files).get(f, "posts"))
    return {"files": len(files), "rows_in": rows_in, "accepted": accepted_n, "quarantined": quarantined,
            "retweets": int(flags["retweets"] or 0), "duplicates": int(flags["duplicates"] or 0),
            "unusable_files": unusable}


def run(spark: SparkSession, cfg: Config) -> int:
    out = ingest(spark, cfg)
    print(json.dumps(out, indent=2))
    if out["unusable_files"]:
        print(f"migralake: social.ingest: {len(out['unusable_files'])} file(s) could not be read at all: "
              + ", ".join(out["unusable_files"]), file=sys.stderr)
        return 5
    return 0

