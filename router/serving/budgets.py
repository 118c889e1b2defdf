"""The budgets file (`router serve --budgets FILE`): per-tenant spend targets, hard caps and allow-lists.

    tenants:
      search-team:
        target_usd_per_1k: 0.18     # soft: hold the mean spend per 1,000 calls near this
      batch-jobs:
        limit_usd: 5.0              # hard: at most this much predicted spend per window
        window_s: 86400
        on_exhausted: cheapest      # or: reject (RESOURCE_EXHAUSTED)
        allowed_models: [a, b]      # optional allow-list for the tenant

Validated with pydantic (more keys are allowed, each named in a warning: a misspelt key would
otherwise go unnoticed); a file that does not validate is refused with a message naming the key,
and the previous file stays in force. The file is watched and reloaded when it changes, without a
restart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from router.core.errors import InvalidRequest

log = logging.getLogger(__name__)

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # whole names only: fullmatch
TENANT_RULE = "1-64 characters of A-Z, a-z, 0-9, '.', '_', '-', the first a letter or digit"
# Ten years: a longer window is a unit slip, and its start would overflow the store's integers.
MAX_WINDOW_S = 10 * 365 * 86400.0
DEFAULT_TENANT = "default"


def tenant_of(name: str) -> str:
    """The tenant a request names (empty: the default one), or InvalidRequest."""
    if not name:
        return DEFAULT_TENANT
    if not TENANT_NAME.fullmatch(name):
        raise InvalidRequest("tenant", f"must be {TENANT_RULE}, got {name[:80]!r}")
    return name


# YAML numbers only: `limit_usd: true` or `"5"` read as 1.0 and 5.0 is a mistake to point out
Number = Annotated[float, Strict()]


class _Loader(yaml.SafeLoader):
    """YAML 1.1, as PyYAML reads it, takes `5e-3` and `1e9` for strings (a float there needs a
    dot and a signed exponent); YAML 1.2, and every other reader, takes them for numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class TenantBudget(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    # finite, and large enough that per-call arithmetic (target / 1000) stays a normal number
    target_usd_per_1k: Number | None = Field(default=None, ge=1e-9, allow_inf_nan=False)
    limit_usd: Number | None = Field(default=None, ge=1e-9, allow_inf_nan=False)
    window_s: Number = Field(default=86400.0, ge=1, le=MAX_WINDOW_S, allow_inf_nan=False)
    on_exhausted: Literal["cheapest", "reject"] = "cheapest"
    allowed_models: list[str] | None = Field(default=None, min_length=1)

    @field_validator("allowed_models")
    @classmethod
    def _once_each(cls, models: list[str] | None) -> list[str] | None:
        repeated = [m for i, m in enumerate(models or []) if m in (models or [])[:i]]
        if repeated:
            raise ValueError(f"lists {repeated[0]!r} more than once")
        return models

    @model_validator(mode="after")
    def _says_something(self) -> TenantBudget:
        if self.target_usd_per_1k is None and self.limit_usd is None and self.allowed_models is None:
            raise ValueError("give target_usd_per_1k, limit_usd or allowed_models")
        return self


class BudgetsFile(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    # required: a file whose `tenants` key is misspelt must not lift every budget
    tenants: dict[str, TenantBudget]

    @field_validator("tenants")
    @classmethod
    def _names(cls, tenants: dict[str, TenantBudget]) -> dict[str, TenantBudget]:
        for name in tenants:
            if not TENANT_NAME.fullmatch(str(name)):
                raise ValueError(f"tenant name {name!r}: {TENANT_RULE}")
        return tenants


class BudgetsError(ValueError):
    """A budgets file that cannot be used; the message names the key."""


def read_budgets(path: Path) -> BudgetsFile:
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BudgetsError(f"{path}: not readable YAML ({exc})") from exc
    if raw is None:  # an editor that truncates before it writes must not lift every budget
        raise BudgetsError(f"{path}: the file is empty; write `tenants: {{}}` to configure no tenant")
    try:
        budgets = BudgetsFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise BudgetsError(f"{path}: {where}: {first['msg']}") from exc
    for where in _unknown_keys(raw):
        log.warning("budgets file %s: %s is not a budgets key and is ignored (misspelt?)", path, where)
    return budgets


def _unknown_keys(raw: dict) -> list[str]:
    """Keys the file may carry beside the budgets' own (notes, owners), which are worth a warning:
    a misspelt `limit_usd` leaves its tenant without the cap."""
    unknown = [str(k) for k in raw if k not in BudgetsFile.model_fields]
    for name, tenant in raw["tenants"].items():
        unknown += [f"tenants.{name}.{k}" for k in tenant if k not in TenantBudget.model_fields]
    return unknown


@dataclass(frozen=True)
class Loaded:
    budgets: BudgetsFile
    key: tuple[int, int]  # (mtime_ns, size) of the file read


class BudgetsWatch:
    """The budgets in force, and the file they came from, reloaded when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._loaded = Loaded(read_budgets(self.path), self._key())  # a bad file at start: refuse
        self._refused: tuple[int, int] | None = None

    @property
    def budgets(self) -> BudgetsFile:
        return self._loaded.budgets

    def _key(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size

    def reload_if_changed(self) -> bool | None:
        """True: a new file is in force; False: a changed file was refused; None: nothing new."""
        try:
            key = self._key()
        except OSError:
            return None  # mid-replace or gone: keep the budgets in force
        if key == self._loaded.key or key == self._refused:
            return None
        try:
            budgets = read_budgets(self.path)
        except BudgetsError as exc:
            self._refused = key
            log.error("budgets file refused, the previous one stays in force: %s", exc)
            return False
        self._loaded = Loaded(budgets, key)
        log.info("budgets reloaded: %d tenant(s)", len(budgets.tenants))
        return True
