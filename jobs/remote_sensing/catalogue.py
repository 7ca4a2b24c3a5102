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


BAND_TOKEN = re.compile(r"^B0*(\d{1,2}A?)$", re.IGNORECASE)
PRODUCT_PREFIXES = {"SR", "ST", "TOA"}
RESOLUTION_TOKEN = re.compile(r"^(\d+)m$", re.IGNORECASE)


def _tokens(stem: str) -> list[str]:
    return [t for t in re.split(r"[_\-.\s]+", stem) if t]


def band_of(token: str) -> tuple[str | None, str | None]:
    """(product prefix, band id) of a profile's band name: 'SR_B2' -> ('SR', 'B2'), 'B02' -> (None, 'B2'),
    'QA_PIXEL' -> (None, None)."""
    parts = _tokens(token)
    if not parts:
        return None, None
    m = BAND_TOKEN.match(parts[-1])
    if not m:
        return None, None
    prefix = parts[-2].upper() if len(parts) > 1 and parts[-2].upper() in PRODUCT_PREFIXES else None
    return prefix, "B" + m.group(1).upper()


def _file_bands(stem: str) -> list[tuple[str | None, str, int | None]]:
    """Every (prefix, band id, resolution in m) a file name announces: 'LC08_..._SR_B4' -> [('SR', 'B4', None)],
    'T33UUP_20230101T100031_B02_10m' -> [(None, 'B2', 10)], 'L8-B2-recife' -> [(None, 'B2', None)]."""
    parts = _tokens(stem)
    out = []
    for i, t in enumerate(parts):
        m = BAND_TOKEN.match(t)
        if not m:
            continue
        prefix = parts[i - 1].upper() if i and parts[i - 1].upper() in PRODUCT_PREFIXES else None
        res = RESOLUTION_TOKEN.match(parts[i + 1]) if i + 1 < len(parts) else None
        out.append((prefix, "B" + m.group(1).upper(), int(res.group(1)) if res else None))
    return out


def match_band_file(files: list[Path], token: str, role: str) -> Path | None:
    """The one file of ``files`` holding band ``token`` (None when none does; ValueError when several do).

    A band token (B2, SR_B2, B02) matches any file naming that band, whatever its zero padding or place in the
    name; a file of another product (ST_B1 against SR_B1) does not; among several, the profile's product and
    then the finest resolution (B02_10m over B02_20m) win. Other tokens (QA_PIXEL, SCL) match as a whole
    between separators."""
    prefix, band = band_of(token)
    if band is None:
        pattern = re.compile(rf"(?:^|[_\-.]){re.escape(token)}(?:[_\-.]|$)", re.IGNORECASE)
        hits = [p for p in files if pattern.search(p.stem)]
    else:
        scored = []
        for p in files:
            for f_prefix, f_band, res in _file_bands(p.stem):
                if f_band != band or (f_prefix and prefix and f_prefix != prefix) or (f_prefix == "ST"
                                                                                       and prefix != "ST"):
                    continue
                scored.append(((f_prefix != prefix, res if res is not None else 0), p))
        scored.sort(key=lambda x: (x[0], x[1].name))
        best = [p for key, p in scored if key == scored[0][0]] if scored else []
        hits = list(dict.fromkeys(best))
    if len(hits) > 1:
        raise ValueError(f"role '{role}': {len(hits)} files match the band name '{token}': {[h.name for h in hits]}")
    return hits[0] if hits else None


def _band_files(folder: Path, profile: SensorProfile) -> dict[str, tuple[str, int]]:
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES]
    out: dict[str, tuple[str, int]] = {}
    for role, token in profile.band_names.items():
        hit = match_band_file(files, token, role)
        if hit is not None:
            out[role] = (str(hit), 1)
    return out


ROLE_WORDS = {"blue": "blue", "green": "green", "red": "red", "nir": "nir", "near infrared": "nir",
              "swir1": "swir1", "swir 1": "swir1", "swir2": "swir2", "swir 2": "swir2", "qa": "qa"}


def stack_bands(path: Path, profile: SensorProfile) -> tuple[dict[str, tuple[str, int]], str]:
    """Band roles of a multi-band file, and how they were decided: from the file's band descriptions (band names
    such as 'SR_B4' or role words such as 'red'), else the profile's band indices, else - for a stack with
    exactly one band per named role and no descriptions (e.g. B2..B7 without B1) - the roles in band order."""
    with rasterio.open(path) as src:
        descriptions, count = list(src.descriptions), src.count
    by_band = {band_of(t)[1]: role for role, t in profile.band_names.items() if band_of(t)[1]}
    found: dict[str, tuple[str, int]] = {}
    for i, d in enumerate(descriptions, start=1):
        if not d:
            continue
        role = ROLE_WORDS.get(d.strip().lower()) or by_band.get(band_of(d)[1] or "")
        if role is None:
            for prefix_band in _file_bands(d):
                role = by_band.get(prefix_band[1])
        if role and role not in found:
            found[role] = (str(path), i)
    spectral = {"blue", "green", "red", "nir", "swir1"}
    if spectral <= set(found):
        return found, "band descriptions in the file"
    if profile.bands and count >= max(profile.bands.values()):
        return {role: (str(path), idx) for role, idx in profile.bands.items()}, "the profile's band indices"
    ordered = sorted(((band_of(t)[1], role) for role, t in profile.band_names.items()
                      if band_of(t)[1] and role != "qa"),
                     key=lambda x: (int(re.sub(r"\D", "", x[0] or "0")), x[0]))
    if ordered and count == len(ordered) and not any(descriptions):
        return ({role: (str(path), i) for i, (_, role) in enumerate(ordered, start=1)},
                f"band order: {count} bands taken as {', '.join(b or '' for b, _ in ordered)}")
    need = max(profile.bands.values()) if profile.bands else len(ordered)
    raise ValueError(f"wrong band count: the file has {count} bands, the profile needs band {need} "
                     f"(roles {sorted(profile.bands or dict(ordered).values())}); name the bands in the file's "
                     "band descriptions or set the profile's bands: {role: index}")


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


