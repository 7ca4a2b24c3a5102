"""A release: guard a gold table, publish it, record it, all at once or not at all.

Order of work (the audit row is the commit point):

1. the policy is resolved against the platform's rules (floor, approvers): a
   problem needs a written override, which is recorded;
2. leftovers of releases of the same type that did not complete are removed
   (export rows and ``.partial`` folders with no audit row) and a release that
   died after its audit row has its folder put in place;
3. every slice is guarded on the executors (:mod:`lib.privacy.slices`);
4. the same inputs under the same policy are recognised by a keyed MAC kept in
   ``audit.releases`` (nothing new is published);
5. partner files are written to ``<exports_dir>/<id>.partial/`` with a manifest,
   its Ed25519 signature and the public key;
6. the export rows are written (replacing any rows of the same release id), the
   budget is charged for noised releases, the audit row is appended to the signed
   chain, and the folder is renamed to ``<exports_dir>/<id>/``.

A crash anywhere leaves either nothing visible or a state the next run of the
same release type completes or removes; ``audit verify`` reports export rows with
no audit row. The release id is the type, the date and a random nonce: it says
nothing about the values behind it.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lib import publish
from lib.config import Config
from lib.privacy import audit, guard, ledger, noise, overlap, relations, signing, slices
from lib.privacy.hooks import ReleaseHooks, hooks_for
from lib.privacy.policy import (
    Platform,
    Policy,
    PolicyError,
    ReleaseType,
    effective,
    floor_of,
    load_platform,
    load_policy,
    policy_hash,
    snapshot,
)
from lib.privacy.pseudonym import load_key
from lib.publish import StacInfo
from lib.runtime import log, stage
from lib.spark import from_pandas, to_pandas
from lib.tables import Lakehouse, TableError, TableSpec, register, spec

CITATION = ("{title}. migralake release {release_id} ({created}). Aggregated with disclosure control "
            "(threshold {threshold}, policy {hash12}). Source: {source} version {version}.")


class ReleaseError(RuntimeError):
    """A release that cannot be made; the message says why (nothing was exported)."""


@dataclass(frozen=True)
class Resolved:
    """The policy side of a release: the rules in force and what was overridden."""

    release_type: str
    policy: Policy
    platform: Platform
    rt: ReleaseType
    snap: dict[str, Any]
    phash: str
    overridden: list[str]

    @property
    def below_floor(self) -> bool:
        """Released below the platform's floor (by override): kept out of the shared export tables."""
        return self.rt.suppress_at_or_below < self.platform.floor


def resolve(cfg: Config, release_type: str, override_reason: str | None) -> Resolved:
    policy = load_policy(cfg.privacy.resolved_policy_path())
    platform = load_platform()
    rt, overridden = effective(policy, release_type, cfg.privacy.profile, override_reason, platform)
    if overridden:
        log.warning("release %s: policy problems overridden (%s): %s", release_type, override_reason,
                    "; ".join(overridden))
    snap = snapshot(policy, release_type, rt, cfg.privacy.profile, platform)
    return Resolved(release_type, policy, platform, rt, snap, policy_hash(snap), overridden)


# ----------------------------------------------------------------------------- export tables


