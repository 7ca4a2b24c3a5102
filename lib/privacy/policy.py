"""The disclosure-control policy (conf/privacy.yaml): loading, validation, approval, hash.

The floor and the list of who may approve a policy are the platform's, not the
policy's: they come from the operator-owned platform file (``conf/operator/platform.yaml``,
or the file named by the environment variable ``MIGRALAKE_PLATFORM_POLICY``), which
no job option or ``--set`` can name. A policy may raise the floor, never lower it.

A policy names, per release type, the source table, the count column of distinct
contributors, the threshold (``suppress_at_or_below``), the slices and cells of
the protected tables and the margins published with them, and optional rounding
and noise. It carries ``approved_by`` / ``approved_on``. :func:`effective`
refuses a policy without approval by a platform approver, or with a threshold
below the floor, unless an override with a written reason is given; the caller
records the override.

Reads no tables.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lib.config import PROJECT_ROOT
from lib.privacy.guard import GUARD_VERSION

PLATFORM_ENV = "MIGRALAKE_PLATFORM_POLICY"
DEFAULT_PLATFORM = PROJECT_ROOT / "conf" / "operator" / "platform.yaml"


class PolicyError(ValueError):
    """A policy that cannot be used as it stands; the message names the file, key and reason."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoiseSpec(_Model):
    mechanism: Literal["laplace", "gaussian"] = "laplace"
    epsilon: float = Field(gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    # Cells one person can be counted in within one slice (the source table's contract; lib/privacy/noise.py
    # derives the L1 / L2 sensitivity of a slice's cells and margins from it). Noise is OpenDP's, per slice,
    # and a release costs the composition over its slices.
    contributions_per_slice: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _delta(self) -> NoiseSpec:
        if self.mechanism == "gaussian" and self.delta is None:
            raise ValueError("gaussian noise needs delta")
        return self


class Relation(_Model):
    """Cells whose additive measure adds up across slices (lib/privacy/relations.py).

    ``level``: rows whose ``columns`` all hold ``total`` are the totals of the rows sharing every other key
    (language ``all`` over the languages; ``national`` over the regions). ``week``: rows with
    ``period_column`` = ``total`` sum the rows with ``part`` of the same week of ``column``. ``exact``: the
    total equals the sum (else it is at least the sum: posts with no place count only nationally, a week
    reaching outside the release has days that are not in it).
    """

    kind: Literal["level", "week"]
    total: str
    columns: list[str] = Field(default_factory=list)
    column: str | None = None
    period_column: str | None = None
    part: str | None = None
    exact: bool = True

    @model_validator(mode="after")
    def _fields(self) -> Relation:
        if self.kind == "level" and not self.columns:
            raise ValueError("a level relation needs columns")
        if self.kind == "week" and not (self.column and self.period_column and self.part):
            raise ValueError("a week relation needs column, period_column and part")
        return self


class ReleaseType(_Model):
    source: str
    count_column: str
    suppress_at_or_below: int = Field(ge=0)
    slice_by: list[str] = Field(default_factory=list)
    cells: list[str]
    hierarchy: dict[str, str] = Field(default_factory=dict)  # cell column -> parent column
    margins: list[list[str]] = Field(default_factory=list)
    rounding_base: int | None = Field(None, ge=2)
    noise: NoiseSpec | None = None
    min_h3_resolution_sensitive: int | None = Field(None, ge=0, le=15)
    # Columns released with each cell (e.g. km2 of change) and withheld with it: never summed into margins.
    measures: list[str] = Field(default_factory=list)
    # A measure that adds up across slices (e.g. posts over languages and days) and how: guarded across slices.
    additive: str | None = None
    relations: list[Relation] = Field(default_factory=list)
    # Other columns that add up the same way and are published through a ratio of released cells:
    # {column: (numerator, ratio, scale)} where ratio = numerator / column * scale (so column follows from them).
    additive_via_ratio: dict[str, tuple[str, str, float]] = Field(default_factory=dict)
    owner: str


class Budget(_Model):
    epsilon: float = Field(gt=0)
    delta: float = Field(0.0, ge=0, lt=1)


class Publisher(_Model):
    """Who publishes the releases and under which licence (manifest and STAC item of every release)."""

    name: str
    contact: str  # an e-mail address or a URL partners write to
    licence: str = "CC-BY-4.0"  # an SPDX identifier
    url: str | None = None


class Policy(_Model):
    approved_by: str | None = None
    publisher: Publisher | None = None
    approved_on: date | None = None
    floor: int = Field(10, ge=0)
    profiles: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"default": dict[str, Any]()})
    budget: Budget = Field(default_factory=lambda: Budget(epsilon=1.0))
    release_types: dict[str, ReleaseType]


