"""Typed configuration: conf/*.yaml -> validated pydantic models, before Spark starts.

Layers, later ones winning key by key:

1. ``conf/base.yaml`` (always),
2. a profile, ``conf/<profile>.yaml`` (``demo`` by default),
3. any files given with ``--conf FILE`` (in order),
4. environment variables ``MIGRALAKE__<SECTION>__<KEY>=value`` (``__`` separates levels),
5. ``--set section.key=value`` from the command line (in order).

Values from the environment and from ``--set`` are parsed as YAML scalars, so
``--set spark.shuffle_partitions=8`` gives an int and ``--set cdr.enabled=false``
a bool. Every error is a :class:`ConfigError` naming the source (file,
environment variable or ``--set``), the dotted key and what was expected.

Reads no tables and writes none.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The checkout the job runs from (spark-submit.sh exports it; lib/ may be imported from a zip).
PROJECT_ROOT = Path(os.environ.get("MIGRALAKE_HOME") or Path(__file__).resolve().parent.parent)
CONF_DIR = PROJECT_ROOT / "conf"


def _project_path(value: str) -> str:
    """A local path relative to the project root made absolute; URIs (``s3://...``) and globs kept as given."""
    text = value.strip()
    if not text or "://" in text:
        return text
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else PROJECT_ROOT / p)


# A file or folder named in configuration: relative paths are resolved against the project root once, here.
ProjectPath = Annotated[str, AfterValidator(_project_path)]
ENV_PREFIX = "MIGRALAKE__"


