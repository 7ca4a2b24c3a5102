"""Verify a release from what was published: the partner files, and the audit record when there is one.

:func:`verify_files` needs only the release folder (what a partner has):
checksums against the manifest, the manifest's Ed25519 signature (against a
trusted public key when one is given), CSV and Parquet agree, every released
count above the threshold and withheld counts and measures empty, every
published sum adds up (a margin equals its released cells when none is withheld,
and is at least their sum plus one per withheld cell otherwise), the attacker
intervals of every withheld cell from all published cells and margins, and no
value that looks like a raw or pseudonymised identifier.

:func:`verify_release` adds what the lakehouse holds: the files against the
release's audit row, the signed hash chain and the Delta history of
``audit.releases`` (appends only), and the export tables (the release's rows are
there in the published numbers; no rows of a release without an audit row).

Writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lib import publish
from lib.privacy import audit, guard, relations, signing
from lib.tables import Lakehouse, TableError

BATCH = 65_536
ID_PATTERNS = {
    "phone-number-like": re.compile(r"^\+?[0-9]{6,15}$"),
    "pseudonym-like (64 hex)": re.compile(r"^[0-9a-f]{64}$"),
}
Check = tuple[str, bool, str]


def verify_files(folder: Path, audit_files: dict[str, str] | None = None,
                 spark: SparkSession | None = None, trusted_key: signing.Keyring | None = None) -> list[Check]:
    """(check, passed, detail) for a published release folder.

    With ``spark``, the attacker check runs one task per slice on the executors (a national release in
    minutes); without, slice after slice in this process. With ``trusted_key`` (hex keys), the manifest must be
    signed by that key; without, by the key published beside it (the detail says it is not pinned).
    """
    results: list[tuple[str, bool, str]] = []

    def add(check: str, ok: bool, detail: str) -> None:
        results.append((check, bool(ok), detail))

    mpath = folder / "manifest.json"
    if not mpath.exists():
        add("manifest", False, f"{mpath} not found")
        return results
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        add("manifest", False, f"{mpath}: not valid JSON ({exc})")
        return results
    add("manifest", True, f"{mpath.name} read")
    listed = manifest.get("files", {})
    bad = [n for n, h in listed.items() if not (folder / n).exists()
           or publish.sha256_file(folder / n) != h]
    extra = sorted(p.name for p in folder.iterdir()
                   if p.name not in listed and p.name != "manifest.json" and p.name not in publish.SIGNED)
    add("checksums", not bad and not extra,
        f"{len(listed)} files match the manifest" if not bad and not extra
        else f"changed or missing: {bad}; not in the manifest: {extra}")
    add(*signature_check(folder, manifest, trusted_key))
    if audit_files is not None:
        mine = {**listed, "manifest.json": publish.sha256_file(mpath)}
        diff = sorted(n for n in set(mine) | set(audit_files) if mine.get(n) != audit_files.get(n))
        add("audit record", not diff, "files and manifest match audit.releases" if not diff
            else f"differ from audit.releases: {diff}")
    dims = manifest["dimensions"]
    n, slice_by, cell_dims = dims["count_column"], dims["slice_by"], dims["cells"]
    rules = manifest["policy"]["rules"]
    threshold = int(rules["suppress_at_or_below"])
    measures = list(dims.get("measures", []))
    numbers = {n, *measures}  # counts and measures are numbers, not identifiers (a national total has 7 digits)
    # The files are read in batches (CSV row i is Parquet row i): memory does not grow with the release.
    try:
        cells_file = pq.ParquetFile(folder / "cells.parquet")
        margins_file = pq.ParquetFile(folder / "margins.parquet")
        csv_chunks = pd.read_csv(folder / "cells.csv", dtype=str, keep_default_na=False, chunksize=BATCH)
        n_cells = n_shown = n_withheld = low_shown = valued_withheld = 0
        csv_same = True
        leaked: dict[str, int] = {}
        slice_keys: set[tuple] = set()
        found: dict[str, int] = {}
        present_measures = [m for m in measures if m in cells_file.schema_arrow.names]
        for batch in cells_file.iter_batches(batch_size=BATCH):
            cells = batch.to_pandas()
            text = next(csv_chunks, None)
            as_text = cells.astype(object).where(cells.notna(), "").astype(str)
            csv_same = csv_same and text is not None and len(text) == len(cells) and \
                list(text.columns) == list(cells.columns) and all(
                    (publish.csv_unsafe(text[c]).to_numpy()
                     == as_text[c].str.replace(r"\.0$", "", regex=True).to_numpy()).all()
                    for c in [n, *cell_dims])
            released = cells["status"] == "released"
            n_cells += len(cells)
            n_shown += int(released.sum())
            n_withheld += int((~released).sum())
            low_shown += int((cells.loc[released, n].isna() | (cells.loc[released, n] <= threshold)).sum())
            valued_withheld += int(cells.loc[~released, n].notna().sum())
            for m in present_measures:
                leaked[m] = leaked.get(m, 0) + int(cells.loc[~released, m].notna().sum())
            if slice_by:
                slice_keys.update(cells[slice_by].drop_duplicates().astype(str).itertuples(index=False, name=None))
            scan_identifiers(cells, "cells", numbers, found)
        csv_same = csv_same and next(csv_chunks, None) is None
        for batch in margins_file.iter_batches(batch_size=BATCH):
            scan_identifiers(batch.to_pandas(), "margins", numbers, found)
    except (OSError, ValueError, KeyError) as exc:
        add("files readable", False, str(exc))
        return results
    add("csv = parquet", csv_same, f"{n_cells} cells in both" if csv_same else "cells.csv and cells.parquet differ")
    ok = low_shown == 0 and valued_withheld == 0
    add("threshold", ok, f"{n_shown} released counts all > {threshold}; {n_withheld} withheld, all empty"
        if ok else f"{low_shown} released counts at or below {threshold} (or empty); "
        f"{valued_withheld} withheld cells carry a value")
    if present_measures:
        carried = {m: v for m, v in leaked.items() if v}
        add("withheld measures", not carried, f"{len(present_measures)} measures empty on every withheld cell"
            if not carried else f"withheld cells carry measures: {carried}")
    tol = (rules.get("rounding_base") or 0) / 2
    exact = not rules.get("noise")
    if spark is not None:
        problems = attacker_check_on_spark(spark, folder, slice_by, cell_dims, dims["margins"], n, threshold, tol,
                                           exact)
        n_slices = len(slice_keys) if slice_by else 1
    else:
        problems = []
        cells, margins = pd.read_parquet(folder / "cells.parquet"), pd.read_parquet(folder / "margins.parquet")
        groups = [((), cells)] if not slice_by else list(cells.groupby(slice_by, sort=True, dropna=False))
        mgroups = {(): margins} if not slice_by else {
            (k if isinstance(k, tuple) else (k,)): g for k, g in margins.groupby(slice_by, sort=True, dropna=False)}
        for key, part in groups:
            key = key if isinstance(key, tuple) else (key,)
            problems += check_slice(part, mgroups.get(key, margins.iloc[0:0]), slice_by, cell_dims,
                                    dims["margins"], n, threshold, tol, exact)
        n_slices = len(groups)
    sums = [p for p in problems if ": sums: " in p]
    leaks = [p for p in problems if ": sums: " not in p]
    if exact and not tol:
        add("published sums", not sums, f"every released margin adds up across {n_slices} slices" if not sums
            else "; ".join(s.replace("sums: ", "") for s in sums[:5]) + (f" (+{len(sums) - 5} more)" if len(sums) > 5
                                                                         else ""))
    add("attacker intervals", not leaks, "every withheld cell's interval is wide (upper bound above the "
        f"threshold, not a single value) across {n_slices} slices" if not leaks
        else "; ".join(leaks[:5]) + (f" (+{len(leaks) - 5} more)" if len(leaks) > 5 else ""))
    add(*releases_check(folder, manifest))
    if rules.get("relations"):
        add(*relations_check(folder, rules, slice_by, cell_dims, threshold))
    add("no identifiers", not found, "no text value looks like a phone number or a pseudonym" if not found
        else "; ".join(f"{k}: {v} values" for k, v in sorted(found.items())))
    return results


def scan_identifiers(frame: pd.DataFrame, name: str, numbers: set[str], found: dict[str, int]) -> None:
    """Count values that look like a phone number or a pseudonym, per file, column and pattern."""
    for col in frame.columns:
        if col in numbers:
            continue
        values = frame[col].dropna().astype(str)
        for label, pat in ID_PATTERNS.items():
            hits = int(values.str.match(pat).sum())
            if hits:
                key = f"{name}.{col} {label}"
                found[key] = found.get(key, 0) + hits


def sum_problems(cells: pd.DataFrame, margins: pd.DataFrame, dims: list[str], n: str,
                 specs: list[list[str]]) -> list[str]:
    """Published margins against the published cells of one slice: a released margin equals the sum of its
    cells when none is withheld, and is at least their sum plus one per withheld cell otherwise."""
    found = []
    values = pd.to_numeric(cells[n], errors="coerce")
    held = values.isna()
    for by in specs:
        name = guard.margin_name(by)
        keys = (cells[by].astype(str).agg("|".join, axis=1) if by else pd.Series("", index=cells.index))
        shown = values.fillna(0).groupby(keys).sum()
        withheld = held.groupby(keys).sum()
        for row in margins[margins["margin"] == name].itertuples(index=False):
            total = getattr(row, n)
            if pd.isna(total):
                continue
            k = str(row.key)
            s_, w = int(shown.get(k, 0)), int(withheld.get(k, 0))
            if (w == 0 and s_ != int(total)) or (w > 0 and s_ + w > int(total)):
                found.append(f"sums: margin {name} '{k}' = {int(total)} but its released cells sum to {s_}"
                             + (f" with {w} withheld" if w else ""))
    return found


def check_slice(part: pd.DataFrame, mpart: pd.DataFrame, slice_by: list[str], cell_dims: list[str],
                specs: list[list[str]], n: str, threshold: int, tol: float, exact: bool) -> list[str]:
    """The attacker's findings on one published slice, each prefixed with the slice."""
    key = {c: str(part[c].iloc[0]) for c in slice_by} if len(part) else {}
    extra_cols = list(dict.fromkeys(c for m in specs for c in m if c not in cell_dims))
    mpart = mpart[mpart["margin"].isin([guard.margin_name(m) for m in specs])]
    sums = sum_problems(part, mpart, [*cell_dims, *extra_cols], n, specs) if exact and not tol else []
    try:
        found = guard.check_published(part.reset_index(drop=True), mpart, [*cell_dims, *extra_cols], n, threshold,
                                      specs, tolerance=tol, exact=exact)
    except guard.GuardError as exc:
        found = [f"cannot be checked: {exc}"]
    return [f"slice {key}: {p}" for p in [*sums, *found]]