class Platform(_Model):
    """The operator's rules every policy is held to."""

    floor: int = Field(ge=0)  # no threshold below this without a recorded override
    approvers: list[str] = Field(min_length=1)  # who may approve a policy (its approved_by)
    source: str = ""  # the file it was read from and its SHA-256 (set by load_platform)


def _read_model(p: Path, what: str, model: type[_Model]) -> Any:
    try:
        text = p.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read the {what} ({exc})") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{p}: not valid YAML: {exc}") from None
    try:
        return model.model_validate(raw or {}), text
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise PolicyError(f"{p}: {key}: {err['msg']}") from None


def load_policy(path: str | Path) -> Policy:
    policy, _ = _read_model(Path(path), "privacy policy", Policy)
    return policy  # type: ignore[no-any-return]


def load_platform(env: dict[str, str] | None = None) -> Platform:
    """The operator's platform rules: ``$MIGRALAKE_PLATFORM_POLICY`` or conf/operator/platform.yaml."""
    env = dict(os.environ) if env is None else env
    path = Path(env.get(PLATFORM_ENV) or DEFAULT_PLATFORM)
    platform, text = _read_model(path, f"platform rules (set by the operator; {PLATFORM_ENV})", Platform)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return platform.model_copy(update={"source": f"{path} sha256:{digest[:16]}"})  # type: ignore[no-any-return]


def floor_of(policy: Policy, platform: Platform) -> int:
    """The floor in force: the platform's, or the policy's when it is higher."""
    return max(platform.floor, policy.floor)


def effective(policy: Policy, release_type: str, profile: str = "default",
              override_reason: str | None = None, platform: Platform | None = None) -> tuple[ReleaseType, list[str]]:
    """The release type's rules under a profile, and the policy problems overridden (if any).

    Raises PolicyError for an unknown type or profile, and for missing approval, an approver the
    platform does not list, or a threshold below the floor, unless ``override_reason`` is given.
    """
    platform = platform or load_platform()
    if release_type not in policy.release_types:
        raise PolicyError(f"unknown release type '{release_type}' (policy has {sorted(policy.release_types)})")
    if profile not in policy.profiles:
        raise PolicyError(f"unknown privacy profile '{profile}' (policy has {sorted(policy.profiles)})")
    base = policy.release_types[release_type]
    changes = dict(policy.profiles[profile])
    unknown = set(changes) - set(ReleaseType.model_fields)
    if unknown:
        raise PolicyError(f"profiles.{profile}: unknown keys {sorted(unknown)}")
    rt = ReleaseType.model_validate({**base.model_dump(), **changes})
    problems = []
    if not (policy.approved_by and policy.approved_by.strip()) or policy.approved_on is None:
        problems.append("the policy has no approval (approved_by and approved_on)")
    elif policy.approved_by.strip() not in {a.strip() for a in platform.approvers}:
        problems.append(f"the policy is approved by '{policy.approved_by}', who is not an approver of the "
                        f"platform ({platform.source})")
    floor = floor_of(policy, platform)
    if rt.suppress_at_or_below < floor:
        problems.append(
            f"release_types.{release_type}.suppress_at_or_below = {rt.suppress_at_or_below} is below the floor "
            f"{floor} (platform {platform.floor}, policy {policy.floor})"
        )
    if problems and not (override_reason and override_reason.strip()):
        raise PolicyError("; ".join(problems) + ". Refused: fix the policy, or give --override-reason with a "
                          "written justification (it is recorded in audit.releases)")
    return rt, problems


def snapshot(policy: Policy, release_type: str, rt: ReleaseType, profile: str,
             platform: Platform) -> dict[str, Any]:
    """What a release records of the policy: approval, floor, profile and the effective rules."""
    return {
        "approved_by": policy.approved_by,
        "approved_on": policy.approved_on.isoformat() if policy.approved_on else None,
        "floor": floor_of(policy, platform),
        "platform_floor": platform.floor,
        "profile": profile,
        "release_type": release_type,
        "rules": rt.model_dump(mode="json"),
        "budget": policy.budget.model_dump(mode="json"),
        "guard_version": GUARD_VERSION,
    }


def policy_hash(snap: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(snap, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
