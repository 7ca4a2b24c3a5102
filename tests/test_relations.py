"""Measures that add up across slices (languages into 'all', days into weeks, regions into the nation): the
attacker subtracts, the guard withholds more, and an exact linear program finds nothing left."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.privacy import relations
from lib.privacy.policy import Relation

KEYS = ["period", "period_start", "spatial_unit", "language", "region"]
LANG = Relation(kind="level", columns=["language"], total="all", exact=True)
NATION = Relation(kind="level", columns=["spatial_unit", "region"], total="national", exact=False)
WEEK = Relation(kind="week", column="period_start", period_column="period", total="week", part="day", exact=False)


def table(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*KEYS, "n_users", "n_posts"])


def test_one_withheld_language_is_recovered_by_subtraction_and_then_protected() -> None:
    d = date(2024, 3, 4)
    cells = table([
        ("day", d, "admin1", "all", "R1", 60, 100),
        ("day", d, "admin1", "en", "R1", 40, 70),
        ("day", d, "admin1", "fr", "R1", 17, 18),
        ("day", d, "admin1", "hi", "R1", 12, 12),  # withheld: 12 authors
    ])
    eqs = relations.equations(cells, KEYS, [LANG])
    assert [(e.total, sorted(e.parts)) for e in eqs] == [(0, [1, 2, 3])]
    values = cells["n_posts"].to_numpy()
    primary = (cells["n_users"] <= 15).to_numpy()
    found = relations.attack(values, primary, eqs, 15)
    assert [(f.row, f.low, f.high) for f in found] == [(3, 12.0, 12.0)]  # 100 - 70 - 18: pinned
    held = relations.protect(values, primary, primary, eqs, 15)
    assert held.tolist() == [False, False, True, True]  # fr (the smallest published part) withheld too
    assert relations.attack(values, held, eqs, 15) == []  # 12 + 18 = 30 shared: hi can be 1..29


def test_room_too_small_is_a_bound_inside_the_threshold() -> None:
    d = date(2024, 3, 4)
    cells = table([
        ("day", d, "admin1", "all", "R1", 60, 100),
        ("day", d, "admin1", "en", "R1", 50, 90),
        ("day", d, "admin1", "fr", "R1", 4, 5),  # withheld
        ("day", d, "admin1", "hi", "R1", 5, 5),  # withheld: 5 + 5 = 10, so each at most 9
    ])
    eqs = relations.equations(cells, KEYS, [LANG])
    values, primary = cells["n_posts"].to_numpy(), (cells["n_users"] <= 15).to_numpy()
    found = relations.attack(values, primary, eqs, 15)
    assert sorted((f.row, f.low, f.high) for f in found) == [(2, 1.0, 9.0), (3, 1.0, 9.0)]
    held = relations.protect(values, primary, primary, eqs, 15)
    assert held.tolist() == [False, True, True, True]  # the only published part is withheld: room 100
    assert relations.attack(values, held, eqs, 15) == []


def test_week_and_nation_relations_chain_and_the_lp_sees_through_the_chain() -> None:
    mon, tue = date(2024, 3, 4), date(2024, 3, 5)
    cells = table([
        ("week", mon, "admin1", "all", "R1", 90, 200),
        ("day", mon, "admin1", "all", "R1", 50, 120),
        ("day", tue, "admin1", "all", "R1", 10, 80),  # withheld; the week says at most 80
        ("week", mon, "national", "all", "national", 200, 500),
        ("week", mon, "admin1", "all", "R2", 20, 40),
        ("day", mon, "national", "all", "national", 120, 300),
        ("day", mon, "admin1", "all", "R2", 12, 14),  # withheld
    ])
    eqs = relations.equations(cells, KEYS, [WEEK, NATION])
    kinds = sorted((e.total, tuple(sorted(e.parts)), e.exact) for e in eqs)
    assert (0, (1, 2), False) in kinds and (3, (0, 4), False) in kinds and (5, (1, 6), False) in kinds
    values, primary = cells["n_posts"].to_numpy(), (cells["n_users"] <= 15).to_numpy()
    # R1's Tuesday is at most 200 - 120 = 80 and R2's Monday at most 300 - 120 = 180: wide, not pinned
    assert relations.attack(values, primary, eqs, 15) == []
    # A tighter national total makes R2's day small: 130 - 120 = at most 10 posts.
    values2 = values.copy()
    values2[5] = 130
    found2 = relations.attack(values2, primary, eqs, 15)
    assert [(f.row, f.low, f.high) for f in found2] == [(6, 1.0, 10.0)]
    held = relations.protect(values2, primary, primary, eqs, 15)
    assert relations.attack(values2, held, eqs, 15) == [] and held.sum() > primary.sum()


def test_published_values_that_do_not_add_up_are_a_contradiction() -> None:
    d = date(2024, 3, 4)
    cells = table([("day", d, "admin1", "all", "R1", 60, 50), ("day", d, "admin1", "en", "R1", 40, 70),
                   ("day", d, "admin1", "hi", "R1", 3, 3)])
    eqs = relations.equations(cells, KEYS, [LANG])
    with pytest.raises(relations.RelationError, match="do not add up"):
        relations.attack(cells["n_posts"].to_numpy(), np.array([False, False, True]), eqs, 15)


def test_random_tables_protected_survive_the_attacker() -> None:
    rng = np.random.default_rng(3)
    for trial in range(20):
        rows = []
        langs = ["en", "fr", "hi", "ar"]
        for day in range(7):
            d = date(2024, 3, 4 + day)
            parts = rng.integers(1, 60, size=len(langs))
            for lang, n in zip(langs, parts, strict=True):
                rows.append(("day", d, "admin1", lang, "R1", int(max(1, n // 2)), int(n)))
            rows.append(("day", d, "admin1", "all", "R1", int(parts.sum() // 2), int(parts.sum())))
        cells = table(rows)
        week = cells.groupby("language")["n_posts"].sum()
        for lang, n in week.items():
            cells.loc[len(cells)] = ("week", date(2024, 3, 4), "admin1", lang, "R1", int(n // 2), int(n))
        eqs = relations.equations(cells, KEYS, [LANG, WEEK])
        values = cells["n_posts"].to_numpy()
        primary = (cells["n_users"] <= 15).to_numpy()
        held = relations.protect(values, primary, primary, eqs, 15)
        assert relations.attack(values, held, eqs, 15) == [], trial
        assert (held >= primary).all()


def test_a_sentiment_release_withholds_across_languages_and_verify_checks_it(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The leak reported against the demo: week 2024-03-04, R1, 'hi' (12 authors) recovered as 'all' minus the
    other languages. Released through the guard, nothing is recovered; the files alone verify."""
    from test_release import config

    from lib.privacy import release as rel
    from lib.privacy.verify import verify_files
    from lib.tables import Lakehouse, spec

    week = date(2024, 3, 4)
    rows = [("week", week, "admin1", "R1", lang, posts, users, 0.2, 0.5, 0.3, 0.1, posts * 10, 1000.0)
            for lang, posts, users in (("all", 300, 150), ("en", 200, 100), ("fr", 84, 40), ("hi", 16, 12))]
    cfg = config(tmp_path, period=(week, week))
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    lake.write(spark.createDataFrame(rows, schema=spec("gold.social_sentiment").schema), "gold.social_sentiment")
    out = rel.release(spark, cfg, "social_sentiment")
    cells = pd.read_parquet(f"{out['path']}/cells.parquet").set_index("language")
    assert cells.loc["hi", "status"] == "withheld" and pd.isna(cells.loc["hi", "n_posts"])
    assert cells.loc["fr", "status"] == "withheld"  # the smallest other language, withheld with it
    assert out["counts"]["withheld_across_slices"] == 1
    keys = ["period", "period_start", "spatial_unit", "language", "region"]
    published = cells.reset_index()
    eqs = relations.equations(published, keys, [LANG])
    held = (published["status"] != "released").to_numpy()
    assert relations.attack(published["n_posts"].fillna(0).to_numpy(), held, eqs, 15) == []
    folder = Path(out["path"])
    results = {c: (ok, d) for c, ok, d in verify_files(folder)}
    assert results["across slices"][0], results["across slices"]
    # The same week under the strict profile withholds the same cells: compared with the first, allowed.
    strict = rel.release(spark, cfg.model_copy(update={"privacy": cfg.privacy.model_copy(
        update={"profile": "strict"})}), "social_sentiment")
    assert strict["new"] and strict["release_id"] != out["release_id"]
    checks = {c: (ok, d) for c, ok, d in verify_files(Path(strict["path"]))}
    assert checks["across releases"][0] and "1 other release" in checks["across releases"][1]
    # Publishing fr again (as a forger would) lets 'hi' be subtracted out: verify fails.
    forged = pd.read_parquet(folder / "cells.parquet")
    forged.loc[forged["language"] == "fr", ["status", "n_posts"]] = ["released", 84]
    forged.to_parquet(folder / "cells.parquet", index=False)
    bad = {c: d for c, ok, d in verify_files(folder) if not ok}
    assert "hi" in bad["across slices"] and "[16, 16]" in bad["across slices"]