def export_specs(release_type: str, rt: ReleaseType, source_schema: T.StructType,
                 floor: int) -> tuple[TableSpec, TableSpec]:
    """exports.<type> (cells) and exports.<type>_margins, with a CHECK constraint at the platform's ``floor``:
    no profile, policy or direct write can put a count at or below it there, and no release lowers it."""
    by_name = {f.name: f.dataType for f in source_schema.fields}
    cols = [*rt.slice_by, *rt.cells, *rt.measures]
    missing = [c for c in cols + [rt.count_column] if c not in by_name]
    if missing:
        raise ReleaseError(f"release type {release_type}: source {rt.source} has no columns {missing}")
    n = rt.count_column
    parent_cols = list(dict.fromkeys(c for m in rt.margins for c in m if c not in rt.cells))
    check = {
        "released_above_threshold": f"(status = 'released' AND {n} > {floor}) OR (status <> 'released' AND {n} IS NULL)",
        # 'withheld' since releases stopped publishing why; the older reasons are allowed for earlier rows.
        "status_known": "status IN ('released', 'withheld', 'primary', 'complementary', 'noise')",
    }
    cell_check = dict(check)
    if rt.measures:
        cell_check["withheld_measures_empty"] = "status = 'released' OR (" + " AND ".join(
            f"{m} IS NULL" for m in rt.measures) + ")"
    head = [T.StructField("release_id", T.StringType(), False)]
    slice_fields = [T.StructField(c, by_name[c], True) for c in rt.slice_by]
    tail = [T.StructField(n, T.LongType(), True), T.StructField("status", T.StringType(), False)]
    cells = TableSpec(
        name=f"exports.{release_type}",
        schema=T.StructType(head + slice_fields + [T.StructField(c, by_name[c], True) for c in rt.cells]
                            + [T.StructField(c, T.StringType(), True) for c in parent_cols] + tail
                            + [T.StructField(m, T.DoubleType(), True) for m in rt.measures]),
        description=f"Released {release_type} cells (withheld cells listed with status, count null).",
        source=rt.owner, owner_job="release", partition_by=("release_id",), constraints=cell_check,
    )
    margins = TableSpec(
        name=f"exports.{release_type}_margins",
        schema=T.StructType(head + slice_fields + [T.StructField("margin", T.StringType(), False),
                                                   T.StructField("key", T.StringType(), False)] + tail),
        description=f"Margins published with {release_type}: sums of the exact cell counts, guarded alike.",
        source=rt.owner, owner_job="release", partition_by=("release_id",), constraints=check,
    )
    return register(cells, replace=True), register(margins, replace=True)


# ----------------------------------------------------------------------------- leftovers and the lock


@contextmanager
def exclusive(out_root: Path, release_type: str) -> Iterator[None]:
    """One release of a type at a time on this exports folder (a lock file naming its process; a lock
    left by a process that no longer runs on this host is taken over)."""
    out_root.mkdir(parents=True, exist_ok=True)
    lock = out_root / f".{release_type}.lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            # empty: the process died between creating and writing it
            if not host or (host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))):
                log.warning("release %s: removing the lock of process %s, which no longer runs", release_type, pid)
                lock.unlink(missing_ok=True)
                continue
            raise ReleaseError(f"another release of {release_type} is running ({lock}: {host} pid {pid}); "
                               "wait for it, or remove the lock if that process is gone") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_up(lake: Lakehouse, out_root: Path, release_type: str, tables: list[str]) -> dict[str, int]:
    """Remove what releases of this type left when they died before their audit row; finish the folder of
    one that died after it. Returns what was done, for the log."""
    done = {rid for rid in audit.published_ids(lake) if rid.startswith(f"{release_type}-")}
    report = {"export_rows_removed": 0, "folders_removed": 0, "folders_completed": 0}
    for name in tables:
        orphans = {r for r in lake.distinct(name, "release_id") if r not in done}
        if orphans:
            report["export_rows_removed"] += lake.delete(name, {"release_id": sorted(orphans)})
    for folder in sorted(out_root.glob(f"{release_type}-*.partial")):
        rid = folder.name.removesuffix(".partial")
        final = out_root / rid
        if rid in done and not final.exists():
            folder.rename(final)
            report["folders_completed"] += 1
        else:
            shutil.rmtree(folder, ignore_errors=True)
            report["folders_removed"] += 1
    if any(report.values()):
        log.warning("release %s: cleaned up after a release that did not complete: %s", release_type, report)
    return report


# ----------------------------------------------------------------------------- the release


