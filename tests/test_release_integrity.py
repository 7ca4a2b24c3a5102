"""Releases under crashes, insiders and hostile names: every attack here must be caught or refused.

- a release that dies after any of its commits leaves nothing a partner sees, verify reports its rows, and
  the next run leaves exactly one complete release;
- a policy below the platform floor (or approved by someone the platform does not list) is refused without a
  recorded override, and never weakens the shared export tables;
- an insider who edits files, the manifest or audit.releases (with SQL, appendOnly switched off), deletes or
  reorders audit rows, appends a forged one, or changes a cell so that a margin no longer adds up, fails
  verify;
- formula-looking names are inert in the CSV files and a name with ``$^$`` still draws.
"""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyspark.sql import SparkSession
from test_release import DAY1, DAY2, config, gold_od, gold_presence_admin2

from lib import publish
from lib.config import CONF_DIR, ConfigError, load_config
from lib.privacy import audit, policy, signing
from lib.privacy import release as rel
from lib.privacy.policy import PolicyError
from lib.privacy.verify import sum_problems, verify_files, verify_release
from lib.tables import Lakehouse, spec


class Crash(BaseException):
    """Stands for the process dying: no handler of the release code catches it."""


def trusted() -> frozenset[str] | None:
    key, _ = signing.trusted_public_key(config(Path("/nonexistent")).privacy)
    return key


def failed(results: list[tuple[str, bool, str]]) -> dict[str, str]:
    return {c: d for c, ok, d in results if not ok}


def clone(base: Path, dest: Path) -> Any:
    """A copy of a prepared lakehouse and exports folder (Delta logs hold relative paths)."""
    shutil.copytree(base, dest, dirs_exist_ok=True)
    return config(dest, period=(DAY2, DAY2))


