"""Scene catalogue: scenes from conf/ or a folder -> checked :class:`Scene` records and date pairs.

A scene is one multi-band GeoTIFF (band roles by index) or a folder with one file
per band (roles by the token in the file name, e.g. ``..._SR_B4.TIF``). Each scene
is opened on the driver for its metadata only (size, CRS, transform, band count)
plus its first and last pixel rows, which catches truncated files cheaply. A scene
that fails is returned with its path and the reason, for ``quarantine.settlement_scenes``;
the others proceed. Pairs are consecutive dates of the same area.

Reads GeoTIFF headers; writes no tables.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import rasterio
from rasterio.windows import Window

from jobs.remote_sensing.pixels import Grid, Scene
from lib.config import RemoteSensingSettings, SceneSpec, SensorProfile

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")
DATE_IN_NAME = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")


@dataclass(frozen=True)
class Rejected:
    path: str
    area: str | None
    date: str | None
    sensor: str | None
    reason: str


def _resolve(path: str) -> Path:
    return Path(path)  # absolute: configuration resolves paths (lib.config.ProjectPath)


def discover(folder: str, sensor: str) -> tuple[list[SceneSpec], list[Rejected]]:
    """Scenes in ``folder``: every raster file, or sub-folder of band files, with a date in its name.
    The area is the first sub-folder level when scenes sit in sub-folders, else 'default'."""
    root = _resolve(folder)
    if not root.is_dir():
        return [], [Rejected(str(root), None, None, sensor, "scene_dir is not a folder")]
    specs, rejected = [], []
    candidates: list[Path] = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES:
            parent_has_date = DATE_IN_NAME.search(p.parent.name) and p.parent != root
            if parent_has_date:
                if p.parent not in candidates:
                    candidates.append(p.parent)  # a folder of band files named with the date
            else:
                candidates.append(p)
    for p in candidates:
        rel = p.relative_to(root)
        area = rel.parts[0] if len(rel.parts) > 1 else "default"
        m = DATE_IN_NAME.search(p.name)
        if not m:
            rejected.append(Rejected(str(p), area, None, sensor, "no acquisition date (YYYYMMDD) in the name"))
            continue
        try:
            when = date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            rejected.append(Rejected(str(p), area, None, sensor, f"'{m.group(0)}' in the name is not a valid date"))
            continue
        specs.append(SceneSpec(path=str(p), date=when, sensor=sensor, area=area))
    return specs, rejected


def _band_files(folder: Path, profile: SensorProfile) -> dict[str, tuple[str, int]]:
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES]
    out: dict[str, tuple[str, int]] = {}
    for role, token in profile.band_names.items():
        pattern = re.compile(rf"(?:^|[_\-.]){re.escape(token)}(?:[_\-.]|$)", re.IGNORECASE)
        hits = [p for p in files if pattern.search(p.stem)]
        if len(hits) > 1:
            raise ValueError(f"role '{role}': {len(hits)} files match the band name '{token}': "
                             f"{[h.name for h in hits]}")
        if hits:
            out[role] = (str(hits[0]), 1)
    return out


def _check_file(path: str, max_index: int) -> tuple[int, int]:
    with rasterio.open(path) as src:
        if src.crs is None:
            raise ValueError("no CRS (georeferencing) in the file")
        if src.count < max_index:
            raise ValueError(f"wrong band count: the file has {src.count} bands, the profile needs band {max_index}")
        last = Window(0, src.height - 1, src.width, 1)
        for b in sorted({1, max_index}):  # first and last strips: a truncated file fails here
            src.read(b, window=Window(0, 0, src.width, 1))
            src.read(b, window=last)
        return src.width, src.height


def open_scene(spec: SceneSpec, profile: SensorProfile) -> Scene:
    """Check a scene and describe it; raises ValueError with the reason."""
    path = _resolve(spec.path)
    if not path.exists():
        raise ValueError("file or folder not found")
    if path.is_dir():
        files = _band_files(path, profile)
        required = ["builtup"] if profile.builtup_min is not None else ["blue", "green", "red", "nir", "swir1"]
        missing = [r for r in required if r not in files]
        if missing:
            raise ValueError(f"missing band file for roles {missing} (names "
                             f"{[profile.band_names.get(r) for r in missing]}) in the folder")
    else:
        if not profile.bands:
            raise ValueError(f"sensor '{spec.sensor}' describes one file per band (band_names); give a folder")
        files = {role: (str(path), idx) for role, idx in profile.bands.items()}
    by_file: dict[str, int] = {}
    for f, idx in files.values():
        by_file[f] = max(by_file.get(f, 0), idx)
    for f, idx in by_file.items():
        try:
            _check_file(f, idx)
        except rasterio.errors.RasterioIOError as exc:
            raise ValueError(f"{Path(f).name}: cannot be opened or read (corrupt or truncated?): {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{Path(f).name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - GDAL errors come in many types
            raise ValueError(f"{Path(f).name}: cannot be read: {exc}") from None
    ref_role = "builtup" if profile.builtup_min is not None else "blue"
    with rasterio.open(files[ref_role][0]) as src:
        grid = Grid(src.crs.to_wkt(), tuple(src.transform)[:6], src.width, src.height)
    mask = profile.mask
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return Scene(
        scene_id=f"{spec.area}:{spec.sensor}:{spec.date.isoformat()}:{digest}",
        area=spec.area, date=spec.date.isoformat(), sensor=spec.sensor, path=str(path), files=files, grid=grid,
        scale=profile.scale, offset=profile.offset, nodata=profile.nodata,
        mask_role=mask.role if mask and mask.role in files else None,
        mask_kind=mask.kind if mask else "bits", mask_values=tuple(mask.values) if mask else (),
        thresholds=(profile.thresholds.ndbi_min, profile.thresholds.ndvi_max, profile.thresholds.mndwi_max),
        builtup_min=profile.builtup_min,
    )


def catalogue(settings: RemoteSensingSettings) -> tuple[list[Scene], list[Rejected]]:
    """All configured and discovered scenes: the usable ones and the rejected ones with reasons."""
    specs = list(settings.scenes)
    rejected: list[Rejected] = []
    if settings.scene_dir:
        found, bad = discover(settings.scene_dir, settings.default_sensor)
        specs += found
        rejected += bad
    scenes = []
    for s in specs:
        try:
            scenes.append(open_scene(s, settings.sensors[s.sensor]))
        except ValueError as exc:
            rejected.append(Rejected(str(_resolve(s.path)), s.area, s.date.isoformat(), s.sensor, str(exc)))
    return scenes, rejected


def pairs(scenes: list[Scene]) -> list[tuple[Scene, Scene]]:
    """Consecutive dates within each area (the first of a pair defines the common grid)."""
    out = []
    by_area: dict[str, list[Scene]] = {}
    for s in scenes:
        by_area.setdefault(s.area, []).append(s)
    for area in sorted(by_area):
        ordered = sorted(by_area[area], key=lambda s: (s.date, s.scene_id))
        out += list(zip(ordered, ordered[1:], strict=False))
    return out


def pair_id(before: Scene, after: Scene) -> str:
    return f"{before.area}_{before.date}_{after.date}"
