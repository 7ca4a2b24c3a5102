"""Social-media sentiment: bronze.social_posts -> silver.social_posts (no text) -> gold.social_sentiment.

Reads: ``bronze.social_posts`` (posts of the period whose text is still held),
the migration terms of ``social.keywords_path``, admin boundaries
(``social.admin_paths``, else ``cdr.admin_paths``) and the model ``social.model``.
Writes: ``silver.social_posts`` (upsert by post), ``gold.social_sentiment``
(recomputed from silver), then erases post text older than
``social.text_retention_days`` from bronze (and vacuums the files that held it).

Everything per post runs on executors through Arrow batches (``applyInPandas``
over scoring groups that the posts themselves fix: a hash of the post key, so
the same inputs give the same scores to the last bit on any layout): language
(the post's field, else py3langid: offline, its model ships in the wheel, 97
languages, ~1 ms a post), migration terms (word boundaries, case- and
accent-insensitive), place (coordinates or place centre -> H3 and admin area),
and sentiment of on-topic posts with the transformers model, loaded once per
Python worker and applied to length-sorted batches. No text leaves the task.
Gold means are exact decimal sums (independent of the order rows are added in).
The stage's workers fork from a daemon that has imported torch, transformers and
the model's classes once (lib/pydaemon.py), and a one-task job loads the model
into a first worker while the posts are read and shuffled.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs.social import model as models
from lib import geo
from lib.config import Config, ConfigError, SpatialUnit
from lib.pydaemon import PRELOAD_ENV, worker_environment
from lib.runtime import log, stage
from lib.tables import Lakehouse, spec

DESCRIPTION = "bronze.social_posts -> language, migration topic, place, sentiment (silver) -> series (gold)"

_MARKS = re.compile("[\u0300-\u036f\u064b-\u065f\u0670\u0640]")  # Latin accents, Arabic diacritics, tatweel
_ALEF = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي", "’": "'", "‘": "'", "ʼ": "'"})
_WORD = r"[\w\u0900-\u097f]"  # letters, digits, _ and Devanagari (its vowel signs are marks, not \w)
_ARABIC = re.compile("[\u0600-\u06ff]")
_PROCLITIC = "[\u0648\u0641\u0628\u0644\u0643]"  # و ف ب ل ك
_URL = re.compile(r"https?://\S+|www\.\S+")
_MENTION = re.compile(r"(?<!\w)@\w+")


def normalise(text: str) -> str:
    """Case-folded, Latin accents and Arabic diacritics removed (Devanagari kept as written)."""
    t = unicodedata.normalize("NFKD", text.casefold())
    return unicodedata.normalize("NFC", _MARKS.sub("", t)).translate(_ALEF)


class Matcher:
    """Migration terms of every list, matched on word boundaries in normalised text."""

    def __init__(self, terms: dict[str, list[str]]) -> None:
        self.lists: dict[str, list[str]] = {}
        for lang, words in terms.items():
            for w in words:
                self.lists.setdefault(normalise(str(w)).strip(), []).append(str(lang))
        arabic = sorted((t for t in self.lists if _ARABIC.search(t)), key=len, reverse=True)
        other = sorted((t for t in self.lists if not _ARABIC.search(t)), key=len, reverse=True)
        # Arabic attaches conjunctions and prepositions to the word (wa-, fa-, bi-, li-, ka-): allow up to two.
        self.patterns = [re.compile(f"(?<!{_WORD})(?:{prefix})({'|'.join(map(re.escape, alts))})(?!{_WORD})")
                         for prefix, alts in (("", other), (f"{_PROCLITIC}{{0,2}}", arabic)) if alts]

    def match(self, text: str) -> tuple[list[str], list[str]]:
        norm = normalise(text)
        found = list(dict.fromkeys(m.group(1) for p in self.patterns for m in p.finditer(norm)))
        lists = sorted({lang for term in found for lang in self.lists[term]})
        return found, lists


def load_terms(path: str) -> dict[str, list[str]]:
    p = Path(path)  # absolute: configuration resolves paths (lib.config.ProjectPath)
    if not p.exists():
        raise ConfigError(f"social.keywords_path: {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
        raise ConfigError(f"{p}: expected a mapping of language -> non-empty list of terms")
    return {str(k): [str(t) for t in v] for k, v in data.items()}


def for_model(text: str) -> str:
    """The usual Twitter preprocessing of sentiment models: links and mentions become placeholders."""
    return _MENTION.sub("@user", _URL.sub("http", text))


@lru_cache(maxsize=1)
def _langid():  # type: ignore[no-untyped-def]
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_languages(texts: list[str]) -> list[str]:
    ident = _langid()
    return [ident.classify(t)[0] for t in texts]


# ----------------------------------------------------------------------------- executor side


@dataclass(frozen=True)
class Scoring:
    """What a scoring task needs (pickled to the executors): topics, places, the model and what counts."""

    terms: dict[str, list[str]]
    boundaries: dict[str, Any]
    unit: str
    h3_res: int
    max_km: float
    model_name: str
    model_path: str
    model_hash: str
    label_map: dict[str, str]
    batch_size: int
    threads: int
    precision: str
    exclude_retweets: bool
    exclude_duplicates: bool


def posts_to_silver(batches: Iterable[pd.DataFrame], job: Scoring) -> Iterator[pd.DataFrame]:
    matcher = Matcher(job.terms)
    unit, h3_res = job.unit, job.h3_res
    for df in batches:
        if df.empty:
            continue
        texts = df["text"].astype(str).tolist()
        out = pd.DataFrame({"post_key": df["post_key"], "author_key": df["author_key"],
                            "created_at": df["created_at"], "date": df["date"]})
        out["week_start"] = (pd.to_datetime(df["date"]) - pd.to_timedelta(pd.to_datetime(df["date"]).dt.weekday,
                                                                          unit="D")).dt.date
        field = df["lang_field"].where(df["lang_field"].notna(), None)
        missing = field.isna().to_numpy()
        lang = field.astype(object).to_numpy().copy()
        if missing.any():
            lang[missing] = detect_languages([texts[i] for i in np.flatnonzero(missing)])
        out["language"] = [str(x).lower().split("-")[0] for x in lang]
        out["language_source"] = np.where(missing, "detected", "field")
        matches = [matcher.match(t) for t in texts]
        out["topic_terms"] = [m[0] for m in matches]
        out["topic_lists"] = [m[1] for m in matches]
        out["on_topic"] = [bool(m[0]) for m in matches]
        # place
        has = df["longitude"].notna() & df["latitude"].notna()
        out["h3_index"] = None
        out["region"] = None
        out["place_status"] = np.where(has, "placed", "none")
        if has.any():
            pts = pd.DataFrame({"longitude": df.loc[has, "longitude"].astype(float),
                                "latitude": df.loc[has, "latitude"].astype(float)})
            out.loc[has, "h3_index"] = geo.h3_cells(pts["latitude"].to_numpy(), pts["longitude"].to_numpy(), h3_res)
            if unit.startswith("h3_"):
                out.loc[has, "region"] = out.loc[has, "h3_index"]
            else:
                placed = geo.assign_areas(pts, job.boundaries, job.max_km)
                out.loc[has, "region"] = placed[unit].to_numpy()
                outside = has.copy()
                outside[has] = placed[unit].isna().to_numpy()
                out.loc[outside, "place_status"] = "outside_areas"
        out["spatial_unit"] = unit
        counted = np.ones(len(df), dtype=bool)
        if job.exclude_retweets:
            counted &= ~df["is_retweet"].astype(bool).to_numpy()
        if job.exclude_duplicates:
            counted &= ~df["is_duplicate"].astype(bool).to_numpy()
        out["counted"] = counted
        for c in ("sentiment", "model_name", "model_hash", "model_precision"):
            out[c] = None
        for c in ("sentiment_prob", "p_negative", "p_neutral", "p_positive", "score"):
            out[c] = np.nan
        idx = np.flatnonzero(out["on_topic"].to_numpy())
        if len(idx):
            scorer = models.scorer_for(job.model_path, job.label_map, job.threads, job.precision)
            s = scorer.score([for_model(texts[i]) for i in idx], batch_size=job.batch_size)
            rows = out.index[idx]
            out.loc[rows, "sentiment"] = s.label
            out.loc[rows, "sentiment_prob"] = s.prob
            out.loc[rows, "p_negative"] = s.p_negative
            out.loc[rows, "p_neutral"] = s.p_neutral
            out.loc[rows, "p_positive"] = s.p_positive
            out.loc[rows, "score"] = s.p_positive - s.p_negative
            out.loc[rows, "model_name"] = job.model_name
            out.loc[rows, "model_hash"] = job.model_hash
            out.loc[rows, "model_precision"] = scorer.precision
        yield out


def score_group(df: pd.DataFrame, job: Scoring) -> pd.DataFrame:
    """One scoring group in post-key order: the same rows give the same batches, whatever the partitioning."""
    df = df.drop(columns="_group").sort_values("post_key", kind="stable").reset_index(drop=True)
    out = list(posts_to_silver([df], job))
    return out[0] if out else pd.DataFrame(columns=spec("silver.social_posts").schema.fieldNames())


def _load_model(batches: Iterable[pd.DataFrame], job: Scoring) -> Iterator[pd.DataFrame]:
    for _batch in batches:
        pass
    scorer = models.scorer_for(job.model_path, job.label_map, job.threads, job.precision)
    yield pd.DataFrame({"pid": [os.getpid()], "precision": [scorer.precision]})


def warm_workers(spark: SparkSession, n: int, job: Scoring) -> threading.Thread:
    """Load the model into ``n`` Python workers in the background (a job of ``n`` one-row tasks).

    Python workers are reused by later tasks with the same environment, so the
    scoring tasks find the model loaded. Only a head start: if it fails, the
    scoring tasks load the model themselves and report any error.
    """
    model_only = replace(job, terms={}, boundaries={})  # the warm-up task needs only the model settings
    load = spark.range(n, numPartitions=n).mapInPandas(lambda it: _load_model(it, model_only),
                                                     schema="pid int, precision string")

    def run() -> None:
        try:
            load.collect()
        except Exception as exc:  # noqa: BLE001 - the scoring stage reports model errors itself
            log.debug("social.sentiment: loading the model ahead of scoring failed: %s", exc)

    thread = threading.Thread(target=run, name="warm-workers", daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- gold


EXACT = "decimal(38,18)"  # a score in [-1, 1] to 1e-18: sums of up to 1e19 posts, exact and order-free


def series(silver: DataFrame) -> DataFrame:
    """Sentiment series per period x region x language (+ 'all') and national, from counted posts."""
    base = silver.filter("counted")
    frames = []
    for period, col in (("day", "date"), ("week", "week_start")):
        for regional in (True, False):
            for by_lang in (True, False):
                df = base.filter(F.col("region").isNotNull()) if regional else base
                keys = [F.lit(period).alias("period"), F.col(col).alias("period_start"),
                        (F.col("spatial_unit") if regional else F.lit("national")).alias("spatial_unit"),
                        (F.col("region") if regional else F.lit("national")).alias("region"),
                        (F.col("language") if by_lang else F.lit("all")).alias("language")]
                agg = df.groupBy(*keys).agg(
                    F.sum(F.col("on_topic").cast("long")).alias("n_posts"),
                    F.countDistinct(F.when(F.col("on_topic"), F.col("author_key"))).alias("n_users"),
                    F.sum(F.when(F.col("sentiment") == "negative", 1).otherwise(0)).alias("_neg"),
                    F.sum(F.when(F.col("sentiment") == "neutral", 1).otherwise(0)).alias("_neu"),
                    F.sum(F.when(F.col("sentiment") == "positive", 1).otherwise(0)).alias("_pos"),
                    # Exact: decimal addition does not depend on the order Spark adds the rows in.
                    F.sum(F.when(F.col("on_topic"), F.col("score").cast(EXACT))).alias("_score_sum"),
                    F.count(F.when(F.col("on_topic"), F.col("score"))).alias("_scored"),
                    F.count("*").alias("n_posts_all"),
                )
                frames.append(agg)
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return (out.filter(F.col("n_posts") > 0)
            .select("period", "period_start", "spatial_unit", "region", "language", "n_posts", "n_users",
                    (F.col("_neg") / F.col("n_posts")).alias("share_negative"),
                    (F.col("_neu") / F.col("n_posts")).alias("share_neutral"),
                    (F.col("_pos") / F.col("n_posts")).alias("share_positive"),
                    F.when(F.col("_scored") > 0, (F.col("_score_sum") / F.col("_scored")).cast("double"))
                    .alias("mean_score"), "n_posts_all",
                    (F.col("n_posts") / F.col("n_posts_all") * 10_000.0).alias("posts_per_10k")))


# ----------------------------------------------------------------------------- retention


def erase_expired_text(lake: Lakehouse, days: int) -> int:
    """Erase the text of scored posts ingested more than ``days`` ago; vacuum the files that held it."""
    name = "bronze.social_posts"
    if not lake.exists(name) or not lake.exists("silver.social_posts"):
        return 0
    cutoff = pd.Timestamp.now(tz="UTC").tz_convert(None) - pd.Timedelta(days=days)
    scored = lake.read("silver.social_posts").select("post_key").distinct()
    bronze = lake.read(name)
    expired = (bronze.filter(F.col("text").isNotNull() & (F.col("ingested_at") <= F.lit(cutoff.to_pydatetime())))
               .join(scored, "post_key", "left_semi").select("post_key").distinct())
    n = expired.count()
    if n:
        lake.erase(name, expired, "post_key", ["text"], stamp="text_erased_at")
        lake.vacuum(name, retention_hours=float(days * 24))
        log.info("social: erased the text of %d posts ingested before %s and vacuumed %s", n, cutoff, name)
    return n


# ----------------------------------------------------------------------------- job


def scoring_job(cfg: Config) -> Scoring:
    """What the scoring tasks need: terms, areas, the spatial unit and the model settings (validated here)."""
    social = cfg.social
    unit = social.spatial_unit
    paths = social.admin_paths or cfg.cdr.admin_paths
    if unit.startswith("h3_"):
        try:
            h3_res = int(SpatialUnit.parse(unit, "social.spatial_unit").h3_resolution or 0)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        boundaries: dict = {}
    else:
        if unit not in paths:
            raise ConfigError(f"social.spatial_unit '{unit}' is not an admin level of social.admin_paths / "
                              f"cdr.admin_paths ({sorted(paths)})")
        boundaries = {unit: geo.read_boundaries(paths[unit], unit)}
        h3_res = cfg.cdr.h3_resolution
    return Scoring(terms=load_terms(social.keywords_path), boundaries=boundaries, unit=unit, h3_res=h3_res,
                   max_km=social.nearest_area_max_km, model_name=social.model,
                   model_path=str(models.resolve(social.model)), model_hash=models.weights_hash(social.model),
                   label_map=dict(social.label_map), batch_size=social.batch_size, threads=social.torch_threads,
                   precision=social.precision, exclude_retweets=social.exclude_retweets,
                   exclude_duplicates=social.exclude_duplicates)


def write_silver(spark: SparkSession, lake: Lakehouse, bronze: DataFrame, job: Scoring, tasks_per_slot: int,
                 group_size: int = 1024) -> int:
    """Score every post on the executors into silver.social_posts (merged by post); returns the rows written."""
    with stage("social.sentiment -> silver.social_posts") as st:
        # One silver row per post: a post delivered twice keeps its first delivery (the other is a flagged
        # duplicate in bronze); copies under other ids are separate posts, flagged is_duplicate.
        first = Window.partitionBy("_group", "post_key").orderBy("is_duplicate", "source_file", "line_number")
        slots = max(spark.sparkContext.defaultParallelism, 1)
        # The stage's workers fork from a daemon that imports torch, transformers and the model's classes once
        # (lib/pydaemon.py). A one-task job starts that daemon and loads the model into a first worker while
        # the other task slot reads and shuffles the posts; later workers fork from the daemon with the
        # imports done and only read the weights.
        # Scoring groups: a post's group is a hash of its key modulo a number of groups fixed by the number of
        # posts, and each group is scored as one sorted unit. Batch-mates change a post's score in its last
        # bits (padding, matrix shapes; more in bfloat16), so a layout-dependent batching would make the same
        # inputs give another release on another cluster; this one does not.
        n_posts = bronze.count()
        groups = max(1, math.ceil(n_posts / group_size))
        with worker_environment(spark, {PRELOAD_ENV: "jobs.social.model",
                                        models.PRELOAD_MODEL_ENV: job.model_path}):
            warm = warm_workers(spark, 1, job)
            # One shuffle, by group: the window (by group and post) and the grouping reuse it; tasks_per_slot
            # tasks per slot (each task pays a fixed cost of a second or two; more tasks even out unequal ones).
            posts = (bronze.withColumn("_group", F.pmod(F.xxhash64("post_key"), F.lit(groups)))
                     .repartition(slots * tasks_per_slot, "_group")
                     .withColumn("_n", F.row_number().over(first)).filter(F.col("_n") == 1)
                     .select("_group", "post_key", "author_key", "created_at", "date", "text", "lang_field",
                             "longitude", "latitude", "is_retweet", "is_duplicate"))
            silver = posts.groupBy("_group").applyInPandas(lambda df: score_group(df, job),
                                                          schema=spec("silver.social_posts").schema)
        res = lake.merge(silver, "silver.social_posts") if lake.exists("silver.social_posts") else lake.write(
            silver, "silver.social_posts")
        warm.join()
        st.rows_out = res.rows_written
    return res.rows_written


def score(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    if not lake.exists("bronze.social_posts"):
        raise ConfigError("bronze.social_posts does not exist yet: run social.ingest first")
    job = scoring_job(cfg)
    bronze = lake.read("bronze.social_posts").filter(F.col("text").isNotNull())
    if cfg.period.start and cfg.period.end:
        bronze = bronze.filter(F.col("date").between(F.lit(cfg.period.start), F.lit(cfg.period.end)))
    write_silver(spark, lake, bronze, job, cfg.social.tasks_per_slot, cfg.social.score_group_size)
    # silver is read once for the eight gold aggregates and the summary
    scored = lake.read("silver.social_posts").select(
        "author_key", "date", "week_start", "spatial_unit", "region", "language", "on_topic", "counted",
        "sentiment", "score").persist()
    with stage("social.sentiment -> gold.social_sentiment") as st:
        st.rows_out = lake.write(lake.conform(series(scored), "gold.social_sentiment"),
                                 "gold.social_sentiment").rows_written
    erased = erase_expired_text(lake, cfg.social.text_retention_days)
    s = scored.agg(
        F.count("*").alias("posts"), F.sum(F.col("on_topic").cast("int")).alias("on_topic"),
        F.sum((F.col("on_topic") & F.col("counted")).cast("int")).alias("counted_on_topic"),
        F.sum((F.col("region").isNotNull()).cast("int")).alias("placed")).first()
    assert s is not None  # an aggregate has one row
    scored.unpersist()
    summary = {**s.asDict(), "model": cfg.social.model, "model_hash": job.model_hash, "text_erased": erased}
    log.info("social.sentiment: %s", summary)
    return summary


def run(spark: SparkSession, cfg: Config) -> int:
    try:
        out = score(spark, cfg)
    except models.ModelError as exc:
        print(f"migralake: error: {exc}")
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0