def attacker_check_on_spark(spark: SparkSession, folder: Path, slice_by: list[str], cell_dims: list[str],
                            specs: list[list[str]], n: str, threshold: int, tol: float, exact: bool) -> list[str]:
    """:func:`check_slice` for every slice, one grouped task per slice, from the published Parquet files."""
    cells = spark.read.parquet(str(folder / "cells.parquet"))
    margins = spark.read.parquet(str(folder / "margins.parquet"))
    group = list(slice_by)
    if not group:
        cells, margins = cells.withColumn("_slice", F.lit(0)), margins.withColumn("_slice", F.lit(0))
        group = ["_slice"]

    def fn(part: pd.DataFrame, mpart: pd.DataFrame) -> pd.DataFrame:
        if part.empty:
            return pd.DataFrame({"problem": pd.Series([], dtype=str)})
        found = check_slice(part.drop(columns=["_slice"], errors="ignore"),
                            mpart.drop(columns=["_slice"], errors="ignore"), slice_by, cell_dims, specs, n,
                            threshold, tol, exact)
        return pd.DataFrame({"problem": pd.Series(found, dtype=str)})

    rows = cells.groupBy(*group).cogroup(margins.groupBy(*group)).applyInPandas(fn, schema="problem string")
    return sorted(r["problem"] for r in rows.collect())




