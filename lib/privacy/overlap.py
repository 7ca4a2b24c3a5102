"""Releases against each other: what two releases of the same slices give away together.

The same day can be released twice: under another profile (a stricter
threshold), after a correction, or again by mistake. Each release alone passes
its attacker; together they may not: a cell the strict release withholds (at or
below 20) may have been published by the default one (above 15), and cells one
release withholds as complements may be published by the other, leaving a
withheld cell alone in its margins.

For every slice two releases of one type share, the attacker takes everything
either published (a cell or margin published by one is known, whatever the
other says) and checks every cell withheld by both against the higher of the two
thresholds (the promise of the stricter release); a value published at or below
that threshold breaks the stricter release's promise. Before a release is
published, the guard runs this against every earlier release of its type and
refuses, naming the earlier release, if anything is found; ``audit verify`` runs
it from the files of every release of the type in the exports folder.

Releases with noise or rounding are left out: their published values are not
the exact counts.

Reads no tables (the callers hand it published frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from lib.privacy import guard


def exact(rules: dict[str, Any]) -> bool:
    return not rules.get("noise") and not rules.get("rounding_base")


def union_problems(a_cells: pd.DataFrame, a_margins: pd.DataFrame, b_cells: pd.DataFrame, b_margins: pd.DataFrame,
                   dims: Sequence[str], count: str, threshold: int, specs: Sequence[Sequence[str]]) -> list[str]:
    """The attacker's findings on one slice from the published cells and margins of two releases together.

    Cells: ``dims`` + ``count`` (empty when withheld); margins: ``margin``, ``key``, ``count``."""
    dims = list(dims)
    problems: list[str] = []

    def union(a: pd.DataFrame, b: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        both = a[[*keys, count]].merge(b[[*keys, count]], on=keys, how="outer", suffixes=("_a", "_b"))
        va, vb = pd.to_numeric(both[f"{count}_a"]), pd.to_numeric(both[f"{count}_b"])
        clash = va.notna() & vb.notna() & (va != vb)
        if clash.any():
            first = both.loc[clash, keys].iloc[0].tolist()
            problems.append(f"{first} was published as {int(va[clash].iloc[0])} and as {int(vb[clash].iloc[0])} "
                            "(the source changed between the releases?)")
        out = both[keys].copy()
        out[count] = va.where(va.notna(), vb).astype("Int64")
        return out

    cells = union(a_cells, b_cells, dims)
    margins = union(a_margins, b_margins, ["margin", "key"])
    if problems:
        return problems
    extra = list(dict.fromkeys(c for m in specs for c in m if c not in dims))
    if extra:  # parent columns the margins group by travel with the cells
        parents = pd.concat([a_cells[[*dims, *extra]], b_cells[[*dims, *extra]]]).drop_duplicates(dims)
        cells = cells.merge(parents, on=dims, how="left")
    wanted = {guard.margin_name(m) for m in specs}
    margins = margins[margins["margin"].isin(wanted)]
    return guard.check_published(cells.reset_index(drop=True), margins.reset_index(drop=True), [*dims, *extra],
                                 count, threshold, specs)


def slice_key(row: dict[str, Any], slice_by: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(row[c]) for c in slice_by)


def across_slices(a_cells: pd.DataFrame, b_cells: pd.DataFrame, keys: list[str], additive: str,
                  rels: Sequence[Any], threshold: int) -> list[str]:
    """The relations' attacker (lib/privacy/relations.py) on everything two releases published of an additive
    measure: a withheld language's posts may follow from 'all' minus languages the other release published."""
    from lib.privacy import relations

    both = a_cells[[*keys, additive]].merge(b_cells[[*keys, additive]], on=keys, how="outer", suffixes=("_a", "_b"))
    va, vb = pd.to_numeric(both[f"{additive}_a"]), pd.to_numeric(both[f"{additive}_b"])
    value = va.where(va.notna(), vb)
    union = both[keys].assign(**{additive: value})
    try:
        eqs = relations.equations(union, keys, rels)
        found = relations.attack(value.fillna(0).to_numpy(dtype=float), value.isna().to_numpy(), eqs, threshold)
    except relations.RelationError as exc:
        return [str(exc)]
    return [f"{dict(zip(keys, map(str, union.loc[f.row, keys]), strict=True))}: {additive} in [{f.low:g}, "
            f"{f.high:g}] from both releases' {additive}" for f in found]


def compare(a: dict[str, Any], b: dict[str, Any], slice_by: Sequence[str], dims: Sequence[str], count: str,
            specs_a: Sequence[Sequence[str]], specs_b: Sequence[Sequence[str]], threshold: int,
            additive: str | None = None, rels: Sequence[Any] = ()) -> list[str]:
    """Findings over every slice two releases share, and across slices through the policy's relations.
    ``a`` and ``b``: {"cells": frame, "margins": frame} with the slice columns; ``threshold``: the higher of
    the two."""
    specs = [list(m) for m in dict.fromkeys(tuple(m) for m in [*specs_a, *specs_b])]
    out: list[str] = []

    def groups(frame: pd.DataFrame) -> dict[tuple[str, ...], pd.DataFrame]:
        if not slice_by:
            return {(): frame}
        if frame.empty:
            return {}
        keyed = frame.assign(_k=frame[list(slice_by)].astype(str).agg("|".join, axis=1))
        return {tuple(k.split("|")): g.drop(columns="_k") for k, g in keyed.groupby("_k", sort=True)}

    ac, bc = groups(a["cells"]), groups(b["cells"])
    am, bm = groups(a["margins"]), groups(b["margins"])
    empty = a["margins"].iloc[0:0]
    for key in sorted(set(ac) & set(bc)):
        found = union_problems(ac[key], am.get(key, empty), bc[key], bm.get(key, empty), dims, count, threshold,
                               specs)
        out += [f"slice {dict(zip(slice_by, key, strict=True))}: {p}" for p in found]
    if rels and additive and not out:
        out += across_slices(a["cells"], b["cells"], [*slice_by, *dims], additive, rels, threshold)
    return out


def levels(keys: set[tuple[str, ...]], where: int) -> dict[tuple[str, ...], set[str]]:
    """Slice keys grouped by everything but the level column at ``where``: {other values: {levels}}."""
    out: dict[tuple[str, ...], set[str]] = {}
    for k in keys:
        out.setdefault(k[:where] + k[where + 1:], set()).add(k[where])
    return out
