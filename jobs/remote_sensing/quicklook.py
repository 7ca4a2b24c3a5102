"""Quick-look maps of settlement change: the change raster (from its overviews) and released H3 cells."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from lib.privacy.policy import ReleaseType  # noqa: E402
from lib.publish import plot_text  # noqa: E402

COLOURS = ["#000000", "#e6e6e6", "#787878", "#dc1e1e", "#1e5adc"]
LABELS = ["invalid", "not built", "stable built-up", "new built-up", "lost built-up"]


def change_map(cog: Path, png: Path, title: str, max_pixels: int = 900) -> None:
    """PNG of the change classes, read at a decimated size from the COG (bounded memory)."""
    import rasterio

    with rasterio.open(cog) as src:
        f = max(1, int(np.ceil(max(src.width, src.height) / max_pixels)))
        data = src.read(1, out_shape=(max(1, src.height // f), max(1, src.width // f)),
                        resampling=rasterio.enums.Resampling.mode)
        km = abs(src.transform.a) * f / 1000.0 if not src.crs.is_geographic else None
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(data, cmap=ListedColormap(COLOURS), vmin=0, vmax=4, interpolation="nearest")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS[1:]]
    ax.legend(handles, LABELS[1:], loc="lower right", fontsize=8)
    counts = np.bincount(data.ravel(), minlength=5)
    ax.set_title(plot_text(f"Settlement change {title}\nnew {counts[3]:,} / lost {counts[4]:,} px at this scale"), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if km:
        ax.set_xlabel(f"1 px = {km:.2f} km")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def draw(release_type: str, rt: ReleaseType, cells: pd.DataFrame, path: Path) -> str:
    """Map of released H3 cells coloured by their measure; withheld cells hatched, never shown as zero."""
    import h3

    measure = next((m for m in ("change_km2", *rt.measures) if m in cells.columns), rt.count_column)
    if rt.slice_by:  # the last slice (latest pair)
        last = cells.iloc[-1][rt.slice_by]
        cells = cells[(cells[rt.slice_by] == last).all(axis=1)]
    fig, ax = plt.subplots(figsize=(8, 7))
    shown = cells[cells["status"] == "released"]
    values = pd.to_numeric(shown[measure], errors="coerce")
    vmax = float(np.nanmax(np.abs(values))) if len(values) and np.isfinite(values).any() else 1.0
    cmap = plt.get_cmap("RdBu_r")
    for r in cells.itertuples(index=False):
        ring = [(lng, lat) for lat, lng in h3.cell_to_boundary(r.h3_index)]
        xs, ys = zip(*ring, strict=True)
        if r.status == "released":
            v = float(getattr(r, measure))
            ax.fill(xs, ys, color=cmap(0.5 + 0.5 * v / vmax if vmax else 0.5), linewidth=0.2, edgecolor="white")
        else:
            ax.fill(xs, ys, facecolor="none", hatch="///", edgecolor="grey", linewidth=0.2)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(-vmax, vmax))
    fig.colorbar(sm, ax=ax, label=measure)
    ax.set_aspect("equal")
    caption = f"{release_type}: {measure} per H3 cell ({len(shown)} released, {len(cells) - len(shown)} withheld, hatched)"
    ax.set_title(plot_text(caption), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return caption