def signature_check(folder: Path, manifest: dict[str, Any], trusted_key: signing.Keyring | None) -> Check:
    """manifest.sig is a valid Ed25519 signature of manifest.json by the published key (and the trusted one)."""
    sig_path, key_path = folder / "manifest.sig", folder / "signing_key.pub"
    if not sig_path.exists() or not key_path.exists():
        return "signature", False, "manifest.sig or signing_key.pub missing: the release is not signed"
    published = key_path.read_text().strip()
    if manifest.get("signature", {}).get("public_key") != published:
        return "signature", False, "signing_key.pub is not the key the manifest names"
    if not signing.verify(published, (folder / "manifest.json").read_bytes(), sig_path.read_text().strip()):
        return "signature", False, "manifest.sig is not a valid signature of manifest.json"
    if trusted_key and published not in trusted_key:
        return "signature", False, (f"signed with key {signing.fingerprint(published)}, not a trusted key "
                                    f"({signing.describe(trusted_key)})")
    return "signature", True, (f"manifest.json signed with key {signing.fingerprint(published)}"
                               + (" (a trusted key)" if trusted_key else
                                  " (published with the release; no trusted key pinned: audit verify --public-key)"))


def verify_release(lake: Lakehouse, folder: Path, release_id: str, spark: SparkSession | None,
                   trusted_key: signing.Keyring | None) -> list[Check]:
    """:func:`verify_files` plus the audit record, its signed chain and history, and the export tables."""
    row = audit.find(lake, release_id=release_id)
    audit_files = json.loads(row["files_json"]) if row else None
    results = verify_files(folder, audit_files, spark, trusted_key) if folder.exists() else [
        ("files", False, f"no release folder {folder}")]
    if row is None:
        results.append(("audit record", False, f"{release_id} is not in audit.releases"))
    else:
        sig = (folder / "manifest.sig").read_text().strip() if (folder / "manifest.sig").exists() else None
        results.append(("audit signature", row["manifest_signature"] == sig and row["public_key"] is not None,
                        "the audit row records this manifest's signature" if row["manifest_signature"] == sig
                        else "the audit row records another manifest signature (or none)"))
    if lake.exists(audit.RELEASES.name):
        rows = [r.asDict() for r in lake.read(audit.RELEASES.name).collect()]
        chain = audit.check_chain(rows, trusted_key)
        results.append(("audit chain", chain.ok, chain.detail))
        hist = audit.check_history(lake)
        results.append(("audit history", hist.ok, hist.detail))
    results += export_checks(lake, folder, release_id, row)
    return results


