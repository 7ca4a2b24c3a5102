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
            week = frame[rel.column].map(_week_start).astype(str)
            base = frame[rest].astype(str).agg("|".join, axis=1) if rest else pd.Series("", index=frame.index)
            group = base + "|" + week
            group = group.where(is_total | is_part, None)
        totals = {g: i for i, g in zip(np.flatnonzero(is_total), group[is_total], strict=True)}
        parts: dict[str, list[int]] = {}
        for i in np.flatnonzero(~np.asarray(is_total)):
            g = group.iloc[i]
            if g is not None and g in totals:
                parts.setdefault(g, []).append(int(i))
        out += [Equation(totals[g], tuple(p), bool(rel.exact)) for g, p in parts.items()]
    return out


@dataclass(frozen=True)
class Finding:
    row: int
    low: float
    high: float


def attack(values: np.ndarray, withheld: np.ndarray, eqs: Sequence[Equation], threshold: int,
           only: Sequence[int] | None = None) -> list[Finding]:
    """Withheld rows (of ``only``, default all withheld) whose measure the published values pin, or keep at or
    below ``threshold``. ``values`` holds the measure (ignored where withheld)."""
    from scipy.optimize import linprog

    held = np.flatnonzero(withheld)
    if len(held) == 0:
        return []
    var = {int(r): j for j, r in enumerate(held)}
    a_eq: list[np.ndarray] = []
    b_eq: list[float] = []
    a_ub: list[np.ndarray] = []
    b_ub: list[float] = []
    touched: dict[int, set[int]] = {}
    for e in eqs:
        members = [e.total, *e.parts]
        if not any(m in var for m in members):
            continue
        row = np.zeros(len(held))
        const = 0.0  # total - sum(parts) = 0 (or >= 0), split into variables and known values
        for m, sign in [(e.total, 1.0)] + [(p, -1.0) for p in e.parts]:
            if m in var:
                row[var[m]] += sign
            else:
                const += sign * float(values[m])
        if e.exact:
            a_eq.append(row)
            b_eq.append(-const)
        else:  # total - parts >= 0  <=>  -(row . x) <= const
            a_ub.append(-row)
            b_ub.append(const)
        ids = {var[m] for m in members if m in var}
        for j in ids:
            touched.setdefault(j, set()).update(ids)
    targets = [int(r) for r in (only if only is not None else held) if int(r) in var]
    findings = []
    kw: dict[str, Any] = {"bounds": [(1, None)] * len(held), "method": "highs"}
    if a_eq:
        kw.update(A_eq=np.array(a_eq), b_eq=np.array(b_eq))
    if a_ub:
        kw.update(A_ub=np.array(a_ub), b_ub=np.array(b_ub))
    for r in targets:
        j = var[r]
        if j not in touched:
            continue  # in no equation: unbounded above
        c = np.zeros(len(held))
        c[j] = -1.0
        hi = linprog(c, **kw)
        if hi.status == 2:
            raise RelationError("the published cells contradict the relations (they do not add up)")
        high = np.inf if hi.status == 3 else -float(hi.fun)
        if high <= threshold + 1e-9:
            findings.append(Finding(r, 1.0, high))
            continue
        c[j] = 1.0
        lo = linprog(c, **kw)
        low = float(lo.fun) if lo.status == 0 else 1.0
        if high - low < 0.5:
            findings.append(Finding(r, low, high))
    return findings


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
    targets = np.flatnonzero(primary & held)
    while True:
        found = attack(values, held, eqs, threshold, only=targets)
        if not found:
            return held
        for f in found:
            members = sorted({m for e in by_row.get(f.row, []) for m in (e.total, *e.parts)})
            pick = cheapest(members)
            if pick is None:
                raise RelationError(f"row {f.row}: every cell of its relations is already withheld and its "
                                    f"measure is still within [{f.low:g}, {f.high:g}]")
            held[pick] = True
        # Withholding more only widens the attacker's bounds: the rows that passed stay passed.
        targets = np.array([f.row for f in found])
        rounds += 1
        if rounds > max_rounds:
            raise RelationError("the relations need more rounds of suppression than allowed")
