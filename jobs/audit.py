"""Review of releases: list them, verify one from its published files, write a reviewer report.

    ./spark-submit.sh audit list
    ./spark-submit.sh audit verify <release-id> [--public-key FILE]   # exit 0 only when every check passes
    ./spark-submit.sh audit report <release-id> [--public-key FILE]   # self-contained HTML under reports_dir

``verify`` recomputes from the files under ``<exports_dir>/<release-id>/`` and
the audit record (lib/privacy/verify.py): checksums, the manifest's signature,
thresholds, every published sum, the attacker intervals of every withheld cell,
no identifiers; the signed hash chain and the Delta history of audit.releases;
the export tables' rows.

Reads ``audit.releases``; writes only the HTML report.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from lib import publish
from lib.config import Config
from lib.privacy import audit, signing, slices
from lib.privacy.verify import verify_files, verify_release
from lib.tables import Lakehouse

__all__ = ["verify_files", "verify_release", "report_html", "run"]

DESCRIPTION = "Review releases: audit list | verify <release-id> | report <release-id>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "verify", "report"])
    parser.add_argument("release_id", nargs="?")
    parser.add_argument("--public-key", default=None, metavar="FILE",
                        help="the platform's release signing public keys (a file with one hex key a line, or the "
                             "hex) to check signatures against; default MIGRALAKE_SIGNING_PUBLIC_KEY or the "
                             "configured key")


def audit_row(lake: Lakehouse, release_id: str) -> dict[str, Any] | None:
    return audit.find(lake, release_id=release_id)


def accuracy_html(manifest: dict[str, Any]) -> str:
    """The layers' accuracy (settlement releases), or nothing when the release type has none."""
    if "accuracy" not in manifest:
        return ""
    esc = html.escape
    rows = manifest.get("accuracy") or []
    if not rows:
        return f"<h2>Accuracy</h2><p>{esc(str(manifest.get('accuracy_note', '')))}</p>"

    def pm(r: dict[str, Any], key: str, pct: bool = True) -> str:
        v, ci = r.get(key), r.get(key.replace("_accuracy", "") + "_ci95" if key != "adjusted_km2"
                                  else "adjusted_km2_ci95")
        if v is None:
            return "n/a"
        return f"{v:.1%} &plusmn; {ci:.1%}" if pct and ci is not None else (
            f"{v:.3f} &plusmn; {ci:.3f}" if ci is not None else f"{v:.3f}")

    body = "".join(
        f"<tr><td>{esc(str(r.get('layer')))}</td><td>{esc(str(r.get('date')))}</td><td>{esc(str(r.get('classifier')))}"
        f"</td><td>{r.get('n_reference', 0):,} ({r.get('n_reference_built', 0):,} built)</td>"
        f"<td>{pm(r, 'overall_accuracy')}</td><td>{pm(r, 'users_accuracy')}</td><td>{pm(r, 'producers_accuracy')}</td>"
        f"<td>{'n/a' if r.get('f1') is None else format(r['f1'], '.3f')}</td><td>{r.get('mapped_km2', 0):.3f}</td>"
        f"<td>{pm(r, 'adjusted_km2', pct=False)}</td></tr>" for r in rows)
    return ("<h2>Accuracy</h2><table><tr><th>layer</th><th>date</th><th>built-up rule</th><th>reference pixels</th>"
            "<th>overall</th><th>user's (built)</th><th>producer's (built)</th><th>F1</th><th>mapped km2</th>"
            f"<th>area-adjusted km2 (95%)</th></tr>{body}</table><p>{esc(str(manifest.get('accuracy_note', '')))}</p>")


TOTALS = {"cells_in": "cells guarded", "cells_released": "cells released", "withheld": "cells withheld in all",
          "withheld_primary": "withheld: at or below the threshold (primary)",
          "withheld_complementary": "withheld: so that primary ones cannot be recovered (complementary)",
          "withheld_across_slices": "withheld: recoverable across slices (languages, weeks, levels)",
          "withheld_after_noise": "withheld: at or below the threshold after noise",
          "noised_or_rounded": "counts noised or rounded", "margins_in": "margins guarded",
          "slices": "slices (one protected table each)",
          "complementary_count_total": "sum of the counts withheld as complementary",
          "cells_coarsened_sensitive": "cells merged into a coarser parent in a sensitive zone",
          "sensitive_parents": "parents published for sensitive zones"}