def export_checks(lake: Lakehouse, folder: Path, release_id: str, row: dict[str, Any] | None) -> list[Check]:
    """The release's rows in the export tables match its files; no export rows lack an audit row."""
    release_type = row["release_type"] if row else release_id.rsplit("-", 2)[0]
    n = _register_exports(row, release_type)
    tables = json.loads(row["exports_tables"]) if row and row.get("exports_tables") else []
    if row is not None and row.get("exports_tables") is None:  # released before the tables were recorded
        tables = [t for t in (f"exports.{release_type}", f"exports.{release_type}_margins") if _exists(lake, t)]
    out: list[Check] = []
    done = audit.published_ids(lake)
    for name, file in zip(tables, ("cells.parquet", "margins.parquet"), strict=False):
        if not _exists(lake, name) or not (folder / file).exists():
            out.append(("export rows", False, f"{name} or {file} missing"))
            continue
        df = lake.read(name).filter(F.col("release_id") == release_id)
        got = df.groupBy("status").agg(F.count("*").alias("rows"), F.sum(n).alias("total")).collect()
        table_side = {r["status"]: (int(r["rows"]), int(r["total"] or 0)) for r in got}
        files = pd.read_parquet(folder / file, columns=["status", n])
        file_side = {s: (len(g), int(pd.to_numeric(g[n]).fillna(0).sum())) for s, g in files.groupby("status")}
        out.append(("export rows", table_side == file_side,
                    f"{name}: rows and totals per status match the files" if table_side == file_side
                    else f"{name}: {table_side} in the table, {file_side} in the files"))
    for name in (f"exports.{release_type}", f"exports.{release_type}_margins"):
        if _exists(lake, name):
            orphans = sorted(r for r in lake.distinct(name, "release_id") if r not in done)
            if orphans:
                out.append(("export rows", False, f"{name} holds rows of {orphans[:3]} with no audit row (a "
                                                  "release that did not complete: re-run it to clean up)"))
    if not out:
        out.append(("export rows", True, "not in the shared export tables (released below the platform floor "
                                         "by override)" if row else "none"))
    return out


def _register_exports(row: dict[str, Any] | None, release_type: str) -> str:
    """Register the release type's export tables from the policy its audit row recorded (this process may not
    have released that type); returns the count column."""
    from lib.privacy.policy import ReleaseType
    from lib.privacy.release import export_specs
    from lib.tables import spec

    if row is None:
        return "n"
    snap = json.loads(row["policy_json"])
    rt = ReleaseType.model_validate(snap["rules"])
    with contextlib.suppress(TableError, RuntimeError):
        export_specs(release_type, rt, spec(rt.source).schema, int(snap.get("platform_floor", snap["floor"])))
    return rt.count_column


