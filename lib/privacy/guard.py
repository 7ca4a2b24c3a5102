"""The disclosure-control guard: thresholds, complementary suppression, attacker check, noise.

Works on one protected table at a time (a *slice*: e.g. one day's OD matrix at one
spatial unit), in pandas: gold tables are aggregates, so a slice has at most a
few thousand cells. The steps:

1. **Primary suppression**: a cell (or margin) whose count of distinct contributors
   is at or below ``threshold`` is withheld (15 withheld, 16 released).
2. **Margins** are sums of the exact cell counts over groups (row / column totals,
   coarser levels through a parent column, the grand total). A margin at or below
   the threshold is itself withheld.
3. **Complementary suppression**: every published margin is a linear equation over
   its cells. A withheld cell alone in an equation is recovered by differencing,
   so more cells are withheld: first until no equation has exactly one withheld
   member, then until the attacker check passes, each time choosing the smallest
   published cell that widens the failing cell's interval enough.
4. **Attacker check** (:func:`attacker_intervals`): for every withheld cell, the
   smallest and largest value consistent with everything published (linear
   programs with scipy's HiGHS). A withheld cell fails when its interval pins it
   to one value or lies inside (0, threshold].
5. Optional **rounding** to a base and **Laplace / Gaussian noise** with a stated
   epsilon (and delta) on the released values, after suppression; a released
   value that falls to the threshold or below after noise is withheld too.

Withheld cells are kept with ``status`` = primary / complementary / noise and a
null count: never silently zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import linprog

from lib.privacy import network

GUARD_VERSION = "2"  # part of every release's policy snapshot: a changed algorithm is a new release
RELEASED, PRIMARY, COMPLEMENTARY, NOISE = "released", "primary", "complementary", "noise"
TOTAL = "total"


class GuardError(RuntimeError):
    """The guard cannot produce a safe release; the message says which cell and why."""


@dataclass
class Entity:
    """One statistic of the slice: a cell or a margin entry."""

    kind: str  # "cell" or the margin name ("origin", "admin1", "total", ...)
    key: tuple  # values of the grouping columns
    value: int
    status: str = RELEASED

    @property
    def withheld(self) -> bool:
        return self.status != RELEASED


@dataclass
class Slice:
    """The cells and margin equations of one protected table."""

    entities: list[Entity]
    equations: list[tuple[int, list[int]]]  # (margin entity index, member cell indices)
    threshold: int

    def withheld(self) -> list[int]:
        return [i for i, e in enumerate(self.entities) if e.withheld]


@dataclass
class Interval:
    low: float
    high: float

    def pins(self) -> bool:
        return math.isfinite(self.high) and self.high - self.low < 0.5

    def inside(self, threshold: int) -> bool:
        return self.low > 0 and self.high <= threshold

    def fails(self, threshold: int) -> bool:
        return self.pins() or self.inside(threshold)


@dataclass
class Protected:
    """A guarded slice: cells and margins with status, and what the guard did."""

    cells: pd.DataFrame
    margins: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def margin_name(by: Sequence[str]) -> str:
    return "+".join(by) if by else TOTAL


def build_slice(
    cells: pd.DataFrame, dims: Sequence[str], count_col: str, threshold: int, margins: Sequence[Sequence[str]]
) -> Slice:
    """Entities (cells, then margin entries) and the margin equations of one slice."""
    if cells[count_col].isna().any():
        raise GuardError(f"{count_col} has nulls in the input cells; counts must be exact")
    dup = cells.duplicated(list(dims))
    if dup.any():
        raise GuardError(f"cells are not unique by {list(dims)}: first duplicate {cells.loc[dup, list(dims)].iloc[0].tolist()}")
    entities = [Entity("cell", tuple(r), int(v)) for r, v in zip(
        cells[list(dims)].itertuples(index=False, name=None), cells[count_col], strict=True)]
    equations: list[tuple[int, list[int]]] = []
    positions = np.arange(len(cells))
    for by in margins:
        name = margin_name(by)
        groups = [((), positions)] if not by else [
            (k if isinstance(k, tuple) else (k,), idx.to_numpy())
            for k, idx in pd.Series(positions, index=cells.index).groupby([cells[c] for c in by], sort=True)
        ]
        for key, members in groups:
            m = len(entities)
            total = int(sum(entities[i].value for i in members))
            entities.append(Entity(name, tuple(key), total))
            equations.append((m, [int(i) for i in members]))
    s = Slice(entities, equations, threshold)
    for e in s.entities:
        if e.value <= threshold:
            e.status = PRIMARY
    return s


def attacker_intervals(s: Slice, tolerance: float = 0.0, only: Sequence[int] | None = None) -> dict[int, Interval]:
    """For every withheld entity, [min, max] of its value given everything published.

    Unknowns: the withheld entities (cells at least 1, since a withheld cell is listed
    and zero cells are never listed; margins at least 0). Each margin equation
    sum(cells) = margin is an equality with the published values moved to the right
    (within +/- ``tolerance`` per published value when values are rounded).
    """
    w = s.withheld()
    if not w:
        return {}
    col = {e: j for j, e in enumerate(w)}
    rows_eq, b_eq, rows_ub, b_ub = [], [], [], []
    for m, members in s.equations:
        coeffs = np.zeros(len(w))
        rhs = 0.0
        n_published = 0
        for i in members:
            if i in col:
                coeffs[col[i]] += 1
            else:
                rhs -= s.entities[i].value
                n_published += 1
        if m in col:
            coeffs[col[m]] -= 1
        else:
            rhs += s.entities[m].value
            n_published += 1
        if not coeffs.any():
            continue
        slack = tolerance * n_published
        if slack > 0:
            rows_ub += [coeffs, -coeffs]
            b_ub += [rhs + slack, -(rhs - slack)]
        else:
            rows_eq.append(coeffs)
            b_eq.append(rhs)
    bounds = [(1 if s.entities[e].kind == "cell" else 0, None) for e in w]
    kw = {
        "A_eq": np.array(rows_eq) if rows_eq else None, "b_eq": np.array(b_eq) if b_eq else None,
        "A_ub": np.array(rows_ub) if rows_ub else None, "b_ub": np.array(b_ub) if b_ub else None,
        "bounds": bounds, "method": "highs",
    }
    if linprog(np.zeros(len(w)), **kw).status == 2:
        # Published values contradict each other (noise, or tampering): no exact inference.
        return {e: Interval(-math.inf, math.inf) for e in w} | {-1: Interval(math.nan, math.nan)}
    out: dict[int, Interval] = {}
    for e, j in col.items():
        if only is not None and e not in only:
            continue
        c = np.zeros(len(w))
        c[j] = 1
        lo = linprog(c, **kw)
        hi = linprog(-c, **kw)
        if lo.status == 2 or hi.status == 2:  # infeasible: published values contradict (noise)
            out[e] = Interval(-math.inf, math.inf)
            continue
        low = lo.fun if lo.status == 0 else bounds[j][0]
        high = -hi.fun if hi.status == 0 else math.inf
        out[e] = Interval(float(low), float(high))
    return out


def _isolated(s: Slice) -> list[tuple[int, list[int]]]:
    """Equations with exactly one withheld entity (it is recovered by differencing)."""
    bad = []
    for m, members in s.equations:
        group = [m, *members]
        hidden = [i for i in group if s.entities[i].withheld]
        if len(hidden) == 1:
            bad.append((hidden[0], group))
    return bad


def _pick_complement(s: Slice, groups: list[list[int]], need: float) -> int | None:
    """A published cell (else margin) in the groups to withhold next.

    Preference: cells whose value covers ``need``; then those that close other
    equations (an equation with one withheld member gets its second) rather than
    open new ones (an equation with none gets its first); then the smallest value.
    """
    cands = {i for g in groups for i in g if not s.entities[i].withheld}
    if not cands:
        return None
    cells = [i for i in cands if s.entities[i].kind == "cell"] or list(cands)
    hidden_in = [sum(s.entities[i].withheld for i in (m, *members)) for m, members in s.equations]
    member_of: dict[int, list[int]] = {}
    for q, (m, members) in enumerate(s.equations):
        for i in (m, *members):
            member_of.setdefault(i, []).append(q)

    def cost(i: int) -> tuple[int, int, int]:
        effect = sum(-1 if hidden_in[q] == 1 else (1 if hidden_in[q] == 0 else 0) for q in member_of.get(i, []))
        return (0 if s.entities[i].value >= need else 1, effect, s.entities[i].value)

    return min(cells, key=lambda i: (*cost(i), i))


def _fix_isolated(s: Slice, max_rounds: int) -> None:
    """Withhold more until no equation has exactly one withheld member."""
    for _ in range(max_rounds):
        bad = _isolated(s)
        if not bad:
            return
        hidden, group = bad[0]
        pick = _pick_complement(s, [group], s.threshold + 1)
        if pick is None:
            raise GuardError(f"cannot protect {s.entities[hidden].kind} {s.entities[hidden].key}: nothing left to withhold")
        s.entities[pick].status = COMPLEMENTARY
    raise GuardError("complementary suppression did not converge")


def suppress(s: Slice, max_rounds: int = 10_000) -> None:
    """Add complementary suppressions until the attacker check passes (or fail).

    Rounds: first close every equation with a single withheld member (cheap), then
    run the attacker check and, for each failing cell, withhold one more cell from
    its equations (at most one per equation per round), and repeat.
    """
    member_of: dict[int, list[int]] = {}
    for q, (m, members) in enumerate(s.equations):
        for i in (m, *members):
            member_of.setdefault(i, []).append(q)
    for _ in range(max_rounds):
        _fix_isolated(s, max_rounds)
        failing = {e: iv for e, iv in attacker_intervals(s).items() if e >= 0 and iv.fails(s.threshold)}
        if not failing:
            return
        touched: set[int] = set()
        added = 0
        for e, iv in sorted(failing.items()):
            eqs = member_of.get(e, [])
            if touched & set(eqs):
                continue  # an addition this round already widened this equation: re-check first
            groups = [[s.equations[q][0], *s.equations[q][1]] for q in eqs]
            need = s.threshold + 1 - (iv.high if math.isfinite(iv.high) else 0)
            pick = _pick_complement(s, groups, max(need, 1))
            if pick is None:
                continue
            s.entities[pick].status = COMPLEMENTARY
            touched |= set(eqs) | set(member_of.get(pick, []))
            added += 1
        if not added:
            e = min(failing)
            raise GuardError(
                f"cannot protect {s.entities[e].kind} {s.entities[e].key}: interval "
                f"[{failing[e].low:g}, {failing[e].high:g}] and no published cell left to withhold"
            )
    raise GuardError("complementary suppression did not converge")


def _round(values: np.ndarray, base: int) -> np.ndarray:
    return (np.floor(values / base + 0.5) * base).astype(np.int64)


def perturb(values: np.ndarray, *, rounding_base: int | None, noise: dict | None, n_margins: int = 0) -> np.ndarray:
    """Optional OpenDP noise (discrete Laplace or Gaussian at the slice's sensitivity; lib/privacy/noise.py),
    then rounding."""
    out = values.astype(np.int64)
    if noise:
        from lib.privacy import noise as dp_noise

        out = dp_noise.add(out, noise.get("mechanism", "laplace"), float(noise["epsilon"]), noise.get("delta"),
                           int(noise.get("contributions_per_slice", 1)), n_margins)
    if rounding_base:
        out = _round(out.astype(float), rounding_base)
    return out.astype(np.int64)


def validate(cells: pd.DataFrame, dims: Sequence[str], count_col: str, margins: Sequence[Sequence[str]]) -> None:
    """Refuse a slice that cannot be guarded: missing columns, null, negative or fractional counts,
    duplicate keys. The message names the column, key and reason."""
    missing = [c for c in [*dims, count_col, *(c for m in margins for c in m)] if c not in cells.columns]
    if missing:
        raise GuardError(f"the policy names columns the table lacks: {sorted(set(missing))}")
    v = pd.to_numeric(cells[count_col], errors="coerce")
    if v.isna().any():
        first = cells.loc[v.isna(), list(dims)].iloc[0].tolist()
        raise GuardError(f"{count_col} is null or not a number for cell {first}; counts must be exact")
    bad = (v < 0) | (v != np.floor(v))
    if bad.any():
        first = cells.loc[bad, [*dims, count_col]].iloc[0].tolist()
        raise GuardError(f"{count_col} must be a non-negative integer; cell {first[:-1]} has {first[-1]}")
    dup = cells.duplicated(list(dims))
    if dup.any():
        raise GuardError(f"cells are not unique by {list(dims)}: first duplicate "
                         f"{cells.loc[dup, list(dims)].iloc[0].tolist()}")


def protect(
    cells: pd.DataFrame,
    dims: Sequence[str],
    count_col: str,
    threshold: int,
    margins: Sequence[Sequence[str]] = (),
    *,
    rounding_base: int | None = None,
    noise: dict | None = None,
    method: str = "auto",
) -> Protected:
    """Guard one slice; returns cells and margins with status and published counts.

    Margins that form at most two chains of nested groupings (every policy shipped) are guarded as a
    flow network (:mod:`lib.privacy.network`: near-linear, exact attacker); any other layout with the
    linear-programming suppression (:func:`suppress`, one LP per withheld cell per round). ``method="lp"``
    forces the latter (the benchmark's baseline).
    """
    validate(cells, dims, count_col, margins)
    cells = cells.reset_index(drop=True)
    net = network.build(cells, dims, margins) if (len(cells) and method != "lp") else None
    if net is None:
        s = build_slice(cells, dims, count_col, threshold, margins)
        n_primary = sum(e.status == PRIMARY for e in s.entities)
        if s.entities:
            suppress(s)
        kinds = [e.kind for e in s.entities]
        keys = [e.key for e in s.entities]
        values = np.array([e.value for e in s.entities], dtype=np.int64)
        status = np.array([e.status for e in s.entities], dtype=object)
    else:
        kinds, keys = net.kinds, net.keys
        values = margin_values(cells, count_col, margins, net)
        primary = values <= threshold
        n_primary = int(primary.sum())
        try:
            held = network.protect(net, values, primary, threshold)
        except network.Unprotectable as exc:
            raise GuardError(f"cannot protect {kinds[exc.arc]} {keys[exc.arc]}: {exc}") from None
        status = np.where(primary, PRIMARY, np.where(held, COMPLEMENTARY, RELEASED)).astype(object)
    n_comp = int((status == COMPLEMENTARY).sum())
    comp_total = int(values[status == COMPLEMENTARY].sum())
    published = np.where(status == RELEASED, values, -1)
    released = np.flatnonzero(status == RELEASED)
    n_noise = 0
    if (rounding_base or noise) and len(released):
        new = perturb(values[released], rounding_base=rounding_base, noise=noise, n_margins=len(margins))
        published[released] = new
        low = released[new <= threshold]  # too small to publish after noise: withheld (post-processing)
        status[low] = NOISE
        n_noise = len(low)
    n = len(cells)
    shown = pd.array(np.where(status == RELEASED, published, 0), dtype="Int64")
    shown[status != RELEASED] = pd.NA
    out_cells = cells[list(dims)].copy()
    out_cells[count_col] = shown[:n]
    out_cells["status"] = status[:n]
    out_margins = pd.DataFrame({
        "margin": kinds[n:],
        "key": ["|".join(map(str, k)) for k in keys[n:]],
        count_col: shown[n:],
        "status": status[n:],
    })
    counts = {
        "cells_in": n,
        "margins_in": len(kinds) - n,
        "withheld_primary": n_primary,
        "withheld_complementary": n_comp,
        "complementary_count_total": comp_total,
        "withheld_after_noise": n_noise,
        "noised_or_rounded": len(released) if (rounding_base or noise) else 0,
    }
    return Protected(out_cells, out_margins, counts)


def margin_values(cells: pd.DataFrame, count_col: str, margins: Sequence[Sequence[str]],
                  net: network.Network) -> np.ndarray:
    """Cell counts, then each margin entry's sum, in the network's arc order."""
    v = cells[count_col].to_numpy(dtype=np.int64)
    parts = [v]
    for m in margins:
        if m:
            parts.append(cells.groupby(list(m), sort=True, dropna=False)[count_col].sum().to_numpy(dtype=np.int64))
        else:
            parts.append(np.array([v.sum()], dtype=np.int64))
    out = np.concatenate(parts)
    assert len(out) == net.n_arcs
    return out


def check_published(
    cells: pd.DataFrame, margins: pd.DataFrame, dims: Sequence[str], count_col: str, threshold: int,
    margin_specs: Sequence[Sequence[str]], tolerance: float = 0.0, exact: bool = True,
) -> list[str]:
    """Re-derive the attacker intervals from published cells and margins alone; list the failures.

    Used by ``audit verify``: the published files are the only input.
    """
    problems = []
    shown = cells[count_col].dropna()
    if (shown <= threshold).any():
        problems.append(f"{int((shown <= threshold).sum())} published cells at or below {threshold}")
    shown_m = margins[count_col].dropna()
    if (shown_m <= threshold).any():
        problems.append(f"{int((shown_m <= threshold).sum())} published margins at or below {threshold}")
    # Rebuild the equation system with placeholders for withheld values.
    tmp = cells.reset_index(drop=True).copy()
    tmp["_v"] = tmp[count_col].fillna(0).astype("int64")
    s = build_slice(tmp, dims, "_v", -1, margin_specs)  # threshold -1: nothing primary here
    n = len(tmp)
    withheld_cells = tmp[count_col].isna().to_numpy()
    for i in range(n):
        if withheld_cells[i]:
            s.entities[i].status = PRIMARY
    lookup = {(r.margin, r.key): r for r in margins.itertuples(index=False)}
    for e in s.entities[n:]:
        row = lookup.get((e.kind, "|".join(map(str, e.key))))
        if row is None:
            problems.append(f"margin {e.kind} {e.key} missing from the published margins")
            continue
        value = getattr(row, count_col)
        if pd.isna(value):
            e.status = PRIMARY
        else:
            e.value = int(value)
    net = network.build(tmp, dims, margin_specs) if (n and exact and tolerance == 0) else None
    if net is not None:
        # The flow-network attacker: exact, near-linear; failing cells get their exact interval (first few).
        published = np.array([np.nan if e.withheld else float(e.value) for e in s.entities])
        try:
            findings = network.attack(net, published, threshold)
        except network.Contradiction:
            return [*problems, "published cells and margins contradict each other (they must add up exactly)"]
        exact_iv = attacker_intervals(s, only=[f.arc for f in findings[:5]]) if findings else {}
        for f in findings:
            iv = exact_iv.get(f.arc, Interval(f.low, f.high))
            ent = s.entities[f.arc]
            problems.append(f"withheld {ent.kind} {ent.key} can be inferred to lie in [{iv.low:g}, {iv.high:g}]")
        return problems
    intervals = attacker_intervals(s, tolerance)
    if intervals.pop(-1, None) is not None and exact:
        problems.append("published cells and margins contradict each other (they must add up exactly)")
    for idx, iv in intervals.items():
        if iv.fails(threshold):
            ent = s.entities[idx]
            problems.append(
                f"withheld {ent.kind} {ent.key} can be inferred to lie in [{iv.low:g}, {iv.high:g}]"
            )
    return problems
