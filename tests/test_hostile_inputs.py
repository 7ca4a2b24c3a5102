"""Hostile and broken input files: every row ends in bronze or in quarantine with its reason, nothing crashes,
and no raw identifier reaches any file under the lakehouse (Delta logs and their statistics included)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from datetime import date
from pathlib import Path

from pyspark.sql import SparkSession

from jobs.cdr import ingest as cdr_ingest
from jobs.demo import cdr_synth
from jobs.social import ingest as social_ingest
from lib.config import CdrInput, Config, SocialInput, load_config
from lib.tables import Lakehouse

KEY = "hostile-key-0123456789abcdef0123"
DAY = "2024-03-05"
HEADER = "start_time,msisdn,msisdn_counterpart,location_id,outgoing,duration,id"


def cdr_files(folder: Path) -> tuple[dict[str, str], set[str]]:
    """CDR files with one hostile row each; returns {msisdn: expected reason or 'accepted'} and raw ids."""
    folder.mkdir(parents=True)
    rows = {
        "255700000001": f"{DAY} 08:00:00,255700000001,,C0002,1,30,ok",
        "255700000002": f"{DAY} 08:01:00,255700000002,,C0002,1,abc,duration",
        "255700000003": f"{DAY} 08:02:00,255700000003,,C0002,1,30,extra,FIELD",
        "255700000004": f'{DAY} 08:03:00,255700000004,"2557""00000099",C0002,0,30,"say ""hi"""',
        "255700000005": f'"{DAY} 08:04:00",255700000005,,C0002,1,30,"two\nlines"',
        "255700000006": ",255700000006,,C0002,1,30,no time",
        "255700000007": f"{DAY} 08:06:00,255700000007,,C0002,maybe,30,outgoing",
        "255700000008": f"{DAY} 08:07:00,255700000008,,C0002",
        "255700000009": f"{DAY} 08:08:00,255700000009,,255700000077,1,30,a phone number as cell",
    }
    expected = {"255700000001": "accepted", "255700000002": "bad_duration", "255700000003": "malformed_row",
                "255700000004": "accepted", "255700000005": "accepted", "255700000006": "unparseable_time",
                "255700000007": "bad_outgoing", "255700000008": "malformed_row", "255700000009": "unknown_cell"}
    (folder / "hostile.csv").write_text(HEADER + "\n" + "\n".join(rows.values()) + "\n")
    # A header that lies about the order of its columns: the data are in FlowDB order underneath.
    liar = folder / "liar"
    liar.mkdir()
    (liar / "shuffled.csv").write_text("msisdn,start_time,msisdn_counterpart,location_id,outgoing,duration,id\n"
                                       f"{DAY} 09:00:00,255700000010,,C0002,1,30,x\n")
    expected["255700000010"] = "unparseable_time"  # its "time" column holds the MSISDN
    raw = set(expected) | {"255700000077", "2557\"00000099"}
    return expected, raw


