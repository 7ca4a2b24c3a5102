"""Quick-look plots of CDR releases (presence, OD, displacement), from guarded cells only."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lib.privacy.policy import ReleaseType  # noqa: E402
from lib.publish import plot_text  # noqa: E402

MAX_UNITS = 60  # units shown in a matrix plot


def draw(release_type: str, rt: ReleaseType, cells: pd.DataFrame, path: Path) -> str:
    n = rt.count_column
    released = cells[cells["status"] == "released"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if release_type == "cdr_presence":
        top = released.groupby("unit")[n].sum().nlargest(8).index
        for unit in top:
            s = released[released["unit"] == unit].sort_values("date")
            ax.plot(pd.to_datetime(s["date"]), s[n], label=plot_text(unit))
        ax.set_ylabel("subscribers present (released cells)")
        ax.legend(fontsize=7, ncol=2)
        caption = "Daily presence in the 8 largest units (withheld days are gaps)"
        ax.set_title(plot_text(caption), fontsize=9)
    else:
        plt.close(fig)
        views = list(dict.fromkeys(cells["_view"])) if "_view" in cells.columns else [None]
        fig, axes = plt.subplots(1, len(views), figsize=(7.5 * len(views), 7.5), squeeze=False)
        captions = []
        for ax, view in zip(axes[0], views, strict=True):
            part = cells[cells["_view"] == view] if view is not None else cells
            captions.append(_matrix(ax, fig, release_type, rt, part, view))
        caption = "; ".join(captions)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return caption


def _matrix(ax, fig, release_type: str, rt: ReleaseType, part: pd.DataFrame, view: str | None) -> str:  # type: ignore[no-untyped-def]
    """One slice's origin x destination matrix: released counts in colour, withheld cells as red crosses."""
    n = rt.count_column
    key = tuple(part.iloc[0][rt.slice_by]) if rt.slice_by and len(part) else ()
    if rt.slice_by and len(part):
        for c, v in zip(rt.slice_by, key, strict=True):
            part = part[part[c] == v]
    units = sorted(set(part["origin"]) | set(part["destination"]))
    shown_note = ""
    if len(units) > MAX_UNITS:  # a national matrix: the units with the most cells, readable
        size = pd.concat([part["origin"], part["destination"]]).value_counts()
        units = sorted(size.sort_values(ascending=False, kind="stable").index[:MAX_UNITS])
        part = part[part["origin"].isin(units) & part["destination"].isin(units)]
        shown_note = f", the {MAX_UNITS} units with the most cells"
    idx = {u: i for i, u in enumerate(units)}
    grid = np.full((len(units), len(units)), np.nan)
    for r in part.itertuples(index=False):
        value = getattr(r, n)
        grid[idx[r.origin], idx[r.destination]] = -1 if pd.isna(value) else value
    shown = np.ma.masked_where(~np.isfinite(grid) | (grid < 0), grid)
    im = ax.imshow(shown, cmap="viridis")
    wy, wx = np.where(grid < 0)
    ax.scatter(wx, wy, marker="x", color="red", s=12, label="withheld")
    ax.set_xticks(range(len(units)), [plot_text(u) for u in units], rotation=90, fontsize=6)
    ax.set_yticks(range(len(units)), [plot_text(u) for u in units], fontsize=6)
    ax.set_xlabel("destination")
    ax.set_ylabel("origin")
    if shown.count():
        fig.colorbar(im, ax=ax, label=n, shrink=0.8)
    else:  # an empty colour bar says nothing: say why instead
        ax.text(0.5, -0.28, "every cell of this slice is withheld", transform=ax.transAxes, ha="center",
                fontsize=8, color="red")
    if len(wx):
        ax.legend(fontsize=7, loc="upper right")
    where = ", ".join(f"{c} {v}" for c, v in zip(rt.slice_by, map(str, key), strict=True))
    caption = f"{release_type}, {where}{shown_note}" + (f" ({view})" if view else "") + ": x = withheld"
    ax.set_title("\n".join(textwrap.wrap(plot_text(caption), 60)), fontsize=9)
    return caption
