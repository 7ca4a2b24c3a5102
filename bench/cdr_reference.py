"""Independent reference for the CDR benchmark: the same rules in DuckDB SQL.

Reads the synthetic Parquet event files, the cells CSV and the admin2 GeoJSON
(districts are rectangles, so a bounding-box test places a cell), and computes
daily locations, baseline homes and the consecutive-day OD matrix with the
pipeline's documented rules: validation (time, subscriber id, period, cell valid
on the date), exact-duplicate removal, keyed HMAC-SHA256 pseudonyms, the
activity filters, the "last event of the day" daily location, the modal
night-time home with ties to the most recent, and day d -> d+1 flows. It shares
no code with the Spark pipeline. Then, outside the timed part, it compares its
results with the pipeline's exported tables row by row.

Run by bench/cdr.py in a separate process (so its time and memory are its own);
prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from pathlib import Path

import duckdb


def pads(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def district_boxes(geojson: Path) -> list[tuple[str, float, float, float, float]]:
    out = []
    for f in json.loads(geojson.read_text())["features"]:
        ring = f["geometry"]["coordinates"][0]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        out.append((f["properties"]["admin2"], min(xs), min(ys), max(xs), max(ys)))
    return out


def compute(con: duckdb.DuckDBPyConnection, a: argparse.Namespace, key: bytes) -> dict[str, int]:
    ipad, opad = pads(key)
    inputs = ", ".join(f"'{Path(a.inputs) / t}/*.parquet'" for t in ("call", "sms", "mds"))
    con.execute("CREATE TABLE districts (admin2 VARCHAR, w DOUBLE, s DOUBLE, e DOUBLE, n DOUBLE)")
    con.executemany("INSERT INTO districts VALUES (?, ?, ?, ?, ?)", district_boxes(Path(a.admin2)))
    con.execute(f"""
        CREATE TABLE cells AS
        SELECT c.cell_id, TRY_CAST(NULLIF(c.valid_from, '') AS DATE) AS valid_from,
               TRY_CAST(NULLIF(c.valid_to, '') AS DATE) AS valid_to, d.admin2 AS unit
        FROM read_csv('{a.cells}', header = true, all_varchar = true) c
        JOIN districts d ON CAST(c.longitude AS DOUBLE) BETWEEN d.w AND d.e
                        AND CAST(c.latitude AS DOUBLE) BETWEEN d.s AND d.n
    """)
    # read_parquet over three folders: one event type each (the folder names the type).
    con.execute(f"""
        CREATE TABLE located AS
        WITH raw AS (
            SELECT *, regexp_extract(filename, '/(call|sms|mds)/', 1) AS event_type
            FROM read_parquet([{inputs}], filename = true, union_by_name = true)
        ), parsed AS (
            SELECT regexp_replace(trim(msisdn), '^\\+', '') AS m,
                   TRY_CAST(trim(start_time) AS TIMESTAMP) AS ts,
                   trim(location_id) AS cell_id, event_type,
                   NULLIF(regexp_replace(trim(msisdn_counterpart), '^\\+', ''), '') AS cp,
                   outgoing, CAST(duration AS DOUBLE) AS duration
            FROM raw
        ), valid AS (
            SELECT DISTINCT m, ts, CAST(ts AS DATE) AS d, cell_id, event_type, cp, outgoing, duration
            FROM parsed
            WHERE ts IS NOT NULL AND m IS NOT NULL AND m <> '' AND regexp_full_match(m, '[0-9]{{6,15}}')
              AND CAST(ts AS DATE) BETWEEN DATE '{a.start}' AND DATE '{a.end}'
        )
        SELECT v.m, v.ts, v.d, c.unit
        FROM valid v JOIN cells c
          ON v.cell_id = c.cell_id AND (c.valid_from IS NULL OR v.d >= c.valid_from)
         AND (c.valid_to IS NULL OR v.d <= c.valid_to)
    """)
    con.execute(f"""
        CREATE TABLE active AS
        WITH per_day AS (SELECT m, d, count(*) AS n FROM located GROUP BY m, d)
        SELECT m FROM per_day GROUP BY m
        HAVING sum(n) >= {a.min_events} AND sum(n) / {a.n_days} <= {a.max_mean} AND max(n) <= {a.max_day}
    """)
    con.execute("""
        CREATE TABLE ids AS
        SELECT m, sha256($opad || unhex(sha256($ipad || encode(m)))) AS subscriber_id FROM active
    """, {"ipad": ipad, "opad": opad})

    def daily_sql(where: str) -> str:
        return f"""
            WITH per_unit AS (
                SELECT l.m, l.d, l.unit, count(*) AS n_unit, max(l.ts) AS last_time
                FROM located l SEMI JOIN active USING (m) WHERE {where} GROUP BY l.m, l.d, l.unit
            )
            SELECT d AS date, m, unit, CAST(sum(n_unit) OVER (PARTITION BY m, d) AS BIGINT) AS n_events
            FROM per_unit
            QUALIFY row_number() OVER (PARTITION BY m, d ORDER BY last_time DESC, unit DESC) = 1
        """

    con.execute(f"CREATE TABLE daily AS {daily_sql('TRUE')}")
    con.execute(f"CREATE TABLE night AS {daily_sql('hour(l.ts) >= 19 OR hour(l.ts) < 7')}")
    con.execute(f"""
        CREATE TABLE homes AS
        WITH per_unit AS (
            SELECT m, unit, count(DISTINCT date) AS n_days_home, max(date) AS last_seen
            FROM night WHERE date BETWEEN DATE '{a.baseline_start}' AND DATE '{a.baseline_end}'
            GROUP BY m, unit
        )
        SELECT m, unit AS home_unit, n_days_home, CAST(sum(n_days_home) OVER (PARTITION BY m) AS BIGINT) AS n_days_seen
        FROM per_unit
        QUALIFY row_number() OVER (PARTITION BY m ORDER BY n_days_home DESC, last_seen DESC, unit) = 1
    """)
    con.execute(f"DELETE FROM homes WHERE n_days_seen < {a.home_min_days}")
    con.execute("""
        CREATE TABLE od AS
        SELECT a.date, a.unit AS origin, b.unit AS destination, count(DISTINCT a.m) AS n_subscribers
        FROM daily a JOIN daily b ON a.m = b.m AND b.date = a.date + 1
        GROUP BY ALL
    """)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    queries = {
        "daily_locations": "SELECT date, subscriber_id, unit, n_events FROM daily JOIN ids USING (m)",
        "homes": "SELECT subscriber_id, home_unit, n_days_home, n_days_seen FROM homes JOIN ids USING (m)",
        "od_daily": "SELECT date, origin, destination, n_subscribers FROM od",
    }
    rows = {}
    for name, q in queries.items():
        con.execute(f"COPY ({q}) TO '{out / name}.parquet' (FORMAT parquet)")
        rows[name] = one(con.execute(f"SELECT count(*) FROM '{out / name}.parquet'").fetchone())
    return rows


def one(row: tuple | None) -> int:
    """The single value of a one-row, one-column result."""
    if row is None:
        raise RuntimeError("the query returned no row")
    return int(row[0])


def compare(con: duckdb.DuckDBPyConnection, ours: Path, theirs: Path) -> dict[str, int]:
    """Rows in one result and not the other (multiset difference both ways), per table."""
    diffs = {}
    for name in ("daily_locations", "homes", "od_daily"):
        a, b = f"'{ours / name}.parquet'", f"'{theirs / name}/*.parquet'"
        cols = con.sql(f"SELECT * FROM {a} LIMIT 0").columns
        sel = ", ".join(f"CAST({c} AS VARCHAR)" for c in cols)
        diffs[name] = one(con.execute(
            f"SELECT (SELECT count(*) FROM (SELECT {sel} FROM {a} EXCEPT ALL SELECT {sel} FROM {b})) + "
            f"(SELECT count(*) FROM (SELECT {sel} FROM {b} EXCEPT ALL SELECT {sel} FROM {a}))"
        ).fetchone())
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for name in ("inputs", "cells", "admin2", "start", "end", "baseline-start", "baseline-end", "out", "spark-out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--n-days", type=int, required=True)
    p.add_argument("--min-events", type=int, required=True)
    p.add_argument("--max-mean", type=float, required=True)
    p.add_argument("--max-day", type=int, required=True)
    p.add_argument("--home-min-days", type=int, required=True)
    p.add_argument("--floor-out", action="append", default=[],
                   help="also compare these results (bench/cdr_spark_sql.py); may be given more than once")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    key = os.environ["MIGRALAKE_PSEUDONYM_KEY"].encode("utf-8")
    con = duckdb.connect()
    con.execute(f"SET threads = {a.threads}")
    t0 = time.perf_counter()
    rows = compute(con, a, key)
    seconds = time.perf_counter() - t0
    diffs = compare(con, Path(a.out), Path(a.spark_out))
    floor = [compare(con, Path(a.out), Path(f)) for f in a.floor_out] if a.floor_out else None
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"reference_seconds": round(seconds, 2), "rows": rows, "differences": diffs,
                      "floor_differences": floor, "reference_peak_rss_mb": round(peak_mb, 1)}))


if __name__ == "__main__":
    main()