def source_rows(lake: Lakehouse, cfg: Config, res: Resolved, hooks: ReleaseHooks) -> tuple[DataFrame, int, TableSpec]:
    rt = res.rt
    try:
        src_spec = spec(rt.source)
    except TableError as exc:
        raise ReleaseError(f"release type {res.release_type}: {exc}") from None
    if not lake.exists(rt.source):
        raise ReleaseError(f"release type {res.release_type}: source {rt.source} does not exist yet; run "
                           f"{src_spec.owner_job} first")
    version = lake.version(rt.source)
    df = lake.read(rt.source, version=version)
    start, end = cfg.period.start, cfg.period.end
    if start and end and src_spec.period_column:
        df = df.filter(F.col(src_spec.period_column).between(F.lit(start), F.lit(end)))
    df = df.select(*dict.fromkeys([*rt.slice_by, *rt.cells, rt.count_column, *rt.measures, *hooks.inputs,
                                   *rt.additive_via_ratio]))
    if hooks.rows is not None:
        df = hooks.rows(cfg, rt, df)
    if df.limit(1).count() == 0:
        raise ReleaseError(f"release {res.release_type}: {rt.source} has no rows for the period {start}..{end}")
    if rt.hierarchy:
        if hooks.parents is None:
            raise ReleaseError(f"release type {res.release_type}: hierarchy {rt.hierarchy} but the {rt.owner} "
                               "pipeline has no parent lookup")
        df = hooks.parents(lake, rt, df)
    return df, version, src_spec


def release(spark: SparkSession, cfg: Config, release_type: str, requester: str | None = None,
            override_reason: str | None = None, purpose: str | None = None) -> dict[str, Any]:
    """Guard, publish and record one release (module docstring); returns its id, folder and counts."""
    res = resolve(cfg, release_type, override_reason)
    hooks = hooks_for(res.rt.owner)
    signer = signing.load_signer(cfg.privacy)
    secret = load_key(cfg.pseudonym)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    out_root = cfg.lakehouse.resolved_local_dir("exports_dir")
    df, version, src_spec = source_rows(lake, cfg, res, hooks)
    cells_spec, margins_spec = export_specs(release_type, res.rt, src_spec.schema, res.platform.floor)
    with exclusive(out_root, release_type):
        clean_up(lake, out_root, release_type, [cells_spec.name, margins_spec.name])
        with stage(f"release.guard {release_type}") as st:
            prepare = hooks.prepare
            try:
                guarded = slices.guard_all(df, res.rt,
                                           prepare=(lambda f: prepare(cfg, res.rt, f)) if prepare else None)
            except slices.SliceError as exc:
                raise ReleaseError(f"release {release_type}: {exc}") from None
            if res.rt.relations:
                guarded = across_slices(df, res.rt, guarded)
            st.rows_in = guarded.totals.get("cells_in", 0)
            st.rows_out = guarded.totals.get("cells_released", 0)
            st.notes.update({k: v for k, v in guarded.totals.items() if k.startswith("withheld") or k == "slices"})
        try:
            mac = audit.content_mac(secret, res.phash, guarded.content)
            earlier = audit.find(lake, content_mac=mac)
            if earlier:
                log.info("release %s: already released with the same inputs and policy (%s)", release_type,
                         earlier["release_id"])
                return {"release_id": earlier["release_id"], "path": earlier["exports_path"],
                        "counts": guarded.totals, "new": False}
            check_earlier(lake, res, guarded, hooks.level_column)
            cost = noise_cost(res.rt, guarded.totals.get("slices", 1))
            if cost is not None:
                try:
                    ledger.check(lake, res.policy, res.rt.source, cost, f"release {release_type}")
                except ledger.BudgetExceeded as exc:
                    raise ReleaseError(str(exc)) from None
            publication = Publication(cfg, lake, res, hooks, signer, guarded, version, src_spec.description,
                                      (cells_spec, margins_spec), out_root, cost)
            return publication.publish(requester, override_reason, mac, purpose)
        finally:
            guarded.release()


