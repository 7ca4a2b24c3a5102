"""The audit record of releases: ``audit.releases``, a signed hash chain that only ever grows.

Each row is one published release: who, when, the policy snapshot and hash, the
source versions, the counts, the checksums of the partner files, the manifest's
Ed25519 signature and the public key. Rows carry a sequence number, the hash of
the previous row and their own hash (SHA-256 over every other field, canonical
JSON), and an Ed25519 signature of that hash by the platform's key. Deleting,
reordering or editing a row breaks the chain or a signature; the table is
append-only and keeps its Delta log for a century, and :func:`check_history`
fails on any commit that is not a creation, an append, or an added column or
constraint (an UPDATE made after switching ``delta.appendOnly`` off shows as
``SET TBLPROPERTIES`` and ``UPDATE``).

The row is the release's commit point: exports rows and partner files without a
row are a release that did not complete (:func:`published_ids`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib.privacy import signing
from lib.tables import Lakehouse, TableSpec, register

GENESIS = "0" * 64
ALLOWED_OPERATIONS = {"CREATE TABLE", "ADD COLUMNS", "ADD CONSTRAINT"}  # plus WRITE in Append mode
CHAINED = ("seq", "prev_hash")  # hashed with the rest; row_hash and row_signature are not

RELEASES = register(TableSpec(
    name="audit.releases",
    schema=T.StructType([
        T.StructField("release_id", T.StringType(), False),
        T.StructField("created_at", T.TimestampType(), False),
        T.StructField("requester", T.StringType(), False),
        T.StructField("release_type", T.StringType(), False),
        T.StructField("policy_json", T.StringType(), False),
        T.StructField("policy_hash", T.StringType(), False),
        T.StructField("override_reason", T.StringType(), True),
        T.StructField("overridden", T.StringType(), True),
        T.StructField("sources_json", T.StringType(), False),
        T.StructField("period_start", T.DateType(), True),
        T.StructField("period_end", T.DateType(), True),
        T.StructField("counts_json", T.StringType(), False),
        T.StructField("files_json", T.StringType(), False),
        T.StructField("exports_path", T.StringType(), False),
        # added with the signed chain: nullable so that an older table gains them
        T.StructField("seq", T.LongType(), True),
        T.StructField("prev_hash", T.StringType(), True),
        T.StructField("row_hash", T.StringType(), True),
        T.StructField("row_signature", T.StringType(), True),
        T.StructField("public_key", T.StringType(), True),
        T.StructField("manifest_signature", T.StringType(), True),
        T.StructField("content_mac", T.StringType(), True),  # keyed MAC of inputs + policy: re-runs recognised
        T.StructField("exports_tables", T.StringType(), True),  # the export tables holding its rows (JSON)
    ]),
    description="One row per release: who, when, policy snapshot and hash, source versions, counts, file "
                "checksums; a signed hash chain (seq, prev_hash, row_hash, row_signature).",
    source="privacy",
    owner_job="release",
    keys=("release_id",),
    append_only=True,
    constraints={"hash_is_sha256": "policy_hash RLIKE '^[0-9a-f]{64}$'",
                 "override_has_reason": "overridden IS NULL OR length(trim(override_reason)) > 0"},
    properties={"delta.logRetentionDuration": "interval 36500 days",
                "delta.deletedFileRetentionDuration": "interval 36500 days"},
))


def _canon(value: Any) -> Any:
    if isinstance(value, datetime):
        # epoch seconds: Spark hands timestamps to Python as naive local times, so the text would depend on the
        # reader's time zone; the instant does not
        return round(value.timestamp(), 6)
    if isinstance(value, date):
        return value.isoformat()
    return value


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 over every field of an audit row except its own hash and signature (canonical JSON)."""
    body = {k: _canon(v) for k, v in row.items() if k not in ("row_hash", "row_signature")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_mac(secret: bytes, policy_hash: str, content: str) -> str:
    """Keyed MAC of a release's inputs and policy: the same inputs are recognised, and nobody without the
    platform's secret can test a guess of the unpublished values against it."""
    return hmac.new(secret, f"migralake release|{policy_hash}|{content}".encode(), hashlib.sha256).hexdigest()


def published_ids(lake: Lakehouse) -> set[str]:
    if not lake.exists(RELEASES.name):
        return set()
    return {r["release_id"] for r in lake.read(RELEASES.name).select("release_id").collect()}


def find(lake: Lakehouse, **equal: str) -> dict[str, Any] | None:
    if not lake.exists(RELEASES.name):
        return None
    df = lake.read(RELEASES.name)
    for col, value in equal.items():
        df = df.filter(F.col(col) == value)
    rows = df.limit(1).collect()
    return rows[0].asDict() if rows else None


def append(lake: Lakehouse, row: dict[str, Any], signer: signing.Signer) -> dict[str, Any]:
    """Chain, sign and append one row; returns it as written."""
    last = None
    if lake.exists(RELEASES.name):
        rows = lake.read(RELEASES.name).orderBy(F.col("seq").desc_nulls_last()).limit(1).collect()
        last = rows[0].asDict() if rows else None
    full: dict[str, Any] = {f.name: None for f in RELEASES.schema.fields}
    full.update(row)
    full["seq"] = int(last["seq"]) + 1 if last and last["seq"] is not None else 1
    full["prev_hash"] = last["row_hash"] if last and last["row_hash"] else GENESIS
    full["public_key"] = signer.public_hex
    full["row_hash"] = row_hash(full)
    full["row_signature"] = signer.sign(str(full["row_hash"]).encode())
    values = tuple(full[f.name] for f in RELEASES.schema.fields)
    lake.write(lake.spark.createDataFrame([values], schema=RELEASES.schema), RELEASES.name, mode="append")
    return full


@dataclass
class ChainCheck:
    ok: bool
    detail: str


def check_chain(rows: Iterable[dict[str, Any]], trusted_key: signing.Keyring | None) -> ChainCheck:
    """Sequence without gaps, each row linked to the previous, each hash recomputed and signed."""
    ordered = sorted(rows, key=lambda r: (r["seq"] is None, r["seq"] or 0, str(r["created_at"])))
    problems: list[str] = []
    prev = GENESIS
    keys: set[str] = set()
    for i, r in enumerate(ordered, start=1):
        rid = r["release_id"]
        if r["seq"] is None or r["row_hash"] is None:
            problems.append(f"{rid}: no chain fields (written before the signed chain, or forged)")
            continue
        if int(r["seq"]) != i:
            problems.append(f"{rid}: sequence {r['seq']} where {i} was expected (a row deleted or reordered)")
        if r["prev_hash"] != prev:
            problems.append(f"{rid}: does not link to the row before it (a row deleted, inserted or reordered)")
        if row_hash(r) != r["row_hash"]:
            problems.append(f"{rid}: its fields do not match its hash (the row was edited)")
        if not signing.verify(r["public_key"] or "", str(r["row_hash"]).encode(), r["row_signature"] or ""):
            problems.append(f"{rid}: the row's signature is not valid for its public key")
        elif trusted_key and r["public_key"] not in trusted_key:
            problems.append(f"{rid}: signed with key {signing.fingerprint(r['public_key'])}, not a trusted "
                            f"key ({signing.describe(trusted_key)})")
        keys.add(str(r["public_key"]))
        prev = str(r["row_hash"])
    if problems:
        return ChainCheck(False, "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5
                                                            else ""))
    who = ", ".join(signing.fingerprint(k) for k in sorted(keys)) or "none"
    return ChainCheck(True, f"{len(ordered)} rows linked and signed (key {who}"
                      + (", trusted)" if trusted_key else "; no trusted key pinned)"))


def check_history(lake: Lakehouse) -> ChainCheck:
    """Every commit of audit.releases is a creation, an append, or an added column or constraint."""
    hist = lake.history(RELEASES.name).select("version", "operation", "operationParameters").collect()
    versions = sorted(int(h["version"]) for h in hist)
    bad = []
    for h in sorted(hist, key=lambda h: int(h["version"])):
        op = str(h["operation"])
        params = h["operationParameters"] or {}
        if op == "WRITE" and str(params.get("mode", "")).strip('"') == "Append":
            continue
        if op not in ALLOWED_OPERATIONS:
            bad.append(f"version {h['version']}: {op}")
    if versions and versions[0] != 0:
        bad.append(f"the history starts at version {versions[0]}, not 0 (log files removed)")
    if bad:
        return ChainCheck(False, "audit.releases was changed other than by appends: " + "; ".join(bad[:6]))
    return ChainCheck(True, f"{len(versions)} commits, all creations or appends")