class ConfigError(ValueError):
    """A configuration problem a user can act on: source, key and expectation."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


# --------------------------------------------------------------------------- sections


class SparkSettings(_Section):
    """How the one SparkSession is built (see lib/spark.py)."""

    master: str = "local[*]"
    app_name: str = "migralake"
    shuffle_partitions: int = Field(8, ge=1, le=100_000)
    delta_snapshot_partitions: int = Field(4, ge=1, le=10_000)
    concurrent_jobs: int = Field(6, ge=1, le=64)  # independent small writes (gold tables) run side by side
    driver_memory: str = Field("4g", pattern=r"^\d+[kmgtKMGT]?$")
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "ERROR"
    show_progress: bool = True
    conf: dict[str, str] = Field(default_factory=dict)


class LakehouseSettings(_Section):
    """Where the Delta tables live: a local folder or an object-store URI."""

    root: str = "lakehouse"
    exports_dir: str = "exports"
    reports_dir: str = "reports"

    @field_validator("root", "exports_dir", "reports_dir")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty path or URI")
        return v.strip()

    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def resolved_root(self) -> str:
        """Absolute local path, or the URI unchanged for object stores."""
        if not self.is_local():
            return self.root.rstrip("/")
        raw = self.root.removeprefix("file://")
        path = Path(raw)
        if not path.is_absolute():
            path = PROJECT_ROOT / path
        return str(path)

    def resolved_local_dir(self, which: str) -> Path:
        path = Path(getattr(self, which))
        return path if path.is_absolute() else PROJECT_ROOT / path


class PeriodSettings(_Section):
    """The period a job processes; re-running a period replaces it."""

    start: date | None = None
    end: date | None = None  # inclusive

    @model_validator(mode="after")
    def _ordered(self) -> PeriodSettings:
        if self.start and self.end and self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self


class PseudonymSettings(_Section):
    """Where the HMAC key for pseudonymising identifiers comes from (never conf/ itself)."""

    key_env: str = "MIGRALAKE_PSEUDONYM_KEY"
    key_file: ProjectPath | None = None  # a secrets file outside the repository (e.g. /run/secrets/...)
    demo_generate: bool = False  # only the demo profile may generate a throwaway key


class CdrInput(_Section):
    """One set of event files (glob or folder) of one event type."""

    path: ProjectPath
    event_type: Literal["call", "sms", "mds", "topup"]
    format: Literal["csv", "parquet"] = "csv"


class ScalingSettings(_Section):
    """Optional scaling of subscriber counts to population estimates (per spatial unit).

    Either ``weights`` (unit -> multiplier) or a population per unit (``population`` or a CSV at
    ``population_path`` with columns unit, population); with a population the weight of a unit is
    population / baseline residents (subscribers whose baseline home is the unit).
    """

    weights: dict[str, float] = Field(default_factory=dict)
    population: dict[str, float] = Field(default_factory=dict)
    population_path: ProjectPath | None = None

    def enabled(self) -> bool:
        return bool(self.weights or self.population or self.population_path)


@dataclass(frozen=True)
class SpatialUnit:
    """A spatial unit of aggregation: an admin level (``admin1``, ``admin2``, ...) or an H3 resolution
    (``h3_<0-15>``). ``SpatialUnit.parse`` is the one place the text form is read."""

    name: str
    admin_level: str | None = None
    h3_resolution: int | None = None

    @classmethod
    def parse(cls, text: str, key: str = "spatial_unit") -> SpatialUnit:
        t = str(text).strip()
        m = re.fullmatch(r"h3_(\d{1,2})", t)
        if m:
            res = int(m.group(1))
            if not 0 <= res <= 15:
                raise ValueError(f"{key}: '{t}': an H3 resolution is 0 to 15")
            return cls(t, h3_resolution=res)
        if re.fullmatch(r"admin\d", t):
            return cls(t, admin_level=t)
        raise ValueError(f"{key}: '{t}' is not a spatial unit: use an admin level (admin1, admin2) "
                         "or h3_<resolution 0-15>, e.g. h3_7")

    @property
    def is_h3(self) -> bool:
        return self.h3_resolution is not None


class CdrSettings(_Section):
    """Call-detail-record pipeline settings (jobs/cdr)."""

    inputs: list[CdrInput] = Field(default_factory=list)
    cells_path: ProjectPath | None = None
    admin_paths: dict[str, ProjectPath] = Field(default_factory=dict)  # level name -> GeoJSON/GPKG path
    column_mapping: dict[str, str] = Field(default_factory=dict)  # our name -> source column name
    timestamp_format: str | None = None  # None: ISO 8601
    spatial_unit: str = "admin2"  # admin1, admin2 or h3_<resolution> (SpatialUnit)
    h3_resolution: int = Field(7, ge=0, le=15)  # of silver.cdr_cells.h3_index; h3_<r> units use their own r
    nearest_area_max_km: float = Field(5.0, ge=0)
    daily_location_rule: Literal["last", "most_frequent"] = "last"
    hours: tuple[int, int] | None = None  # optional [start, end) hour window for daily locations
    # Activity filters, defaults as in the World Bank COVID-19 mobility indicators: drop SIMs with
    # fewer than 3 events in the period, more than 100 a day on average, or more than 200 on one day.
    min_events: int = Field(3, ge=0)
    max_mean_events_per_day: float = Field(100.0, gt=0)
    max_events_single_day: int = Field(200, gt=0)
    home_night_hours: tuple[int, int] = (19, 7)  # [start, end) wrapping midnight
    home_min_days: int = Field(3, ge=1)
    baseline_days: int = Field(14, ge=1)
    event_date: date | None = None
    post_event_weeks: int = Field(4, ge=1)  # weeks after event_date with a home location each
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

    @field_validator("spatial_unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        unit = SpatialUnit.parse(v, "cdr.spatial_unit")
        if unit.admin_level not in (None, "admin1", "admin2"):
            raise ValueError(f"cdr.spatial_unit: '{v}': cells carry admin1 and admin2 only (or use h3_<res>)")
        return unit.name

    @property
    def unit(self) -> SpatialUnit:
        return SpatialUnit.parse(self.spatial_unit, "cdr.spatial_unit")


class MaskSpec(_Section):
    """Which pixels of a scene's quality band are masked (clouds, shadows, fill)."""

    role: str = "qa"  # the band role holding the quality flags
    kind: Literal["bits", "classes"] = "bits"  # bits: any listed bit set; classes: value in the list
    values: list[int] = Field(default_factory=list)