def _exists(lake: Lakehouse, name: str) -> bool:
    try:
        return lake.exists(name)
    except TableError:  # an export table of a type this run did not register: look at its folder
        return False


def relations_check(folder: Path, rules: dict[str, Any], slice_by: list[str], cell_dims: list[str],
                    threshold: int) -> Check:
    """The attacker across slices: the policy's relations over the additive measure of the published cells."""
    from lib.privacy.policy import Relation

    measure = rules.get("additive")
    rels = [Relation.model_validate(r) for r in rules["relations"]]
    cells = pd.read_parquet(folder / "cells.parquet")
    if not measure or measure not in cells.columns:
        return "across slices", False, f"the policy's additive measure {measure!r} is not in the cells"
    keys = [*slice_by, *cell_dims]
    columns = {measure: pd.to_numeric(cells[measure])}
    for column, (numerator, ratio, scale) in (rules.get("additive_via_ratio") or {}).items():
        # what a partner computes for every released cell: column = numerator x scale / ratio
        columns[column] = (pd.to_numeric(cells[numerator]) * float(scale) / pd.to_numeric(cells[ratio])).round()
    try:
        eqs = relations.equations(cells, keys, rels)
        held = (cells["status"] != "released").to_numpy()
        found = []
        for name, values in columns.items():
            found += relations.attack(values.fillna(0).to_numpy(dtype=float), held,
                                      eqs if name == measure else relations.at_least(eqs), threshold)
            if found:
                measure = name
                break
    except relations.RelationError as exc:
        return "across slices", False, str(exc)
    if found:
        shown = "; ".join(f"{dict(zip(keys, map(str, cells.loc[f.row, keys]), strict=True))}: {measure} in "
                          f"[{f.low:g}, {f.high:g}]" for f in found[:3])
        return "across slices", False, f"{len(found)} withheld cells recovered or bounded: {shown}"
    return "across slices", True, (f"{', '.join(columns)} of every withheld cell stay wide under {len(eqs)} "
                                   "equations across slices")


def releases_check(folder: Path, manifest: dict[str, Any]) -> Check:
    """This release against every other release of its type in the same exports folder, from their files."""
    from lib.privacy import overlap
    from lib.privacy.policy import Relation

    rules = manifest["policy"]["rules"]
    dims = manifest["dimensions"]
    if not overlap.exact(rules):
        return "across releases", True, "not compared (noised or rounded counts are not exact)"
    slice_by, n = dims["slice_by"], dims["count_column"]
    cell_dims = list(dict.fromkeys([*dims["cells"], *(c for m in dims["margins"] for c in m
                                                      if c not in dims["cells"])]))
    mine: dict[str, pd.DataFrame] | None = None
    found: list[str] = []
    compared = 0
    for other in sorted(folder.parent.glob("*/manifest.json")):
        if other.parent == folder or other.parent.name.endswith(".partial"):
            continue
        try:
            theirs = json.loads(other.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if theirs.get("release_type") != manifest.get("release_type") or not overlap.exact(theirs["policy"]["rules"]):
            continue
        if mine is None:
            mine = {"cells": pd.read_parquet(folder / "cells.parquet"),
                    "margins": pd.read_parquet(folder / "margins.parquet")}
        them = {"cells": pd.read_parquet(other.parent / "cells.parquet"),
                "margins": pd.read_parquet(other.parent / "margins.parquet")}
        compared += 1
        threshold = max(int(rules["suppress_at_or_below"]), int(theirs["policy"]["rules"]["suppress_at_or_below"]))
        rels = [Relation.model_validate(r) for r in rules.get("relations", [])]
        found += [f"with {theirs['release_id']}: {p}" for p in overlap.compare(
            them, mine, slice_by, cell_dims, n, theirs["dimensions"]["margins"], dims["margins"], threshold,
            rules.get("additive"), rels)]
    if found:
        return "across releases", False, "; ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3
                                                                  else "")
    return "across releases", True, (f"nothing withheld is given away together with the {compared} other "
                                     f"release(s) of {manifest.get('release_type')} in {folder.parent}")
