"""The flow-network guard against the exact linear-programming attacker, on random and hand-made tables."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import SparkSession

from bench.guard_data import synthetic_od
from lib.privacy import guard, network, slices
from lib.privacy.policy import ReleaseType

T = 15


def random_table(rng: np.random.Generator) -> tuple[pd.DataFrame, list[str], list[list[str]]]:
    """A small table with a known layout: OD (1-3 margins), a two-level hierarchy, or rows only."""
    kind = int(rng.integers(0, 3))
    if kind == 0:
        units = [f"U{i}" for i in range(int(rng.integers(2, 6)))]
        df = pd.DataFrame([(o, d) for o in units for d in units if o == d or rng.random() < 0.6],
                          columns=["origin", "destination"])
        dims = ["origin", "destination"]
        margins = [[["origin"], ["destination"], []], [["origin"], ["destination"]], [["origin"], []],
                   [["destination"]], [[]]][int(rng.integers(0, 5))]
    elif kind == 1:
        units = [f"R{r}-D{d}" for r in range(int(rng.integers(1, 4))) for d in range(int(rng.integers(1, 5)))]
        df = pd.DataFrame({"unit": units, "admin1": [u[:2] for u in units]})
        dims = ["unit", "admin1"]
        margins = [["admin1"], []] if rng.random() < 0.7 else [["admin1"]]
    else:
        k = int(rng.integers(2, 5))
        df = pd.DataFrame([(o, d) for o in range(k) for d in range(k) if rng.random() < 0.8],
                          columns=["origin", "destination"])
        dims = ["origin", "destination"]
        margins = [["origin"]]
    small = rng.random(len(df)) < 0.5
    df["n"] = np.where(small, rng.integers(1, T + 1, len(df)), rng.integers(T + 1, 200, len(df)))
    return df, dims, margins


def lp_failures(df: pd.DataFrame, dims: list[str], margins: list[list[str]], statuses: list[str]) -> dict:
    """Withheld statistics the exact LP attacker pins or bounds inside (0, T], from the true table."""
    s = guard.build_slice(df, dims, "n", -1, margins)
    for e, st in zip(s.entities, statuses, strict=True):
        e.status = st
    return {e: (iv.low, iv.high) for e, iv in guard.attacker_intervals(s).items() if e >= 0 and iv.fails(T)}


@pytest.mark.parametrize("local_budget", [5000, 1])  # 1: every verdict through the exact feasibility flows
def test_network_attacker_equals_the_lp_attacker_on_random_patterns(local_budget: int) -> None:
    rng = np.random.default_rng(20261124)
    compared = failing = 0
    for _ in range(250):
        df, dims, margins = random_table(rng)
        net = network.build(df, dims, margins)
        assert net is not None
        statuses = ["primary" if rng.random() < 0.4 else "released" for _ in range(net.n_arcs)]
        values = guard.margin_values(df, "n", margins, net).astype(float)
        published = np.where(np.array(statuses) == "released", values, np.nan)
        found = {f.arc for f in network.attack(net, published, T, local_budget=local_budget)}
        exact = set(lp_failures(df, dims, margins, statuses))
        assert found == exact, (df.to_dict("list"), margins, statuses)
        compared += 1
        failing += bool(exact)
    assert compared == 250 and 50 < failing < 250  # both verdicts occur often


def test_every_random_table_the_guard_passes_survives_the_lp_attacker() -> None:
    rng = np.random.default_rng(7)
    withheld = 0
    for _ in range(250):
        df, dims, margins = random_table(rng)
        p = guard.protect(df, dims, "n", T, margins)
        statuses = [*p.cells["status"], *p.margins["status"]]
        assert lp_failures(df, dims, margins, statuses) == {}
        assert guard.check_published(p.cells, p.margins, dims, "n", T, margins) == []
        shown = p.cells.merge(df, on=dims, suffixes=("", "_true"))
        shown = shown[shown["status"] == "released"]
        assert (shown["n"] == shown["n_true"]).all() and (shown["n"] > T).all()
        withheld += int((p.cells["status"] != "released").sum())
    assert withheld > 300


def test_a_synthetic_od_slice_passes_the_lp_attacker_and_withholds_no_more_than_before() -> None:
    od = synthetic_od(14, 1, 8.0, seed=3)[["origin", "destination", "n_subscribers"]].rename(
        columns={"n_subscribers": "n"})
    dims, margins = ["origin", "destination"], [["origin"], ["destination"], []]
    p = guard.protect(od, dims, "n", T, margins)
    assert lp_failures(od, dims, margins, [*p.cells["status"], *p.margins["status"]]) == {}
    old = guard.protect(od, dims, "n", T, margins, method="lp")
    assert lp_failures(od, dims, margins, [*old.cells["status"], *old.margins["status"]]) == {}
    # The previous algorithm's greedy one-cell-at-a-time picks withhold more than the cheapest cycles.
    assert p.counts["withheld_primary"] == old.counts["withheld_primary"] == int((od["n"] <= T).sum())
    assert p.counts["withheld_complementary"] <= 1.1 * old.counts["withheld_complementary"]
    assert p.counts["complementary_count_total"] <= 1.1 * old.counts["complementary_count_total"]


def test_three_crossed_groupings_are_not_a_network_and_use_the_lp_guard() -> None:
    rng = np.random.default_rng(3)
    rows = [(a, b, c) for a in "xy" for b in "pq" for c in "uv"]
    df = pd.DataFrame(rows, columns=["a", "b", "c"])
    df["n"] = rng.integers(1, 60, len(df))
    margins = [["a", "b"], ["a", "c"], ["b", "c"]]
    assert network.build(df, ["a", "b", "c"], margins) is None
    p = guard.protect(df, ["a", "b", "c"], "n", T, margins)
    assert lp_failures(df, ["a", "b", "c"], margins, [*p.cells["status"], *p.margins["status"]]) == {}


def test_margins_that_do_not_add_up_fail_verification_even_with_nothing_withheld() -> None:
    cells = pd.DataFrame({"unit": ["a", "b"], "admin1": ["R", "R"], "n": pd.array([999, 40], dtype="Int64"),
                          "status": ["released", "released"]})
    margins = pd.DataFrame({"margin": ["admin1", "total"], "key": ["R", ""], "n": pd.array([50, 50], dtype="Int64"),
                            "status": ["released", "released"]})
    problems = guard.check_published(cells, margins, ["unit", "admin1"], "n", T, [["admin1"], []])
    assert problems == ["published cells and margins contradict each other (they must add up exactly)"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda df: df.assign(n=df["n"].where(df.index != 2, -3)), r"non-negative integer; cell \['B', 'A'\] has -3"),
    (lambda df: df.assign(n=df["n"].astype(float).where(df.index != 1, 12.5)), r"cell \['A', 'B'\] has 12.5"),
    (lambda df: pd.concat([df, df.iloc[[0]]]), r"not unique by \['origin', 'destination'\]: first duplicate \['A', 'A'\]"),
    (lambda df: df.assign(n=df["n"].astype(object).where(df.index != 0, None)), r"null or not a number for cell \['A', 'A'\]"),
])
def test_bad_slices_are_refused_with_the_cell_and_reason(change, message: str) -> None:  # type: ignore[no-untyped-def]
    df = pd.DataFrame([("A", "A", 100), ("A", "B", 12), ("B", "A", 30), ("B", "B", 200)],
                      columns=["origin", "destination", "n"])
    with pytest.raises(guard.GuardError, match=message):
        guard.protect(change(df), ["origin", "destination"], "n", T, [["origin"], ["destination"], []])
    with pytest.raises(guard.GuardError, match=r"names columns the table lacks: \['admin1'\]"):
        guard.protect(df, ["origin", "destination"], "n", T, [["admin1"]])


OD_TYPE = ReleaseType(source="gold.cdr_od_daily", count_column="n_subscribers", suppress_at_or_below=T,
                      slice_by=["date", "spatial_unit"], cells=["origin", "destination"],
                      margins=[["origin"], ["destination"], []], owner="cdr")


def test_slices_guarded_on_spark_do_not_depend_on_the_partitioning(spark: SparkSession) -> None:
    od = synthetic_od(25, 5, 6.0, seed=11, start=date(2024, 3, 1)).drop(columns=["est_population"])
    df = spark.createDataFrame(od)
    results = []
    before = spark.conf.get("spark.sql.shuffle.partitions")
    try:
        for parts in ("1", "4"):
            spark.conf.set("spark.sql.shuffle.partitions", parts)
            g = slices.guard_all(df.repartition(int(parts)), OD_TYPE)
            cells = g.cells().toPandas().sort_values(["date", "origin", "destination"]).reset_index(drop=True)
            margins = g.margins().toPandas().sort_values(["date", "margin", "key"]).reset_index(drop=True)
            results.append((cells, margins, g.content, g.totals))
            g.release()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
    (c1, m1, h1, t1), (c4, m4, h4, t4) = results
    pd.testing.assert_frame_equal(c1, c4)
    pd.testing.assert_frame_equal(m1, m4)
    assert h1 == h4 and t1 == t4 and t1["slices"] == 5
    # Same answer as guarding each day in this process.
    day = od[od["date"] == date(2024, 3, 3)]
    local = guard.protect(day[["origin", "destination", "n_subscribers"]], ["origin", "destination"],
                          "n_subscribers", T, OD_TYPE.margins)
    spark_day = c1[c1["date"] == date(2024, 3, 3)]
    local_status = local.cells["status"].where(local.cells["status"] == "released", "withheld")
    assert sorted(local_status) == sorted(spark_day["status"]) and (spark_day["status"] == "withheld").sum() > 10


def test_a_slice_that_cannot_be_guarded_names_the_slice_and_publishes_nothing(spark: SparkSession) -> None:
    od = pd.DataFrame({"date": [date(2024, 3, 1)] * 3 + [date(2024, 3, 2)] * 2, "spatial_unit": "admin2",
                       "origin": ["A", "A", "B", "A", "B"], "destination": ["A", "B", "B", "A", "A"],
                       "n_subscribers": [50, 40, 60, -4, 30]})
    with pytest.raises(slices.SliceError, match=r"slice \{'date': '2024-03-02', 'spatial_unit': 'admin2'\}: "
                                               r"n_subscribers must be a non-negative integer"):
        slices.guard_all(spark.createDataFrame(od), OD_TYPE)
