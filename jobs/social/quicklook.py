"""Quick-look chart of a sentiment release: mean score per region over time, released cells only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lib.privacy.policy import ReleaseType  # noqa: E402
from lib.publish import plot_text  # noqa: E402


def draw(release_type: str, rt: ReleaseType, cells: pd.DataFrame, path: Path) -> str:
    """Weekly (else daily) mean positive-minus-negative score per region, language 'all'.

    Withheld weeks are gaps marked with an x on the axis, never drawn as zero."""
    df = cells.copy()
    if "period" in df.columns and (df["period"] == "week").any():
        df = df[df["period"] == "week"]
        period = "week"
    else:
        period = "day"
    if "language" in df.columns:
        df = df[df["language"] == "all"]
    df["period_start"] = pd.to_datetime(df["period_start"])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
    regions = sorted(df["region"].unique(), key=lambda r: (r == "national", r))
    for region in regions:
        part = df[df["region"] == region].sort_values("period_start")
        released = part["status"] == "released"
        y = pd.to_numeric(part["mean_score"], errors="coerce").where(released)
        style = {"color": "black", "linewidth": 2.5} if region == "national" else {"linewidth": 1.5}
        line, = ax.plot(part["period_start"], y, marker="o", label=plot_text(region), **style)
        withheld = part[~released]
        if len(withheld):
            ax.plot(withheld["period_start"], [ax.get_ylim()[0]] * len(withheld), "x", color=line.get_color())
        ax2.plot(part["period_start"], pd.to_numeric(part["share_negative"], errors="coerce").where(released),
                 marker=".", **style)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_ylabel("mean score (p_pos - p_neg)")
    ax2.set_ylabel("share negative")
    ax.legend(fontsize=8, ncol=3)
    n_rel = int((df["status"] == "released").sum())
    caption = (f"{release_type}: migration sentiment per {period} and region, all languages "
               f"({n_rel} released, {len(df) - n_rel} withheld: x)")
    ax.set_title(plot_text(caption), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return caption