class BuiltupThresholds(_Section):
    """Built-up where NDBI > ndbi_min and NDVI < ndvi_max (not vegetation) and MNDWI < mndwi_max (not water)."""

    ndbi_min: float = Field(0.0, ge=-1, le=1)
    ndvi_max: float = Field(0.3, ge=-1, le=1)
    mndwi_max: float = Field(0.0, ge=-1, le=1)


class SensorProfile(_Section):
    """How to read one sensor's scenes: band roles, scaling to reflectance, mask and thresholds.

    ``bands`` maps a role (blue, green, red, nir, swir1, swir2, qa; or builtup for an
    external built-up layer) to a 1-based band index in a multi-band file; ``band_names``
    maps a role to the token naming its file when a scene is a folder with one file per band
    (``..._SR_B4.TIF`` -> B4). Reflectance = DN x scale + offset (the offset matters for
    normalised differences).
    """

    bands: dict[str, int] = Field(default_factory=dict)
    band_names: dict[str, str] = Field(default_factory=dict)
    # Radiometric level of the values once scaled: sr surface reflectance (Level-2), toa top-of-atmosphere
    # reflectance (Level-1 with the MTL coefficients), dn uncalibrated digital numbers (indices only),
    # layer an external built-up layer. Scenes whose scaled values do not fit the level are caught.
    level: Literal["sr", "toa", "dn", "layer"] = "sr"
    mtl: bool = False  # Level-1: per-band REFLECTANCE_MULT/ADD and SUN_ELEVATION from a *_MTL.txt/.json
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None  # used when a file declares none
    mask: MaskSpec | None = None
    thresholds: BuiltupThresholds = Field(default_factory=BuiltupThresholds)
    builtup_min: float | None = None  # external built-up layers: built where band 'builtup' >= this

    @model_validator(mode="after")
    def _roles(self) -> SensorProfile:
        roles = set(self.bands) | set(self.band_names)
        spectral = {"blue", "green", "red", "nir", "swir1"}
        if self.builtup_min is not None:
            if "builtup" not in roles:
                raise ValueError("a built-up layer profile (builtup_min) needs a band role 'builtup'")
        elif not spectral <= roles:
            raise ValueError(f"missing band roles {sorted(spectral - roles)} (needed for NDBI, NDVI, MNDWI)")
        if self.mask and self.mask.role not in roles:
            raise ValueError(f"mask.role '{self.mask.role}' is not one of the band roles {sorted(roles)}")
        return self


class LabelSpec(_Section):
    """Labels of built-up and not built-up for one area and date (or pair of dates, for new built-up).

    A raster (any CRS and resolution: read onto the scene grid by nearest neighbour) whose values in
    ``builtup_values`` (or >= ``builtup_min``, for WSF/GHSL-like layers) are built-up and in
    ``other_values`` not built-up (empty: every other valid value); or vector polygons / points
    (GeoJSON, GeoPackage, CSV with lon, lat) with a ``class_column`` whose ``builtup_classes`` are built-up.
    Pixels outside every label, or with the raster's nodata, are unlabelled.
    """

    path: ProjectPath
    area: str = "default"
    date: dt.date | None = None  # built-up at this date (layer builtup)
    date_before: dt.date | None = None  # layer new_builtup: new between these dates
    date_after: dt.date | None = None
    layer: Literal["builtup", "new_builtup"] = "builtup"
    builtup_values: list[float] = Field(default_factory=lambda: [1.0])
    builtup_min: float | None = None
    other_values: list[float] = Field(default_factory=list)
    class_column: str = "class"
    builtup_classes: list[str] = Field(default_factory=lambda: ["1", "built", "builtup", "built-up"])

    @model_validator(mode="after")
    def _dates(self) -> LabelSpec:
        if self.layer == "builtup" and self.date is None:
            raise ValueError(f"{self.path}: a built-up label needs its date")
        if self.layer == "new_builtup" and (self.date_before is None or self.date_after is None):
            raise ValueError(f"{self.path}: a new built-up label needs date_before and date_after")
        return self


