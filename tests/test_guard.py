"""The disclosure-control guard and policy on crafted tables with known answers (pandas only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.config import CONF_DIR
from lib.privacy import guard, noise
from lib.privacy.policy import PolicyError, effective, load_platform, load_policy, policy_hash, snapshot

OD = [("A", "A", 100), ("A", "B", 12), ("A", "C", 40), ("B", "A", 30), ("B", "B", 200), ("B", "C", 50),
      ("C", "A", 60), ("C", "B", 70), ("C", "C", 300)]
DIMS = ["origin", "destination"]
MARGINS = [["origin"], ["destination"], []]


def od() -> pd.DataFrame:
    return pd.DataFrame(OD, columns=[*DIMS, "n"])


@pytest.mark.parametrize(("profile", "withheld", "released"), [("default", 15, 16), ("strict", 20, 21)])
def test_threshold_boundary_from_the_policy(profile: str, withheld: int, released: int) -> None:
    rt, problems = effective(load_policy(CONF_DIR / "privacy.yaml"), "cdr_presence", profile)
    assert problems == [] and rt.suppress_at_or_below == withheld
    cells = pd.DataFrame({"unit": ["x", "y", "z"], "n": [withheld, released, withheld - 1]})
    p = guard.protect(cells, ["unit"], "n", rt.suppress_at_or_below)
    got = dict(zip(p.cells["unit"], zip(p.cells["n"].astype(object), p.cells["status"], strict=True), strict=True))
    assert got["x"] == (pd.NA, "primary") and got["z"] == (pd.NA, "primary")
    assert got["y"] == (released, "released")


def test_primary_suppression_alone_leaks_by_differencing_and_the_guard_stops_it() -> None:
    s = guard.build_slice(od(), DIMS, "n", 15, MARGINS)
    leaked = {s.entities[e].key: (iv.low, iv.high) for e, iv in guard.attacker_intervals(s).items()}
    assert leaked == {("A", "B"): (12.0, 12.0)}  # row A total minus the published A cells
    p = guard.protect(od(), DIMS, "n", 15, MARGINS)
    status = dict(zip(map(tuple, p.cells[DIMS].to_numpy()), p.cells["status"], strict=True))
    assert status[("A", "B")] == "primary"
    # A rectangle of three complements protects the cell. Four rectangles can (through row B or C and
    # column A or C); the guard takes the one withholding the least: A-A, C-A, C-B (100 + 60 + 70 = 230,
    # against 290, 330 and 410 for the others).
    assert sorted(k for k, v in status.items() if v == "complementary") == [("A", "A"), ("C", "A"), ("C", "B")]
    assert p.counts["withheld_complementary"] == 3 and p.counts["complementary_count_total"] == 230
    assert (p.margins["status"] == "released").all()  # margins are large: all published
    assert guard.check_published(p.cells, p.margins, DIMS, "n", 15, MARGINS) == []
    # The published values are the true ones; withheld cells are null, never zero.
    merged = p.cells.merge(od(), on=DIMS, suffixes=("", "_true"))
    shown = merged[merged["status"] == "released"]
    assert (shown["n"] == shown["n_true"]).all() and merged.loc[merged["status"] != "released", "n"].isna().all()


def test_two_level_hierarchy_with_national_total() -> None:
    cells = pd.DataFrame({
        "unit": ["R1-D1", "R1-D2", "R1-D3", "R2-D1", "R2-D2"],
        "admin1": ["R1", "R1", "R1", "R2", "R2"],
        "n": [9, 120, 80, 300, 40],
    })
    margins = [["admin1"], []]
    s = guard.build_slice(cells, ["unit", "admin1"], "n", 15, margins)
    assert any(iv.pins() for iv in guard.attacker_intervals(s).values())  # R1 total - D2 - D3 = 9
    p = guard.protect(cells, ["unit", "admin1"], "n", 15, margins)
    st = dict(zip(p.cells["unit"], p.cells["status"], strict=True))
    assert st["R1-D1"] == "primary" and st["R1-D3"] == "complementary" and st["R1-D2"] == "released"
    assert guard.check_published(p.cells, p.margins, ["unit", "admin1"], "n", 15, margins) == []


def test_attacker_check_catches_hand_made_leaky_releases() -> None:
    cells = od()
    cells["status"] = "released"
    margins = guard.protect(od(), DIMS, "n", 15, MARGINS).margins  # true, all-published margins
    leaky = cells.assign(n=cells["n"].where(cells["n"] > 15).astype("Int64"))
    leaky.loc[leaky["n"].isna(), "status"] = "primary"
    problems = guard.check_published(leaky, margins, DIMS, "n", 15, MARGINS)
    assert len(problems) == 1 and "('A', 'B')" in problems[0] and "[12, 12]" in problems[0]
    # Two small cells withheld together in a row: the attacker still bounds each inside (0, 15].
    tiny = pd.DataFrame([("A", "X", 5), ("A", "Y", 3), ("A", "Z", 100), ("B", "X", 50), ("B", "Y", 60),
                         ("B", "Z", 70)], columns=[*DIMS, "n"])
    tm = guard.protect(tiny, DIMS, "n", 15, [["origin"]]).margins
    bad = tiny.assign(n=tiny["n"].where(tiny["n"] > 15).astype("Int64"), status="released")
    bad.loc[bad["n"].isna(), "status"] = "primary"
    found = guard.check_published(bad, tm, DIMS, "n", 15, [["origin"]])
    assert len(found) == 2 and all("[1, 7]" in f for f in found)
    fixed = guard.protect(tiny, DIMS, "n", 15, [["origin"]])
    assert guard.check_published(fixed.cells, fixed.margins, DIMS, "n", 15, [["origin"]]) == []
    assert fixed.cells.loc[fixed.cells["destination"] == "Z"].query("origin == 'A'")["status"].item() == "complementary"


def test_published_counts_at_or_below_threshold_are_reported() -> None:
    cells = pd.DataFrame({"unit": ["x"], "n": pd.array([15], dtype="Int64"), "status": ["released"]})
    margins = pd.DataFrame({"margin": ["total"], "key": [""], "n": pd.array([15], dtype="Int64"),
                            "status": ["released"]})
    problems = guard.check_published(cells, margins, ["unit"], "n", 15, [[]])
    assert problems[:2] == ["1 published cells at or below 15", "1 published margins at or below 15"]


def test_noise_is_opendp_scaled_by_the_slice_sensitivity_and_not_seeded_from_the_data() -> None:
    values = np.full(20_000, 1000)
    spec = {"mechanism": "laplace", "epsilon": 0.5, "contributions_per_slice": 1}
    a = guard.perturb(values, rounding_base=None, noise=spec, n_margins=1)
    b = guard.perturb(values, rounding_base=None, noise=spec, n_margins=1)
    assert not (a == b).all()  # OS randomness: the same inputs do not give the same noise
    # one person changes a cell and one margin: L1 sensitivity 2, discrete Laplace scale 2 / 0.5 = 4
    assert abs(np.abs(a - 1000).mean() - 4.0) < 0.2 and a.dtype == np.int64
    two = guard.perturb(values, rounding_base=None, noise={**spec, "contributions_per_slice": 2}, n_margins=1)
    assert abs(np.abs(two - 1000).mean() - 8.0) < 0.4  # two cells per person: twice the scale
    assert (guard.perturb(np.zeros(1000, dtype=np.int64), rounding_base=None, noise=spec) >= 0).all()
    # The cost of a release composes over its slices (a person can be in each): n x epsilon for Laplace,
    # less than that for the Gaussian (zCDP), and exactly the slice's (epsilon, delta) for one slice.
    assert noise.release_cost("laplace", 0.5, None, 1, 3, 28) == noise.Cost(14.0, 0.0)
    one = noise.release_cost("gaussian", 1.0, 1e-6, 1, 3, 1)
    many = noise.release_cost("gaussian", 1.0, 1e-6, 1, 3, 28)
    assert abs(one.epsilon - 1.0) < 1e-3 and one.delta == 1e-6 and 1.0 < many.epsilon < 28.0
    r = guard.perturb(np.array([12, 17, 24, 25, 1001]), rounding_base=5, noise=None)
    assert r.tolist() == [10, 15, 25, 25, 1000]
    cells = pd.DataFrame({"unit": ["x", "y"], "n": [17, 500]})
    p = guard.protect(cells, ["unit"], "n", 15, rounding_base=5)
    out = p.cells.set_index("unit")
    assert out.loc["x", "status"] == "noise" and pd.isna(out.loc["x", "n"])  # 17 rounds to 15: withheld
    assert out.loc["y", "status"] == "released" and out.loc["y", "n"] == 500


def test_policy_without_approval_or_below_floor_is_refused_unless_overridden(tmp_path: Path) -> None:
    text = (CONF_DIR / "privacy.yaml").read_text()
    unapproved = tmp_path / "p.yaml"
    unapproved.write_text(text.replace('approved_by: "', 'approved_by_was: "').replace(
        "approved_by_was", "# approved_by").replace("approved_on: 2026-11-20", ""))
    pol = load_policy(unapproved)
    with pytest.raises(PolicyError, match="no approval"):
        effective(pol, "cdr_od")
    rt, problems = effective(pol, "cdr_od", override_reason="emergency release approved by phone, minutes follow")
    assert problems == ["the policy has no approval (approved_by and approved_on)"]
    low = tmp_path / "low.yaml"
    low.write_text(text.replace("suppress_at_or_below: 15    # FlowKit", "suppress_at_or_below: 5    # FlowKit"))
    with pytest.raises(PolicyError, match=r"cdr_presence.suppress_at_or_below = 5 is below the floor 10"):
        effective(load_policy(low), "cdr_presence")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("count_column: n_subscribers", "count_colum: n_subscribers", 1))
    with pytest.raises(PolicyError, match=r"bad.yaml: release_types.cdr_presence"):
        load_policy(bad)
    full = load_policy(CONF_DIR / "privacy.yaml")
    rt1, _ = effective(full, "cdr_od")
    rt2, _ = effective(full, "cdr_od", "strict")
    plat = load_platform()
    assert policy_hash(snapshot(full, "cdr_od", rt1, "default", plat)) != policy_hash(
        snapshot(full, "cdr_od", rt2, "strict", plat))
