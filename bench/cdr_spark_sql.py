"""The reference's work in bare Spark SQL: a floor for any Spark pipeline on this machine.

``./bench/run cdr --floor`` runs this after the pipeline, in the same Spark
session: the statements of bench/cdr_reference.py translated to Spark SQL
(same rules, same Parquet files, the three results written as Parquet), with
none of the pipeline's other duties: no quarantine table, no bronze or silver
Delta tables, no CHECK constraints, no presence, weekly, home-to-current or
displacement tables. Its results are compared with the reference's like the
pipeline's, so the floor is known to do the same work. Whatever this takes,
the full pipeline on Spark cannot take less.
"""

from __future__ import annotations

import time
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from bench.cdr_reference import district_boxes, pads


def run(spark: SparkSession, *, inputs: Path, cells: Path, admin2: Path, start: str, end: str, n_days: int,
        baseline_start: str, baseline_end: str, min_events: int, max_mean: float, max_day: int,
        home_min_days: int, key: bytes, out: Path, with_rows: bool = False) -> float:
    """Compute daily locations, baseline homes and the consecutive-day OD matrix; return the seconds taken.

    The key's pads reach the query as a one-row relation, not as literals, so the key stays out of the plans.

    ``with_rows``: the same work split in two steps the way the pipeline's jobs split it. The first writes every
    valid, deduplicated, located event once, both parties pseudonymised, as Parquet partitioned by date
    (``out/events``: a bronze table without Delta, quarantine or constraints); the second reads those files back
    and computes the three results from them, over pseudonyms. The least any pipeline that keeps its events and
    computes mobility from them adds to the floor; still none of the pipeline's other tables.
    """
    ipad, opad = pads(key)
    t0 = time.perf_counter()
    spark.createDataFrame([(bytearray(ipad), bytearray(opad))], "ipad binary, opad binary") \
        .createOrReplaceTempView("hmac_pads")
    spark.createDataFrame(district_boxes(admin2), "admin2 string, w double, s double, e double, n double") \
        .createOrReplaceTempView("districts")
    spark.read.option("header", True).csv(str(cells)).createOrReplaceTempView("cells_raw")
    spark.sql("""
        SELECT c.cell_id, try_cast(nullif(c.valid_from, '') AS DATE) AS valid_from,
               try_cast(nullif(c.valid_to, '') AS DATE) AS valid_to, d.admin2 AS unit
        FROM cells_raw c JOIN districts d ON CAST(c.longitude AS DOUBLE) BETWEEN d.w AND d.e
                                       AND CAST(c.latitude AS DOUBLE) BETWEEN d.s AND d.n
    """).createOrReplaceTempView("cells")
    raw = None
    for t in ("call", "sms", "mds"):
        df = spark.read.parquet(str(inputs / t)).withColumn("event_type", F.lit(t))
        raw = df if raw is None else raw.unionByName(df, allowMissingColumns=True)
    assert raw is not None
    raw.createOrReplaceTempView("raw")
    # One temporary view per step (Spark 4.1's CTE inlining rejects the nested WITH of the reference).
    spark.sql("""
        SELECT regexp_replace(trim(msisdn), '^\\\\+', '') AS m, try_cast(trim(start_time) AS TIMESTAMP) AS ts,
               trim(location_id) AS cell_id, event_type,
               nullif(regexp_replace(trim(msisdn_counterpart), '^\\\\+', ''), '') AS cp,
               outgoing, CAST(duration AS DOUBLE) AS duration
        FROM raw
    """).createOrReplaceTempView("parsed")
    spark.sql(f"""
        SELECT DISTINCT m, ts, CAST(ts AS DATE) AS d, cell_id, event_type, cp, outgoing, duration
        FROM parsed
        WHERE ts IS NOT NULL AND m IS NOT NULL AND m <> '' AND m RLIKE '^[0-9]{{6,15}}$'
          AND CAST(ts AS DATE) BETWEEN DATE '{start}' AND DATE '{end}'
    """).createOrReplaceTempView("valid")
    # An event's cell, valid on the event's date.
    on_valid_cell = """v.cell_id = c.cell_id AND (c.valid_from IS NULL OR v.d >= c.valid_from)
         AND (c.valid_to IS NULL OR v.d <= c.valid_to)"""

    def hmac(col: str) -> str:
        """HMAC-SHA256 of a column with the pads of the one-row relation ``hmac_pads p``, as 64 hex characters."""
        return f"sha2(concat(p.opad, unhex(sha2(concat(p.ipad, encode({col}, 'UTF-8')), 256))), 256)"

    if with_rows:
        spark.sql(f"""
            SELECT v.ts AS event_time, {hmac('v.m')} AS subscriber_id,
                   CASE WHEN v.cp IS NOT NULL THEN {hmac('v.cp')} END AS counterpart_id,
                   v.cell_id, v.event_type, v.outgoing, v.duration, v.d AS event_date
            FROM valid v LEFT SEMI JOIN cells c ON {on_valid_cell}
            CROSS JOIN hmac_pads p
        """).write.mode("overwrite").partitionBy("event_date").parquet(str(out / "events"))
        spark.read.parquet(str(out / "events")).selectExpr(
            "subscriber_id AS m", "event_time AS ts", "event_date AS d", "cell_id").createOrReplaceTempView("valid")
    spark.sql(f"SELECT v.m, v.ts, v.d, c.unit FROM valid v JOIN cells c ON {on_valid_cell}") \
        .cache().createOrReplaceTempView("located")
    spark.sql("SELECT m, d, count(*) AS n FROM located GROUP BY m, d").createOrReplaceTempView("per_day")
    spark.sql(f"""
        SELECT m FROM per_day GROUP BY m
        HAVING sum(n) >= {min_events} AND sum(n) / {n_days} <= {max_mean} AND max(n) <= {max_day}
    """).createOrReplaceTempView("active")
    spark.sql("SELECT m, m AS subscriber_id FROM active" if with_rows
              else f"SELECT m, {hmac('m')} AS subscriber_id FROM active CROSS JOIN hmac_pads p") \
        .createOrReplaceTempView("ids")

    def daily(name: str, where: str) -> None:
        spark.sql(f"""
            SELECT l.m, l.d, l.unit, count(*) AS n_unit, max(l.ts) AS last_time
            FROM located l LEFT SEMI JOIN active a ON l.m = a.m WHERE {where} GROUP BY l.m, l.d, l.unit
        """).createOrReplaceTempView(f"{name}_units")
        spark.sql(f"""
            SELECT date, m, unit, n_events FROM (
                SELECT d AS date, m, unit, CAST(sum(n_unit) OVER (PARTITION BY m, d) AS BIGINT) AS n_events,
                       row_number() OVER (PARTITION BY m, d ORDER BY last_time DESC, unit DESC) AS rn
                FROM {name}_units) WHERE rn = 1
        """).createOrReplaceTempView(name)

    daily("daily", "TRUE")
    spark.table("daily").cache()
    daily("night", "hour(l.ts) >= 19 OR hour(l.ts) < 7")
    spark.sql(f"""
        SELECT m, unit, count(DISTINCT date) AS n_days_home, max(date) AS last_seen
        FROM night WHERE date BETWEEN DATE '{baseline_start}' AND DATE '{baseline_end}'
        GROUP BY m, unit
    """).createOrReplaceTempView("home_units")
    spark.sql(f"""
        SELECT m, home_unit, n_days_home, n_days_seen FROM (
            SELECT m, unit AS home_unit, n_days_home,
                   CAST(sum(n_days_home) OVER (PARTITION BY m) AS BIGINT) AS n_days_seen,
                   row_number() OVER (PARTITION BY m ORDER BY n_days_home DESC, last_seen DESC, unit) AS rn
            FROM home_units) WHERE rn = 1 AND n_days_seen >= {home_min_days}
    """).createOrReplaceTempView("homes")
    spark.sql("""
        SELECT a.date, a.unit AS origin, b.unit AS destination, count(DISTINCT a.m) AS n_subscribers
        FROM daily a JOIN daily b ON a.m = b.m AND b.date = date_add(a.date, 1)
        GROUP BY a.date, a.unit, b.unit
    """).createOrReplaceTempView("od")
    queries = {
        "daily_locations": "SELECT date, subscriber_id, unit, n_events FROM daily JOIN ids USING (m)",
        "homes": "SELECT subscriber_id, home_unit, n_days_home, n_days_seen FROM homes JOIN ids USING (m)",
        "od_daily": "SELECT date, origin, destination, n_subscribers FROM od",
    }
    for name, q in queries.items():
        spark.sql(q).write.mode("overwrite").parquet(str(out / name))
    seconds = time.perf_counter() - t0
    spark.catalog.clearCache()
    return seconds