class TrainSettings(_Section):
    """Learned built-up (remote_sensing.train): gradient-boosted trees on bands, indices and texture."""

    holdout: float = Field(0.3, ge=0, lt=1)  # share of spatial blocks held out to measure the model
    block_px: int = Field(64, ge=8)  # side of one spatial block (pixels near each other stay together)
    max_per_class_per_window: int = Field(4000, ge=10)  # training pixels sampled per class and window
    trees: int = Field(100, ge=1)  # scoring cost grows with the trees (bench: ~1.8 s per million pixels per core)
    leaves: int = Field(31, ge=2)
    learning_rate: float = Field(0.1, gt=0)
    seed: int = 0
    models_dir: str = "models/builtup"  # under lakehouse.root unless absolute


class SceneSpec(_Section):
    """One acquisition: a multi-band GeoTIFF, or a folder with one GeoTIFF per band."""

    path: ProjectPath
    date: date
    sensor: str
    area: str = "default"  # scenes of one area are compared date to date


class RemoteSensingSettings(_Section):
    """Remote-sensing pipeline settings (jobs/remote_sensing)."""

    scenes: list[SceneSpec] = Field(default_factory=list)
    scene_dir: ProjectPath | None = None  # or discover *.tif / band folders here (date from the name: YYYYMMDD)
    default_sensor: str = "landsat7_etm"  # sensor of discovered scenes
    sensors: dict[str, SensorProfile] = Field(default_factory=dict)
    window_size: int = Field(1024, ge=16, le=8192)  # pixels per side of one Spark task's window
    h3_resolution: int = Field(8, ge=0, le=15)
    admin_paths: dict[str, ProjectPath] = Field(default_factory=dict)  # level name -> GeoJSON/GPKG path
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"
    sensitive_zones_path: ProjectPath | None = None  # polygons where H3 layers are coarsened (privacy.yaml)
    rasters_dir: str = "rasters"  # change rasters (COG) and quick-looks, under lakehouse.root
    # Radiometric check: a scene where more than max_out_of_range of a band's valid pixels fall outside the
    # physical range of its profile's level is quarantined (or processed with a warning: on_radiometry: warn).
    on_radiometry: Literal["quarantine", "warn"] = "quarantine"
    max_out_of_range: float = Field(0.02, ge=0, le=1)
    # Built-up rule: "index" (the profile's NDBI/NDVI/MNDWI thresholds) or the folder of a model trained by
    # remote_sensing.train (model.txt + model.json).
    classifier: str = "index"
    labels: list[LabelSpec] = Field(default_factory=list)  # training labels (remote_sensing.train)
    reference: list[LabelSpec] = Field(default_factory=list)  # reference labels (remote_sensing.accuracy)
    train: TrainSettings = Field(default_factory=lambda: TrainSettings())

    @model_validator(mode="after")
    def _known_sensors(self) -> RemoteSensingSettings:
        for i, scene in enumerate(self.scenes):
            if scene.sensor not in self.sensors:
                raise ValueError(f"scenes[{i}] ({scene.path}): unknown sensor '{scene.sensor}' "
                                 f"(profiles: {sorted(self.sensors)})")
        if self.scene_dir and self.default_sensor not in self.sensors:
            raise ValueError(f"default_sensor '{self.default_sensor}' has no profile (profiles: {sorted(self.sensors)})")
        return self


class SocialInput(_Section):
    """One set of post files: JSON Lines in the X/Twitter API v2 shape, or CSV through a column mapping."""

    path: ProjectPath  # a file, a folder or a glob
    format: Literal["jsonl", "csv"] = "jsonl"


