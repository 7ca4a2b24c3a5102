"""Review of releases: list them, verify one from its published files, write a reviewer report.

    ./spark-submit.sh audit list
    ./spark-submit.sh audit verify <release-id>    # exit 0 only when every check passes
    ./spark-submit.sh audit report <release-id>    # self-contained HTML under reports_dir

``verify`` recomputes from the files under ``<exports_dir>/<release-id>/`` alone:
checksums against the manifest, CSV and Parquet agree, every released count is
above the threshold and withheld counts are empty, the attacker intervals of
every withheld cell (linear bounds from all published cells and margins), and no
value that looks like a raw or pseudonymised identifier. When the lakehouse
holds ``audit.releases``, the checksums are also compared with the audit record
(so a manifest rewritten to match tampered files is caught too).

Reads ``audit.releases``; writes only the HTML report.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs import release as release_job  # registers audit.releases
from lib.config import PROJECT_ROOT, Config
from lib.privacy import guard, slices
from lib.tables import Lakehouse

BATCH = 65_536
DESCRIPTION = "Review releases: audit list | verify <release-id> | report <release-id>"
ID_PATTERNS = {
    "phone-number-like": re.compile(r"^\+?[0-9]{6,15}$"),
    "pseudonym-like (64 hex)": re.compile(r"^[0-9a-f]{64}$"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "verify", "report"])
    parser.add_argument("release_id", nargs="?")


def exports_root(cfg: Config) -> Path:
    p = Path(cfg.lakehouse.exports_dir)
    return p if p.is_absolute() else PROJECT_ROOT / p


def verify_files(folder: Path, audit_files: dict[str, str] | None = None,
                 spark: SparkSession | None = None) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for a published release folder.

    With ``spark``, the attacker check runs one task per slice on the executors (a national release in
    minutes); without, slice after slice in this process.
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
           or release_job.sha256_file(folder / n) != h]
    extra = sorted(p.name for p in folder.iterdir() if p.name not in listed and p.name != "manifest.json")
    add("checksums", not bad and not extra,
        f"{len(listed)} files match the manifest" if not bad and not extra
        else f"changed or missing: {bad}; not in the manifest: {extra}")
    if audit_files is not None:
        mine = {**listed, "manifest.json": release_job.sha256_file(mpath)}
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
                    (text[c].to_numpy() == as_text[c].str.replace(r"\.0$", "", regex=True).to_numpy()).all()
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
    leaks = problems
    add("attacker intervals", not leaks, "every withheld cell's interval is wide (upper bound above the "
        f"threshold, not a single value) across {n_slices} slices" if not leaks
        else "; ".join(leaks[:5]) + (f" (+{len(leaks) - 5} more)" if len(leaks) > 5 else ""))
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


def check_slice(part: pd.DataFrame, mpart: pd.DataFrame, slice_by: list[str], cell_dims: list[str],
                specs: list[list[str]], n: str, threshold: int, tol: float, exact: bool) -> list[str]:
    """The attacker's findings on one published slice, each prefixed with the slice."""
    key = {c: str(part[c].iloc[0]) for c in slice_by} if len(part) else {}
    extra_cols = list(dict.fromkeys(c for m in specs for c in m if c not in cell_dims))
    mpart = mpart[mpart["margin"].isin([guard.margin_name(m) for m in specs])]
    try:
        found = guard.check_published(part.reset_index(drop=True), mpart, [*cell_dims, *extra_cols], n, threshold,
                                      specs, tolerance=tol, exact=exact)
    except guard.GuardError as exc:
        found = [f"cannot be checked: {exc}"]
    return [f"slice {key}: {p}" for p in found]


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


def audit_row(lake: Lakehouse, release_id: str) -> dict[str, Any] | None:
    if not lake.exists("audit.releases"):
        return None
    rows = lake.read("audit.releases").filter(F.col("release_id") == release_id).collect()
    return rows[0].asDict() if rows else None


def report_html(release_id: str, folder: Path, row: dict[str, Any] | None,
                results: list[tuple[str, bool, str]]) -> str:
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else {}
    esc = html.escape
    policy = manifest.get("policy", {})
    rules = policy.get("rules", {})
    passed = all(ok for _, ok, _ in results)
    counts = json.loads(row["counts_json"]) if row else {"totals": manifest.get("counts", {}), "per_slice": []}
    img = ""
    if (folder / "quicklook.png").exists():
        img = base64.b64encode((folder / "quicklook.png").read_bytes()).decode()
    per_slice = counts.get("per_slice", [])
    slice_cols = list(per_slice[0].keys()) if per_slice else []
    rows_html = "".join("<tr>" + "".join(f"<td>{esc(str(r.get(c, '')))}</td>" for c in slice_cols) + "</tr>"
                        for r in per_slice)
    checks = "".join(f"<tr class={'ok' if ok else 'bad'}><td>{esc(c)}</td><td>{'PASS' if ok else 'FAIL'}</td>"
                     f"<td>{esc(d)}</td></tr>" for c, ok, d in results)
    override = manifest.get("override")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>migralake release {esc(release_id)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px}}