def find_mtl(path: Path) -> Path | None:
    """The Landsat metadata file (``*_MTL.txt`` or ``*_MTL.json``) of a scene folder, or beside a scene file."""
    folder = path if path.is_dir() else path.parent
    found = sorted(p for p in folder.iterdir() if p.is_file() and re.search(r"_MTL\.(txt|json)$", p.name, re.I))
    if not path.is_dir():
        stem = path.stem.split("_SR_")[0].split("_B")[0]
        found = [p for p in found if p.name.startswith(stem)] or found
    return found[0] if found else None


def read_mtl(path: Path) -> dict[str, str]:
    """Every KEY = value of an MTL file (text 'KEY = "value"' lines, or the nested JSON), flattened."""
    text = path.read_text(encoding="utf-8", errors="replace")
    out: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        def walk(node: object) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if isinstance(v, dict | list):
                        walk(v)
                    else:
                        out[str(k).upper()] = str(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
        import json

        walk(json.loads(text))
    else:
        for line in text.splitlines():
            m = re.match(r"\s*([A-Z0-9_]+)\s*=\s*\"?([^\"]*)\"?\s*$", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def mtl_calibration(mtl: dict[str, str], profile: SensorProfile, source: str) -> dict[str, tuple[float, float]]:
    """(scale, offset) per spectral role giving TOA reflectance corrected for the sun elevation:
    rho = (REFLECTANCE_MULT_BAND_n x DN + REFLECTANCE_ADD_BAND_n) / sin(SUN_ELEVATION)."""
    import math

    try:
        sin_e = math.sin(math.radians(float(mtl["SUN_ELEVATION"])))
    except (KeyError, ValueError):
        raise ValueError(f"{source}: no usable SUN_ELEVATION") from None
    if sin_e <= 0.01:
        raise ValueError(f"{source}: sun elevation {mtl['SUN_ELEVATION']} is below the horizon")
    out = {}
    for role, token in profile.band_names.items():
        band = band_of(token)[1]
        if band is None:
            continue
        n = band[1:]
        try:
            mult, add = float(mtl[f"REFLECTANCE_MULT_BAND_{n}"]), float(mtl[f"REFLECTANCE_ADD_BAND_{n}"])
        except (KeyError, ValueError):
            raise ValueError(f"{source}: no REFLECTANCE_MULT/ADD_BAND_{n} for role '{role}'") from None
        out[role] = (mult / sin_e, add / sin_e)
    return out


def open_scene(spec: SceneSpec, profile: SensorProfile) -> Scene:
    """Check a scene and describe it; raises ValueError with the reason."""
    path = _resolve(spec.path)
    if not path.exists():
        raise ValueError("file or folder not found")
    required = ["builtup"] if profile.builtup_min is not None else ["blue", "green", "red", "nir", "swir1"]
    notes: list[str] = []
    if path.is_dir():
        files = _band_files(path, profile)
        missing = [r for r in required if r not in files]
        if missing:
            present = sorted(p.name for p in path.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)[:8]
            raise ValueError(f"missing band file for roles {missing} (band names "
                             f"{[profile.band_names.get(r) for r in missing]}) in the folder; its rasters: "
                             f"{present}; map roles to your names with sensors.{spec.sensor}.band_names")
        notes.append("bands: " + ", ".join(f"{r} <- {Path(f).name}" for r, (f, _) in files.items()))
    else:
        if not profile.bands and not profile.band_names:
            raise ValueError(f"sensor '{spec.sensor}' has no band roles")
        try:
            files, how = stack_bands(path, profile)
        except rasterio.errors.RasterioIOError as exc:
            raise ValueError(f"{path.name}: cannot be opened or read (corrupt or truncated?): {exc}") from None
        notes.append(f"bands ({how}): " + ", ".join(f"{r} <- band {i}" for r, (_, i) in files.items()))
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
    calibration: dict[str, tuple[float, float]] = {}
    if profile.mtl:
        mtl = find_mtl(path)
        if mtl is not None:
            calibration = mtl_calibration(read_mtl(mtl), profile, mtl.name)
            notes.append(f"calibration: TOA reflectance from {mtl.name} (per-band coefficients, sun elevation)")
        elif profile.scale == 1.0 and profile.offset == 0.0:
            raise ValueError(f"no *_MTL.txt / *_MTL.json beside the scene: sensor '{spec.sensor}' needs its "
                             "per-band coefficients to compute reflectance")
        else:
            notes.append(f"calibration: no MTL file; the profile's scale {profile.scale} and offset "
                         f"{profile.offset} without sun-elevation correction (normalised indices are unaffected)")
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
        builtup_min=profile.builtup_min, level=profile.level, calibration=calibration, notes=tuple(notes),
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