class SocialSettings(_Section):
    """Social-media posts -> migration sentiment series (jobs/social)."""

    inputs: list[SocialInput] = Field(default_factory=list)
    column_mapping: dict[str, str] = Field(default_factory=dict)  # CSV: our name -> your column name
    keywords_path: ProjectPath = "conf/keywords/migration.yaml"  # migration terms per language
    exclude_retweets: bool = True  # flagged either way; excluded from counts when true
    exclude_duplicates: bool = True
    text_retention_days: int = Field(30, ge=0)  # post text is erased from bronze after this many days (0: at once
    # after scoring); Delta files holding it are vacuumed with the same retention
    admin_paths: dict[str, ProjectPath] = Field(default_factory=dict)  # empty: the CDR boundaries
    spatial_unit: str = "admin1"  # an admin level name or "h3_<resolution>"
    nearest_area_max_km: float = Field(5.0, ge=0)
    language_detector: Literal["py3langid"] = "py3langid"  # offline, model inside the wheel
    model: str = "cardiffnlp/twitter-xlm-roberta-base-sentiment"  # hub id or local directory
    label_map: dict[str, str] = Field(default_factory=dict)  # model label -> negative/neutral/positive
    batch_size: int = Field(64, ge=1, le=4096)
    torch_threads: int = Field(1, ge=1, le=256)  # per Python worker; workers = Spark task slots
    tasks_per_slot: int = Field(1, ge=1, le=64)  # scoring tasks per Spark task slot
    # Posts are scored in groups fixed by the posts themselves (about this many each, by a hash of the post
    # key), never by the partitioning: a post's batch-mates, and so its score to the last bit, are the same on
    # any cluster layout.
    score_group_size: int = Field(1024, ge=64, le=1_000_000)
    # auto: bf16 on CPUs with native bfloat16 (AVX512-BF16, AMX), else fp32; int8: dynamic quantisation
    # (check the label agreement ./bench/run social prints before using bf16 or int8 with another model)
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    event_date: date | None = None  # marked on the quick-look chart


class PrivacySettings(_Section):
    """Where the disclosure-control policy lives and which of its profiles applies."""

    policy_path: ProjectPath = "conf/privacy.yaml"
    profile: str = "default"
    # Where the release signing key comes from (never conf/ itself, never the lakehouse): lib/privacy/signing.py
    signing_key_env: str = "MIGRALAKE_SIGNING_KEY"
    signing_key_file: ProjectPath | None = None
    signing_demo_generate: bool = False  # only the demo profile may generate a throwaway key

    def resolved_policy_path(self) -> Path:
        return Path(self.policy_path)


Pipeline = Literal["cdr", "remote_sensing", "social"]
ALL_PIPELINES: tuple[Pipeline, ...] = ("cdr", "remote_sensing", "social")


class DemoSettings(_Section):
    """Synthetic data with a planted truth (jobs/demo)."""

    seed: int = 20240501
    n_subscribers: int = Field(4000, ge=10)
    n_days: int = Field(28, ge=2)
    start_date: date = date(2024, 3, 4)
    events_per_day: float = Field(6.0, gt=0)
    event_day: int = Field(14, ge=1)  # day index of the planted displacement
    displaced_share: float = Field(0.3, ge=0, le=1)
    bad_row_share: float = Field(0.01, ge=0, le=0.5)
    input_dir: ProjectPath = "build/demo-inputs"  # raw synthetic inputs live outside the lakehouse
    pipelines: list[Pipeline] = Field(
        default_factory=lambda: list(ALL_PIPELINES))  # which pipelines the demo runs
    raster_scene: ProjectPath | None = "../shared/data/rasters/L7_ETMs.tif"  # first date when present
    raster_synthetic_size: int = Field(600, ge=64, le=100_000)  # px per side without the real scene
    n_authors: int = Field(3000, ge=10)  # synthetic social-media authors
    posts_per_author: float = Field(4.0, gt=0)


class Config(_Section):
    """The whole validated configuration of one run."""

    profile: str = "demo"
    spark: SparkSettings = Field(default_factory=SparkSettings)
    lakehouse: LakehouseSettings = Field(default_factory=LakehouseSettings)
    period: PeriodSettings = Field(default_factory=PeriodSettings)
    pseudonym: PseudonymSettings = Field(default_factory=PseudonymSettings)
    cdr: CdrSettings = Field(default_factory=CdrSettings)
    remote_sensing: RemoteSensingSettings = Field(default_factory=RemoteSensingSettings)
    social: SocialSettings = Field(default_factory=SocialSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)

    def check_lakehouse_writable(self) -> None:
        """Fail before Spark starts if a local lakehouse root cannot be written."""
        if not self.lakehouse.is_local():
            return
        root = Path(self.lakehouse.resolved_root())
        probe_dir = root
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        try:
            if not probe_dir.is_dir():
                raise OSError(f"{probe_dir} is a file, not a folder")
            with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".migralake-probe-"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"lakehouse.root: '{self.lakehouse.root}' (resolved to {root}) is not writable: {exc}. "
                "Choose a folder you can write to, e.g. --set lakehouse.root=/tmp/lakehouse"
            ) from None


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _merge(
    target: dict[str, Any],
    update: Mapping[str, Any],
    source: str,
    provenance: dict[tuple[str, ...], str],
    prefix: tuple[str, ...] = (),
) -> None:
    for key, value in update.items():
        key = str(key)
        path = (*prefix, key)
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value, source, provenance, path)
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value
            provenance[path] = source
            if isinstance(value, Mapping):
                for sub in _leaf_paths(value, path):
                    provenance[sub] = source