tr.ok td:nth-child(2){{color:#060;font-weight:bold}}tr.bad td:nth-child(2){{color:#b00;font-weight:bold}}
.verdict{{font-size:1.3em;padding:.5em;border-radius:4px;background:{'#e6f4e6' if passed else '#fbe3e3'}}}
.scroll{{max-height:420px;overflow:auto}}</style></head><body>
<h1>Release {esc(release_id)}</h1>
<p class="verdict">Verification: <b>{'PASSED' if passed else 'FAILED'}</b></p>
<h2>Release</h2><table>
<tr><th>type</th><td>{esc(str(manifest.get('release_type', '')))}</td></tr>
<tr><th>created</th><td>{esc(str(manifest.get('created_at', '')))}</td></tr>
<tr><th>requester</th><td>{esc(str(manifest.get('requester', '')))}</td></tr>
<tr><th>source</th><td>{esc(json.dumps(manifest.get('source', {})))}</td></tr>
<tr><th>how to cite</th><td>{esc(str(manifest.get('how_to_cite', '')))}</td></tr></table>
<h2>Policy and approval</h2><table>
<tr><th>approved by</th><td>{esc(str(policy.get('approved_by')))}</td></tr>
<tr><th>approved on</th><td>{esc(str(policy.get('approved_on')))}</td></tr>
<tr><th>profile</th><td>{esc(str(policy.get('profile')))}</td></tr>
<tr><th>threshold</th><td>counts at or below {esc(str(rules.get('suppress_at_or_below')))} withheld
 (floor {esc(str(policy.get('floor')))})</td></tr>
<tr><th>margins</th><td>{esc(json.dumps(rules.get('margins')))}</td></tr>
<tr><th>rounding / noise</th><td>{esc(str(rules.get('rounding_base')))} / {esc(json.dumps(rules.get('noise')))}</td></tr>
<tr><th>policy hash</th><td><code>{esc(str(manifest.get('policy_hash')))}</code></td></tr>
<tr><th>override</th><td>{esc(json.dumps(override)) if override else 'none'}</td></tr></table>
<h2>Suppression</h2><table>{''.join(f'<tr><th>{esc(k)}</th><td>{v}</td></tr>'
                                    for k, v in counts.get('totals', {}).items())}</table>
<div class="scroll"><table><tr>{''.join(f'<th>{esc(c)}</th>' for c in slice_cols)}</tr>{rows_html}</table></div>
<h2>Quick look</h2>{f'<img alt="quick-look plot" src="data:image/png;base64,{img}" style="max-width:100%">' if img
                    else '<p>no plot</p>'}
<p>{esc(str(manifest.get('quicklook', '')))}</p>
<h2>Verification checks</h2><table><tr><th>check</th><th>result</th><th>detail</th></tr>{checks}</table>
<p>Files: {esc(', '.join(sorted(manifest.get('files', {}))))}</p>
</body></html>"""


def run(spark: SparkSession, cfg: Config, args: argparse.Namespace) -> int:
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    if args.action == "list":
        if not lake.exists("audit.releases"):
            print("no releases yet")
            return 0
        rows = lake.read("audit.releases").orderBy("created_at").collect()
        print(f"{'release id':<48} {'created (UTC)':<20} {'requester':<12} {'withheld':>8} {'cells':>7}  override")
        for r in rows:
            t = json.loads(r["counts_json"])["totals"]
            w = sum(t.get(k, 0) for k in slices.WITHHELD_REASONS)
            print(f"{r['release_id']:<48} {str(r['created_at']):<20} {r['requester']:<12} {w:>8} "
                  f"{t.get('cells_in', 0):>7}  {'yes' if r['overridden'] else ''}")
        return 0
    if not args.release_id:
        print(f"migralake: audit {args.action} needs a release id (see: audit list)")
        return 2
    folder = exports_root(cfg) / args.release_id
    row = audit_row(lake, args.release_id)
    if row is None and not folder.exists():
        print(f"migralake: no release {args.release_id} (not in audit.releases, no folder {folder})")
        return 2
    audit_files = json.loads(row["files_json"]) if row else None
    results = verify_files(folder, audit_files, spark)
    if row is None:
        results.append(("audit record", False, f"{args.release_id} is not in audit.releases"))
    passed = all(ok for _, ok, _ in results)
    if args.action == "verify":
        for check, ok, detail in results:
            print(f"{'PASS' if ok else 'FAIL'}  {check:<20} {detail}")
        print(f"release {args.release_id}: {'verified' if passed else 'VERIFICATION FAILED'}")
        return 0 if passed else 1
    reports = Path(cfg.lakehouse.reports_dir)
    reports = reports if reports.is_absolute() else PROJECT_ROOT / reports
    reports.mkdir(parents=True, exist_ok=True)
    out = reports / f"{args.release_id}.html"
    out.write_text(report_html(args.release_id, folder, row, results), encoding="utf-8")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:12]
    print(f"report: {out} (sha256 {digest}...; verification {'passed' if passed else 'FAILED'})")
    return 0 if passed else 1
