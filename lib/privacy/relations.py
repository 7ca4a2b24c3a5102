"""Measures that add up across slices: the attacker who subtracts, and the suppression that stops them.

A release's slices are guarded one by one, but some measures add up *across*
slices: in the sentiment series the posts of language ``all`` are the sum of
the posts of each language, the posts of a week the sum of its days, and the
national posts at least the sum of the regions' (posts with no place count only
nationally). A cell withheld for having few authors would give its post count
(and, through it, its shares and mean score) away by subtraction. The policy
declares these relations (``relations`` of a release type) and names the
additive measure; this module

- lists the equations they make over the cells of a release (:func:`equations`);
- is the attacker (:func:`attack`): from the published cells alone, a linear
  program per withheld cell bounds its measure (every withheld measure at least
  1: a cell exists only with posts). A cell fails when its measure is pinned to
  one value, or when it cannot exceed the threshold (the authors of a cell are
  no more than its posts, so that would bound them inside (0, threshold]);
- withholds more until the attacker finds nothing (:func:`protect`): first,
  equation by equation, the smallest published part (or else the total) where
  a withheld part is alone or its room is too small; then, while the linear
  programs still find a cell, the smallest published cell of its equations.

Only release types that declare relations pay for this; it runs on the driver
over the release's cells (a sentiment release has thousands, not millions).

Reads and writes no tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd


class RelationError(RuntimeError):
    """A cell the relations leave unprotectable, or relations that do not fit the table."""


@dataclass(frozen=True)
class Equation:
    total: int  # row index of the total
    parts: tuple[int, ...]
    exact: bool  # total = sum of parts (else total >= sum of parts)


def _week_start(value: Any) -> date:
    d = pd.Timestamp(value).date()
    return d - timedelta(days=d.weekday())


def equations(cells: pd.DataFrame, keys: Sequence[str], relations: Sequence[Any]) -> list[Equation]:
    """The equations the relations make over ``cells`` (one row per cell, identified by ``keys``).

    A ``level`` relation: rows whose ``columns`` all hold ``total`` are the totals of the rows that share
    every other key. A ``week`` relation: rows with ``period = week`` are the totals of the ``period = day``
    rows of the same week (by ``period_start``) that share every other key.
    """
    out: list[Equation] = []
    frame = cells.reset_index(drop=True)
    for rel in relations:
        if rel.kind == "level":
            cols = list(rel.columns)
            missing = [c for c in cols if c not in frame.columns]
            if missing:
                raise RelationError(f"relation over {cols}: the table has no columns {missing}")
            rest = [k for k in keys if k not in cols]
            is_total = np.logical_and.reduce([frame[c].astype(str) == rel.total for c in cols])
            group = frame[rest].astype(str).agg("|".join, axis=1) if rest else pd.Series("", index=frame.index)
        else:  # week
            if rel.period_column not in frame.columns or rel.column not in frame.columns:
                raise RelationError(f"week relation: the table has no {rel.period_column} or {rel.column}")
            rest = [k for k in keys if k not in (rel.column, rel.period_column)]
            is_total = (frame[rel.period_column].astype(str) == rel.total).to_numpy()
            is_part = (frame[rel.period_column].astype(str) == rel.part).to_numpy()
            starts = frame[rel.column].map(_week_start)
            base = frame[rest].astype(str).agg("|".join, axis=1) if rest else pd.Series("", index=frame.index)
            group = base + "|" + starts.astype(str)
            group = group.where(is_total | is_part, None)
            # A week whose seven days all lie within the days the release covers is their exact sum: the
            # attacker knows that (absent days had no posts), whatever the policy says.
            days = pd.to_datetime(frame.loc[is_part, rel.column]).dt.date
            first, last = (days.min(), days.max()) if len(days) else (None, None)
            exact_week = {g: bool(rel.exact or (first is not None and ws >= first and ws + timedelta(days=6) <= last))
                          for g, ws in zip(group[is_total], starts[is_total], strict=True)}
        totals = {g: i for i, g in zip(np.flatnonzero(is_total), group[is_total], strict=True)}
        parts: dict[str, list[int]] = {}
        for i in np.flatnonzero(~np.asarray(is_total)):
            g = group.iloc[i]
            if g is not None and g in totals:
                parts.setdefault(g, []).append(int(i))
        exact = exact_week if rel.kind == "week" else {}
        out += [Equation(int(totals[g]), tuple(p), exact.get(g, bool(rel.exact))) for g, p in parts.items()]
    return out


def at_least(eqs: Sequence[Equation]) -> list[Equation]:
    """The same equations as inequalities (total >= parts): for a column whose rows are kept only where the
    additive measure is positive (groups with none of it drop out, their share of the total with them)."""
    return [Equation(e.total, e.parts, False) for e in eqs]


@dataclass(frozen=True)
class Finding:
    row: int
    low: float
    high: float


def attack(values: np.ndarray, withheld: np.ndarray, eqs: Sequence[Equation], threshold: int,
           only: Sequence[int] | np.ndarray | None = None, truth: np.ndarray | None = None) -> list[Finding]:
    """Withheld rows (of ``only``, default all withheld) whose measure the published values pin, or keep at or
    below ``threshold``. ``values`` holds the measure (ignored where withheld).

    The withheld cells fall into groups that share equations; each group is one small linear program (HiGHS),
    solved for the largest and the smallest value of each target. With ``truth`` (the guard knows the true
    values, a feasible point) one of the two programs is usually enough: the largest value is at least the
    true one, the smallest at most."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    held = set(np.flatnonzero(withheld).tolist())
    wanted = set(int(r) for r in (only if only is not None else sorted(held))) & held
    # Groups of withheld cells linked by equations (union-find); published-only equations must add up.
    parent: dict[int, int] = {r: r for r in held}

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    by_group: dict[int, list[Equation]] = {}
    for e in eqs:
        members = [m for m in (e.total, *e.parts) if m in held]
        if not members:
            gap = float(values[e.total]) - sum(float(values[p]) for p in e.parts)
            if (e.exact and abs(gap) > 1e-6) or gap < -1e-6:
                raise RelationError("the published cells contradict the relations (they do not add up)")
            continue
        for m in members[1:]:
            parent[find(m)] = find(members[0])
    for e in eqs:
        members = [m for m in (e.total, *e.parts) if m in held]
        if members:
            by_group.setdefault(find(members[0]), []).append(e)
    findings = []
    for group_eqs in by_group.values():
        cols = sorted({m for e in group_eqs for m in (e.total, *e.parts) if m in held})
        targets = [r for r in cols if r in wanted]
        if not targets:
            continue
        var = {r: j for j, r in enumerate(cols)}
        eq_rows: list[dict[int, float]] = []
        eq_b: list[float] = []
        ub_rows: list[dict[int, float]] = []
        ub_b: list[float] = []
        for e in group_eqs:
            coef: dict[int, float] = {}
            const = 0.0  # total - sum(parts) = 0 (or >= 0), split into variables and known values
            for m, sign in [(e.total, 1.0)] + [(p, -1.0) for p in e.parts]:
                if m in var:
                    coef[var[m]] = coef.get(var[m], 0.0) + sign
                else:
                    const += sign * float(values[m])
            if e.exact:
                eq_rows.append(coef)
                eq_b.append(-const)
            else:  # total - parts >= 0  <=>  -(coef . x) <= const
                ub_rows.append({j: -v for j, v in coef.items()})
                ub_b.append(const)
        kw: dict[str, Any] = {"bounds": [(1, None)] * len(cols), "method": "highs"}
        for name, rows_, b_ in (("eq", eq_rows, eq_b), ("ub", ub_rows, ub_b)):
            if rows_:
                data = [v for r_ in rows_ for v in r_.values()]
                ri = [i for i, r_ in enumerate(rows_) for _ in r_]
                ci = [j for r_ in rows_ for j in r_]
                kw[f"A_{name}"] = csr_matrix((data, (ri, ci)), shape=(len(rows_), len(cols)))
                kw[f"b_{name}"] = np.array(b_)
        for r in targets:
            c = np.zeros(len(cols))
            known = float(truth[r]) if truth is not None else None
            c[var[r]] = 1.0
            low: float | None = None
            if known is not None and known > threshold:
                lo = linprog(c, **kw)
                _feasible(lo)
                low = float(lo.fun)
                if low < known - 0.5:
                    continue  # above the threshold at the truth, and can be lower: wide
            c[var[r]] = -1.0
            hi = linprog(c, **kw)
            _feasible(hi)
            high = np.inf if hi.status == 3 else -float(hi.fun)
            if high > threshold + 1e-9 and (high == np.inf or (known is not None and high > known + 0.5)):
                continue
            if low is None:
                c[var[r]] = 1.0
                lo = linprog(c, **kw)
                _feasible(lo)
                low = float(lo.fun)
            if high <= threshold + 1e-9 or high - low < 0.5:
                findings.append(Finding(r, round(low, 6), round(high, 6)))
    return sorted(findings, key=lambda f: f.row)


