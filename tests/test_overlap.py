"""Two releases of the same slices: what they give away together is checked before publishing and on verify."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession
from test_release import DAY1, DAY2, config, gold_od

from lib.privacy import overlap
from lib.privacy import release as rel
from lib.privacy.verify import verify_files
from lib.tables import Lakehouse

STRICT = {"privacy.profile": "strict"}


def strict(cfg):  # type: ignore[no-untyped-def]
    return cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"profile": "strict"})})


def test_a_stricter_release_of_a_published_day_is_refused_naming_the_earlier_one(
        spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path, period=(DAY2, DAY2))  # day 2: A->B = 17, published at 15, withheld at 20
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_od(spark, lake)
    default = rel.release(spark, cfg, "cdr_od", requester="tester")
    with pytest.raises(rel.ReleaseError, match=rf"earlier release {default['release_id']} \(threshold 15\).*"
                                               r"published cells at or below 20"):
        rel.release(spark, strict(cfg), "cdr_od", requester="tester")
    assert lake.read("audit.releases").count() == 1
    # Another day, or the same day again under the same rules, goes through.
    other = rel.release(spark, config(tmp_path, period=(DAY1, DAY2)), "cdr_od", requester="tester")
    assert other["new"] and lake.read("audit.releases").count() == 2


def test_a_laxer_release_after_a_strict_one_is_refused_and_verify_catches_the_pair(
        spark: SparkSession, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = config(tmp_path, period=(DAY2, DAY2))
    lake = Lakehouse(spark, cfg.lakehouse.resolved_root())
    gold_od(spark, lake)
    first = rel.release(spark, strict(cfg), "cdr_od", requester="tester")
    with pytest.raises(rel.ReleaseError, match=rf"earlier release {first['release_id']} \(threshold 20\)"):
        rel.release(spark, cfg, "cdr_od", requester="tester")
    # An insider who switches the check off publishes the pair anyway: verify, from the files, fails both.
    monkeypatch.setattr(rel, "check_earlier", lambda *a, **k: None)
    second = rel.release(spark, cfg, "cdr_od", requester="insider")
    for out, other in ((first, second), (second, first)):
        bad = {c: d for c, ok, d in verify_files(Path(out["path"])) if not ok}
        assert other["release_id"] in bad["across releases"] and "at or below 20" in bad["across releases"]


def test_the_union_attacker_finds_a_cell_left_alone_by_two_complement_patterns() -> None:
    """Two releases of one 3 x 3 slice, each protecting the small cell with another rectangle: together every
    complement is published by one or the other and the small cell follows from its margins."""
    units = ["A", "B", "C"]
    counts = {("A", "A"): 100, ("A", "B"): 12, ("A", "C"): 40, ("B", "A"): 30, ("B", "B"): 200, ("B", "C"): 50,
              ("C", "A"): 60, ("C", "B"): 70, ("C", "C"): 300}

    def published(withheld: set[tuple[str, str]]) -> dict[str, pd.DataFrame]:
        cells = pd.DataFrame([{"origin": o, "destination": d, "n": None if (o, d) in withheld else v}
                              for (o, d), v in counts.items()])
        margins = [{"margin": "origin", "key": u, "n": sum(v for (o, _), v in counts.items() if o == u)} for u in units]
        margins += [{"margin": "destination", "key": u, "n": sum(v for (_, d), v in counts.items() if d == u)}
                    for u in units]
        margins.append({"margin": "total", "key": "", "n": sum(counts.values())})
        return {"cells": cells, "margins": pd.DataFrame(margins)}

    specs = [["origin"], ["destination"], []]
    one = published({("A", "B"), ("A", "C"), ("B", "B"), ("B", "C")})
    two = published({("A", "B"), ("A", "A"), ("C", "B"), ("C", "A")})
    dims = ["origin", "destination"]
    from lib.privacy import guard

    for alone in (one, two):  # each release alone: the small cell is safe
        assert guard.check_published(alone["cells"], alone["margins"], dims, "n", 15, specs) == []
    found = overlap.compare(one, two, [], dims, "n", specs, specs, 15)
    assert found and "('A', 'B')" in " ".join(found) and "[12, 12]" in " ".join(found)


def test_two_sentiment_releases_that_each_hide_a_language_give_it_away_together() -> None:
    """Each release withholds 'hi' with a different complement (fr, then en): together 'hi' = all - en - fr."""
    from datetime import date

    from lib.privacy.policy import Relation

    week = date(2024, 3, 4)
    posts = {"all": 300, "en": 200, "fr": 84, "hi": 16}
    users = {"all": 150, "en": 100, "fr": 40, "hi": 12}

    def published(withheld: set[str]) -> dict[str, pd.DataFrame]:
        cells = pd.DataFrame([{"period": "week", "period_start": week, "spatial_unit": "admin1", "language": lang,
                               "region": "R1", "n_users": None if lang in withheld else users[lang],
                               "n_posts": None if lang in withheld else posts[lang]} for lang in posts])
        return {"cells": cells, "margins": pd.DataFrame(columns=["period", "period_start", "spatial_unit",
                                                                 "language", "margin", "key", "n_users"])}

    slice_by = ["period", "period_start", "spatial_unit", "language"]
    rels = [Relation(kind="level", columns=["language"], total="all")]
    a, b = published({"hi", "fr"}), published({"hi", "en"})
    assert overlap.compare(a, a, slice_by, ["region"], "n_users", [], [], 15, "n_posts", rels) == []
    found = overlap.compare(a, b, slice_by, ["region"], "n_users", [], [], 15, "n_posts", rels)
    assert len(found) == 1 and "'language': 'hi'" in found[0] and "n_posts in [16, 16]" in found[0]