def test_verify_rebuilds_all_posts_from_the_ratio_and_checks_them_across_slices(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """posts_per_10k = n_posts / n_posts_all x 10,000 publishes n_posts_all of released cells: verify rebuilds
    it and runs the relations' attacker on it too (here a doctored 'all' row leaves 16 posts for two cells)."""
    from lib.privacy.verify import relations_check

    week = date(2024, 3, 4)
    rows = []
    for lang, posts, every, status in (("all", 300, 2016, "released"), ("en", 200, 2000, "released"),
                                       ("fr", None, None, "withheld"), ("hi", None, None, "withheld")):
        rows.append({"period": "week", "period_start": week, "spatial_unit": "admin1", "language": lang,
                     "region": "R1", "n_users": None if posts is None else posts // 2, "status": status,
                     "n_posts": posts, "posts_per_10k": None if posts is None else posts / every * 10_000})
    pd.DataFrame(rows).to_parquet(tmp_path / "cells.parquet", index=False)
    rules = {"additive": "n_posts", "additive_via_ratio": {"n_posts_all": ["n_posts", "posts_per_10k", 10_000]},
             "relations": [LANG.model_dump()]}
    check, ok, detail = relations_check(tmp_path, rules, ["period", "period_start", "spatial_unit", "language"],
                                        ["region"], 15)
    assert not ok and "n_posts_all in [1, 15]" in detail  # n_posts alone (room 100) would have passed
    rules["additive_via_ratio"] = {}
    assert relations_check(tmp_path, rules, ["period", "period_start", "spatial_unit", "language"], ["region"],
                           15)[1]