def _feasible(result: Any) -> None:
    if result.status == 2:
        raise RelationError("the published cells contradict the relations (they do not add up)")


def protect(values: np.ndarray, withheld: np.ndarray, primary: np.ndarray, eqs: Sequence[Equation],
            threshold: int, max_rounds: int = 10_000) -> np.ndarray:
    """Rows to withhold besides ``withheld`` so that :func:`attack` finds no primary row; returns the new mask."""
    held = withheld.copy()
    by_row: dict[int, list[Equation]] = {}
    for e in eqs:
        for m in (e.total, *e.parts):
            by_row.setdefault(m, []).append(e)

    def cheapest(rows: Sequence[int]) -> int | None:
        free = [r for r in rows if not held[r]]
        return min(free, key=lambda r: (values[r], r)) if free else None

    def local_fix() -> bool:
        changed = False
        for e in eqs:
            w = [p for p in e.parts if held[p]]
            if not w or held[e.total]:
                continue
            room = float(values[e.total]) - sum(float(values[p]) for p in e.parts if not held[p])
            if (e.exact and len(w) == 1) or room - (len(w) - 1) <= threshold:
                pick = cheapest(e.parts)
                held[pick if pick is not None else e.total] = True
                changed = True
        return changed

    rounds = 0
    while local_fix():
        rounds += 1
        if rounds > max_rounds:
            raise RelationError("the relations need more rounds of suppression than allowed")
    targets = np.flatnonzero(held)  # complementary cells must not be pinned either
    while True:
        found = attack(values, held, eqs, threshold, only=targets, truth=values)
        if not found:
            return held
        picked = []
        for f in found:
            members = sorted({m for e in by_row.get(f.row, []) for m in (e.total, *e.parts)})
            pick = cheapest(members)
            if pick is None:
                raise RelationError(f"row {f.row}: every cell of its relations is already withheld and its "
                                    f"measure is still within [{f.low:g}, {f.high:g}]")
            held[pick] = True
            picked.append(pick)
        # Withholding more only widens the attacker's bounds: the rows that passed stay passed; the rows just
        # withheld are checked too.
        targets = np.array(sorted({f.row for f in found} | set(picked)))
        rounds += 1
        if rounds > max_rounds:
            raise RelationError("the relations need more rounds of suppression than allowed")