def across_slices(df: DataFrame, rt: ReleaseType, guarded: slices.Guarded) -> slices.Guarded:
    """Withhold more where the policy's relations let a withheld cell's additive measure be recovered or bounded
    across slices (lib/privacy/relations.py). Runs on the driver over the release's cells (types with relations
    are small: thousands of cells)."""
    if not rt.additive:
        raise ReleaseError(f"the relations of {rt.source} need the additive measure they sum (policy: additive)")
    keys = [*rt.slice_by, *rt.cells]
    source = to_pandas(df.select(*keys, rt.count_column, rt.additive, *rt.additive_via_ratio))
    status = to_pandas(guarded.cells().select(*keys, "status"))
    frame = source.merge(status, on=keys, how="inner", validate="one_to_one")
    if len(frame) != len(source):
        raise ReleaseError(f"{rt.source}: {len(source) - len(frame)} cells lost between the guard and the relations")
    eqs = relations.equations(frame, keys, rt.relations)
    held0 = (frame["status"] != guard.RELEASED).to_numpy()
    primary = (frame[rt.count_column] <= rt.suppress_at_or_below).to_numpy()
    try:
        held = relations.protect(frame[rt.additive].to_numpy(dtype=float), held0, primary, eqs,
                                 rt.suppress_at_or_below)
        for column in rt.additive_via_ratio:  # published through a ratio: guarded the same way, from there on
            held = relations.protect(frame[column].to_numpy(dtype=float), held, primary, relations.at_least(eqs),
                                     rt.suppress_at_or_below)
    except relations.RelationError as exc:
        raise ReleaseError(f"{rt.source}: {exc}") from None
    extra = frame.loc[held & ~held0, keys]
    log.info("release: %d equations across slices; %d more cells withheld", len(eqs), len(extra))
    if extra.empty:
        return guarded
    schema = T.StructType([df.schema[k] for k in keys])
    return guarded.also_withhold(from_pandas(df.sparkSession, extra, schema), keys, rt)


def check_earlier(lake: Lakehouse, res: Resolved, guarded: slices.Guarded, level_column: str | None = None) -> None:
    """Refuse, naming the earlier release, when this release and an earlier one of the same type give away
    together what neither does alone (lib/privacy/overlap.py), over the slices they share; and when a slice
    is already published at another level of ``level_column`` (or this release holds two levels of it)."""
    rt = res.rt
    mine = {overlap.slice_key(s_, rt.slice_by) for s_ in guarded.per_slice}
    at_level = level_column if level_column in rt.slice_by else None
    if at_level:
        where = rt.slice_by.index(at_level)
        levels = overlap.levels(mine, where)
        clash = [k for k, v in levels.items() if len(v) > 1]
        if clash:
            raise ReleaseError(f"release {res.release_type}: {dict(zip(rt.slice_by, clash[0], strict=False))} would "
                               f"be published at {sorted(levels[clash[0]])}: one {at_level} per release")
    if not lake.exists(audit.RELEASES.name):
        return
    earlier = lake.read(audit.RELEASES.name).filter(F.col("release_type") == res.release_type).collect()
    if at_level:
        for row in earlier:
            counts = json.loads(row["counts_json"])
            theirs_levels = overlap.levels({overlap.slice_key(s_, rt.slice_by) for s_ in counts["per_slice"]}, where)
            for key, lv in overlap.levels(mine, where).items():
                other = theirs_levels.get(key, set()) - lv
                if other:
                    raise ReleaseError(
                        f"release {res.release_type}: {dict(zip([c for c in rt.slice_by if c != at_level], key, strict=True))} "
                        f"was published at {at_level} {sorted(other)} by {row['release_id']}; its counts are sums "
                        f"of the other level's, so both levels together could give withheld cells away. Release "
                        f"one {at_level} per slice. Nothing was published.")
    if not overlap.exact(res.snap["rules"]):
        return
    dims = slices.dims_of(rt)
    cols = [*rt.slice_by, *dims, rt.count_column]
    new: dict[str, pd.DataFrame] | None = None
    for row in sorted(earlier, key=lambda r: r["seq"] or 0):
        rules = json.loads(row["policy_json"])["rules"]
        folder = Path(row["exports_path"])
        if not overlap.exact(rules) or not (folder / "cells.parquet").exists():
            if overlap.exact(rules):
                log.warning("release %s: the files of earlier release %s are missing; not compared",
                            res.release_type, row["release_id"])
            continue
        old = {"cells": pd.read_parquet(folder / "cells.parquet"), "margins": pd.read_parquet(folder / "margins.parquet")}
        theirs = {tuple(map(str, k)) for k in old["cells"][rt.slice_by].drop_duplicates().itertuples(index=False)} \
            if rt.slice_by else {()}
        if not theirs & mine:
            continue
        if new is None:  # this release's cells and margins, read once, only when some earlier release overlaps
            new = {"cells": to_pandas(guarded.cells().select(*cols, *([rt.additive] if rt.additive else []))),
                   "margins": to_pandas(guarded.margins().select(*rt.slice_by, "margin", "key", rt.count_column))}
        found = overlap.compare(old, new, rt.slice_by, dims, rt.count_column, rules["margins"], rt.margins,
                                max(int(rules["suppress_at_or_below"]), rt.suppress_at_or_below),
                                rt.additive, rt.relations)
        if found:
            raise ReleaseError(
                f"release {res.release_type}: together with the earlier release {row['release_id']} (threshold "
                f"{rules['suppress_at_or_below']}) it would give away withheld cells: " + "; ".join(found[:3])
                + (f" (+{len(found) - 3} more)" if len(found) > 3 else "") + ". Nothing was published.")