@pytest.fixture(scope="module")
def base(spark: SparkSession, tmp_path_factory) -> tuple[Path, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Gold OD for two days and one complete release of the first."""
    root = tmp_path_factory.mktemp("integrity")
    cfg = config(root, period=(DAY1, DAY1))
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_od(spark, lake)
    first = rel.release(spark, cfg, "cdr_od", requester="tester")
    return root, first


# ----------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("crash_after", [("write", "exports.cdr_od"), ("set_properties", "exports.cdr_od"),
                                         ("write", "exports.cdr_od_margins"),
                                         ("set_properties", "exports.cdr_od_margins"), ("write", "audit.releases")])
def test_a_release_killed_after_a_commit_is_completed_or_cleaned_up_by_the_next_run(
        spark: SparkSession, base, tmp_path: Path, monkeypatch, crash_after) -> None:  # type: ignore[no-untyped-def]
    root, first = base
    cfg = clone(root, tmp_path)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    method, table = crash_after
    original = getattr(Lakehouse, method)

    def dying(self: Lakehouse, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if (args[1] if method == "write" else args[0]) == table:
            raise Crash(f"killed after {method} {table}")
        return out

    monkeypatch.setattr(Lakehouse, method, dying)
    with pytest.raises(Crash):
        rel.release(spark, cfg, "cdr_od", requester="tester")
    monkeypatch.setattr(Lakehouse, method, original)
    exports = tmp_path / "exports"
    (exports / ".cdr_od.lock").write_text("gone-host 999999")  # kill -9 leaves its lock: another host's is kept
    half = sorted(set(lake.distinct("exports.cdr_od", "release_id")) - {first["release_id"]})
    if table != "audit.releases":
        # Half a release: rows in the export tables, no audit row, no folder a partner can see.
        assert len(half) == 1 and not (exports / half[0]).exists() and (exports / f"{half[0]}.partial").exists()
        bad = failed(verify_release(lake, exports / half[0], half[0], None, trusted()))
        assert "audit record" in bad and "no audit row" in bad["export rows"]
        # ... and the complete release next to it no longer verifies while the leftovers are there.
        assert "no audit row" in failed(verify_release(lake, exports / first["release_id"], first["release_id"],
                                                       None, trusted()))["export rows"]
    with pytest.raises(rel.ReleaseError, match="another release of cdr_od is running"):
        rel.release(spark, cfg, "cdr_od", requester="tester")
    (exports / ".cdr_od.lock").write_text(f"{__import__('socket').gethostname()} 999999")  # a dead local process
    again = rel.release(spark, cfg, "cdr_od", requester="tester")
    assert again["new"] is (table != "audit.releases")  # after the audit row the release already happened
    ids = lake.distinct("exports.cdr_od", "release_id")
    assert ids == {first["release_id"], again["release_id"]}
    assert lake.read("exports.cdr_od").filter(f"release_id = '{again['release_id']}'").count() == 9
    assert lake.read("exports.cdr_od_margins").count() == 2 * 7  # origin 3 + destination 3 + total, per release
    assert lake.read("audit.releases").count() == 2
    assert sorted(p.name for p in exports.iterdir()) == sorted([first["release_id"], again["release_id"]])
    for rid in ids:
        results = verify_release(lake, exports / rid, rid, None, trusted())
        assert not failed(results), failed(results)


# ----------------------------------------------------------------------------- the floor


def evil_policy(tmp_path: Path) -> Path:
    text = (CONF_DIR / "privacy.yaml").read_text()
    evil = tmp_path / "evil.yaml"
    evil.write_text(text.replace("floor: 10", "floor: 0").replace(
        'approved_by: "Lakeland Statistics Office ethics board (synthetic demo approval)"',
        'approved_by: "Me, myself"').replace(
        "  cdr_od:\n    source: gold.cdr_od_daily\n    count_column: n_subscribers\n    suppress_at_or_below: 15",
        "  cdr_od:\n    source: gold.cdr_od_daily\n    count_column: n_subscribers\n    suppress_at_or_below: 2"))
    return evil


def test_a_policy_below_the_platform_floor_is_refused_and_never_weakens_the_export_tables(
        spark: SparkSession, base, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, first = base
    clone(root, tmp_path)
    cfg = config(tmp_path, evil_policy(tmp_path), period=(DAY2, DAY2))  # --set privacy.policy_path=evil.yaml
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    with pytest.raises(PolicyError, match=r"approved by 'Me, myself', who is not an approver.*suppress_at_or_below "
                                          r"= 2 is below the floor 10 \(platform 10, policy 0\)"):
        rel.release(spark, cfg, "cdr_od", requester="insider")
    out = rel.release(spark, cfg, "cdr_od", requester="insider", override_reason="testing an emergency release")
    row = audit.find(lake, release_id=out["release_id"])
    assert row is not None and "below the floor 10" in row["overridden"] and json.loads(row["exports_tables"]) == []
    # Not in the shared export tables, whose constraint still holds every released count above the floor.
    assert lake.read("exports.cdr_od").filter(f"release_id = '{out['release_id']}'").count() == 0
    assert "n_subscribers > 10" in lake.properties("exports.cdr_od")["delta.constraints.released_above_threshold"]
    assert not failed(verify_release(lake, Path(out["path"]), out["release_id"], None, trusted()))
    manifest = json.loads((Path(out["path"]) / "manifest.json").read_text())
    assert manifest["override"]["reason"] == "testing an emergency release" and manifest["floor"]["platform"] == 10
    # Every later default release still goes through.
    default = rel.release(spark, config(tmp_path, period=(DAY2, DAY2)), "cdr_od", requester="tester")
    assert default["new"] and lake.read("exports.cdr_od").filter(
        f"release_id = '{default['release_id']}'").count() == 9


def test_the_platform_file_is_the_operators_not_the_jobs(tmp_path: Path) -> None:
    own = tmp_path / "platform.yaml"
    own.write_text("floor: 20\napprovers: ['Board']\n")
    plat = policy.load_platform({policy.PLATFORM_ENV: str(own)})
    assert plat.floor == 20 and plat.source.startswith(str(own))
    pol = policy.load_policy(CONF_DIR / "privacy.yaml")
    with pytest.raises(PolicyError, match="below the floor 20"):
        policy.effective(pol, "cdr_od", platform=plat)
    assert policy.load_platform({}).floor == 10  # conf/platform.yaml when the operator names none
    with pytest.raises(ConfigError, match="privacy.floor: unknown key"):  # no job option or --set reaches it
        load_config("demo", overrides=["privacy.floor=0"])


# ----------------------------------------------------------------------------- insiders


@pytest.fixture(scope="module")
def two(spark: SparkSession, base, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The base lakehouse with a second complete release (of the second day)."""
    root, _ = base
    dest = tmp_path_factory.mktemp("two")
    cfg = clone(root, dest)
    rel.release(spark, cfg, "cdr_od", requester="tester")
    return dest


def sql_edit(spark: SparkSession, lake: Lakehouse, statement: str) -> None:
    """What an insider with SQL access does: switch appendOnly off, change the table, switch it on again."""
    loc = lake.location("audit.releases")
    spark.sql(f"ALTER TABLE delta.`{loc}` SET TBLPROPERTIES ('delta.appendOnly' = 'false')")
    spark.sql(statement.replace("{t}", f"delta.`{loc}`"))
    spark.sql(f"ALTER TABLE delta.`{loc}` SET TBLPROPERTIES ('delta.appendOnly' = 'true')")


def releases_of(lake: Lakehouse) -> list[dict[str, Any]]:
    return [r.asDict() for r in lake.read("audit.releases").orderBy("seq").collect()]


def test_a_cell_changed_with_manifest_and_audit_row_rewritten_fails_verify(
        spark: SparkSession, two: Path, tmp_path: Path) -> None:
    cfg = clone(two, tmp_path)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    rid = releases_of(lake)[0]["release_id"]
    folder = tmp_path / "exports" / rid
    cells = pd.read_parquet(folder / "cells.parquet")
    i = cells.index[cells["status"] == "released"][0]
    cells.loc[i, "n_subscribers"] += 1
    cells.to_parquet(folder / "cells.parquet", index=False)
    cells.to_csv(folder / "cells.csv", index=False)
    m = json.loads((folder / "manifest.json").read_text())
    m["files"] = {n: publish.sha256_file(folder / n) for n in m["files"]}
    (folder / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
    files = {**m["files"], "manifest.json": publish.sha256_file(folder / "manifest.json")}
    sql_edit(spark, lake, "UPDATE {t} SET files_json = '" + json.dumps(files, sort_keys=True)
             + f"' WHERE release_id = '{rid}'")
    bad = failed(verify_release(lake, folder, rid, None, trusted()))
    assert "checksums" not in bad and "audit record" not in bad  # the forger made these agree
    assert "not a valid signature" in bad["signature"]
    assert "do not match its hash" in bad["audit chain"]
    assert "SET TBLPROPERTIES" in bad["audit history"] and "UPDATE" in bad["audit history"]
    assert "published sums" in bad  # the margins of that slice no longer add up


def test_deleted_reordered_or_forged_audit_rows_fail_verify(spark: SparkSession, two: Path, tmp_path: Path) -> None:
    for attack in ("delete", "reorder", "forge"):
        cfg = clone(two, tmp_path / attack)
        lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
        rows = releases_of(lake)
        first, second = rows[0]["release_id"], rows[1]["release_id"]
        if attack == "delete":
            sql_edit(spark, lake, f"DELETE FROM {{t}} WHERE release_id = '{first}'")
        elif attack == "reorder":
            sql_edit(spark, lake, "UPDATE {t} SET seq = 3 - seq")
        else:  # a valid append, hashed and signed with the insider's own key
            forged = {k: v for k, v in rows[1].items() if k not in CHAIN_FIELDS}
            forged["release_id"] = second.replace(second[-4:], "beef")
            audit.append(lake, forged, signing.Signer(Ed25519PrivateKey.generate(), "insider"))
        check = second if attack != "forge" else first
        bad = failed(verify_release(lake, tmp_path / attack / "exports" / check, check, None, trusted()))
        assert "audit chain" in bad, (attack, bad)
        if attack == "delete":
            assert "sequence 2 where 1 was expected" in bad["audit chain"] and "DELETE" in bad["audit history"]
        elif attack == "reorder":
            assert "does not link" in bad["audit chain"] and "UPDATE" in bad["audit history"]
        else:
            assert "not a trusted key" in bad["audit chain"] and "audit history" not in bad


CHAIN_FIELDS = ("seq", "prev_hash", "row_hash", "row_signature", "public_key")


def test_a_cell_that_breaks_a_margin_fails_the_sums_check_even_with_nothing_withheld(
        spark: SparkSession, two: Path, tmp_path: Path) -> None:
    cfg = clone(two, tmp_path)
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    rid = releases_of(lake)[1]["release_id"]  # day 2: every count above 15, nothing withheld
    folder = tmp_path / "exports" / rid
    cells = pd.read_parquet(folder / "cells.parquet")
    assert (cells["status"] == "released").all()
    cells.loc[0, "n_subscribers"] = 999
    cells.to_parquet(folder / "cells.parquet", index=False)
    cells.to_csv(folder / "cells.csv", index=False)
    bad = failed(verify_files(folder))
    assert "but its released cells sum to" in bad["published sums"]
    margins = pd.read_parquet(folder / "margins.parquet")
    assert sum_problems(cells.iloc[1:], margins, ["origin", "destination"], "n_subscribers", [[]]) != []


# ----------------------------------------------------------------------------- hostile names


def test_formula_looking_names_are_inert_in_csv_and_a_dollar_name_still_draws(
        spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path, period=(DAY1, DAY1))
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_presence_admin2(spark, lake)
    names = {"=cmd|' /C calc'!A0": 100, "=HYPERLINK(\"http://x\")": 200, "R$^$": 300, "@SUM(1)": 50, "-2+3": 60,
             "\tTab": 70}
    lake.write(spark.createDataFrame([(DAY1, "admin1", u, n, None) for u, n in names.items()],
                                     schema=spec("gold.cdr_presence_daily").schema),
               "gold.cdr_presence_daily", period=(DAY1, DAY1), scope={"spatial_unit": "admin1"})
    cfg = cfg.model_copy(update={"cdr": cfg.cdr.model_copy(update={"spatial_unit": "admin1"})})
    out = rel.release(spark, cfg, "cdr_presence")
    folder = Path(out["path"])
    text = (folder / "cells.csv").read_text() + (folder / "margins.csv").read_text()
    lines = text.splitlines()
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", '"=', '"@', '"-'))
                   for line in lines for cell in line.split(","))
    assert "'=cmd|' /C calc'!A0" in text and "'@SUM(1)" in text and "'-2+3" in text
    parquet = pd.read_parquet(folder / "cells.parquet")
    assert set(names) <= set(parquet["unit"])  # Parquet keeps the names as they are
    assert (folder / "quicklook.png").stat().st_size > 1000
    assert not failed(verify_release(lake, folder, out["release_id"], None, trusted()))
    assert publish.plot_text("R$^$") == r"R\$^\$" and date(2024, 3, 4) == DAY1


# ----------------------------------------------------------------------------- release ids


def test_release_ids_are_no_oracle_for_withheld_values(spark: SparkSession, base, tmp_path: Path,
                                                       monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two lakehouses whose inputs differ only in the withheld A->B (12 or 13): nothing an outsider sees
    depends on the inputs, and the keyed MAC that recognises re-runs cannot be recomputed without the key."""
    root, first = base
    macs, ids = {}, {}
    for value in (12, 13):
        cfg = config(tmp_path / str(value), period=(DAY1, DAY1))
        lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
        gold_od(spark, lake)
        if value == 13:
            rows = lake.read("gold.cdr_od_daily").toPandas()
            rows.loc[(rows["origin"] == "A") & (rows["destination"] == "B"), "n_subscribers"] = 13
            lake.write(spark.createDataFrame(rows, schema=spec("gold.cdr_od_daily").schema), "gold.cdr_od_daily",
                       period=(DAY1, DAY2), scope={"spatial_unit": "admin2"})
        out = rel.release(spark, cfg, "cdr_od", requester="tester")
        row = audit.find(lake, release_id=out["release_id"])
        assert row is not None
        macs[value], ids[value] = row["content_mac"], out["release_id"]
        if value == 12:  # the same inputs publish the same values, under another id
            assert all(publish.sha256_file(Path(out["path"]) / n) == publish.sha256_file(Path(first["path"]) / n)
                       for n in ("cells.csv", "margins.csv"))
    assert macs[12] == audit.find(Lakehouse(spark, config(root).lakehouse.resolved_root()),
                                  release_id=first["release_id"])["content_mac"]  # same inputs: recognised
    assert macs[12] != macs[13]
    # The ids: type, date, nonce. The same inputs in another lakehouse get another id.
    assert ids[12] != first["release_id"] and ids[12].rsplit("-", 1)[0] == first["release_id"].rsplit("-", 1)[0]


def test_a_rotated_signing_key_verifies_with_a_keyring_of_both(tmp_path: Path) -> None:
    old, new = (signing.Signer(Ed25519PrivateKey.generate(), n) for n in ("old", "new"))
    rows, prev = [], audit.GENESIS
    for i, signer in enumerate((old, new, new), start=1):
        row = {"release_id": f"r{i}", "created_at": None, "seq": i, "prev_hash": prev, "public_key": signer.public_hex}
        row["row_hash"] = audit.row_hash(row)
        row["row_signature"] = signer.sign(row["row_hash"].encode())
        rows.append(row)
        prev = row["row_hash"]
    ring = tmp_path / "keys.pub"
    ring.write_text(f"{old.public_hex}\n{new.public_hex}\n")
    keys, origin = signing.trusted_public_key(config(tmp_path).privacy, str(ring))
    assert keys == {old.public_hex, new.public_hex} and origin.startswith("--public-key")
    assert audit.check_chain(rows, keys).ok
    only_new = audit.check_chain(rows, frozenset({new.public_hex}))
    assert not only_new.ok and "r1: signed with key" in only_new.detail and "r2" not in only_new.detail
    with pytest.raises(signing.SigningKeyError, match="not a 32-byte Ed25519 key"):
        signing.trusted_public_key(config(tmp_path).privacy, "abcd")


def test_an_empty_lock_left_by_a_process_that_died_is_taken_over(tmp_path: Path) -> None:
    import os

    lock = tmp_path / ".cdr_od.lock"
    lock.write_text("")  # created, never written: the process died in between
    with rel.exclusive(tmp_path, "cdr_od"):
        assert lock.read_text().endswith(f" {os.getpid()}")
        with pytest.raises(rel.ReleaseError, match="another release of cdr_od is running"), \
                rel.exclusive(tmp_path, "cdr_od"):
            pass  # the second holder must be refused before this
    assert not lock.exists()