def _leaf_paths(value: Mapping[str, Any], prefix: tuple[str, ...]) -> Iterable[tuple[str, ...]]:
    for k, v in value.items():
        path = (*prefix, str(k))
        yield path
        if isinstance(v, Mapping):
            yield from _leaf_paths(v, path)


def _nest(dotted: str, value: Any, source: str) -> dict[str, Any]:
    parts = [p for p in dotted.split(".")]
    if not dotted or any(not p.strip() for p in parts):
        raise ConfigError(f"{source}: '{dotted}' is not a dotted key like section.key")
    out: dict[str, Any] = {}
    cursor = out
    for part in parts[:-1]:
        cursor = cursor.setdefault(part.strip(), {})
    cursor[parts[-1].strip()] = value
    return out


def parse_set(assignment: str) -> tuple[str, Any]:
    """Split ``section.key=value`` into the dotted key and a YAML-parsed value."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    key, _, raw = assignment.partition("=")
    return key.strip(), _parse_scalar(raw.strip())


def _describe_error(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    msg = err.get("msg", "invalid value")
    given = err.get("input")
    if kind != "missing" and not isinstance(given, dict | list):
        return f"{msg} (got {given!r})"
    return msg


def _source_for(loc: tuple[str, ...], provenance: Mapping[tuple[str, ...], str]) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in provenance:
            return provenance[loc[:n]]
    return "defaults"


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    return [prefix + name for name in model.model_fields]


def load_config(
    profile: str | None = "demo",
    conf_files: Sequence[str | os.PathLike[str]] = (),
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    conf_dir: Path = CONF_DIR,
    check_writable: bool = True,
) -> Config:
    """Build the validated :class:`Config` for one run (see module docstring for the layers)."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    provenance: dict[tuple[str, ...], str] = {}

    base = conf_dir / "base.yaml"
    if base.exists():
        _merge(data, _read_yaml(base), str(base), provenance)
    if profile:
        profile_path = conf_dir / f"{profile}.yaml"
        if not profile_path.exists():
            known = sorted(p.stem for p in conf_dir.glob("*.yaml") if p.stem not in {"base", "privacy"})
            raise ConfigError(f"profile '{profile}': no file {profile_path} (profiles: {', '.join(known)})")
        _merge(data, _read_yaml(profile_path), str(profile_path), provenance)
        data.setdefault("profile", profile)
    for file in conf_files:
        path = Path(file)
        _merge(data, _read_yaml(path), str(path), provenance)
    for name in sorted(env):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _merge(data, _nest(dotted, _parse_scalar(env[name]), f"env {name}"), f"env {name}", provenance)
    for assignment in overrides:
        key, value = parse_set(assignment)
        _merge(data, _nest(key, value, f"--set {assignment}"), f"--set {assignment}", provenance)

    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            dotted = ".".join(loc)
            where = _source_for(loc, provenance)
            line = f"{where}: {dotted}: {_describe_error(err)}"
            if err.get("type") == "extra_forbidden":
                parent: type[BaseModel] = Config
                for part in loc[:-1]:
                    field = parent.model_fields.get(part)
                    ann = field.annotation if field else None
                    if isinstance(ann, type) and issubclass(ann, BaseModel):
                        parent = ann
                    else:
                        break
                line += f"; expected one of: {', '.join(_known_keys(parent))}"
            lines.append(line)
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    if check_writable:
        cfg.check_lakehouse_writable()
    return cfg