def noise_cost(rt: ReleaseType, n_slices: int) -> noise.Cost | None:
    """The composed privacy cost of a noised release of ``n_slices`` slices (None without noise)."""
    if rt.noise is None:
        return None
    return noise.release_cost(rt.noise.mechanism, rt.noise.epsilon, rt.noise.delta, rt.noise.contributions_per_slice,
                              len(rt.margins), n_slices)


@dataclass
class Publication:
    """Steps 5 and 6 of the module docstring for one guarded release."""

    cfg: Config
    lake: Lakehouse
    res: Resolved
    hooks: ReleaseHooks
    signer: signing.Signer
    guarded: slices.Guarded
    version: int
    source_desc: str
    exports: tuple[TableSpec, TableSpec]
    out_root: Path
    cost: noise.Cost | None  # the composed privacy cost of a noised release (checked against the budget)

    def publish(self, requester: str | None, override_reason: str | None, mac: str,
                purpose: str | None = None) -> dict[str, Any]:
        rt, name = self.res.rt, self.res.release_type
        created = datetime.now(UTC).replace(microsecond=0)
        release_id = f"{name}-{created:%Y%m%d}-{secrets.token_hex(6)}"
        tmp = self.out_root / f"{release_id}.partial"
        tmp.mkdir(parents=True)
        counts = {"totals": self.guarded.totals, "per_slice": self.guarded.per_slice}
        with stage(f"release.files {name}") as st:
            files, extras = self.files(tmp, release_id, created)
            st.rows_out = self.guarded.totals.get("cells_in", 0)
        manifest = self.manifest(release_id, created, requester or getpass.getuser(), override_reason, files,
                                 {"purpose": purpose, **extras})
        signature = publish.write_manifest(tmp, manifest, self.signer)
        files = {**files, "manifest.json": publish.sha256_file(tmp / "manifest.json")}
        tables = [] if self.res.below_floor else [s.name for s in self.exports]
        with stage(f"release.export {name}") as st:
            if tables:
                self.export_rows(release_id)
            else:
                log.warning("release %s: threshold %d is below the platform floor %d (override): published as "
                            "files and audit record only, not in the shared export tables", name,
                            rt.suppress_at_or_below, self.res.platform.floor)
            st.rows_out = self.guarded.totals.get("cells_in", 0)
            if self.cost is not None:
                ledger.charge(self.lake, rt.source, release_id, created, self.cost)
            start, end = self.cfg.period.start, self.cfg.period.end
            audit.append(self.lake, {
                "release_id": release_id, "created_at": created.replace(tzinfo=None),
                "requester": manifest["requester"], "release_type": name,
                "policy_json": json.dumps(self.res.snap, sort_keys=True), "policy_hash": self.res.phash,
                "override_reason": override_reason if self.res.overridden else None,
                "overridden": "; ".join(self.res.overridden) if self.res.overridden else None,
                "sources_json": json.dumps({rt.source: self.version}), "period_start": start, "period_end": end,
                "counts_json": json.dumps(counts, sort_keys=True), "files_json": json.dumps(files, sort_keys=True),
                "exports_path": str(self.out_root / release_id), "manifest_signature": signature,
                "content_mac": mac, "exports_tables": json.dumps(tables),
            }, self.signer)
            tmp.rename(self.out_root / release_id)
        log.info("release %s: %s -> %s (%d cells, %d withheld)", name, release_id, self.out_root / release_id,
                 self.guarded.totals.get("cells_in", 0), self.guarded.totals["withheld"])
        return {"release_id": release_id, "path": str(self.out_root / release_id), "counts": self.guarded.totals,
                "new": True}

    def stac_info(self, release_id: str, created: datetime) -> StacInfo:
        rt, res = self.res.rt, self.res
        pub = res.policy.publisher
        return StacInfo(
            release_id=release_id, title=f"{res.release_type} ({rt.source})", created=created,
            description=f"{res.release_type}: {self.source_desc} Guarded release: counts of {rt.count_column} at "
                        f"or below {rt.suppress_at_or_below} are withheld (see manifest.json).",
            start=self.cfg.period.start, end=self.cfg.period.end,
            publisher=pub.name if pub else None, contact=pub.contact if pub else None,
            licence=pub.licence if pub else "other", url=pub.url if pub else None,
            extra={"migralake:release_type": res.release_type, "migralake:policy_hash": res.phash,
                   "migralake:source": f"{rt.source}@{self.version}"})

    def files(self, folder: Path, release_id: str, created: datetime) -> tuple[dict[str, str], dict[str, Any]]:
        """Cells and margins (CSV + Parquet), spatial files, the quick-look plot, what the owner adds (e.g.
        rasters), the STAC item describing them all; their checksums."""
        rt = self.res.rt
        dims = slices.dims_of(rt)
        cell_cols = [*rt.slice_by, *dims, rt.count_column, "status", *rt.measures]
        margin_cols = [*rt.slice_by, "margin", "key", rt.count_column, "status"]
        publish.write_table(self.guarded.cells().select(*cell_cols).orderBy(*rt.slice_by, *dims), folder, "cells")
        publish.write_table(self.guarded.margins().select(*margin_cols).orderBy(*rt.slice_by, "margin", "key"),
                            folder, "margins")
        focus = slices.most_withheld(self.guarded.per_slice, rt.slice_by) if len(rt.cells) > 1 else None
        cells = publish.read_cells(folder / "cells.parquet", focus)
        spatial = None
        polygons: tuple[Any, str, str] | None
        if rt.cells == ["h3_index"]:
            polygons = (publish.h3_polygons(cells["h3_index"], "h3_index"), "h3_index", "H3 cell")
        else:
            polygons = self.hooks.polygons(self.cfg, rt, cells) if self.hooks.polygons else None
        if polygons is not None:
            try:
                integers = [f.name for f in pq.read_schema(folder / "cells.parquet") if pa.types.is_integer(f.type)]
                spatial = publish.spatial_files(cells, *polygons[:2], rt.count_column, folder, polygons[2],
                                                integers)
            except ValueError as exc:
                raise ReleaseError(f"release {self.res.release_type}: {exc}") from None
        png = folder / "quicklook.png"
        if self.hooks.draw is not None:
            # Multi-cell types show the most withheld slice and, when the owner names one, the event's slice.
            event = self.hooks.event(self.cfg, rt) if (focus and self.hooks.event) else None
            shown = cells.assign(_view="the slice with the most withheld cells") if focus else cells
            if event:
                extra = publish.read_cells(folder / "cells.parquet", event)
                first = extra[rt.slice_by].astype(str).drop_duplicates().iloc[0] if len(extra) else None
                if first is not None and focus and any(first[c] != focus.get(c) for c in rt.slice_by):
                    extra = extra[(extra[rt.slice_by].astype(str) == first).all(axis=1)]
                    shown = pd.concat([shown, extra.assign(_view="the event's slice")], ignore_index=True)
            plot = self.hooks.draw(self.res.release_type, rt, shown, png)
        else:
            plot = publish.draw_generic(self.res.release_type, rt.slice_by, cells, png)
        added = self.hooks.files(self.cfg, rt, folder) if self.hooks.files else {}
        notes = self.hooks.notes(self.lake, self.cfg, rt, self.guarded.cells()) if self.hooks.notes else {}
        stac = publish.stac_item(folder, self.stac_info(release_id, created))
        files = {p.name: publish.sha256_file(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".")}
        return files, {"quicklook": plot, "spatial_files": spatial, "stac_item": stac, **added, **notes}

    def manifest(self, release_id: str, created: datetime, requester: str, override_reason: str | None,
                 files: dict[str, str], extras: dict[str, Any]) -> dict[str, Any]:
        rt, res = self.res.rt, self.res
        start, end = self.cfg.period.start, self.cfg.period.end
        cost = self.cost
        noised = (f"OpenDP discrete {rt.noise.mechanism} noise per slice (epsilon {rt.noise.epsilon}"
                  + (f", delta {rt.noise.delta}" if rt.noise.delta else "") + f", at most "
                  f"{rt.noise.contributions_per_slice} cell(s) per person per slice; the release costs epsilon "
                  f"{cost.epsilon:.4g}" + (f", delta {cost.delta:.3g}" if cost.delta else "") + ")"
                  if rt.noise and cost else None)
        return {
            "release_id": release_id,
            "created_at": created.isoformat(),
            "requester": requester,
            "release_type": res.release_type,
            "title": f"{res.release_type} ({rt.source})",
            "publisher": res.policy.publisher.model_dump(mode="json") if res.policy.publisher else None,
            "source": {"table": rt.source, "version": self.version, "period": [str(start), str(end)] if start else None},
            "policy": res.snap,
            "policy_hash": res.phash,
            "floor": {"platform": res.platform.floor, "in_force": floor_of(res.policy, res.platform)},
            "override": {"reason": override_reason, "problems": res.overridden} if res.overridden else None,
            "dimensions": {"slice_by": rt.slice_by, "cells": rt.cells, "margins": rt.margins,
                           "count_column": rt.count_column, "measures": rt.measures},
            "data_dictionary": publish.data_dictionary(rt.slice_by, rt.cells, rt.measures, rt.count_column,
                                                       rt.suppress_at_or_below, rt.rounding_base, noised,
                                                       self.source_desc),
            "counts": slices.public_counts(self.guarded.totals),
            "files": files,
            **extras,
            "signature": {"algorithm": "Ed25519", "public_key": self.signer.public_hex,
                          "signed_file": "manifest.json", "signature_file": "manifest.sig",
                          "public_key_file": "signing_key.pub"},
            "how_to_cite": CITATION.format(title=f"{res.release_type} statistics", release_id=release_id,
                                           created=created.date().isoformat(), threshold=rt.suppress_at_or_below,
                                           hash12=res.phash[:12], source=rt.source, version=self.version),
        }

    def export_rows(self, release_id: str) -> None:
        """Cells and margins into the export tables; a re-run of the same id replaces its rows."""
        for s_, data in zip(self.exports, (self.guarded.cells(), self.guarded.margins()), strict=True):
            try:
                self.lake.sync_constraints(s_.name)
            except TableError as exc:
                raise ReleaseError(str(exc)) from None
            sdf = data.withColumn("release_id", F.lit(release_id)).select(
                *[F.col(f.name).cast(f.dataType).alias(f.name) for f in s_.schema.fields])
            self.lake.write(sdf, s_.name, where={"release_id": release_id})
            self.lake.set_properties(s_.name, {"migralake.policy_hash": self.res.phash,
                                               "migralake.last_release": release_id})


__all__ = ["ReleaseError", "PolicyError", "release", "export_specs", "resolve", "clean_up"]