def scan(root: Path, needles: set[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return hits


def cdr_config(tmp_path: Path, inputs: list[CdrInput]) -> Config:
    """The demo config for ``inputs`` over 2024-03-04..10, with one real cells file and admin2 boundaries written
    under ``tmp_path`` and the lakehouse in ``tmp_path / "lake"``."""
    with (tmp_path / "cells.csv").open("w", newline="") as fh:
        cells = cdr_synth.cells(1, date(2024, 3, 4))
        writer = csv.DictWriter(fh, fieldnames=list(cells[0]))
        writer.writeheader()
        writer.writerows(cells)
    (tmp_path / "admin2.geojson").write_text(json.dumps(cdr_synth.admin_geojson("admin2")))
    cfg = load_config("demo", overrides=[f"lakehouse.root={tmp_path / 'lake'}", "period.start=2024-03-04",
                                         "period.end=2024-03-10"])
    return cfg.model_copy(update={"cdr": cfg.cdr.model_copy(update={
        "inputs": inputs,
        "cells_path": str(tmp_path / "cells.csv"),
        "admin_paths": {"admin2": str(tmp_path / "admin2.geojson")}})})


def test_hostile_cdr_rows_are_quarantined_by_reason_and_raw_ids_never_stored(
        spark: SparkSession, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MIGRALAKE_PSEUDONYM_KEY", KEY)
    expected, raw = cdr_files(tmp_path / "in")
    cfg = cdr_config(tmp_path, [CdrInput(path=str(tmp_path / "in" / "hostile.csv"), event_type="call"),
                                CdrInput(path=str(tmp_path / "in" / "liar"), event_type="sms")])
    stale = tmp_path / "lake" / "_staging" / "cdr_ingest-0123abcd"  # left by an ingest that was killed
    stale.mkdir(parents=True)
    (stale / "part-00000.parquet").write_bytes(b"x" * 1000)
    cdr_ingest.run(spark, cfg)
    assert not stale.exists() and list((tmp_path / "lake" / "_staging").iterdir()) == []  # and this run's too
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    bronze = lake.read("bronze.cdr_events").count()
    q = lake.read("quarantine.cdr_events").toPandas()
    got = q["reason"].value_counts().to_dict()
    want: dict[str, int] = {}
    for reason in expected.values():
        want[reason] = want.get(reason, 0) + 1
    assert bronze == want.pop("accepted") == 3  # the "" quoting and the quoted newline read as one record each
    assert got == want
    assert bronze + len(q) == len(expected)  # rows in = accepted + quarantined
    assert set(q.columns) == {"period_start", "source_file", "reason", "detail", "event_time", "subscriber_id",
                              "cell_id"}
    assert q.loc[q["reason"] == "unknown_cell", "cell_id"].isna().all()  # not a known cell: not kept
    assert q["source_file"].str.contains("hostile.csv|shuffled.csv").all() and q["detail"].notna().all()
    assert scan(Path(cfg.lakehouse.resolved_root()), raw) == []  # data files and _delta_log statistics alike


def jsonl(*objs: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def post(i: int, text: str = "Refugees arrive at the border town", author: str = "42") -> dict:
    return {"id": str(i), "text": text, "author_id": author, "created_at": f"{DAY}T10:00:00Z", "lang": "en"}


def test_hostile_social_files_are_read_or_quarantined_and_a_wholly_unusable_file_is_named(
        spark: SparkSession, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MIGRALAKE_PSEUDONYM_KEY", KEY)
    d = tmp_path / "posts"
    d.mkdir()
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(post(1), post(2)))  # the first post is kept
    (d / "packed.jsonl.gz").write_bytes(gzip.compress(jsonl(post(3), post(4), post(5))))
    (d / "garbage.jsonl").write_bytes(bytes(range(256)) * 40)  # binary: no line can be read
    (d / "deep.jsonl").write_bytes(b"[" * 200_000 + b"]" * 200_000 + b"\n" + jsonl(post(6)))
    (d / "surrogate.jsonl").write_bytes(b'{"id": "7", "text": "bad \\ud800 text", "author_id": "43", '
                                        b'"created_at": "2024-03-05T10:00:00Z"}\n'
                                        b'{"id": "8", "text": "fine", "author_id": "\\udfff", '
                                        b'"created_at": "2024-03-05T10:00:00Z"}\n' + jsonl(post(9)))
    (d / "broken.jsonl.gz").write_bytes(gzip.compress(jsonl(post(10)))[:-12] + b"\x00" * 4)  # truncated stream
    c = tmp_path / "csv"
    c.mkdir()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "text", "author_id", "created_at"])
    w.writerow(["11", "x" * 200_000, "44", f"{DAY}T10:00:00Z"])  # a field over 128 kB
    w.writerow(["12", 'quoted "text", with a comma\nand a newline', "45", f"{DAY}T10:00:00Z"])
    w.writerow(["13", "last", "46", f"{DAY}T10:00:00Z"])
    (c / "big.csv").write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())
    cfg = load_config("demo", overrides=[f"lakehouse.root={tmp_path / 'lake'}", "period.start=2024-03-04",
                                         "period.end=2024-03-10"])
    cfg = cfg.model_copy(update={"social": cfg.social.model_copy(update={
        "inputs": [SocialInput(path=str(d)), SocialInput(path=str(c), format="csv")], "column_mapping": {}})})
    code = social_ingest.run(spark, cfg)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    bronze = lake.read("bronze.social_posts").toPandas()
    q = lake.read("quarantine.social_posts").toPandas()
    assert sorted(bronze["line_number"].groupby(bronze["source_file"].str.rsplit("/", n=1).str[-1]).count()
                  .items()) == [("big.csv", 2), ("bom.jsonl", 2), ("deep.jsonl", 1), ("packed.jsonl.gz", 3),
                                ("surrogate.jsonl", 1)]
    by_file = {(f.rsplit("/", 1)[-1], r) for f, r in zip(q["source_file"], q["reason"], strict=True)}
    assert ("deep.jsonl", "bad_json") in by_file and ("big.csv", "oversize") in by_file
    assert ("surrogate.jsonl", "invalid_unicode") in by_file and ("broken.jsonl.gz", "unreadable_file") in by_file
    assert {r for f, r in by_file if f == "garbage.jsonl"} <= {"invalid_utf8", "bad_json", "empty_line"}
    assert (q["source_file"].str.endswith("surrogate.jsonl") & (q["reason"] == "invalid_unicode")).sum() == 2
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_in"] == summary["accepted"] + len(q) and summary["accepted"] == len(bronze) == 9
    assert code == 5 and [Path(f).name for f in summary["unusable_files"]] == ["broken.jsonl.gz", "garbage.jsonl"]
    assert "x" * 1000 not in "".join(q["detail"].dropna())  # the quarantine never keeps the line


def test_a_quarantined_row_does_not_make_its_valid_twin_a_duplicate(
        spark: SparkSession, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An outgoing of "maybe" (quarantined) and an empty one (valid) both read as null: the rows are equal in every
    deduplicated column. The valid row is kept even though the quarantined one's file comes first; a true copy of
    it is still a duplicate."""
    monkeypatch.setenv("MIGRALAKE_PSEUDONYM_KEY", KEY)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.csv").write_text(HEADER + f"\n{DAY} 10:00:00,255700000020,,C0002,maybe,30,bad\n"
                                           f"{DAY} 11:00:00,,,C0002,1,30,no subscriber\n")
    (folder / "b.csv").write_text(HEADER + f"\n{DAY} 10:00:00,255700000020,,C0002,,30,good\n"
                                           f"{DAY} 10:00:00,255700000020,,C0002,,30,copy\n"
                                           f"{DAY} 11:00:00,,,C0002,1,30,no subscriber\n")
    cfg = cdr_config(tmp_path, [CdrInput(path=str(folder), event_type="call")])
    cdr_ingest.run(spark, cfg)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    bronze = lake.read("bronze.cdr_events").toPandas()
    q = lake.read("quarantine.cdr_events").toPandas()
    assert len(bronze) == 1 and bronze["source_file"].str.endswith("b.csv").all()
    assert bronze["outgoing"].isna().all()
    assert sorted(zip(q["reason"], q["source_file"].str[-5:], strict=True)) == [
        ("bad_outgoing", "a.csv"), ("duplicate", "b.csv"), ("null_subscriber", "a.csv"), ("null_subscriber", "b.csv")]
