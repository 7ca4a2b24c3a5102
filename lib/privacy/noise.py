"""Differentially private noise for released counts, through OpenDP, and what it costs.

The mechanisms are OpenDP's on integers: the discrete Laplace (pure epsilon-DP)
and the discrete Gaussian (zero-concentrated DP, stated as (epsilon, delta)).
Their randomness is OpenDP's, drawn from the operating system's CSPRNG; nothing
is seeded from the data or the policy, and no floating-point sampler is used
(the attack of Mironov 2012 does not apply).

The contribution bound is stated in the policy: ``contributions_per_slice`` is
the number of cells one person can be counted in within one slice (1 for every
shipped table: one daily location, one home, one unit per day). A slice
publishes its cells and, for each margin grouping, one more vector in which that
person counts at most ``contributions_per_slice`` times; so one person changes
a slice's published vector by at most ``k * (1 + m)`` in L1 and
``sqrt(k + m * k**2)`` in L2 (k contributions, m margin groupings). Every slice
gets noise calibrated for the policy's epsilon (and delta) at that sensitivity,
and, since one person can be in every slice of a release, the release costs the
composition over its slices: ``n`` times epsilon for the Laplace, ``n`` times
rho for the Gaussian, turned into (epsilon, delta) by OpenDP. The ledger
charges that composed cost.

What this does not cover: which cells are withheld is decided from the exact
counts (the threshold rule, before noise), so the suppression pattern is
protected by the guard, not by differential privacy.

Reads and writes no tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np


def _dp() -> Any:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


@dataclass(frozen=True)
class Cost:
    epsilon: float
    delta: float


def sensitivities(contributions: int, n_margins: int) -> tuple[int, float]:
    """(L1, L2) change of one slice's published vector (cells and margins) by one person."""
    k, m = int(contributions), int(n_margins)
    return k * (1 + m), math.sqrt(k + m * k * k)


@cache
def gaussian_scale(epsilon: float, delta: float, l2: float) -> float:
    """The discrete Gaussian scale that is (epsilon, delta)-DP for one slice at L2 sensitivity ``l2``."""
    dp = _dp()
    space = dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int)

    def make(scale: float) -> Any:
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(space >> dp.m.then_gaussian(scale=scale)), delta)

    return float(dp.binary_search_param(make, d_in=_l2_in(l2), d_out=(epsilon, delta), T=float))


def _l2_in(l2: float) -> int:
    """OpenDP takes an integer bound on the L2 distance of integer vectors: the sensitivity rounded up."""
    return max(1, math.ceil(l2))


def laplace_scale(epsilon: float, l1: int) -> float:
    return l1 / epsilon


def add(values: np.ndarray, mechanism: str, epsilon: float, delta: float | None, contributions: int,
        n_margins: int) -> np.ndarray:
    """Noised integer values (OpenDP, OS randomness), never below zero."""
    if len(values) == 0:
        return values.astype(np.int64)
    dp = _dp()
    l1, l2 = sensitivities(contributions, n_margins)
    data = [int(v) for v in values]
    if mechanism == "laplace":
        space = dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int)
        meas = space >> dp.m.then_laplace(scale=laplace_scale(epsilon, l1))
    else:
        if delta is None:
            raise ValueError("gaussian noise needs delta")
        space = dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int)
        meas = space >> dp.m.then_gaussian(scale=gaussian_scale(epsilon, delta, l2))
    return np.maximum(np.asarray(meas(data), dtype=np.int64), 0)


def release_cost(mechanism: str, epsilon: float, delta: float | None, contributions: int, n_margins: int,
                 n_slices: int) -> Cost:
    """What a release of ``n_slices`` slices costs, one person being in all of them (OpenDP's accounting)."""
    dp = _dp()
    n = max(1, int(n_slices))
    l1, l2 = sensitivities(contributions, n_margins)
    if mechanism == "laplace":
        space = dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int)
        one = space >> dp.m.then_laplace(scale=laplace_scale(epsilon, l1))
        per_slice = float(one.map(l1))
        return Cost(epsilon=per_slice * n, delta=0.0)
    assert delta is not None
    space = dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int)
    # n slices of scale s cost n * rho(s) = rho(s / sqrt(n)) in zCDP: one measurement at the shrunk scale.
    scale = gaussian_scale(epsilon, delta, l2) / math.sqrt(n)
    total_delta = float(delta)
    meas = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(space >> dp.m.then_gaussian(scale=scale)), total_delta)
    eps, dlt = meas.map(_l2_in(l2))
    return Cost(epsilon=float(eps), delta=float(dlt))
