"""Synthetic daily OD tables for the guard benchmark and tests: heavy-tailed, sparse, stays large.

Each origin has about ``density`` destinations a day besides itself (Poisson), chosen mostly among
nearby units (a ring, as districts along a road network), with lognormal flows (median about 9
subscribers, so most flows are small and withheld at a threshold of 15) and large stays.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd


def synthetic_od(units: int, days: int = 1, density: float = 8.0, seed: int = 0,
                 start: date = date(2024, 3, 1)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = np.array([f"D{i:04d}" for i in range(units)])
    frames = []
    for d in range(days):
        k = np.minimum(rng.poisson(density, units), max(units - 1, 0))
        origins = np.repeat(np.arange(units), k)
        # destinations near the origin on a ring, without repeats per origin
        dest = []
        for o, kk in zip(range(units), k.tolist(), strict=True):
            if kk == 0:
                continue
            spread = max(3 * kk, 6)
            cand = (o + rng.integers(1, spread, size=4 * kk + 8) * rng.choice([-1, 1], size=4 * kk + 8)) % units
            cand = pd.unique(cand[cand != o])
            if len(cand) < kk:
                extra = rng.permutation(np.setdiff1d(np.arange(units), np.append(cand, o)))
                cand = np.concatenate([cand, extra])
            dest.append(cand[:kk])
        destinations = np.concatenate(dest) if dest else np.array([], dtype=np.int64)
        flows = np.maximum(1, np.rint(rng.lognormal(2.2, 1.2, len(origins)))).astype(np.int64)
        stays = np.rint(rng.lognormal(6.5, 0.8, units)).astype(np.int64) + 16
        o_all = np.concatenate([origins, np.arange(units)])
        d_all = np.concatenate([destinations, np.arange(units)])
        frames.append(pd.DataFrame({
            "date": start + timedelta(days=d),
            "spatial_unit": "admin2",
            "origin": names[o_all],
            "destination": names[d_all],
            "n_subscribers": np.concatenate([flows, stays]),
        }))
    out = pd.concat(frames, ignore_index=True)
    out["est_population"] = np.nan
    return out.sort_values(["date", "origin", "destination"]).reset_index(drop=True)