def plain(value: Any) -> str:
    """A value as a reviewer reads it: no Python or JSON syntax."""
    if value is None or value == "" or value == []:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k.replace('_', ' ')}: {plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(plain(v) for v in value)
    return str(value)


def margins_text(margins: list[list[str]] | None) -> str:
    if not margins:
        return "none (each cell stands alone)"
    return "; ".join(f"totals by {' x '.join(m)}" if m else "the grand total" for m in margins)


def noise_text(rules: dict[str, Any]) -> str:
    parts = []
    if rules.get("rounding_base"):
        parts.append(f"released counts rounded to multiples of {rules['rounding_base']}")
    n = rules.get("noise")
    if n:
        parts.append(f"{n.get('mechanism', '')} noise, epsilon {n.get('epsilon')}"
                     + (f", delta {n['delta']}" if n.get("delta") else "")
                     + f", at most {n.get('contributions_per_slice', 1)} cell(s) per person per slice")
    return "; ".join(parts) or "none: released counts are exact"


def source_text(manifest: dict[str, Any]) -> str:
    src = manifest.get("source") or {}
    period = src.get("period")
    return (f"{src.get('table', '?')}, Delta version {src.get('version', '?')}"
            + (f", period {period[0]} to {period[1]}" if period else ", whole table"))


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
    slice_by = rules.get("slice_by") or []
    count_cols = ["cells_in", "cells_released", "withheld_primary", "withheld_complementary"]
    count_cols += [c for c in ("withheld_across_slices", "withheld_after_noise", "cells_coarsened_sensitive")
                   if any(r.get(c) for r in per_slice)]
    slice_cols = [c for c in slice_by if per_slice and c in per_slice[0]] + count_cols
    order = sorted(per_slice, key=lambda r: -(r.get("withheld_primary", 0) + r.get("withheld_complementary", 0)))
    rows_html = "".join("<tr>" + "".join(f"<td>{esc(plain(r.get(c)))}</td>" for c in slice_cols) + "</tr>"
                        for r in order)
    checks = "".join(f"<tr class={'ok' if ok else 'bad'}><td>{esc(c)}</td><td>{'PASS' if ok else 'FAIL'}</td>"
                     f"<td>{esc(d)}</td></tr>" for c, ok, d in results)
    override = manifest.get("override")
    accuracy = accuracy_html(manifest)
    count_col = rules.get("count_column", "")
    unit = publish.COUNT_UNITS.get(count_col, f"contributors ({count_col})")
    pub = manifest.get("publisher") or {}
    dictionary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                         for k, v in (manifest.get("data_dictionary") or {}).items())
    rasters = "".join(f"<tr><td>{esc(r['file'])}</td><td>{esc(r['area'])}</td><td>{esc(r['date_before'])} to "
                      f"{esc(r['date_after'])}</td><td>{r['pixels_published']:,}</td><td>{r['pixels_masked']:,}</td>"
                      "</tr>" for r in manifest.get("rasters") or [])
    rasters_html = (f"<h2>Rasters</h2><p>{esc(str(manifest.get('rasters_note', '')))}</p><table><tr><th>file</th>"
                    f"<th>area</th><th>dates</th><th>pixels published</th><th>pixels masked</th></tr>{rasters}"
                    "</table>") if rasters else ""
    totals = "".join(f"<tr><th>{esc(TOTALS.get(k, k.replace('_', ' ')))}</th><td>{esc(plain(v))}</td></tr>"
                     for k, v in counts.get("totals", {}).items())
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>migralake release {esc(release_id)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}}
tr.ok td:nth-child(2){{color:#060;font-weight:bold}}tr.bad td:nth-child(2){{color:#b00;font-weight:bold}}
.verdict{{font-size:1.3em;padding:.5em;border-radius:4px;background:{'#e6f4e6' if passed else '#fbe3e3'}}}
.scroll{{max-height:420px;overflow:auto}}img{{max-width:100%;height:auto}}</style></head><body>
<h1>Release {esc(release_id)}</h1>
<p class="verdict">Verification: <b>{'PASSED' if passed else 'FAILED'}</b></p>
<h2>Request</h2><table>
<tr><th>release type</th><td>{esc(str(manifest.get('release_type', '')))}</td></tr>
<tr><th>requested by</th><td>{esc(plain(manifest.get('requester')))}</td></tr>
<tr><th>purpose</th><td>{esc(plain(manifest.get('purpose')) if manifest.get('purpose') else 'not stated')}</td></tr>
<tr><th>created</th><td>{esc(str(manifest.get('created_at', '')))}</td></tr>
<tr><th>source</th><td>{esc(source_text(manifest))}</td></tr>
<tr><th>published by</th><td>{esc(plain(pub.get('name')))}, contact {esc(plain(pub.get('contact')))},
 licence {esc(plain(pub.get('licence')))}</td></tr>
<tr><th>how to cite</th><td>{esc(str(manifest.get('how_to_cite', '')))}</td></tr></table>
<h2>Policy and approval</h2><table>
<tr><th>approved by</th><td>{esc(plain(policy.get('approved_by')))}</td></tr>
<tr><th>approved on</th><td>{esc(plain(policy.get('approved_on')))}</td></tr>
<tr><th>profile</th><td>{esc(plain(policy.get('profile')))}</td></tr>
<tr><th>threshold</th><td>a cell counting {esc(str(rules.get('suppress_at_or_below')))} or fewer {esc(unit)} is
 withheld (platform floor {esc(plain(policy.get('platform_floor')))}, in force {esc(plain(policy.get('floor')))})</td></tr>
<tr><th>one protected table per</th><td>{esc(', '.join(slice_by) or 'the whole table')}</td></tr>
<tr><th>cells</th><td>{esc(' x '.join(rules.get('cells') or []))}</td></tr>
<tr><th>margins published</th><td>{esc(margins_text(rules.get('margins')))}</td></tr>
<tr><th>rounding and noise</th><td>{esc(noise_text(rules))}</td></tr>
<tr><th>policy hash</th><td><code>{esc(str(manifest.get('policy_hash')))}</code></td></tr>
<tr><th>override</th><td>{esc(plain(override)) if override else 'none'}</td></tr></table>
<h2>Suppression</h2><table>{totals}</table>
<p>Per slice, most withheld first:</p>
<div class="scroll"><table><tr>{''.join(f'<th>{esc(c.replace("_", " "))}</th>' for c in slice_cols)}</tr>
{rows_html}</table></div>
<h2>Quick look</h2>{f'<img alt="quick-look plot" src="data:image/png;base64,{img}">' if img else '<p>no plot</p>'}
<p>{esc(str(manifest.get('quicklook', '')))}</p>
{rasters_html}{accuracy}<h2>Data dictionary</h2><table>{dictionary}</table>
<h2>Verification checks</h2><table><tr><th>check</th><th>result</th><th>detail</th></tr>{checks}</table>
<p>Files: {esc(', '.join(sorted(manifest.get('files', {}))))}</p>
</body></html>"""


def list_releases(lake: Lakehouse) -> int:
    if not lake.exists(audit.RELEASES.name):
        print("no releases yet")
        return 0
    rows = lake.read(audit.RELEASES.name).orderBy("seq", "created_at").collect()
    print(f"{'release id':<48} {'created (UTC)':<20} {'requester':<12} {'withheld':>8} {'cells':>7}  override")
    for r in rows:
        t = json.loads(r["counts_json"])["totals"]
        w = sum(t.get(k, 0) for k in slices.WITHHELD_REASONS)
        print(f"{r['release_id']:<48} {str(r['created_at']):<20} {r['requester']:<12} {w:>8} "
              f"{t.get('cells_in', 0):>7}  {'yes' if r['overridden'] else ''}")
    return 0


def run(spark: SparkSession, cfg: Config, args: argparse.Namespace) -> int:
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    if args.action == "list":
        return list_releases(lake)
    if not args.release_id:
        print(f"migralake: audit {args.action} needs a release id (see: audit list)")
        return 2
    folder = cfg.lakehouse.resolved_local_dir("exports_dir") / args.release_id
    row = audit_row(lake, args.release_id)
    if row is None and not folder.exists():
        print(f"migralake: no release {args.release_id} (not in audit.releases, no folder {folder})")
        return 2
    try:
        trusted, origin = signing.trusted_public_key(cfg.privacy, getattr(args, "public_key", None))
    except (signing.SigningKeyError, OSError) as exc:
        print(f"migralake: {exc}")
        return 2
    results = verify_release(lake, folder, args.release_id, spark, trusted)
    results.append(("trusted key", True, origin if trusted is None else f"keys {signing.describe(trusted)} "
                    f"from {origin}"))
    passed = all(ok for _, ok, _ in results)
    if args.action == "verify":
        for check, ok, detail in results:
            print(f"{'PASS' if ok else 'FAIL'}  {check:<20} {detail}")
        print(f"release {args.release_id}: {'verified' if passed else 'VERIFICATION FAILED'}")
        return 0 if passed else 1
    reports = cfg.lakehouse.resolved_local_dir("reports_dir")
    reports.mkdir(parents=True, exist_ok=True)
    out = reports / f"{args.release_id}.html"
    out.write_text(report_html(args.release_id, folder, row, results), encoding="utf-8")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:12]
    print(f"report: {out} (sha256 {digest}...; verification {'passed' if passed else 'FAILED'})")
    return 0 if passed else 1
